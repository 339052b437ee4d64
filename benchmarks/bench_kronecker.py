"""KroneckerOperator.mv on a 1024 x 1024 weight vs the time of two matrix products.

`(A ⊗ B) vec(X) = vec(A X B^T)` is two n^3 products; the target is that `mv` costs at
most as much as two independent 1024^3 products at the same (HIGHEST) precision. The
damped inverses are timed too: the exact one (four products, through the eigenbases,
eigendecompositions precomputed) and the factored pi-adjusted one (two products).
Times are the best of several jitted runs after compilation, on whatever device JAX
finds, measured interleaved; XLA's cost analysis of each compiled function gives the
operation count, which does not depend on the machine's load.

    python benchmarks/bench_kronecker.py
    EQX_CURV_QUICK=1 python benchmarks/bench_kronecker.py   # n = 256
"""

import os
import time

import jax
import jax.numpy as jnp

import eqx_curv


QUICK = os.environ.get("EQX_CURV_QUICK", "0") == "1"
N = 256 if QUICK else 1024
REPEATS = 5 if QUICK else 50
HIGHEST = jax.lax.Precision.HIGHEST


@jax.jit
def two_matmuls(a, b, x, y):
    return jnp.matmul(a, x, precision=HIGHEST), jnp.matmul(y, b, precision=HIGHEST)


@jax.jit
def kron_mv(op, x):
    return op.mv(x)


def flops(fn, *args):
    """XLA's own count of floating-point operations of the compiled function."""
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per device
        analysis = analysis[0]
    return float(analysis.get("flops", float("nan"))) if analysis else float("nan")


def main():
    key = jax.random.key(0)
    ka, kb, kx, ky = jax.random.split(key, 4)
    ga = jax.random.normal(ka, (N, 2 * N), jnp.float32)
    gb = jax.random.normal(kb, (N, 2 * N), jnp.float32)
    a = ga @ ga.T / (2 * N)
    b = gb @ gb.T / (2 * N)
    x = jax.random.normal(kx, (N, N), jnp.float32)
    y = jax.random.normal(ky, (N, N), jnp.float32)
    op = eqx_curv.KroneckerOperator(a, b)
    exact = jax.jit(lambda op: op.damped_inverse(1e-3, method="exact"))(op)
    factored = jax.jit(lambda op: op.damped_inverse(1e-3, method="factored"))(op)

    cases = {
        "2 matmuls (baseline)": (two_matmuls, (a, b, x, y)),
        "KroneckerOperator.mv": (kron_mv, (op, x)),
        "damped inverse mv, exact": (kron_mv, (exact, x)),
        "damped inverse mv, factored": (kron_mv, (factored, x)),
    }
    for fn, args in cases.values():
        jax.block_until_ready(fn(*args))  # compile
    times = {name: [] for name in cases}
    for _ in range(REPEATS):  # interleaved, so load changes hit every case alike
        for name, (fn, args) in cases.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)

    print(
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"jax {jax.__version__}; weight {N}x{N}, float32, HIGHEST precision"
    )
    base = min(times["2 matmuls (baseline)"])
    base_fn, base_args = cases["2 matmuls (baseline)"]
    base_flops = flops(base_fn, *base_args)
    for name, ts in times.items():
        best = min(ts)
        fn, args = cases[name]
        work = flops(fn, *args) / base_flops
        print(
            f"{name:<30} {1e3 * best:9.2f} ms   {best / base:5.2f}x two matmuls' "
            f"time   {work:5.2f}x their flops (XLA cost analysis)"
        )
    ratio = min(times["KroneckerOperator.mv"]) / base
    fn, args = cases["KroneckerOperator.mv"]
    work = flops(fn, *args) / base_flops
    print(
        f"target mv <= 2 matmuls: work {work:.2f}x ("
        f"{'met' if work <= 1.0 + 1e-6 else 'NOT met'}), time {ratio:.2f}x ("
        f"{'met' if ratio <= 1.0 else 'above 1: compare with the run-to-run spread'})"
    )


if __name__ == "__main__":
    main()
