r"""What every deterministic minimiser of eqx_curv shares.

Each solver is an `optimistix.AbstractMinimiser`. One `step` is one full iteration: a
direction (or a trust-region step), the line search or fixed step along it, and the
update of the solver's memory (an inverse Hessian, L-BFGS pairs, a trust radius). The
state always holds the value and gradient at the accepted point, so the iteration count
of `optimistix.minimise` (`sol.stats["num_steps"]`) is the count of iterations that
scipy and optax report, and `sol.stats["num_fn_evals"]` counts value-and-gradient
evaluations (one in `init`).

Internally the point is the flat vector of `jax.flatten_util.ravel_pytree`, so a PyTree
`y0` works with every solver. Convergence: the solve stops when
$\lVert\nabla f\rVert \le \mathrm{atol} + \mathrm{rtol}\,\lVert\nabla f(y_0)\rVert$ in
the solver's `norm`.

Failure is reported through `sol.result`, never through the state; in every case the
point, value and gradient stay at the last good iterate:

- a fixed step that lands on a non-finite value or gradient: `RESULTS.nonfinite`;
- a direction whose linear solve failed: that solve's result (e.g. `RESULTS.singular`);
- a line search that accepts no step: `RESULTS.nonlinear_divergence`, except at the
  rounding floor (below).

The rounding floor: near a minimum whose value is large compared with what a step
changes, $f$ stops changing in its last bits, and the line search judges by the
derivative instead (see [`eqx_curv.StrongWolfe`][]); the gradient test is usually met
there. Where it cannot be (a tolerance below what the arithmetic allows), the solve
stops at the rounding floor, in either of two ways: the search accepts no step and every
trial's value was within rounding of $f(x_k)$, or `_STALL` accepted steps in a row
changed $f$ by no more than that rounding (the search's `flat`) without reaching a new
smallest gradient norm. The point is then a minimiser to the precision of $f$: the solve ends with
`RESULTS.successful`, and `sol.stats["rounding_floor"]` is `True` to say that the
gradient test was not met (optimistix's `RESULTS` has no member for this, and a code of
our own could not pass through `optimistix.minimise`).
"""

import abc
from collections.abc import Callable
from typing import Any, Generic, TYPE_CHECKING, TypeVar

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import optimistix as optx
from equinox import AbstractVar
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PyTree, Scalar

from .._misc import (
    check_hyperparameter,
    check_number_fields,
    checked_hyperparameter,
    RealScalarLike,
    shown,
    tree_all_finite,
)
from .line_search import AbstractLineSearch


# As optimistix does: type checkers see a ClassVar, which a subclass's ClassVar may
# override; at run time Equinox checks that a final class sets it.
if TYPE_CHECKING:
    from typing import ClassVar as AbstractClassVar
else:
    from equinox import AbstractClassVar


# Accepted steps in a row at the rounding floor of f (see the module docstring) after
# which the solve stops. A new smallest gradient norm, which the floor's
# derivative-judged steps keep reaching while the gradient is above its own rounding
# level, resets the count.
_STALL = 10


_Aux = TypeVar("_Aux")
_Memory = TypeVar("_Memory")


class MinimiserState(eqx.Module, Generic[_Aux, _Memory]):
    """State of a deterministic eqx_curv minimiser, at the accepted point.

    `memory` is the solver's own part (an inverse Hessian, L-BFGS pairs, a trust
    radius); `floor_watch` is `[smallest gradient norm so far, steps at the rounding
    floor of f without a new smallest one]`, one array so that it costs one kernel; a
    count of `_STALL` says that the solve ended at the rounding floor.
    """

    f: Float[Array, ""]
    grad: Float[Array, " n"]
    aux: _Aux
    memory: _Memory
    grad_norm0: Float[Array, ""]
    num_fn_evals: Int[Array, ""]
    floor_watch: Float[Array, " 2"]
    terminate: Bool[Array, ""]
    result: optx.RESULTS


