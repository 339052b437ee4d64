"""Data parallelism on 4 forced CPU devices, in a process of their own.

The cases live in `sharded_cases.py`; each test reads its line of that script's
output. The default suite runs K-FAC both ways (`shard_map` and `jit` with a sharded
batch), the roots spread over the devices and the error sentences; Shampoo, SOAP, Muon,
FisherAdam, the compiler-partitioned `data_parallel` and two processes on localhost
run under `-m slow`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


_SCRIPT = Path(__file__).with_name("sharded_cases.py")
_FAST = ["roots", "operators", "errors", "kfac:shard_map", "kfac:jit"]
_SLOW = [
    f"{name}:{way}"
    for name in ("kfac_exact", "soap", "muon", "fisher_adam_true")
    for way in ("shard_map", "jit")
] + ["shampoo:shard_map", "shampoo:jit", "kfac:compiler", "shampoo:compiler"]
# Float32 through a few steps, with sums over the batch in another order.
_TOLERANCE = 1e-4


def _run(cases: list[str]) -> dict[str, dict]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    env["PYTHONPATH"] = os.pathsep.join(
        [str(_SCRIPT.parent.parent), env.get("PYTHONPATH", "")]
    )
    done = subprocess.run(
        [sys.executable, str(_SCRIPT), *cases],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    results = {r["case"]: r for r in map(json.loads, lines)}
    assert results, done.stderr[-3000:]
    return results


@pytest.fixture(scope="module")
def fast():
    return _run(_FAST)


@pytest.fixture(scope="module")
def slow():
    return _run(_SLOW)


def _check(result: dict) -> None:
    assert "error" not in result, result["error"]
    assert result["difference"] <= _TOLERANCE, result


@pytest.mark.parametrize(
    "case", [c for c in _FAST if ":" in c] + ["roots", "operators"]
)
def test_sharded_step_equals_one_device(fast, case):
    _check(fast[case])


@pytest.mark.slow
@pytest.mark.parametrize("case", _SLOW)
def test_sharded_step_equals_one_device_slow(slow, case):
    _check(slow[case])


def test_bad_input_is_a_sentence(fast):
    result = fast["errors"]
    assert "does not divide across the 4 devices" in result["indivisible"]
    assert "multiple of 4" in result["indivisible"]
    assert "has no axis named 'batch'" in result["no_axis"]
    assert "does not divide" in result["shard_batch"]


def _bfloat16_case(name):
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    from helpers import NETWORK_OPTIMIZERS

    import eqx_curv

    def narrow(x):
        return x.astype(jnp.bfloat16) if eqx.is_inexact_array(x) else x

    model = jax.tree.map(narrow, eqx.nn.MLP(6, 4, 8, 1, key=jax.random.key(0)))
    inputs = jax.random.normal(jax.random.key(1), (16, 6)).astype(jnp.bfloat16)
    targets = jax.random.randint(jax.random.key(2), (16,), 0, 4)
    loss = eqx_curv.SoftmaxCrossEntropy()
    opt = NETWORK_OPTIMIZERS[name]()
    state = opt.init(model)
    step = eqx.filter_jit(opt.step)
    first = None
    for i in range(10):
        model, state, info = step(
            model, state, loss, inputs, targets, key=jax.random.key(i)
        )
        assert not bool(info.skipped), f"step {i} skipped"
        first = float(info.loss) if first is None else first
    params = jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
    assert {p.dtype for p in params} == {jnp.dtype(jnp.bfloat16)}
    assert all(bool(jnp.isfinite(p).all()) for p in params)
    floats = [
        x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)
    ]
    assert {x.dtype for x in floats} <= {jnp.dtype(jnp.float32)}
    assert float(info.loss) < first


def _names():
    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import NETWORK_OPTIMIZERS

    return list(NETWORK_OPTIMIZERS)


# The optimizers whose mixed precision needed more than `base.widened` run by
# default; every other one of the registry under -m slow.
_BFLOAT16_FAST = ("fisher_adam", "gauss_newton")


@pytest.mark.parametrize(
    "name",
    [
        n if n in _BFLOAT16_FAST else pytest.param(n, marks=pytest.mark.slow)
        for n in _names()
    ],
)
def test_bfloat16_model_trains_with_float32_statistics(name):
    _bfloat16_case(name)


@pytest.mark.slow
def test_two_processes_on_localhost_equal_one_device():
    # `jax.distributed` with the CPU backend: 2 processes x 2 devices, one mesh.
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    script = Path(__file__).with_name("multiprocess_case.py")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(script.parent.parent), env.get("PYTHONPATH", "")]
    )
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), port],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for out, err in outputs:
        lines = [x for x in out.splitlines() if "difference" in x]
        assert lines, err[-3000:]
        assert float(lines[-1].split()[-1]) <= 1e-4, lines
