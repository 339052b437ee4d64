r"""Line searches for the minimisers: strong Wolfe, and optimistix's searches adapted.

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

Where $f$ cannot tell trials apart (near a minimum whose value is large compared with
what the step changes, $f$ no longer changes in its last bits), the sufficient-decrease
test is replaced by Hager and Zhang's approximate Wolfe condition, which judges by the
derivative: $\phi(\alpha) \le \phi(0) + \epsilon_k$ with $\epsilon_k$ the rounding
error of $f$, and $\phi'(\alpha) \le (1 - 2c_1)|\phi'(0)|$, which for a quadratic
$\phi$ is the sufficient-decrease condition itself (W. W. Hager and H. Zhang, "A new
conjugate gradient method with guaranteed descent and an efficient line search", SIAM
J. Optim. 16(1), 2005, Section 4; "Algorithm 851: CG_DESCENT", ACM TOMS 32(1), 2006).

A trial at which $f$ or $\nabla f$ is not finite is treated as a step that went too far:
it becomes the upper end of the bracket and the next trial bisects towards the last good
step. The search therefore never returns a non-finite point.

Every search is an [`eqx_curv.AbstractLineSearch`][]: a callable that runs a whole search
along one direction and returns a [`eqx_curv.LineSearchResult`][]. optimistix's searches
are the other way round (the solver evaluates, the search is a state machine that sees
one trial at a time); [`eqx_curv.OptimistixSearch`][] drives one of them along a
direction, so that any `optimistix.AbstractSearch` that needs only values and gradients
(`optimistix.BacktrackingArmijo`, `optimistix.LearningRate`) serves the minimisers here.
"""

import abc
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, Bool, Float, Int, PyTree

from .._misc import (
    check_hyperparameter,
    check_number_fields,
    checked_hyperparameter,
    RealScalarLike,
    shown,
)


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
    flat: Bool[Array, ""]  # every trial so far finite and within rounding of f(x)
    done: Bool[Array, ""]


class LineSearchResult(eqx.Module):
    """What a line search found along a direction $p$ from $x$.

    **Attributes:**

    - `alpha`: the accepted step ($x + \alpha p$ is the new point), or 0 where no step
        was accepted; then `f`, `grad` and `aux` are the incoming ones.
    - `f`, `grad`, `aux`: value, gradient and aux at the returned point.
    - `num_evals`: value-and-gradient evaluations the search made.
    - `accepted`: a step was taken (`alpha > 0`).
    - `satisfied`: the search's conditions held at that step (for
        [`eqx_curv.StrongWolfe`][], the strong Wolfe conditions, or their approximate
        form where $f$ cannot tell); a search that ran out of evaluations may accept a
        step that only decreased $f$.
    - `flat`: the returned value is within the rounding error of $f(x)$ ($f$ could not
        tell the step's effect); where no step was accepted, every trial's value was:
        $f$ cannot be decreased along $p$ in its precision (the rounding floor).
    - `result`: an `optimistix.RESULTS` for a failure the search itself reports
        (`successful` otherwise; not accepting a step is not such a failure).
    """

    alpha: Float[Array, ""]
    f: Float[Array, ""]
    grad: Float[Array, " n"]
    aux: PyTree
    num_evals: Int[Array, ""]
    accepted: Bool[Array, ""]
    satisfied: Bool[Array, ""]
    flat: Bool[Array, ""]
    result: optx.RESULTS


class AbstractLineSearch(eqx.Module):
    """A line search: the whole search along one direction, in one call.

    Subclasses implement `__call__`; [`eqx_curv.StrongWolfe`][] and
    [`eqx_curv.OptimistixSearch`][] are the two here.
    """

    @abc.abstractmethod
    def __call__(
        self,
        value_and_grad: Callable,
        x: Float[Array, " n"],
        f0: Float[Array, ""],
        grad0: Float[Array, " n"],
        aux0: PyTree,
        direction: Float[Array, " n"],
        alpha0: float | Float[Array, ""],
        slope0: Float[Array, ""],
    ) -> LineSearchResult:
        """Search along `direction` from `x`.

        **Arguments:**

        - `value_and_grad`: `x -> (f, grad, aux)` on flat vectors.
        - `x`, `f0`, `grad0`, `aux0`: the current point, its value, gradient and aux.
        - `direction`: a descent direction $p$ ($\nabla f^\top p < 0$).
        - `alpha0`: the first trial step.
        - `slope0`: $\nabla f(x)^\top p$.

        **Returns:**

        A [`eqx_curv.LineSearchResult`][].
        """


