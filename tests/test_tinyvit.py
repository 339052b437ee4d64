"""TinyViT: parameter count, shapes, dropout only with a key, usable by the operators."""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_curv
from eqx_curv.experiments.tinyvit import sincos_position_embedding, TinyViT


def test_parameter_count_matches_the_page():
    # Shapes only: no arrays are allocated.
    model = eqx.filter_eval_shape(TinyViT, jax.random.key(0))
    leaves = jax.tree.leaves(model)
    inexact = [x for x in leaves if isinstance(x, jax.ShapeDtypeStruct)]
    assert all(jnp.issubdtype(x.dtype, jnp.inexact) for x in inexact)
    assert sum(x.size for x in inexact) == 556_042


def test_forward_dropout_and_ggn():
    model = TinyViT(
        jax.random.key(0), features=16, depth=1, num_heads=2, dtype=jnp.float32
    )
    x = jax.random.uniform(jax.random.key(1), (3, 32, 32, 3), jnp.float32)
    apply = eqx.filter_jit(lambda m, x, key: jax.vmap(lambda xi: m(xi, key=key))(x))
    plain = apply(model, x, None)
    assert plain.shape == (3, 10) and plain.dtype == jnp.float32
    np.testing.assert_array_equal(plain, apply(model, x, None))
    dropped = apply(model, x, jax.random.key(2))
    assert not np.allclose(dropped, plain)
    # The class token is what the head reads: changing it changes the logits.
    moved = eqx.tree_at(lambda m: m.class_token, model, model.class_token + 1)
    assert not np.allclose(apply(moved, x, None), plain)
    y = jnp.array([0, 1, 2])
    op = eqx_curv.GGNOperator(model, eqx_curv.SoftmaxCrossEntropy(), x, y)
    v = eqx.filter(model, eqx.is_inexact_array)
    assert np.isfinite(
        jax.flatten_util.ravel_pytree(eqx.filter_jit(lambda op, v: op.mv(v))(op, v))[0]
    ).all()


def _reference_forward(model, x, key):
    """The model written with plain Equinox layer calls: the per-example convolution,
    `eqx.nn.MultiheadAttention`, vmapped `eqx.nn.LayerNorm` and `eqx.nn.Linear`."""

    def split(key, num):
        return [None] * num if key is None else list(jax.random.split(key, num))

    inference = key is None
    conv = model.patch_embed(jnp.transpose(x, (2, 0, 1)))
    features, grid, _ = conv.shape
    tokens = conv.reshape(features, grid * grid).T
    tokens = tokens + sincos_position_embedding(features, grid).astype(tokens.dtype)
    tokens = jnp.concatenate([model.class_token[None], tokens], axis=0)
    for block, k in zip(model.blocks, split(key, len(model.blocks))):
        k_attention, k_hidden, k_output = split(k, 3)
        y = jax.vmap(block.attention_norm)(tokens)
        tokens = tokens + block.attention(y, y, y, key=k_attention, inference=inference)
        y = jax.nn.gelu(jax.vmap(block.hidden)(jax.vmap(block.mlp_norm)(tokens)))
        y = block.dropout(y, key=k_hidden, inference=inference)
        y = jax.vmap(block.output)(y)
        tokens = tokens + block.dropout(y, key=k_output, inference=inference)
    return model.head(tokens[0])


