"""TinyViT: parameter count, shapes, dropout only with a key, usable by the operators."""

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


def test_position_embedding_and_bad_image():
    emb = sincos_position_embedding(8, 2)
    assert emb.shape == (4, 8)
    # position 0 along both axes: sin 0 = 0, cos 0 = 1
    np.testing.assert_allclose(emb[0], [0, 0, 1, 1, 0, 0, 1, 1])
    model = TinyViT(jax.random.key(0), features=16, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(jnp.zeros((30, 30, 3)))