def _cubic_minimiser(a: _Trial, b: _Trial) -> Float[Array, ""]:
    """Minimiser of the cubic matching value and slope at `a` and `b`, or NaN."""
    d1 = a.slope + b.slope - 3 * (a.f - b.f) / (a.alpha - b.alpha)
    disc = d1**2 - a.slope * b.slope
    d2 = jnp.sign(b.alpha - a.alpha) * jnp.sqrt(jnp.maximum(disc, 0))
    alpha = b.alpha - (b.alpha - a.alpha) * (b.slope + d2 - d1) / (
        b.slope - a.slope + 2 * d2
    )
    return jnp.where(disc >= 0, alpha, jnp.nan)


class StrongWolfe(AbstractLineSearch):
    r"""Line search for a step satisfying the strong Wolfe conditions.

    Bracketing and zoom with safeguarded cubic interpolation (Nocedal and Wright,
    *Numerical Optimization*, 2nd ed., 2006, Algorithms 3.5 and 3.6). A trial is
    accepted when $|\phi'(\alpha)| \le c_2 |\phi'(0)|$ and either
    $\phi(\alpha) \le \phi(0) + c_1 \alpha \phi'(0)$ (sufficient decrease) or, where $f$
    cannot tell, $\phi(\alpha) \le \phi(0) + \epsilon |\phi(0)|$ and
    $\phi'(\alpha) \le (1 - 2 c_1) |\phi'(0)|$ (Hager and Zhang's approximate Wolfe
    condition; W. W. Hager and H. Zhang, SIAM J. Optim. 16(1), 2005, Section 4).
    Non-finite trials shrink the step. If `max_evals` evaluations pass without meeting
    the curvature condition, the best step found with sufficient decrease is returned
    (flagged `satisfied=False`); if there is none, the step is zero (flagged
    `accepted=False`, and `flat=True` where every trial's value was within
    $\epsilon |\phi(0)|$ of $\phi(0)$). Along a direction that is not a descent
    direction the step is zero after the one evaluation of the first trial (evaluated
    before the direction is judged, so that the common case runs no extra kernel).

    **Arguments:**

    - `c1`: sufficient-decrease constant, $0 < c_1 < c_2$.
    - `c2`: curvature constant, $c_1 < c_2 < 1$: 0.9 suits quasi-Newton and Newton
        directions, 0.1 a nonlinear conjugate-gradient one.
    - `max_evals`: most function-and-gradient evaluations per search.
    - `max_step`: largest step the bracketing phase may try.
    - `rounding`: $\epsilon$, the relative rounding error assumed in $f$, as a multiple
        of the machine epsilon of $f$'s dtype (default 4: $9 \cdot 10^{-16}$ in
        float64). Within $\epsilon |f(x)|$ of $f(x)$ the search judges by the
        derivative, not by $f$.
    """

    c1: RealScalarLike = 1e-4
    c2: RealScalarLike = 0.9
    max_evals: int = eqx.field(static=True, default=30)
    max_step: RealScalarLike = 1e10
    rounding: RealScalarLike = 4.0

    def __check_init__(self):
        check_number_fields(self)  # real, finite numbers; max_evals a positive int
        c1, c2 = self.c1, self.c2
        check_hyperparameter(
            (0 < c1) & (c1 < c2) & (c2 < 1),
            f"`StrongWolfe` needs 0 < c1 < c2 < 1, got c1={shown(c1)}, "
            f"c2={shown(c2)}. The usual choice is c1=1e-4 with c2=0.9 (Newton, "
            "quasi-Newton).",
        )
        check_hyperparameter(
            self.max_step > 0,
            f"`StrongWolfe` needs a positive `max_step`, got {shown(self.max_step)}.",
        )
        check_hyperparameter(
            self.rounding >= 0,
            "`StrongWolfe` needs a non-negative `rounding` (a multiple of the machine "
            f"epsilon), got {shown(self.rounding)}.",
        )

    def __call__(
        self,
        value_and_grad: Callable,
        x: Float[Array, " n"],
        f0: Float[Array, ""],
        grad0: Float[Array, " n"],
        aux0: PyTree,
        direction: Float[Array, " n"],
        alpha0: float | Float[Array, ""],
        slope0: Float[Array, ""],
    ) -> LineSearchResult:
        dtype = f0.dtype
        c1 = jnp.asarray(self.c1, dtype)
        c2 = jnp.asarray(self.c2, dtype)
        # Traced constants are checked where they are used (Python numbers were
        # checked at construction).
        c1 = checked_hyperparameter(
            c1,
            (0 < self.c1) & (self.c1 < self.c2) & (self.c2 < 1),
            "`StrongWolfe` needs 0 < c1 < c2 < 1.",
        )
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

        def tolerance():
            # Hager and Zhang's epsilon_k: how far above f(x) a value may lie and
            # still count as "f cannot tell".
            return jnp.asarray(self.rounding, dtype) * eps * jnp.abs(f0)

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
                flat=jnp.array(True),
                done=jnp.array(False),
            )

        def cond(s):
            return ~s.done

        def evaluate(alpha):
            f, g, aux = value_and_grad(x + alpha * direction)
            return f, g, aux, jnp.dot(g, direction)

        def body(s):
            alpha = s.alpha_next
            f, g, aux, slope = evaluate(alpha)
            judged = judge(alpha, f, slope, s.lo.f, first=False)
            return update(s, alpha, f, g, aux, slope, judged, first=False)

        def judge(alpha, f, slope, f_lo, first):
            """(finite, within, curvature condition met) for a trial, `within` when it
            is not too far (it becomes the lower end of the bracket)."""
            # A non-finite entry of g makes the slope non-finite too (NaN and inf
            # propagate through the dot product, inf * 0 included), so checking the
            # slope checks g.
            finite = jnp.isfinite(f) & jnp.isfinite(slope)
            decrease = (f <= f0 + c1 * alpha * slope0) & (f < f_lo)
            # Hager and Zhang's approximate form, for where f cannot tell: no higher
            # than rounding above the best value, and the slope no more than
            # (1 - 2 c1) |phi'(0)| (for a quadratic, sufficient decrease itself).
            approximate = (f <= f_lo + tolerance()) & (slope <= (2 * c1 - 1) * slope0)
            # Too far (the upper end of the bracket) is the complement. Along a
            # direction that does not descend every step is, and so is a step that
            # is not positive (a first trial of 0 or NaN), and so is every step if
            # f0 is NaN: the search then ends at alpha = 0, and a returned step is
            # positive exactly when it was accepted. Such a search ends at its first
            # trial, so later trials need not ask whether the direction descends.
            # Written without negations, each of which would be one more operation
            # in every kernel that this test is fused into.
            within = (alpha > 0) & finite & (decrease | approximate)
            if first:
                within = descends() & within
            return finite, within, jnp.abs(slope) <= -c2 * slope0

        def update(s, alpha, f, g, aux, slope, judged, first):
            finite, within, curvature_ok = judged
            trial = _trial(alpha, f, slope)
            accept = within & curvature_ok
            # Moving past `lo` would go uphill: the old `lo` becomes the upper end.
            flip = within & ~curvature_ok & (slope * (s.hi.alpha - s.lo.alpha) >= 0)
            if_nonfinite = _trial(alpha, jnp.asarray(jnp.inf, dtype), zero)
            hi = _Trial(
                jnp.where(
                    within,
                    jnp.where(flip, s.lo.values, s.hi.values),
                    jnp.where(finite, trial.values, if_nonfinite.values),
                )
            )
            lo = _Trial(jnp.where(within, trial.values, s.lo.values))
            grad_lo = jnp.where(within, g, s.grad_lo)
            aux_lo = jax.tree.map(lambda a, b: jnp.where(within, a, b), aux, s.aux_lo)
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
            done = accept | collapsed | at_cap | (num_evals >= self.max_evals)
            if first:
                done = done | ~descends()
            flat = s.flat & finite & (jnp.abs(f - f0) <= tolerance())
            return _LoopState(
                lo, hi, grad_lo, aux_lo, alpha_next, num_evals, accept, flat, done
            )

        # Newton and quasi-Newton directions usually pass at the first trial. That
        # case is checked on its own, with no loop and little bookkeeping; only
        # otherwise does the bracketing-and-zoom loop run, from that first trial.
        f, g, aux, slope = evaluate(first_trial())
        _, within, curvature_ok = judge(first_trial(), f, slope, f0, first=True)
        # 0: too far; 1: not too far, but the curvature condition fails; 2: passed.
        case = within.astype(jnp.int32) + (within & curvature_ok).astype(jnp.int32)

        # Both branches return the accepted trial as one array and the result is
        # read from it afterwards: slicing inside a branch costs a kernel per field.
        def at_once():
            trial = _trial(first_trial(), f, slope)
            flat = jnp.abs(f - f0) <= tolerance()
            return trial, g, aux, jnp.array(1), jnp.array(True), flat

        def search_on(first_within: bool):
            # One branch for each judgement of the first trial, so that the first
            # update has it as a constant. Recomputed from `f` and `slope` (passing
            # it in would cost a kernel per step), the tests above would be fused
            # into each of that update's kernels, and their operations counted
            # again in each: XLA's CPU client runs a program whose estimated flop
            # count is 1000 or more on a thread of its own, which costs a 2-D solve
            # twice its time (docs/classical.md).
            if first_within:
                # Not passed, so the curvature condition failed.
                judged = (jnp.array(True), jnp.array(True), jnp.array(False))
            else:
                finite = jnp.isfinite(f) & jnp.isfinite(slope)
                judged = (finite, jnp.array(False), jnp.array(False))
            first = update(start(), first_trial(), f, g, aux, slope, judged, True)
            out = jax.lax.while_loop(cond, body, first)
            flat = jnp.where(
                out.lo.alpha > 0,
                jnp.abs(out.lo.f - f0) <= tolerance(),
                out.flat & descends(),
            )
            return out.lo, out.grad_lo, out.aux_lo, out.num_evals, out.satisfied, flat

        lo, grad, aux, num_evals, satisfied, flat = jax.lax.switch(
            case, (lambda: search_on(False), lambda: search_on(True), at_once)
        )
        return LineSearchResult(
            alpha=lo.alpha,
            f=lo.f,
            grad=grad,
            aux=aux,
            num_evals=num_evals,
            accepted=lo.alpha > 0,
            satisfied=satisfied,
            flat=flat,
            result=optx.RESULTS.successful,
        )


