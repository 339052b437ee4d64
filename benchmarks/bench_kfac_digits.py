"""K-FAC against SGD and Adam on scikit-learn's digits: steps and seconds to a loss.

MLP 64-256-256-10 (tanh, float32), batch 128, the full training set's loss checked
every 10 steps; for each optimizer and seed, the steps and the training wall time
(compilation excluded: a warm-up run compiles the chunk first) until the full
training loss reaches 0.01, or the cap. Every optimizer runs with its defaults, and
SGD and Adam also with a larger learning rate (a fairer baseline than their
defaults). Run from the repository root:

```
python benchmarks/bench_kfac_digits.py [--seeds 3] [--max-steps 2000]
python benchmarks/bench_kfac_digits.py --tinyvit   # K-FAC step time vs Adam
python benchmarks/bench_kfac_digits.py --schedules --max-steps 1000
```

`--schedules` trains K-FAC with the quadratic model and the statistics every step,
every 5 and every 10 (the default) steps, and prints the steps to losses of 1e-2,
1e-3 and 1e-4 and the largest full training loss after first reaching 1e-2.

`--tinyvit` times K-FAC (inverses every 1, 10 and 100 steps) against FisherAdam
(Adam) on the library's TinyViT at batch 128 (no dropout): 100 steps each, in
interleaved rounds of 10 steps inside one `lax.scan`, state carried on, so that the
mean is the amortised step time.
"""

import argparse
import os
import time


# jaxlib's CPU LU, Cholesky and eigendecompositions go through OpenBLAS, whose own
# threads fight XLA's for the cores: on the shared 2-core machine they made K-FAC's
# digits step 5 to 7 times slower (a 257 x 257 LU inverse: 6 ms with them, 1.6 ms
# without; a chunk of 10 steps 500 ms against 87 ms).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import eqx_curv
from eqx_curv.experiments.data import digits


TARGET = 0.01
CHUNK = 10


def _optimizers():
    return {
        "SGD (defaults)": eqx_curv.SGD(),
        "SGD (lr 0.1)": eqx_curv.SGD(learning_rate=0.1),
        "Adam (defaults)": eqx_curv.FisherAdam(),
        "Adam (lr 1e-2)": eqx_curv.FisherAdam(learning_rate=1e-2),
        "K-FAC (defaults)": eqx_curv.KFAC(),
        "K-FAC (model every step)": eqx_curv.KFAC(adaptive_every=1, statistics_every=1),
    }


def _chunk_fn(opt, static, inputs, labels, loss, batch):
    @eqx.filter_jit
    def chunk(params, state, key):
        def body(carry, key):
            params, state = carry
            k1, k2 = jax.random.split(key)
            b = jax.random.choice(k1, labels.shape[0], (batch,), replace=False)
            model = eqx.combine(params, static)
            model, state, info = opt.step(
                model, state, loss, inputs[b], labels[b], key=k2
            )
            return (eqx.filter(model, eqx.is_array), state), info.skipped

        (params, state), skipped = jax.lax.scan(
            body, (params, state), jax.random.split(key, CHUNK)
        )
        return params, state, skipped.any()

    @eqx.filter_jit
    def full_loss(params):
        return loss(jax.vmap(eqx.combine(params, static))(inputs), labels)

    return chunk, full_loss


def _start(opt, seed, inputs, labels, loss, batch):
    """The MLP from `seed`, its optimizer state and its compiled chunk and loss."""
    model = eqx.nn.MLP(
        64, 10, 256, 2, jnp.tanh, key=jax.random.key(seed), dtype=jnp.float32
    )
    params, static = eqx.partition(model, eqx.is_array)
    chunk, full_loss = _chunk_fn(opt, static, inputs, labels, loss, batch)
    return params, opt.init(model), chunk, full_loss


