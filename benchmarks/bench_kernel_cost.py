"""What a small jitted solve costs on the CPU: kernels, not arithmetic.

A deterministic minimiser on a 2-D problem does a few hundred flops per iteration, far
less than XLA's runtime spends launching the kernels (fused loops, dots, copies,
conditionals) that carry them out. This benchmark measures that launch cost in two
situations, which differ by an order of magnitude on a CPU:

- the first time a kernel runs within a call (`first`): a chain of K small distinct
  kernels in a loop body that runs once, against K = 10, per added kernel;
- each further time it runs within the same call (`again`): the same body run 4 times
  instead of once, per added kernel execution.

It then counts the kernels in the compiled solve of Rosenbrock 2-D by eqx_curv's BFGS
and by optimistix's BFGS (fusions, dots, copies, conditionals, loops: every instruction
of the optimised HLO that the runtime launches), which is what the solve's wall time
follows at this size: `benchmarks/bench_classical.py` times the solves themselves.

Run: `python benchmarks/bench_kernel_cost.py [--repeats N]`.
"""

import argparse
import re
import statistics
import time

import jax


jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import optimistix as optx  # noqa: E402

import eqx_curv  # noqa: E402
from eqx_curv.experiments.problems import rosenbrock, rosenbrock_start  # noqa: E402


def _chain(num_links: int):
    """A loop whose body is `num_links` dependent links of two kernels each (a reduction
    and an elementwise update), run a traced number of times."""

    def body(carry):
        s, trips = carry
        for i in range(num_links):
            s = s * (1e-3 * jnp.sum(s * s) + 0.5 + i)
        return s, trips + 1

    def run(x, num_trips):
        return jax.lax.while_loop(lambda c: c[1] < num_trips, body, (x, 0))[0]

    return jax.jit(run)


def _launch_costs(repeats: int) -> dict[str, float]:
    x = jnp.array([1.0, 2.0])
    short, long = _chain(10), _chain(40)
    cases = {
        (name, trips): (fn, jnp.asarray(trips))
        for name, fn in (("short", short), ("long", long))
        for trips in (1, 4)
    }
    for fn, trips in cases.values():
        jax.block_until_ready(fn(x, trips))
    times = {key: [] for key in cases}
    for _ in range(repeats):
        for key, (fn, trips) in cases.items():
            start = time.perf_counter()
            for _ in range(10):
                out = fn(x, trips)
            jax.block_until_ready(out)
            times[key].append((time.perf_counter() - start) / 10)
    costs = {}
    for stat, reduce in (("median", statistics.median), ("min", min)):
        t = {key: reduce(value) for key, value in times.items()}
        costs["first", stat] = (t["long", 1] - t["short", 1]) / (2 * (40 - 10))
        costs["again", stat] = (t["long", 4] - t["long", 1]) / (3 * 2 * 40)
    return costs


_LAUNCHED = ("fusion", "dot", "copy", "conditional", "while", "concatenate")


def _kernel_count(solver) -> dict[str, int]:
    x0 = rosenbrock_start(2)

    def solve(y0):
        return optx.minimise(
            lambda y, _: rosenbrock(y), solver, y0, max_steps=5000, throw=False
        ).value

    text = jax.jit(solve).lower(x0).compile().as_text()
    # Instructions of the computations the runtime executes, not the fused bodies.
    counts = dict.fromkeys(_LAUNCHED, 0)
    inside_fused = False
    for line in text.splitlines():
        if not line.startswith(" ") and line.endswith("{"):
            inside_fused = "fused" in line.split()[0] or "wrapped" in line.split()[0]
            continue
        if inside_fused:
            continue
        match = re.search(r"= \S+ ([a-z-]+)\(", line) or re.search(
            r"= \(.*\) ([a-z-]+)\(", line
        )
        if match and match.group(1) in counts:
            counts[match.group(1)] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].platform}, jax {jax.__version__}")
    costs = _launch_costs(args.repeats)
    print(f"{'per kernel launch (ns)':<28}{'median':>10}{'min':>10}")
    for label, key in (
        ("first time in a call", "first"),
        ("again in the call", "again"),
    ):
        print(
            f"{label:<28}{1e9 * costs[key, 'median']:>10.1f}"
            f"{1e9 * costs[key, 'min']:>10.1f}"
        )
    ratio = [costs["first", s] / costs["again", s] for s in ("median", "min")]
    print(f"{'ratio first / again':<28}{ratio[0]:>10.1f}{ratio[1]:>10.1f}")
    tol = dict(rtol=0.0, atol=1e-8, norm=optx.two_norm)
    rows = {
        "eqx_curv BFGS": eqx_curv.BFGS(**tol),
        "optimistix BFGS": optx.BFGS(rtol=1e-12, atol=1e-12),
    }
    print("\nkernels in the compiled solve of Rosenbrock 2-D (whole program)")
    print(f"{'solver':<18}" + "".join(f"{k:>13}" for k in _LAUNCHED) + f"{'total':>8}")
    for name, solver in rows.items():
        counts = _kernel_count(solver)
        print(
            f"{name:<18}"
            + "".join(f"{counts[k]:>13}" for k in _LAUNCHED)
            + f"{sum(counts.values()):>8}"
        )


if __name__ == "__main__":
    main()
