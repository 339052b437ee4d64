"""Losses: values, output-space Hessians, square-root factors, sampling, validation."""

import itertools
import pathlib
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import dense_ggn
from models import make_problem

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
    full = jax.jit(jax.hessian(lambda o: loss(o, y)))(o)  # [N, C, N, C]
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
    draws = jax.jit(jax.vmap(lambda k: loss.sample(k, o)))(jax.random.split(key, num))
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


# ---------------------------------------------------------------------------------------
# Labels out of range.


@pytest.mark.parametrize("bad", [-1, C])
def test_out_of_range_labels_known_at_trace_time_raise(bad, key):
    loss, o, y = _problem("softmax", key)
    y = np.asarray(y).copy()
    y[2] = bad
    match = rf"`targets` of `SoftmaxCrossEntropy` must be class indices in \[0, {C}\)"
    for labels in (y, jnp.asarray(y)):  # NumPy, and a jax array outside jit
        with pytest.raises(ValueError, match=match):
            loss(o, labels)
        with pytest.raises(ValueError, match=match):
            jax.grad(loss)(o, labels)  # traced outputs, known labels
        with pytest.raises(ValueError, match=match):
            loss.hvp(o, o, targets=labels)


@pytest.mark.parametrize("bad", [-1, C])
def test_out_of_range_traced_labels_give_nonfinite_loss_and_gradient(bad, key):
    # (jnp.take_along_axis alone would read -1 as the last class, and give C a NaN
    # loss with a zero gradient: the example would silently drop out.)
    loss, o, y = _problem("softmax", key)
    bad_y = y.at[2].set(bad)
    assert not jnp.isfinite(jax.jit(loss)(o, bad_y))
    grad = jax.jit(jax.grad(loss))(o, bad_y)
    assert not jnp.isfinite(grad[2]).any()
    # The other examples keep their exact gradient.
    good = jax.grad(loss)(o, y)
    rows = np.arange(N) != 2
    np.testing.assert_array_equal(grad[rows], good[rows])
    # Per-example gradients, as the empirical Fisher takes them.
    per_example = jax.jit(jax.vmap(lambda oi, yi: jax.grad(loss)(oi[None], yi[None])))
    g = per_example(o, bad_y)
    assert not jnp.isfinite(g[2]).any()
    assert jnp.isfinite(g[rows]).all()


# ---------------------------------------------------------------------------------------
# Probability targets and per-token outputs.


def _hessian_blocks(loss, o, y):
    """Per-example Hessians of the per-example loss, flattened: [N, dim, dim]."""
    n, dim = o.shape[0], o.size // o.shape[0]
    full = jax.jit(jax.hessian(lambda o: loss(o, y)))(o).reshape(n, dim, n, dim)
    blocks = full[jnp.arange(n), :, jnp.arange(n), :]
    off = full.at[jnp.arange(n), :, jnp.arange(n), :].set(0)
    np.testing.assert_array_equal(off, 0)  # block diagonal over the batch
    return blocks * n


def _check_curvature(loss, o, y):
    """hvp, hessian_sqrt and symmetric_hessian_sqrt against jax.hessian."""
    blocks = _hessian_blocks(loss, o, y)
    n, eps = o.shape[0], float(jnp.finfo(o.dtype).eps)
    t = jax.random.normal(jax.random.key(3), o.shape, o.dtype)
    expected = jnp.einsum("nij,nj->ni", blocks, t.reshape(n, -1)) / n

    @jax.jit  # one compilation instead of one per operation
    def products(o, t, y):
        return (
            loss.hvp(o, t),
            loss.hvp(o, t, targets=y),
            loss.hessian_sqrt(o),
            loss.symmetric_hessian_sqrt(o),
        )

    hvp, hvp_with_targets, s, r = products(o, t, y)
    np.testing.assert_allclose(hvp.reshape(n, -1), expected, atol=100 * eps)
    np.testing.assert_allclose(
        hvp_with_targets.reshape(n, -1), expected, atol=100 * eps
    )
    assert s.shape == blocks.shape
    np.testing.assert_allclose(s @ jnp.swapaxes(s, 1, 2), blocks, atol=100 * eps)
    np.testing.assert_allclose(r @ r, blocks, atol=100 * eps)


def _soft_targets(key, shape):
    return jax.nn.softmax(3 * jax.random.normal(key, shape), axis=-1)


