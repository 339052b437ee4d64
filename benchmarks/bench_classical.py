"""Classical minimisers side by side: eqx_curv vs scipy, optax and optimistix.

Problems (float64, CPU): Rosenbrock 2-D and 100-D from (-1.2, 1, ...) and the reference
page's quartic from (-0.9, 0.4). Each solver runs to a gradient norm of about 1e-8 (the
tolerance each library offers for that, noted per row) and the table gives

- `iters`: iterations (for optimistix, accepted steps: its `num_steps` counts function
  evaluations, since each of its steps evaluates once);
- `f+g`: value-and-gradient evaluations (scipy: `nfev`; optax: line-search steps + 1);
- `hess`: Hessian evaluations where counted (eqx_curv Newton and SaddleFreeNewton:
  one per iteration);
- `ms`, `min ms`: wall time of the whole solve, median and minimum over interleaved
  rounds after a warm-up (sub-millisecond solves timed in bursts; see
  `_time_interleaved`). JAX solvers are one jitted call returning the solution and its counters;
  scipy drives jitted JAX callbacks from its host loop;
- `f`, `|g|`: final value and 2-norm of the gradient (the global minimum is 0 for
  Rosenbrock; 3.99 is its local minimum).

Run: `python benchmarks/bench_classical.py [--repeats N]`. Timings depend on the machine
and its load; compare ratios within one run.
"""

import argparse
import statistics
import time

import jax


jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import optimistix as optx  # noqa: E402
import scipy.optimize  # noqa: E402

import eqx_curv  # noqa: E402
from eqx_curv.experiments.problems import (  # noqa: E402
    quartic,
    QUARTIC_START,
    rosenbrock,
    rosenbrock_start,
)


GTOL = 1e-8


