r"""BFGS and L-BFGS, with a strong-Wolfe line search.

Notation: $s_k = x_{k+1} - x_k$, $y_k = \nabla f(x_{k+1}) - \nabla f(x_k)$,
$\rho_k = 1 / (y_k^\top s_k)$. BFGS keeps the *inverse* Hessian approximation $B_k$ and
updates it as

$$B_{k+1} = (I - \rho_k s_k y_k^\top)\, B_k\, (I - \rho_k y_k s_k^\top)
            + \rho_k s_k s_k^\top,$$

which satisfies the secant condition $B_{k+1} y_k = s_k$ (so its inverse $H_{k+1}$
satisfies $H_{k+1} s_k = y_k$) and stays positive definite when $y_k^\top s_k > 0$. A
strong-Wolfe line search guarantees $y_k^\top s_k > 0$; should it not hold (a search that
ran out of evaluations, or rounding), the update is skipped. L-BFGS applies the same
matrix, built from the last $M$ pairs on top of $\gamma_k I$ with
$\gamma_k = s_k^\top y_k / y_k^\top y_k$, to a vector by the two-loop recursion, without
forming it. See Nocedal and Wright, *Numerical Optimization* (2nd ed., Springer 2006),
Sections 6.1 and 7.2.
"""

from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, Float, Int, PyTree, Scalar

from .._misc import RealScalarLike, shown
from .line_search import AbstractLineSearch, StrongWolfe
from .minimiser import (
    AbstractLineSearchMinimiser,
    inner_products,
    MinimiserState,
    unit_step,
    where_tree,
)


def _curvature_is_positive(ys: Array, yy: Array, ss: Array) -> Array:
    """$y^\\top s > \\varepsilon \\lVert y\\rVert \\lVert s\\rVert$: positive by a margin that
    rounding cannot fake.

    Tested as $(y^\\top s / \\varepsilon)^2 > \\lVert y\\rVert^2 \\lVert s\\rVert^2$, so that no
    square root splits the kernel ($\\varepsilon$ is a power of two: the division is
    exact). That agrees with the unsquared test except where both sides overflow or
    both underflow, where it is false and the update is skipped, which is safe.
    """
    eps = jnp.finfo(ys.dtype).eps
    return (ys > 0) & ((ys / eps) ** 2 > yy * ss)


def bfgs_inverse_update(
    inv_hessian: Float[Array, "n n"], s: Float[Array, " n"], y: Float[Array, " n"]
) -> Float[Array, "n n"]:
    r"""One BFGS update of the inverse Hessian approximation $B$ with the pair $(s, y)$.

    Returns $B$ unchanged when $y^\top s \le 0$ (the update would lose positive
    definiteness). Written as rank-two corrections, $O(n^2)$:
    $B_+ = B - \rho (s (By)^\top + (By) s^\top) + (\rho^2 y^\top B y + \rho) s s^\top$.
    """
    by = inv_hessian @ y
    ys, yy, ss, yby = inner_products((y, s), (y, y), (s, s), (y, by))
    ok = _curvature_is_positive(ys, yy, ss)
    rho = 1 / jnp.where(ok, ys, 1)
    updated = (
        inv_hessian
        - rho * (jnp.outer(s, by) + jnp.outer(by, s))
        + (rho**2 * yby + rho) * jnp.outer(s, s)
    )
    return jnp.where(ok, updated, inv_hessian)


class _BFGSMemory(eqx.Module):
    inv_hessian: Float[Array, "n n"]
    # The line search's first trial: a step of unit length on the first iteration,
    # then 1. Kept here rather than computed from the gradient at each iteration.
    alpha0: Float[Array, ""]


