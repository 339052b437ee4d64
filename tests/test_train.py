"""`eqx-curv train` end to end, on a tiny TinyViT and a few steps.

The runs are subprocesses: compilation dominates these tests, and a fresh process can
compile at XLA's lowest backend optimisation level (the numbers are not timed here),
and can force several CPU devices before JAX starts. They run under the suite's
numerics (float64 enabled, strict dtype promotion, rank promotion an error) set
through JAX's environment variables.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest


# No `--batch-size`: each row runs at its default batch (128, and 32 for the
# Gauss-Newton and natural-gradient rows).
TINY = ["--model-size=tiny", "--chunk=2", "--eval-every=2", "--no-progress"]
PER_ROW = {"gauss-newton": 32, "natural-gradient": 32}
FIGURES = (
    "loss_sgd_diagonal.png",
    "loss_gauss_newton.png",
    "loss_adam_sqrt.png",
    "loss_fisher.png",
    "loss_shampoo.png",
    "loss_kfac.png",
    "loss_all.png",
    "loss_vs_time.png",
)


def _env(devices: int = 1) -> dict:
    env = dict(os.environ)
    # Compile fast: the lowest backend optimisation and no fusion emitters (2-3x less
    # compile time on CPU; nothing here is timed).
    flags = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
    if devices > 1:
        flags += f" --xla_force_host_platform_device_count={devices}"
    env.update(
        XLA_FLAGS=flags,
        JAX_ENABLE_X64="1",
        JAX_NUMPY_DTYPE_PROMOTION="strict",
        JAX_NUMPY_RANK_PROMOTION="raise",
        JAX_PLATFORMS="cpu",
    )
    return env


def _run_script(script: str, devices: int = 1) -> str:
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=_env(devices),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _main(*calls: list[str]) -> str:
    lines = ["from eqx_curv.experiments.cli import main"]
    lines += [f"assert main({argv!r}) == 0" for argv in calls]
    return "\n".join(lines)


def _results(out) -> dict:
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def every_optimizer(tmp_path_factory):
    """One run of every optimizer for 4 steps (two chunks of 2)."""
    out = tmp_path_factory.mktemp("train_all")
    stdout = _run_script(_main(["train", "--steps=4", f"--out={out}", *TINY]))
    return out, stdout


def test_every_optimizer_runs_and_the_table_is_printed(every_optimizer):
    from eqx_curv.experiments.train import OPTIMIZER_NAMES

    out, stdout = every_optimizer
    rows = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in rows[2:]] == list(OPTIMIZER_NAMES)
    assert (out / "results.md").read_text().strip() in stdout
    results = _results(out)
    assert list(results["optimizers"]) == list(OPTIMIZER_NAMES)
    for name, record in results["optimizers"].items():
        losses = np.array(record["curves"]["loss"], dtype=float)
        assert losses.shape == (4,) and np.isfinite(losses).all(), name
        assert record["skipped_steps"] == 0, name


def test_results_json_schema(every_optimizer):
    results = _results(every_optimizer[0])
    assert results["schema"] == "eqx-curv-train/1"
    assert results["dataset"] == "digits"
    assert results["model"]["size"] == "tiny" and results["model"]["parameters"] > 0
    # The flag was not given: null at the top, each row's own batch in its record.
    assert (results["steps"], results["batch_size"], results["chunk"]) == (4, None, 2)
    assert results["smoothing"] == 100 and results["devices"] == 1
    adam = results["optimizers"]["adam"]
    assert results["adam_final_loss"] == adam["final_loss"]
    # Adam reaches its own final loss, at the latest on its last step.
    assert 1 <= adam["step_to_adam_loss"] <= 4
    for name, r in results["optimizers"].items():
        assert isinstance(r["class"], str) and isinstance(r["settings"], dict), name
        assert r["batch_size"] == PER_ROW.get(name, 128) and r["steps"] == 4
        assert r["final_loss"] == pytest.approx(np.mean(r["curves"]["loss"]))
        assert 0 <= r["test_accuracy"] <= 1
        assert r["steps_per_s"] > 0 and r["wall_s"] > 0 and r["compile_s"] > 0
        curves = r["curves"]
        assert len(curves["smoothed_loss"]) == 4
        assert curves["chunk_end_steps"] == [2, 4]
        assert np.all(np.diff([0, *curves["chunk_end_wall_s"]]) > 0)
        assert curves["eval_steps"] == [2, 4]
        assert curves["test_accuracy"][-1] == r["test_accuracy"]
        step, time = r["step_to_adam_loss"], r["time_to_adam_loss"]
        assert (step is None) == (time is None)
        if step is not None:
            assert curves["smoothed_loss"][step - 1] <= adam["final_loss"]
            assert all(
                x > adam["final_loss"] for x in curves["smoothed_loss"][: step - 1]
            )
            assert 0 < time <= r["wall_s"]


def test_figures_are_written(every_optimizer):
    out = every_optimizer[0]
    for name in FIGURES:
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000, name


def test_resume_continues_to_the_uninterrupted_result(every_optimizer, tmp_path):
    # Half the steps, then `--resume` to all of them: bitwise the same losses, test
    # accuracies and final parameters and statistics as the run in one go, for a row
    # at batch 128 and one at its own batch 32. A checkpoint made at batch 32 is
    # refused when the flags give its row another batch.
    names = "--optimizers=adam,gauss-newton"
    half = tmp_path / "half.json"
    other_batch = ["--optimizers=gauss-newton", "--batch-size=8", "--resume"]
    _run_script(
        _main(["train", names, "--steps=2", f"--out={tmp_path}", *TINY])
        + f"\nimport shutil; shutil.copy({str(tmp_path / 'results.json')!r}, "
        + f"{str(half)!r})\n"
        + f"assert main({['train', *other_batch, '--steps=4', f'--out={tmp_path}', *TINY]!r}) == 2\n"
        + _main(["train", names, "--steps=4", "--resume", f"--out={tmp_path}", *TINY])
    )
    whole, resumed = _results(every_optimizer[0]), _results(tmp_path)
    first = json.loads(half.read_text())
    assert resumed["optimizers"]["gauss-newton"]["batch_size"] == 32
    for name in ("adam", "gauss-newton"):
        a = whole["optimizers"][name]["curves"]
        b = resumed["optimizers"][name]["curves"]
        # The first chunk was not run again: its time comes from the checkpoint.
        walls = first["optimizers"][name]["curves"]["chunk_end_wall_s"]
        assert b["chunk_end_wall_s"][:1] == walls
        assert a["chunk_end_steps"] == b["chunk_end_steps"] == [2, 4]
        assert a["eval_steps"] == b["eval_steps"] == [2, 4]
        assert a["loss"] == b["loss"] and a["test_accuracy"] == b["test_accuracy"]
        files = [
            out / "checkpoints" / name / "checkpoint.eqx"
            for out in (every_optimizer[0], tmp_path)
        ]
        assert files[0].read_bytes() == files[1].read_bytes(), name


@pytest.mark.slow  # a second compilation of the study on 2 forced devices
def test_data_parallel_over_forced_cpu_devices(every_optimizer, tmp_path):
    # `--devices 2` sets the device flag itself before JAX starts (the subprocess is
    # given none), splits each batch over the two devices and matches one device.
    script = (
        "import jax\n"
        + _main(
            [
                "train",
                "--optimizers=sgd",
                "--steps=4",
                "--devices=2",
                f"--out={tmp_path}",
                *TINY,
            ]
        )  # fmt: skip
        + "\nprint('DEVICES', jax.device_count())"
    )
    env_flags = _env(1)["XLA_FLAGS"]
    assert "device_count" not in env_flags
    stdout = _run_script(script)
    assert "DEVICES 2" in stdout
    results = _results(tmp_path)
    assert results["devices"] == 2
    one = _results(every_optimizer[0])["optimizers"]["sgd"]["curves"]["loss"]
    two = results["optimizers"]["sgd"]["curves"]["loss"]
    np.testing.assert_allclose(two, one, rtol=1e-5)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--optimizers=sgd,newton"], "unknown name(s) newton"),
        (["--batch-size=10", "--devices=4"], "not divisible by `--devices` 4"),
        (["--steps=0"], "`--steps` must be a positive integer"),
        (["--devices=3"], "default batch of sgd (128) is not divisible by"),
        (["--optimizers=gauss-newton", "--devices=64"], "gauss-newton (32)"),
    ],
)
def test_bad_flags_are_sentences(argv, message, capsys, tmp_path):
    from eqx_curv.experiments.cli import main

    assert main(["train", *argv, f"--out={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.rstrip().endswith(".")
    assert not any(tmp_path.iterdir())


def test_devices_after_jax_started_is_a_sentence(capsys, tmp_path, monkeypatch):
    # In this process JAX's backend already runs with one CPU device (the flag that
    # the command sets is undone afterwards, for later subprocesses).
    import jax

    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))

    from eqx_curv.experiments.cli import main

    argv = ["train", f"--devices={jax.device_count() + 1}", f"--out={tmp_path}"]
    assert main([*argv, "--batch-size=8", "--model-size=tiny"]) == 2
    assert "in a fresh process" in capsys.readouterr().err


def test_smoothing_and_time_interpolation():
    from eqx_curv.experiments.study import reach, smoothed, time_at_step

    losses = np.arange(1.0, 251.0)
    curve = smoothed(losses)
    assert curve[0] == 1 and curve[1] == 1.5 and curve[99] == 50.5
    assert curve[249] == np.mean(losses[150:])
    # Chunks of 10 steps taking 1 s and 3 s: step 15 falls half-way into the second.
    assert time_at_step(15, [10, 20], [1.0, 4.0]) == 2.5
    record = {
        "curves": {
            "smoothed_loss": [3.0, 2.0, 1.0, 0.5],
            "chunk_end_steps": [2, 4],
            "chunk_end_wall_s": [1.0, 2.0],
        }
    }
    assert reach(record, 1.0) == (3, 1.5)
    assert reach(record, 0.1) == (None, None)


def test_batch_per_row_and_the_flag_for_every_row():
    from eqx_curv.experiments.plots import table
    from eqx_curv.experiments.study import describe_batches
    from eqx_curv.experiments.train import batch_size, OPTIMIZER_NAMES

    for name in OPTIMIZER_NAMES:
        assert batch_size(name, None) == PER_ROW.get(name, 128)
        assert batch_size(name, 8) == 8
    names = ["adam", "gauss-newton", "natural-gradient"]
    assert describe_batches(names, None) == (
        "batch 128 (gauss-newton: 32; natural-gradient: 32)"
    )
    assert describe_batches(names, 8) == "batch 8"
    row = {
        "class": "X", "settings": {}, "final_loss": 1.0, "test_accuracy": 0.5,
        "steps_per_s": 1.0, "wall_s": 1.0, "compile_s": 1.0, "skipped_steps": 0,
        "step_to_adam_loss": None, "time_to_adam_loss": None,
    }  # fmt: skip
    results = {
        "dataset": "digits", "model": {"size": "tiny", "parameters": 1}, "steps": 1,
        "batch_size": None, "seed": 0, "smoothing": 100, "adam_final_loss": 1.0,
        "chunk": 1, "optimizers": {
            "adam": {**row, "batch_size": 128},
            "gauss-newton": {**row, "batch_size": 32},
        },
    }  # fmt: skip
    text = table(results)
    assert "batch per row" in text
    assert "| adam | X() | 128 |" in text and "| gauss-newton | X() | 32 |" in text


def test_cifar10_overrides_replace_the_digits_defaults_on_cifar10_alone():
    from eqx_curv.experiments.study import make_optimizer
    from eqx_curv.experiments.train import DEFAULTS, defaults, DEFAULTS_CIFAR10

    assert DEFAULTS_CIFAR10, "the CIFAR-10 sweep chose other rates for some rows"
    for name, (cls, kwargs) in DEFAULTS.items():
        assert defaults(name, "digits") == (cls, kwargs)
        assert defaults(name, "cifar10") == (
            cls,
            {**kwargs, **DEFAULTS_CIFAR10.get(name, {})},
        )
    name, changes = next(iter(DEFAULTS_CIFAR10.items()))
    rate = changes["learning_rate"]
    assert rate != DEFAULTS[name][1]["learning_rate"]
    assert make_optimizer(name, "cifar10").learning_rate == rate
    assert make_optimizer(name, "digits", learning_rate=0.5).learning_rate == 0.5
