"""Conjugate gradients for symmetric positive (semi)definite operators, safe in float32.

`lineax.CG` refuses a step unless `|p^T A p| > 100 * rcond * |r^T z|` with
`rcond = n * eps`. For a mean-loss curvature matrix in float32 with a million unknowns
that bound (a Rayleigh quotient above about 12) is larger than most of the operator's
eigenvalues, so the very first step turns into NaN. The solver here only stops when the
curvature along the search direction is truly non-positive or non-finite, a test that
does not grow with the dimension.
"""

from typing import Any, TypeAlias

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, ArrayLike, PyTree, Real

from .._misc import (
    check_positive_int,
    check_scalar,
    HIGHEST,
    known_values,
    structure_of,
    tree_all_finite,
)


_CGState: TypeAlias = lx.AbstractLinearOperator


def _dot(x: PyTree[Array], y: PyTree[Array]) -> Array:
    # XLA lowers a float32 vector dot to a blocked, tree-shaped reduction, whose
    # rounding error grows like log(n) rather than n, so no compensated sum is needed
    # (docs/solvers.md). HIGHEST keeps GPUs from reduced-precision passes.
    parts = [
        jnp.vdot(a, b, precision=HIGHEST)
        for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y))
    ]
    return sum(parts[1:], parts[0])


def _axpy(alpha: Array, x: PyTree[Array], y: PyTree[Array]) -> PyTree[Array]:
    """`alpha * x + y`, leafwise, keeping each leaf's dtype."""
    return jax.tree.map(lambda a, b: alpha.astype(a.dtype) * a + b, x, y)


def _sub(x: PyTree[Array], y: PyTree[Array]) -> PyTree[Array]:
    return jax.tree.map(lambda a, b: a - b, x, y)


def _same_structure(a: PyTree, b: PyTree) -> bool:
    return eqx.tree_equal(structure_of(a), structure_of(b)) is True


def _check_options(
    operator: lx.AbstractLinearOperator, vector: PyTree[Array], options: dict[str, Any]
) -> tuple[lx.AbstractLinearOperator | None, PyTree[Array] | None]:
    unknown = set(options) - {"preconditioner", "y0"}
    if unknown:
        raise ValueError(
            f"`eqx_curv.CG` got unknown options {sorted(unknown)}; it accepts only "
            "`preconditioner` (a positive definite lineax operator) and `y0` (an "
            "initial guess shaped like the right-hand side)."
        )
    preconditioner = options.get("preconditioner")
    if preconditioner is not None:
        if not isinstance(preconditioner, lx.AbstractLinearOperator):
            raise TypeError(
                "The `preconditioner` option must be a `lineax.AbstractLinearOperator` "
                f"(e.g. `lineax.DiagonalLinearOperator(1 / d)`), not "
                f"{type(preconditioner).__name__}."
            )
        structure = operator.in_structure()
        if not (
            _same_structure(preconditioner.in_structure(), structure)
            and _same_structure(preconditioner.out_structure(), structure)
        ):
            raise ValueError(
                "The `preconditioner` option must map the operator's input structure to "
                f"itself: the operator acts on {structure_of(structure)}, the "
                f"preconditioner maps {preconditioner.in_structure()} to "
                f"{preconditioner.out_structure()}. Build it on the same PyTree."
            )
        # A diagonal operator is accepted untagged: if one of its entries is not
        # positive, `r^T M r <= 0` shows it at run time and the solve reports breakdown.
        if not (
            lx.is_positive_semidefinite(preconditioner)
            or isinstance(preconditioner, lx.DiagonalLinearOperator)
        ):
            raise ValueError(
                "The `preconditioner` option must be a positive definite operator, and "
                "lineax does not report this one as positive semidefinite. If it is, "
                "wrap it: `lineax.TaggedLinearOperator(preconditioner, "
                "lineax.positive_semidefinite_tag)`."
            )
        preconditioner = lx.linearise(preconditioner)
    y0 = options.get("y0")
    if y0 is not None and not _same_structure(y0, vector):
        raise ValueError(
            "The `y0` option must have the structure, shapes and dtypes of the "
            f"right-hand side: expected {structure_of(vector)}, got {structure_of(y0)}. "
            "Build it from the right-hand side, e.g. `jax.tree.map(jnp.zeros_like, b)`."
        )
    return preconditioner, y0


