"""Step time of K-FAC and Shampoo on 1, 2 and 4 devices, as ratios to one device.

    python benchmarks/bench_scaling.py [--devices 1 2 4] [--steps 10]

Without an accelerator it forces 4 CPU devices (XLA's host-platform flag, set here
before jax starts); with one it uses every device present. For each device count
the batch is split over a `data` axis by `eqx_curv.data_parallel` (explicit
`shard_map`, matrix refreshes spread over the devices), and the median time of a
jitted step (after one warm-up) is reported relative to one device, with roots
refreshed every step and every 10 steps. A last table times a root refresh alone:
the inverse 4th roots of a stack of 128 x 128 blocks, on one device and spread.
"""

import argparse
import os
import statistics
import time


if "--gpu" not in os.sys.argv:
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, PartitionSpec  # noqa: E402

import eqx_curv  # noqa: E402
from eqx_curv._network_optimizers._blocking import map_matrices  # noqa: E402
from eqx_curv._sharding.context import data_axis_bound, shard_map  # noqa: E402


def _time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # warm-up (compiles)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_time(opt, devices: int, steps: int, width: int, batch: int) -> float:
    mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
    model = eqx.nn.MLP(64, 10, width, 2, key=jax.random.key(0))
    inputs = jax.random.normal(jax.random.key(1), (batch, 64))
    targets = jax.random.randint(jax.random.key(2), (batch,), 0, 10)
    loss = eqx_curv.SoftmaxCrossEntropy()
    parallel = eqx_curv.data_parallel(opt, mesh)

    params, static = eqx.partition(model, eqx.is_array)

    @eqx.filter_jit
    def run(params, state, key):
        def body(carry, k):
            params, state = carry
            model = eqx.combine(params, static)
            model, state, _ = parallel.step(model, state, loss, inputs, targets, key=k)
            return (eqx.filter(model, eqx.is_array), state), None

        keys = jax.random.split(key, steps)
        (params, state), _ = jax.lax.scan(body, (params, state), keys)
        return params, state

    state = parallel.init(model)
    return _time(lambda: run(params, state, jax.random.key(3)), 5) / steps


def refresh_time(devices: int, blocks: int, size: int) -> float:
    mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
    x = jax.random.normal(jax.random.key(4), (blocks, size, 2 * size))
    stack = jnp.einsum("bij,bkj->bik", x, x) / (2 * size)

    def fn(m):
        return eqx_curv.inverse_pth_root(m, 4).root

    def body(s):
        with data_axis_bound("data", devices, True):
            return map_matrices(fn, s)

    spread = jax.jit(
        shard_map(body, mesh=mesh, in_specs=PartitionSpec(), out_specs=PartitionSpec())
    )
    return _time(lambda: spread(stack), 5)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, nargs="+", default=None)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--gpu", action="store_true", help="use the accelerators")
    args = parser.parse_args()
    available = jax.device_count()
    counts = args.devices or [n for n in (1, 2, 4, 8) if n <= available]
    print(f"jax {jax.__version__}, {available} {jax.devices()[0].platform} devices")
    print(f"MLP 64-{args.width}-{args.width}-10, batch {args.batch}\n")
    rows = {
        "K-FAC (inverses every step)": lambda: eqx_curv.KFAC(inverse_every=1),
        "K-FAC (inverses every 10)": lambda: eqx_curv.KFAC(inverse_every=10),
        "Shampoo (roots every step)": lambda: eqx_curv.Shampoo(
            block_size=64, root_every=1
        ),
        "Shampoo (roots every 10)": lambda: eqx_curv.Shampoo(
            block_size=64, root_every=10
        ),
    }
    header = " | ".join(f"{n} dev" for n in counts)
    print(f"| step time | {header} |")
    print("| --- |" + " --- |" * len(counts))
    for name, make in rows.items():
        times = [
            step_time(make(), n, args.steps, args.width, args.batch) for n in counts
        ]
        cells = " | ".join(f"{t * 1e3:.1f} ms ({t / times[0]:.2f}x)" for t in times)
        print(f"| {name} | {cells} |", flush=True)
    print("\n| root refresh: 32 blocks of 128 x 128, p = 4 | " + header + " |")
    print("| --- |" + " --- |" * len(counts))
    times = [refresh_time(n, 32, 128) for n in counts]
    cells = " | ".join(f"{t * 1e3:.1f} ms ({t / times[0]:.2f}x)" for t in times)
    print(f"| time per refresh (every device's share) | {cells} |")


if __name__ == "__main__":
    main()
