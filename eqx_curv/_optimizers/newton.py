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

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import lineax as lx
import optimistix as optx
from jaxtyping import Array, Float, PyTree, Scalar

from .._operators.damped import DampedOperator
from .._operators.eigh import EighOperator
from .._operators.hessian import HessianOperator
from .line_search import StrongWolfe
from .minimiser import (
    AbstractLineSearchMinimiser,
    check_step_size,
    check_tolerances,
    MinimiserState,
)


class AbstractNewton(AbstractLineSearchMinimiser):
    """Newton-type direction $p = -A^{-1} \\nabla f$ for a curvature operator $A$."""

    linear_solver: eqx.AbstractVar[lx.AbstractLinearSolver]

    @abc.abstractmethod
    def curvature(self, hessian: HessianOperator) -> lx.AbstractLinearOperator:
        """The operator $A$ solved against, given the Hessian at the current point."""

    def init_memory(self, value_fn, x, f, grad) -> None:
        return None

    def direction(self, value_fn, x, state: MinimiserState):
        operator = self.curvature(HessianOperator(value_fn, x))
        solution = lx.linear_solve(
            operator, -state.grad, self.linear_solver, throw=False
        )
        return solution.value, jnp.ones((), x.dtype)

    def update_memory(self, memory, s, y, x_new, f, grad, alpha) -> None:
        return None


class Newton(AbstractNewton):
    r"""Newton's method: $x_{k+1} = x_k - \alpha_k H_k^{-1} \nabla f(x_k)$.

    $H_k$ is the exact Hessian (`eqx_curv.HessianOperator`); the solve uses
    `linear_solver` (by default LU on the materialised Hessian, for small dense
    problems; pass e.g. `lineax.CG` for large positive-definite ones). $\alpha_k$ comes
    from the strong-Wolfe line search with first trial 1; where the Newton direction is
    not a descent direction (indefinite $H_k$), the search uses $-\nabla f$ instead.
    With `step_size` the update is the plain $x_{k+1} = x_k - \text{step\_size}\,
    H_k^{-1} \nabla f$, which moves towards saddle points and maxima as readily as
    towards minima (the reference page uses 0.8).

    **Arguments:**

    - `rtol`, `atol`: stop when `norm(grad) <= atol + rtol * norm(grad(y0))`.
    - `norm`: norm of the gradient for that test (default `optimistix.max_norm`).
    - `step_size`: `None` (default) for the line search, or a fixed step.
    - `linear_solver`: the lineax solver for the Newton system.
    - `search`: the [`eqx_curv.StrongWolfe`][] line search.
    """

    rtol: float
    atol: float
    norm: Callable[[PyTree], Scalar] = optx.max_norm
    step_size: float | None = None
    linear_solver: lx.AbstractLinearSolver = lx.LU()
    search: StrongWolfe = StrongWolfe()

    def __check_init__(self):
        check_tolerances(self.rtol, self.atol, "Newton")
        check_step_size(self.step_size, "Newton")

    def curvature(self, hessian: HessianOperator) -> lx.AbstractLinearOperator:
        return hessian


class DampedNewton(AbstractNewton):
    r"""Damped (Levenberg-Marquardt) Newton: $p_k = -(H_k + \lambda I)^{-1} \nabla f$.

    The damping $\lambda \ge 0$ interpolates between Newton ($\lambda = 0$) and gradient
    descent with step $1/\lambda$ (large $\lambda$); it also makes the solve well posed
    where $H_k$ is singular. The curvature operator is
    `eqx_curv.DampedOperator(HessianOperator(...), damping)`. Step as in
    [`eqx_curv.Newton`][] (the reference page uses $\lambda = 1$, step 0.8).

    **Arguments:**

    - `rtol`, `atol`: stop when `norm(grad) <= atol + rtol * norm(grad(y0))`.
    - `damping`: $\lambda$ (default 1).
    - `norm`: norm of the gradient for that test (default `optimistix.max_norm`).
    - `step_size`: `None` (default) for the line search, or a fixed step.
    - `linear_solver`: the lineax solver for the damped system.
    - `search`: the [`eqx_curv.StrongWolfe`][] line search.
    """

    rtol: float
    atol: float
    damping: float = 1.0
    norm: Callable[[PyTree], Scalar] = optx.max_norm
    step_size: float | None = None
    linear_solver: lx.AbstractLinearSolver = lx.LU()
    search: StrongWolfe = StrongWolfe()

    def __check_init__(self):
        check_tolerances(self.rtol, self.atol, "DampedNewton")
        check_step_size(self.step_size, "DampedNewton")
        if isinstance(self.damping, float | int) and not self.damping >= 0:
            raise ValueError(
                f"`DampedNewton` needs `damping >= 0`, got {self.damping}."
            )

    def curvature(self, hessian: HessianOperator) -> lx.AbstractLinearOperator:
        return DampedOperator(hessian, self.damping)


