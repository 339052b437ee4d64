"""Small Equinox models with a batch and targets for each eqx_curv loss.

Each model maps ONE example to `NUM_OUTPUTS` outputs and has around a hundred
parameters, so that dense float64 oracles (`jax.hessian`, `jax.jacfwd`) stay cheap.
Shapes are fixed per kind: a property drawing many problems compiles once per
(kind, loss, batch size, dtype).
"""

from typing import Any, Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray

from .._losses import (
    AbstractLoss,
    MeanSquaredError,
    SigmoidBinaryCrossEntropy,
    SoftmaxCrossEntropy,
)


NUM_OUTPUTS = 3

ModelKind = Literal["mlp", "conv", "attention"]
LossName = Literal["softmax", "mse", "bce"]
MODEL_KINDS: tuple[str, ...] = ("mlp", "conv", "attention")
LOSS_NAMES: tuple[str, ...] = ("softmax", "mse", "bce")


class _ConvNet(eqx.Module):
    """A 3x3 convolution with stride 2, ReLU and a linear read-out, on 1x6x6 images."""

    conv: eqx.nn.Conv2d
    linear: eqx.nn.Linear

    def __init__(self, key: PRNGKeyArray, dtype: Any):
        k1, k2 = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(1, 2, 3, stride=2, key=k1, dtype=dtype)
        self.linear = eqx.nn.Linear(8, NUM_OUTPUTS, key=k2, dtype=dtype)

    def __call__(self, x: Array) -> Array:
        return self.linear(jax.nn.relu(self.conv(x)).reshape(-1))


class _AttentionNet(eqx.Module):
    """Tokens embedded, one residual two-head self-attention, mean-pooled, read out.

    Input: 3 tokens of 2 features.
    """

    embed: eqx.nn.Linear
    attention: eqx.nn.MultiheadAttention
    head: eqx.nn.Linear

    def __init__(self, key: PRNGKeyArray, dtype: Any):
        k1, k2, k3 = jax.random.split(key, 3)
        self.embed = eqx.nn.Linear(2, 4, key=k1, dtype=dtype)
        self.attention = eqx.nn.MultiheadAttention(2, 4, key=k2, dtype=dtype)
        self.head = eqx.nn.Linear(4, NUM_OUTPUTS, key=k3, dtype=dtype)

    def __call__(self, x: Array) -> Array:
        h = jax.vmap(self.embed)(x)
        h = h + self.attention(h, h, h)
        return self.head(jnp.mean(h, axis=0))


def _mlp(key: PRNGKeyArray, dtype: Any) -> eqx.nn.MLP:
    return eqx.nn.MLP(4, NUM_OUTPUTS, 5, 2, activation=jnp.tanh, key=key, dtype=dtype)


# kind -> (constructor(key, dtype), the shape of ONE input)
_KINDS = {
    "mlp": (_mlp, (4,)),
    "conv": (_ConvNet, (1, 6, 6)),
    "attention": (_AttentionNet, (3, 2)),
}


class ModelProblem(NamedTuple):
    """A model, a loss, and a batch for it: `model, loss, inputs, targets = problem`.

    **Fields:**

    - `model`: an Equinox module mapping one example to `NUM_OUTPUTS` outputs.
    - `loss`: an eqx_curv loss (`SoftmaxCrossEntropy`, `MeanSquaredError` or
        `SigmoidBinaryCrossEntropy`).
    - `inputs`: a batch of inputs, leading axis the batch.
    - `targets`: one target per example, of the kind the loss takes (class indices,
        real vectors, or 0/1 vectors).
    """

    model: eqx.Module
    loss: AbstractLoss
    inputs: Array
    targets: Array


def model_problem(
    kind: ModelKind,
    loss: LossName,
    key: PRNGKeyArray,
    *,
    batch_size: int = 4,
    dtype: Any = jnp.float64,
) -> ModelProblem:
    """A small model of the given kind with a batch and targets for the given loss.

    **Arguments:**

    - `kind`: `"mlp"` (tanh MLP, 4 inputs, two hidden layers of 5), `"conv"` (a
        stride-2 convolution on 1x6x6 images, ReLU, a linear read-out) or
        `"attention"` (3 tokens of 2 features, one two-head self-attention block).
    - `loss`: `"softmax"` (integer class targets), `"mse"` (real targets) or `"bce"`
        (0/1 targets).
    - `key`: the randomness of the weights, inputs and targets.
    - `batch_size`: the number of examples.
    - `dtype`: the floating-point dtype of the weights, inputs and real targets
        (float64 needs `jax.config.update("jax_enable_x64", True)`).

    **Returns:**

    A [`eqx_curv.testing.ModelProblem`][].
    """
    if kind not in _KINDS:
        raise ValueError(f"`kind` must be one of {MODEL_KINDS}, not {kind!r}.")
    if loss not in LOSS_NAMES:
        raise ValueError(f"`loss` must be one of {LOSS_NAMES}, not {loss!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, not {batch_size!r}.")
    make, shape = _KINDS[kind]
    kmodel, kx, ky = jax.random.split(key, 3)
    model = make(kmodel, dtype)
    inputs = jax.random.normal(kx, (batch_size, *shape), dtype)
    if loss == "softmax":
        loss_fn = SoftmaxCrossEntropy()
        targets = jax.random.randint(ky, (batch_size,), 0, NUM_OUTPUTS)
    elif loss == "mse":
        loss_fn = MeanSquaredError()
        targets = jax.random.normal(ky, (batch_size, NUM_OUTPUTS), dtype)
    else:
        loss_fn = SigmoidBinaryCrossEntropy()
        targets = jax.random.bernoulli(ky, 0.5, (batch_size, NUM_OUTPUTS))
        targets = targets.astype(dtype)
    return ModelProblem(model, loss_fn, inputs, targets)
