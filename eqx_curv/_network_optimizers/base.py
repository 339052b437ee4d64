r"""What every network optimizer of eqx_curv shares: the stochastic step protocol.

```python
opt = eqx_curv.FisherAdam()
state = opt.init(model)
model, state, info = opt.step(model, state, loss, inputs, targets, key=key)
```

One step, for every optimizer:

1. the arguments are checked at trace time (a sentence naming the argument);
2. the learning rate of this step is read from the schedule at the step count;
3. the optimizer evaluates the objective (loss, gradient and whatever curvature it
    needs) at the incoming parameters, proposes an update, and may adapt it (e.g. a
    damping from the reduction ratio);
4. the non-finite guard: if the batch, the loss, the gradient, the update or the new
    state holds a NaN or an infinity, the step is skipped: the returned model and
    state are bitwise the incoming ones and `info.skipped` is `True`.

Randomness: a `key` is split once, `model_key, own_key = jax.random.split(key)`. The
model gets `model_key` (split per example, as the curvature operators do) where its
`__call__` takes a `key` keyword (dropout); the optimizer's own randomness (sampled
labels, Hutchinson probes) comes from `own_key`.
"""

import abc
import functools
import inspect
import operator
from collections.abc import Callable
from typing import Any, Generic, TYPE_CHECKING, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from equinox import AbstractVar
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree, Scalar

from .._misc import (
    check_hyperparameter,
    checked_hyperparameter,
    flat_groups,
    RealScalarLike,
    shown,
    structure_of,
    tree_all_finite,
)
from .._operators.ggn import apply_batched, batch_size
from .._sharding.context import all_over_shards


if TYPE_CHECKING:
    import optax


_Stats = TypeVar("_Stats")
_Aux = TypeVar("_Aux")

# A learning rate: a non-negative number, or a schedule `count -> learning rate` (any
# callable, e.g. an optax schedule), called with the number of steps taken so far.
LearningRate = RealScalarLike | Callable[[Int[Array, ""]], RealScalarLike]


class NetworkOptimizerState(eqx.Module, Generic[_Stats]):
    """The state of a network optimizer: a PyTree of arrays only.

    **Fields:**

    - `count`: the number of steps taken (skipped steps do not count), an int32
        scalar. The learning-rate schedule is called with it.
    - `stats`: the optimizer's own statistics (momentum buffers, moment estimates, a
        damping), a typed Module of arrays.
    """

    count: Int[Array, ""]
    stats: _Stats


class StepInfo(eqx.Module):
    """What one `step` reports.

    **Fields:**

    - `loss`: the batch loss at the incoming model, a scalar.
    - `skipped`: a boolean scalar, `True` where something was non-finite (the batch,
        the loss, the gradient, the update or the new state, every entry of them)
        and the step was skipped: the returned model and state are then the
        incoming ones, bitwise.
    - `learning_rate`: the learning rate of this step (from the schedule).
    - `update_norm`: the Euclidean norm of the parameter update applied (0 when
        skipped).
    - `stats`: what else the optimizer reports, a dict of scalars (e.g. `"damping"`).
    """

    loss: Float[Array, ""]
    skipped: Bool[Array, ""]
    learning_rate: Float[Array, ""]
    update_norm: Float[Array, ""]
    stats: dict[str, Array]


class Objective(eqx.Module):
    """A model's mean loss on one batch, as a function of its parameters.

    `params` are the floating-point arrays of the model (None elsewhere, as
    `eqx.filter` gives); `static` is the rest of the model.
    """

    static: PyTree
    loss: Callable
    inputs: PyTree[Array]
    targets: PyTree
    model_key: PRNGKeyArray | None

    def outputs(self, params: PyTree[Array]) -> Array:
        """The model's outputs on the batch (the model vmapped over examples)."""
        model = eqx.combine(params, self.static)
        return apply_batched(model, self.inputs, self.model_key)

    def value(self, params: PyTree[Array]) -> Scalar:
        """The mean loss on the batch."""
        return self.loss(self.outputs(params), self.targets)


