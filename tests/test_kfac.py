"""K-FAC: layers found by type, `KFACOperator` against dense constructions, and the
`KFAC` optimizer.

Every dense reference is built independently of the library's capture: per-example,
per-position inputs by hand (unfolded patches, token matrices) and output gradients
from perturbations added where the layer's output goes (`process_heads` for
attention, explicit arguments for tied weights), in float64 on tiny models.
"""

import functools

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest


def _ravel(tree):
    return jax.flatten_util.ravel_pytree(tree)[0]


def _offsets(model):
    leaves = jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
    return np.cumsum([0] + [x.size for x in leaves])


def _aug(a):
    return jnp.concatenate([a, jnp.ones((*a.shape[:-1], 1), a.dtype)], axis=-1)


# ---------------------------------------------------------------------------------------
# Exactness, estimators, diagonal blocks.


class _ScannedLinear(eqx.Module):
    """A deep linear network whose square blocks are stacked and applied by lax.scan."""

    first: eqx.nn.Linear
    blocks: eqx.nn.Linear  # stacked: weight [3, 4, 4]
    last: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.first = eqx.nn.Linear(3, 4, key=k1, dtype=jnp.float64)
        make = lambda k: eqx.nn.Linear(4, 4, key=k, dtype=jnp.float64)  # noqa: E731
        self.blocks = eqx.filter_vmap(make)(jax.random.split(k2, 3))
        self.last = eqx.nn.Linear(4, 2, key=k3, dtype=jnp.float64)

    def __call__(self, x):
        dynamic, static = eqx.partition(self.blocks, eqx.is_array)

        def body(h, d):
            return eqx.combine(d, static)(h), None

        h, _ = jax.lax.scan(body, self.first(x), dynamic)
        return self.last(h)


def _block_indices(model):
    """ravel indices of each stacked block's (weight, bias) and of every layer."""
    off = _offsets(model)
    return off


