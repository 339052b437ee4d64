r"""Curvature in output space: the generalised Gauss-Newton and the Fisher family.

All three operators here have the form

$$A = J^\top M J = \sum_i J_i^\top M_i J_i,$$

where $J_i = \partial f(x_i; \theta) / \partial \theta$ is the Jacobian of the model's
outputs on example $i$ and $M_i$ is a small positive semidefinite matrix in output space:

| operator | $M_i$ |
| --- | --- |
| `GGNOperator` | $\frac1N H_i$, the loss Hessian with respect to the outputs |
| `FisherOperator`, exact | $\frac1N \mathbb{E}_{y \sim p(y \mid o_i)}[r_i r_i^\top] = \frac1N H_i$ for the losses in eqx_curv |
| `FisherOperator`, Monte Carlo | $\frac{1}{NS} \sum_s r_{is} r_{is}^\top$, $r_{is} = \nabla_o \ell(o_i, \tilde y_{is})$ at sampled targets |
| `EmpiricalFisherOperator` | $\frac1N r_i r_i^\top$, $r_i = \nabla_o \ell(o_i, y_i)$ at the data targets |

A product $Av$ is one `jax.linearize` of the batched model (the forward pass, once),
its tangent map ($Jv$, a forward-mode pass), $M$ applied in output space (cheap), and
the transpose of the tangent map ($J^\top u$, a reverse-mode pass).
"""

import abc
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, ArrayLike, PRNGKeyArray, PyTree

from .._losses import AbstractLoss
from .base import (
    AbstractCurvatureOperator,
    check_inexact_params,
    linearised,
    structure_of,
)


def _batch_size(inputs: PyTree[Array]) -> int:
    leaves = jax.tree.leaves(inputs)
    if not leaves or any(jnp.ndim(x) < 1 for x in leaves):
        raise ValueError(
            "`inputs` must be a batch: arrays with a leading batch axis (the model maps "
            "one example and is vmapped over that axis)."
        )
    sizes = {jnp.shape(x)[0] for x in leaves}
    if len(sizes) != 1:
        raise ValueError(
            f"Every array in `inputs` must have the same batch size, got {sorted(sizes)}."
        )
    return sizes.pop()


def apply_batched(
    model: Callable, inputs: PyTree[Array], key: PRNGKeyArray | None
) -> PyTree[Array]:
    """Apply a one-example model to a batch; with a `key`, each example gets its own."""
    if key is None:
        return jax.vmap(lambda x: model(x))(inputs)
    keys = jax.random.split(key, _batch_size(inputs))
    return jax.vmap(lambda x, k: model(x, key=k))(inputs, keys)


def sample_targets(
    loss: AbstractLoss, key: PRNGKeyArray, num_samples: int, outputs: Array
) -> Array:
    """The `num_samples` target batches a Monte-Carlo `FisherOperator` draws."""
    keys = jax.random.split(key, num_samples)
    return jax.vmap(lambda k: loss.sample(k, outputs))(keys)


def _per_example_dot(a: Array, b: Array) -> Array:
    """`<a_i, b_i>` for each example, shaped to broadcast against `a`."""
    axes = tuple(range(1, a.ndim))
    return jnp.sum(a * b, axis=axes, keepdims=True)


def _outer_products_map(residuals: Array) -> Callable[[Array], Array]:
    r"""$t \mapsto \frac{1}{NS} \sum_s r_s (r_s \cdot t)$ per example.

    `residuals` are the per-example output gradients $r_{is}$ with shape
    `[samples, batch, ...]`.
    """
    num_samples, batch = residuals.shape[:2]

    def output_map(t):
        dots = jax.vmap(_per_example_dot, in_axes=(0, None))(residuals, t)
        return jnp.sum(residuals * dots, axis=0) / (num_samples * batch)

    return output_map


def _per_example_gradients(loss: AbstractLoss, outputs: Array, targets) -> Array:
    r"""$r_i = \nabla_{o_i} \ell(o_i, y_i)$: N times the gradient of the mean loss."""
    return jax.grad(loss)(outputs, targets) * outputs.shape[0]