def value_and_grad_flat(fn, args, unravel) -> Callable:
    """`x -> (f, grad, aux)` on the flat vector `x`, for an optimistix `fn(y, args)`."""

    def inner(x):
        (f, aux), g = jax.value_and_grad(lambda z: fn(unravel(z), args), has_aux=True)(
            x
        )
        return f, g, aux

    return inner


def scalar_fn_flat(fn, args, unravel) -> Callable:
    """`x -> f` on the flat vector `x`, for building curvature operators."""
    return lambda x: fn(unravel(x), args)[0]


def inner_products(*pairs: tuple[Array, Array]) -> Float[Array, " k"]:
    """`[a @ b for a, b in pairs]` as one reduction: one kernel instead of one each,
    which is what a small problem's iteration costs on a CPU."""
    return jnp.sum(jnp.stack([a * b for a, b in pairs]), axis=-1)


def unit_step(grad_sq: Array) -> Array:
    """$\\min(1, 1/\\lVert g\\rVert)$ from $\\lVert g\\rVert^2$: the step along $-g$ of length at
    most 1 (1 for $g = 0$)."""
    return 1 / jnp.maximum(1, jnp.sqrt(grad_sq))


def where_tree(pred, a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(lambda u, v: jnp.where(pred, u, v), a, b)


class AbstractLineSearchMinimiser(optx.AbstractMinimiser):
    r"""A direction per iteration, then a line search or a fixed step along it.

    The algorithm: at $x_k$ with gradient $g_k$, `direction` gives $p_k$ and a first
    trial $\alpha_0$; with `step_size=None`, `search` gives $\alpha_k$ along $p_k$ from
    $\alpha_0$; with a number, $\alpha_k$ is that number, exactly as written. Then $x_{k+1} = x_k + \alpha_k p_k$ and
    `update_memory` sees the accepted step $s = \alpha_k p_k$ and
    $y = g_{k+1} - g_k$.

    A direction that is not a descent direction (a Newton step on an indefinite
    Hessian) or not finite (curvature that is not finite where the gradient is) is
    replaced by $-g_k$ with first trial $\min(1, 1/\lVert g_k\rVert)$. Solvers whose
    directions are built from the gradient alone and descend wherever they are finite
    (BFGS, L-BFGS, gradient descent: `descends = True`) skip that check, which costs
    several kernels per iteration; should their direction still fail to descend, the
    search accepts no step and the solve stops with `RESULTS.nonlinear_divergence`, as
    scipy's and optimistix's BFGS do.

    Subclasses provide the fields `rtol`, `atol`, `norm`, `step_size` and `search`, the
    class variable `descends`, and the methods `init_memory`, `direction` and
    `update_memory`. Hyperparameters are validated here once for every solver: Python
    numbers at construction (a `ValueError`), traced values at run time
    (`eqx.error_if`).
    """

    # optimistix annotates these `float`; ours may also be traced arrays (checked at
    # run time), as `jax.vmap` over a tolerance needs.
    rtol: AbstractVar[RealScalarLike]  # pyright: ignore[reportIncompatibleVariableOverride]
    atol: AbstractVar[RealScalarLike]  # pyright: ignore[reportIncompatibleVariableOverride]
    norm: AbstractVar[Callable[[PyTree], Scalar]]
    step_size: AbstractVar[RealScalarLike | None]
    search: AbstractVar[AbstractLineSearch]
    # Whether `direction` is a descent direction wherever it is finite.
    descends: AbstractClassVar[bool]

    def __check_init__(self):
        check_number_fields(self)
        for ok, message in self._conditions():
            check_hyperparameter(ok, message)

    def _conditions(self) -> tuple[tuple[Any, str], ...]:
        name = type(self).__name__
        shared = tuple(
            (
                value >= 0,
                f"`{name}` needs a non-negative `{label}`, got {shown(value)}. Pass e.g. "
                f"`{name}(rtol=1e-8, atol=1e-8)`.",
            )
            for label, value in (("rtol", self.rtol), ("atol", self.atol))
        )
        if self.step_size is not None:
            shared += (
                (
                    self.step_size > 0,
                    f"`{name}` needs a positive `step_size` (or `None` for the line "
                    f"search / trust region), got {shown(self.step_size)}.",
                ),
            )
        return shared + self.hyperparameter_conditions()

    @abc.abstractmethod
    def hyperparameter_conditions(self) -> tuple[tuple[ArrayLike, str], ...]:
        """`(condition, message)` for each hyperparameter of the solver's own: checked
        at construction where concrete, at run time (`eqx.error_if`) where traced."""

    @abc.abstractmethod
    def init_memory(self, x: Float[Array, " n"], grad: Float[Array, " n"]) -> Any:
        """The solver's memory at the starting point `x` with gradient `grad`."""

    @abc.abstractmethod
    def direction(
        self, value_fn: Callable, x: Float[Array, " n"], state: MinimiserState
    ) -> tuple[Float[Array, " n"], Float[Array, ""], Any, optx.RESULTS]:
        """`(p, alpha0, memory, result)` at `x`: the search direction, the first trial
        step, the memory with anything `update_memory` will need from this direction,
        and the result of computing the direction (a linear solve's, promoted)."""

    @abc.abstractmethod
    def update_memory(
        self,
        memory: Any,
        s: Float[Array, " n"],
        y: Float[Array, " n"],
        alpha: Float[Array, ""],
        decrease: Float[Array, ""],
    ) -> Any:
        """The memory after the accepted step `s = alpha * p`, with `y` the change in
        gradient and `decrease = f(x_k) - f(x_{k+1})`."""

    def _converged(self, grad: Array, grad_norm0: Scalar) -> Bool[Array, ""]:
        return self.norm(grad) <= self.atol + self.rtol * grad_norm0

    def init(
        self,
        fn,
        y: PyTree[Array],
        args: PyTree,
        options: dict[str, Any],
        f_struct,
        aux_struct,
        tags: frozenset[object],
    ) -> MinimiserState:
        x, unravel = jax.flatten_util.ravel_pytree(y)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(
                "`y0` must be a PyTree of floating-point arrays, but flattens to dtype "
                f"{x.dtype}. Cast it, e.g. `jnp.asarray(y0, jnp.float64)`."
            )
        f, grad, aux = value_and_grad_flat(fn, args, unravel)(x)
        finite = tree_all_finite((f, grad))
        # Zeros instead of non-finite numbers, so that the state never holds NaN.
        f = jnp.where(finite, f, 0)
        grad = jnp.where(finite, grad, 0)
        grad_norm0 = self.norm(grad)
        # Traced hyperparameters are checked once per solve: the checks are attached
        # to `grad_norm0`, which every later convergence test reads.
        for ok, message in self._conditions():
            grad_norm0 = checked_hyperparameter(grad_norm0, ok, message)
        return MinimiserState(
            f=f,
            grad=grad,
            aux=aux,
            memory=self.init_memory(x, grad),
            grad_norm0=grad_norm0,
            num_fn_evals=jnp.array(1),
            floor_watch=jnp.stack([grad_norm0, jnp.zeros_like(grad_norm0)]),
            terminate=~finite | self._converged(grad, grad_norm0),
            result=optx.RESULTS.where(
                finite, optx.RESULTS.successful, optx.RESULTS.nonfinite
            ),
        )

    def step(
        self,
        fn,
        y: PyTree[Array],
        args: PyTree,
        options: dict[str, Any],
        state: MinimiserState,
        tags: frozenset[object],
    ) -> tuple[PyTree[Array], MinimiserState, Any]:
        x, unravel = jax.flatten_util.ravel_pytree(y)
        evaluate = value_and_grad_flat(fn, args, unravel)
        p, alpha0, memory, direction_result = self.direction(
            scalar_fn_flat(fn, args, unravel), x, state
        )
        direction_ok = direction_result == optx.RESULTS.successful
        if self.step_size is None:
            if self.descends:
                slope = jnp.dot(p, state.grad)
            else:
                # The gradient is finite here, so a non-finite entry of p shows in
                # the slope.
                slope, grad_sq = inner_products(
                    (p, state.grad), (state.grad, state.grad)
                )
                usable = jnp.isfinite(slope) & (slope < 0)
                p = jnp.where(usable, p, -state.grad)
                slope = jnp.where(usable, slope, -grad_sq)
                alpha0 = jnp.where(usable, alpha0, unit_step(grad_sq))
            found = self.search(
                evaluate, x, state.f, state.grad, state.aux, p, alpha0, slope
            )
            # Where the search accepts no step it returns the incoming point (alpha =
            # 0, with its value, gradient and aux), so no selection is needed.
            alpha, f, grad, aux = found.alpha, found.f, found.grad, found.aux
            accepted, num_evals = found.accepted, found.num_evals
            flat = found.flat
            floor = ~accepted & flat
            failure = optx.RESULTS.where(
                found.result == optx.RESULTS.successful,
                optx.RESULTS.where(
                    floor, optx.RESULTS.successful, optx.RESULTS.nonlinear_divergence
                ),
                found.result,
            )
        else:
            alpha = jnp.asarray(self.step_size, x.dtype)
            f, grad, aux = evaluate(x + alpha * p)
            accepted, num_evals = tree_all_finite((f, grad, p)), jnp.array(1)
            flat = floor = jnp.array(False)
            failure = optx.RESULTS.nonfinite
            f = jnp.where(accepted, f, state.f)
            grad = jnp.where(accepted, grad, state.grad)
            aux = where_tree(accepted, aux, state.aux)
        ok = direction_ok & accepted
        failure = optx.RESULTS.where(direction_ok, failure, direction_result)
        f = jnp.where(direction_ok, f, state.f)
        grad = jnp.where(direction_ok, grad, state.grad)
        s = jnp.where(ok, alpha * p, 0)
        x_new = x + s
        memory = self.update_memory(memory, s, grad - state.grad, alpha, state.f - f)
        # The memory is kept where no step was taken.
        memory = where_tree(ok, memory, state.memory)
        aux = where_tree(direction_ok, aux, state.aux)
        grad_norm = self.norm(grad)
        best, stalled = state.floor_watch[0], state.floor_watch[1]
        record = grad_norm < best
        # A search that stopped at the floor sets the count to its end at once.
        stalled = jnp.where(
            direction_ok & floor,
            _STALL,
            jnp.where(ok & flat & ~record, stalled + 1, 0),
        )
        floor = stalled >= _STALL
        floor_watch = jnp.stack([jnp.minimum(grad_norm, best), stalled])
        new_state = MinimiserState(
            f=f,
            grad=grad,
            aux=aux,
            memory=memory,
            grad_norm0=state.grad_norm0,
            num_fn_evals=state.num_fn_evals + num_evals,
            floor_watch=floor_watch,
            # The smallest gradient norm is this one wherever the test passes (it
            # failed at every earlier step): reading it from `floor_watch` keeps the
            # norm in one kernel.
            terminate=~ok
            | floor
            | (floor_watch[0] <= self.atol + self.rtol * state.grad_norm0),
            result=optx.RESULTS.where(ok, optx.RESULTS.successful, failure),
        )
        return unravel(x_new), new_state, aux

    def terminate(
        self,
        fn,
        y: PyTree[Array],
        args: PyTree,
        options: dict[str, Any],
        state: MinimiserState,
        tags: frozenset[object],
    ) -> tuple[Bool[Array, ""], optx.RESULTS]:
        return state.terminate, state.result

    def postprocess(
        self,
        fn,
        y: PyTree[Array],
        aux: Any,
        args: PyTree,
        options: dict[str, Any],
        state: MinimiserState,
        tags: frozenset[object],
        result: optx.RESULTS,
    ) -> tuple[PyTree[Array], Any, dict[str, Any]]:
        stats = {
            "num_fn_evals": state.num_fn_evals,
            "rounding_floor": state.floor_watch[1] >= _STALL,
        }
        return y, state.aux, stats
