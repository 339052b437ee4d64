"""Small models for dense-oracle tests: each maps ONE example to 3 outputs.

Parameter counts stay around a hundred, so that float64 `jax.hessian` / `jax.jacfwd`
oracles and dense solves are cheap.
"""

import equinox as eqx
import jax
import jax.numpy as jnp


NUM_OUTPUTS = 3


class ConvNet(eqx.Module):
    """A 3x3 convolution, ReLU, and a linear read-out, on 1x6x6 images."""

    conv: eqx.nn.Conv2d
    linear: eqx.nn.Linear

    def __init__(self, key, dtype):
        k1, k2 = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(1, 2, 3, stride=2, key=k1, dtype=dtype)
        self.linear = eqx.nn.Linear(2 * 2 * 2, NUM_OUTPUTS, key=k2, dtype=dtype)

    def __call__(self, x):
        return self.linear(jax.nn.relu(self.conv(x)).reshape(-1))


class LayerNormNet(eqx.Module):
    """Linear, LayerNorm, GELU, linear: smooth, with a normalisation layer."""

    first: eqx.nn.Linear
    norm: eqx.nn.LayerNorm
    last: eqx.nn.Linear

    def __init__(self, key, dtype):
        k1, k2 = jax.random.split(key)
        self.first = eqx.nn.Linear(4, 6, key=k1, dtype=dtype)
        self.norm = eqx.nn.LayerNorm(6, dtype=dtype)
        self.last = eqx.nn.Linear(6, NUM_OUTPUTS, key=k2, dtype=dtype)

    def __call__(self, x):
        return self.last(jax.nn.gelu(self.norm(self.first(x))))


class DropoutMLP(eqx.Module):
    """A tanh MLP with dropout, active only when a key is given."""

    first: eqx.nn.Linear
    dropout: eqx.nn.Dropout
    last: eqx.nn.Linear

    def __init__(self, key, dtype):
        k1, k2 = jax.random.split(key)
        self.first = eqx.nn.Linear(4, 6, key=k1, dtype=dtype)
        self.dropout = eqx.nn.Dropout(0.5)
        self.last = eqx.nn.Linear(6, NUM_OUTPUTS, key=k2, dtype=dtype)

    def __call__(self, x, *, key=None):
        h = self.dropout(jnp.tanh(self.first(x)), key=key, inference=key is None)
        return self.last(h)


class BatchNormNet(eqx.Module):
    """Linear, BatchNorm, tanh, linear: 53 parameters, 10 running statistics in state.

    Called as `model(x, state)`, returning `(outputs, new_state)`, as Equinox's
    stateful layers are.
    """

    first: eqx.nn.Linear
    norm: eqx.nn.BatchNorm
    last: eqx.nn.Linear

    def __init__(self, key, dtype):
        k1, k2 = jax.random.split(key)
        self.first = eqx.nn.Linear(4, 5, key=k1, dtype=dtype)
        self.norm = eqx.nn.BatchNorm(5, "batch", mode="batch", dtype=dtype)
        self.last = eqx.nn.Linear(5, NUM_OUTPUTS, key=k2, dtype=dtype)

    def __call__(self, x, state):
        h, state = self.norm(self.first(x), state)
        return self.last(jnp.tanh(h)), state


def make_batchnorm(key, dtype=jnp.float64):
    """A `BatchNormNet` in inference mode and its state, with running statistics that
    are not the initial zeros and ones (so that using them is visible)."""
    kmodel, kmean, kvar = jax.random.split(key, 3)
    model, state = eqx.nn.make_with_state(BatchNormNet)(kmodel, dtype)
    mean = jax.random.normal(kmean, (5,), dtype)
    var = jax.random.uniform(kvar, (5,), dtype, 0.5, 2.0)
    state = state.set(model.norm.batch_state_index, (mean, var))
    return eqx.nn.inference_mode(model), state


def _mlp(key, dtype):
    return eqx.nn.MLP(
        4, NUM_OUTPUTS, 5, 2, activation=jax.nn.relu, key=key, dtype=dtype
    )


# name -> (constructor(key, dtype), shape of one input)
MODELS = {
    "mlp": (_mlp, (4,)),
    "conv": (ConvNet, (1, 6, 6)),
    "layernorm": (LayerNormNet, (4,)),
}


def make_problem(name, loss_name, key, *, batch=5, dtype=jnp.float64):
    """A model, a loss, and a batch of inputs and targets for it."""
    import eqx_curv

    if name == "dropout":
        make, shape = DropoutMLP, (4,)
    else:
        make, shape = MODELS[name]
    kmodel, kx, ky = jax.random.split(key, 3)
    model = make(kmodel, dtype)
    inputs = jax.random.normal(kx, (batch, *shape), dtype)
    if loss_name == "softmax":
        loss = eqx_curv.SoftmaxCrossEntropy()
        targets = jax.random.randint(ky, (batch,), 0, NUM_OUTPUTS)
    elif loss_name == "mse":
        loss = eqx_curv.MeanSquaredError()
        targets = jax.random.normal(ky, (batch, NUM_OUTPUTS), dtype)
    elif loss_name == "bce":
        loss = eqx_curv.SigmoidBinaryCrossEntropy()
        targets = jax.random.bernoulli(ky, 0.5, (batch, NUM_OUTPUTS)).astype(dtype)
    else:
        raise ValueError(loss_name)
    return model, loss, inputs, targets
