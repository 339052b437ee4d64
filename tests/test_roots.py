"""Inverse p-th roots and power iteration against float64 eigendecomposition oracles."""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_curv
from eqx_curv.testing import (
    assert_inverse_root,
    inverse_root_tolerance as root_tolerance,
    spd_matrices,
    spd_matrix as spd,  # float64, eigenvalues log-spaced in [1 / cond, 1]
)


SIZES = (8, 32, 64, 128, 256)
CONDS = (1.0, 1e2, 1e4, 1e6)


def eigh_root64(matrix, p):
    """Float64 oracle: the inverse p-th root and the condition number."""
    matrix = np.asarray(matrix, np.float64)
    w, q = np.linalg.eigh(0.5 * (matrix + matrix.T))
    return (q * w ** (-1.0 / p)) @ q.T, w[-1] / w[0]


@functools.partial(jax.jit, static_argnums=1, static_argnames=("max_steps",))
def _root(matrix, p, max_steps=100):
    return eqx_curv.inverse_pth_root(matrix, p, max_steps=max_steps)


def check_root(matrix, p, result):
    n = matrix.shape[0]
    dtype = matrix.dtype
    assert result.root.dtype == dtype
    assert bool(result.valid) and bool(result.converged)
    ridged = np.asarray(matrix, np.float64) + float(result.ridge) * np.eye(n)
    expected, kappa = eigh_root64(ridged, p)
    root = np.asarray(result.root, np.float64)
    assert np.isfinite(root).all()
    rel = np.linalg.norm(root - expected) / np.linalg.norm(expected)
    assert rel <= root_tolerance(dtype, n, kappa, p), (rel, kappa)
    # X^p (A + ridge) = I, up to the forward error amplified by the conditioning.
    residual = np.linalg.norm(np.linalg.matrix_power(root, p) @ ridged - np.eye(n), 2)
    eps = np.finfo(dtype).eps
    assert residual <= 2 * np.sqrt(n) * eps * p * kappa, (residual, kappa)


@hypothesis.given(
    matrix=spd_matrices(SIZES, CONDS, (jnp.float32,)), p=st.integers(1, 8)
)
def test_inverse_pth_root_matches_float64_eigh(matrix, p):
    # At most 40 (n, p) compilations, whatever the number of examples.
    check_root(matrix, p, _root(matrix, p))


@pytest.mark.parametrize("p", [3, 8])
def test_inverse_pth_root_float64(p):
    # In float64 the same tolerance formula is about 1e-10 at condition number 1e6.
    matrix = jnp.asarray(spd(64, 1e6, p), jnp.float64)
    check_root(matrix, p, _root(matrix, p))


@pytest.mark.parametrize("p", range(1, 9))
def test_every_p_is_exact(p):
    # The reference page and a widely used routine round p to a power of two, which
    # is wrong for p = 3, 5, 6, 7; check each p at two moderate condition numbers
    # (one compilation per p).
    assert_inverse_root(_root, p, sizes=(32,), conditions=(1e2, 1e4), seed=p)
    matrix = jnp.asarray(spd(32, 1e4, p), jnp.float32)
    check_root(matrix, p, _root(matrix, p))


def test_ridge_is_relative_to_lambda_max():
    matrix = jnp.asarray(7.0 * spd(32, 1e3, 0), jnp.float32)
    result = _root(matrix, 2)
    np.testing.assert_allclose(float(result.ridge), 7e-6, rtol=1e-4)


def test_singular_psd_matrix_is_regularised_by_the_ridge():
    # Rank 8 of 32: the ridge alone makes it invertible (condition number 1e6).
    rng = np.random.default_rng(0)
    g = rng.standard_normal((32, 8))
    matrix = jnp.asarray(g @ g.T, jnp.float32)
    check_root(matrix, 4, _root(matrix, 4))


def test_fallback_to_eigendecomposition():
    matrix = jnp.asarray(spd(32, 1e4, 3), jnp.float32)
    result = _root(matrix, 3, max_steps=2)
    assert not bool(result.converged) and bool(result.valid)
    assert int(result.num_steps) == 2
    ridged = np.asarray(matrix, np.float64) + float(result.ridge) * np.eye(32)
    expected, kappa = eigh_root64(ridged, 3)
    # The float64 fallback is exact up to the final cast to float32.
    np.testing.assert_allclose(
        np.asarray(result.root),
        expected,
        rtol=0,
        atol=1e3 * 2**-24 * np.abs(expected).max(),
    )


def test_fallback_in_input_precision():
    matrix = jnp.asarray(spd(32, 1e2, 4), jnp.float32)
    result = jax.jit(
        lambda m: eqx_curv.inverse_pth_root(
            m, 2, max_steps=1, fallback_in_float64=False
        )
    )(matrix)
    assert not bool(result.converged) and bool(result.valid)
    ridged = np.asarray(matrix, np.float64) + float(result.ridge) * np.eye(32)
    expected, kappa = eigh_root64(ridged, 2)
    rel = np.linalg.norm(np.asarray(result.root) - expected) / np.linalg.norm(expected)
    assert rel <= root_tolerance(np.float32, 32, kappa, 2)