# --------------------------------------------------------------------------------------
# Saddle-free Newton in a trust region, with a line search along the trust-region step.


class _RadiusMemory(eqx.Module):
    radius: Float[Array, ""]


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

    initial_radius: eqx.AbstractVar[float]
    max_radius: eqx.AbstractVar[float]
    regularisation: eqx.AbstractVar[float]

    def init_memory(self, value_fn, x, f, grad) -> _RadiusMemory:
        return _RadiusMemory(jnp.asarray(self.initial_radius, x.dtype))

    def direction(self, value_fn, x, state: MinimiserState):
        eigen = EighOperator(HessianOperator(value_fn, x))
        vectors = eigen.eigenvectors
        abs_values = _abs_floored(eigen.eigenvalues)
        g_eig = vectors.T @ state.grad
        if self.step_size is None:
            shift = self.regularisation * jnp.sqrt(jnp.dot(state.grad, state.grad))
            p_eig = _trust_region_step(
                abs_values, g_eig, state.memory.radius, shift.astype(x.dtype)
            )
        else:
            p_eig = -g_eig / abs_values
        return vectors @ p_eig, jnp.ones((), x.dtype)

    def update_memory(self, memory: _RadiusMemory, s, y, x_new, f, grad, alpha):
        # The line search judges the trust-region step: a full step that reached the
        # boundary doubles the radius; a shortened one sets it to the length that
        # worked (Nocedal and Yuan's combination of trust region and backtracking).
        radius = memory.radius
        step = jnp.sqrt(jnp.dot(s, s))
        proposed = step / jnp.where(alpha > 0, alpha, 1)
        expand = (alpha >= 1) & (proposed >= 0.99 * radius)
        radius = jnp.where(
            expand,
            jnp.minimum(2 * radius, self.max_radius),
            jnp.where((alpha < 1) & (step > 0), step, radius),
        )
        return _RadiusMemory(radius)


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
    3. $\Delta$ doubles (up to `max_radius`) when a full step reached the boundary, and
       becomes $\alpha_k \lVert p\rVert$ when the search shortened the step.

    From the classical start of Rosenbrock in 100 dimensions this reaches the global
    minimum (trust-region Newton on $H$, like scipy's `trust-exact`, and this method
    with `regularisation=0` stop at the local minimum $f \approx 3.99$); that outcome
    depends on the path, not on a guarantee, and is asserted in the tests.

    With `step_size` there is neither trust region nor line search: $x_{k+1} = x_k -
    \text{step\_size}\,|H|^{-1} \nabla f$ (the reference page's "trust-region
    Newton", step 0.8). Dense: one eigendecomposition per iteration, for small problems.

    **Arguments:**

    - `rtol`, `atol`: stop when `norm(grad) <= atol + rtol * norm(grad(y0))`.
    - `norm`: norm of the gradient for that test (default `optimistix.max_norm`).
    - `step_size`: `None` (default) for the trust region and line search, or a fixed
        step.
    - `initial_radius`: $\Delta_0$ (default 1).
    - `max_radius`: the largest $\Delta$ (default 1000).
    - `regularisation`: $c \ge 0$ in $\mu_0 = c \lVert\nabla f\rVert_2$ (default
        0.3). It has the units of $1/x$: rescaling the variables by $s$ calls for $c/s$.
    - `search`: the [`eqx_curv.StrongWolfe`][] line search.
    """

    rtol: float
    atol: float
    norm: Callable[[PyTree], Scalar] = optx.max_norm
    step_size: float | None = None
    initial_radius: float = 1.0
    max_radius: float = 1000.0
    regularisation: float = 0.3
    search: StrongWolfe = StrongWolfe()

    def __check_init__(self):
        check_tolerances(self.rtol, self.atol, "SaddleFreeNewton")
        check_step_size(self.step_size, "SaddleFreeNewton")
        r0, rmax = self.initial_radius, self.max_radius
        if isinstance(r0, float | int) and isinstance(rmax, float | int):
            if not 0 < r0 <= rmax:
                raise ValueError(
                    "`SaddleFreeNewton` needs 0 < initial_radius <= max_radius, got "
                    f"initial_radius={r0}, max_radius={rmax}."
                )
        c = self.regularisation
        if isinstance(c, float | int) and not c >= 0:
            raise ValueError(
                f"`SaddleFreeNewton` needs `regularisation >= 0`, got {c}."
            )
