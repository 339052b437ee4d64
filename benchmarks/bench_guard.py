"""What the network optimizers' non-finite guard costs: TinyViT steps with the guard as
it was, as it is, and without it, against an `optax.adam` step.

    python benchmarks/bench_guard.py [--batch-size 128] [--repeats 15]
    EQX_CURV_QUICK=1 python benchmarks/bench_guard.py   # tiny, a dry run

Every network optimizer's `step` skips (returns the incoming model and state bitwise)
when the batch, the loss, the gradient, the update or the new state holds a NaN or an
infinity. The guard as it was checked every leaf with its own `jnp.isfinite(x).all()`
and selected the new or the old state with one `lax.cond`; as it is now, it sums
`x * 0` over the leaves of each size (a few reductions in all) and selects with a
`where` per leaf that XLA fuses into the computation of the new leaf. The old guard is
reproduced here, by swapping its three helpers into `eqx_curv`'s step while it is
traced; the library keeps only the new one. The rows without a guard (no checks, the
new values returned as they are) are the floor that no guard can go below.

Each step is jitted whole (`eqx.filter_jit`, compiled once) on synthetic CIFAR-shaped
data, float32, no dropout. Calls are interleaved round robin, every call from the same
model, state and batch, so that load from other processes affects every row alike, and
the median is reported; only the ratios, measured side by side in one run, mean
anything on a shared machine. The load averages at the start and the end are printed.
Per row, the compiled step's number of kernels (fusions and custom calls), copies and
conditionals are printed as well: what the guard adds to the program.
"""

import argparse
import contextlib
import os


os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from _timing import interleaved_medians, optax_adam_step

import eqx_curv
from eqx_curv._network_optimizers import base
from eqx_curv.experiments.tinyvit import TinyViT


QUICK = os.environ.get("EQX_CURV_QUICK", "0") == "1"


# -- the guard as it was (before the fused reductions and the per-leaf `where`) ------


def _old_tree_all_finite(tree):
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.array(True)
    return jnp.stack([jnp.isfinite(x).all() for x in leaves]).all()


def _old_tree_select(ok, new, old):
    return jax.lax.cond(ok, lambda: new, lambda: old)


def _old_tree_norm(tree, dtype):
    squares = [jnp.sum(jnp.square(x.astype(dtype))) for x in jax.tree.leaves(tree)]
    return jnp.sqrt(sum(squares, jnp.zeros((), dtype)))


# -- no guard at all: every step accepted ---------------------------------------------


def _no_check(tree):
    del tree
    return jnp.array(True)


def _take_new(ok, new, old):
    del ok, old
    return new


_GUARDS = {
    "old guard": (_old_tree_all_finite, _old_tree_select, _old_tree_norm),
    "new guard": None,  # the library's own
    "no guard": (_no_check, _take_new, base.tree_norm),
}


@contextlib.contextmanager
def _guard(name):
    """The step traced inside uses the guard `name`."""
    helpers = _GUARDS[name]
    if helpers is None:
        yield
        return
    saved = (base.tree_all_finite, base.tree_select, base.tree_norm)
    base.tree_all_finite, base.tree_select, base.tree_norm = helpers
    try:
        yield
    finally:
        base.tree_all_finite, base.tree_select, base.tree_norm = saved


def _compile(fn, *args):
    """`fn` jitted and compiled for `args`; a call of it, and its program's counts."""
    compiled = eqx.filter_jit(fn).lower(*args).compile()
    text = compiled.compiled.as_text()
    entry = text[text.index("\nENTRY") :]
    counts = {
        "kernels": entry.count(" fusion(") + entry.count(" custom-call("),
        "copies": entry.count(" copy("),
        "conds": entry.count(" conditional("),
    }
    call = lambda: compiled(*args)  # noqa: E731
    jax.block_until_ready(call())  # warm up
    return call, counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16 if QUICK else 128)
    parser.add_argument("--repeats", type=int, default=3 if QUICK else 15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    load_start = os.getloadavg()

    kmodel, kx, ky = jax.random.split(jax.random.key(args.seed), 3)
    size = dict(features=32, depth=1) if QUICK else {}
    model = TinyViT(kmodel, dropout=0.0, **size)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    loss = eqx_curv.SoftmaxCrossEntropy()
    x = jax.random.uniform(kx, (args.batch_size, 32, 32, 3), jnp.float32)
    y = jax.random.randint(ky, (args.batch_size,), 0, 10)

    tx = optax.adam(1e-3)
    adam_step = optax_adam_step(loss, static, tx)

    def our_step():
        # A new function for every guard: JAX caches traces by function, and the
        # guard is chosen while tracing.
        return lambda opt, model, state, x, y: opt.step(model, state, loss, x, y)

    calls, counts = {}, {}
    calls["optax.adam"], counts["optax.adam"] = _compile(
        adam_step, params, tx.init(params), x, y
    )
    optimizers = {
        "SGD": eqx_curv.SGD(learning_rate=0.01, momentum=0.9),
        "FisherAdam": eqx_curv.FisherAdam(),
    }
    for opt_name, opt in optimizers.items():
        state = opt.init(model)
        for guard in _GUARDS:
            row = f"{opt_name}, {guard}"
            with _guard(guard):  # traced and compiled inside
                calls[row], counts[row] = _compile(our_step(), opt, model, state, x, y)

    ms = interleaved_medians(calls, args.repeats)
    load_end = os.getloadavg()

    count = sum(leaf.size for leaf in jax.tree.leaves(params))
    print(
        f"\nTinyViT ({count:,} parameters, {len(jax.tree.leaves(params))} arrays), "
        f"batch {args.batch_size}, float32, {jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} CPUs, median of {args.repeats} interleaved rounds"
    )
    print(
        "load average (1, 5, 15 min) at the start "
        + ", ".join(f"{v:.2f}" for v in load_start)
        + "; at the end "
        + ", ".join(f"{v:.2f}" for v in load_end)
        + "\n"
    )
    header = (
        f"{'step':<24}{'ms':>9}{'vs Adam':>9}{'guard ms':>10}"
        f"{'kernels':>9}{'copies':>8}{'conds':>7}"
    )
    print(header)
    print("-" * len(header))
    adam_ms = ms["optax.adam"]
    for row, value in ms.items():
        floor = row.split(",")[0] + ", no guard"
        guard_ms = f"{value - ms[floor]:.2f}" if floor in ms and row != floor else ""
        c = counts[row]
        print(
            f"{row:<24}{value:>9.2f}{value / adam_ms:>9.3f}{guard_ms:>10}"
            f"{c['kernels']:>9}{c['copies']:>8}{c['conds']:>7}"
        )


if __name__ == "__main__":
    main()
