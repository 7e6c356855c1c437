"""``gradwise race``: run optimizers on test problems with a fair learning-rate sweep."""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

from tqdm import tqdm

from gradwise.bench.optimizers import DEFAULT_OPTIMIZERS, OPTIMIZERS, get_optimizer
from gradwise.bench.race import planned_runs, race
from gradwise.bench.report import format_table, to_json
from gradwise.cli import logistic_race, workload_race
from gradwise.cli.parsing import UsageError, check_output_folder, output_folder, parse_key_values, parse_list
from gradwise.problems import PROBLEMS, Problem
from gradwise.train.config import LARGEST_SEED
from gradwise.validation import check_choice, check_int, check_range

DEFAULT_PROBLEMS = ("rosenbrock", "beale", "quadratic")
DEFAULT_STEPS = 1000
DEFAULT_SWEEP_POINTS = 9
DEFAULT_TOL = 1e-6
DEFAULT_OUT = "race-results"

DESCRIPTION = f"""\
Race optimizers on test problems with known minima. Every optimizer runs the same number of
steps from each problem's standard starting point. Its learning rate is either given (--lr)
or chosen by a sweep: the same number of rates (--sweep-points, default {DEFAULT_SWEEP_POINTS})
on a log grid over each optimizer's own range, keeping the run that reaches the tolerance
first (or, failing that, ends lowest). Each optimizer then runs alone at its chosen rate,
timed; that run is reported.

Prints a table per problem (final loss, distance to the minimiser, steps to tolerance, wall
time) and writes PNGs into --out: loss-versus-step curves (log scale) for every problem, and
a contour plot with every trajectory for 2-D problems.

optimizers (sweep range of lr):
""" + "\n".join(
    f"  {name:<9} {spec.lr_range[0]:<8.3g} .. {spec.lr_range[1]:<6.3g} {spec.description}"
    for name, spec in OPTIMIZERS.items()
) + f"""

problems: {", ".join(PROBLEMS)}; logistic (alone: its own race, see below)

--workload NAME races on a training workload instead (see "workload race" below)."""

EPILOG = """\
examples:
  gradwise race
  gradwise race --optimizers adam,lion --problems rosenbrock --dim 10 --steps 3000
  gradwise race --problems quadratic --dim 50 --kappa 1000 --lr sgd=1,adam=0.1 --json
  gradwise race --workload tiny-gpt --workload-options n_layer=2 --optimizers adamw,muon,soap \
      --steps 400 --trials 4 --seeds 3 --out tiny-gpt-race
  gradwise race --workload mlp --optimizers adamw,lion,lbfgs --budget-minutes 10 --out mlp-race"""


def register(subparsers: argparse._SubParsersAction, summary: str) -> None:
    """Add the ``race`` parser; ``summary`` is its line in ``gradwise --help``."""
    parser = subparsers.add_parser(
        "race",
        help=summary,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--optimizers",
        metavar="LIST",
        help=f"comma-separated optimizer names (default: {','.join(DEFAULT_OPTIMIZERS)}; with --workload: "
        f"{workload_race.DEFAULT_OPTIMIZERS}, names of gradwise train)",
    )
    parser.add_argument(
        "--problems",
        "--problem",
        default=",".join(DEFAULT_PROBLEMS),
        metavar="LIST",
        help="comma-separated problem names (default: %(default)s); 'logistic' alone runs the logistic race",
    )
    parser.add_argument(
        "--dim",
        type=int,
        metavar="N",
        help="dimension of rosenbrock, rastrigin and quadratic (default: 2; beale is always 2-D)",
    )
    parser.add_argument("--kappa", type=float, metavar="K", help="condition number of quadratic (default: 100)")
    parser.add_argument("--seed", type=int, metavar="S", help="seed of quadratic's random rotation (default: 0)")
    parser.add_argument(
        "--steps", type=int, metavar="N",
        help=f"optimizer steps per run (default: {DEFAULT_STEPS}; with --workload: the workload's)"
    )
    parser.add_argument(
        "--lr",
        default="",
        metavar="NAME=LR,...",
        help="fixed learning rates, e.g. adam=1e-2,sgd=1e-3; these optimizers skip the sweep",
    )
    parser.add_argument(
        "--sweep-points",
        type=int,
        default=DEFAULT_SWEEP_POINTS,
        metavar="K",
        help="learning rates tried per optimizer and problem (default: %(default)s)",
    )
    parser.add_argument(
        "--tol",
        type=float,
        default=DEFAULT_TOL,
        metavar="T",
        help="target for f(x) - f*, for 'steps to tol' and the ranking (default: %(default)g)",
    )
    parser.add_argument(
        "--out", type=output_folder, default=Path(DEFAULT_OUT), metavar="DIR",
        help="directory for plots and JSON (default: %(default)s)"
    )
    parser.add_argument("--json", action="store_true", help="also write the tables as DIR/race.json")
    parser.add_argument("--no-plots", action="store_true", help="write no PNGs")
    logistic_race.add_arguments(parser)
    workload_race.add_arguments(parser)
    parser.set_defaults(handler=lambda args: run(args, parser))