@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_indefinite_input_is_flagged(p):
    w = np.concatenate([np.linspace(1.0, 0.1, 31), [-0.3]])
    q, _ = np.linalg.qr(np.random.default_rng(p).standard_normal((32, 32)))
    matrix = jnp.asarray((q * w) @ q.T, jnp.float32)
    result = _root(matrix, p)
    assert not bool(result.valid) and not bool(result.converged)
    assert np.isnan(np.asarray(result.root)).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_is_flagged(bad):
    matrix = np.asarray(spd(32, 10.0, 0), np.float32)
    matrix[2, 5] = bad
    result = _root(jnp.asarray(matrix), 4)
    assert not bool(result.valid)
    assert np.isnan(np.asarray(result.root)).all()


def test_vmap_over_a_batch_of_matrices():
    # Under vmap the cond becomes a select: both branches run, the right one is kept.
    batch = jnp.asarray(np.stack([spd(16, c, 5) for c in (1e1, 1e3, 1e5)]), jnp.float32)
    results = jax.vmap(lambda m: eqx_curv.inverse_pth_root(m, 4))(batch)
    for i in range(3):
        check_root(batch[i], 4, jax.tree.map(lambda x, i=i: x[i], results))


def test_bad_arguments_raise():
    matrix = jnp.eye(4)
    with pytest.raises(ValueError, match="`p`"):
        eqx_curv.inverse_pth_root(matrix, 0)
    with pytest.raises(ValueError, match="`p`"):
        eqx_curv.inverse_pth_root(matrix, -3)
    with pytest.raises(ValueError, match="ridge_epsilon"):
        eqx_curv.inverse_pth_root(matrix, 2, ridge_epsilon=-1.0)
    # Shape and dtype are also caught by the jaxtyping annotations under pytest; the
    # library's own checks give the message users see without them.
    from eqx_curv._linalg.roots import check_matrix

    with pytest.raises(ValueError, match="square"):
        check_matrix(jnp.ones((3, 4)))
    with pytest.raises(TypeError, match="floating-point"):
        check_matrix(jnp.eye(3, dtype=jnp.int32))


@pytest.mark.parametrize("p", range(1, 10))
def test_matrix_power_is_exact(p):
    a = np.random.default_rng(p).standard_normal((5, 5))
    np.testing.assert_allclose(
        np.asarray(eqx_curv.matrix_power(jnp.asarray(a), p)),
        np.linalg.matrix_power(a, p),
        rtol=1e-12,
        atol=1e-12,
    )


@pytest.mark.parametrize("p", range(1, 10))
def test_power_minus_identity_is_exact(p):
    e = 0.3 * np.random.default_rng(p).standard_normal((5, 5))
    np.testing.assert_allclose(
        np.asarray(eqx_curv.power_minus_identity(jnp.asarray(e), p)),
        np.linalg.matrix_power(np.eye(5) + e, p) - np.eye(5),
        rtol=1e-12,
        atol=1e-12,
    )


def test_power_minus_identity_keeps_small_excess_accurate():
    # For a tiny excess, (I + E)^p - I formed from I + E loses everything to rounding
    # in float32; the excess form stays accurate relative to its own size.
    e = 1e-6 * np.random.default_rng(0).standard_normal((16, 16))
    exact = np.linalg.matrix_power(np.eye(16) + e, 5) - np.eye(16)
    excess = np.asarray(eqx_curv.power_minus_identity(jnp.asarray(e, jnp.float32), 5))
    naive = np.asarray(
        eqx_curv.matrix_power(jnp.asarray(np.eye(16) + e, jnp.float32), 5)
    ) - np.eye(16)
    rel = lambda x: np.linalg.norm(x - exact) / np.linalg.norm(exact)  # noqa: E731
    assert rel(excess) < 1e-5
    assert rel(naive) > 1e-3  # the check is meaningful: the naive form does fail


def test_power_iteration_seeded_and_jittable():
    matrix = jnp.asarray(spd(64, 1e3, 1) * 3.0)
    fn = jax.jit(eqx_curv.power_iteration)
    r1, r2 = fn(matrix, jax.random.key(5)), fn(matrix, jax.random.key(5))
    (lam1, v1), (lam2, v2) = (
        (r1.eigenvalue, r1.eigenvector),
        (r2.eigenvalue, r2.eigenvector),
    )
    assert float(lam1) == float(lam2) and np.array_equal(v1, v2)
    np.testing.assert_allclose(float(lam1), 3.0, rtol=1e-6)
    np.testing.assert_allclose(
        np.abs(np.asarray(matrix @ v1)), np.abs(3.0 * np.asarray(v1)), atol=1e-3
    )


def test_power_iteration_on_an_operator_and_signed():
    import lineax as lx

    d = jnp.array([1.0, -5.0, 2.0, 0.5])
    op = lx.DiagonalLinearOperator(d)
    result = eqx_curv.power_iteration(op, jax.random.key(0), max_steps=200)
    lam, v = result.eigenvalue, result.eigenvector
    assert bool(result.converged)
    np.testing.assert_allclose(float(lam), -5.0, rtol=1e-6)
    np.testing.assert_allclose(abs(float(v[1])), 1.0, rtol=1e-6)