def test_probability_targets(key):
    loss, o, y = _problem("softmax", key)
    one_hot = jax.nn.one_hot(y, C, dtype=o.dtype)
    np.testing.assert_allclose(loss(o, one_hot), loss(o, y), rtol=1e-14)
    soft = _soft_targets(jax.random.key(5), (N, C))
    expected = optax.softmax_cross_entropy(o, soft).mean()
    np.testing.assert_allclose(loss(o, soft), expected, rtol=1e-14)
    _check_curvature(loss, o, soft)
    smoothed = 0.9 * one_hot + 0.1 / C  # label smoothing
    _check_curvature(loss, o, smoothed)
    # float32 outputs stay float32 against float64 probabilities.
    o32 = o.astype(jnp.float32)
    assert loss(o32, soft).dtype == jnp.float32
    assert jax.grad(loss)(o32, soft).dtype == jnp.float32
    # The Hessian assumes probabilities: sums other than 1 are refused where known.
    with pytest.raises(ValueError, match="must sum to 1 over the class"):
        loss(o, 2 * soft)
    with pytest.raises(ValueError, match="must sum to 1 over the class"):
        loss.hvp(o, o, targets=np.asarray(one_hot) * 0.5)


TOKEN_SHAPES = [(3,), (2, 2)]  # one token axis, and two


@pytest.mark.parametrize("tokens", TOKEN_SHAPES)
def test_per_token_outputs(tokens, key):
    loss = eqx_curv.SoftmaxCrossEntropy()
    ko, ky, ks = jax.random.split(key, 3)
    n, classes = 3, 3
    o = 2 * jax.random.normal(ko, (n, *tokens, classes))
    labels = jax.random.randint(ky, (n, *tokens), 0, classes)
    # Per-example loss = mean over tokens; batch loss = mean over examples.
    per_token = optax.softmax_cross_entropy_with_integer_labels(o, labels)
    per_example = per_token.reshape(n, -1).mean(axis=1)
    np.testing.assert_allclose(loss(o, labels), per_example.mean(), rtol=1e-14)
    _check_curvature(loss, o, labels)
    if len(tokens) == 1:  # (the code path does not depend on the number of axes)
        soft = _soft_targets(ks, o.shape)
        expected = optax.softmax_cross_entropy(o, soft).mean()
        np.testing.assert_allclose(loss(o, soft), expected, rtol=1e-14)
        _check_curvature(loss, o, soft)
    # Sampling: one label per token, in range, from the softmax of that token.
    num = 2000
    draws = jax.jit(jax.vmap(lambda k: loss.sample(k, o)))(jax.random.split(key, num))
    assert draws.shape == (num, n, *tokens) and draws.dtype.kind == "i"
    assert int(draws.min()) >= 0 and int(draws.max()) < classes
    freq = np.stack([np.asarray(draws == c).mean(0) for c in range(classes)], -1)
    p = np.asarray(jax.nn.softmax(o))
    np.testing.assert_array_less(
        np.abs(freq - p), 5 * np.sqrt(p * (1 - p) / num) + 1e-12
    )


def test_per_token_fisher_is_hessian_over_tokens(key):
    """E_y[r r^T] = H_i / T for the token-mean loss (by enumeration over the labels).

    The loss is 1/T of the sequence's negative log-likelihood: its Hessian scales by
    1/T and its squared gradients by 1/T^2. Documented in docs/losses.md.
    """
    loss = eqx_curv.SoftmaxCrossEntropy()
    n, tokens, classes = 2, 2, 3
    o = 2 * jax.random.normal(key, (n, tokens, classes))
    blocks = _hessian_blocks(loss, o, jnp.zeros((n, tokens), jnp.int32))
    p = jax.nn.softmax(o)
    fisher = 0
    for ys in itertools.product(range(classes), repeat=tokens):
        y = jnp.broadcast_to(jnp.array(ys), (n, tokens))
        prob = jnp.prod(jnp.take_along_axis(p, y[..., None], axis=-1)[..., 0], axis=1)
        r = (jax.grad(loss)(o, y) * n).reshape(n, -1)
        fisher = fisher + prob[:, None, None] * r[:, :, None] * r[:, None, :]
    assert loss.num_positions(o) == tokens
    np.testing.assert_allclose(loss.num_positions(o) * fisher, blocks, atol=1e-13)


class _TokenModel(eqx.Module):
    """One example [4] -> logits [2 tokens, 3 classes]."""

    linear: eqx.nn.Linear

    def __call__(self, x):
        return self.linear(x).reshape(2, 3)


