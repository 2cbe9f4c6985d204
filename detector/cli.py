"""``weightbias``: the one command line of the project, a thin layer over the packages.

Lives in :mod:`detector` because that package is last in the flow and may import the others.
"""

from __future__ import annotations

import argparse
import sys

from detector.commands import add_detector_commands
from detector.insidebias import InsideBiasError
from detector.models import DetectorError
from modelzoo.architectures import ArchitectureError
from modelzoo.checkpoints import CheckpointError
from modelzoo.cli import add_zoo_commands
from modelzoo.datasets import DatasetError
from modelzoo.faces import FaceDataError
from modelzoo.generate import GenerateError
from modelzoo.sources import DataSourceError
from modelzoo.spec import SpecError
from modelzoo.store import StoreError

# The project's own errors: reported as one clear line, never as a traceback.
USER_ERRORS = (ArchitectureError, CheckpointError, DatasetError, DataSourceError, DetectorError,
               FaceDataError, GenerateError, InsideBiasError, SpecError, StoreError)


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
    except USER_ERRORS as err:
        print(f"weightbias: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
