r"""Gradient descent, with a line search or a fixed learning rate."""

from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, Float, PyTree, Scalar

from .._misc import RealScalarLike
from .line_search import AbstractLineSearch, StrongWolfe
from .minimiser import AbstractLineSearchMinimiser, MinimiserState, unit_step


class _StepMemory(eqx.Module):
    last_step: Float[Array, ""]  # the previous accepted step along -g (alpha)


class AbstractGradientDescent(AbstractLineSearchMinimiser):
    """Steepest descent; see [`eqx_curv.GradientDescent`][]."""

    descends: ClassVar[bool] = True

    def hyperparameter_conditions(self) -> tuple:
        return ()

    def init_memory(self, x, grad) -> _StepMemory:
        # A first step of unit length in x.
        return _StepMemory(unit_step(jnp.dot(grad, grad)))

    def direction(self, value_fn, x, state: MinimiserState[PyTree, _StepMemory]):
        # Steepest descent directions have no natural scale: start each search from
        # twice the last accepted step.
        memory = state.memory
        return -state.grad, 2 * memory.last_step, memory, optx.RESULTS.successful

    def update_memory(self, memory: _StepMemory, s, y, alpha, decrease) -> _StepMemory:
        usable = jnp.isfinite(alpha) & (alpha > 0)
        return _StepMemory(jnp.where(usable, alpha, memory.last_step))


class GradientDescent(AbstractGradientDescent):
    r"""Gradient descent: $x_{k+1} = x_k - \alpha_k \nabla f(x_k)$.

    $\alpha_k$ is the fixed `step_size` (the learning rate) or, with `step_size=None`,
    comes from the line search, whose first trial is twice the previous accepted step
    (the first one of unit length in $x$).

    **Arguments:**

    - `rtol`, `atol`: stop when `norm(grad) <= atol + rtol * norm(grad(y0))`.
    - `norm`: norm of the gradient for that test (default `optimistix.max_norm`).
    - `step_size`: the learning rate, or `None` (default) for the line search.
    - `search`: the line search (default [`eqx_curv.StrongWolfe`][]; an optimistix
        search through [`eqx_curv.OptimistixSearch`][]).
    """

    rtol: RealScalarLike
    atol: RealScalarLike
    norm: Callable[[PyTree], Scalar] = optx.max_norm
    step_size: RealScalarLike | None = None
    search: AbstractLineSearch = StrongWolfe()