def test_type2_equals_ggn_blocks_on_deep_linear_networks():
    import eqx_curv

    loss = eqx_curv.MeanSquaredError()
    x = jax.random.normal(jax.random.key(1), (7, 3), jnp.float64)
    y = jax.random.normal(jax.random.key(2), (7, 2), jnp.float64)
    # Plain layers and lax.scan-stacked ones.
    for model in (_ScannedLinear(jax.random.key(3)),):
        kfac = eqx_curv.KFACOperator(model, loss, x, y).as_matrix()
        ggn = eqx_curv.GGNOperator(model, loss, x).as_matrix()
        off = _offsets(model)
        mask = np.zeros(kfac.shape, bool)
        groups = []
        for layer in range(len(off) // 2):
            w = np.arange(off[2 * layer], off[2 * layer + 1])
            b = np.arange(off[2 * layer + 1], off[2 * layer + 2])
            stack = 3 if layer == 1 else 1
            w, b = w.reshape(stack, -1), b.reshape(stack, -1)
            groups += [np.concatenate([w[s], b[s]]) for s in range(stack)]
        for idx in groups:
            block = np.ix_(idx, idx)
            mask[block] = True
            np.testing.assert_allclose(kfac[block], ggn[block], atol=1e-12)
        assert np.all(kfac[~mask] == 0)


def test_mc_converges_to_type2_and_diagonal_blocks_are_ggn_diagonal():
    from models import make_problem

    import eqx_curv

    model, loss, x, y = make_problem("layernorm", "softmax", jax.random.key(0))
    exact = eqx_curv.KFACOperator(model, loss, x, y).as_matrix()
    mc = eqx_curv.KFACOperator(
        model, loss, x, fisher_type="mc", key=jax.random.key(1), num_samples=4000
    ).as_matrix()
    rel = np.linalg.norm(mc - exact) / np.linalg.norm(exact)
    assert rel < 0.05, rel
    # The LayerNorm's weight and bias are diagonal blocks: the GGN's diagonal.
    off = _offsets(model)
    norm = np.arange(off[2], off[4])
    ggn = _ravel(eqx_curv.exact_diagonal(eqx_curv.GGNOperator(model, loss, x)))
    np.testing.assert_allclose(np.diag(exact)[norm], ggn[norm], rtol=1e-10)
    off_diagonal = exact[np.ix_(norm, norm)] - np.diag(np.diag(exact)[norm])
    assert np.all(off_diagonal == 0)


def test_empirical_factors_are_per_example_outer_products():
    from models import make_problem

    import eqx_curv

    model, loss, x, y = make_problem("layernorm", "softmax", jax.random.key(4))
    op = eqx_curv.KFACOperator(model, loss, x, y, fisher_type="empirical")
    n = x.shape[0]

    def per_example(xi, yi, eps):
        h = model.first(xi)
        out = model.last(jax.nn.gelu(model.norm(h))) + eps
        return loss(out[None], yi[None])

    # Output gradients of the last layer and the inputs it saw, example by example.
    g = jax.vmap(jax.grad(per_example, argnums=2))(x, y, jnp.zeros((n, 3)))
    a = _aug(jax.vmap(lambda xi: jax.nn.gelu(model.norm(model.first(xi))))(x))
    np.testing.assert_allclose(op.factors.left[1][0], g.T @ g / n, rtol=1e-10)
    np.testing.assert_allclose(op.factors.right[1][0], a.T @ a / n, rtol=1e-10)
    # Diagonal blocks: the empirical Fisher's diagonal.
    off = _offsets(model)
    norm = np.arange(off[2], off[4])
    emp = _ravel(
        eqx_curv.exact_diagonal(eqx_curv.EmpiricalFisherOperator(model, loss, x, y))
    )
    np.testing.assert_allclose(np.diag(op.as_matrix())[norm], emp[norm], rtol=1e-10)


# ---------------------------------------------------------------------------------------
# Convolutions: patches unfolded by hand.


def _unfold_2d(x, kernel, stride, padding, dilation):
    """[positions, channels * kh * kw] patches, channel-major, by explicit loops."""
    c, h, w = x.shape
    (pt, pb), (pl, pr) = padding
    xp = np.pad(np.asarray(x), ((0, 0), (pt, pb), (pl, pr)))
    kh, kw = kernel
    span_h, span_w = dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1
    rows = []
    for i in range(0, xp.shape[1] - span_h + 1, stride[0]):
        for j in range(0, xp.shape[2] - span_w + 1, stride[1]):
            patch = xp[:, i : i + span_h : dilation[0], j : j + span_w : dilation[1]]
            rows.append(patch.reshape(-1))
    return np.stack(rows)


class _ConvNet(eqx.Module):
    conv: eqx.nn.Conv2d
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(
            4, 6, (3, 2), stride=(2, 1), padding=((1, 0), (1, 1)), dilation=(1, 2),
            groups=2, key=k1, dtype=jnp.float64,
        )  # fmt: skip
        self.head = eqx.nn.Linear(6 * 2 * 5, 3, key=k2, dtype=jnp.float64)

    def __call__(self, x, eps=None):
        h = self.conv(x)
        if eps is not None:
            h = h + eps
        return self.head(jnp.tanh(h).reshape(-1))


def test_conv_factors_equal_hand_unfolded_patches():
    import eqx_curv

    model = _ConvNet(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (3, 4, 5, 5), jnp.float64)
    loss = eqx_curv.SoftmaxCrossEntropy()
    op = eqx_curv.KFACOperator(model, loss, x)
    conv = model.conv
    out = jax.vmap(conv)(x)  # [N, 6, 3, 5]
    n, positions = x.shape[0], out.shape[2] * out.shape[3]
    patches = np.stack(
        [_unfold_2d(xi, (3, 2), (2, 1), ((1, 0), (1, 1)), (1, 2)) for xi in x]
    )  # [N, R, 4 * 3 * 2]
    # The hand patches reproduce the convolution, group by group.
    w = np.asarray(conv.weight).reshape(2, 3, -1)
    bias = np.asarray(conv.bias).reshape(2, 3)
    for k in range(2):
        p = patches[..., k * 12 : (k + 1) * 12]
        y = np.einsum("oi,nri->nor", w[k], p) + bias[k][None, :, None]
        np.testing.assert_allclose(y, out[:, 3 * k : 3 * k + 3].reshape(n, 3, -1))
    # Output gradients per position, for each column of the loss Hessian's root.
    logits = jax.vmap(model)(x)
    roots = loss.hessian_sqrt(logits)  # [N, 3, 3]

    def grads(xi, s):
        return jax.grad(lambda e: model(xi, e) @ s)(jnp.zeros(out.shape[1:]))

    g = jax.vmap(lambda xi, r: jax.vmap(lambda s: grads(xi, s))(r.T))(x, roots)
    g = np.asarray(g).reshape(n, 3, 6, positions)  # [N, C, out, R]
    for k in range(2):
        a = _aug(jnp.asarray(patches[..., k * 12 : (k + 1) * 12]))
        right = np.einsum("nri,nrj->ij", a, a) / (n * positions)
        gk = g[:, :, 3 * k : 3 * k + 3]
        left = np.einsum("ncir,ncjr->ij", gk, gk) / n
        np.testing.assert_allclose(op.factors.right[0][k], right, rtol=1e-10)
        np.testing.assert_allclose(op.factors.left[0][k], left, rtol=1e-10)


@pytest.mark.parametrize("dims", [1, 3])
def test_conv_rows_reproduce_convolutions_in_other_dimensions(dims):
    from eqx_curv._layers import ConvRule

    conv = eqx.nn.Conv(
        dims, 4, 6, 3, stride=2, padding=1, dilation=1 if dims == 3 else 2,
        groups=2, key=jax.random.key(0), dtype=jnp.float64,
    )  # fmt: skip
    x = jax.random.normal(jax.random.key(1), (4, *(5,) * dims), jnp.float64)
    rule = ConvRule()

    @jax.jit
    def both(conv, x):
        rows = rule.input_rows(conv, x)  # [R, G, n]
        matrix = rule.to_matrix(conv, conv.weight, conv.bias)  # [G, m, n + 1]
        y = jnp.einsum("gmi,rgi->rgm", matrix[..., :-1], rows) + matrix[None, ..., -1]
        return y, conv(x).reshape(6, -1).T.reshape(-1, 2, 3), matrix

    y, expected, matrix = both(conv, x)
    np.testing.assert_allclose(y, expected, atol=1e-12)
    weight, bias = rule.from_matrix(conv, matrix)
    assert weight.shape == conv.weight.shape and bias.shape == conv.bias.shape


# ---------------------------------------------------------------------------------------
# Layers applied several times per example: expand and reduce against dense sums.


def _dense_factors(a, g, approximation):
    """Factors from per-example, per-position inputs `a` [N, R, n] (bias column
    included) and output gradients `g` [N, C, R, m] (one per cotangent column)."""
    n, r = a.shape[:2]
    if approximation == "expand":
        right = np.einsum("nri,nrj->ij", a, a) / (n * r)
        left = np.einsum("ncri,ncrj->ij", g, g) / n
    else:
        mean_a, sum_g = a.mean(axis=1), g.sum(axis=2)
        right = np.einsum("ni,nj->ij", mean_a, mean_a) / n
        left = np.einsum("nci,ncj->ij", sum_g, sum_g) / n
    return left, right


def _output_gradients(fn, x, roots, zeros):
    """[N, C, ...] gradients of `s_c . fn(x_n, eps)` with respect to `eps` at 0."""

    def one(xi, root):
        return jax.vmap(lambda s: jax.grad(lambda e: fn(xi, e) @ s)(zeros))(root.T)

    return jax.vmap(one)(x, roots)


class _AttentionNet(eqx.Module):
    attention: eqx.nn.MultiheadAttention
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.attention = eqx.nn.MultiheadAttention(
            2, 4, use_query_bias=True, use_key_bias=True, use_value_bias=True,
            use_output_bias=True, key=k1, dtype=jnp.float64,
        )  # fmt: skip
        self.head = eqx.nn.Linear(4, 3, key=k2, dtype=jnp.float64)

    def __call__(self, x, eps=None):
        if eps is None:
            out = self.attention(x, x, x)
        else:

            def heads(q, k, v):  # fmt: skip
                return (q + eps[0].reshape(q.shape), k + eps[1].reshape(k.shape),
                        v + eps[2].reshape(v.shape))  # fmt: skip

            out = self.attention(x, x, x, process_heads=heads) + eps[3]
        return self.head(jnp.tanh(out).mean(axis=0))


@pytest.mark.parametrize("approximation", ["expand", "reduce"])
def test_attention_projections_get_expand_and_reduce_factors(approximation):
    import eqx_curv

    model = _AttentionNet(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (3, 5, 4), jnp.float64)  # 5 tokens
    loss = eqx_curv.SoftmaxCrossEntropy()
    op = eqx_curv.KFACOperator(model, loss, x, approximation=approximation)
    names = [jax.tree_util.keystr(s.path) for s in op.layout.sites]
    assert names == [
        ".attention.query_proj", ".attention.key_proj", ".attention.value_proj",
        ".attention.output_proj", ".head",
    ]  # fmt: skip
    roots = loss.hessian_sqrt(jax.vmap(model)(x))
    g = _output_gradients(model, x, roots, jnp.zeros((4, 5, 4)))  # [N, C, 4, R, m]
    a = _aug(x)
    for site in range(4):
        left, right = _dense_factors(a, np.asarray(g[:, :, site]), approximation)
        np.testing.assert_allclose(op.factors.left[site][0], left, atol=1e-12)
        if site < 3:  # the output projection's inputs are internal to the layer
            np.testing.assert_allclose(op.factors.right[site][0], right, atol=1e-12)


class _Tied(eqx.Module):
    layer: eqx.nn.Linear
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.layer = eqx.nn.Linear(3, 3, key=k1, dtype=jnp.float64)
        self.head = eqx.nn.Linear(3, 2, key=k2, dtype=jnp.float64)

    def hidden(self, x, eps):
        return jnp.tanh(self.layer(x) + eps[0])

    def __call__(self, x, eps=None):
        eps = jnp.zeros((2, 3), x.dtype) if eps is None else eps
        z = self.layer(self.hidden(x, eps)) + eps[1]
        return self.head(jnp.tanh(z))


@pytest.mark.parametrize("approximation", ["expand", "reduce"])
def test_a_weight_used_twice_gets_expand_and_reduce_factors(approximation):
    import eqx_curv

    model = _Tied(jax.random.key(2))
    x = jax.random.normal(jax.random.key(3), (4, 3), jnp.float64)
    loss = eqx_curv.SoftmaxCrossEntropy()
    op = eqx_curv.KFACOperator(model, loss, x, approximation=approximation)
    roots = loss.hessian_sqrt(jax.vmap(model)(x))
    g = _output_gradients(model, x, roots, jnp.zeros((2, 3)))  # [N, C, R=2, 3]
    h = jax.vmap(lambda xi: model.hidden(xi, jnp.zeros((2, 3))))(x)
    a = _aug(jnp.stack([x, h], axis=1))  # [N, 2, 4]
    left, right = _dense_factors(a, np.asarray(g), approximation)
    np.testing.assert_allclose(op.factors.left[0][0], left, atol=1e-12)
    np.testing.assert_allclose(op.factors.right[0][0], right, atol=1e-12)


class _Embed(eqx.Module):
    embed: eqx.nn.Embedding
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.embed = eqx.nn.Embedding(5, 3, key=k1, dtype=jnp.float64)
        self.head = eqx.nn.Linear(3, 2, key=k2, dtype=jnp.float64)

    def __call__(self, tokens, eps=None):
        e = jax.vmap(self.embed)(tokens)
        e = e if eps is None else e + eps
        return self.head(jnp.tanh(e).mean(axis=0))


def test_embedding_has_a_diagonal_input_factor():
    import eqx_curv

    model = _Embed(jax.random.key(0))
    tokens = jnp.array([[0, 1], [1, 1], [4, 0]])
    loss = eqx_curv.SoftmaxCrossEntropy()
    op = eqx_curv.KFACOperator(model, loss, tokens)
    roots = loss.hessian_sqrt(jax.vmap(model)(tokens))
    g = _output_gradients(model, tokens, roots, jnp.zeros((2, 3)))
    left, _ = _dense_factors(np.ones((3, 2, 1)), np.asarray(g), "expand")
    np.testing.assert_allclose(op.factors.left[0][0], left, atol=1e-12)
    np.testing.assert_allclose(op.factors.right[0][0], [2 / 6, 3 / 6, 0, 0, 1 / 6])
    # The block on the embedding table, as a dense matrix: diag(B) (x) A, since the
    # table is stored [vocabulary, features] (the transpose of the layer's matrix).
    block = op.as_matrix()[:15, :15]
    expected = np.kron(np.diag([2 / 6, 3 / 6, 0, 0, 1 / 6]), left)
    np.testing.assert_allclose(block, expected, atol=1e-12)


# ---------------------------------------------------------------------------------------
# Registration, fallbacks, real models, misuse.


class _Scale(eqx.Module):
    weight: jax.Array

    def __call__(self, x):
        return self.weight @ x


class _Custom(eqx.Module):
    first: _Scale
    second: _Scale

    def __call__(self, x):
        return self.second(self.first(x))


class _ReadsWeight(eqx.Module):
    proj: eqx.nn.Linear
    head: eqx.nn.Linear

    def __call__(self, x):
        return self.head(jnp.tanh(self.proj.weight @ x))


def test_custom_layer_registration_and_direct_weight_reads():
    import eqx_curv
    from eqx_curv._layers import LinearRule

    class ScaleRule(eqx_curv.AbstractKFACRule):
        def parameter_names(self, layer):
            return "weight", None

        def weight_ndim(self, layer):
            return 2

        def to_matrix(self, layer, weight, bias):
            return weight[None]

        def from_matrix(self, layer, matrix):
            return matrix[0], None

        input_rows = LinearRule.input_rows
        output_rows = LinearRule.output_rows

    keys = jax.random.split(jax.random.key(0), 4)
    model = _Custom(
        _Scale(jax.random.normal(keys[0], (4, 3), jnp.float64)),
        _Scale(jax.random.normal(keys[1], (2, 4), jnp.float64)),
    )
    x = jax.random.normal(keys[2], (6, 3), jnp.float64)
    loss = eqx_curv.MeanSquaredError()
    unregistered = eqx_curv.KFACOperator(model, loss, x)
    assert not unregistered.layout.sites  # every parameter on a diagonal block
    with pytest.raises(ValueError, match=r"model\.first.*register_kfac_layer"):
        eqx_curv.KFACOperator(model, loss, x, unregistered="error")
    eqx_curv.register_kfac_layer(_Scale, ScaleRule())
    kfac = eqx_curv.KFACOperator(model, loss, x).as_matrix()
    ggn = eqx_curv.GGNOperator(model, loss, x).as_matrix()
    for idx in (np.arange(12), np.arange(12, 20)):  # exact: a deep linear network
        np.testing.assert_allclose(kfac[np.ix_(idx, idx)], ggn[np.ix_(idx, idx)])
    # A model that reads a registered layer's weight instead of calling it: that
    # layer falls back to diagonal blocks (the GGN's diagonal), the rest is factored.
    reader = _ReadsWeight(
        eqx.nn.Linear(3, 3, key=keys[3], dtype=jnp.float64),
        eqx.nn.Linear(3, 2, key=keys[0], dtype=jnp.float64),
    )
    op = eqx_curv.KFACOperator(reader, loss, x)
    assert [jax.tree_util.keystr(s.path) for s in op.layout.sites] == [".head"]
    ggn = _ravel(eqx_curv.exact_diagonal(eqx_curv.GGNOperator(reader, loss, x)))
    dense = op.as_matrix()
    np.testing.assert_allclose(np.diag(dense)[:12], ggn[:12], atol=1e-12)


class _MiniViT(eqx.Module):
    """TinyViT's parts, each called as a layer: a strided-convolution patch
    embedding, a class token, a pre-LayerNorm attention block with a GELU MLP, a
    linear head on the class token."""

    patch: eqx.nn.Conv2d
    token: jax.Array
    norm1: eqx.nn.LayerNorm
    attention: eqx.nn.MultiheadAttention
    norm2: eqx.nn.LayerNorm
    hidden: eqx.nn.Linear
    output: eqx.nn.Linear
    head: eqx.nn.Linear

    def __init__(self, key, dtype):
        k = jax.random.split(key, 6)
        self.patch = eqx.nn.Conv2d(3, 8, 4, stride=4, key=k[0], dtype=dtype)
        self.token = jax.random.normal(k[1], (8,), dtype)
        self.norm1 = eqx.nn.LayerNorm(8, dtype=dtype)
        self.attention = eqx.nn.MultiheadAttention(2, 8, key=k[2], dtype=dtype)
        self.norm2 = eqx.nn.LayerNorm(8, dtype=dtype)
        self.hidden = eqx.nn.Linear(8, 16, key=k[3], dtype=dtype)
        self.output = eqx.nn.Linear(16, 8, key=k[4], dtype=dtype)
        self.head = eqx.nn.Linear(8, 3, key=k[5], dtype=dtype)

    def __call__(self, image):
        tokens = self.patch(jnp.transpose(image, (2, 0, 1))).reshape(8, -1).T
        x = jnp.concatenate([self.token[None], tokens], axis=0)
        y = jax.vmap(self.norm1)(x)
        x = x + self.attention(y, y, y)
        y = jax.nn.gelu(jax.vmap(self.hidden)(jax.vmap(self.norm2)(x)))
        x = x + jax.vmap(self.output)(y)
        return self.head(x[0])


@pytest.mark.slow  # seconds of compilation and training: run with `-m slow`
def test_vision_transformers_are_factored_under_jit():
    import eqx_curv
    from eqx_curv.experiments.tinyvit import TinyViT

    x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 3), jnp.float32)
    loss = eqx_curv.SoftmaxCrossEntropy()

    @eqx.filter_jit
    def products(model, u, v):
        op = eqx_curv.KFACOperator(
            model, loss, x, fisher_type="mc", key=jax.random.key(2)
        )
        inverse = op.damped_inverse(1e-3, method="factored")
        return op.layout, op.mv(u), op.mv(v), inverse.mv(op.mv(u))

    small = dict(features=8, patch_size=4, depth=1, num_heads=2, num_classes=3)
    # The library's TinyViT: traced only (shapes), which is where a layer it does
    # not call as a layer would fail; its numerics are those of the parts below.
    vit = TinyViT(jax.random.key(0), **small, dtype=jnp.float32)
    eqx.filter_eval_shape(
        lambda m: eqx_curv.KFACOperator(
            m, loss, x, fisher_type="mc", key=jax.random.key(2)
        ),
        vit,
    )
    for model in (_MiniViT(jax.random.key(0), jnp.float32),):
        params = eqx.filter(model, eqx.is_inexact_array)
        u = jax.tree.map(jnp.ones_like, params)
        v = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size)).reshape(p.shape), params)
        v = jax.tree.map(lambda a, p: a.astype(p.dtype), v, params)
        layout, ku, kv, back = products(model, u, v)
        if isinstance(model, _MiniViT):
            # patch embedding, 4 attention projections, 2 MLP layers, head
            assert len(layout.sites) == 8
        uv, vu = _ravel(ku) @ _ravel(v), _ravel(u) @ _ravel(kv)
        np.testing.assert_allclose(uv, vu, rtol=1e-4)
        assert bool(jnp.isfinite(_ravel(back)).all())


