"""TinyViT: the reference page's small vision transformer for CIFAR-10, in Equinox."""

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
        y = jax.vmap(self.attention_norm)(x)
        x = x + self.attention(y, y, y, key=k_attention, inference=inference)
        y = jax.nn.gelu(jax.vmap(self.hidden)(jax.vmap(self.mlp_norm)(x)))
        y = self.dropout(y, key=k_hidden, inference=inference)
        y = self.dropout(jax.vmap(self.output)(y), key=k_output, inference=inference)
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
        height, width, _ = x.shape
        if height != width or height % self.patch_size:
            raise ValueError(
                f"`x` must be a square image whose side is a multiple of the patch "
                f"size {self.patch_size}, but has shape {x.shape}."
            )
        x = jnp.transpose(x, (2, 0, 1)).astype(self.patch_embed.weight.dtype)
        patches = self.patch_embed(x)  # [features, grid, grid]
        features, grid, _ = patches.shape
        tokens = patches.reshape(features, grid * grid).T
        tokens = tokens + sincos_position_embedding(features, grid).astype(tokens.dtype)
        tokens = jnp.concatenate([self.class_token[None], tokens], axis=0)
        for block, k in zip(self.blocks, _split(key, len(self.blocks))):
            tokens = block(tokens, k)
        return self.head(tokens[0])