class AbstractBFGS(AbstractLineSearchMinimiser):
    """BFGS on the inverse Hessian; see [`eqx_curv.BFGS`][]."""

    # B stays positive definite: updates are made only with y^T s > 0.
    descends: ClassVar[bool] = True

    def hyperparameter_conditions(self) -> tuple:
        return ()

    def init_memory(self, x, grad) -> _BFGSMemory:
        # B_0 = I, unscaled (not s^T y / y^T y as in Nocedal and Wright's eq. 6.20):
        # before any curvature information a unit step along -g has no scale, so the
        # first trial is capped at unit length instead.
        return _BFGSMemory(
            jnp.eye(x.size, dtype=x.dtype), unit_step(jnp.dot(grad, grad))
        )

    def direction(self, value_fn, x, state: MinimiserState[PyTree, _BFGSMemory]):
        memory = state.memory
        p = -(memory.inv_hessian @ state.grad)
        return p, memory.alpha0, memory, optx.RESULTS.successful

    def update_memory(self, memory: _BFGSMemory, s, y, alpha, decrease) -> _BFGSMemory:
        updated = bfgs_inverse_update(memory.inv_hessian, s, y)
        return _BFGSMemory(updated, jnp.ones_like(memory.alpha0))


class BFGS(AbstractBFGS):
    r"""The BFGS quasi-Newton method, keeping the inverse Hessian approximation.

    Update rule: $x_{k+1} = x_k - \alpha_k B_k \nabla f(x_k)$ with $\alpha_k$ from a
    strong-Wolfe line search (or `step_size`), then the BFGS update of $B_k$ (module
    docstring above); $B_0 = I$, and the line search's first trial step is 1 except on
    the first iteration, where it is capped at unit length $1/\lVert\nabla f\rVert$.
    Dense $n \times n$: for small problems.

    **Arguments:**

    - `rtol`, `atol`: stop when `norm(grad) <= atol + rtol * norm(grad(y0))`.
    - `norm`: norm of the gradient for that test (default `optimistix.max_norm`).
    - `step_size`: `None` (default) for the line search, or a fixed step size (then
        $x_{k+1} = x_k - \text{step\_size}\, B_k \nabla f$ from $B_0 = I$).
    - `search`: the line search (default [`eqx_curv.StrongWolfe`][]; an optimistix
        search through [`eqx_curv.OptimistixSearch`][]).
    """

    rtol: RealScalarLike
    atol: RealScalarLike
    norm: Callable[[PyTree], Scalar] = optx.max_norm
    step_size: RealScalarLike | None = None
    search: AbstractLineSearch = StrongWolfe()


def lbfgs_two_loop(
    s_history: Float[Array, "m n"],
    y_history: Float[Array, "m n"],
    rho_history: Float[Array, " m"],
    vector: Float[Array, " n"],
) -> Float[Array, " n"]:
    r"""$B v$ for the L-BFGS inverse Hessian $B$ stored as pairs, by the two-loop recursion.

    The pairs are stored oldest first, the most recent last. Unused slots hold zeros
    ($\rho = 0$), which the recursion passes through unchanged. $B_0 = \gamma I$ with
    $\gamma = s^\top y / y^\top y$ of the newest pair ($1$ with no pairs).
    """
    # Two `fori_loop`s rather than the recursion unrolled over the M slots: the
    # unrolled form's 4M small kernels cost more than the loops on small problems
    # (measurements in docs/classical.md).
    m = s_history.shape[0]

    def backward(j, carry):
        q, alphas = carry
        i = m - 1 - j  # newest to oldest
        a = rho_history[i] * jnp.dot(s_history[i], q)
        return q - a * y_history[i], alphas.at[i].set(a)

    q, alphas = jax.lax.fori_loop(0, m, backward, (vector, jnp.zeros_like(rho_history)))
    s_new, y_new = s_history[-1], y_history[-1]
    yy = jnp.dot(y_new, y_new)
    gamma = jnp.where(rho_history[-1] > 0, jnp.dot(s_new, y_new) / yy, 1)

    def forward(i, r):  # oldest to newest
        b = rho_history[i] * jnp.dot(y_history[i], r)
        return r + (alphas[i] - b) * s_history[i]

    return jax.lax.fori_loop(0, m, forward, gamma * q)


class _LBFGSMemory(eqx.Module):
    s: Float[Array, "m n"]  # oldest first
    y: Float[Array, "m n"]
    rho: Float[Array, " m"]
    num_pairs: Int[Array, ""]


