"""eqx_curv.CG vs lineax.CG vs jax.scipy.sparse.linalg.cg on a float32 GGN-like system.

The operator is a damped mean-loss-GGN stand-in with n unknowns: a diagonal spread over
eight decades (mostly tiny), a rank-8 part with eigenvalues in [1e-2, 5], and damping
1e-3 (condition number about 5e3). The right-hand side is standard normal. Every solver
gets rtol = 1e-4 and 1000 steps; the relative residual ||b - Ay|| / ||b|| of what it
returns is evaluated in float64. Times are medians of a few runs after compilation.

    python benchmarks/bench_cg.py            # n = 1e5 and 1e6
    EQX_CURV_QUICK=1 python benchmarks/bench_cg.py   # n = 1e4 and 1e5, one run
"""

import os
import time

import equinox as eqx
import jax


jax.config.update("jax_enable_x64", True)  # float64 only for the residual check

import jax.numpy as jnp  # noqa: E402
import jax.scipy.sparse.linalg as jsla  # noqa: E402
import lineax as lx  # noqa: E402
import numpy as np  # noqa: E402

import eqx_curv  # noqa: E402


QUICK = os.environ.get("EQX_CURV_QUICK", "0") == "1"
SIZES = (10**4, 10**5) if QUICK else (10**5, 10**6)
REPEATS = 1 if QUICK else 3
RTOL, MAX_STEPS, DAMPING, RANK = 1e-4, 1000, 1e-3, 8


def problem(n, key):
    k1, k2, k3 = jax.random.split(key, 3)
    d = 10.0 ** jax.random.uniform(k1, (n,), jnp.float32, -9.0, -1.0)
    w = jax.random.normal(k2, (n, RANK), jnp.float32) / float(np.sqrt(n))
    s = jnp.logspace(-2, np.log10(5.0), RANK, dtype=jnp.float32)
    b = jax.random.normal(k3, (n,), jnp.float32)
    return d, w, s, b


def matvec(d, w, s, v):
    return (d + DAMPING) * v + w @ (s * (w.T @ v))


def _operator(d, w, s):
    structure = jax.ShapeDtypeStruct(d.shape, d.dtype)
    tags = (lx.symmetric_tag, lx.positive_semidefinite_tag)
    return lx.FunctionLinearOperator(lambda v: matvec(d, w, s, v), structure, tags)


@eqx.filter_jit
def solve_ours(d, w, s, b):
    solver = eqx_curv.CG(rtol=RTOL, atol=0.0, max_steps=MAX_STEPS)
    sol = lx.linear_solve(_operator(d, w, s), b, solver, throw=False)
    return sol.value, sol.stats["num_steps"], sol.result


@eqx.filter_jit
def solve_lineax(d, w, s, b):
    # lineax's criterion is elementwise (max norm): |r_i| <= atol + rtol |b_i|.
    solver = lx.CG(rtol=RTOL, atol=0.0, max_steps=MAX_STEPS)
    sol = lx.linear_solve(_operator(d, w, s), b, solver, throw=False)
    return sol.value, sol.stats["num_steps"], sol.result


@jax.jit
def solve_scipy(d, w, s, b):
    # jax.scipy stops on ||r|| <= tol ||b|| (2-norm), as eqx_curv.CG; no step count.
    y, _ = jsla.cg(lambda v: matvec(d, w, s, v), b, tol=RTOL, maxiter=MAX_STEPS)
    return y, jnp.array(-1), lx.RESULTS.successful


def relative_residual(d, w, s, b, y):
    d, w, s, b, y = (x.astype(jnp.float64) for x in (d, w, s, b, y))
    return float(jnp.linalg.norm(b - matvec(d, w, s, y)) / jnp.linalg.norm(b))


def result_name(result):
    for name in ("successful", "max_steps_reached", "breakdown", "singular"):
        if result == getattr(lx.RESULTS, name):
            return name
    return "other"


def main():
    eps = float(jnp.finfo(jnp.float32).eps)
    print(f"devices: {jax.devices()}; float32; rtol {RTOL}; max steps {MAX_STEPS}")
    header = (
        f"{'n':>9} {'solver':<22}{'finite':>7}{'steps':>7}{'rel. residual':>15}"
        f"{'time s':>9}  result"
    )
    print(header + "\n" + "-" * (len(header) + 8))
    for n in SIZES:
        d, w, s, b = problem(n, jax.random.key(0))
        rayleigh = float(jnp.vdot(b, matvec(d, w, s, b)) / jnp.vdot(b, b))
        for name, solve in (
            ("eqx_curv.CG", solve_ours),
            ("lineax.CG", solve_lineax),
            ("jax.scipy...cg", solve_scipy),
        ):
            jax.block_until_ready(solve(d, w, s, b))  # compile
            times = []
            for _ in range(REPEATS):
                start = time.perf_counter()
                y, steps, result = jax.block_until_ready(solve(d, w, s, b))
                times.append(time.perf_counter() - start)
            finite = bool(jnp.isfinite(y).all())
            res = relative_residual(d, w, s, b, y) if finite else float("nan")
            steps = "n/a" if int(steps) < 0 else str(int(steps))
            status = "n/a" if name.startswith("jax.scipy") else result_name(result)
            print(
                f"{n:>9} {name:<22}{finite!s:>7}{steps:>7}{res:>15.2e}"
                f"{float(np.median(times)):>9.3f}  {status}"
            )
        print(
            f"{'':>9} (Rayleigh quotient of b: {rayleigh:.2e}; lineax.CG's step guard "
            f"needs about 100 n eps = {100 * n * eps:.2e})"
        )


if __name__ == "__main__":
    main()