def run_digits(seeds: int, max_steps: int, batch: int = 128) -> None:
    inputs, labels = (jnp.asarray(a) for a in digits())
    loss = eqx_curv.SoftmaxCrossEntropy()
    print(f"digits, MLP 64-256-256-10 tanh, batch {batch}, target loss {TARGET}")
    print(
        f"{seeds} seeds; steps and training wall seconds to the target (compilation "
        "excluded: each run is compiled and warmed up first; the full training loss "
        f"is checked every {CHUNK} steps and its evaluation is not timed); "
        f"cap {max_steps} steps"
    )
    print(
        "| optimizer | steps to 0.01 (per seed) | seconds (per seed) | last loss checked |"
    )
    print("| --- | --- | --- | --- |")
    results = {}
    for name, opt in _optimizers().items():
        steps_taken, seconds, finals = [], [], []
        for seed in range(seeds):
            params, state, chunk, full_loss = _start(
                opt, seed, inputs, labels, loss, batch
            )
            warm = chunk(params, state, jax.random.key(0))
            jax.block_until_ready(warm)
            float(full_loss(params))
            key = jax.random.fold_in(jax.random.key(1), seed)
            elapsed, steps, reached = 0.0, 0, None
            while steps < max_steps:
                key, sub = jax.random.split(key)
                start = time.perf_counter()
                params, state, _ = chunk(params, state, sub)
                jax.block_until_ready(params)
                elapsed += time.perf_counter() - start
                steps += CHUNK
                value = float(full_loss(params))
                if value <= TARGET:
                    reached = steps
                    break
            steps_taken.append(reached)
            seconds.append(elapsed if reached is not None else None)
            finals.append(value)

        def show(values, fmt):
            return ", ".join("-" if v is None else fmt.format(v) for v in values)

        print(
            f"| {name} | {show(steps_taken, '{}')} | {show(seconds, '{:.2f}')} | "
            f"{show(finals, '{:.2g}')} |"
        )
        results[name] = (steps_taken, seconds)

    def median(values):
        # A run that never reached the target counts as infinitely long.
        return float(np.median([np.inf if v is None else v for v in values]))

    kfac_steps, kfac_seconds = (median(v) for v in results["K-FAC (defaults)"])
    print()
    for name in ("Adam (defaults)", "Adam (lr 1e-2)"):
        steps, seconds = (median(v) for v in results[name])
        met = kfac_steps < steps and kfac_seconds < seconds
        print(
            f"target: K-FAC fewer steps and less wall time than {name} (medians over "
            f"seeds): steps {kfac_steps:g} vs {steps:g}, seconds {kfac_seconds:.2f} "
            f"vs {seconds:.2f}: {'met' if met else 'NOT met'}"
        )


