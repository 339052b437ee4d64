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


def test_help_imports_no_subcommand_module():
    # In a fresh interpreter: listing the subcommands must not import any of them (nor
    # their optional dependencies); running one imports only that one.
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from eqx_curv.experiments.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit:\n"
        "    pass\n"
        "loaded = [m for m in ('eqx_curv.experiments.compare',"
        " 'eqx_curv.experiments.toy2d', 'matplotlib', 'tqdm', 'sklearn')"
        " if m in sys.modules]\n"
        "print('LOADED', ' '.join(loaded))\n"
    )

    def loaded(*argv):
        out = subprocess.run(
            [sys.executable, "-c", script, *argv],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        (line,) = [x for x in out.splitlines() if x.startswith("LOADED")]
        return set(line.split()[1:])

    assert loaded("--help") == set()
    assert "eqx_curv.experiments.compare" not in loaded("toy2d", "--help")
    assert "eqx_curv.experiments.toy2d" in loaded("toy2d", "--help")
