r"""Gradient descent, with a strong-Wolfe line search or a fixed learning rate."""

from collections.abc import Callable

import equinox as eqx
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, Float, PyTree, Scalar

from .line_search import StrongWolfe
from .minimiser import (
    AbstractLineSearchMinimiser,
    check_step_size,
    check_tolerances,
    MinimiserState,
    unit_step,
)


class _StepMemory(eqx.Module):
    last_step: Float[Array, ""]  # the previous accepted step length along -g


class AbstractGradientDescent(AbstractLineSearchMinimiser):
    """Steepest descent; see [`eqx_curv.GradientDescent`][]."""

    descends = True

    def init_memory(self, value_fn, x, f, grad) -> _StepMemory:
        # A first step of unit length in x.
        return _StepMemory(unit_step(jnp.dot(grad, grad)))

    def direction(self, value_fn, x, state: MinimiserState):
        # Steepest descent directions have no natural scale: start each search from
        # twice the last accepted step.
        return -state.grad, 2 * state.memory.last_step

    def update_memory(
        self, memory: _StepMemory, s, y, x_new, f, grad, alpha
    ) -> _StepMemory:
        old_grad = grad - y
        tiny = jnp.finfo(s.dtype).tiny
        step = jnp.sqrt(jnp.dot(s, s) / jnp.maximum(jnp.dot(old_grad, old_grad), tiny))
        usable = jnp.isfinite(step) & (step > 0)
        return _StepMemory(jnp.where(usable, step, memory.last_step))


class GradientDescent(AbstractGradientDescent):
    r"""Gradient descent: $x_{k+1} = x_k - \alpha_k \nabla f(x_k)$.

    $\alpha_k$ is the fixed `step_size` (the learning rate; 0.1 on the reference page)
    or, with `step_size=None`, comes from the strong-Wolfe line search, whose first
    trial is twice the previous accepted step.

    **Arguments:**

    - `rtol`, `atol`: stop when `norm(grad) <= atol + rtol * norm(grad(y0))`.
    - `norm`: norm of the gradient for that test (default `optimistix.max_norm`).
    - `step_size`: the learning rate, or `None` (default) for the line search.
    - `search`: the [`eqx_curv.StrongWolfe`][] line search and its constants.
    """

    rtol: float
    atol: float
    norm: Callable[[PyTree], Scalar] = optx.max_norm
    step_size: float | None = None
    search: StrongWolfe = StrongWolfe()

    def __check_init__(self):
        check_tolerances(self.rtol, self.atol, "GradientDescent")
        check_step_size(self.step_size, "GradientDescent")
