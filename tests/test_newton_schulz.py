"""Newton-Schulz orthogonalisation and inverse square root against float64 oracles."""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_roots import check_root, CONDS, spd

import eqx_curv


SHAPES = ((16, 16), (32, 8), (8, 32), (64, 48))


def with_singular_values(shape, smallest, seed):
    """A float64 matrix with singular values log-spaced in [smallest, 1]."""
    m, n = shape
    k = min(m, n)
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return (u * np.logspace(0, np.log10(smallest), k)) @ v.T


def predicted_singular_values(matrix, coefficients, num_steps):
    """The scalar polynomial applied to the normalised singular values, in float64."""
    s = np.linalg.svd(matrix, compute_uv=False)
    x = s / (np.sqrt(np.sum(s**2)) + 1e-7)  # newton_schulz's default eps
    a, b, c = coefficients
    for _ in range(num_steps):
        x = a * x + b * x**3 + c * x**5
    return np.sort(x)


@functools.partial(jax.jit, static_argnames=("num_steps", "coefficients"))
def _ns(matrix, num_steps, coefficients):
    return eqx_curv.newton_schulz(
        matrix, num_steps=num_steps, coefficients=coefficients
    )


def check_muon(matrix32):
    out = np.asarray(_ns(matrix32, 5, eqx_curv.MUON_COEFFICIENTS), np.float64)
    assert out.shape == matrix32.shape
    s = np.sort(np.linalg.svd(out, compute_uv=False))
    expected = predicted_singular_values(
        np.asarray(matrix32, np.float64), eqx_curv.MUON_COEFFICIENTS, 5
    )
    # Muon's quintic is not an orthogonaliser: it maps every normalised singular value
    # in [2e-3, 1] into about [0.68, 1.21] (checked on the scalar polynomial), and it
    # does act on each singular value as the polynomial, up to float32 rounding
    # amplified by the polynomial's slope (at most about 3.4 per step).
    assert s.min() >= 0.68 - 1e-3 and s.max() <= 1.21 + 1e-3, (s.min(), s.max())
    np.testing.assert_allclose(s, expected, atol=3.5**5 * 4 * np.finfo(np.float32).eps)


@hypothesis.given(
    shape=st.sampled_from(SHAPES),
    smallest=st.sampled_from((1e-2, 1e-1, 1.0)),
    scale=st.sampled_from((1e-3, 1.0, 1e3)),
    seed=st.integers(0, 2**16),
)
def test_muon_quintic_lands_singular_values_in_a_band(shape, smallest, scale, seed):
    # Normalised singular values are at least smallest / sqrt(min(m, n)) >= 1.2e-3
    # ... for the shapes here; the band is only promised above 2e-3.
    hypothesis.assume(smallest / np.sqrt(min(shape)) >= 2e-3)
    matrix = jnp.asarray(
        scale * with_singular_values(shape, smallest, seed), jnp.float32
    )
    check_muon(matrix)


@pytest.mark.parametrize(
    "coefficients", [eqx_curv.CUBIC_COEFFICIENTS, (15 / 8, -10 / 8, 3 / 8)]
)
@pytest.mark.parametrize("shape", [(32, 16), (16, 32), (24, 24)])
def test_convergent_coefficients_orthogonalise(coefficients, shape):
    g = with_singular_values(shape, 1e-2, 0)
    out = np.asarray(_ns(jnp.asarray(g, jnp.float32), 30, coefficients), np.float64)
    u, _, vt = np.linalg.svd(g, full_matrices=False)
    polar = u @ vt
    eps = np.finfo(np.float32).eps
    k = min(shape)
    # Orthogonal (U V^T), not just well-conditioned.
    np.testing.assert_allclose(out, polar, atol=10 * np.sqrt(k) * eps)
    gram = out @ out.T if shape[0] <= shape[1] else out.T @ out
    np.testing.assert_allclose(gram, np.eye(k), atol=10 * np.sqrt(k) * eps)


def test_newton_schulz_batch_zero_and_errors():
    g = jnp.asarray(np.stack([with_singular_values((8, 4), 0.1, s) for s in range(3)]))
    out = eqx_curv.newton_schulz(
        g, num_steps=30, coefficients=eqx_curv.CUBIC_COEFFICIENTS
    )
    for i in range(3):
        np.testing.assert_allclose(
            np.asarray(out[i]).T @ np.asarray(out[i]), np.eye(4), atol=1e-10
        )
    assert np.array_equal(eqx_curv.newton_schulz(jnp.zeros((3, 5))), np.zeros((3, 5)))
    assert eqx_curv.newton_schulz(jnp.ones((3, 5), jnp.bfloat16)).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="coefficients"):
        eqx_curv.newton_schulz(g, coefficients=(1.0, 2.0))  # pyright: ignore
    with pytest.raises(ValueError, match="num_steps"):
        eqx_curv.newton_schulz(g, num_steps=-1)


@functools.partial(jax.jit, static_argnames=("max_steps",))
def _ns_inv_sqrt(matrix, max_steps=100):
    return eqx_curv.newton_schulz_inverse_sqrt(matrix, max_steps=max_steps)


@hypothesis.given(
    n=st.sampled_from((8, 32, 128)),
    cond=st.sampled_from(CONDS),
    seed=st.integers(0, 2**16),
)
def test_newton_schulz_inverse_sqrt(n, cond, seed):
    matrix = jnp.asarray(spd(n, cond, seed), jnp.float32)
    check_root(matrix, 2, _ns_inv_sqrt(matrix))


def test_newton_schulz_inverse_sqrt_flags_failure():
    w = np.concatenate([np.linspace(1.0, 0.1, 31), [-0.3]])
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((32, 32)))
    result = _ns_inv_sqrt(jnp.asarray((q * w) @ q.T, jnp.float32))
    assert not bool(result.converged) and not bool(result.valid)
    assert np.isnan(np.asarray(result.root)).all()
    # Too few steps: flagged, not returned as a root.
    result = _ns_inv_sqrt(jnp.asarray(spd(32, 1e4, 0), jnp.float32), max_steps=3)
    assert not bool(result.converged)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["default", "highest"])
@hypothesis.given(
    shape=st.sampled_from(SHAPES + ((256, 128), (512, 512))),
    seed=st.integers(0, 2**16),
)
def test_muon_float32_device(precision, shape, seed):
    matrix = jnp.asarray(with_singular_values(shape, 2e-3 * np.sqrt(min(shape)), seed))
    with jax.default_matmul_precision(precision):
        check_muon(matrix.astype(jnp.float32))  # _ns is jitted once per shape


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["default", "highest"])
@hypothesis.given(
    n=st.sampled_from((128, 512)),
    cond=st.sampled_from(CONDS),
    seed=st.integers(0, 2**16),
)
def test_newton_schulz_inverse_sqrt_float32_device(precision, n, cond, seed):
    matrix = jnp.asarray(spd(n, cond, seed), jnp.float32)
    with jax.default_matmul_precision(precision):
        result = _ns_inv_sqrt(matrix)
    check_root(matrix, 2, result)
