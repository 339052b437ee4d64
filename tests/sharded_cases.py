"""Cases of `test_sharding.py`, run in a process of their own with 4 CPU devices.

JAX fixes its device count when it first starts, so the pytest process (one CPU
device) cannot hold them: `test_sharding.py` runs `python tests/sharded_cases.py
CASE...` with `XLA_FLAGS=--xla_force_host_platform_device_count=4`, and this script
prints one JSON line per case: the largest difference between the single-device and
the sharded results, or the error message raised.
"""

import json
import os
import sys


os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402


jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

import eqx_curv  # noqa: E402


# Square layers: a single gradient's statistics are then full rank, so their
# eigenbases (SOAP) do not depend on rounding in a null space. Tanh, not ReLU: a
# unit dead on the whole batch zeroes a row of its layer's gradient, and two of them
# leave an eigenspace whose basis only rounding decides (SOAP's bases and moments
# then differed between one device and four by 0.4 and the parameters by 3e-4).
MODEL = eqx.nn.MLP(6, 6, 6, 2, activation=jnp.tanh, key=jax.random.key(0))
INPUTS = jax.random.normal(jax.random.key(1), (16, 6))
TARGETS = jax.random.randint(jax.random.key(2), (16,), 0, 6)
LOSS = eqx_curv.SoftmaxCrossEntropy()
STEPS = 3

OPTIMIZERS = {
    # Factored inverses refreshed on steps 0 and 2, sampled (MC) factors. The
    # factors from the whole batch: a sub-batch is each device's first examples,
    # another (equally random) sample than one device's first examples.
    "kfac": lambda: eqx_curv.KFAC(inverse_every=2, statistics_batch=1.0),
    "kfac_exact": lambda: eqx_curv.KFAC(
        fisher_type="empirical",
        damping_method="exact",
        inverse_every=1,
        statistics_batch=1.0,
    ),
    # Blocks of 4: a stack of several roots per size, spread over the devices. With
    # the default ridge (1e-6 of the largest eigenvalue) a root of a single
    # gradient's statistic has condition ~1e6 and amplifies the rounding of the
    # batch sums (summed in another order when split) to ~5e-3 in the stored roots
    # (the parameters agree to 1e-5); a ridge of 1e-3 keeps the comparison about
    # the sharding.
    "shampoo": lambda: eqx_curv.Shampoo(block_size=4, root_every=1, epsilon=1e-3),
    # SOAP's first step is Adam's sign-like step in the statistics' eigenbasis: with
    # epsilon 1e-8 rounding-level coordinates there become +-1. A larger epsilon
    # keeps the comparison about the sharding, not that amplification.
    "soap": lambda: eqx_curv.SOAP(refresh_every=2, epsilon=1e-3),
    "muon": lambda: eqx_curv.Muon(),
    "fisher_adam_true": lambda: eqx_curv.FisherAdam(fisher="true"),
}


def _mesh():
    return Mesh(np.array(jax.devices()), ("data",))


def _run(init, step, inputs=INPUTS, targets=TARGETS, model=MODEL):
    state = init(model)
    step = eqx.filter_jit(step)
    for i in range(STEPS):
        model, state, info = step(
            model, state, LOSS, inputs, targets, key=jax.random.key(10 + i)
        )
    return model, state


def _difference(a, b) -> float:
    """The largest difference of two PyTrees' leaves, relative to each leaf's size."""
    worst = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if not (eqx.is_inexact_array(x) and x.size):
            continue
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        scale = max(float(np.max(np.abs(x))), 1.0)
        worst = max(worst, float(np.max(np.abs(x - y))) / scale)
    return worst


def compare(name: str, way: str) -> dict:
    """The largest difference of parameters and state after `STEPS` steps."""
    opt = OPTIMIZERS[name]()
    reference = _run(opt.init, opt.step)
    mesh = _mesh()
    if way == "shard_map":
        parallel = eqx_curv.data_parallel(opt, mesh)
        got = _run(parallel.init, parallel.step)
    elif way == "jit":
        # The plain way: the optimizer's own step under jit, the batch sharded.
        inputs = eqx_curv.shard_batch(INPUTS, mesh)
        targets = eqx_curv.shard_batch(TARGETS, mesh)
        got = _run(opt.init, opt.step, inputs, targets)
    else:  # the compiler partitions, the roots spread by `data_parallel`
        parallel = eqx_curv.data_parallel(opt, mesh, explicit=False)
        got = _run(parallel.init, parallel.step)
    return {"difference": _difference(reference, got)}


def roots() -> dict:
    """Inverse roots of a stack of blocks: spread over the devices and on one."""
    from eqx_curv._network_optimizers._blocking import map_matrices
    from eqx_curv._sharding.context import data_axis_bound, shard_map

    x = jax.random.normal(jax.random.key(3), (7, 5, 12))  # 7 blocks, not 4k
    stack = jnp.einsum("bij,bkj->bik", x, x) / 12

    def fn(m):
        return eqx_curv.inverse_pth_root(m, 4).root

    one = jax.jit(lambda s: map_matrices(fn, s))(stack)

    def body(s):
        with data_axis_bound("data", 4, True):
            return map_matrices(fn, s)

    P = jax.sharding.PartitionSpec
    spread = jax.jit(shard_map(body, mesh=_mesh(), in_specs=P(), out_specs=P()))(stack)
    return {"difference": _difference(one, spread)}


def operators() -> dict:
    """A GGN product and a damped CG solve on a batch sharded over the devices (the
    compiler partitions them), against the same on one device."""
    import lineax as lx

    def solve(inputs, targets, v):
        ggn = eqx_curv.GGNOperator(MODEL, LOSS, inputs, targets)
        damped = eqx_curv.DampedOperator(ggn, 1e-2)
        solver = eqx_curv.CG(rtol=1e-6, atol=1e-6, max_steps=50)
        return ggn.mv(v), lx.linear_solve(damped, v, solver).value

    params = eqx.filter(MODEL, eqx.is_inexact_array)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(4), len(leaves))
    v = jax.tree.unflatten(
        treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    )
    mesh = _mesh()
    one = jax.jit(solve)(INPUTS, TARGETS, v)
    inputs = eqx_curv.shard_batch(INPUTS, mesh)
    targets = eqx_curv.shard_batch(TARGETS, mesh)
    split = jax.jit(solve)(inputs, targets, v)
    return {"difference": _difference(one, split)}


def errors() -> dict:
    """The sentences for a batch that does not divide and a mesh without the axis."""
    out = {}
    opt = eqx_curv.SGD()
    parallel = eqx_curv.data_parallel(opt, _mesh())
    state = parallel.init(MODEL)
    try:
        parallel.step(MODEL, state, LOSS, INPUTS[:10], TARGETS[:10])
    except ValueError as e:
        out["indivisible"] = str(e)
    try:
        eqx_curv.data_parallel(opt, _mesh(), axis="batch")
    except ValueError as e:
        out["no_axis"] = str(e)
    try:
        eqx_curv.shard_batch(INPUTS[:6], _mesh())
    except ValueError as e:
        out["shard_batch"] = str(e)
    return out


def main(cases: list[str]) -> None:
    for case in cases:
        try:
            if case == "roots":
                result = roots()
            elif case == "operators":
                result = operators()
            elif case == "errors":
                result = errors()
            else:
                name, way = case.split(":")
                result = compare(name, way)
        except Exception as e:  # reported to the test, which fails with it
            result = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps({"case": case, **result}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