def test_sampled_fisher_of_per_token_outputs_estimates_the_ggn(key):
    # The Monte-Carlo Fisher scales its outer products by num_positions, so with many
    # samples it approaches the GGN (= the exact Fisher); without the scale it would
    # approach GGN / 2 here.
    mkey, xkey, fkey = jax.random.split(key, 3)
    model = _TokenModel(eqx.nn.Linear(4, 6, key=mkey))
    x = jax.random.normal(xkey, (3, 4))
    loss = eqx_curv.SoftmaxCrossEntropy()
    ggn = eqx_curv.GGNOperator(model, loss, x).as_matrix()
    sampled = eqx_curv.FisherOperator(
        model, loss, x, key=fkey, num_samples=4000
    ).as_matrix()
    error = np.linalg.norm(sampled - ggn) / np.linalg.norm(ggn)
    assert error < 0.1, error


# ---------------------------------------------------------------------------------------
# Writing one's own loss: the examples of docs/losses.md, run as they are written there.

DOCS_PAGE = pathlib.Path(__file__).parent.parent / "docs" / "losses.md"


def _docs_namespace():
    """Run the page's blocks that define classes, in order, and return their names.

    (tests/test_docs.py runs every block of the page; here only the definitions.)
    """
    blocks = re.findall(r"```python\n(.*?)```", DOCS_PAGE.read_text(), flags=re.S)
    namespace = {"__name__": "docs_losses"}
    for block in blocks:
        if "\nclass " in block:
            exec(compile(block, str(DOCS_PAGE), "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def docs_losses():
    return _docs_namespace()


def _regression_problem(name, key):
    model, _, x, y = make_problem("layernorm", "mse", key)
    if name == "PoissonLoss":
        y = jax.random.poisson(jax.random.key(7), 2.0, y.shape).astype(y.dtype)
    return model, x, y


@pytest.mark.parametrize("name", ["PoissonLoss", "LogCoshLoss"])
def test_custom_loss_from_the_docs(name, docs_losses):
    loss = docs_losses[name]()
    depends = name == "LogCoshLoss"
    assert loss.hessian_depends_on_targets is depends
    model, x, y = _regression_problem(name, jax.random.key(8))
    o = jax.vmap(model)(x)
    # Curvature against jax.hessian of the mean loss.
    blocks = _hessian_blocks(loss, o, y)
    n, eps = o.shape[0], float(jnp.finfo(o.dtype).eps)
    t = jax.random.normal(jax.random.key(3), o.shape, o.dtype)
    expected = jnp.einsum("nij,nj->ni", blocks, t) / n
    np.testing.assert_allclose(loss.hvp(o, t, targets=y), expected, atol=100 * eps)
    s = loss.hessian_sqrt(o, targets=y)
    np.testing.assert_allclose(s @ jnp.swapaxes(s, 1, 2), blocks, atol=100 * eps)
    if depends:
        with pytest.raises(ValueError, match="needs `targets=`"):
            loss.hvp(o, t)
    else:
        np.testing.assert_allclose(loss.hvp(o, t), expected, atol=100 * eps)
    # The operators take it: the GGN against the dense J^T H J.
    ggn = eqx_curv.GGNOperator(model, loss, x, y).as_matrix()
    dense = dense_ggn(model, loss, x, y)
    np.testing.assert_allclose(ggn, dense, atol=1e3 * eps * float(jnp.abs(dense).max()))
    # Samples: the layout of the targets, and the predictive mean.
    num = 2000
    draws = jax.jit(jax.vmap(lambda k: loss.sample(k, o)))(
        jax.random.split(jax.random.key(9), num)
    )
    assert draws.shape == (num, *o.shape) and draws.dtype == o.dtype
    mean = jnp.exp(o) if name == "PoissonLoss" else o
    var = jnp.exp(o) if name == "PoissonLoss" else jnp.full_like(o, np.pi**2 / 4)
    np.testing.assert_array_less(
        np.abs(draws.mean(0) - mean), 5 * np.sqrt(var / num) + 1e-12
    )


def test_custom_loss_must_declare_whether_its_hessian_needs_targets(docs_losses):
    poisson = docs_losses["PoissonLoss"]

    class Undeclared(eqx_curv.AbstractLoss):  # the Poisson loss without the attribute
        __call__ = poisson.__call__
        hvp = poisson.hvp
        hessian_sqrt = poisson.hessian_sqrt
        sample = poisson.sample
        num_positions = poisson.num_positions

    with pytest.raises(TypeError, match="hessian_depends_on_targets"):
        Undeclared()
