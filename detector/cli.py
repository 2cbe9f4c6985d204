"""``weightbias``: the one command line of the project, a thin layer over the packages.

Lives in :mod:`detector` because that package is last in the flow and may import the others.
Subcommands parse, call one public function and print; each handler imports what it calls
when it runs, so ``weightbias --help`` starts without torch, Ray or scikit-learn.

Exit status: 0 done, 1 a check found problems (``zoo verify``), 2 bad input (every
:class:`~modelzoo.errors.WeightbiasError`, printed as one line naming the input), 130
interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import sys

from detector.commands import add_detector_commands
from modelzoo.cli import add_zoo_commands
from modelzoo.errors import WeightbiasError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weightbias",
        description="Find hidden bias in neural networks by reading their weights.",
        epilog="typical use:\n"
               "  weightbias zoo generate SPEC.toml --out ZOO.zarr      generate a model zoo (Ray)\n"
               "  weightbias detector train ZOO.zarr --out DET          learn a bias detector from it\n"
               "  weightbias score MODEL.pt --detector DET              judge your own checkpoint\n"
               "  weightbias compare ZOO.zarr --out REPORT              how regularizers move weights\n"
               "'weightbias COMMAND --help' says more about each command.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_zoo_commands(commands)
    add_detector_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except WeightbiasError as err:
        print(f"weightbias: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("weightbias: interrupted; what was finished is kept (re-run the same command to go on)",
              file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
