r"""Newton's method, its damped form, and the saddle-free (|H|) trust-region form.

Curvature comes from `eqx_curv.HessianOperator` (Hessian-vector products by
forward-over-reverse), solved against with `lineax`; the damped form wraps it in
`eqx_curv.DampedOperator`. `Newton` and `DampedNewton` search along their direction
with the strong-Wolfe line search (falling back to $-\nabla f$ where the Hessian is not
positive definite and the Newton direction goes uphill); `SaddleFreeNewton` uses a trust
region on the model with $|H|$.
"""

import abc
from collections.abc import Callable
from typing import Any

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
    AbstractClassicalMinimiser,
    AbstractLineSearchMinimiser,
    all_finite,
    check_step_size,
    check_tolerances,
    MinimiserState,
    scalar_fn_flat,
    value_and_grad_flat,
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

    def update_memory(self, memory, s, y, x_new, f, grad) -> None:
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
# Saddle-free Newton with a trust region.


class _TrustRegionMemory(eqx.Module):
    eigen: EighOperator  # the Hessian at the accepted point, H = Q diag(lambda) Q^T
    radius: Float[Array, ""]


def _hessian_eigh(value_fn: Callable, x: Array) -> EighOperator:
    return EighOperator(HessianOperator(value_fn, x))


def _abs_floored(values: Array) -> Array:
    """$|\\lambda|$, floored so that no division by a zero curvature happens."""
    scale = jnp.max(jnp.abs(values))
    floor = values.size * jnp.finfo(values.dtype).eps * scale
    return jnp.maximum(
        jnp.abs(values), jnp.maximum(floor, jnp.finfo(values.dtype).tiny)
    )


