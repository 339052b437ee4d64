"""BlockDiagonalOperator, EighOperator and WoodburyOperator against dense oracles."""

import equinox as eqx
import hypothesis
import hypothesis.strategies as st
import jax
import jax.flatten_util
import jax.numpy as jnp
import jaxtyping
import lineax as lx
import numpy as np
import pytest
from helpers import block_diagonal_dense

import eqx_curv
from eqx_curv.testing import assert_matches_dense


def ravel(tree):
    return np.asarray(jax.flatten_util.ravel_pytree(tree)[0])


def symmetric(n, seed, negative=0):
    """A float64 symmetric matrix with `negative` negative eigenvalues, one zero."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    w = rng.uniform(0.1, 2.0, n)
    w[:negative] *= -1
    return (q * w) @ q.T


# ------------------------------------------------------------------ block diagonal


def _blocks(seed):
    a, b = symmetric(3, seed), symmetric(2, seed + 1)
    kron = eqx_curv.KroneckerOperator(
        jnp.asarray(a), jnp.asarray(b), tags=lx.positive_semidefinite_tag
    )
    d = jnp.asarray(np.random.default_rng(seed).uniform(0.5, 1.5, 4))
    blocks = {
        "w": kron,
        "b": lx.TaggedLinearOperator(
            lx.DiagonalLinearOperator(d), lx.positive_semidefinite_tag
        ),
        "m": lx.MatrixLinearOperator(
            jnp.asarray(symmetric(5, seed + 2)), lx.positive_semidefinite_tag
        ),
    }
    dense = [np.kron(a, b), np.diag(np.asarray(d)), symmetric(5, seed + 2)]
    return blocks, dense


@hypothesis.given(seed=st.integers(0, 2**16))
def test_block_diagonal_against_dense(seed):
    blocks, mats = _blocks(seed)
    op = eqx_curv.BlockDiagonalOperator(blocks)
    # ravel_pytree orders dict keys: "b", "m", "w".
    dense = block_diagonal_dense(mats[1], mats[2], mats[0])
    structure = op.in_structure()
    assert structure["w"].shape == (3, 2) and structure["b"].shape == (4,)
    # `mv` (column by column) and `as_matrix()` against the dense matrix.
    assert_matches_dense(op, dense)
    np.testing.assert_allclose(np.asarray(lx.diagonal(op)), np.diag(dense), rtol=1e-12)
    assert lx.is_symmetric(op) and lx.is_positive_semidefinite(op)


def test_block_diagonal_solves():
    blocks, mats = _blocks(7)
    op = eqx_curv.BlockDiagonalOperator(blocks)
    dense = block_diagonal_dense(mats[1], mats[2], mats[0])
    v = {"w": jnp.ones((3, 2)), "b": jnp.arange(4.0), "m": jnp.ones(5)}
    for solver in (lx.CG(rtol=1e-12, atol=1e-12), lx.Cholesky(), lx.LU()):
        sol = lx.linear_solve(op, v, solver).value
        np.testing.assert_allclose(
            ravel(sol), np.linalg.solve(dense, ravel(v)), rtol=1e-8
        )


def test_block_diagonal_of_inverses_and_errors():
    blocks, mats = _blocks(0)
    inverse = eqx_curv.BlockDiagonalOperator(
        {"w": blocks["w"].damped_inverse(0.1), "b": lx.invert(blocks["b"])}
    )
    assert lx.is_symmetric(inverse)
    v = {"w": jnp.ones((3, 2)), "b": jnp.ones(4)}
    out = inverse.mv(v)
    np.testing.assert_allclose(
        ravel(out["w"]), np.linalg.solve(mats[0] + 0.1 * np.eye(6), np.ones(6))
    )
    with pytest.raises(ValueError, match="symmetric"):
        eqx_curv.BlockDiagonalOperator(
            {"x": lx.MatrixLinearOperator(jnp.arange(4.0).reshape(2, 2))}
        )
    with pytest.raises((TypeError, jaxtyping.TypeCheckError), match="blocks"):
        eqx_curv.BlockDiagonalOperator({"x": jnp.eye(2)})


# ------------------------------------------------------------------ eigh


@hypothesis.given(
    n=st.sampled_from((2, 5, 12)),
    negative=st.integers(0, 2),
    seed=st.integers(0, 2**16),
)
def test_eigh_operator_abs_power_damping(n, negative, seed):
    h = symmetric(n, seed, negative)
    w, q = np.linalg.eigh(h)
    op = eqx_curv.EighOperator(jnp.asarray(h))
    g = np.random.default_rng(seed).standard_normal(n)
    np.testing.assert_allclose(np.asarray(op.mv(jnp.asarray(g))), h @ g, rtol=1e-10)
    absolute = op.abs()
    abs_dense = (q * np.abs(w)) @ q.T
    assert lx.is_positive_semidefinite(absolute)
    abs_matrix = np.asarray(absolute.as_matrix())
    np.testing.assert_allclose(abs_matrix, abs_dense, atol=1e-12)
    assert np.linalg.eigvalsh(abs_matrix).min() >= -1e-12  # PSD
    # Saddle-free Newton: |H|^{-1} g, and its damped form, vs dense solves.
    np.testing.assert_allclose(
        np.asarray(absolute.inverse().mv(jnp.asarray(g))),
        np.linalg.solve(abs_dense, g),
        rtol=1e-9,
    )
    lam = 0.5
    np.testing.assert_allclose(
        np.asarray(absolute.damped(lam).inverse().mv(jnp.asarray(g))),
        np.linalg.solve(abs_dense + lam * np.eye(n), g),
        rtol=1e-9,
    )
    np.testing.assert_allclose(
        np.asarray(op.power(3).as_matrix()), np.linalg.matrix_power(h, 3), atol=1e-10
    )
    np.testing.assert_allclose(
        np.asarray(absolute.power(-0.5).as_matrix()),
        (q * np.abs(w) ** -0.5) @ q.T,
        atol=1e-10,
    )
    np.testing.assert_allclose(np.asarray(lx.diagonal(op)), np.diag(h), atol=1e-12)


def test_abs_of_psd_is_itself_and_operator_input():
    h = symmetric(6, 3)  # positive definite
    params = {"a": jnp.zeros(2), "b": jnp.zeros((2, 2))}
    dense_op = lx.MatrixLinearOperator(jnp.asarray(h), lx.positive_semidefinite_tag)
    # A lineax operator on a PyTree: materialised in ravel_pytree order.
    _, unravel = jax.flatten_util.ravel_pytree(params)
    tree_op = lx.FunctionLinearOperator(
        lambda v: unravel(dense_op.mv(jax.flatten_util.ravel_pytree(v)[0])),
        jax.eval_shape(lambda: params),
        lx.positive_semidefinite_tag,
    )
    for source in (jnp.asarray(h), tree_op):
        op = eqx_curv.EighOperator(source)
        np.testing.assert_allclose(np.asarray(op.abs().as_matrix()), h, atol=1e-12)
    op = eqx_curv.EighOperator(tree_op)
    assert lx.is_positive_semidefinite(op)
    assert jax.tree.structure(op.in_structure()) == jax.tree.structure(params)
    v = {"a": jnp.ones(2), "b": jnp.ones((2, 2))}
    np.testing.assert_allclose(ravel(op.mv(v)), h @ np.ones(6), rtol=1e-10)
    sol = lx.linear_solve(op, v, lx.Cholesky()).value
    np.testing.assert_allclose(ravel(sol), np.linalg.solve(h, np.ones(6)), rtol=1e-9)


def test_pseudo_inverse_drops_zero_curvature():
    # A ReLU-like Hessian: exactly singular. The pseudo-inverse never divides by zero.
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    w = np.array([0.0, 0.0, -1.0, 2.0, 3.0])
    h = (q * w) @ q.T
    op = eqx_curv.EighOperator(jnp.asarray(h)).abs().pseudo_inverse()
    matrix = np.asarray(op.as_matrix())
    assert np.isfinite(matrix).all()
    np.testing.assert_allclose(
        matrix, np.linalg.pinv((q * np.abs(w)) @ q.T), atol=1e-10
    )
    with pytest.raises(ValueError, match="damping"):
        eqx_curv.EighOperator(jnp.asarray(h)).damped(-1.0)
    with pytest.raises(ValueError, match="symmetric"):
        eqx_curv.EighOperator(lx.MatrixLinearOperator(jnp.arange(4.0).reshape(2, 2)))


# ------------------------------------------------------------------ woodbury


def _ggn_like(seed, singular_core):
    """Parameters {'w': (4, 3), 'b': (5,)} (17 entries), factor of rank 6."""
    rng = np.random.default_rng(seed)
    v_dense = rng.standard_normal((17, 6))
    params = {"b": jnp.zeros(5), "w": jnp.zeros((4, 3))}
    _, unravel = jax.flatten_util.ravel_pytree(params)
    factor = lx.FunctionLinearOperator(
        lambda u: unravel(jnp.asarray(v_dense) @ u),
        jax.ShapeDtypeStruct((6,), jnp.float64),
    )
    if singular_core:
        # Block-diagonal softmax-style Hessians: each 3x3 block diag(p) - p p^T is
        # singular (its rows sum to zero).
        core = np.zeros((6, 6))
        for i in range(2):
            p = rng.dirichlet(np.ones(3))
            core[3 * i : 3 * i + 3, 3 * i : 3 * i + 3] = np.diag(p) - np.outer(p, p)
    else:
        core = np.eye(6)
    diag = {"b": jnp.asarray(rng.uniform(0.5, 1.5, 5)), "w": jnp.full((4, 3), 0.3)}
    dense = np.diag(ravel(diag)) + v_dense @ core @ v_dense.T
    return diag, factor, core, dense, params


@pytest.mark.parametrize("singular_core", [False, True])
def test_woodbury_against_dense(singular_core):
    diag, factor, core, dense, params = _ggn_like(0, singular_core)
    op = eqx_curv.WoodburyOperator(
        diag,
        factor,
        None if not singular_core else jnp.asarray(core),
        tags=lx.positive_semidefinite_tag,
    )
    assert lx.is_symmetric(op) and lx.is_positive_semidefinite(op)
    np.testing.assert_allclose(np.asarray(op.as_matrix()), dense, rtol=1e-10)
    g = {"b": jnp.arange(5.0), "w": jnp.ones((4, 3))}
    inverse = op.inverse()
    expected = np.linalg.solve(dense, ravel(g))
    # Its `mv` (column by column) and `as_matrix()`, to the conditioning of `dense`.
    cond = np.linalg.cond(dense)
    assert_matches_dense(inverse, np.linalg.inv(dense), rtol=100 * cond * 2.0**-52)
    sol = lx.linear_solve(op, g, lx.CG(rtol=1e-12, atol=1e-12)).value
    np.testing.assert_allclose(ravel(sol), expected, rtol=1e-8)


def test_woodbury_scalar_damping_dense_factor_and_jit():
    rng = np.random.default_rng(1)
    v = rng.standard_normal((10, 3))
    lam = 0.8
    dense = lam * np.eye(10) + v @ v.T

    @eqx.filter_jit
    def solve(lam, v, g):
        return eqx_curv.WoodburyOperator(lam, v).inverse().mv(g)

    g = jnp.asarray(rng.standard_normal(10))
    np.testing.assert_allclose(
        np.asarray(solve(lam, jnp.asarray(v), g)),
        np.linalg.solve(dense, np.asarray(g)),
        rtol=1e-9,
    )
    with pytest.raises((ValueError, jaxtyping.TypeCheckError), match="core"):
        eqx_curv.WoodburyOperator(1.0, jnp.asarray(v), jnp.eye(4))


def test_woodbury_psd_tag_is_checked_where_it_can_be():
    v = jnp.asarray(np.random.default_rng(2).standard_normal((6, 2)))
    # Untagged: a negative damping is a valid operator, just not PSD, so CG refuses it
    # up front instead of breaking down.
    op = eqx_curv.WoodburyOperator(-1.0, v)
    assert op.tags == frozenset([lx.symmetric_tag])
    with pytest.raises(ValueError, match="positive"):
        lx.linear_solve(op, jnp.ones(6), lx.CG(rtol=1e-8, atol=1e-8))
    # A PSD tag on a concrete negative diagonal or an indefinite core is refused.
    with pytest.raises(ValueError, match="`diagonal` has the entry -1"):
        eqx_curv.WoodburyOperator(-1.0, v, tags=lx.positive_semidefinite_tag)
    with pytest.raises(ValueError, match="`core` has the eigenvalue -2"):
        eqx_curv.WoodburyOperator(
            1.0, v, jnp.diag(jnp.array([1.0, -2.0])), tags=lx.positive_semidefinite_tag
        )
    with pytest.raises(ValueError, match="`core` must be symmetric"):
        eqx_curv.WoodburyOperator(1.0, v, jnp.array([[1.0, 1.0], [0.0, 1.0]]))
    # Traced values cannot be checked: the tag is the caller's promise.
    tags = jax.jit(
        lambda lam: (
            eqx_curv.WoodburyOperator(
                lam, v, tags=lx.positive_semidefinite_tag
            ).diagonal
        )
    )(-1.0)
    assert tags.shape == (6,)
    # The inverse is symmetric; it is positive definite, but its core is negative, so
    # it carries no PSD tag (wrap it to use it as a preconditioner).
    psd = eqx_curv.WoodburyOperator(0.5, v, tags=lx.positive_semidefinite_tag)
    assert psd.inverse().tags == frozenset([lx.symmetric_tag])
    dense = 0.5 * np.eye(6) + np.asarray(v) @ np.asarray(v).T
    sol = lx.linear_solve(
        psd,
        jnp.ones(6),
        eqx_curv.CG(rtol=1e-12, atol=1e-12, max_steps=50),
        options={
            "preconditioner": lx.TaggedLinearOperator(
                psd.inverse(), lx.positive_semidefinite_tag
            )
        },
    )
    np.testing.assert_allclose(sol.value, np.linalg.solve(dense, np.ones(6)))


def test_eigh_built_from_its_decomposition_and_tags():
    h = symmetric(4, 5, negative=1)
    op = eqx_curv.EighOperator(jnp.asarray(h))
    assert op.tags == frozenset([lx.symmetric_tag])
    w, q = np.linalg.eigh(h)
    # A PSD tag on eigenvalues known to be negative is refused, not trusted.
    with pytest.raises(ValueError, match="tagged `lineax.positive_semidefinite_tag`"):
        eqx_curv.EighOperator(
            eigenvalues=jnp.asarray(w),
            eigenvectors=jnp.asarray(q),
            tags=lx.positive_semidefinite_tag,
        )
    direct = eqx_curv.EighOperator(
        eigenvalues=jnp.asarray(w),
        eigenvectors=jnp.asarray(q),
        structure={"a": jax.ShapeDtypeStruct((2, 2), jnp.float64)},
    )
    assert direct.tags == frozenset([lx.symmetric_tag])
    assert direct.in_structure()["a"].shape == (2, 2)
    np.testing.assert_allclose(np.asarray(direct.as_matrix()), h, atol=1e-12)
    # Matrix functions go through the same constructor.
    absolute = op.abs()
    assert type(absolute) is eqx_curv.EighOperator
    assert lx.is_positive_semidefinite(absolute)
    assert lx.is_positive_semidefinite(op.power(2))
    assert not lx.is_positive_semidefinite(op.power(3))
    assert not lx.is_positive_semidefinite(op.damped(1.0))
    with pytest.raises(ValueError, match="`exponent` is 0.5, a non-integer power"):
        op.power(0.5)
    np.testing.assert_allclose(
        np.asarray(op.apply(jnp.exp).as_matrix()), (q * np.exp(w)) @ q.T, atol=1e-12
    )
    # A PSD matrix whose computed eigenvalues dip below zero by rounding keeps real
    # powers: they are clipped at zero (a singular float32 PSD matrix).
    v = np.asarray(jax.random.normal(jax.random.key(3), (5, 3)), np.float32)
    singular = v @ v.T
    psd = eqx_curv.EighOperator(
        jnp.asarray(singular), tags=lx.positive_semidefinite_tag
    )
    assert float(jnp.min(psd.eigenvalues)) >= 0
    root = np.asarray(psd.power(0.5).as_matrix())
    assert np.isfinite(root).all()
    np.testing.assert_allclose(root @ root, singular, atol=1e-4)
    with pytest.raises(ValueError, match="not both"):
        eqx_curv.EighOperator(jnp.asarray(h), eigenvalues=jnp.asarray(w))
    with pytest.raises(ValueError, match="both `eigenvalues` and"):
        eqx_curv.EighOperator(eigenvalues=jnp.asarray(w))
    # Under pytest the annotation itself is checked (jaxtyping + beartype); without
    # it the constructor raises a ValueError naming the shapes.
    with pytest.raises((ValueError, jaxtyping.TypeCheckError), match="eigenvectors"):
        eqx_curv.EighOperator(eigenvalues=jnp.ones(3), eigenvectors=jnp.eye(2))
    with pytest.raises(ValueError, match="`structure` must hold 4"):
        eqx_curv.EighOperator(
            eigenvalues=jnp.asarray(w),
            eigenvectors=jnp.asarray(q),
            structure=jax.ShapeDtypeStruct((3,), jnp.float64),
        )
