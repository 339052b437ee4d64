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
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, ArrayLike, PRNGKeyArray, PyTree

from .._losses import AbstractLoss
from .._misc import check_positive_int
from .._sharding.context import global_batch, local_slice
from .base import (
    AbstractCurvatureOperator,
    check_inexact_params,
    linearised,
    structure_of,
)


def batch_size(tree: PyTree[Array], name: str = "inputs") -> int:
    """The common leading-axis size of a batch's arrays; a sentence otherwise."""
    leaves = jax.tree.leaves(tree)
    if not leaves or any(jnp.ndim(x) < 1 for x in leaves):
        raise ValueError(
            f"`{name}` must be a batch: arrays with a leading batch axis (the model "
            "maps one example and is vmapped over that axis)."
        )
    sizes = {jnp.shape(x)[0] for x in leaves}
    if len(sizes) != 1:
        raise ValueError(
            f"Every array in `{name}` must have the same batch size, got "
            f"{sorted(sizes)}."
        )
    return sizes.pop()


def _is_stateful(x: Any) -> bool:
    return isinstance(x, (eqx.nn.State, eqx.nn.StateIndex))


def _batch_axis_name(model: PyTree) -> Any:
    """The named axis `eqx.nn.BatchNorm` layers of `model` reduce over, if any.

    In training mode they average over the vmapped batch by that name; in inference
    mode the name is unused, and binding it does no harm.
    """
    names = []
    for leaf in jax.tree.leaves(
        model, is_leaf=lambda x: isinstance(x, eqx.nn.BatchNorm)
    ):
        if isinstance(leaf, eqx.nn.BatchNorm) and leaf.axis_name not in names:
            names.append(leaf.axis_name)
    if len(names) == 1 and isinstance(names[0], str):
        return names[0]
    return None


def apply_batched(
    model: Callable,
    inputs: PyTree[Array],
    key: PRNGKeyArray | None,
    state: PyTree | None = None,
) -> PyTree[Array]:
    """Apply a one-example model to a batch; with a `key`, each example gets its own.

    With a `state`, the model is called as `model(x, state)` and returns `(outputs,
    new_state)`; the same state is given to every example and the new one is dropped.
    """

    def call(x, k, s):
        kwargs = {} if k is None else {"key": k}
        if state is None:
            return model(x, **kwargs)
        return model(x, s, **kwargs)[0]

    axis_name = _batch_axis_name(model)
    # The state goes in as an unbatched argument, not by closure: a stateful layer
    # that calls `state.set` then invalidates a copy, never the operator's own state.
    if key is None:
        return jax.vmap(
            lambda x, s: call(x, None, s), in_axes=(0, None), axis_name=axis_name
        )(inputs, state)
    # In a data-parallel step: the whole batch's keys, this device's share of them.
    size = batch_size(inputs)
    keys = local_slice(jax.random.split(key, global_batch(size)), size)
    return jax.vmap(call, in_axes=(0, 0, None), axis_name=axis_name)(
        inputs, keys, state
    )


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


def _outer_products_map(residuals: Array, scale: int = 1) -> Callable[[Array], Array]:
    r"""$t \mapsto \frac{c}{NS} \sum_s r_s (r_s \cdot t)$ per example.

    `residuals` are the per-example output gradients $r_{is}$ with shape
    `[samples, batch, ...]`; $c$ is `scale`.
    """
    num_samples, batch = residuals.shape[:2]

    def output_map(t):
        dots = jax.vmap(_per_example_dot, in_axes=(0, None))(residuals, t)
        return jnp.sum(residuals * dots, axis=0) * (scale / (num_samples * batch))

    return output_map


def _per_example_gradients(loss: AbstractLoss, outputs: Array, targets) -> Array:
    r"""$r_i = \nabla_{o_i} \ell(o_i, y_i)$: N times the gradient of the mean loss."""
    # The whole batch's N in a data-parallel step (the loss is its mean there).
    return jax.grad(loss)(outputs, targets) * global_batch(outputs.shape[0])