def test_bad_arguments_are_sentences():
    from models import make_problem

    import eqx_curv

    model, loss, x, y = make_problem("mlp", "softmax", jax.random.key(0))
    from eqx_curv._operators.kfac import check_fisher_type

    # Literals are checked by jaxtyping under pytest, else by the class.
    with pytest.raises((ValueError, TypeError), match="fisher_type"):
        eqx_curv.KFACOperator(model, loss, x, fisher_type="fisher")  # pyright: ignore
    with pytest.raises(ValueError, match='`fisher_type` must be "type2"'):
        check_fisher_type("fisher")
    with pytest.raises(ValueError, match="needs a `key`"):
        eqx_curv.KFACOperator(model, loss, x, fisher_type="mc")
    with pytest.raises(ValueError, match="pass `targets`"):
        eqx_curv.KFACOperator(model, loss, x, fisher_type="empirical")
    with pytest.raises((ValueError, TypeError), match="approximation"):
        eqx_curv.KFACOperator(model, loss, x, approximation="sum")  # pyright: ignore
    op = eqx_curv.KFACOperator(model, loss, x)
    with pytest.raises((ValueError, TypeError), match="method"):
        op.damped_inverse(1.0, method="cholesky")  # pyright: ignore
    with pytest.raises(ValueError, match="damping"):
        op.damped_inverse(-1.0)


