import jax
import jax.numpy as jnp
import lineax as lx
import pytest


def _diag_operator():
    from eqx_curv._operators.base import AbstractCurvatureOperator

    class Diag(AbstractCurvatureOperator):
        d: dict

        def _mv(self, v):
            return jax.tree.map(lambda a, b: a * b, self.d, v)

        def in_structure(self):
            return jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self.d
            )

        @property
        def tags(self):
            return frozenset([lx.symmetric_tag, lx.positive_semidefinite_tag])

    return Diag({"a": jnp.arange(1.0, 4.0), "b": 2 * jnp.ones((2, 2))})


@pytest.mark.parametrize(
    "solver",
    [
        lx.CG(rtol=1e-10, atol=1e-10),
        lx.Cholesky(),
        lx.LU(),
        lx.AutoLinearSolver(well_posed=True),
        lx.GMRES(rtol=1e-10, atol=1e-10),
        lx.LSMR(rtol=1e-10, atol=1e-10),
    ],
)
def test_every_lineax_solver_accepts_the_base(solver):
    op = _diag_operator()
    b = {"a": jnp.ones(3), "b": jnp.ones((2, 2))}
    sol = lx.linear_solve(op, b, solver).value
    expected = {"a": 1 / jnp.arange(1.0, 4.0), "b": 0.5 * jnp.ones((2, 2))}
    for k in b:
        assert jnp.allclose(sol[k], expected[k], rtol=1e-6)


def test_queries_and_structure_error():
    op = _diag_operator()
    assert lx.is_symmetric(op) and lx.is_positive_semidefinite(op)
    assert not lx.is_negative_semidefinite(op)
    assert jnp.allclose(lx.diagonal(op), jnp.array([1.0, 2, 3, 2, 2, 2, 2]))
    assert jnp.allclose(lx.materialise(op).as_matrix(), op.as_matrix())
    inv = lx.invert(op).mv({"a": jnp.ones(3), "b": jnp.ones((2, 2))})
    assert jnp.allclose(inv["b"], 0.5)
    with pytest.raises(ValueError, match="input structure"):
        op.mv({"a": jnp.ones(3)})
    with pytest.raises(ValueError, match="dtype"):
        op.mv({"a": jnp.ones(3, jnp.int32), "b": jnp.ones((2, 2))})


def _matrix_operator(matrix, tags):
    import equinox as eqx

    from eqx_curv._operators.base import AbstractCurvatureOperator, as_tags

    class Matrix(AbstractCurvatureOperator):
        matrix: jax.Array
        tags: frozenset = eqx.field(static=True)

        def __init__(self, matrix, tags):
            self.matrix = matrix
            self.tags = as_tags(tags)

        def _mv(self, v):
            return self.matrix @ v

        def in_structure(self):
            return jax.ShapeDtypeStruct((self.matrix.shape[0],), self.matrix.dtype)

    return Matrix(matrix, tags)


def test_every_query_reads_the_tags():
    m = jnp.array([[2.0, 1.0], [0.0, 3.0]])
    untagged = _matrix_operator(m, ())
    for query in (
        lx.is_symmetric,
        lx.is_positive_semidefinite,
        lx.is_negative_semidefinite,
        lx.is_diagonal,
        lx.is_tridiagonal,
        lx.has_unit_diagonal,
        lx.is_lower_triangular,
        lx.is_upper_triangular,
    ):
        assert not query(untagged), query
    upper = _matrix_operator(m, lx.upper_triangular_tag)
    assert lx.is_upper_triangular(upper) and not lx.is_lower_triangular(upper)
    nsd = _matrix_operator(-jnp.eye(2), [lx.negative_semidefinite_tag])
    assert lx.is_negative_semidefinite(nsd) and lx.is_symmetric(nsd)
    assert not lx.is_positive_semidefinite(nsd)
    # Not tagged symmetric: a true transpose (jax.linear_transpose of the product),
    # so LU solves with the transpose and gradients through solves are right.
    assert jnp.allclose(untagged.T.as_matrix(), m.T)
    assert jnp.allclose(untagged.as_matrix(), m)
    b = jnp.array([1.0, 2.0])
    sol = lx.linear_solve(untagged.T, b, lx.LU()).value
    assert jnp.allclose(m.T @ sol, b)
    symmetric = _matrix_operator(jnp.eye(2), lx.symmetric_tag)
    assert symmetric.T is symmetric
    assert lx.materialise(untagged).tags == frozenset()


def test_linearised_is_a_tagged_function_operator():
    from eqx_curv._operators.base import linearised

    structure = jax.ShapeDtypeStruct((2,), jnp.float64)
    tags = frozenset([lx.symmetric_tag, lx.positive_semidefinite_tag])
    scale = jnp.array([1.0, 2.0])
    op = linearised(lambda v: scale * v, structure, tags)
    assert isinstance(op, lx.FunctionLinearOperator) and op.tags == tags
    sol = lx.linear_solve(op, jnp.ones(2), lx.CG(rtol=1e-10, atol=1e-10))
    assert jnp.allclose(sol.value, jnp.array([1.0, 0.5]))
    # The closed-over array is hoisted into the operator's PyTree.
    assert any(leaf is not None for leaf in jax.tree.leaves(op))
