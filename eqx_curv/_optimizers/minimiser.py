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

Failure is reported through `sol.result`, never through the state: a fixed step that
lands on a non-finite value or gradient stops with `RESULTS.nonfinite`, and a line search
that finds no decrease stops with `RESULTS.nonlinear_divergence`; in both cases the point,
value and gradient stay at the last good iterate.
"""

import abc
from collections.abc import Callable
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import optimistix as optx
from equinox import AbstractVar
from jaxtyping import Array, Bool, Float, Int, PyTree, Scalar


class MinimiserState(eqx.Module):
    """State of a deterministic eqx_curv minimiser (at the accepted point)."""

    f: Float[Array, ""]
    grad: Float[Array, " n"]
    aux: Any
    memory: Any
    grad_norm0: Float[Array, ""]
    num_fn_evals: Int[Array, ""]
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


def all_finite(*xs) -> Bool[Array, ""]:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs]))


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


def check_tolerances(rtol, atol, name: str) -> None:
    for label, value in (("rtol", rtol), ("atol", atol)):
        if isinstance(value, float | int) and not value >= 0:
            raise ValueError(
                f"`{name}` needs a non-negative `{label}`, got {value}. Pass e.g. "
                f"`{name}(rtol=1e-8, atol=1e-8)`."
            )


def check_step_size(step_size, name: str) -> None:
    if isinstance(step_size, float | int) and not step_size > 0:
        raise ValueError(
            f"`{name}` needs a positive `step_size` (or `None` for the line search / "
            f"trust region), got {step_size}."
        )


class AbstractClassicalMinimiser(optx.AbstractMinimiser):
    """Shared `init`, `terminate` and `postprocess`; subclasses implement `step`.

    Subclasses supply `init_memory(value_fn, x, f, grad)`, the solver-specific part of the
    state (anything that is a PyTree of arrays).
    """

    rtol: AbstractVar[float]
    atol: AbstractVar[float]
    norm: AbstractVar[Callable[[PyTree], Scalar]]

    @abc.abstractmethod
    def init_memory(
        self, value_fn: Callable, x: Float[Array, " n"], f: Scalar, grad: Array
    ) -> PyTree:
        """The solver's memory at the starting point."""

    def converged(self, grad: Array, grad_norm0: Scalar) -> Bool[Array, ""]:
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
        finite = all_finite(f, grad)
        # Zeros instead of non-finite numbers, so that the state never holds NaN.
        f = jnp.where(finite, f, 0)
        grad = jnp.where(finite, grad, 0)
        grad_norm0 = self.norm(grad)
        memory = self.init_memory(scalar_fn_flat(fn, args, unravel), x, f, grad)
        return MinimiserState(
            f=f,
            grad=grad,
            aux=aux,
            memory=memory,
            grad_norm0=grad_norm0,
            num_fn_evals=jnp.array(1),
            terminate=~finite | self.converged(grad, grad_norm0),
            result=optx.RESULTS.where(
                finite, optx.RESULTS.successful, optx.RESULTS.nonfinite
            ),
        )

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
        return y, state.aux, {"num_fn_evals": state.num_fn_evals}

    def finish_step(
        self,
        state: MinimiserState,
        ok: Bool[Array, ""],
        failure: optx.RESULTS,
        f: Scalar,
        grad: Array,
        aux: Any,
        memory: PyTree,
        num_evals: Int[Array, ""],
    ) -> MinimiserState:
        """The next state at the point `f, grad, aux` (the old one where not `ok`).

        The memory is kept where not `ok`.
        """
        memory = where_tree(ok, memory, state.memory)
        return MinimiserState(
            f=f,
            grad=grad,
            aux=aux,
            memory=memory,
            grad_norm0=state.grad_norm0,
            num_fn_evals=state.num_fn_evals + num_evals,
            terminate=~ok | self.converged(grad, state.grad_norm0),
            result=optx.RESULTS.where(ok, optx.RESULTS.successful, failure),
        )


class AbstractLineSearchMinimiser(AbstractClassicalMinimiser):
    """A direction per iteration, then a strong-Wolfe line search or a fixed step.

    Subclasses supply `direction(value_fn, x, state) -> (p, alpha0)` (alpha0 is the
    first trial step of the line search) and `update_memory(memory, s, y, x_new, f,
    grad, alpha)` called after an accepted step $s = x_{k+1} - x_k = \alpha p$,
    $y = g_{k+1} - g_k$.

    With `step_size=None` the step comes from `search`. A direction that is not a
    descent direction (a Newton step on an indefinite Hessian) or not finite (curvature
    that is not finite where the gradient is) is replaced by $-\\nabla f$ there.
    Solvers whose directions are built from the gradient alone and descend wherever
    they are finite (BFGS, L-BFGS, gradient descent: `descends = True`) skip that check,
    which costs several kernels per iteration; should their direction still fail to
    descend, the search finds no decrease and the solve stops with
    `RESULTS.nonlinear_divergence`, as scipy's and optimistix's BFGS do. With a number, the update is
    $x_{k+1} = x_k + \\text{step\\_size}\\, p$, exactly as written, as on the
    reference page's fixed-step demonstrations.
    """

    step_size: AbstractVar[float | None]
    search: AbstractVar[Any]
    # Whether `direction` is a descent direction wherever it is finite.
    descends: ClassVar[bool] = False

    @abc.abstractmethod
    def direction(
        self, value_fn: Callable, x: Float[Array, " n"], state: MinimiserState
    ) -> tuple[Float[Array, " n"], Float[Array, ""]]:
        """A search direction at `x` and the line search's first trial step."""

    @abc.abstractmethod
    def update_memory(
        self,
        memory: PyTree,
        s: Float[Array, " n"],
        y: Float[Array, " n"],
        x_new: Float[Array, " n"],
        f: Scalar,
        grad: Array,
        alpha: Scalar,
    ) -> PyTree:
        """The memory after an accepted step `s = alpha * p`."""

    def step(
        self,
        fn,
        y: PyTree[Array],
        args: PyTree,
        options: dict[str, Any],
        state: MinimiserState,
        tags: frozenset[object],
    ):
        x, unravel = jax.flatten_util.ravel_pytree(y)
        evaluate = value_and_grad_flat(fn, args, unravel)
        p, alpha0 = self.direction(scalar_fn_flat(fn, args, unravel), x, state)
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
            # Where the search found no decrease it returns the incoming point
            # (alpha = 0, with its value, gradient and aux), so no selection is needed.
            alpha, f, grad, aux = found.alpha, found.f, found.grad, found.aux
            ok, num_evals = found.decreased, found.num_evals
            failure = optx.RESULTS.nonlinear_divergence
        else:
            alpha = jnp.asarray(self.step_size, x.dtype)
            f, grad, aux = evaluate(x + alpha * p)
            ok, num_evals = all_finite(f, grad, p), jnp.array(1)
            failure = optx.RESULTS.nonfinite
            f = jnp.where(ok, f, state.f)
            grad = jnp.where(ok, grad, state.grad)
            aux = where_tree(ok, aux, state.aux)
        s = jnp.where(ok, alpha * p, 0)
        x_new = x + s
        memory = self.update_memory(
            state.memory, s, grad - state.grad, x_new, f, grad, alpha
        )
        new_state = self.finish_step(
            state, ok, failure, f, grad, aux, memory, num_evals
        )
        return unravel(x_new), new_state, new_state.aux