# ---------------------------------------------------------------------------------------
# The optimizer.


@eqx.filter_jit
def _digits_run(opt, seed, chunks, steps, batch=64):
    """Train the digits MLP (64-32-10, tanh, float32) from `seed` for `chunks` x
    `steps` steps; the full training loss after each chunk, and the step infos."""
    import eqx_curv
    from eqx_curv.experiments.data import digits

    inputs, labels = (jnp.asarray(a) for a in digits())
    loss = eqx_curv.SoftmaxCrossEntropy()
    model = eqx.nn.MLP(
        64, 10, 32, 1, jnp.tanh, key=jax.random.key(seed), dtype=jnp.float32
    )
    params, static = eqx.partition(model, eqx.is_array)

    def body(carry, key):
        params, state = carry
        k1, k2 = jax.random.split(key)
        b = jax.random.choice(k1, labels.shape[0], (batch,), replace=False)
        model = eqx.combine(params, static)
        model, state, info = opt.step(model, state, loss, inputs[b], labels[b], key=k2)
        return (eqx.filter(model, eqx.is_array), state), info

    def chunk(carry, key):
        carry, infos = jax.lax.scan(body, carry, jax.random.split(key, steps))
        outputs = jax.vmap(eqx.combine(carry[0], static))(inputs)
        return carry, (loss(outputs, labels), infos)

    keys = jax.random.split(jax.random.fold_in(jax.random.key(1), seed), chunks)
    _, (full, infos) = jax.lax.scan(chunk, (params, opt.init(model)), keys)
    return full, infos


