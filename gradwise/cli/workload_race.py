"""``gradwise race --workload NAME``: time to target on a training workload (see
:mod:`gradwise.bench.workload_race`).

Hooked into ``gradwise race``: :func:`add_arguments` adds this race's options to that parser, and
``race`` hands over to :func:`run` when ``--workload`` is given. Options of the test-problem
races are refused here rather than ignored.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from gradwise.cli.parsing import UsageError, parse_list
from gradwise.cli.train import parse_names, parse_options

PLAN_FILE = "race-plan.json"
TIMING_FILE = "timing.json"
RESULT_FILE = "race.json"
DEFAULT_OPTIMIZERS = "adamw,muon,soap"
DEFAULT_TRIALS = 4
DEFAULT_SEEDS = 3
OWN_OPTIONS = ("workload", "workload_options", "data", "trials", "seeds", "budget_minutes", "target",
               "weight_decay", "precision", "resume")
"""This race's options (``dest`` names); the test-problem races refuse them."""
SHARED_OPTIONS = ("optimizers", "steps", "batch_size", "out", "json", "no_plots", "handler", "command")
"""Options both kinds of race read."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the workload race."""
    group = parser.add_argument_group(
        "workload race",
        "--workload NAME: time to target on a training workload (tiny-gpt, mlp, logreg, text, npy). "
        "Each optimizer (a `gradwise train` name; default: " + DEFAULT_OPTIMIZERS + ") gets the same tuning "
        "budget, TRIALS full runs over lr and weight decay in its own range; its best point is re-run on "
        "SEEDS seeds. Reports the final validation loss, steps, tokens and seconds to the tuned AdamW's "
        "loss, step times measured side by side, state bytes; plots loss against steps and seconds. "
        "Every run is a folder under --out: --resume continues an interrupted race.",
    )
    group.add_argument("--workload", metavar="NAME", help="race on this training workload")
    group.add_argument("--workload-options", type=parse_options, default={}, metavar="K=V,...",
                       help="workload settings, e.g. n_layer=2 for tiny-gpt")
    group.add_argument("--data", type=parse_names, default=[], metavar="FILES",
                       help="your data: a text file for 'text', X.npy,y.npy for 'npy'")
    group.add_argument("--trials", type=int, default=DEFAULT_TRIALS, metavar="K",
                       help="tuning runs per optimizer (default: %(default)s)")
    group.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, metavar="S",
                       help="seeds of each optimizer's best point (default: %(default)s)")
    group.add_argument("--budget-minutes", type=float, metavar="M",
                       help="fewer seeds, then fewer trials, until the estimated duration fits")
    group.add_argument("--target", type=float, metavar="LOSS",
                       help="target validation loss (default: the tuned AdamW's mean final loss)")
    group.add_argument("--weight-decay", type=float, metavar="W", help="fixed weight decay (default: searched)")
    group.add_argument("--precision", metavar="NAME", help="number format of the runs (default: the workload's)")
    group.add_argument("--resume", action="store_true", help="continue the race in --out")


def wants_workload(args: argparse.Namespace) -> bool:
    return args.workload is not None


def refuse_options_of(parser: argparse.ArgumentParser, args: argparse.Namespace, kept: tuple[str, ...],
                      race: str) -> None:
    """A ``UsageError`` for the first option set away from its default that ``race`` does not read."""
    for action in parser._actions:
        dest = action.dest
        if dest in kept or dest == "help" or not hasattr(args, dest):
            continue
        if getattr(args, dest) != action.default:
            raise UsageError(f"{action.option_strings[0]} does not apply to {race}")


def settings_from(args: argparse.Namespace) -> Any:
    """The race's settings from the command line, every value checked (one-line errors)."""
    from gradwise.bench.workload_race import RaceSettings
    from gradwise.problems.workloads import WORKLOADS, make_workload
    from gradwise.train.optimizers import OPTIMIZERS
    from gradwise.validation import check_choice, check_int, check_range

    check_choice("workload", args.workload, WORKLOADS)

    names = parse_list(args.optimizers or DEFAULT_OPTIMIZERS)
    if not names:
        raise UsageError("--optimizers needs at least one name")
    for name in names:
        check_choice("optimizer", name, OPTIMIZERS)
    if len(set(names)) < len(names):
        raise UsageError("--optimizers lists a name more than once")
    check_int("trials", args.trials, 1)
    check_int("seeds", args.seeds, 1)
    if args.steps is not None:
        check_int("steps", args.steps, 1)
    if args.batch_size is not None:
        check_int("batch-size", args.batch_size, 1)
    if args.budget_minutes is not None:
        check_range("budget-minutes", args.budget_minutes, 0.0, 1e6, low_open=True)
    if args.target is not None:
        check_range("target", args.target, 0.0, 1e6, low_open=True)
    if args.weight_decay is not None:
        check_range("weight-decay", args.weight_decay, 0.0, 10.0)
    settings = RaceSettings(
        workload=args.workload, optimizers=names, trials=args.trials, seeds=args.seeds, steps=args.steps,
        workload_options=args.workload_options, data=args.data, batch_size=args.batch_size,
        precision=args.precision, weight_decay=args.weight_decay, target=args.target,
    )
    for name in names:  # every run's settings, checked by training's own validators before anything runs
        config = settings.train_config(name, None, 0.0, 0)
    make_workload(args.workload, config.batch_size or 1, 0, args.data, **args.workload_options)  # its options
    return settings


