r"""Newton's method, its damped form, and the saddle-free (|H|) trust-region form.

Curvature comes from `eqx_curv.HessianOperator` (Hessian-vector products by
forward-over-reverse), solved against with `lineax`; the damped form wraps it in
`eqx_curv.DampedOperator`. `Newton` and `DampedNewton` search along their direction
with the strong-Wolfe line search (falling back to $-\nabla f$ where the Hessian is not
positive definite and the Newton direction goes uphill); `SaddleFreeNewton` takes the
trust-region step of the model with $|H|$ and searches along it.
"""

import abc
from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import lineax as lx
import optimistix as optx
from jaxtyping import Array, Float, PyTree, Scalar

from .._misc import RealScalarLike, shown
from .._operators.damped import DampedOperator
from .._operators.eigh import EighOperator
from .._operators.hessian import HessianOperator
from .line_search import AbstractLineSearch, StrongWolfe
from .minimiser import AbstractLineSearchMinimiser, MinimiserState


class AbstractNewton(AbstractLineSearchMinimiser):
    """Newton-type direction $p = -A^{-1} \\nabla f$ for a curvature operator $A$.

    A linear solve that reports failure (e.g. `lineax.LU` on a singular $A$) ends the
    solve with that result, promoted to `optimistix.RESULTS`, at the current point.
    """

    # An indefinite A gives uphill directions: keep the fall-back to -grad.
    descends: ClassVar[bool] = False

    linear_solver: eqx.AbstractVar[lx.AbstractLinearSolver]

    @abc.abstractmethod
    def curvature(self, hessian: HessianOperator) -> lx.AbstractLinearOperator:
        """The operator $A$ solved against, given the Hessian at the current point."""

    def init_memory(self, x, grad) -> None:
        return None

    def direction(self, value_fn, x, state: MinimiserState[PyTree, None]):
        operator = self.curvature(HessianOperator(value_fn, x))
        solution = lx.linear_solve(
            operator, -state.grad, self.linear_solver, throw=False
        )
        result = optx.RESULTS.promote(solution.result)
        return solution.value, jnp.ones((), x.dtype), None, result

    def update_memory(self, memory, s, y, alpha, decrease) -> None:
        return None


class Newton(AbstractNewton):
    r"""Newton's method: $x_{k+1} = x_k - \alpha_k H_k^{-1} \nabla f(x_k)$.

    $H_k$ is the exact Hessian (`eqx_curv.HessianOperator`); the solve uses
    `linear_solver` (by default LU on the materialised Hessian, for small dense
    problems; pass e.g. `lineax.CG` for large positive-definite ones). $\alpha_k$ comes
    from the line search with first trial 1; where the Newton direction is not a
    descent direction (indefinite $H_k$), the search uses $-\nabla f$ instead. With
    `step_size` the update is the plain $x_{k+1} = x_k - \text{step\_size}\,
    H_k^{-1} \nabla f$, which moves towards saddle points and maxima as readily as
    towards minima. A failed linear solve ends the solve with its result.

    **Arguments:**

    - `rtol`, `atol`: stop when `norm(grad) <= atol + rtol * norm(grad(y0))`.
    - `norm`: norm of the gradient for that test (default `optimistix.max_norm`).
    - `step_size`: `None` (default) for the line search, or a fixed step.
    - `linear_solver`: the lineax solver for the Newton system.
    - `search`: the line search (default [`eqx_curv.StrongWolfe`][]; an optimistix
        search through [`eqx_curv.OptimistixSearch`][]).
    """

    rtol: RealScalarLike
    atol: RealScalarLike
    norm: Callable[[PyTree], Scalar] = optx.max_norm
    step_size: RealScalarLike | None = None
    linear_solver: lx.AbstractLinearSolver = lx.LU()
    search: AbstractLineSearch = StrongWolfe()

    def hyperparameter_conditions(self) -> tuple:
        return ()

    def curvature(self, hessian: HessianOperator) -> lx.AbstractLinearOperator:
        return hessian


