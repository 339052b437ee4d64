"""Power iteration's stopping rule and result; argument checks and NumPy inputs across
the linear-algebra functions; derivatives of the inverse roots."""

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest

import eqx_curv


def _close_magnitudes(dtype):
    # Extreme eigenvalues 2 and -1.99: the Rayleigh quotient barely moves between
    # steps while v is still a mixture of both eigenvectors.
    return jnp.diag(jnp.array([2.0, -1.99, 0.5, 0.1], dtype))


def test_close_opposite_eigenvalues_are_not_claimed_converged():
    matrix = _close_magnitudes(jnp.float32)
    # With key 2 the former rule (relative change of the estimate below sqrt(eps))
    # stopped after 4 steps at -1.69, with ||Av - lambda v|| = 1.05.
    result = eqx_curv.power_iteration(matrix, jax.random.key(2))
    assert not bool(result.converged)
    assert int(result.num_steps) == 100
    v = np.asarray(result.eigenvector, np.float64)
    lam = float(result.eigenvalue)
    residual = np.linalg.norm(np.asarray(matrix, np.float64) @ v - lam * v)
    np.testing.assert_allclose(float(result.residual), residual, rtol=1e-5)
    # Symmetric: some eigenvalue lies within `residual` of the estimate, but the
    # estimate is far from 2, which is what `converged=False` warns about.
    assert min(abs(lam - e) for e in (2.0, -1.99, 0.5, 0.1)) <= residual * (1 + 1e-5)
    assert residual > 0.1


def test_enough_steps_separate_close_eigenvalues():
    result = eqx_curv.power_iteration(
        _close_magnitudes(jnp.float32), jax.random.key(2), max_steps=5000
    )
    assert bool(result.converged)
    eps = float(jnp.finfo(jnp.float32).eps)
    assert float(result.residual) <= eps**0.5 * abs(float(result.eigenvalue))
    np.testing.assert_allclose(float(result.eigenvalue), 2.0, rtol=1e-6)


def test_zero_matrix_converges_at_once():
    result = eqx_curv.power_iteration(jnp.zeros((3, 3)), jax.random.key(0))
    assert bool(result.converged) and int(result.num_steps) == 1
    assert float(result.eigenvalue) == 0.0


def test_power_iteration_bad_arguments():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="`matrix` must be a square operator"):
        eqx_curv.power_iteration(lx.MatrixLinearOperator(jnp.ones((3, 4))), key)
    with pytest.raises(ValueError, match="`matrix` is empty"):
        eqx_curv.power_iteration(jnp.zeros((0, 0)), key)
    with pytest.raises(ValueError, match="`max_steps` must be a positive"):
        eqx_curv.power_iteration(jnp.eye(2), key, max_steps=0)
    with pytest.raises(ValueError, match="`rtol` must be a finite non-negative"):
        eqx_curv.power_iteration(jnp.eye(2), key, rtol=-1.0)


def test_inverse_root_bad_arguments():
    with pytest.raises(ValueError, match="`matrix` is empty"):
        eqx_curv.inverse_pth_root(jnp.zeros((0, 0)), 2)
    with pytest.raises(ValueError, match="`matrix` is empty"):
        eqx_curv.newton_schulz_inverse_sqrt(jnp.zeros((0, 0)))
    for bad in (float("inf"), float("nan"), -1.0):
        with pytest.raises(ValueError, match="`ridge_epsilon` must be a finite"):
            eqx_curv.inverse_pth_root(jnp.eye(3), 2, ridge_epsilon=bad)
    # Wrong types are caught by the annotations under the test suite's import hook;
    # the library's own check gives users without it a sentence too.
    from eqx_curv._linalg.roots import check_ridge_epsilon

    for bad, error in (
        (1j, TypeError),
        ("1e-6", TypeError),
        (jnp.array([1e-6, 1e-6]), ValueError),
    ):
        with pytest.raises(error, match="`ridge_epsilon` must be"):
            check_ridge_epsilon(bad)
    with pytest.raises(ValueError, match="`eps` must be a finite"):
        eqx_curv.newton_schulz(jnp.eye(3), eps=-1.0)


def test_traced_ridge_epsilon_is_checked_at_run_time():
    import equinox as eqx

    fn = eqx.filter_jit(
        lambda e: eqx_curv.inverse_pth_root(jnp.eye(3), 2, ridge_epsilon=e)
    )
    assert bool(fn(jnp.asarray(1e-6)).valid)
    with pytest.raises(eqx.EquinoxRuntimeError, match="`ridge_epsilon` must be"):
        fn(jnp.asarray(jnp.inf))


