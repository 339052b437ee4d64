r"""Diagonal Newton: the Hessian replaced by its exact diagonal."""

from collections.abc import Callable

import equinox as eqx
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import PyTree, Scalar

from .._operators.diagonal import exact_diagonal
from .._operators.hessian import HessianOperator
from .line_search import StrongWolfe
from .minimiser import (
    AbstractLineSearchMinimiser,
    check_step_size,
    check_tolerances,
    MinimiserState,
)


class AbstractDiagonalNewton(AbstractLineSearchMinimiser):
    """Newton with $\\operatorname{diag}(H)$; see [`eqx_curv.DiagonalNewton`][]."""

    min_curvature: eqx.AbstractVar[float]

    def init_memory(self, value_fn, x, f, grad) -> None:
        return None

    def direction(self, value_fn, x, state: MinimiserState):
        diagonal = exact_diagonal(HessianOperator(value_fn, x))
        # |h_ii| so that negative curvature does not turn the step uphill; floored so
        # that a zero curvature (a flat coordinate) never divides.
        scale = jnp.max(jnp.abs(diagonal))
        floor = jnp.maximum(self.min_curvature * scale, jnp.finfo(x.dtype).tiny)
        curvature = jnp.maximum(jnp.abs(diagonal), floor)
        return -state.grad / curvature, jnp.ones((), x.dtype)

    def update_memory(self, memory, s, y, x_new, f, grad, alpha) -> None:
        return None


class DiagonalNewton(AbstractDiagonalNewton):
    r"""Diagonal Newton: $x_{k+1} = x_k - \alpha_k\, \nabla f(x_k) / \tilde h$.

    $\tilde h_i = \max(|H_{ii}|, \delta \max_j |H_{jj}|)$, with $H_{ii}$ the exact
    Hessian diagonal (`eqx_curv.exact_diagonal`: one Hessian-vector product per
    coordinate, not the row sums $H\mathbf{1}$ that the reference page computes), and
    $\delta$ = `min_curvature`: the absolute value keeps the step downhill where the
    curvature is negative, the floor keeps it finite where it is zero. $\alpha_k$ is
    `step_size` (0.5 on the reference page) or, with `None`, from the strong-Wolfe line
    search.

    **Arguments:**

    - `rtol`, `atol`: stop when `norm(grad) <= atol + rtol * norm(grad(y0))`.
    - `norm`: norm of the gradient for that test (default `optimistix.max_norm`).
    - `step_size`: `None` (default) for the line search, or a fixed step.
    - `min_curvature`: $\delta$, the floor relative to the largest $|H_{ii}|$
        (default 1e-3).
    - `search`: the [`eqx_curv.StrongWolfe`][] line search and its constants.
    """

    rtol: float
    atol: float
    norm: Callable[[PyTree], Scalar] = optx.max_norm
    step_size: float | None = None
    min_curvature: float = 1e-3
    search: StrongWolfe = StrongWolfe()

    def __check_init__(self):
        check_tolerances(self.rtol, self.atol, "DiagonalNewton")
        check_step_size(self.step_size, "DiagonalNewton")
        if isinstance(self.min_curvature, float | int) and not (
            0 < self.min_curvature <= 1
        ):
            raise ValueError(
                "`DiagonalNewton` needs 0 < min_curvature <= 1 (a fraction of the "
                f"largest diagonal curvature), got {self.min_curvature}."
            )