class DampedNewton(AbstractNewton):
    r"""Damped (Levenberg-Marquardt) Newton: $p_k = -(H_k + \lambda I)^{-1} \nabla f$.

    The damping $\lambda \ge 0$ interpolates between Newton ($\lambda = 0$) and gradient
    descent with step $1/\lambda$ (large $\lambda$); it also makes the solve well posed
    where $H_k$ is singular. The curvature operator is
    `eqx_curv.DampedOperator(HessianOperator(...), damping)`. Step as in
    [`eqx_curv.Newton`][].

    **Arguments:**

    - `rtol`, `atol`: stop when `norm(grad) <= atol + rtol * norm(grad(y0))`.
    - `damping`: $\lambda \ge 0$ (default 1).
    - `norm`: norm of the gradient for that test (default `optimistix.max_norm`).
    - `step_size`: `None` (default) for the line search, or a fixed step.
    - `linear_solver`: the lineax solver for the damped system.
    - `search`: the line search (default [`eqx_curv.StrongWolfe`][]; an optimistix
        search through [`eqx_curv.OptimistixSearch`][]).
    """

    rtol: RealScalarLike
    atol: RealScalarLike
    damping: RealScalarLike = 1.0
    norm: Callable[[PyTree], Scalar] = optx.max_norm
    step_size: RealScalarLike | None = None
    linear_solver: lx.AbstractLinearSolver = lx.LU()
    search: AbstractLineSearch = StrongWolfe()

    def hyperparameter_conditions(self) -> tuple:
        return (
            (
                self.damping >= 0,
                f"`DampedNewton` needs `damping >= 0`, got {shown(self.damping)}.",
            ),
        )

    def curvature(self, hessian: HessianOperator) -> lx.AbstractLinearOperator:
        return DampedOperator(hessian, self.damping)


# --------------------------------------------------------------------------------------
# Saddle-free Newton in a trust region, with a line search along the trust-region step.


class _RadiusMemory(eqx.Module):
    radius: Float[Array, ""]  # Delta
    shift_scale: Float[Array, ""]  # t in (0, 1]: the shift is t * c * |g|
    # The model along the last direction: m(alpha p) = alpha * slope
    # + alpha^2 * curvature / 2, with slope = g^T p and curvature = p^T |H| p.
    slope: Float[Array, ""]
    curvature: Float[Array, ""]


def _abs_floored(values: Array) -> Array:
    """$|\\lambda|$, floored so that no division by a zero curvature happens."""
    scale = jnp.max(jnp.abs(values))
    floor = values.size * jnp.finfo(values.dtype).eps * scale
    return jnp.maximum(
        jnp.abs(values), jnp.maximum(floor, jnp.finfo(values.dtype).tiny)
    )


def _trust_region_step(
    abs_values: Array,
    g_eig: Array,
    radius: Scalar,
    min_shift: Scalar,
    num_iterations: int = 30,
) -> Array:
    r"""Minimiser of $g^\top p + \tfrac12 p^\top (|H| + \mu_0 I) p$ over $\lVert p\rVert \le \Delta$.

    In the eigenbasis of $H$ the solution is $p_i = -g_i / (|\lambda_i| + \mu)$ with
    $\mu \ge \mu_0$ the smallest value giving $\lVert p\rVert \le \Delta$. $\mu$ solves the
    secular equation $1/\lVert p(\mu)\rVert = 1/\Delta$ by Newton's method, which
    converges monotonically from $\mu_0$ because that function is concave in $\mu$
    (Moré and Sorensen, *Computing a trust region step*, SIAM J. Sci. Stat. Comput. 4,
    1983). $|H|$ is positive definite after flooring, so there is no hard case.
    """

    def norm_and_derivative(mu):
        d = abs_values + mu
        p2 = jnp.sum(g_eig**2 / d**2)
        dp2 = -2 * jnp.sum(g_eig**2 / d**3)
        return jnp.sqrt(p2), dp2

    def newton(_, mu):
        pn, dp2 = norm_and_derivative(mu)
        # phi(mu) = 1/|p| - 1/radius; phi'(mu) = -d|p|^2/dmu / (2 |p|^3).
        phi = 1 / pn - 1 / radius
        dphi = -dp2 / (2 * pn**3)
        return jnp.maximum(mu - phi / dphi, min_shift)

    inside, _ = norm_and_derivative(min_shift)
    mu = jax.lax.fori_loop(0, num_iterations, newton, min_shift)
    mu = jnp.where(inside <= radius, min_shift, mu)
    return -g_eig / (abs_values + mu)


