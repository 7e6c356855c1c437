"""The ``gradwise`` command: one entry point, one module per subcommand.

Each subcommand module exposes ``register(subparsers, summary)``, which adds its parser and
sets ``handler`` to a function ``args -> int``. Only the module of the subcommand given is
imported (:data:`SUBCOMMANDS`): ``gradwise --help`` loads no layer of the library, and
``gradwise plan ...`` not the training loop, DTensor or matplotlib; each subcommand imports its
heavy layers in the function that runs it. The command line stays thin: parse, call the
library, print, plot. Bad input is one line on stderr and exit code 2; a failure of the
machine (disk full, a lost worker) one line and exit code 1 (:func:`explain`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from gradwise import __version__
from gradwise.cli.launch import lost_peer
from gradwise.cli.parsing import OneLineErrorParser, UsageError, out_of_memory

SUBCOMMANDS = {
    "race": "race optimizers on test problems (table, plots, JSON)",
    "schedule": "plot learning-rate schedules and print their lr and area",
    "plan": "planning models: memory, step time, batch size, stability, network, failures",
    "train": "train a workload (tiny-gpt, mlp, logreg, your data) with checkpoints, guards and plots",
    "distributed": "parameter server, FedAvg, ADMM and split learning on N processes",
    "landscape": "a trained run's loss landscape (line, plane), sharpness and per-layer curvature",
}
"""Subcommand (its module ``gradwise.cli.NAME``) -> its line in ``gradwise --help``."""


def chosen_command(argv: list[str]) -> str | None:
    """The subcommand ``argv`` names: its first word that is not an option (the top-level options take
    no value), if it is a subcommand."""
    first = next((word for word in argv if not word.startswith("-")), None)
    return first if first in SUBCOMMANDS else None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``gradwise`` parser with ``command``'s full parser; the others (all, for ``None``) are named with
    their summary only, enough for ``gradwise --help`` and for refusing an unknown name."""
    parser = OneLineErrorParser(
        prog="gradwise",
        description="Optimization methods for large-scale machine learning, on PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"gradwise {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineErrorParser)
    subparsers.required = True
    for name, summary in SUBCOMMANDS.items():
        if name == command:
            importlib.import_module(f"gradwise.cli.{name}").register(subparsers, summary)
        else:
            subparsers.add_parser(name, help=summary)
    return parser


def explain(error: Exception, args: argparse.Namespace) -> tuple[int, str] | None:
    """The exit code and the one line for an error the command line knows, else ``None`` (a bug: traceback).

    Bad input (``UsageError``, ``ValueError``, a request too large for memory) is exit 2; a
    failure of the machine or of another process (an ``OSError`` such as a full disk, a
    worker that lost its peers) is exit 1.
    """
    if isinstance(error, (UsageError, ValueError)):
        return 2, str(error)
    if (message := out_of_memory(error)) is not None:
        return 2, message
    if (message := lost_peer(error, getattr(args, "run_folder", None))) is not None:
        return 1, message
    if isinstance(error, OSError):
        where = f": {error.filename!r}" if error.filename is not None else ""
        return 1, f"{error.strerror or error}{where}"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(chosen_command(argv)).parse_args(argv)
    args.argv = argv  # what a relaunch (train --nproc) repeats
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print(f"gradwise {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        explained = explain(error, args)
        if explained is None:
            raise
        code, message = explained
        # under torchrun every rank finds the same bad input: rank 0 says it; a lost peer is each rank's own news
        if code == 1 or os.environ.get("RANK", "0") == "0":
            print(f"gradwise {args.command}: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