RESIZABLE = ("trials", "seeds")
"""Settings a resumed race may change: runs already ended are kept, and a race can grow (more seeds
for the error bars) or shrink (fewer trials when time runs short); any other setting changes what
a run means."""


def first_difference(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    for key, value in current.items():
        if key not in RESIZABLE and saved.get(key) != value:
            return f"{key}={saved.get(key)!r}, not {value!r}"
    return None


def check_folder(out: Path, requested: dict[str, Any], resume: bool) -> None:
    """Refuse to race over files without ``--resume``, to resume where there is no race, and to resume
    one run with other settings (but :data:`RESIZABLE`)."""
    plan = out / PLAN_FILE
    if not resume:
        if out.exists() and any(out.iterdir()):
            raise UsageError(f"--out {str(out)!r} already holds files; pass --resume to continue the race there "
                             "or choose a new folder")
        return
    if not plan.is_file():
        raise UsageError(f"--resume: {str(out)!r} holds no race ({PLAN_FILE} is missing)")
    try:
        saved = json.loads(plan.read_text())
        difference = first_difference(saved["requested"], json.loads(json.dumps(requested)))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise UsageError(f"--resume: {str(plan)!r} is unreadable: {error}") from None
    if difference is not None:
        raise UsageError(f"--resume: the race in {str(out)!r} was run with {difference}; resume with its settings "
                         f"(only {' and '.join(RESIZABLE)} may change)")


def run(args: argparse.Namespace) -> int:
    """Plan (timing first), race, print the table, write race.json and the plots; returns 0."""
    from gradwise.bench.machine import describe_machine
    from gradwise.bench.workload_race import (
        Timing,
        describe_plan,
        fit_to_budget,
        measure_step_costs,
        planned_run_count,
        read_json,
        run_race,
    )
    from gradwise.bench.workload_report import format_race_table, race_json, summarize
    from gradwise.checkpoints.atomic import write_atomically

    settings = settings_from(args)
    out = Path(args.out)
    check_folder(out, settings.to_dict(), args.resume)
    out.mkdir(parents=True, exist_ok=True)
    plan = {"requested": settings.to_dict(), "budget_minutes": args.budget_minutes}
    write_atomically(out / PLAN_FILE, json.dumps(plan, indent=2).encode())
    timing_path = out / TIMING_FILE
    if timing_path.is_file():
        timing = Timing.from_dict(read_json(timing_path))
    else:
        with tqdm(total=settings.timing_rounds + 1, desc="timing a step of each optimizer", unit="round",
                  file=sys.stderr, disable=None, leave=False) as bar:
            timing = measure_step_costs(settings, on_round=lambda: bar.update(1))
        write_atomically(timing_path, json.dumps(timing.to_dict(), indent=2).encode())
    if args.budget_minutes is not None:  # deterministic from the stored timing: a resumed race plans the same
        settings = fit_to_budget(settings, timing, args.budget_minutes)
    write_atomically(out / PLAN_FILE, json.dumps({**plan, "planned": settings.to_dict()}, indent=2).encode())
    print(describe_plan(settings, timing), flush=True)
    with tqdm(total=planned_run_count(settings), desc="race", unit="run", file=sys.stderr, disable=None,
              leave=False) as bar:
        def on_run(trial: Any) -> None:
            bar.set_postfix_str(f"{trial.optimizer} trial {trial.index} seed {trial.seed}", refresh=False)
            bar.update(1)

        runs = run_race(settings, out, on_run, plots=not args.no_plots)  # --no-plots: no PNG anywhere
    goals, summaries = summarize(settings, runs, timing)
    print("\n" + format_race_table(settings, goals, summaries))
    result = race_json(settings, runs, timing, goals, summaries, describe_machine())
    write_atomically(out / RESULT_FILE, (json.dumps(result, indent=2, allow_nan=False) + "\n").encode())
    written = [out / RESULT_FILE]
    if not args.no_plots:
        from gradwise.bench.workload_plots import plot_workload_race

        options = "".join(f", {key}={value}" for key, value in settings.workload_options.items())
        title = f"{settings.workload}{options}, {settings.steps or 'default'} steps: each optimizer tuned"
        written += plot_workload_race(runs, timing, goals, title, out)
    print(f"\nwrote {', '.join(path.name for path in written)} and the runs (runs/) to {args.out}/")
    return 0
