"""``gradwise race --problem logistic``: the stochastic-vs-batch comparison on sparse
logistic regression (see :mod:`gradwise.bench.logistic_race`).

Hooked into ``gradwise race``: :func:`add_arguments` adds the options of this race to that
parser, and ``race`` hands over to :func:`run` when the problem list is ``logistic``.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from tqdm import tqdm

from gradwise.bench.logistic_race import (
    DEFAULT_SIZE,
    FULL_SIZE,
    METHODS,
    format_logistic_table,
    logistic_race,
    plot_logistic_race,
    to_json,
)
from gradwise.cli.parsing import UsageError, parse_list
from gradwise.problems.logistic import SparseLogistic
from gradwise.validation import check_choice, check_int, check_range

PROBLEM = "logistic"
DEFAULT_EPOCHS = 10.0
DEFAULT_BATCH_SIZE = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the logistic race (ignored by the other problems)."""
    group = parser.add_argument_group(
        "logistic",
        f"--problem {PROBLEM}: SGD, SVRG, SAGA, L-BFGS, SQN and Newton-CG on L2-regularised logistic "
        f"regression (sparse, RCV1-shaped synthetic data), F - F* against examples accessed. "
        f"Default size {DEFAULT_SIZE['num_examples']} x {DEFAULT_SIZE['num_features']} (about a minute); "
        f"--full-size: {FULL_SIZE['num_examples']} x {FULL_SIZE['num_features']}.",
    )
    group.add_argument(
        "--epochs", type=float, default=DEFAULT_EPOCHS, metavar="E",
        help="budget of examples accessed per method, in passes over the data (default: %(default)g)",
    )
    group.add_argument("--batch-size", type=int, metavar="B",
                       help=f"mini-batch size (default: {DEFAULT_BATCH_SIZE}; with --workload: the workload's)")
    group.add_argument("--full-size", action="store_true", help="RCV1's shape: 20,000 examples, 47,000 features")
    group.add_argument("--methods", default=",".join(METHODS), metavar="LIST", help="default: %(default)s")


def wants_logistic(problems: str) -> bool:
    """Whether the ``--problems`` value selects this race (alone)."""
    names = parse_list(problems)
    if PROBLEM in names and len(names) > 1:
        raise UsageError(f"--problem {PROBLEM} runs its own race; give it alone")
    return names == [PROBLEM]


def check_arguments(args: argparse.Namespace) -> None:
    """Check this race's options (also when another race runs: a wrong value is refused, not ignored)."""
    methods = parse_list(args.methods)
    if not methods:
        raise UsageError("--methods needs at least one method")
    for method in methods:
        check_choice("method", method, METHODS)
    check_range("epochs", args.epochs, 0.0, low_open=True)
    if args.batch_size is None:
        args.batch_size = DEFAULT_BATCH_SIZE
    check_int("batch-size", args.batch_size, 1)


def run(args: argparse.Namespace) -> int:
    """Run the logistic race, print its table, write the plot (and JSON); the options are checked."""
    methods = parse_list(args.methods)
    out = Path(args.out)
    size = FULL_SIZE if args.full_size else DEFAULT_SIZE
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        problem = SparseLogistic(**size, seed=0 if args.seed is None else args.seed)
        bar = tqdm(total=len(methods), desc="logistic race", unit="method", file=sys.stderr, disable=None, leave=False)
        with bar:
            result = logistic_race(problem, tuple(methods), epochs=args.epochs, batch_size=args.batch_size,
                                   on_method=lambda _: bar.update())
    print(format_logistic_table(result))
    written = []
    if not args.no_plots:
        written.append(plot_logistic_race(result, out / "logistic.png"))
    if args.json:
        out.mkdir(parents=True, exist_ok=True)
        path = out / "logistic.json"
        path.write_text(json.dumps(to_json(result), indent=2) + "\n")
        written.append(path)
    if written:
        print(f"\nwrote {len(written)} files to {args.out}/: {', '.join(path.name for path in written)}")
    return 0