def _time_interleaved(calls, repeats):
    """Median and minimum wall time (ms) of each call, timed in interleaved rounds.

    Every call is warmed up (compiled) first. Each round then times every call once, so
    that a change in the machine's load affects all rows alike; a call that takes less
    than a millisecond is timed as a burst of back-to-back calls (about 1 ms worth) and
    the burst's mean is recorded, so that what is measured is a solve with its code and
    data in cache rather than the cost of coming after another solver.
    """
    bursts = []
    for call in calls:
        call()
        start = time.perf_counter()
        call()
        once = time.perf_counter() - start
        bursts.append(int(min(50, max(1, 1e-3 // max(once, 1e-6)))))
    times = [[] for _ in calls]
    for _ in range(repeats):
        for call, burst, record in zip(calls, bursts, times):
            start = time.perf_counter()
            for _ in range(burst):
                call()
            record.append((time.perf_counter() - start) / burst)
    return [(1e3 * statistics.median(t), 1e3 * min(t)) for t in times]


def _blocking(solve, x0):
    """`solve(x0)` as a call that waits for its result."""

    def call():
        out = solve(x0)
        jax.block_until_ready(out[0])
        return out

    return call


def _finish(fn, x):
    x = jnp.asarray(x)
    return float(fn(x)), float(jnp.linalg.norm(jax.grad(fn)(x)))


def ours(fn, x0, solver, hess_per_iter):
    # Like the optimistix rows, the jitted call returns the solution and two counters
    # only, so that no row pays for handing a whole solver state back to Python.
    @jax.jit
    def solve(x0):
        sol = optx.minimise(lambda y, _: fn(y), solver, x0, max_steps=5000, throw=False)
        return sol.value, sol.stats["num_steps"], sol.stats["num_fn_evals"]

    def summary(out):
        value, iters, evals = out
        return dict(
            iters=int(iters),
            fg=int(evals),
            hess=hess_per_iter(int(iters)),
            final=_finish(fn, value),
        )

    return _blocking(solve, x0), summary


def optimistix_solver(fn, x0, solver):
    @jax.jit
    def solve(x0):
        sol = optx.minimise(
            lambda y, _: fn(y), solver, x0, max_steps=20000, throw=False
        )
        return sol.value, sol.state.num_accepted_steps, sol.stats["num_steps"]

    def summary(out):
        value, accepted, evals = out
        return dict(
            iters=int(accepted), fg=int(evals), hess=None, final=_finish(fn, value)
        )

    return _blocking(solve, x0), summary


def optax_lbfgs(fn, x0):
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(fn)

    @jax.jit
    def solve(x0):
        def cond(carry):
            _, state, k, _ = carry
            grad = optax.tree_utils.tree_get(state, "grad")
            return (k == 0) | ((k < 5000) & (jnp.linalg.norm(grad) > GTOL))

        def body(carry):
            x, state, k, evals = carry
            value, grad = value_and_grad(x, state=state)
            updates, state = opt.update(
                grad, state, x, value=value, grad=grad, value_fn=fn
            )
            steps = optax.tree_utils.tree_get(state, "num_linesearch_steps")
            return optax.apply_updates(x, updates), state, k + 1, evals + steps

        carry = (x0, opt.init(x0), jnp.array(0), jnp.array(1))
        return jax.lax.while_loop(cond, body, carry)

    def summary(out):
        x, _, k, evals = out
        return dict(iters=int(k), fg=int(evals), hess=None, final=_finish(fn, x))

    return _blocking(solve, x0), summary


def scipy_solver(fn, x0, method):
    f = jax.jit(fn)
    g = jax.jit(jax.grad(fn))
    h = jax.jit(jax.hessian(fn))
    kwargs = dict(
        fun=lambda x: float(f(x)),
        x0=np.asarray(x0),
        jac=lambda x: np.asarray(g(x)),
        method=method,
    )
    if method in ("trust-exact", "Newton-CG"):
        kwargs["hess"] = lambda x: np.asarray(h(x))
    kwargs["options"] = {
        "BFGS": {"gtol": GTOL, "maxiter": 5000},
        "L-BFGS-B": {"gtol": GTOL, "ftol": 0.0, "maxiter": 5000, "maxfun": 20000},
        "trust-exact": {"gtol": GTOL, "maxiter": 5000},
        "Newton-CG": {"xtol": 1e-14, "maxiter": 5000},
    }[method]

    def call():
        return scipy.optimize.minimize(**kwargs)

    def summary(res):
        return dict(
            iters=int(res.nit),
            fg=int(res.nfev),
            hess=int(getattr(res, "nhev", 0)) or None,
            final=_finish(fn, res.x),
        )

    return call, summary


def _hessians_per_step(iters):
    return iters


def _solvers():
    """(name, make(fn, x0) -> (call, summary)) for every solver in the table."""
    tol = dict(rtol=0.0, atol=GTOL, norm=optx.two_norm)
    none = lambda iters: None  # noqa: E731
    return [
        ("eqx_curv BFGS", lambda f, x: ours(f, x, eqx_curv.BFGS(**tol), none)),
        ("eqx_curv LBFGS", lambda f, x: ours(f, x, eqx_curv.LBFGS(**tol), none)),
        (
            "eqx_curv Newton",
            lambda f, x: ours(f, x, eqx_curv.Newton(**tol), _hessians_per_step),
        ),
        (
            "eqx_curv SaddleFreeNewton",
            lambda f, x: ours(
                f, x, eqx_curv.SaddleFreeNewton(**tol), _hessians_per_step
            ),
        ),
        (
            # Ablation: without the gradient-scaled shift mu_0 = c ||g||.
            "eqx_curv SFN, c = 0",
            lambda f, x: ours(
                f,
                x,
                eqx_curv.SaddleFreeNewton(**tol, regularisation=0.0),
                _hessians_per_step,
            ),
        ),
        ("scipy BFGS", lambda f, x: scipy_solver(f, x, "BFGS")),
        ("scipy L-BFGS-B", lambda f, x: scipy_solver(f, x, "L-BFGS-B")),
        ("scipy trust-exact", lambda f, x: scipy_solver(f, x, "trust-exact")),
        ("scipy Newton-CG", lambda f, x: scipy_solver(f, x, "Newton-CG")),
        ("optax.lbfgs", optax_lbfgs),
        (
            "optimistix BFGS",
            lambda f, x: optimistix_solver(f, x, optx.BFGS(rtol=1e-12, atol=1e-12)),
        ),
        (
            "optimistix LBFGS",
            lambda f, x: optimistix_solver(f, x, optx.LBFGS(rtol=1e-12, atol=1e-12)),
        ),
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--only", default="", help="comma-separated substrings of solver names"
    )
    args = parser.parse_args(argv)
    problems = [
        ("Rosenbrock 2-D", rosenbrock, rosenbrock_start(2)),
        ("Rosenbrock 100-D", rosenbrock, rosenbrock_start(100)),
        ("quartic (page)", quartic, jnp.asarray(QUARTIC_START)),
    ]
    rows = []
    for pname, fn, x0 in problems:
        made = [
            (sname, make(lambda x, fn=fn: fn(x), x0))
            for sname, make in _solvers()
            if not args.only or any(k in sname for k in args.only.split(","))
        ]
        timings = _time_interleaved([call for _, (call, _) in made], args.repeats)
        for (sname, (call, summary)), ms in zip(made, timings):
            r = dict(summary(call()), ms=ms)
            rows.append((pname, sname, r))
            print(_format(pname, sname, r), flush=True)
    print()
    print(_header())
    for pname, sname, r in rows:
        print(_format(pname, sname, r))


def _header():
    return (
        f"{'problem':<18} {'solver':<26} {'iters':>6} {'f+g':>6} {'hess':>5} "
        f"{'ms':>9} {'min ms':>9} {'f':>10} {'|g|':>8}"
    )


def _format(pname, sname, r):
    hess = "" if r["hess"] is None else str(r["hess"])
    f, g = r["final"]
    return (
        f"{pname:<18} {sname:<26} {r['iters']:>6} {r['fg']:>6} {hess:>5} "
        f"{r['ms'][0]:>9.3f} {r['ms'][1]:>9.3f} {f:>10.3g} {g:>8.1e}"
    )


if __name__ == "__main__":
    main()
