r"""Diagonal Newton: the Hessian replaced by its exact diagonal."""

from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import PyTree, Scalar

from .._misc import RealScalarLike, shown
from .._operators.diagonal import exact_diagonal
from .._operators.hessian import HessianOperator
from .line_search import AbstractLineSearch, StrongWolfe
from .minimiser import AbstractLineSearchMinimiser, MinimiserState


class AbstractDiagonalNewton(AbstractLineSearchMinimiser):
    """Newton with $\\operatorname{diag}(H)$; see [`eqx_curv.DiagonalNewton`][]."""

    # |h_ii| may be non-finite where the gradient is finite: keep the fall-back.
    descends: ClassVar[bool] = False

    min_curvature: eqx.AbstractVar[RealScalarLike]

    def hyperparameter_conditions(self) -> tuple:
        delta = self.min_curvature
        return (
            (
                (0 < delta) & (delta <= 1),
                f"`{type(self).__name__}` needs 0 < min_curvature <= 1 (a fraction of "
                f"the largest diagonal curvature), got {shown(delta)}.",
            ),
        )

    def init_memory(self, x, grad) -> None:
        return None

    def direction(self, value_fn, x, state: MinimiserState[PyTree, None]):
        diagonal = exact_diagonal(HessianOperator(value_fn, x))
        # |h_ii| so that negative curvature does not turn the step uphill; floored so
        # that a zero curvature (a flat coordinate) never divides.
        scale = jnp.max(jnp.abs(diagonal))
        floor = jnp.maximum(self.min_curvature * scale, jnp.finfo(x.dtype).tiny)
        curvature = jnp.maximum(jnp.abs(diagonal), floor)
        p = -state.grad / curvature
        return p, jnp.ones((), x.dtype), None, optx.RESULTS.successful

    def update_memory(self, memory, s, y, alpha, decrease) -> None:
        return None


class DiagonalNewton(AbstractDiagonalNewton):
    r"""Diagonal Newton: $x_{k+1} = x_k - \alpha_k\, \nabla f(x_k) / \tilde h$.

    $\tilde h_i = \max(|H_{ii}|, \delta \max_j |H_{jj}|)$, with $H_{ii}$ the exact
    Hessian diagonal (`eqx_curv.exact_diagonal`: one Hessian-vector product per
    coordinate, not the row sums $H\mathbf{1}$), and $\delta$ = `min_curvature`: the
    absolute value keeps the step downhill where the curvature is negative, the floor
    keeps it finite where it is zero. $\alpha_k$ is `step_size` or, with `None`, comes
    from the line search with first trial 1.

    **Arguments:**

    - `rtol`, `atol`: stop when `norm(grad) <= atol + rtol * norm(grad(y0))`.
    - `norm`: norm of the gradient for that test (default `optimistix.max_norm`).
    - `step_size`: `None` (default) for the line search, or a fixed step.
    - `min_curvature`: $\delta$, the floor relative to the largest $|H_{ii}|$
        (default 1e-3).
    - `search`: the line search (default [`eqx_curv.StrongWolfe`][]; an optimistix
        search through [`eqx_curv.OptimistixSearch`][]).
    """

    rtol: RealScalarLike
    atol: RealScalarLike
    norm: Callable[[PyTree], Scalar] = optx.max_norm
    step_size: RealScalarLike | None = None
    min_curvature: RealScalarLike = 1e-3
    search: AbstractLineSearch = StrongWolfe()