class CG(lx.AbstractLinearSolver[_CGState]):
    r"""Preconditioned conjugate gradients for symmetric positive (semi)definite systems.

    Solves $Ay = b$ for a linear operator $A$ that lineax reports as positive
    semidefinite (every eqx_curv curvature operator with a PSD tag, `DampedOperator`,
    or any operator wrapped in `lineax.TaggedLinearOperator(..., positive_semidefinite_tag)`).
    It is the method of

    > Hestenes, M. R. and Stiefel, E. (1952). *Methods of conjugate gradients for
    > solving linear systems.* Journal of Research of the National Bureau of
    > Standards 49(6), 409-436.

    with three changes that matter in float32 at $10^5$-$10^7$ unknowns:

    - **Breakdown test that does not scale with $n$.** A step is refused only when the
      curvature along the search direction, $p^\top A p$, is not positive or not
      finite; the solve then stops, keeps the last iterate and reports
      `lineax.RESULTS.breakdown`. (`lineax.CG` refuses steps whose Rayleigh quotient is
      below about $100 n \varepsilon$, which for a damped mean-loss GGN at $n = 10^6$
      is most of them.)
    - **Honest stopping.** The solve stops when the 2-norm of the *true* residual
      satisfies $\|b - Ay\|_2 \le \text{atol} + \text{rtol}\,\|b\|_2$. The cheap
      recurrence $r \leftarrow r - \alpha A p$ is used between checks, but whenever it
      claims convergence the residual is recomputed as $b - Ay$, so rounding drift can
      never end a solve early. If the check fails, the recomputed residual replaces
      the recurrence and the search direction restarts from it. (Optionally, the
      same replacement every `recompute_every` steps.)
    - **Result codes.** `successful` when the criterion holds, `max_steps_reached`
      when it does not after `max_steps` steps, `breakdown` as above (also when a
      preconditioner gives $r^\top M r \le 0$), `nonfinite_input` when $b$ or `y0`
      holds NaN or infinity, or when a product with the operator (or the
      preconditioner) or the initial residual $b - Ay_0$ is not finite (e.g. a model
      with an infinite parameter behind a curvature operator). With
      `nonfinite_input` the returned solution is all NaN (with `throw=False`): it is
      never a number that could be mistaken for a solution or a zero step.

    Options, passed as `lineax.linear_solve(..., options={...})`:

    - `preconditioner`: a positive definite `lineax.AbstractLinearOperator` $M$
      approximating $A^{-1}$, on the same structure (e.g. the Jacobi preconditioner
      `lineax.DiagonalLinearOperator(1 / diag)`). Defaults to the identity.
    - `y0`: the initial guess, shaped like $b$. Defaults to zeros.

    `lineax.linear_solve(...).stats` holds `num_steps` (the number of products with
    $A$ along search directions) and `residual_norm`: the final true
    $\|b - Ay\|_2$, except when the step budget runs out while the recurrence is
    still above the tolerance; then no check could end in success, the product it
    would cost is saved, and the recurrence's residual norm is reported (so a solve
    of `max_steps` steps from `y0 = 0` costs exactly `max_steps` products). The solve works under `jax.jit` and `jax.vmap`, and `jax.grad`
    flows through `lineax.linear_solve` (lineax solves the transposed system, which for
    a symmetric operator is the same one).
    """

    rtol: Real[ArrayLike, ""]
    atol: Real[ArrayLike, ""]
    max_steps: int | None = None
    recompute_every: int | None = None

    def __check_init__(self):
        # Python numbers and concrete arrays are checked here; a traced tolerance
        # (e.g. under `jax.vmap`) is checked at run time by `compute`.
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if known_values(value) is not None:
                check_scalar(value, name, fix="; use e.g. `CG(rtol=1e-5, atol=0.0)`")
        for name, what in (
            ("max_steps", "the largest number of steps, or None for 10 n"),
            (
                "recompute_every",
                "the number of steps between recomputations of the "
                "true residual, or None",
            ),
        ):
            value = getattr(self, name)
            if value is not None:
                check_positive_int(value, name, what)
        if (
            isinstance(self.rtol, (int, float))
            and isinstance(self.atol, (int, float))
            and self.rtol == 0
            and self.atol == 0
            and self.max_steps is None
        ):
            raise ValueError(
                "With `rtol=0` and `atol=0` the solve can only stop on `max_steps`; set "
                "a tolerance or `max_steps`."
            )

    def init(self, operator: lx.AbstractLinearOperator, options: dict[str, Any]):
        del options
        if not _same_structure(operator.in_structure(), operator.out_structure()):
            raise ValueError(
                "`eqx_curv.CG` solves square systems: the operator's input structure "
                f"{operator.in_structure()} differs from its output structure "
                f"{operator.out_structure()}. Use `lineax.Normal(eqx_curv.CG(...))` for "
                "least squares."
            )
        if not lx.is_positive_semidefinite(operator):
            raise ValueError(
                "`eqx_curv.CG` needs an operator that lineax reports as positive "
                "semidefinite, and this one is not (damping does not make an operator "
                "so: `DampedOperator(HessianOperator(...), damping)` is as indefinite "
                "as the Hessian wherever its curvature is below -damping). Either use "
                "a solver for symmetric indefinite systems, `lineax.GMRES(rtol, atol)` "
                "or `lineax.BiCGStab(rtol, atol)` (matrix-free), or for small dense "
                "problems `lineax.LU()` / `lineax.AutoLinearSolver(well_posed=True)`; "
                "or solve against a positive semidefinite curvature instead, such as "
                "`eqx_curv.GGNOperator` or `eqx_curv.FisherOperator` (optionally "
                "damped), or `eqx_curv.EighOperator(H).abs()` (small). If you know the "
                "operator is positive semidefinite, wrap it in "
                "`lineax.TaggedLinearOperator(op, lineax.positive_semidefinite_tag)`."
            )
        return lx.linearise(operator)

    def compute(
        self, state: _CGState, vector: PyTree[Array], options: dict[str, Any]
    ) -> tuple[PyTree[Array], lx.RESULTS, dict[str, Any]]:
        operator = state
        preconditioner, y0 = _check_options(operator, vector, options)
        leaves = jax.tree.leaves(vector)
        for leaf in leaves:
            if not jnp.issubdtype(leaf.dtype, jnp.floating):
                raise TypeError(
                    "`eqx_curv.CG` solves real floating-point systems; the right-hand "
                    f"side has a leaf of dtype {leaf.dtype}."
                )
        size = sum(leaf.size for leaf in leaves)
        # As SciPy: in exact arithmetic n steps suffice; rounding may need more.
        max_steps = 10 * size if self.max_steps is None else self.max_steps
        dtype = jnp.result_type(*leaves)

        def precondition(r):
            return r if preconditioner is None else preconditioner.mv(r)

        def norm(r):
            return jnp.sqrt(jnp.maximum(_dot(r, r), 0))

        zero_start = y0 is None
        if zero_start:
            y0 = jax.tree.map(jnp.zeros_like, vector)
            inputs_finite = tree_all_finite(vector)
        else:
            inputs_finite = tree_all_finite(vector) & tree_all_finite(y0)
        # Tolerances known at construction were checked there; traced ones here.
        rtol = check_scalar(self.rtol, "rtol")
        atol = check_scalar(self.atol, "atol")
        tol = (atol + rtol * norm(vector)).astype(dtype)
        every = self.recompute_every

        # Two nested loops. The inner one is plain preconditioned CG on the cheap
        # recurrence r <- r - alpha A p, and stops when that recurrence claims
        # convergence (or breaks down, runs out of steps, or reaches the optional
        # `recompute_every` period). The outer one computes the true residual b - Ay,
        # stops if it meets the tolerance, and otherwise restarts the inner loop from
        # it (p = M r). So success is only declared on a true residual, rounding drift
        # of the recurrence is corrected by a restart (replacing r but keeping the old
        # p breaks the conjugacy the beta update relies on; docs/solvers.md), and the
        # inner loop has no branch in it, so XLA fuses it as tightly as a textbook CG.
        #
        # A non-finite product (an Inf or NaN parameter behind the operator, a
        # non-finite preconditioner) is not a breakdown of the method: it is flagged
        # separately and reported as `nonfinite_input`.

        def inner(y, r, rnorm, step, stop):
            z = precondition(r)
            gamma = rnorm**2 if preconditioner is None else _dot(r, z)
            bad_start = ~stop & ~(jnp.isfinite(gamma) & (gamma > 0))
            nonfinite_start = ~stop & ~jnp.isfinite(gamma)

            def cond_fun(carry):
                *_, k, step, stop, _, _ = carry
                return ~stop & (step < max_steps)

            def body_fun(carry):
                y, r, p, gamma, k, step, _, _, _ = carry
                q = operator.mv(p)
                curvature = _dot(p, q)  # p^T A p
                finite = jnp.isfinite(curvature)
                ok = finite & (curvature > 0)
                # On breakdown alpha = 0: y stays the last good iterate.
                alpha = jnp.where(ok, gamma / jnp.where(ok, curvature, 1), 0)
                y = _axpy(alpha, p, y)
                r = _axpy(-alpha, q, r)
                rnorm = norm(r)
                z = precondition(r)
                # r^T M r; without a preconditioner it is the squared norm.
                gamma_new = rnorm**2 if preconditioner is None else _dot(r, z)
                gamma_ok = jnp.isfinite(gamma_new) & (gamma_new > 0)
                claimed = rnorm <= tol
                broke = ~ok | (~claimed & ~gamma_ok)
                nonfinite = ~finite | (ok & ~jnp.isfinite(gamma_new))
                beta = jnp.where(gamma_ok, gamma_new / gamma, 0)
                p = _axpy(beta, p, z)
                stop = claimed | broke
                if every is not None:
                    stop = stop | ((k + 1) % every == 0)
                return y, r, p, gamma_new, k + 1, step + 1, stop, broke, nonfinite

            carry = (
                y,
                r,
                z,
                gamma,
                jnp.array(0),
                step,
                stop | bad_start,
                bad_start,
                nonfinite_start,
            )
            y, r, _, _, _, step, stop, broke, nonfinite = lax.while_loop(
                cond_fun, body_fun, carry
            )
            # The budget ran out with the recurrence short of the tolerance: no true
            # residual could end in success, so none is computed (one product saved);
            # the recurrence's residual norm is reported instead.
            exhausted = ~stop & (step >= max_steps)
            return y, step, broke, nonfinite, exhausted, norm(r)

        def outer_cond(carry):
            return ~carry[-1]

        def outer_body(carry):
            y, step, broke, nonfinite, _, _ = carry

            def true_residual():
                return _sub(vector, operator.mv(y))

            if zero_start:  # b - A 0 = b: save a product on the first pass
                r = lax.cond(step == 0, lambda: vector, true_residual)
            else:
                r = true_residual()
            rnorm = norm(r)
            nonfinite = nonfinite | ~jnp.isfinite(rnorm)
            stop = (
                (rnorm <= tol)
                | broke
                | nonfinite
                | (step >= max_steps)
                | ~inputs_finite
            )
            y, step, broke_now, nonfinite_now, exhausted, recurrence = inner(
                y, r, rnorm, step, stop
            )
            rnorm = jnp.where(exhausted, recurrence, rnorm)
            return (
                y,
                step,
                broke | broke_now,
                nonfinite | nonfinite_now,
                rnorm,
                stop | exhausted,
            )

        false = jnp.array(False)
        carry0 = (y0, jnp.array(0), false, false, jnp.array(jnp.inf, dtype), false)
        y, steps, broke, nonfinite, rnorm, _ = lax.while_loop(
            outer_cond, outer_body, carry0
        )
        result = lx.RESULTS.where(
            rnorm <= tol,
            lx.RESULTS.successful,
            lx.RESULTS.where(broke, lx.RESULTS.breakdown, lx.RESULTS.max_steps_reached),
        )
        nonfinite = nonfinite | ~inputs_finite
        result = lx.RESULTS.where(nonfinite, lx.RESULTS.nonfinite_input, result)
        # Never hand back a number that could pass for a solution (or a zero step).
        y = jax.tree.map(lambda leaf: jnp.where(nonfinite, jnp.nan, leaf), y)
        stats = {"num_steps": steps, "residual_norm": rnorm, "max_steps": max_steps}
        return y, result, stats

    def transpose(self, state: _CGState, options: dict[str, Any]):
        # A PSD-tagged operator is symmetric: its transpose solves the same system.
        options = dict(options)
        if options.get("preconditioner") is not None:
            options["preconditioner"] = options["preconditioner"].transpose()
        options.pop("y0", None)
        return state.transpose(), options

    def conj(self, state: _CGState, options: dict[str, Any]):
        # Real operators only.
        options = dict(options)
        options.pop("y0", None)
        return state, options

    def assume_full_rank(self):
        return True


CG.__init__.__doc__ = r"""**Arguments:**

- `rtol`: relative tolerance: stop when $\|b - Ay\|_2 \le \text{atol} +
    \text{rtol}\,\|b\|_2$ (2-norms over the whole PyTree). In float32, rtol much below
    $\varepsilon \cdot \kappa(A)$ (with $\varepsilon \approx 1.2 \times 10^{-7}$ and
    $\kappa$ the condition number) may be out of reach; the solve then says so with
    `max_steps_reached`.
- `atol`: absolute tolerance on the same residual norm.
- `max_steps`: the largest number of steps; `None` means $10n$ for $n$ unknowns (as
    SciPy). A solve that has not met the tolerance by then returns its last iterate
    with `lineax.RESULTS.max_steps_reached` (pass `throw=False` to
    `lineax.linear_solve` to receive it instead of an error).
- `recompute_every`: if an int, also every this many steps replace the recurrence's
    residual by $b - Ay$ (one extra operator product) and restart the search
    direction. `None` (the default) does so only when the recurrence claims
    convergence: each restart discards the Krylov space built so far, so a short
    period costs steps (see "Which solver" in the docs).
"""
