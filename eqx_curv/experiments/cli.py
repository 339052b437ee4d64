"""The `eqx-curv` command line: one subcommand per experiment.

Each subcommand lives in its own module under `eqx_curv.experiments`, which defines

- `HELP`: a one-line description shown by `eqx-curv --help`;
- `add_arguments(parser)`: adds the subcommand's flags to an `argparse` parser;
- `run(args)`: runs it, given the parsed `argparse.Namespace`, and returns an exit code
  (`0` or `None` for success).

To add a subcommand, write such a module and register it with one line in
`SUBCOMMANDS` below. Modules are imported only when their subcommand runs (or when
`--help` lists them), so one experiment's optional dependencies never break another.
"""

import argparse
import importlib
import sys
from collections.abc import Sequence


# name -> module (relative to this package). Register new subcommands here.
SUBCOMMANDS: dict[str, str] = {
    "compare": ".compare",
    "toy2d": ".toy2d",
}


def _load(name: str):
    return importlib.import_module(SUBCOMMANDS[name], package=__package__)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="eqx-curv",
        description="Experiments with curvature operators and second-order optimizers.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        module = _load(name)
        subparser = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(subparser)
        subparser.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `eqx-curv` script."""
    args = build_parser().parse_args(argv)
    code = args._module.run(args)
    return 0 if code is None else int(code)


if __name__ == "__main__":
    sys.exit(main())
