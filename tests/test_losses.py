"""Losses: values, output-space Hessians, square-root factors, sampling, validation."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqx_curv


N, C = 6, 4


def _problem(name, key, dtype=jnp.float64):
    ko, ky = jax.random.split(key)
    outputs = 2 * jax.random.normal(ko, (N, C), dtype)
    if name == "softmax":
        return (
            eqx_curv.SoftmaxCrossEntropy(),
            outputs,
            jax.random.randint(ky, (N,), 0, C),
        )
    if name == "mse":
        return (
            eqx_curv.MeanSquaredError(),
            outputs,
            jax.random.normal(ky, (N, C), dtype),
        )
    targets = jax.random.bernoulli(ky, 0.3, (N, C)).astype(dtype)
    return eqx_curv.SigmoidBinaryCrossEntropy(), outputs, targets


LOSSES = ["softmax", "mse", "bce"]


def test_values_against_optax(key):
    loss, o, y = _problem("softmax", key)
    expected = optax.softmax_cross_entropy_with_integer_labels(o, y).mean()
    np.testing.assert_allclose(loss(o, y), expected, rtol=1e-14)
    loss, o, y = _problem("mse", key)
    np.testing.assert_allclose(loss(o, y), 0.5 * ((o - y) ** 2).sum(-1).mean())
    loss, o, y = _problem("bce", key)
    expected = optax.sigmoid_binary_cross_entropy(o, y).sum(-1).mean()
    np.testing.assert_allclose(loss(o, y), expected, rtol=1e-14)


def _per_example_hessians(loss, o, y):
    """Dense H_i of the per-example loss, from `jax.hessian` of the mean loss."""
    full = jax.hessian(lambda o: loss(o, y))(o)  # [N, C, N, C]
    blocks = jnp.stack([full[i, :, i, :] for i in range(N)]) * N
    off = full.at[jnp.arange(N), :, jnp.arange(N), :].set(0)
    assert jnp.abs(off).max() == 0  # block diagonal over the batch
    return blocks


@pytest.mark.parametrize("name", LOSSES)
def test_hvp_and_sqrt_against_jax_hessian(name, key):
    loss, o, y = _problem(name, key)
    blocks = _per_example_hessians(loss, o, y)
    t = jax.random.normal(jax.random.key(3), o.shape)
    expected = jnp.einsum("nij,nj->ni", blocks, t) / N
    eps = float(jnp.finfo(o.dtype).eps)
    np.testing.assert_allclose(loss.hvp(o, t, targets=y), expected, atol=100 * eps)
    # The built-in losses' Hessians do not involve the targets.
    assert not loss.hessian_depends_on_targets
    np.testing.assert_allclose(loss.hvp(o, t), expected, atol=100 * eps)
    s = loss.hessian_sqrt(o)
    assert s.shape == (N, C, C)
    np.testing.assert_allclose(s @ jnp.swapaxes(s, 1, 2), blocks, atol=100 * eps)
    if name != "softmax":  # documented: the softmax factor is not symmetric
        np.testing.assert_allclose(s, jnp.swapaxes(s, 1, 2))
    # The symmetric root, for every loss: R = R^T and R R = H_i.
    r = loss.symmetric_hessian_sqrt(o)
    assert r.shape == (N, C, C)
    np.testing.assert_allclose(r, jnp.swapaxes(r, 1, 2), atol=100 * eps)
    np.testing.assert_allclose(r @ r, blocks, atol=100 * eps)
    # ... and it is the PSD root: no negative eigenvalues beyond rounding.
    assert float(jnp.linalg.eigvalsh(r).min()) >= -100 * eps


@pytest.mark.parametrize("name", ["softmax", "bce"])
def test_fisher_identity_by_enumeration(name, key):
    """E_y[r r^T] under the predictive distribution equals H_i (canonical links)."""
    loss, o, y = _problem(name, key)
    blocks = _per_example_hessians(loss, o, y)
    if name == "softmax":
        p = jax.nn.softmax(o)
        support = [jnp.full((N,), c) for c in range(C)]
        probs = [p[:, c] for c in range(C)]
    else:
        s = jax.nn.sigmoid(o)
        support, probs = [], []
        for bits in itertools.product([0.0, 1.0], repeat=C):
            b = jnp.broadcast_to(jnp.array(bits), (N, C))
            support.append(b)
            probs.append(jnp.prod(jnp.where(b == 1, s, 1 - s), axis=-1))
    fisher = 0
    for target, prob in zip(support, probs):
        r = jax.grad(loss)(o, target) * N
        fisher = fisher + prob[:, None, None] * r[:, :, None] * r[:, None, :]
    np.testing.assert_allclose(fisher, blocks, atol=1e-13)


@pytest.mark.parametrize("name", LOSSES)
def test_sampling_matches_predictive_distribution(name, key):
    loss, o, _ = _problem(name, key)
    num = 20000
    draws = jax.vmap(lambda k: loss.sample(k, o))(jax.random.split(key, num))
    if name == "softmax":
        assert draws.dtype.kind == "i"
        freq = jax.vmap(lambda c: (draws == c).mean(0))(jnp.arange(C)).T
        mean, var = jax.nn.softmax(o), jax.nn.softmax(o) * (1 - jax.nn.softmax(o))
    elif name == "mse":
        freq, mean, var = draws.mean(0), o, jnp.ones_like(o)
        np.testing.assert_allclose(draws.var(0), 1.0, atol=5 * np.sqrt(2 / num))
    else:
        freq, mean = draws.mean(0), jax.nn.sigmoid(o)
        var = mean * (1 - mean)
    # within 5 standard errors
    freq, mean, var = (np.asarray(a, np.float64) for a in (freq, mean, var))
    np.testing.assert_array_less(np.abs(freq - mean), 5 * np.sqrt(var / num) + 1e-12)


@pytest.mark.parametrize("name", LOSSES)
def test_float32_stays_float32(name, key):
    loss, o, y = _problem(name, key, jnp.float32)
    if name != "softmax":
        y = y.astype(jnp.float64)  # float64 targets must not promote the loss
    assert loss(o, y).dtype == jnp.float32
    assert loss.hvp(o, o, targets=y).dtype == jnp.float32
    assert loss.hessian_sqrt(o).dtype == jnp.float32
    assert loss.symmetric_hessian_sqrt(o).dtype == jnp.float32
    assert jax.grad(loss)(o, y).dtype == jnp.float32


def test_bce_accepts_integer_labels(key):
    loss, o, y = _problem("bce", key)
    np.testing.assert_allclose(loss(o, y.astype(jnp.int32)), loss(o, y))


def test_bad_targets(key):
    loss, o, y = _problem("softmax", key)
    with pytest.raises(TypeError, match="integer class indices"):
        loss(o, y.astype(o.dtype))  # float labels: not probabilities
    with pytest.raises(ValueError, match=r"shape \[batch, \*tokens\]"):
        loss(o, y[:, None])
    with pytest.raises(ValueError, match="shape of `outputs`"):
        loss(o, jax.nn.one_hot(y, C + 1))
    with pytest.raises(TypeError, match="astype"):
        loss(o, jax.nn.one_hot(y, C) > 0)
    with pytest.raises((ValueError, TypeError)):  # jaxtyping's check comes first
        loss.hvp(o, o[:, :2])
    # (under pytest the jaxtyping annotation catches this first)
    with pytest.raises((ValueError, TypeError), match=r"\[batch, classes\]|batch"):
        eqx_curv.SoftmaxCrossEntropy()(o[0], y)
    for name in ["mse", "bce"]:
        loss, o, y = _problem(name, key)
        with pytest.raises(ValueError, match="must have the shape of `outputs`"):
            loss(o, y[:, :2])
        with pytest.raises(ValueError, match="must have the shape of `outputs`"):
            loss.hvp(o, o, targets=y[:3])
    # Without pytest's jaxtyping checks, these sentences are what a user sees.
    from eqx_curv._losses import _check_outputs, _check_tangents

    with pytest.raises(TypeError, match="floating-point"):
        _check_outputs("MeanSquaredError", jnp.ones((N, C), jnp.int32))
    with pytest.raises(ValueError, match="leading batch axis"):
        _check_outputs("MeanSquaredError", jnp.asarray(1.0))
    with pytest.raises(ValueError, match="`tangents` of `MeanSquaredError.hvp` must"):
        _check_tangents("MeanSquaredError", jnp.ones((N, C)), jnp.ones((N, 2)))