class _AbstractOutputSpaceOperator(AbstractCurvatureOperator):
    r"""$J^\top M J$ for a model on a batch and an output-space map $M$."""

    model: eqx.AbstractVar[PyTree]
    loss: eqx.AbstractVar[AbstractLoss]
    inputs: eqx.AbstractVar[PyTree[Array]]
    model_key: eqx.AbstractVar[PRNGKeyArray | None]

    @abc.abstractmethod
    def _output_map(self, outputs: Array) -> Callable[[Array], Array]:
        """The per-example output-space matrix $M$ at `outputs`, as a linear map."""

    def _linear_map(self) -> Callable[[PyTree[Array]], PyTree[Array]]:
        params, static = eqx.partition(self.model, eqx.is_inexact_array)

        def forward(p):
            return apply_batched(eqx.combine(p, static), self.inputs, self.model_key)

        outputs, jvp_fn = jax.linearize(forward, params)
        vjp_fn = jax.linear_transpose(jvp_fn, params)
        output_map = self._output_map(outputs)

        def product(vector):
            (out,) = vjp_fn(output_map(jvp_fn(vector)))
            return out

        return product

    def _mv(self, vector: PyTree[Array]) -> PyTree[Array]:
        return self._linear_map()(vector)

    def in_structure(self) -> PyTree[jax.ShapeDtypeStruct]:
        return structure_of(eqx.filter(self.model, eqx.is_inexact_array))

    @property
    def tags(self) -> frozenset[object]:
        # J^T M J with M positive semidefinite: known by construction.
        return frozenset([lx.symmetric_tag, lx.positive_semidefinite_tag])


@lx.linearise.register(_AbstractOutputSpaceOperator)
def _(operator):
    return linearised(operator._linear_map(), operator.in_structure(), operator.tags)


def _check_model_and_loss(model, loss, inputs, key, targets=None):
    """Trace-time checks shared by the constructors; returns the output shape."""
    if not isinstance(loss, AbstractLoss):
        raise TypeError(
            "`loss` must be an eqx_curv loss (`SoftmaxCrossEntropy()`, "
            f"`MeanSquaredError()`, `SigmoidBinaryCrossEntropy()`), not "
            f"{type(loss).__name__}: the operator needs its output-space curvature."
        )
    check_inexact_params(eqx.filter(model, eqx.is_inexact_array), name="model")
    batch = _batch_size(inputs)
    outputs = eqx.filter_eval_shape(apply_batched, model, inputs, key)
    if targets is not None:
        leading = jnp.shape(targets)[:1]
        if leading != (batch,):
            raise ValueError(
                f"`targets` must have one entry per example of `inputs` (batch size "
                f"{batch}), but have shape {jnp.shape(targets)}."
            )
        eqx.filter_eval_shape(loss, outputs, targets)
    return outputs


class GGNOperator(_AbstractOutputSpaceOperator):
    r"""The generalised Gauss-Newton matrix $G = \frac1N \sum_i J_i^\top H_i J_i$.

    $J_i$ is the Jacobian of the model's outputs on example $i$ with respect to the
    parameters and $H_i$ the Hessian of the per-example loss with respect to those
    outputs. It is the Hessian of the mean loss with the second-derivative terms of the
    model dropped, and is positive semidefinite for the (convex) losses in eqx_curv.
    See Schraudolph, "Fast curvature matrix-vector products for second-order gradient
    descent", Neural Computation 14(7), 2002.

    **Arguments:**

    - `model`: an Equinox module mapping ONE example to outputs; its floating-point
        arrays are the parameters.
    - `loss`: an eqx_curv loss, e.g. `SoftmaxCrossEntropy()`.
    - `inputs`: the batch, with a leading batch axis.
    - `targets`: the batch's targets (the GGN of these losses does not depend on them,
        but they are checked against the loss).
    - `key`: for models that take a `key=` (dropout); each example gets its own key,
        split from this one. `None` calls the model without a key.
    """

    model: PyTree
    loss: AbstractLoss
    inputs: PyTree[Array]
    targets: Array
    model_key: PRNGKeyArray | None

    def __init__(
        self,
        model: PyTree,
        loss: AbstractLoss,
        inputs: PyTree[ArrayLike],
        targets: ArrayLike,
        *,
        key: PRNGKeyArray | None = None,
    ):
        inputs = jax.tree.map(jnp.asarray, inputs)
        targets = jnp.asarray(targets)
        _check_model_and_loss(model, loss, inputs, key, targets)
        self.model = model
        self.loss = loss
        self.inputs = inputs
        self.targets = targets
        self.model_key = key

    def _output_map(self, outputs: Array) -> Callable[[Array], Array]:
        return lambda t: self.loss.hvp(outputs, t, targets=self.targets)


