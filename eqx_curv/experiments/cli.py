"""The `eqx-curv` command line: one subcommand per experiment.

Each subcommand lives in its own module under `eqx_curv.experiments`, which defines

- `add_arguments(parser)`: adds the subcommand's flags to an `argparse` parser;
- `run(args)`: runs it, given the parsed `argparse.Namespace`, and returns an exit code
  (`0` or `None` for success).

To add a subcommand, write such a module and register it with one line in
`SUBCOMMANDS` below, with its one-line description. Only the module of the subcommand
being run (or asked for `--help`) is imported: `eqx-curv --help` imports none of them,
so one experiment's optional dependencies never break another, and listing the
subcommands does not import JAX.
"""

import argparse
import importlib
import sys
from collections.abc import Sequence


# name -> (module relative to this package, one-line description).
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "compare": (
        ".compare",
        "Build each curvature operator on an MLP trained on sklearn digits, solve a "
        "damped Newton system with eqx_curv.CG, and print a comparison table.",
    ),
    "train": (
        ".train",
        "Train TinyViT with every network optimizer on the same batches: loss "
        "curves, test accuracy, speed, a table and figures.",
    ),
    "toy2d": (
        ".toy2d",
        "The 2-D quartic: each classical minimiser's 15 steps, as a PNG and a table.",
    ),
}


def _load(name: str):
    return importlib.import_module(SUBCOMMANDS[name][0], package=__package__)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only `command`'s module is imported for its flags."""
    parser = argparse.ArgumentParser(
        prog="eqx-curv",
        description="Experiments with curvature operators and second-order optimizers.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, description) in SUBCOMMANDS.items():
        subparser = sub.add_parser(name, help=description, description=description)
        if name == command:
            module = _load(name)
            module.add_arguments(subparser)
            subparser.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `eqx-curv` script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # The subcommand is the first argument (the top level has no options but --help).
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    args = build_parser(command).parse_args(argv)
    code = args._module.run(args)
    return 0 if code is None else int(code)


if __name__ == "__main__":
    sys.exit(main())
