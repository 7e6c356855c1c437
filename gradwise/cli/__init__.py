"""The ``gradwise`` command: one entry point, one module per subcommand.

Each subcommand module exposes ``register(subparsers)``, which adds its parser and sets
``handler`` to a function ``args -> int``. The command line stays thin: parse, call the
library, print, plot. Bad input is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from gradwise import __version__
from gradwise.cli import distributed, plan, race, schedule, train
from gradwise.cli.parsing import OneLineErrorParser, UsageError

SUBCOMMANDS = (race, schedule, plan, train, distributed)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="gradwise",
        description="Optimization methods for large-scale machine learning, on PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"gradwise {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineErrorParser)
    subparsers.required = True
    for module in SUBCOMMANDS:
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a relaunch (train --nproc) repeats
    try:
        return int(args.handler(args) or 0)
    except (UsageError, ValueError) as error:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank finds the same error: say it once
            print(f"gradwise {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gradwise {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
