r"""A line search satisfying the strong Wolfe conditions.

Along a descent direction $p$ from $x$ (so $\phi'(0) = \nabla f(x)^\top p < 0$), it finds
a step $\alpha > 0$ with

$$\phi(\alpha) \le \phi(0) + c_1 \alpha \phi'(0), \qquad
|\phi'(\alpha)| \le c_2 |\phi'(0)|, \qquad \phi(\alpha) = f(x + \alpha p).$$

The algorithm is the bracketing-then-zoom search of Nocedal and Wright, *Numerical
Optimization* (2nd ed., Springer 2006), Algorithms 3.5 and 3.6, with safeguarded cubic
interpolation (their eq. 3.59). Both phases are one `lax.while_loop`: an upper end of the
bracket that is not yet known is $+\infty$, and then the update rules of the two phases
coincide; only the next trial differs (extrapolate while unbracketed, interpolate after).
The loop runs only when the first trial fails either condition; the first trial itself
is checked outside it (a `lax.cond`), since Newton and quasi-Newton steps usually pass
at once. On a CPU a small problem's iteration costs what its XLA kernels cost to launch,
not what they compute, so the search is written for few kernels: the ends of the
bracket are each one array `[alpha, f, slope]`, and the result is read from the accepted
trial after the conditional rather than inside it.

A trial at which $f$ or $\nabla f$ is not finite is treated as a step that went too far:
it becomes the upper end of the bracket and the next trial bisects towards the last good
step. The search therefore never returns a non-finite point.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PyTree


class _Trial(eqx.Module):
    """A trial step, its value and slope, held as one array `[alpha, f, slope]`, so
    that choosing between two trials is one kernel rather than three."""

    values: Float[Array, " 3"]

    @property
    def alpha(self) -> Float[Array, ""]:
        return self.values[0]

    @property
    def f(self) -> Float[Array, ""]:
        return self.values[1]

    @property
    def slope(self) -> Float[Array, ""]:
        return self.values[2]


def _trial(alpha, f, slope) -> _Trial:
    return _Trial(jnp.stack([alpha, f, slope]))


class _LoopState(eqx.Module):
    lo: _Trial  # best step so far satisfying sufficient decrease (alpha = 0 at first)
    hi: _Trial  # other end of the bracket; alpha = inf until one is found
    grad_lo: Float[Array, " n"]
    aux_lo: PyTree
    alpha_next: Float[Array, ""]
    num_evals: Int[Array, ""]
    satisfied: Bool[Array, ""]
    done: Bool[Array, ""]


class LineSearchResult(eqx.Module):
    """What [`eqx_curv.StrongWolfe`][] found.

    `decreased` is true when `alpha > 0` and `f < f(x)`; `satisfied` when, in addition,
    the curvature condition holds. When `decreased` is false the point is the incoming
    one (`alpha = 0`).
    """

    alpha: Float[Array, ""]
    f: Float[Array, ""]
    grad: Float[Array, " n"]
    aux: PyTree
    num_evals: Int[Array, ""]
    decreased: Bool[Array, ""]
    satisfied: Bool[Array, ""]


def _cubic_minimiser(a: _Trial, b: _Trial) -> Float[Array, ""]:
    """Minimiser of the cubic matching value and slope at `a` and `b`, or NaN."""
    d1 = a.slope + b.slope - 3 * (a.f - b.f) / (a.alpha - b.alpha)
    disc = d1**2 - a.slope * b.slope
    d2 = jnp.sign(b.alpha - a.alpha) * jnp.sqrt(jnp.maximum(disc, 0))
    alpha = b.alpha - (b.alpha - a.alpha) * (b.slope + d2 - d1) / (
        b.slope - a.slope + 2 * d2
    )
    return jnp.where(disc >= 0, alpha, jnp.nan)


class StrongWolfe(eqx.Module):
    r"""Line search for a step satisfying the strong Wolfe conditions.

    Bracketing and zoom with safeguarded cubic interpolation (Nocedal and Wright,
    *Numerical Optimization*, 2nd ed., 2006, Algorithms 3.5 and 3.6). Non-finite trials
    shrink the step. If `max_evals` evaluations pass without meeting the curvature
    condition, the best step found with sufficient decrease is returned (flagged
    `satisfied=False`); if there is none, the step is zero (flagged `decreased=False`).
    Along a direction that is not a descent direction the step is zero after the one
    evaluation of the first trial (evaluated before the direction is judged, so that
    the common case runs no extra kernel).

    **Arguments:**

    - `c1`: sufficient-decrease constant, $0 < c_1 < c_2$.
    - `c2`: curvature constant, $c_1 < c_2 < 1$: 0.9 suits quasi-Newton and Newton
        directions, 0.1 a nonlinear conjugate-gradient one.
    - `max_evals`: most function-and-gradient evaluations per search.
    - `max_step`: largest step the bracketing phase may try.
    """

    c1: float = 1e-4
    c2: float = 0.9
    max_evals: int = 30
    max_step: float = 1e10

    def __check_init__(self):
        c1, c2 = self.c1, self.c2
        if isinstance(c1, float | int) and isinstance(c2, float | int):
            if not 0 < c1 < c2 < 1:
                raise ValueError(
                    f"`StrongWolfe` needs 0 < c1 < c2 < 1, got c1={c1}, c2={c2}. The "
                    "usual choice is c1=1e-4 with c2=0.9 (Newton, quasi-Newton)."
                )

    def __call__(
        self,
        value_and_grad,
        x: Float[Array, " n"],
        f0: Float[Array, ""],
        grad0: Float[Array, " n"],
        aux0: PyTree,
        direction: Float[Array, " n"],
        alpha0: float | Float[Array, ""],
        slope0: Float[Array, ""] | None = None,
    ) -> LineSearchResult:
        """Search along `direction` from `x`.

        **Arguments:**

        - `value_and_grad`: `x -> (f, grad, aux)` on flat vectors.
        - `x`, `f0`, `grad0`, `aux0`: the current point, its value, gradient and aux.
        - `direction`: a descent direction ($\\nabla f^\\top p < 0$).
        - `alpha0`: the first trial step.
        - `slope0`: $\\nabla f(x)^\\top p$ if the caller has it already (else computed).

        **Returns:**

        A `LineSearchResult`.
        """
        dtype = f0.dtype
        if slope0 is None:
            slope0 = jnp.dot(grad0, direction)
        c1 = jnp.asarray(self.c1, dtype)
        c2 = jnp.asarray(self.c2, dtype)
        max_step = jnp.asarray(self.max_step, dtype)
        eps = jnp.finfo(dtype).eps
        zero = jnp.zeros((), dtype)
        alpha0 = jnp.asarray(alpha0, dtype)

        # `first_trial()` and `descends()` are written as functions, computed again
        # inside each branch below rather than passed in: an operand of a conditional
        # is a buffer of its own (a kernel), a value computed in it is fused.
        def first_trial():
            return jnp.minimum(alpha0, max_step)

        def descends():
            return slope0 < 0

        def start():
            return _LoopState(
                lo=_trial(zero, f0, slope0),
                hi=_trial(
                    jnp.asarray(jnp.inf, dtype), jnp.asarray(jnp.inf, dtype), zero
                ),
                grad_lo=grad0,
                aux_lo=aux0,
                alpha_next=first_trial(),
                num_evals=jnp.array(0),
                satisfied=jnp.array(False),
                done=jnp.array(False),
            )

        def cond(s):
            return ~s.done

        def evaluate(alpha):
            f, g, aux = value_and_grad(x + alpha * direction)
            return f, g, aux, jnp.dot(g, direction)

        def body(s):
            return update(s, s.alpha_next, *evaluate(s.alpha_next))

        def judge(alpha, f, slope, f_lo):
            """(finite, too far, curvature condition met) for a trial."""
            # A non-finite entry of g makes the slope non-finite too (NaN and inf
            # propagate through the dot product, inf * 0 included), so checking the
            # slope checks g.
            finite = jnp.isfinite(f) & jnp.isfinite(slope)
            # Too far: becomes the upper end of the bracket. Along a direction that
            # does not descend every step is, and so is a step that is not positive
            # (a first trial of 0 or NaN), and so is every step if f0 is NaN: the
            # search then ends at alpha = 0, and a returned step is positive exactly
            # when it decreased f.
            too_far = (
                ~descends()
                | ~(alpha > 0)
                | ~finite
                | (f > f0 + c1 * alpha * slope0)
                | ~(f < f_lo)
            )
            return finite, too_far, jnp.abs(slope) <= -c2 * slope0

        def update(s, alpha, f, g, aux, slope):
            finite, too_far, curvature_ok = judge(alpha, f, slope, s.lo.f)
            trial = _trial(alpha, f, slope)
            accept = ~too_far & curvature_ok
            # Moving past `lo` would go uphill: the old `lo` becomes the upper end.
            flip = ~too_far & ~curvature_ok & (slope * (s.hi.alpha - s.lo.alpha) >= 0)
            new_lo_is_trial = ~too_far
            if_nonfinite = _trial(alpha, jnp.asarray(jnp.inf, dtype), zero)
            hi = _Trial(
                jnp.where(
                    too_far,
                    jnp.where(finite, trial.values, if_nonfinite.values),
                    jnp.where(flip, s.lo.values, s.hi.values),
                )
            )
            lo = _Trial(jnp.where(new_lo_is_trial, trial.values, s.lo.values))
            grad_lo = jnp.where(new_lo_is_trial, g, s.grad_lo)
            aux_lo = jax.tree.map(
                lambda a, b: jnp.where(new_lo_is_trial, a, b), aux, s.aux_lo
            )
            bracketed = jnp.isfinite(hi.alpha)
            # Next trial: interpolate inside the bracket, keeping 10% away from its
            # ends; bisect if the cubic is unusable; extrapolate while unbracketed.
            left = jnp.minimum(lo.alpha, hi.alpha)
            width = jnp.abs(hi.alpha - lo.alpha)
            cubic = _cubic_minimiser(lo, hi)
            safe_cubic = jnp.clip(cubic, left + 0.1 * width, left + 0.9 * width)
            interpolated = jnp.where(
                jnp.isfinite(cubic) & jnp.isfinite(hi.f),
                safe_cubic,
                0.5 * (lo.alpha + jnp.where(bracketed, hi.alpha, 0)),
            )
            extrapolated = jnp.minimum(2 * lo.alpha, max_step)
            alpha_next = jnp.where(bracketed, interpolated, extrapolated)
            num_evals = s.num_evals + 1
            collapsed = bracketed & (width <= eps * jnp.maximum(lo.alpha, 1))
            at_cap = ~bracketed & (lo.alpha >= max_step)
            done = (
                accept
                | collapsed
                | at_cap
                | (num_evals >= self.max_evals)
                | ~descends()
            )
            return _LoopState(
                lo, hi, grad_lo, aux_lo, alpha_next, num_evals, accept, done
            )

        # Newton and quasi-Newton directions usually pass at the first trial. That
        # case is checked on its own, with no loop and little bookkeeping; only
        # otherwise does the bracketing-and-zoom loop run, from that first trial.
        f, g, aux, slope = evaluate(first_trial())
        _, too_far, curvature_ok = judge(first_trial(), f, slope, f0)
        passed = ~too_far & curvature_ok

        # Both branches return the accepted trial as one array and the result is
        # read from it afterwards: slicing inside a branch costs a kernel per field.
        def at_once():
            trial = _trial(first_trial(), f, slope)
            return trial, g, aux, jnp.array(1), jnp.array(True)

        def search_on():
            first = update(start(), first_trial(), f, g, aux, slope)
            out = jax.lax.while_loop(cond, body, first)
            return out.lo, out.grad_lo, out.aux_lo, out.num_evals, out.satisfied

        lo, grad, aux, num_evals, satisfied = jax.lax.cond(passed, at_once, search_on)
        return LineSearchResult(
            alpha=lo.alpha,
            f=lo.f,
            grad=grad,
            aux=aux,
            num_evals=num_evals,
            decreased=lo.alpha > 0,
            satisfied=satisfied,
        )