@pytest.mark.parametrize(
    "dtype", [jnp.float32, pytest.param(jnp.float64, marks=pytest.mark.slow)]
)
def test_forward_equals_plain_equinox_layers(dtype):
    # The model computes its layers directly on the Equinox layers' parameters (the
    # patch convolution as a matmul, attention by einsum); it must give what the layers
    # themselves give, logits and gradients, and draw the same dropout masks.
    model = TinyViT(
        jax.random.key(0), features=16, depth=2, num_heads=2, patch_size=4, dtype=dtype
    )

    # Non-zero LayerNorm biases and scales, so that their use is checked too.
    def norm_parameters(m):
        norms = [n for b in m.blocks for n in (b.attention_norm, b.mlp_norm)]
        return [n.weight for n in norms] + [n.bias for n in norms]

    leaves = norm_parameters(model)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    moved = [
        a + 0.3 * jax.random.normal(k, a.shape, dtype) for a, k in zip(leaves, keys)
    ]
    model = eqx.tree_at(norm_parameters, model, moved)
    x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 3), dtype)

    @eqx.filter_jit
    def logits_and_gradients(m):
        # Without dropout and with it (key 2), ours and the reference.
        def loss(m, forward, key):
            logits = jax.vmap(lambda xi: forward(m, xi, key))(x)
            return jnp.sum(jnp.sin(logits)), logits

        ours = lambda m, xi, k: m(xi, key=k)  # noqa: E731
        return [
            eqx.filter_grad(loss, has_aux=True)(m, forward, key)
            for key in (None, jax.random.key(2))
            for forward in (ours, _reference_forward)
        ]

    (
        (grad, logits),
        (ref_grad, ref_logits),
        (dgrad, dlogits),
        (dref_grad, dref_logits),
    ) = logits_and_gradients(model)
    assert logits.dtype == dtype
    # Dropout is active with a key, and draws the same masks as the reference.
    assert not np.allclose(dlogits, logits)
    rtol, atol = (1e-5, 1e-5) if dtype == jnp.float32 else (1e-12, 1e-12)
    for ours, ref in [(logits, ref_logits), (dlogits, dref_logits)]:
        np.testing.assert_allclose(ours, ref, rtol=rtol, atol=atol)
    for ours, ref in [(grad, ref_grad), (dgrad, dref_grad)]:
        for g, r in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
            np.testing.assert_allclose(g, r, rtol=rtol, atol=atol)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA CPU's fusion")
def test_gradient_does_not_recompute_the_residual_stream():
    # Structural, not timed: the gradient of the residual stream is computed once per
    # block. When it was left as a chain of sums ending in an "effectively unary" add
    # of a broadcast, XLA's CPU fusion inlined the whole chain into each consumer, so
    # the widest fusion grew with depth (37 operands at depth 2, 74 at depth 4).
    def widest_fusion(depth):
        model = TinyViT(
            jax.random.key(0), features=16, depth=depth, num_heads=2, dropout=0.0
        )
        params, static = eqx.partition(model, eqx.is_inexact_array)
        x = jnp.zeros((4, 16, 16, 3), jnp.float32)
        params = jax.tree.map(lambda a: a.astype(jnp.float32), params)

        def loss(params):
            return jnp.sum(jax.vmap(eqx.combine(params, static))(x))

        hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
        entry = hlo[hlo.index("ENTRY") :]
        fusions = re.findall(r"fusion\((.*?)\), kind=kLoop", entry)
        return max(len(operands.split(", ")) for operands in fusions)

    assert widest_fusion(4) == widest_fusion(2)


def test_kfac_finds_every_layer():
    # The fast path computes on the layers' parameters; K-FAC's taps (subclasses of
    # the layers) must still be called, or every block would fall back to a diagonal.
    model = TinyViT(jax.random.key(0), features=8, patch_size=4, depth=1, num_heads=2)
    x = jnp.zeros((2, 8, 8, 3), jnp.float32)
    op = eqx.filter_eval_shape(
        lambda m: eqx_curv.KFACOperator(
            m,
            eqx_curv.SoftmaxCrossEntropy(),
            x,
            fisher_type="mc",
            key=jax.random.key(1),
        ),
        model,
    )
    paths = [jax.tree_util.keystr(site.path) for site in op.layout.sites]
    projections = ["query_proj", "key_proj", "value_proj", "output_proj"]
    assert paths == [
        ".patch_embed",
        *[f".blocks[0].attention.{name}" for name in projections],
        ".blocks[0].hidden",
        ".blocks[0].output",
        ".head",
    ]


def test_position_embedding_and_bad_image():
    emb = sincos_position_embedding(8, 2)
    assert emb.shape == (4, 8)
    # position 0 along both axes: sin 0 = 0, cos 0 = 1
    np.testing.assert_allclose(emb[0], [0, 0, 1, 1, 0, 0, 1, 1])
    model = TinyViT(jax.random.key(0), features=16, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(jnp.zeros((30, 30, 3)))