def run_tinyvit(rounds: int = 10, steps: int = 10) -> None:
    from eqx_curv.experiments.tinyvit import TinyViT

    model = TinyViT(jax.random.key(0), dropout=0.0)
    x = jax.random.uniform(jax.random.key(1), (128, 32, 32, 3))
    y = jax.random.randint(jax.random.key(2), (128,), 0, 10)
    loss = eqx_curv.SoftmaxCrossEntropy()
    opts = {
        "Adam": eqx_curv.FisherAdam(),
        "K-FAC, inverses every 1": eqx_curv.KFAC(inverse_every=1),
        "K-FAC, inverses every 10": eqx_curv.KFAC(inverse_every=10),
        "K-FAC, inverses every 100": eqx_curv.KFAC(inverse_every=100),
        "K-FAC, model every step": eqx_curv.KFAC(adaptive_every=1, statistics_every=1),
    }
    params, static = eqx.partition(model, eqx.is_array)
    runs = {}
    for name, opt in opts.items():
        # The batch is an argument, not a closed-over constant (XLA would spend
        # minutes constant-folding the finiteness check over it).
        @eqx.filter_jit
        def run(params, state, key, x, y, opt=opt):
            def body(pair, k):
                p, s = pair
                m, s, info = opt.step(eqx.combine(p, static), s, loss, x, y, key=k)
                return (eqx.filter(m, eqx.is_array), s), info.loss

            keys = jax.random.split(key, steps)
            return jax.lax.scan(body, (params, state), keys)[0]

        carry = run(params, opt.init(model), jax.random.key(0), x, y)
        jax.block_until_ready(carry)
        runs[name] = (run, carry)
    # Rounds interleaved; each optimizer carries its state on, so that the
    # `rounds * steps` timed steps include every amortised refresh they should
    # (one in 100 steps for "every 100"): the mean is the amortised step time.
    times = {name: [] for name in runs}
    for r in range(rounds):
        for name, (run, carry) in runs.items():
            start = time.perf_counter()
            carry = run(*carry, jax.random.key(r + 1), x, y)
            jax.block_until_ready(carry)
            times[name].append((time.perf_counter() - start) / steps)
            runs[name] = (run, carry)
    adam = float(np.mean(times["Adam"]))
    print(
        f"TinyViT ({sum(p.size for p in jax.tree.leaves(params))} parameters), "
        f"batch 128, {rounds * steps} steps each, interleaved"
    )
    print("| optimizer | ms per step (mean) | vs Adam |")
    print("| --- | --- | --- |")
    for name, values in times.items():
        mean = float(np.mean(values))
        print(f"| {name} | {1000 * mean:.0f} | {mean / adam:.2f}x |")


def run_schedules(seeds: int, max_steps: int, batch: int = 128) -> None:
    """K-FAC's schedules on digits: steps to 1e-2, 1e-3 and 1e-4, and the largest
    full training loss after first reaching 1e-2 (a blow-up shows there)."""
    inputs, labels = (jnp.asarray(a) for a in digits())
    loss = eqx_curv.SoftmaxCrossEntropy()
    schedules = {
        "model and statistics every step": eqx_curv.KFAC(
            adaptive_every=1, statistics_every=1
        ),
        "model every 5": eqx_curv.KFAC(adaptive_every=5, statistics_every=1),
        "model every 5, statistics every 2": eqx_curv.KFAC(adaptive_every=5),
        "model every 10, statistics every 2 (default)": eqx_curv.KFAC(),
    }
    print(f"digits, MLP 64-256-256-10 tanh, batch {batch}, {max_steps} steps")
    print("| schedule | steps to 1e-2 | to 1e-3 | to 1e-4 | largest loss after 1e-2 |")
    print("| --- | --- | --- | --- | --- |")
    for name, opt in schedules.items():
        hits = {t: [] for t in (1e-2, 1e-3, 1e-4)}
        largest = []
        for seed in range(seeds):
            params, state, chunk, full_loss = _start(
                opt, seed, inputs, labels, loss, batch
            )
            key = jax.random.fold_in(jax.random.key(1), seed)
            reached: dict[float, int] = {}
            after = []
            for steps in range(CHUNK, max_steps + 1, CHUNK):
                key, sub = jax.random.split(key)
                params, state, _ = chunk(params, state, sub)
                value = float(full_loss(params))
                if 1e-2 in reached:
                    after.append(value)
                for target in hits:
                    if value <= target:
                        reached.setdefault(target, steps)
            for target in hits:
                hits[target].append(reached.get(target))
            largest.append(max(after) if after else None)

        def show(values, fmt="{}"):
            return ", ".join("-" if v is None else fmt.format(v) for v in values)

        print(
            f"| {name} | {show(hits[1e-2])} | {show(hits[1e-3])} | "
            f"{show(hits[1e-4])} | {show(largest, '{:.2g}')} |",
            flush=True,
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=2000)
    parser.add_argument("--tinyvit", action="store_true")
    parser.add_argument("--schedules", action="store_true")
    args = parser.parse_args()
    if args.tinyvit:
        run_tinyvit()
    elif args.schedules:
        run_schedules(args.seeds, args.max_steps)
    else:
        run_digits(args.seeds, args.max_steps)