class AbstractLBFGS(AbstractLineSearchMinimiser):
    """L-BFGS by the two-loop recursion; see [`eqx_curv.LBFGS`][]."""

    # Pairs are stored only with y^T s > 0, so B is positive definite.
    descends: ClassVar[bool] = True

    memory_size: eqx.AbstractVar[int]

    def hyperparameter_conditions(self) -> tuple:
        m = self.memory_size
        return (
            (
                isinstance(m, int) and m >= 1,
                f"`{type(self).__name__}` needs `memory_size` to be a positive int, "
                f"got {shown(m)}; 5 to 20 is usual.",
            ),
        )

    def init_memory(self, x, grad) -> _LBFGSMemory:
        m = self.memory_size
        return _LBFGSMemory(
            s=jnp.zeros((m, x.size), x.dtype),
            y=jnp.zeros((m, x.size), x.dtype),
            rho=jnp.zeros((m,), x.dtype),
            num_pairs=jnp.array(0),
        )

    def direction(self, value_fn, x, state: MinimiserState[PyTree, _LBFGSMemory]):
        mem = state.memory
        p = -lbfgs_two_loop(mem.s, mem.y, mem.rho, state.grad)
        # min(1, 1/|g|): the value `unit_step` computes, written out here because
        # XLA compiles this form to a different last bit (rsqrt), and the L-BFGS path
        # is sensitive to it (see docs/classical.md).
        norm = jnp.sqrt(jnp.dot(state.grad, state.grad))
        alpha0 = jnp.where(mem.num_pairs == 0, jnp.minimum(1, 1 / norm), 1)
        return p, alpha0, mem, optx.RESULTS.successful

    def update_memory(self, memory: _LBFGSMemory, s, y, alpha, decrease):
        ys, yy, ss = inner_products((y, s), (y, y), (s, s))
        ok = _curvature_is_positive(ys, yy, ss)
        rho = 1 / jnp.where(ok, ys, 1)

        # Drop the oldest pair and append the new one (a copy of O(Mn), cheaper than
        # the dynamic indexing a ring buffer needs in `lbfgs_two_loop`).
        def push(history, new):
            return jnp.concatenate([history[1:], new[None]])

        pushed = _LBFGSMemory(
            s=push(memory.s, s),
            y=push(memory.y, y),
            rho=push(memory.rho, rho),
            num_pairs=jnp.minimum(memory.num_pairs + 1, self.memory_size),
        )
        return where_tree(ok, pushed, memory)


class LBFGS(AbstractLBFGS):
    r"""Limited-memory BFGS: the BFGS inverse Hessian of the last `memory_size` pairs.

    Update rule: $x_{k+1} = x_k - \alpha_k B_k \nabla f(x_k)$, where $B_k$ is the BFGS
    inverse Hessian built from the last $M$ pairs $(s_i, y_i)$ on top of $\gamma_k I$,
    $\gamma_k = s_{k-1}^\top y_{k-1} / y_{k-1}^\top y_{k-1}$, applied by the two-loop
    recursion in $O(Mn)$ (Nocedal and Wright, Algorithm 7.4); $\alpha_k$ from a
    strong-Wolfe line search (or `step_size`). Pairs with $y^\top s \le 0$ are not stored.

    **Arguments:**

    - `rtol`, `atol`: stop when `norm(grad) <= atol + rtol * norm(grad(y0))`.
    - `norm`: norm of the gradient for that test (default `optimistix.max_norm`).
    - `memory_size`: the number of pairs $M$ kept (default 10).
    - `step_size`: `None` (default) for the line search, or a fixed step.
    - `search`: the line search (default [`eqx_curv.StrongWolfe`][]; an optimistix
        search through [`eqx_curv.OptimistixSearch`][]).
    """

    rtol: RealScalarLike
    atol: RealScalarLike
    norm: Callable[[PyTree], Scalar] = optx.max_norm
    memory_size: int = eqx.field(static=True, default=10)
    step_size: RealScalarLike | None = None
    search: AbstractLineSearch = StrongWolfe()