# GPU-meant versions (run by benchmarks/gpu_check.sh): float32 only, larger sizes, and
# under the default matmul precision as well as HIGHEST, which the routine must not
# depend on (it asks for HIGHEST itself).
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["default", "highest"])
@hypothesis.given(
    matrix=spd_matrices((128, 512), CONDS, (jnp.float32,)), p=st.integers(1, 8)
)
def test_inverse_pth_root_float32_device(precision, matrix, p):
    # At most 16 (n, p) compilations per precision, whatever the number of examples.
    with jax.default_matmul_precision(precision):
        result = _root(matrix, p)
    check_root(matrix, p, result)


def test_ridge_epsilon_may_be_traced():
    # A traced ridge (e.g. vmapped over a sweep) works without recompiling per value.
    matrix = jnp.asarray(spd(32, 1e8, 6), jnp.float32)
    roots = jax.jit(
        jax.vmap(lambda eps: eqx_curv.inverse_pth_root(matrix, 2, ridge_epsilon=eps))
    )(jnp.asarray([1e-4, 1e-6], jnp.float32))
    for i, eps in enumerate((1e-4, 1e-6)):
        result = jax.tree.map(lambda x, i=i: x[i], roots)
        np.testing.assert_allclose(float(result.ridge), eps, rtol=1e-3)
        check_root(matrix, 2, result)


@pytest.mark.slow
@pytest.mark.parametrize("n", [512, 1024])
@pytest.mark.parametrize("p", [3, 4, 7])
@pytest.mark.parametrize("cond", [1e2, 1e6])
def test_inverse_pth_root_large(n, p, cond):
    matrix = jnp.asarray(spd(n, cond, n + p), jnp.float32)
    check_root(matrix, p, _root(matrix, p))


def test_power_iteration_steps_is_named_and_refuses_bool():
    a = jnp.eye(3)
    for bad in (True, 0):  # (a float is refused by the annotation under pytest)
        with pytest.raises(ValueError, match="`power_iteration_steps`"):
            eqx_curv.inverse_pth_root(a, 2, power_iteration_steps=bad)


def _eigh_root(matrix, p):
    from eqx_curv._linalg.roots import ridged_eigh_inverse_pth_root

    return ridged_eigh_inverse_pth_root(matrix, p, 1e-6)


_eigh_root_jit = jax.jit(_eigh_root, static_argnums=1)


@pytest.mark.parametrize("p", [2, 3, 4])
@pytest.mark.parametrize("cond", [1.0, 1e4, 1e6])
def test_eigh_root_matches_float64_eigh(cond, p):
    # Shampoo's CPU path: one float32 eigh, the ridge on the eigenvalues. Its forward
    # error is that of a backward-stable method, eps * kappa / p, with a constant up
    # to about 1.5 (4.6% at kappa 5e5, p = 2, where the formula allows 3%): twice
    # the Newton roots' tolerance, which they meet with a margin of about ten.
    n = 64
    matrix = jnp.asarray(spd(n, cond, p), jnp.float32)
    root, valid = _eigh_root_jit(matrix, p)
    assert root.dtype == jnp.float32 and bool(valid)
    a = np.asarray(matrix, np.float64)
    ridge = 1e-6 * np.linalg.eigvalsh(a)[-1]
    expected, kappa = eigh_root64(a + ridge * np.eye(n), p)
    rel = np.linalg.norm(np.asarray(root, np.float64) - expected)
    rel /= np.linalg.norm(expected)
    assert rel <= 2 * root_tolerance(jnp.float32, n, kappa, p), (rel, kappa)
    # And it agrees with the Newton iteration's root to that accuracy.
    newton = _root(matrix, p)
    rel = np.linalg.norm(np.asarray(root - newton.root, np.float64))
    rel /= np.linalg.norm(expected)
    assert rel <= 2 * root_tolerance(jnp.float32, n, kappa, p), (rel, kappa)


def test_eigh_root_flags_what_has_no_root():
    # Non-finite input and a zero matrix (no eigenvalue to take a ridge from): not
    # valid, and all NaN. A PSD matrix with rounding-negative eigenvalues is fine.
    for bad in (jnp.full((4, 4), jnp.nan, jnp.float32), jnp.zeros((4, 4), jnp.float32)):
        root, valid = _eigh_root_jit(bad, 4)
        assert not bool(valid) and np.isnan(np.asarray(root)).all()
    v = jnp.asarray([[1.0, 1.0, 1.0, 0.0]], jnp.float32)
    root, valid = _eigh_root_jit(v.T @ v, 4)  # rank one: eigenvalues 3, 0, 0, 0
    assert bool(valid) and np.isfinite(np.asarray(root)).all()
    np.testing.assert_allclose(
        np.linalg.eigvalsh(np.asarray(root, np.float64)).max(),
        (3e-6) ** -0.25,
        rtol=1e-3,
    )