class FisherOperator(_AbstractOutputSpaceOperator):
    r"""The Fisher information of the model's predictive distribution.

    $F = \frac1N \sum_i J_i^\top \mathbb{E}_{y \sim p(y \mid o_i)}[\nabla_o \ell \,
    \nabla_o \ell^\top] J_i$, where $p(y \mid o) \propto e^{-\ell(o, y)}$ is the
    distribution the loss is the negative log-likelihood of.

    With `key=None` the expectation is exact; for the losses in eqx_curv (canonical
    links) it equals the output Hessian, so the exact Fisher is the GGN. With a `key`,
    it is estimated from `num_samples` targets drawn per example from $p(y \mid o_i)$
    (Martens, "New insights and perspectives on the natural gradient method", JMLR
    21(146), 2020). The draws are fixed by the key, so the operator is one fixed
    symmetric positive semidefinite matrix, of rank at most `N * num_samples`.

    **Arguments:**

    - `model`: an Equinox module mapping ONE example to outputs.
    - `loss`: an eqx_curv loss; its `sample` draws the targets.
    - `inputs`: the batch, with a leading batch axis.
    - `key`: the key for the sampled targets; `None` for the exact Fisher.
    - `num_samples`: targets drawn per example (used only with a `key`).
    - `model_key`: for models that take a `key=` (dropout), as `key` of
        [`eqx_curv.GGNOperator`][].
    """

    model: PyTree
    loss: AbstractLoss
    inputs: PyTree[Array]
    key: PRNGKeyArray | None
    num_samples: int = eqx.field(static=True)
    model_key: PRNGKeyArray | None

    def __init__(
        self,
        model: PyTree,
        loss: AbstractLoss,
        inputs: PyTree[ArrayLike],
        *,
        key: PRNGKeyArray | None = None,
        num_samples: int = 1,
        model_key: PRNGKeyArray | None = None,
    ):
        inputs = jax.tree.map(jnp.asarray, inputs)
        _check_model_and_loss(model, loss, inputs, model_key)
        if isinstance(num_samples, bool) or not (
            isinstance(num_samples, int) and num_samples >= 1
        ):
            raise ValueError(
                f"`num_samples` must be a positive Python int, got {num_samples!r}."
            )
        self.model = model
        self.loss = loss
        self.inputs = inputs
        self.key = key
        self.num_samples = num_samples
        self.model_key = model_key

    def _output_map(self, outputs: Array) -> Callable[[Array], Array]:
        if self.key is None:
            # The exact Fisher of a canonical-link loss is its output Hessian; the
            # targets do not enter it, so the loss's own sample stands in for them.
            placeholder = jax.eval_shape(self.loss.sample, jax.random.key(0), outputs)
            targets = jnp.zeros(placeholder.shape, placeholder.dtype)
            return lambda t: self.loss.hvp(outputs, t, targets=targets)
        targets = sample_targets(self.loss, self.key, self.num_samples, outputs)
        residuals = jax.vmap(lambda y: _per_example_gradients(self.loss, outputs, y))(
            targets
        )
        return _outer_products_map(residuals)


class EmpiricalFisherOperator(_AbstractOutputSpaceOperator):
    r"""The empirical Fisher $\frac1N \sum_i g_i g_i^\top$ of per-example gradients.

    $g_i = J_i^\top \nabla_o \ell(o_i, y_i)$ is the gradient of example $i$'s loss at
    its data target. Unlike the Fisher, it is not a curvature matrix of the loss in
    general (Kunstner, Balles and Hennig, "Limitations of the empirical Fisher
    approximation for natural gradient descent", NeurIPS 2019), but it is what Adam's
    second moment estimates. Rank at most `N`.

    **Arguments:**

    - `model`: an Equinox module mapping ONE example to outputs.
    - `loss`: an eqx_curv loss.
    - `inputs`: the batch, with a leading batch axis.
    - `targets`: the data targets.
    - `key`: for models that take a `key=` (dropout), as in [`eqx_curv.GGNOperator`][].
    """

    model: PyTree
    loss: AbstractLoss
    inputs: PyTree[Array]
    targets: Array
    model_key: PRNGKeyArray | None

    def __init__(
        self,
        model: PyTree,
        loss: AbstractLoss,
        inputs: PyTree[ArrayLike],
        targets: ArrayLike,
        *,
        key: PRNGKeyArray | None = None,
    ):
        inputs = jax.tree.map(jnp.asarray, inputs)
        targets = jnp.asarray(targets)
        _check_model_and_loss(model, loss, inputs, key, targets)
        self.model = model
        self.loss = loss
        self.inputs = inputs
        self.targets = targets
        self.model_key = key

    def _output_map(self, outputs: Array) -> Callable[[Array], Array]:
        residuals = _per_example_gradients(self.loss, outputs, self.targets)
        return _outer_products_map(residuals[None])