class AbstractSaddleFreeNewton(AbstractLineSearchMinimiser):
    """Newton with $|H|$ in a trust region; see [`eqx_curv.SaddleFreeNewton`][]."""

    # The eigendecomposition may be non-finite where the gradient is finite: keep the
    # fall-back to -grad.
    descends: ClassVar[bool] = False

    initial_radius: eqx.AbstractVar[RealScalarLike]
    max_radius: eqx.AbstractVar[RealScalarLike]
    regularisation: eqx.AbstractVar[RealScalarLike]

    def hyperparameter_conditions(self) -> tuple:
        name = type(self).__name__
        r0, rmax, c = self.initial_radius, self.max_radius, self.regularisation
        return (
            (
                (0 < r0) & (r0 <= rmax),
                f"`{name}` needs 0 < initial_radius <= max_radius, got "
                f"initial_radius={shown(r0)}, max_radius={shown(rmax)}.",
            ),
            (c >= 0, f"`{name}` needs `regularisation >= 0`, got {shown(c)}."),
        )

    def init_memory(self, x, grad) -> _RadiusMemory:
        one = jnp.ones((), x.dtype)
        # slope -1, curvature 0: a predicted decrease of 1 for the unit step.
        return _RadiusMemory(
            jnp.asarray(self.initial_radius, x.dtype), one, -one, jnp.zeros_like(one)
        )

    def direction(self, value_fn, x, state: MinimiserState[PyTree, _RadiusMemory]):
        memory = state.memory
        eigen = EighOperator(HessianOperator(value_fn, x))
        vectors = eigen.eigenvectors
        abs_values = _abs_floored(eigen.eigenvalues)
        g_eig = vectors.T @ state.grad
        if self.step_size is None:
            shift = (
                memory.shift_scale
                * self.regularisation
                * jnp.sqrt(jnp.dot(state.grad, state.grad))
            )
            p_eig = _trust_region_step(
                abs_values, g_eig, memory.radius, shift.astype(x.dtype)
            )
        else:
            p_eig = -g_eig / abs_values
        # The model g^T p + p^T |H| p / 2 (without the shift) along p, kept so that
        # the decrease at whatever step the search accepts can be predicted. Zero
        # where the curvature was not finite (the step then falls back to -g).
        slope = jnp.sum(g_eig * p_eig)
        curvature = jnp.sum(abs_values * p_eig**2)
        finite = jnp.isfinite(slope) & jnp.isfinite(curvature)
        memory = _RadiusMemory(
            memory.radius,
            memory.shift_scale,
            jnp.where(finite, slope, 0),
            jnp.where(finite, curvature, 0),
        )
        p = vectors @ p_eig
        return p, jnp.ones((), x.dtype), memory, optx.RESULTS.successful

    def update_memory(self, memory: _RadiusMemory, s, y, alpha, decrease):
        # The line search judges the trust-region step (Nocedal and Yuan's
        # combination of trust region and backtracking): a shortened step sets the
        # radius to the length that worked and restores the full shift. A full step
        # whose decrease the model predicted to 0.1% (rho = actual / predicted in
        # [0.999, 1.001]: f is quadratic on the scale of the step) divides the
        # shift by 8, since the shift guards against a model that is wrong, and,
        # where it reached the boundary, quadruples the radius; another full step
        # that reached the boundary doubles it (up to `max_radius`).
        radius, scale = memory.radius, memory.shift_scale
        step = jnp.sqrt(jnp.dot(s, s))
        full = alpha >= 1
        at_boundary = full & (step / jnp.where(full, alpha, 1) >= 0.99 * radius)
        # The decrease the model predicts for the accepted step alpha * p (the
        # search may also lengthen the step beyond the trust region's p).
        predicted = -(alpha * memory.slope + 0.5 * alpha**2 * memory.curvature)
        agrees = (
            full & (predicted > 0) & (jnp.abs(decrease - predicted) <= 1e-3 * predicted)
        )
        shortened = (alpha < 1) & (step > 0)
        growth = jnp.where(agrees, 4, 2)
        radius = jnp.where(
            at_boundary,
            jnp.minimum(growth * radius, self.max_radius),
            jnp.where(shortened, step, radius),
        )
        # A lengthened step that worked is a length the radius can take.
        radius = jnp.where(
            full & (alpha > 1),
            jnp.minimum(jnp.maximum(radius, step), self.max_radius),
            radius,
        )
        scale = jnp.where(
            agrees, scale / 8, jnp.where(shortened, jnp.ones_like(scale), scale)
        )
        return _RadiusMemory(radius, scale, memory.slope, memory.curvature)