@functools.cache
def _kfac_digits():
    """K-FAC with its defaults, 1200 steps from 3 seeds (one compilation)."""
    import eqx_curv

    opt = eqx_curv.KFAC()
    return [_digits_run(opt, jnp.asarray(seed), 12, 100) for seed in range(3)]


@pytest.mark.slow  # seconds of compilation and training: run with `-m slow`
def test_kfac_beats_sgd_and_adam_on_digits_with_defaults():
    import eqx_curv

    full, _ = _kfac_digits()[0]
    for opt in (eqx_curv.SGD(), eqx_curv.FisherAdam()):
        other, infos = _digits_run(opt, jnp.asarray(0), 1, 100)
        assert not bool(infos.skipped.any())
        # The same 100 steps (same batches): at least ten times lower.
        assert float(full[0]) < float(other[0]) / 10, (type(opt), full[0], other[0])


@pytest.mark.slow  # seconds of compilation and training: run with `-m slow`
def test_kfac_trains_to_1e_4_without_blowing_up():
    # The incumbent's default damping floor (1e-8) lets the steps blow up as the
    # loss nears zero; ours stays bounded: every seed goes below 1e-4, no step is
    # skipped, and the batch loss never jumps back up in the second half.
    for full, infos in _kfac_digits():
        assert not bool(infos.skipped.any())
        assert float(full[-1]) < 1e-4, full
        # No jump back up: every checkpoint within 10x the best one before it.
        best = np.minimum.accumulate(np.asarray(full))
        assert np.all(np.asarray(full[1:]) <= 10 * best[:-1]), full
        assert float(infos.loss[6:].max()) < 0.1
        assert float(infos.stats["damping"].min()) >= 1e-4 * (1 - 1e-6)