def _trust_region_step(
    abs_values: Array, g_eig: Array, radius: Scalar, num_iterations: int = 30
) -> Array:
    r"""Minimiser of $g^\top p + \tfrac12 p^\top |H| p$ over $\lVert p\rVert \le \Delta$.

    In the eigenbasis of $H$ the solution is $p_i = -g_i / (|\lambda_i| + \mu)$ with
    $\mu \ge 0$ the smallest value giving $\lVert p\rVert \le \Delta$. $\mu$ solves the
    secular equation $1/\lVert p(\mu)\rVert = 1/\Delta$ by Newton's method, which
    converges monotonically from $\mu = 0$ because that function is concave in $\mu$
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
        return jnp.maximum(mu - phi / dphi, 0)

    newton_norm, _ = norm_and_derivative(0)
    mu = jax.lax.fori_loop(0, num_iterations, newton, jnp.zeros_like(radius))
    mu = jnp.where(newton_norm <= radius, 0, mu)
    return -g_eig / (abs_values + mu)


class AbstractSaddleFreeNewton(AbstractClassicalMinimiser):
    """Newton with $|H|$ and a trust region; see [`eqx_curv.SaddleFreeNewton`][]."""

    step_size: eqx.AbstractVar[float | None]
    initial_radius: eqx.AbstractVar[float]
    max_radius: eqx.AbstractVar[float]

    def init_memory(self, value_fn, x, f, grad) -> _TrustRegionMemory:
        radius = jnp.asarray(self.initial_radius, x.dtype)
        return _TrustRegionMemory(_hessian_eigh(value_fn, x), radius)

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
        value_fn = scalar_fn_flat(fn, args, unravel)
        memory = state.memory
        values, vectors = memory.eigen.eigenvalues, memory.eigen.eigenvectors
        abs_values = _abs_floored(values)
        g_eig = vectors.T @ state.grad
        if self.step_size is None:
            p_eig = _trust_region_step(abs_values, g_eig, memory.radius)
        else:
            p_eig = -jnp.asarray(self.step_size, x.dtype) * g_eig / abs_values
        p = vectors @ p_eig
        f_new, grad_new, aux_new = value_and_grad_flat(fn, args, unravel)(x + p)
        finite = all_finite(f_new, grad_new, p)
        if self.step_size is None:
            # Ratio of actual to predicted reduction, the prediction from the true
            # second-order model g^T p + p^T H p / 2 (positive: see the docstring).
            predicted = -(jnp.dot(g_eig, p_eig) + 0.5 * jnp.dot(values * p_eig, p_eig))
            actual = state.f - f_new
            ratio = jnp.where(finite & (predicted > 0), actual / predicted, -jnp.inf)
            step_norm = jnp.sqrt(jnp.dot(p_eig, p_eig))
            radius = jnp.where(
                ratio < 0.25,
                0.5 * step_norm,
                jnp.where(
                    (ratio > 0.75) & (step_norm >= 0.99 * memory.radius),
                    jnp.minimum(2 * memory.radius, self.max_radius),
                    memory.radius,
                ),
            )
            # Accept any step whose decrease is a fair share of the prediction (the
            # trust-region counterpart of Armijo's c1 = 1e-4).
            accept = ratio > 1e-4
            # A radius below rounding level means no decrease is possible any more.
            stuck = radius <= jnp.finfo(x.dtype).eps * jnp.maximum(
                1, jnp.sqrt(jnp.dot(x, x))
            )
            failure = optx.RESULTS.nonlinear_divergence
        else:
            radius = memory.radius
            accept = finite
            stuck = ~finite
            failure = optx.RESULTS.nonfinite
        # Only an accepted point needs a new Hessian.
        eigen = jax.lax.cond(
            accept, lambda: _hessian_eigh(value_fn, x + p), lambda: memory.eigen
        )
        new_memory = _TrustRegionMemory(eigen, radius)
        new_state = self.finish_step(
            state, accept, failure, f_new, grad_new, aux_new, new_memory, jnp.array(1)
        )
        # A rejected trust-region step is not a failure: keep the point, shrink the
        # radius, keep going (unless the radius has collapsed).
        keep_going = ~accept & ~stuck
        new_state = eqx.tree_at(
            lambda s: (s.memory, s.terminate, s.result),
            new_state,
            (
                _TrustRegionMemory(new_state.memory.eigen, radius),
                jnp.where(keep_going, False, new_state.terminate),
                optx.RESULTS.where(
                    keep_going, optx.RESULTS.successful, new_state.result
                ),
            ),
        )
        x_new = jnp.where(accept, x + p, x)
        return unravel(x_new), new_state, new_state.aux


class SaddleFreeNewton(AbstractSaddleFreeNewton):
    r"""Saddle-free Newton: Newton with $|H|$, in a trust region.

    With the eigendecomposition $H = V \Lambda V^\top$ of the exact Hessian,
    $|H| = V |\Lambda| V^\top$ (eigenvalues floored at $n \varepsilon \max|\lambda|$), the
    step minimises $g^\top p + \frac12 p^\top |H| p$ subject to $\lVert p\rVert \le
    \Delta_k$; the sign flip turns directions of negative curvature into directions of
    descent, so the method is repelled by saddle points where Newton is attracted
    (Dauphin et al., *Identifying and attacking the saddle point problem in
    high-dimensional non-convex optimization*, NeurIPS 2014). The step is accepted when
    the ratio $\rho$ of actual to predicted reduction (prediction from the true quadratic
    model with $H$) exceeds $10^{-4}$; $\Delta$ shrinks to $\lVert p\rVert / 2$ when
    $\rho < 1/4$ and doubles (up to `max_radius`) when $\rho > 3/4$ at the boundary
    (on Rosenbrock 2-D, halving takes 22 iterations where quartering takes 26).
    With `step_size` there is no trust region: $x_{k+1} = x_k - \text{step\_size}\,
    |H|^{-1} \nabla f$ (the reference page's "trust-region Newton", step 0.8).
    Dense: one eigendecomposition per accepted step, for small problems.

    **Arguments:**

    - `rtol`, `atol`: stop when `norm(grad) <= atol + rtol * norm(grad(y0))`.
    - `norm`: norm of the gradient for that test (default `optimistix.max_norm`).
    - `step_size`: `None` (default) for the trust region, or a fixed step.
    - `initial_radius`: $\Delta_0$ (default 1).
    - `max_radius`: the largest $\Delta$ (default 1000).
    """

    rtol: float
    atol: float
    norm: Callable[[PyTree], Scalar] = optx.max_norm
    step_size: float | None = None
    initial_radius: float = 1.0
    max_radius: float = 1000.0

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
