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

        def _is_psd(self):
            return True

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