class Proposal(eqx.Module, Generic[_Stats]):
    """What an optimizer proposes for one step, before the non-finite guard."""

    loss: Scalar
    grads: PyTree[Array]
    updates: PyTree[Array]
    stats: _Stats
    info: dict[str, Array]


def _params_of(model: PyTree, name: str = "model") -> PyTree[Array]:
    params = eqx.filter(model, eqx.is_inexact_array)
    if not jax.tree.leaves(params):
        raise ValueError(
            f"`{name}` has no floating-point arrays: there are no parameters to "
            "optimize. Pass an Equinox module whose weights are floating-point arrays "
            "(e.g. `eqx.nn.MLP(...)`); cast integer weights with `.astype(jnp.float32)`."
        )
    return params


def is_zero(value) -> bool:
    """Whether a hyperparameter is the Python number 0 (a traced one never is), so
    that, e.g., no momentum buffer is kept for `momentum=0`."""
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0
    )


def _check_batch(inputs: PyTree, targets: PyTree) -> None:
    size = batch_size(inputs, "inputs")
    if size == 0:
        raise ValueError(
            "`inputs` is an empty batch (leading axis of size 0): the mean loss over no "
            "examples is undefined. Pass at least one example."
        )
    target_size = batch_size(targets, "targets")
    if target_size != size:
        raise ValueError(
            f"`inputs` and `targets` must hold the same number of examples, but "
            f"`inputs` has batch size {size} and `targets` {target_size}. "
            "Pass one target per example (the leading axis of both is the batch)."
        )


def _takes_key(model: Callable) -> bool:
    """Whether calling `model` accepts a `key=` keyword (dropout and the like)."""
    try:
        parameters = inspect.signature(model).parameters.values()
    except (TypeError, ValueError):  # no signature to read: call it without a key
        return False
    return any(
        p.name == "key" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters
    )


def widened(tree: PyTree) -> PyTree:
    """16-bit floating-point arrays as float32; everything else as it is.

    The mixed-precision policy: a bfloat16 (or float16) model runs its forward and
    backward passes in its own dtype, while the optimizer's statistics, factors and
    roots, and its arithmetic on them, are float32; only the update is cast back.
    Linear operators are left as they are (they act in the model's dtype).
    """

    def widen(x):
        if eqx.is_inexact_array(x) and jnp.dtype(x.dtype).itemsize < 4:
            return x.astype(jnp.float32)
        return x

    return jax.tree.map(
        widen, tree, is_leaf=lambda x: isinstance(x, lx.AbstractLinearOperator)
    )


def promoted_dtype(tree: PyTree[Array]) -> Any:
    return functools.reduce(
        jnp.promote_types, [jnp.result_type(x) for x in jax.tree.leaves(tree)]
    )


def tree_norm(tree: PyTree[Array], dtype: Any) -> Array:
    """The Euclidean norm of all leaves together, in `dtype`.

    One reduction per leaf size (as `tree_all_finite`), not one per leaf."""
    leaves = [x.astype(dtype) for x in jax.tree.leaves(tree)]
    squares = [
        jnp.sum(functools.reduce(operator.add, [jnp.square(x) for x in group]))
        for group in flat_groups(leaves)
    ]
    return jnp.sqrt(sum(squares, jnp.zeros((), dtype)))


def tree_select(ok: Bool[Array, ""], new: PyTree, old: PyTree) -> PyTree:
    """`new` where `ok`, else `old` (bitwise `old` when not `ok`), leaf by leaf.

    A `where` per leaf, which XLA fuses into the computation of the new leaf where
    that leaf has no other use (the parameters' `p + u`), and otherwise runs as one
    elementwise pass. Not a `lax.cond`: its branch returning `old` returns the
    step's inputs, which XLA then copies whole (parameters and state) at every
    step. `ok` passes an optimization barrier first, so that XLA computes it once:
    fused into every select, the checks behind it made the compiled step grow with
    the square of the number of leaves."""
    ok = jax.lax.optimization_barrier(ok)
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def cast_like(value: RealScalarLike | Array, x: Array) -> Array:
    """A hyperparameter as a scalar of `x`'s dtype (no promotion of `x`)."""
    return jnp.asarray(value).astype(jnp.result_type(x))