class _BatchedModel(eqx.Module):
    """A one-example model on a batch, split into the parameters and everything else.

    `params` are the floating-point arrays `filter_spec` selects (None elsewhere, as
    `eqx.filter` gives); `rest` is the rest of the model, held fixed, including any
    `eqx.nn.State` or `eqx.nn.StateIndex` inside it (running statistics are never
    parameters); `state` is the explicit state the model is called with, if any.
    """

    params: PyTree[Array]
    rest: PyTree
    inputs: PyTree[Array]
    model_key: PRNGKeyArray | None
    state: PyTree | None

    def __call__(self, params: PyTree[Array]) -> Array:
        model = eqx.combine(params, self.rest)
        return apply_batched(model, self.inputs, self.model_key, self.state)


def split_parameters(model: PyTree, filter_spec: PyTree) -> tuple[PyTree, PyTree]:
    """`(params, rest)`: the selected floating-point arrays, and the rest of `model`."""
    try:
        chosen, rest = eqx.partition(model, filter_spec)
    except (ValueError, TypeError) as error:
        raise ValueError(
            "`filter_spec` must be a bool, a callable `leaf -> bool`, or a PyTree of "
            "those that is a prefix of `model` (as for `eqx.filter`), e.g. "
            "`eqx.tree_at(lambda m: m.last, jax.tree.map(lambda _: False, model), "
            f"replace=True)`. Applying it to `model` failed: {error}"
        ) from error
    params, held = eqx.partition(
        chosen,
        lambda x: not _is_stateful(x) and eqx.is_inexact_array(x),
        is_leaf=_is_stateful,
    )
    return params, eqx.combine(rest, held)


def _application_error(model, inputs, model_key, state, error) -> str:
    """What to fix when applying `model` to the batch failed with `error`."""
    summary = f"{type(error).__name__}: {str(error).strip().splitlines()[0]}"
    if isinstance(error, NameError) and "axis" in str(error):
        return (
            f"`model` uses a named batch axis that could not be bound ({summary}). "
            "An `eqx.nn.BatchNorm` in training mode needs it: give all such layers the "
            "same `axis_name` (a string), or take the curvature in inference mode with "
            "`eqx.nn.inference_mode(model)` and the running statistics passed as `state=`."
        )
    stateful = any(
        isinstance(x, eqx.nn.StateIndex)
        for x in jax.tree.leaves(model, is_leaf=_is_stateful)
    )
    if state is None and stateful:
        return (
            f"`model` has stateful layers (`eqx.nn.StateIndex`, e.g. `eqx.nn.BatchNorm`) "
            f"and could not be applied without a state ({summary}). Pass the state "
            "from `model, state = eqx.nn.make_with_state(...)(...)` as `state=`: the "
            "model is then called as `model(x, state)` and returns `(outputs, state)`."
        )
    try:
        if state is None:
            eqx.filter_eval_shape(lambda m, x: m(x), model, inputs)
        else:
            eqx.filter_eval_shape(lambda m, x, s: m(x, s), model, inputs, state)
    except Exception:  # noqa: BLE001 - only asking whether the whole batch is one example
        one_example = False
    else:
        one_example = True
    shapes = jax.tree.map(jnp.shape, inputs)
    if one_example:
        return (
            f"`inputs` must have a leading batch axis: `model` accepts `inputs` "
            f"(shapes {shapes}) as ONE example, so the operator, which vmaps the model "
            "over the leading axis, cannot. Add the batch axis, e.g. `inputs[None]`."
        )
    return (
        f"Applying `model` to one example of `inputs` (the batch has shapes {shapes}) "
        f"failed ({summary}). `model` must map ONE example to its outputs, and "
        "`inputs` must have a leading batch axis, which the operator vmaps over."
    )


