"""TinyViT: the reference page's small vision transformer for CIFAR-10, in Equinox."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray


def sincos_position_embedding(features: int, grid_size: int) -> np.ndarray:
    """Fixed 2D sine-cosine position embedding, `[grid_size**2, features]`.

    Half the features encode the row-major grid's first meshgrid coordinate and half
    the second, each as `[sin(pos * w), cos(pos * w)]` with frequencies `w =
    10000**(-k / (features / 4))`, as in MAE (He et al., "Masked autoencoders are
    scalable vision learners", CVPR 2022) and the reference page. A NumPy constant, so
    it is neither a parameter nor recomputed under `jax.jit`.
    """
    if features % 4:
        raise ValueError(f"`features` must be divisible by 4, got {features}.")
    quarter = features // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    coords = np.arange(grid_size, dtype=np.float64)
    grid = np.stack(np.meshgrid(coords, coords), axis=0).reshape(2, -1)

    def one_axis(pos):
        angles = np.outer(pos, omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([one_axis(grid[0]), one_axis(grid[1])], axis=1).astype(
        np.float32
    )


def _split(key: PRNGKeyArray | None, num: int) -> list:
    return [None] * num if key is None else list(jax.random.split(key, num))


# The layers below are computed directly on the parameters of Equinox layers, which stay
# the parameter containers (so the parameter PyTree, and the layer types that K-FAC looks
# for, are those of `eqx.nn.Linear`, `eqx.nn.LayerNorm`, `eqx.nn.MultiheadAttention`
# and `eqx.nn.Conv2d`), and give their results to float rounding. They are written for
# ONE example, like the layers, but so that `jax.vmap` over a batch turns every product
# into one row-major matmul: `x @ W.T` keeps the output's features last, where
# `eqx.nn.Linear`'s `W @ x`, vmapped over tokens and examples, puts them first and XLA
# then transposes every projection's output (and its cotangent) in memory. A layer of a
# subclass (K-FAC's taps are subclasses that read each call) is called as a layer.


def _along_last(v: Array, like: Array) -> Array:
    # A vector shaped to broadcast along `like`'s last axis, with the rank made explicit.
    return v.reshape((1,) * (like.ndim - 1) + (-1,))


def _linear(layer: eqx.nn.Linear, x: Array) -> Array:
    """`layer` applied to the last axis of `x`."""
    if type(layer) is not eqx.nn.Linear:
        # A subclass may define its own call (K-FAC's taps do, to read each layer's
        # inputs and output gradients): call it, one row at a time.
        call = layer
        for _ in range(x.ndim - 1):
            call = jax.vmap(call)
        return call(x)
    y = x @ layer.weight.T
    return y if layer.bias is None else y + _along_last(layer.bias, y)


def _at_least_float32(x: Array) -> Array:
    # As Equinox's LayerNorm and softmax: half precision is computed in float32.
    return x if jnp.finfo(x.dtype).bits >= 32 else x.astype(jnp.float32)


def _layer_norm(layer: eqx.nn.LayerNorm, x: Array) -> Array:
    """`layer` (normalising one feature vector) applied to the last axis of `x`."""
    dtype = x.dtype
    # The copy is free (XLA removes it) but it makes the gradient with respect to `x`
    # the sum of two whole terms, this norm's and the residual stream's, where it
    # would otherwise end by adding a broadcast mean. XLA's CPU fusion duplicates such
    # an "effectively unary" add into every consumer, so without the copy the
    # residual stream's gradient was recomputed from the sum of all later blocks'
    # terms in each of its three consumers (9% of a gradient at batch 128).
    x = jnp.copy(_at_least_float32(x))
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    variance = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
    out = centred * jax.lax.rsqrt(variance + layer.eps)
    if layer.weight is not None:
        out = out * _along_last(layer.weight.astype(out.dtype), out)
    if layer.bias is not None:
        out = out + _along_last(layer.bias.astype(out.dtype), out)
    return out.astype(dtype)


def _attention(
    layer: eqx.nn.MultiheadAttention,
    x: Float[Array, "tokens features"],
    key: PRNGKeyArray | None,
) -> Float[Array, "tokens features"]:
    """Self-attention of `layer` on `x`, as `layer(x, x, x, key=key)`.

    Dropout on the attention weights draws head $h$'s mask from the $h$-th key of
    `jax.random.split(key, num_heads)`, as `eqx.nn.MultiheadAttention` does, so the
    masks are the same too.
    """
    tokens, _ = x.shape
    heads = layer.num_heads
    query = _linear(layer.query_proj, x).reshape(tokens, heads, layer.qk_size)
    key_ = _linear(layer.key_proj, x).reshape(tokens, heads, layer.qk_size)
    value = _linear(layer.value_proj, x).reshape(tokens, heads, layer.vo_size)
    query = query / math.sqrt(layer.qk_size)
    logits = jnp.einsum("qhd,khd->hqk", query, key_)
    weights = jax.nn.softmax(_at_least_float32(logits), axis=-1).astype(logits.dtype)
    if key is not None:
        # Through the layer's own Dropout, one head at a time as Equinox does.
        weights = jax.vmap(lambda w, k: layer.dropout(w, key=k, inference=False))(
            weights, jax.random.split(key, heads)
        )
    attended = jnp.einsum("hqk,khd->qhd", weights, value)
    return _linear(layer.output_proj, attended.reshape(tokens, heads * layer.vo_size))


class _Block(eqx.Module):
    """Pre-LayerNorm transformer block: attention and a GELU MLP, both residual."""

    attention_norm: eqx.nn.LayerNorm
    attention: eqx.nn.MultiheadAttention
    mlp_norm: eqx.nn.LayerNorm
    hidden: eqx.nn.Linear
    output: eqx.nn.Linear
    dropout: eqx.nn.Dropout

    def __init__(self, features, num_heads, dropout, dtype, *, key):
        k1, k2, k3 = jax.random.split(key, 3)
        # Flax's LayerNorm epsilon, and biases everywhere, as in the page's model.
        self.attention_norm = eqx.nn.LayerNorm(features, eps=1e-6, dtype=dtype)
        self.attention = eqx.nn.MultiheadAttention(
            num_heads,
            features,
            use_query_bias=True,
            use_key_bias=True,
            use_value_bias=True,
            use_output_bias=True,
            dropout_p=dropout,
            dtype=dtype,
            key=k1,
        )
        self.mlp_norm = eqx.nn.LayerNorm(features, eps=1e-6, dtype=dtype)
        self.hidden = eqx.nn.Linear(features, 2 * features, dtype=dtype, key=k2)
        self.output = eqx.nn.Linear(2 * features, features, dtype=dtype, key=k3)
        self.dropout = eqx.nn.Dropout(dropout)

    def __call__(self, x, key):
        k_attention, k_hidden, k_output = _split(key, 3)
        inference = key is None
        x = x + _attention(
            self.attention, _layer_norm(self.attention_norm, x), k_attention
        )
        y = jax.nn.gelu(_linear(self.hidden, _layer_norm(self.mlp_norm, x)))
        y = self.dropout(y, key=k_hidden, inference=inference)
        y = self.dropout(_linear(self.output, y), key=k_output, inference=inference)
        return x + y


class TinyViT(eqx.Module):
    """The reference page's TinyViT, mapping ONE image to class logits.

    Patches of `patch_size` x `patch_size` pixels are embedded by a strided
    convolution to `features` channels, a fixed 2D sine-cosine position embedding is
    added, a learned class token is prepended, and `depth` pre-LayerNorm blocks
    (`num_heads`-head self-attention; MLP `features -> 2 features -> features` with
    GELU) follow. A linear head reads the class token. Dropout (`dropout`, on the
    attention weights and after each MLP layer) is active only when a `key` is given.

    With the defaults (CIFAR-10: 32x32x3 images, 10 classes) the model has **556,042**
    parameters, the count of the page's own Flax code (its text says about 400k).

    One deliberate difference: the page appends the class token LAST and then reads
    token 0, which is the first image patch, so its class token is never used. Ours
    reads the class token.

    **Arguments:**

    - `key`: initialisation key.
    - `features`: embedding width.
    - `patch_size`: side of the square patches.
    - `num_classes`: number of logits.
    - `depth`: number of transformer blocks.
    - `num_heads`: attention heads per block.
    - `dropout`: dropout rate when a key is passed to `__call__`.
    - `channels`: image channels.
    - `dtype`: parameter dtype (default: JAX's default float).
    """

    patch_embed: eqx.nn.Conv2d
    class_token: Float[Array, " features"]
    blocks: tuple[_Block, ...]
    head: eqx.nn.Linear
    patch_size: int = eqx.field(static=True)

    def __init__(
        self,
        key: PRNGKeyArray,
        *,
        features: int = 128,
        patch_size: int = 8,
        num_classes: int = 10,
        depth: int = 4,
        num_heads: int = 4,
        dropout: float = 0.3,
        channels: int = 3,
        dtype=None,
    ):
        keys = jax.random.split(key, depth + 3)
        self.patch_embed = eqx.nn.Conv2d(
            channels, features, patch_size, stride=patch_size, dtype=dtype, key=keys[0]
        )
        self.class_token = jax.random.normal(keys[1], (features,), dtype)
        self.blocks = tuple(
            _Block(features, num_heads, dropout, dtype, key=k) for k in keys[3:]
        )
        self.head = eqx.nn.Linear(features, num_classes, dtype=dtype, key=keys[2])
        self.patch_size = patch_size

    def __call__(
        self,
        x: Float[Array, "height width channels"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, " classes"]:
        """Logits for one image `x` of shape `[height, width, channels]` in [0, 1]."""
        height, width, channels = x.shape
        if height != width or height % self.patch_size:
            raise ValueError(
                f"`x` must be a square image whose side is a multiple of the patch "
                f"size {self.patch_size}, but has shape {x.shape}."
            )
        # A convolution whose stride is its kernel size and which has no padding is a
        # matmul of each patch with the kernel: patches are flattened as `(row, column,
        # channel)`, and so is the kernel `[features, channels, row, column]`. The
        # class token is row 0 of the same matmul, a zero patch whose offset is the
        # token itself, so that no concatenation of activations (and no split of
        # their gradient) is needed.
        conv = self.patch_embed
        p = self.patch_size
        grid = height // p
        x = x.astype(conv.weight.dtype)
        position = sincos_position_embedding(conv.out_channels, grid)
        if type(conv) is eqx.nn.Conv2d:
            patches = jnp.swapaxes(x.reshape(grid, p, grid, p, channels), 1, 2)
            patches = patches.reshape(grid * grid, p * p * channels)
            patches = jnp.concatenate([jnp.zeros_like(patches[:1]), patches], axis=0)
            kernel = jnp.transpose(conv.weight, (0, 2, 3, 1)).reshape(
                -1, p * p * channels
            )
            offsets = jnp.asarray(position, patches.dtype)
            if conv.bias is not None:
                offsets = offsets + _along_last(conv.bias, offsets)
            offsets = jnp.concatenate([self.class_token[None], offsets], axis=0)
            tokens = patches @ kernel.T + offsets
        else:
            # A subclass may define its own call (see `_linear`): call it.
            patches = conv(jnp.transpose(x, (2, 0, 1)))
            tokens = patches.reshape(conv.out_channels, grid * grid).T
            tokens = tokens + jnp.asarray(position, tokens.dtype)
            tokens = jnp.concatenate([self.class_token[None], tokens], axis=0)
        for block, k in zip(self.blocks, _split(key, len(self.blocks))):
            tokens = block(tokens, k)
        return _linear(self.head, tokens[0])