class AbstractNetworkOptimizer(eqx.Module, Generic[_Stats, _Aux]):
    r"""A stochastic optimizer for networks: `init` and a pure, jittable `step`.

    Every network optimizer of eqx_curv is an Equinox module: its hyperparameters are
    fields (so `jax.vmap` over a learning rate works), its state a PyTree of arrays
    that survives `eqx.tree_serialise_leaves`. It constructs with no arguments, with
    defaults that train a small classification problem.

    `step` runs under the user's `eqx.filter_jit` and inside `jax.lax.scan`, and
    compiles once for same-shaped arguments. Misuse is a sentence at trace time: a
    model without floating-point parameters, `inputs` and `targets` of different
    batch sizes, a negative learning rate, a loss that is not an eqx_curv loss where
    the optimizer needs its curvature or sampler, a missing `key` where it needs
    randomness.

    A subclass gives the field `learning_rate` and implements `init_stats`,
    `check_loss`, `needs_key`, `evaluate`, `direction`, `adapt`, `uses_params`
    and `gradient_only_aux`.
    """

    learning_rate: AbstractVar[LearningRate]

    def __check_init__(self):
        lr = self.learning_rate
        if not callable(lr):
            check_hyperparameter(
                lr >= 0,
                f"`learning_rate` must be non-negative, but is {shown(lr)}. Pass a "
                "positive number, or a schedule `count -> learning rate`.",
            )

    # -- what each optimizer implements -------------------------------------------

    @abc.abstractmethod
    def init_stats(self, params: PyTree[Array]) -> _Stats:
        """The optimizer's own statistics before the first step."""

    @abc.abstractmethod
    def check_loss(self, loss: Callable) -> None:
        """Raise a sentence if the optimizer cannot work with `loss`."""

    @abc.abstractmethod
    def needs_key(self) -> bool:
        """Whether `step` needs a `key` for the optimizer's own randomness."""

    @abc.abstractmethod
    def evaluate(
        self, objective: Objective, params: PyTree[Array], key: PRNGKeyArray | None
    ) -> tuple[Scalar, PyTree[Array], _Aux]:
        """`(loss, gradient, aux)` at `params`; `aux` is the curvature information."""

    @abc.abstractmethod
    def direction(
        self,
        grads: PyTree[Array],
        aux: _Aux,
        params: PyTree[Array],
        stats: _Stats,
        count: Int[Array, ""],
        learning_rate: Array,
    ) -> tuple[PyTree[Array], _Stats, dict[str, Array]]:
        """`(updates, new_stats, info)`: the update from the gradient and `aux`."""

    @abc.abstractmethod
    def adapt(
        self, objective: Objective, params: PyTree[Array], proposal: Proposal[_Stats]
    ) -> Proposal[_Stats]:
        """Adjust a proposal with further evaluations (e.g. a damping); or return it."""

    @abc.abstractmethod
    def uses_params(self) -> bool:
        """Whether `direction` reads the parameters (e.g. decoupled weight decay)."""

    @abc.abstractmethod
    def gradient_only_aux(self, grads: PyTree[Array]) -> _Aux:
        """`aux` from the gradient alone (for `as_optax`), or a sentence saying why not."""

    # -- the protocol --------------------------------------------------------------

    def init(self, model: PyTree) -> NetworkOptimizerState[_Stats]:
        """The state before the first step.

        **Arguments:**

        - `model`: the model to train; its floating-point arrays are the parameters.

        **Returns:**

        A `NetworkOptimizerState`: a PyTree of arrays (the step count and the
        optimizer's statistics, in the dtypes of the parameters).
        """
        params = _params_of(model)
        stats = self.init_stats(widened(params))
        return NetworkOptimizerState(jnp.zeros((), jnp.int32), stats)

    def schedule(self, count: Int[Array, ""]) -> Array:
        """The learning rate at step `count` (a float, or the schedule's value)."""
        lr = self.learning_rate
        if callable(lr):
            lr = lr(count)
            if jnp.shape(lr) != ():
                raise ValueError(
                    "The `learning_rate` schedule must return a scalar, but returns "
                    f"shape {jnp.shape(lr)}."
                )
        lr = jnp.asarray(lr)
        return checked_hyperparameter(
            lr,
            lr >= 0,
            "`learning_rate` must be non-negative; the value or schedule gave a "
            "negative one.",
        )

    def step(
        self,
        model: PyTree,
        state: NetworkOptimizerState[_Stats],
        loss: Callable,
        inputs: PyTree[Array],
        targets: PyTree,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[PyTree, NetworkOptimizerState[_Stats], StepInfo]:
        r"""One optimization step on one batch.

        **Arguments:**

        - `model`: an Equinox module mapping ONE example to outputs.
        - `state`: from `init(model)` or the previous `step`.
        - `loss`: the mean loss `loss(outputs, targets) -> scalar`, e.g.
            `eqx_curv.SoftmaxCrossEntropy()`; `outputs` has a leading batch axis.
        - `inputs`, `targets`: the batch, with a leading batch axis of the same size.
        - `key`: feeds dropout (split per example for models that take `key=`) and
            the optimizer's own randomness; may be `None` where neither is needed.

        **Returns:**

        `(model, state, info)`: the updated model and state, and a `StepInfo`.
        """
        params = _params_of(model)
        static = eqx.filter(model, eqx.is_inexact_array, inverse=True)
        self._check_state(params, state)
        if not callable(loss):
            raise TypeError(
                f"`loss` must be callable as `loss(outputs, targets)`, not {loss!r}."
            )
        self.check_loss(loss)
        _check_batch(inputs, targets)
        if key is None:
            if self.needs_key():
                raise ValueError(
                    f"`key` is needed: {type(self).__name__} with these settings draws "
                    "random numbers every step. Pass `key=jax.random.key(...)`, a "
                    "fresh one each step (e.g. split from a loop key)."
                )
            model_key = own_key = None
        else:
            model_key, own_key = jax.random.split(key)
            if not _takes_key(model):
                model_key = None
        objective = Objective(static, loss, inputs, targets, model_key)
        value = eqx.filter_eval_shape(objective.value, params)
        if not (isinstance(value, jax.ShapeDtypeStruct) and value.shape == ()):
            raise ValueError(
                "`loss(outputs, targets)` must return a scalar (the mean over the "
                f"batch), but returns {value}."
            )

        count = state.count
        learning_rate = self.schedule(count)
        loss_value, grads, aux = self.evaluate(objective, params, own_key)
        # Float32 arithmetic for 16-bit models (`widened`); the update in their dtype.
        updates, stats, info = self.direction(
            widened(grads), widened(aux), widened(params), state.stats, count,
            learning_rate,
        )  # fmt: skip
        updates = jax.tree.map(lambda u, p: u.astype(p.dtype), updates, params)
        proposal = self.adapt(
            objective, params, Proposal(loss_value, grads, updates, stats, info)
        )

        # The guard: the batch, the loss, the gradient, the update and the whole new
        # state, every entry of them, in a few fused reductions (`tree_all_finite`).
        batch = eqx.filter(inputs, eqx.is_inexact_array)
        ok = (
            all_over_shards(tree_all_finite(batch))  # every device's share of it
            & jnp.isfinite(proposal.loss)
            & tree_all_finite((proposal.grads, proposal.updates, proposal.stats))
        )
        new_params = jax.tree.map(lambda p, u: p + u, params, proposal.updates)
        new_params = tree_select(ok, new_params, params)
        new_state = tree_select(
            ok, NetworkOptimizerState(count + 1, proposal.stats), state
        )
        dtype = promoted_dtype(params)
        update_norm = jnp.where(ok, tree_norm(proposal.updates, dtype), 0)
        step_info = StepInfo(
            loss=jnp.asarray(proposal.loss),
            skipped=~ok,
            learning_rate=learning_rate.astype(dtype),
            update_norm=update_norm.astype(dtype),
            stats=proposal.info,
        )
        return eqx.combine(new_params, static), new_state, step_info

    def _check_state(self, params: PyTree[Array], state: Any) -> None:
        if not isinstance(state, NetworkOptimizerState):
            raise TypeError(
                "`state` must be the state from `init(model)` or the previous `step`, "
                f"not {type(state).__name__}."
            )
        # Shapes and dtypes only (inside `shard_map` `eval_shape` also gives a vma).
        expected = structure_of(jax.eval_shape(self.init_stats, widened(params)))
        got = structure_of(state.stats)
        if jax.tree.structure(expected) != jax.tree.structure(got) or expected != got:
            raise ValueError(
                f"`state` does not match `model` and this {type(self).__name__}: its "
                "statistics have other shapes or dtypes than `init(model)` gives. "
                "Start from `state = opt.init(model)` with the same model and optimizer."
            )

    def as_optax(self) -> "optax.GradientTransformationExtraArgs":
        """This optimizer as an optax gradient transformation (gradient-only settings).

        `init(params)` takes the parameters (e.g. `eqx.filter(model,
        eqx.is_inexact_array)`); `update(grads, state, params)` returns the updates
        that `step` would apply, with the same non-finite guard (non-finite gradients
        give zero updates and the incoming state). `params` are needed where the
        update depends on them (weight decay). Optimizers that need more than the
        gradient (curvature, sampled labels, an extra loss evaluation) raise a
        sentence that says so. Needs optax.
        """
        try:
            import optax
        except ImportError as error:  # an optional dependency
            raise ImportError(
                "`as_optax` needs optax: `pip install optax` (or eqx_curv's "
                "`experiments` extra)."
            ) from error
        example = jnp.zeros(())
        self.gradient_only_aux(example)  # raises where the gradient is not enough

        def init_fn(params) -> Any:  # optax's `OptState` does not list Modules
            return NetworkOptimizerState(
                jnp.zeros((), jnp.int32), self.init_stats(params)
            )

        def update_fn(updates, state, params=None, **extra_args):
            del extra_args
            grads = updates
            if params is None:
                if self.uses_params():
                    raise ValueError(
                        f"`params` must be given to the optax update of "
                        f"{type(self).__name__} with weight decay: "
                        "`tx.update(grads, state, params)`."
                    )
                params = jax.tree.map(jnp.zeros_like, grads)
            learning_rate = self.schedule(state.count)
            aux = self.gradient_only_aux(grads)
            updates, stats, _ = self.direction(
                grads, aux, params, state.stats, state.count, learning_rate
            )
            ok = tree_all_finite((grads, updates, stats))
            updates = tree_select(ok, updates, jax.tree.map(jnp.zeros_like, updates))
            new_state = tree_select(
                ok, NetworkOptimizerState(state.count + 1, stats), state
            )
            return updates, new_state

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class AbstractGradientOptimizer(AbstractNetworkOptimizer[_Stats, None]):
    """A network optimizer that needs only the gradient: any loss, no key of its own,
    no adaptation after the step, and an optax form. Subclasses give `init_stats`,
    `uses_params` and `direction`."""

    def check_loss(self, loss: Callable) -> None:
        del loss  # any `loss(outputs, targets) -> scalar` will do

    def needs_key(self) -> bool:
        return False

    def evaluate(
        self, objective: Objective, params: PyTree[Array], key: PRNGKeyArray | None
    ) -> tuple[Scalar, PyTree[Array], None]:
        del key
        value, grads = jax.value_and_grad(objective.value)(params)
        return value, grads, None

    def adapt(
        self, objective: Objective, params: PyTree[Array], proposal: Proposal[_Stats]
    ) -> Proposal[_Stats]:
        del objective, params
        return proposal

    def gradient_only_aux(self, grads: PyTree[Array]) -> None:
        del grads
        return None
