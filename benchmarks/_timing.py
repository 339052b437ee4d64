"""Interleaved timing shared by the benchmarks (run as scripts, so imported by name)."""

import statistics
import time
from collections.abc import Callable, Hashable

import jax


def interleaved_medians(
    calls: dict[Hashable, Callable[[], object]], repeats: int
) -> dict[Hashable, float]:
    """Median milliseconds of each compiled call, timed in round-robin rounds so that
    load from other processes affects every call alike."""
    times: dict[Hashable, list[float]] = {k: [] for k in calls}
    for _ in range(repeats):
        for k, call in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            times[k].append(time.perf_counter() - start)
    return {k: 1e3 * statistics.median(t) for k, t in times.items()}


def optax_adam_step(loss, static, tx):
    """The anchor every benchmark times against: one `jax.value_and_grad` of the mean
    loss of the batched model `eqx.combine(params, static)`, `tx.update` and
    `optax.apply_updates`, as one function of `(params, state, x, y)`."""
    import equinox as eqx
    import optax

    def adam_step(params, state, x, y):
        value, g = jax.value_and_grad(
            lambda p: loss(jax.vmap(eqx.combine(p, static))(x), y)
        )(params)
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state, value

    return adam_step
