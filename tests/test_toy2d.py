"""The `eqx-curv toy2d` experiment writes its figure and prints its table."""

import os

import pytest


def _check_png(path):
    assert path.exists() and os.path.getsize(path) > 10_000
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _check_table(out, titles):
    for title in titles:
        (row,) = [line for line in out.splitlines() if line.startswith(title + "  ")]
        loss, grad = (float(x) for x in row[len(title) :].split())
        assert grad >= 0 and loss == loss  # numbers, not NaN


def test_toy2d_figure_and_table(tmp_path):
    from eqx_curv.experiments.toy2d import methods, run_experiment

    panels = [methods()[0], methods()[-3]]  # fixed-step GD, line-search BFGS
    png, table = run_experiment(str(tmp_path), num_steps=3, panels=panels)
    _check_png(tmp_path / "toy2d.png")
    assert png == str(tmp_path / "toy2d.png")
    _check_table(table, [title for title, _ in panels])


def test_toy2d_is_a_cli_subcommand(capsys):
    from eqx_curv.experiments.cli import main

    with pytest.raises(SystemExit) as info:
        main(["toy2d", "--help"])
    assert info.value.code == 0
    assert "--out" in capsys.readouterr().out


@pytest.mark.slow
def test_toy2d_cli_every_panel(tmp_path, capsys):
    from eqx_curv.experiments.cli import main
    from eqx_curv.experiments.toy2d import methods

    assert main(["toy2d", "--out", str(tmp_path), "--steps", "2"]) == 0
    _check_png(tmp_path / "toy2d.png")
    _check_table(capsys.readouterr().out, [title for title, _ in methods()])


def test_trajectory_of_fixed_step_gradient_descent():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from eqx_curv import GradientDescent
    from eqx_curv.experiments.problems import quartic, QUARTIC_START
    from eqx_curv.experiments.toy2d import trajectory

    path = trajectory(GradientDescent(rtol=0.0, atol=0.0, step_size=0.1), 3)
    z = jnp.array(QUARTIC_START)
    expected = [z]
    for _ in range(3):
        z = z - 0.1 * jax.grad(quartic)(z)
        expected.append(z)
    np.testing.assert_allclose(path, np.stack(expected), rtol=1e-12)
