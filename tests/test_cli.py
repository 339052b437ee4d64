"""The `eqx-curv` command line, on a tiny budget."""

import pytest


def test_compare_runs_and_prints_every_operator(capsys):
    from eqx_curv.experiments.cli import main

    code = main(
        [
            "compare",
            "--num-examples=64",
            "--width=8",
            "--depth=1",
            "--train-steps=3",
            "--max-cg-steps=5",
            "--no-progress",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "digits: 64 examples" in out
    for name in (
        "Hessian",
        "GGN",
        "Fisher (exact)",
        "Fisher (MC",
        "empirical Fisher",
    ):
        (row,) = [line for line in lines if line.startswith(name)]
        fields = row[28:].split()
        # result, CG steps (within the budget), residual, ms, step size, loss after
        assert fields[0] in {"successful", "max_steps_reached", "breakdown"}
        assert 0 <= int(fields[1]) <= 5
        assert float(fields[-1]) >= 0


def test_unknown_subcommand_is_an_argparse_error(capsys):
    from eqx_curv.experiments.cli import main

    with pytest.raises(SystemExit) as info:
        main(["no-such-command"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