class _AdapterState(eqx.Module):
    step_size: Float[Array, ""]
    search_state: Any
    trial: Float[Array, ""]
    f: Float[Array, ""]
    grad: Float[Array, " n"]
    aux: PyTree
    num_evals: Int[Array, ""]
    accepted: Bool[Array, ""]
    result: optx.RESULTS


class OptimistixSearch(AbstractLineSearch):
    r"""An optimistix search (`optimistix.AbstractSearch`) as a line search here.

    optimistix's searches see one trial at a time: the solver evaluates the point the
    search asked for and hands back its value. This adapter plays the solver's part
    along the minimiser's direction $p$: with the search's step size $t$ the trial is
    $x + t\,\alpha_0 p$ ($\alpha_0$ the minimiser's first trial, so that $t = 1$ is the
    step the minimiser would try first), evaluated with its gradient, until the search
    accepts or `max_evals` trials have been made. The search is given
    `optimistix.FunctionInfo.EvalGrad` at $x$ and `optimistix.FunctionInfo.Eval` at the
    trial, as optimistix's own minimisers give it, so searches that need only values
    and gradients work: `optimistix.BacktrackingArmijo`, `optimistix.LearningRate`.

    A step is accepted when the search accepts it and the value and gradient there are
    finite. Such a step need not decrease $f$ (`optimistix.LearningRate` accepts every
    step). A result other than `successful` from the search is passed on.

    **Arguments:**

    - `search`: the optimistix search, e.g. `optimistix.BacktrackingArmijo()`.
    - `max_evals`: most trials per search (default 30).

    Example: `eqx_curv.BFGS(rtol=0.0, atol=1e-8,
    search=eqx_curv.OptimistixSearch(optx.BacktrackingArmijo()))`.
    """

    search: optx.AbstractSearch
    max_evals: int = eqx.field(static=True, default=30)

    def __check_init__(self):
        check_hyperparameter(
            isinstance(self.search, optx.AbstractSearch),
            "`OptimistixSearch` needs an `optimistix.AbstractSearch` as `search`, got "
            f"{type(self.search).__name__}. For eqx_curv's own line search pass "
            "`eqx_curv.StrongWolfe()` to the minimiser directly.",
        )
        check_number_fields(self)  # max_evals a positive int

    def __call__(
        self,
        value_and_grad: Callable,
        x: Float[Array, " n"],
        f0: Float[Array, ""],
        grad0: Float[Array, " n"],
        aux0: PyTree,
        direction: Float[Array, " n"],
        alpha0: float | Float[Array, ""],
        slope0: Float[Array, ""],
    ) -> LineSearchResult:
        dtype = f0.dtype
        alpha0 = jnp.asarray(alpha0, dtype)
        f_info = optx.FunctionInfo.EvalGrad(f0, grad0)
        search_state = self.search.init(x, jax.eval_shape(lambda: f_info))
        # optimistix's first call only reports the first step size (and accepts).
        step_size, _, _, search_state = self.search.step(
            jnp.array(True), x, x, f_info, optx.FunctionInfo.Eval(f0), search_state
        )

        def body(s: _AdapterState) -> _AdapterState:
            trial = jnp.asarray(s.step_size, dtype) * alpha0
            x_eval = x + trial * direction
            f, g, aux = value_and_grad(x_eval)
            step_size, accept, result, search_state = self.search.step(
                jnp.array(False),
                x,
                x_eval,
                f_info,
                optx.FunctionInfo.Eval(f),
                s.search_state,
            )
            finite = jnp.isfinite(f) & jnp.all(jnp.isfinite(g))
            accepted = accept & finite & (trial > 0)
            return _AdapterState(
                step_size=jnp.asarray(step_size, dtype),
                search_state=search_state,
                trial=trial,
                f=f,
                grad=g,
                aux=aux,
                num_evals=s.num_evals + 1,
                accepted=accepted,
                result=result,
            )

        def cond(s: _AdapterState) -> Bool[Array, ""]:
            return (
                ~s.accepted
                & (s.result == optx.RESULTS.successful)
                & (s.num_evals < self.max_evals)
            )

        start = _AdapterState(
            step_size=jnp.asarray(step_size, dtype),
            search_state=search_state,
            trial=jnp.zeros((), dtype),
            f=f0,
            grad=grad0,
            aux=aux0,
            num_evals=jnp.array(0),
            accepted=jnp.array(False),
            result=optx.RESULTS.successful,
        )
        out = jax.lax.while_loop(cond, body, start)
        accepted = out.accepted
        eps = jnp.finfo(dtype).eps
        return LineSearchResult(
            alpha=jnp.where(accepted, out.trial, 0),
            f=jnp.where(accepted, out.f, f0),
            grad=jnp.where(accepted, out.grad, grad0),
            aux=jax.tree.map(lambda a, b: jnp.where(accepted, a, b), out.aux, aux0),
            num_evals=out.num_evals,
            accepted=accepted,
            satisfied=accepted,
            # Within a few roundings of f(x), as `StrongWolfe`'s default. Where the
            # search accepted nothing, the floor is not claimed: an optimistix search
            # does not say why it gave up.
            flat=accepted & (jnp.abs(out.f - f0) <= 4 * eps * jnp.abs(f0)),
            result=out.result,
        )