def _names(text: str, option: str, noun: str, choices) -> list[str]:
    """The names in a comma-separated ``option`` value, each checked against ``choices``."""
    names = parse_list(text)
    if not names:
        raise UsageError(f"{option} needs at least one name")
    for name in names:
        check_choice(noun, name, choices)
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UsageError(f"{option} lists {', '.join(repeated)} more than once")
    return names


def build_problems(names: list[str], dim: int | None, kappa: float | None, seed: int | None) -> list[Problem]:
    """The problems called ``names``; ``dim``, ``kappa`` and ``seed`` go to those whose
    constructor takes them (``None``: the problem's default)."""
    options = {"dim": dim, "kappa": kappa, "seed": seed}
    problems = []
    for name in names:
        factory = PROBLEMS[name]
        accepted = inspect.signature(factory).parameters
        kwargs = {key: value for key, value in options.items() if value is not None and key in accepted}
        problems.append(factory(**kwargs))
    return problems


def check_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, float]:
    """Check every option, whichever race runs and whether or not a problem uses it (an option that
    is ignored without a word hides a typo), filling in the test problems' defaults; returns the
    fixed learning rates of ``--lr``."""
    for dest in workload_race.OWN_OPTIONS:
        if getattr(args, dest) != parser.get_default(dest):
            raise UsageError(f"--{dest.replace('_', '-')} applies to a race with --workload")
    args.optimizers = args.optimizers or ",".join(DEFAULT_OPTIMIZERS)
    args.steps = DEFAULT_STEPS if args.steps is None else args.steps
    optimizers = _names(args.optimizers, "--optimizers", "optimizer", OPTIMIZERS)
    if not logistic_race.wants_logistic(args.problems):
        _names(args.problems, "--problems", "problem", PROBLEMS)
    if args.dim is not None:
        check_int("dim", args.dim, 2)
    if args.kappa is not None:
        check_range("kappa", args.kappa, 1.0)
    if args.seed is not None:
        check_int("seed", args.seed, 0, LARGEST_SEED)
    check_int("steps", args.steps, 1)
    check_int("sweep-points", args.sweep_points, 1)
    check_range("tol", args.tol, 0.0)
    lrs = parse_key_values(args.lr, "--lr")
    for name, lr in lrs.items():
        if name not in optimizers:
            raise UsageError(f"--lr sets {name!r}, which is not in --optimizers")
        check_range(f"lr of {name}", lr, 0.0, low_open=True)
    logistic_race.check_arguments(args)
    check_output_folder(str(args.out))
    return lrs


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Check the arguments, run the race, print the tables and write the files; return 0."""
    if workload_race.wants_workload(args):
        kept = workload_race.OWN_OPTIONS + workload_race.SHARED_OPTIONS
        workload_race.refuse_options_of(parser, args, kept, "a race with --workload")
        return workload_race.run(args)
    lrs = check_arguments(args, parser)
    if logistic_race.wants_logistic(args.problems):
        return logistic_race.run(args)
    optimizers = [get_optimizer(name) for name in parse_list(args.optimizers)]
    problems = build_problems(parse_list(args.problems), args.dim, args.kappa, args.seed)
    out = Path(args.out)

    total = planned_runs(len(problems), optimizers, args.sweep_points, lrs)
    with tqdm(total=total, desc="race", unit="run", file=sys.stderr, disable=None, leave=False) as bar:
        result = race(
            problems,
            optimizers,
            args.steps,
            tol=args.tol,
            sweep_points=args.sweep_points,
            lrs=lrs,
            on_runs=bar.update,
        )

    print("\n\n".join(format_table(result, problem) for problem in result.problems))
    written: list[Path] = []
    if not args.no_plots:
        from gradwise.bench.plots import plot_race  # matplotlib, only for the plots

        written += plot_race(result, out)
    if args.json:
        out.mkdir(parents=True, exist_ok=True)
        path = out / "race.json"
        path.write_text(json.dumps(to_json(result), indent=2, allow_nan=False) + "\n")
        written.append(path)
    if written:
        print(f"\nwrote {len(written)} files to {args.out}/: {', '.join(path.name for path in written)}")
    return 0