class SaddleFreeNewton(AbstractSaddleFreeNewton):
    r"""Saddle-free Newton: Newton with $|H|$, in a trust region.

    With the eigendecomposition $H = V \Lambda V^\top$ of the exact Hessian,
    $|H| = V |\Lambda| V^\top$ (eigenvalues floored at $n \varepsilon \max|\lambda|$).
    The sign flip turns directions of negative curvature into directions of descent, so
    the method is repelled by saddle points where Newton is attracted (Dauphin et al.,
    *Identifying and attacking the saddle point problem in high-dimensional non-convex
    optimization*, NeurIPS 2014). Each iteration:

    1. the step $p$ minimises $g^\top p + \frac12 p^\top (|H| + \mu_0 I) p$ subject to
       $\lVert p\rVert \le \Delta_k$, solved exactly in the eigenbasis, so
       $p = -(|H| + \mu I)^{-1} g$ with $\mu \ge \mu_0 = c\,\lVert g\rVert$ (`c` is
       `regularisation`). The shift $\mu_0$, which vanishes at a minimum so the local
       convergence stays quadratic, keeps directions with $|\lambda| \ll \lVert
       g\rVert$ from dominating the step (the regularised Newton method of Li, Fukushima,
       Qi and Yamashita, 2004, here with $|H|$);
    2. the strong-Wolfe line search along $p$ with first trial 1 gives $x_{k+1} = x_k +
       \alpha_k p$ (Nocedal and Yuan, *Combining trust region and line search
       techniques*, 1998: a poor trial backtracks instead of being rejected);
    3. with $\rho_k$ the actual decrease over the decrease that the model $m(s) =
       g^\top s + \frac12 s^\top |H| s$ predicts for the accepted step $s =
       \alpha_k p$: where the search shortened the step, $\Delta$ becomes $\alpha_k
       \lVert p\rVert$ and the shift its full $c\lVert g\rVert$; where a step of at
       least $p$ had $|\rho_k - 1| \le 10^{-3}$ ($f$ is quadratic on the scale of the
       step, so the shift's guard is not needed) the shift is divided by 8 and
       $\Delta$ grows fourfold if the step reached it; otherwise $\Delta$ doubles
       after a full step to the boundary; a step the search lengthened ($\alpha_k >
       1$) makes $\Delta$ at least its length (all up to `max_radius`).

    From the classical start of Rosenbrock in 100 dimensions this reaches the global
    minimum (trust-region Newton on $H$, like scipy's `trust-exact`, and this method
    with `regularisation=0` stop at the local minimum $f \approx 3.99$); that outcome
    depends on the path, not on a guarantee, and is asserted in the tests.

    With `step_size` there is neither trust region nor line search: $x_{k+1} = x_k -
    \text{step\_size}\,|H|^{-1} \nabla f$. Dense: one eigendecomposition per
    iteration, for small problems.

    **Arguments:**

    - `rtol`, `atol`: stop when `norm(grad) <= atol + rtol * norm(grad(y0))`.
    - `norm`: norm of the gradient for that test (default `optimistix.max_norm`).
    - `step_size`: `None` (default) for the trust region and line search, or a fixed
        step.
    - `initial_radius`: $\Delta_0$ (default 1).
    - `max_radius`: the largest $\Delta$ (default 1000).
    - `regularisation`: $c \ge 0$ in $\mu_0 = c \lVert\nabla f\rVert_2$ (default
        0.3). It has the units of $1/x$: rescaling the variables by $s$ calls for $c/s$.
    - `search`: the line search along the trust-region step (default
        [`eqx_curv.StrongWolfe`][]; an optimistix search through
        [`eqx_curv.OptimistixSearch`][]).
    """

    rtol: RealScalarLike
    atol: RealScalarLike
    norm: Callable[[PyTree], Scalar] = optx.max_norm
    step_size: RealScalarLike | None = None
    initial_radius: RealScalarLike = 1.0
    max_radius: RealScalarLike = 1000.0
    regularisation: RealScalarLike = 0.3
    search: AbstractLineSearch = StrongWolfe()