def _batched_model(
    model: PyTree,
    loss: AbstractLoss,
    inputs: PyTree[ArrayLike],
    model_key: PRNGKeyArray | None,
    state: PyTree | None,
    filter_spec: PyTree,
) -> tuple[_BatchedModel, jax.ShapeDtypeStruct]:
    """Check the constructors' arguments; returns the batched model and its outputs."""
    if not isinstance(loss, AbstractLoss):
        raise TypeError(
            "`loss` must be an eqx_curv loss (`SoftmaxCrossEntropy()`, "
            f"`MeanSquaredError()`, `SigmoidBinaryCrossEntropy()`), not "
            f"{type(loss).__name__}: the operator needs its output-space curvature."
        )
    params, rest = split_parameters(model, filter_spec)
    if not jax.tree.leaves(params):
        raise ValueError(
            "`model` has no floating-point arrays selected by `filter_spec`: there is "
            "nothing to take curvature over. Select the parameters to keep, e.g. "
            "`filter_spec=eqx.is_inexact_array` (the default)."
        )
    check_inexact_params(params, name="model")
    inputs = jax.tree.map(jnp.asarray, inputs)
    if batch_size(inputs) == 0:
        raise ValueError(
            "`inputs` is an empty batch (leading axis of size 0): the mean loss over no "
            "examples, and so its curvature, is undefined. Pass at least one example."
        )
    try:
        outputs = eqx.filter_eval_shape(apply_batched, model, inputs, model_key, state)
    except Exception as error:  # the model's own error, re-raised with what to fix
        raise ValueError(
            _application_error(model, inputs, model_key, state, error)
        ) from error
    if not isinstance(outputs, jax.ShapeDtypeStruct):
        got = type(outputs).__name__
        if state is None and isinstance(outputs, tuple) and len(outputs) == 2:
            fix = (
                " If it is a stateful model returning `(outputs, state)`, pass its state "
                "as `state=`; otherwise wrap it to return only the outputs, e.g. "
                "`lambda x: model(x)[0]` inside an `eqx.Module`."
            )
        elif state is not None:
            fix = " With `state=`, the model must return `(outputs, new_state)`."
        else:
            fix = " Wrap it to return only the outputs."
        raise ValueError(
            f"`model` must return one array of outputs per example, but returns a "
            f"{got} of {len(jax.tree.leaves(outputs))} arrays.{fix}"
        )
    if not jnp.issubdtype(outputs.dtype, jnp.floating):
        raise TypeError(
            f"`model` must return floating-point outputs, but returns {outputs.dtype}."
        )
    return _BatchedModel(params, rest, inputs, model_key, state), outputs


def _check_targets(loss, outputs, targets) -> Array:
    targets = jnp.asarray(targets)
    batch = outputs.shape[0]
    if jnp.shape(targets)[:1] != (batch,):
        raise ValueError(
            f"`targets` must have one entry per example of `inputs` (batch size "
            f"{batch}), but have shape {jnp.shape(targets)}."
        )
    # Targets closed over, not traced: the loss's checks of values known now (labels
    # out of range, probabilities that do not sum to 1) run at construction.
    eqx.filter_eval_shape(lambda o: loss(o, targets), outputs)
    return targets


class _AbstractOutputSpaceOperator(AbstractCurvatureOperator):
    r"""$J^\top M J$ for a model on a batch and an output-space map $M$."""

    batched: eqx.AbstractVar[_BatchedModel]
    loss: eqx.AbstractVar[AbstractLoss]

    @abc.abstractmethod
    def _output_map(self, outputs: Array) -> Callable[[Array], Array]:
        """The per-example output-space matrix $M$ at `outputs`, as a linear map."""

    def _linear_map(self) -> Callable[[PyTree[Array]], PyTree[Array]]:
        params = self.batched.params
        outputs, jvp_fn = jax.linearize(self.batched, params)
        vjp_fn = jax.linear_transpose(jvp_fn, params)
        output_map = self._output_map(outputs)

        def product(vector):
            (out,) = vjp_fn(output_map(jvp_fn(vector)))
            return out

        return product

    def _mv(self, vector: PyTree[Array]) -> PyTree[Array]:
        return self._linear_map()(vector)

    def in_structure(self) -> PyTree[jax.ShapeDtypeStruct]:
        return structure_of(self.batched.params)

    @property
    def tags(self) -> frozenset[object]:  # pyright: ignore[reportIncompatibleVariableOverride]  # a property may implement an `eqx.AbstractVar`
        # J^T M J with M positive semidefinite: known by construction.
        return frozenset([lx.symmetric_tag, lx.positive_semidefinite_tag])