@pytest.mark.parametrize("statistics_batch", [1.0, 3])
def test_first_step_is_the_damped_kfac_direction_scaled_by_the_exact_model(
    statistics_batch,
):
    # The factors from the first `statistics_batch` examples (all 5, or 3); the
    # gradient and the quadratic model on the whole batch.
    from models import make_problem

    import eqx_curv

    model, loss, x, y = make_problem("layernorm", "softmax", jax.random.key(5))
    opt = eqx_curv.KFAC(
        fisher_type="type2",
        max_kl=None,
        damping_method="exact",
        statistics_batch=statistics_batch,
    )
    state = opt.init(model)
    new, state, info = eqx.filter_jit(opt.step)(model, state, loss, x, y)
    params = eqx.filter(model, eqx.is_inexact_array)
    grads = eqx.filter_grad(lambda m: loss(jax.vmap(m)(x), y))(model)
    sub = x[:3] if statistics_batch == 3 else x
    kfac = eqx_curv.KFACOperator(model, loss, sub, fisher_type="type2")
    direction = -_ravel(kfac.damped_inverse(1e-2).mv(grads))
    ggn = eqx_curv.GGNOperator(model, loss, x).as_matrix()
    g = _ravel(grads)
    alpha = -(g @ direction) / (
        direction @ ggn @ direction + 1e-2 * direction @ direction
    )
    update = _ravel(eqx.filter(new, eqx.is_inexact_array)) - _ravel(params)
    assert bool(info.stats["reduction_ratio"] > 0)  # judged, and accepted
    np.testing.assert_allclose(update, alpha * direction, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(info.stats["alpha"], alpha, rtol=1e-8)


def test_eigendecompositions_refresh_only_every_k_steps():
    from models import make_problem

    import eqx_curv

    model, loss, x, y = make_problem("mlp", "softmax", jax.random.key(6))
    opt = eqx_curv.KFAC(fisher_type="empirical", inverse_every=2)
    state = opt.init(model)
    step = eqx.filter_jit(opt.step)
    seen = []
    for _ in range(3):
        model, state, _ = step(model, state, loss, x, y)
        seen.append(state.stats.preconditioner[0].left)
    assert np.array_equal(seen[0], seen[1]) and not np.array_equal(seen[1], seen[2])


def test_statistics_every_k_steps_and_on_a_sub_batch():
    # Factors every second step (the steps between keep them bitwise), from the
    # first 2 examples: the first step's averaged factors are exactly that
    # sub-batch's factors (the bias correction undoes the zero start).
    from models import make_problem

    import eqx_curv

    model, loss, x, y = make_problem("mlp", "softmax", jax.random.key(6))
    opt = eqx_curv.KFAC(fisher_type="type2", statistics_every=2, statistics_batch=2)
    state = opt.init(model)
    step = eqx.filter_jit(opt.step)
    expected = eqx_curv.KFACOperator(model, loss, x[:2], fisher_type="type2").factors
    seen = []
    for _ in range(3):
        model, state, _ = step(model, state, loss, x, y)
        seen.append(state.stats.factors)
    decay = opt.factor_decay
    for got, want in zip(jax.tree.leaves(seen[0]), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got / (1 - decay), want, rtol=1e-10, atol=1e-14)
    same = [np.array_equal(a, b) for a, b in zip(*map(jax.tree.leaves, seen[:2]))]
    assert all(same)
    assert not np.array_equal(seen[1].left[0], seen[2].left[0])
    for bad in (0.0, 1.5, 0, -1):
        with pytest.raises(ValueError, match="statistics_batch"):
            eqx_curv.KFAC(statistics_batch=bad)
    with pytest.raises(ValueError, match="statistics_every"):
        eqx_curv.KFAC(statistics_every=0)


def test_steps_between_model_steps_stay_in_the_model_steps_trust_region():
    # A step between two quadratic-model steps reuses the model step's alpha but
    # takes no larger a step in the K-FAC norm (-alpha^2 g.Delta) than it did: a
    # batch with a larger gradient (here: wrong labels) is cut to the boundary.
    # Without the cut such steps blew up runs on digits once the loss was small.
    from models import make_problem, NUM_OUTPUTS

    import eqx_curv

    model, loss, x, y = make_problem("mlp", "softmax", jax.random.key(7))
    wrong = (y + 1) % NUM_OUTPUTS
    opt = eqx_curv.KFAC(
        adaptive_every=2, statistics_every=1, fisher_type="empirical", max_kl=None
    )
    state = opt.init(model)
    step = eqx.filter_jit(opt.step)
    model, state, first = step(model, state, loss, x, y)
    bound = float(state.stats.coefficients[2])
    before = model
    model, state, info = step(model, state, loss, x, wrong)
    g = _ravel(eqx.filter_grad(lambda m: loss(jax.vmap(m)(x), wrong))(before))
    u = _ravel(eqx.filter(model, eqx.is_inexact_array))
    u = u - _ravel(eqx.filter(before, eqx.is_inexact_array))
    alpha = float(info.stats["alpha"])
    assert 0 < alpha < float(first.stats["alpha"])
    np.testing.assert_allclose(-alpha * float(g @ u), bound, rtol=1e-5)


def test_adaptive_every_reuses_alpha_between_quadratic_model_steps():
    # The quadratic model on counts 0 and 3 only: there (alpha, mu) are the exact
    # model's (bitwise those of `adaptive_every=1` on the first step); on counts 1
    # and 2 alpha is the last model step's, bitwise, unless the trust region cut it
    # (below), with no momentum, no predicted change and no damping judgement
    # (judged every lcm(5, 3) = 15 steps).
    from models import make_problem

    import eqx_curv

    model, loss, x, y = make_problem("mlp", "softmax", jax.random.key(7))
    kwargs = dict(fisher_type="empirical", max_kl=None)
    opt = eqx_curv.KFAC(adaptive_every=3, statistics_every=1, **kwargs)
    every_step = eqx_curv.KFAC(adaptive_every=1, statistics_every=1, **kwargs)
    _, _, reference = eqx.filter_jit(every_step.step)(
        model, every_step.init(model), loss, x, y
    )
    state = opt.init(model)
    step = eqx.filter_jit(opt.step)
    infos, norms = [], []
    bound = None
    for _ in range(4):
        before, previous = model, _ravel(state.stats.previous)
        model, state, info = step(model, state, loss, x, y)
        infos.append(info.stats)
        assert not bool(info.skipped)
        if bound is None:
            bound = float(state.stats.coefficients[2])
        # The step's K-FAC norm^2 -alpha g.u (u = alpha Delta on the steps in
        # between).
        g = _ravel(eqx.filter_grad(lambda m: loss(jax.vmap(m)(x), y))(before))
        u = _ravel(eqx.filter(model, eqx.is_inexact_array))
        u = u - _ravel(eqx.filter(before, eqx.is_inexact_array))
        norms.append(-float(info.stats["alpha"]) * float(g @ u))
    for name in ("alpha", "momentum", "predicted_change"):
        assert np.array_equal(infos[0][name], reference.stats[name]), name
    assert [bool(i["adapt_damping"]) for i in infos] == [True, False, False, False]
    assert bound > 0
    for i, norm in zip(infos[1:3], norms[1:3]):
        # Within the trust region of the model step; alpha is the model step's
        # unless the region cut it, and then the step lies on its boundary.
        assert norm <= bound * (1 + 1e-6), (norm, bound)
        if not np.array_equal(i["alpha"], infos[0]["alpha"]):
            assert 0 < float(i["alpha"]) < float(infos[0]["alpha"])
            np.testing.assert_allclose(norm, bound, rtol=1e-5)
        assert float(i["momentum"]) == 0.0
        assert bool(jnp.isnan(i["predicted_change"]))
    # Count 3 runs the model again: new coefficients, stored for the next steps.
    assert not np.array_equal(infos[3]["alpha"], infos[0]["alpha"])
    assert float(infos[3]["momentum"]) != 0.0
    assert bool(jnp.isfinite(infos[3]["predicted_change"]))
    assert np.array_equal(state.stats.coefficients[0], infos[3]["alpha"])
    # The last update u = alpha Delta + mu delta_0 minimises the exact model
    # g.u + u (G + lambda) u / 2 over both directions: its gradient g + (G +
    # lambda) u is orthogonal to u and to delta_0 (the update of count 2).
    u = _ravel(eqx.filter(model, eqx.is_inexact_array))
    u = u - _ravel(eqx.filter(before, eqx.is_inexact_array))
    g = _ravel(eqx.filter_grad(lambda m: loss(jax.vmap(m)(x), y))(before))
    ggn = eqx_curv.GGNOperator(before, loss, x).as_matrix()
    residual = g + ggn @ u + infos[3]["damping"] * u
    for v in (u, previous):
        scale = np.linalg.norm(g) * np.linalg.norm(v)
        assert abs(float(residual @ v)) < 1e-9 * scale
    for bad in (0, -2):
        with pytest.raises(ValueError, match="`adaptive_every` must be a positive"):
            eqx_curv.KFAC(adaptive_every=bad)
    with pytest.raises((ValueError, TypeError), match="adaptive_every"):
        eqx_curv.KFAC(adaptive_every=2.5)  # pyright: ignore


@pytest.mark.slow  # seconds of compilation and training: run with `-m slow`
def test_low_precision_models_accumulate_factors_in_float32():
    import eqx_curv

    model = eqx.nn.MLP(4, 3, 5, 1, jnp.tanh, key=jax.random.key(0), dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(1), (8, 4), jnp.bfloat16)
    y = jax.random.randint(jax.random.key(2), (8,), 0, 3)
    opt = eqx_curv.KFAC()
    state = opt.init(model)
    new, state, info = eqx.filter_jit(opt.step)(
        model, state, eqx_curv.SoftmaxCrossEntropy(), x, y, key=jax.random.key(3)
    )
    factors = jax.tree.leaves(state.stats.factors)
    assert all(f.dtype == jnp.float32 for f in factors)
    assert not bool(info.skipped)
    assert all(
        p.dtype == jnp.bfloat16 for p in jax.tree.leaves(eqx.filter(new, eqx.is_array))
    )


def test_optimizer_bad_arguments_are_sentences():
    import eqx_curv

    for bounds in [(0.0, 1.0), (-1e-3, 1.0), (1e-2, 1e-3)]:
        with pytest.raises(ValueError, match="damping_bounds"):
            eqx_curv.KFAC(damping=1e-2, damping_bounds=bounds)
    with pytest.raises(ValueError, match="within `damping_bounds`"):
        eqx_curv.KFAC(damping=1e-6)
    with pytest.raises(ValueError, match="factor_decay"):
        eqx_curv.KFAC(factor_decay=1.0)
    with pytest.raises(ValueError, match="max_kl"):
        eqx_curv.KFAC(max_kl=0.0)
    with pytest.raises((ValueError, TypeError), match="inverse_every"):
        eqx_curv.KFAC(inverse_every=0)
    with pytest.raises((ValueError, TypeError), match="fisher_type"):
        eqx_curv.KFAC(fisher_type="true")  # pyright: ignore
    reader = _ReadsWeight(
        eqx.nn.Linear(3, 3, key=jax.random.key(0)),
        eqx.nn.Linear(3, 2, key=jax.random.key(1)),
    )
    x, y = jnp.ones((4, 3)), jnp.zeros((4,), jnp.int32)
    opt = eqx_curv.KFAC(fisher_type="empirical")
    loss = eqx_curv.SoftmaxCrossEntropy()
    with pytest.raises(ValueError, match=r"never calls the layer at `model\.proj`"):
        opt.step(reader, opt.init(reader), loss, x, y)
    with pytest.raises(TypeError, match="eqx_curv loss"):
        opt.step(reader, opt.init(reader), lambda o, t: jnp.mean(o), x, y)
    with pytest.raises(ValueError, match="`key` is needed"):
        eqx_curv.KFAC().step(reader, opt.init(reader), loss, x, y)
