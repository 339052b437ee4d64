"""Inverse p-th roots: eqx_curv.inverse_pth_root (float32) vs eigh (float32, float64).

For each size n and condition number, a float32 SPD matrix with log-spaced eigenvalues
is rooted three ways. All three root the same ridged matrix A + ridge * I, with the
ridge (1e-6 * lambda_max) that inverse_pth_root reports. Accuracy is the relative
Frobenius error against a float64 numpy eigh root of that ridged matrix; times are
the best of a few jitted runs after compilation (the
minimum is the most robust statistic on a shared machine), on whatever device JAX finds.

    python benchmarks/bench_roots.py                      # n = 128, 512 (+2048 on GPU)
    python benchmarks/bench_roots.py --sizes 128,512,2048 --p 2,4
    EQX_CURV_QUICK=1 python benchmarks/bench_roots.py     # n = 128, one run
"""

import argparse
import os
import time

import jax


jax.config.update("jax_enable_x64", True)  # the float64 eigh baseline needs it

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import eqx_curv  # noqa: E402


QUICK = os.environ.get("EQX_CURV_QUICK", "0") == "1"
ON_CPU = jax.default_backend() == "cpu"


def spd(n, cond, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (q * np.logspace(0, -np.log10(cond), n)) @ q.T


def eigh_root(ridged, p):
    w, q = jnp.linalg.eigh(ridged)
    return jnp.matmul(q * w ** (-1.0 / p), q.T, precision=jax.lax.Precision.HIGHEST)


def timed(fn, *args, repeats):
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return out, float(np.min(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_sizes = "128" if QUICK else ("128,512" if ON_CPU else "128,512,2048")
    parser.add_argument("--sizes", default=default_sizes)
    parser.add_argument("--conds", default="1e2,1e4,1e6")
    parser.add_argument("--p", default="4")
    parser.add_argument("--repeats", type=int, default=1 if QUICK else 5)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    conds = [float(c) for c in args.conds.split(",")]
    powers = [int(p) for p in args.p.split(",")]

    print(
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"jax {jax.__version__}"
    )
    print(
        "relative error vs float64 numpy eigh root of the same ridged matrix; "
        "time = best of jitted runs"
    )
    header = (
        f"{'n':>5} {'cond':>6} {'p':>2} | {'newton f32':>10} {'eigh f32':>9} "
        f"{'eigh f64':>9} | {'t newton':>9} {'t eigh32':>9} {'t eigh64':>9} "
        f"| steps conv | f32 acc ratio | time vs eigh32"
    )
    print(header)
    print("-" * len(header))
    for p in powers:
        ours = jax.jit(lambda m, p=p: eqx_curv.inverse_pth_root(m, p))
        base = jax.jit(lambda m, p=p: eigh_root(m, p))
        for n in sizes:
            for cond in conds:
                a32 = jnp.asarray(spd(n, cond), jnp.float32)
                result, t_ours = timed(ours, a32, repeats=args.repeats)
                ridged64 = np.asarray(a32, np.float64) + float(result.ridge) * np.eye(n)
                w, q = np.linalg.eigh(ridged64)
                reference = (q * w ** (-1.0 / p)) @ q.T
                norm = np.linalg.norm(reference)

                def rel(x, reference=reference, norm=norm):
                    return np.linalg.norm(np.asarray(x, np.float64) - reference) / norm

                root32, t32 = timed(
                    base, jnp.asarray(ridged64, jnp.float32), repeats=args.repeats
                )
                root64, t64 = timed(base, jnp.asarray(ridged64), repeats=args.repeats)
                e_ours, e32, e64 = rel(result.root), rel(root32), rel(root64)
                print(
                    f"{n:>5} {cond:>6.0e} {p:>2} | {e_ours:>10.2e} {e32:>9.2e} "
                    f"{e64:>9.2e} | {1e3 * t_ours:>7.1f}ms {1e3 * t32:>7.1f}ms "
                    f"{1e3 * t64:>7.1f}ms | {int(result.num_steps):>5} "
                    f"{'yes' if bool(result.converged) else 'NO':>4} | "
                    f"{e32 / e_ours:>6.1f}x better | {t_ours / t32:>6.2f}x"
                )


if __name__ == "__main__":
    main()