@lx.linearise.register(_AbstractOutputSpaceOperator)
def _(operator):
    return linearised(operator._linear_map(), operator.in_structure(), operator.tags)


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
        arrays (those `filter_spec` selects) are the parameters.
    - `loss`: an eqx_curv loss, e.g. `SoftmaxCrossEntropy()`.
    - `inputs`: the batch, with a leading batch axis (at least one example).
    - `targets`: the batch's targets. Needed only where the loss's output Hessian
        depends on them (`loss.hessian_depends_on_targets`; not for the built-in
        losses); when given, they are checked against the loss.
    - `model_key`: for models that take a `key=` (dropout); each example gets its own
        key, split from this one. `None` calls the model without a key.
    - `filter_spec`: which parts of `model` are the parameters, as for `eqx.filter`:
        a callable `leaf -> bool`, or a PyTree prefix of `model` of those and bools.
        Only the floating-point arrays it selects are parameters; the rest (frozen
        layers, a fine-tuned model's backbone) is held fixed. `in_structure()` is the
        structure of those arrays, with None elsewhere, as `eqx.filter` gives.
        Default `eqx.is_inexact_array`: every floating-point array.
    - `state`: the state of a stateful model (the `eqx.nn.State` of
        `model, state = eqx.nn.make_with_state(...)(...)`, e.g. for
        `eqx.nn.BatchNorm`). The model is then called as `model(x, state)` and
        returns `(outputs, new_state)`. The curvature is at this fixed state: it is
        never differentiated and `new_state` is dropped. Pass
        `eqx.nn.inference_mode(model)` to normalise with the running statistics; in
        training mode the statistics of `inputs` are used. Running statistics are
        never parameters, even when an `eqx.nn.State` is held inside `model`.
    """

    batched: _BatchedModel
    loss: AbstractLoss
    targets: Array | None

    def __init__(
        self,
        model: PyTree,
        loss: AbstractLoss,
        inputs: PyTree[ArrayLike],
        targets: ArrayLike | None = None,
        *,
        model_key: PRNGKeyArray | None = None,
        filter_spec: PyTree = eqx.is_inexact_array,
        state: PyTree | None = None,
    ):
        batched, outputs = _batched_model(
            model, loss, inputs, model_key, state, filter_spec
        )
        if targets is not None:
            targets = _check_targets(loss, outputs, targets)
        elif loss.hessian_depends_on_targets:
            raise ValueError(
                f"`targets` are needed: the output Hessian of `{type(loss).__name__}` "
                "depends on them (`hessian_depends_on_targets` is True). Pass the "
                "batch's targets, `GGNOperator(model, loss, inputs, targets)`."
            )
        self.batched = batched
        self.loss = loss
        self.targets = targets

    def _output_map(self, outputs: Array) -> Callable[[Array], Array]:
        return lambda t: self.loss.hvp(outputs, t, targets=self.targets)


class FisherOperator(_AbstractOutputSpaceOperator):
    r"""The Fisher information of the model's predictive distribution.

    $F = \frac1N \sum_i J_i^\top T_i \, \mathbb{E}_{y \sim p(y \mid o_i)}[\nabla_o
    \ell \, \nabla_o \ell^\top] J_i$, where $p(y \mid o)$ is the model's predictive
    distribution, whose negative log-likelihood the loss is, and $T_i$ =
    `loss.num_positions(outputs)` is the number of positions (tokens) the per-example
    loss averages over (1 without tokens): a loss that is $\frac1T$ of a negative
    log-likelihood has squared gradients $T$ times smaller than its Hessian.

    With `key=None` the expectation is exact; for losses whose output Hessian does not
    depend on the targets (canonical links, as every built-in loss) it equals the
    output Hessian, so the exact Fisher is the GGN. With a `key`, it is estimated
    from `num_samples` targets drawn per example from $p(y \mid o_i)$ (Martens, "New
    insights and perspectives on the natural gradient method", JMLR 21(146), 2020).
    The draws are fixed by the key, so the operator is one fixed symmetric positive
    semidefinite matrix, of rank at most `N * num_samples`.

    **Arguments:**

    - `model`: an Equinox module mapping ONE example to outputs.
    - `loss`: an eqx_curv loss; its `sample` draws the targets.
    - `inputs`: the batch, with a leading batch axis (at least one example).
    - `key`: the operator's own randomness, the key for the sampled targets; `None`
        for the exact Fisher.
    - `num_samples`: targets drawn per example (used only with a `key`).
    - `model_key`: for models that take a `key=` (dropout), as in
        [`eqx_curv.GGNOperator`][].
    - `filter_spec`: which parts of `model` are the parameters, as in
        [`eqx_curv.GGNOperator`][].
    - `state`: the fixed state of a stateful model, as in [`eqx_curv.GGNOperator`][].
    """

    batched: _BatchedModel
    loss: AbstractLoss
    key: PRNGKeyArray | None
    num_samples: int = eqx.field(static=True)

    def __init__(
        self,
        model: PyTree,
        loss: AbstractLoss,
        inputs: PyTree[ArrayLike],
        *,
        key: PRNGKeyArray | None = None,
        num_samples: int = 1,
        model_key: PRNGKeyArray | None = None,
        filter_spec: PyTree = eqx.is_inexact_array,
        state: PyTree | None = None,
    ):
        batched, _ = _batched_model(model, loss, inputs, model_key, state, filter_spec)
        check_positive_int(num_samples, "num_samples", "targets drawn per example")
        if key is None and loss.hessian_depends_on_targets:
            raise ValueError(
                f"The exact Fisher (`key=None`) of `{type(loss).__name__}` is not its "
                "output Hessian (that depends on the targets), and eqx_curv does not "
                "compute the expectation in closed form. Pass a `key` for the "
                "Monte-Carlo Fisher, or use `GGNOperator` with the targets."
            )
        self.batched = batched
        self.loss = loss
        self.key = key
        self.num_samples = num_samples

    def _output_map(self, outputs: Array) -> Callable[[Array], Array]:
        if self.key is None:
            # The exact Fisher of a canonical-link loss is its output Hessian, which
            # does not involve the targets.
            return lambda t: self.loss.hvp(outputs, t)
        targets = sample_targets(self.loss, self.key, self.num_samples, outputs)
        residuals = jax.vmap(lambda y: _per_example_gradients(self.loss, outputs, y))(
            targets
        )
        # A per-example loss that is the mean over T positions (tokens) has
        # E[r r^T] = H / T: its T terms' gradients are independent with mean zero.
        return _outer_products_map(residuals, self.loss.num_positions(outputs))


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
    - `inputs`: the batch, with a leading batch axis (at least one example).
    - `targets`: the data targets.
    - `model_key`: for models that take a `key=` (dropout), as in
        [`eqx_curv.GGNOperator`][].
    - `filter_spec`: which parts of `model` are the parameters, as in
        [`eqx_curv.GGNOperator`][].
    - `state`: the fixed state of a stateful model, as in [`eqx_curv.GGNOperator`][].
    """

    batched: _BatchedModel
    loss: AbstractLoss
    targets: Array

    def __init__(
        self,
        model: PyTree,
        loss: AbstractLoss,
        inputs: PyTree[ArrayLike],
        targets: ArrayLike,
        *,
        model_key: PRNGKeyArray | None = None,
        filter_spec: PyTree = eqx.is_inexact_array,
        state: PyTree | None = None,
    ):
        batched, outputs = _batched_model(
            model, loss, inputs, model_key, state, filter_spec
        )
        self.batched = batched
        self.loss = loss
        self.targets = _check_targets(loss, outputs, targets)

    def _output_map(self, outputs: Array) -> Callable[[Array], Array]:
        residuals = _per_example_gradients(self.loss, outputs, self.targets)
        return _outer_products_map(residuals[None])