def test_numpy_inputs_are_accepted():
    # The test suite runs under jaxtyping's import hook, so this also checks that the
    # annotations admit NumPy arrays (as the code does).
    rng = np.random.default_rng(0)
    g = rng.standard_normal((6, 6))
    spd = g @ g.T + 6 * np.eye(6)
    result = eqx_curv.power_iteration(spd, jax.random.key(0), max_steps=500)
    np.testing.assert_allclose(
        float(result.eigenvalue), np.linalg.eigvalsh(spd)[-1], rtol=1e-6
    )
    root = eqx_curv.inverse_pth_root(spd, 3)
    w, q = np.linalg.eigh(spd + float(root.ridge) * np.eye(6))
    np.testing.assert_allclose(root.root, (q * w ** (-1 / 3)) @ q.T, rtol=1e-8)
    ns = eqx_curv.newton_schulz_inverse_sqrt(spd)
    np.testing.assert_allclose(ns.root, (q * w**-0.5) @ q.T, rtol=1e-8)
    np.testing.assert_allclose(
        eqx_curv.matrix_power(g, 3), np.linalg.matrix_power(g, 3), rtol=1e-12
    )
    np.testing.assert_allclose(
        eqx_curv.power_minus_identity(0.1 * g, 2),
        np.linalg.matrix_power(np.eye(6) + 0.1 * g, 2) - np.eye(6),
        atol=1e-12,
    )
    assert eqx_curv.newton_schulz(g[:, :4]).shape == (6, 4)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_roots_are_computed_in_float32(dtype):
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    spd = (q * np.logspace(0, -2, 8)[None, :]) @ q.T
    matrix = jnp.asarray(spd, dtype)
    for result in (
        eqx_curv.inverse_pth_root(matrix, 4),
        eqx_curv.newton_schulz_inverse_sqrt(matrix),
    ):
        assert result.root.dtype == dtype and result.ridge.dtype == dtype
        assert bool(result.valid)
    # Against the float64 root of the matrix as rounded to `dtype`: the only error
    # left is the final rounding to `dtype`.
    exact = np.asarray(matrix.astype(jnp.float32), np.float64)
    exact = exact + float(result.ridge) * np.eye(8)
    w, v = np.linalg.eigh(exact)
    expected = (v * w**-0.25) @ v.T
    root = np.asarray(eqx_curv.inverse_pth_root(matrix, 4).root.astype(jnp.float32))
    rel = np.linalg.norm(root - expected) / np.linalg.norm(expected)
    assert rel <= 2 * float(jnp.finfo(dtype).eps)


def _spd(n, seed):
    # A separated top eigenvalue (10 against at most 1), so that the power iteration
    # behind the ridge converges: the ridge's derivative is that of the Rayleigh
    # quotient at its final vector, exact only as far as that vector is.
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    w = np.concatenate([[10.0], np.linspace(1.0, 0.3, n - 1)])
    return (q * w[None, :]) @ q.T


def _root_oracle(a, p, ridge_epsilon):
    """The float64 root of the ridged matrix, as a differentiable JAX function."""
    s = 0.5 * (a + a.T)
    w, q = jnp.linalg.eigh(s)
    ridged = s + ridge_epsilon * jnp.max(jnp.abs(w)) * jnp.eye(a.shape[0])
    w, q = jnp.linalg.eigh(ridged)
    return (q * (w ** (-1.0 / p))[None, :]) @ q.T


@pytest.mark.parametrize("p", [3])
@pytest.mark.parametrize("which", ["inverse_pth_root", "newton_schulz_inverse_sqrt"])
def test_inverse_root_derivatives_are_the_exact_roots(p, which):
    # Reverse mode through the iteration's while_loop is impossible; the derivative is
    # attached by implicit differentiation, so jax.grad works and agrees with the
    # derivative of the exact (eigh) root, and so does forward mode.
    n = 6
    if which == "newton_schulz_inverse_sqrt":
        p = 2

    def root_fn(a, e):
        if which == "inverse_pth_root":
            return eqx_curv.inverse_pth_root(a, p, ridge_epsilon=e).root
        return eqx_curv.newton_schulz_inverse_sqrt(a, ridge_epsilon=e).root

    a = jnp.asarray(_spd(n, 0))
    weights = jnp.asarray(np.random.default_rng(1).standard_normal((n, n)))
    eps = jnp.asarray(1e-2)

    def loss(fn, a, e):
        return jnp.sum(weights * fn(a, e))

    ours = jax.grad(lambda a, e: loss(root_fn, a, e), argnums=(0, 1))(a, eps)
    oracle = jax.grad(
        lambda a, e: loss(lambda a, e: _root_oracle(a, p, e), a, e), argnums=(0, 1)
    )(a, eps)
    np.testing.assert_allclose(ours[0], oracle[0], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(ours[1], oracle[1], rtol=1e-8)
    tangent = jnp.asarray(np.random.default_rng(2).standard_normal((n, n)))
    _, forward = jax.jvp(lambda a: root_fn(a, eps), (a,), (tangent,))
    _, expected = jax.jvp(lambda a: _root_oracle(a, p, eps), (a,), (tangent,))
    np.testing.assert_allclose(forward, expected, rtol=1e-8, atol=1e-10)
