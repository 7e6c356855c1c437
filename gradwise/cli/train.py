"""``gradwise train``: train a workload with an optimizer and a schedule, with checkpoints and guards.

``--nproc N`` (N > 1) checks the settings, then runs the same command again under
``torchrun`` (``python -m torch.distributed.run --standalone --nproc-per-node N -m gradwise
train ...`` without ``--nproc``) and returns its exit code; ``torchrun ... -m gradwise train``
works directly. A worker restarted by torchrun (``--max-restarts``) resumes from the newest
checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from gradwise.cli.launch import run_under_torchrun
from gradwise.cli.parsing import UsageError, check_output_folder, out_of_memory, output_folder
from gradwise.distributed.strategies.registry import STRATEGIES, check_strategy
from gradwise.problems.workloads import WORKLOADS
from gradwise.schedules import SCHEDULES
from gradwise.train import OPTIMIZERS, PRECISIONS, NonFiniteWeights, TrainConfig, TrainingDiverged, train
from gradwise.train.config import CHANGEABLE, check_allowed_changes, settings_difference
from gradwise.train.loop import check_run_folder, read_saved_config, resolved_config
from gradwise.validation import check_int

DESCRIPTION = """\
Train a workload and write metrics (metrics.jsonl, metrics.csv), checkpoints, a
loss/lr/gradient-norm plot (training.png) and summary.json to the output folder.
Settings come from the defaults of the workload, then a TOML file (--config), then the
options given here. --resume continues the run in --out from its newest valid checkpoint.
Workloads: {workloads}.
Example: gradwise train --workload tiny-gpt --optimizer adamw --schedule cosine --out runs/gpt
On N processes: gradwise train --nproc 2 --strategy ddp --workload mlp --out runs/mlp-ddp
(or torchrun --nproc-per-node 2 -m gradwise train ...); --batch-size is per process.
"""

OPTION_FIELDS = {
    "workload": "workload", "data": "data", "workload_options": "workload_options", "optimizer": "optimizer",
    "optimizer_options": "optimizer_options", "lr": "lr", "weight_decay": "weight_decay", "schedule": "schedule",
    "warmup": "warmup_steps", "lr_floor": "lr_floor", "steps": "steps", "batch_size": "batch_size",
    "accumulate": "accumulate", "clip": "clip", "clip_value": "clip_value", "precision": "precision",
    "device": "device", "threads": "threads", "seed": "seed", "eval_every": "eval_every",
    "checkpoint_every": "checkpoint_every", "keep_checkpoints": "keep_checkpoints", "spike_factor": "spike_factor",
    "spike_window": "spike_window", "max_consecutive_skips": "max_consecutive_skips",
    "rollback_lr_factor": "rollback_lr_factor", "max_rollbacks": "max_rollbacks", "strategy": "strategy",
    "strategy_options": "strategy_options",
}
"""Command-line option (argparse dest) -> ``TrainConfig`` field."""


def parse_value(text: str) -> Any:
    """``"3"`` -> 3, ``"0.5"`` -> 0.5, ``"true"`` -> True, anything else stays a string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def parse_options(text: str) -> dict[str, Any]:
    """``"d_model=64,n_layer=2"`` -> ``{"d_model": 64, "n_layer": 2}``."""
    options = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE pairs separated by commas, got {item!r}")
        options[key.strip()] = parse_value(value)
    return options


def optional_float(text: str) -> float | None:
    """A number, or ``none`` for "off"."""
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a workload (tiny-gpt, mlp, logreg, your data) with checkpoints, guards and plots",
        description=DESCRIPTION.format(workloads=", ".join(WORKLOADS)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,  # only the options given appear in args, and override the config
    )
    add = parser.add_argument
    add("--config", type=Path, default=None, metavar="FILE", help="TOML file with any of the settings below (by field name)")
    add("--workload", metavar="NAME", help=f"one of {', '.join(WORKLOADS)} (default: tiny-gpt)")
    add("--data", type=lambda text: [part.strip() for part in text.split(",") if part.strip()], metavar="FILES",
        help="your data: a text file for 'text', X.npy,y.npy for 'npy'")
    add("--workload-options", type=parse_options, metavar="K=V,...",
        help="workload settings, e.g. d_model=64,n_layer=2 for tiny-gpt")
    add("--optimizer", metavar="NAME", help=f"one of {', '.join(OPTIMIZERS)} (default: adamw)")
    add("--optimizer-options", type=parse_options, metavar="K=V,...", help="extra hyperparameters, e.g. momentum=0.8")
    add("--lr", type=float, help="peak learning rate (default: the workload's)")
    add("--weight-decay", type=float, help="decoupled weight decay of matrices (default: 0.1)")
    add("--schedule", metavar="NAME", help=f"one of {', '.join(SCHEDULES)} (default: cosine)")
    add("--warmup", type=int, metavar="STEPS", help="warmup steps (default: 5%% of --steps)")
    add("--lr-floor", type=float, metavar="FRACTION", help="final lr as a fraction of the peak (default: 0.1)")
    add("--steps", type=int, help="optimizer steps (default: the workload's)")
    add("--batch-size", type=int, help="micro-batch size (default: the workload's)")
    add("--accumulate", type=int, metavar="K", help="micro-batches per step (default: 1)")
    add("--clip", type=optional_float, metavar="NORM", help="largest global gradient norm, or none (default: 1.0)")
    add("--clip-value", type=optional_float, metavar="V", help="largest gradient entry, or none (default: none)")
    add("--precision", metavar="NAME", help=f"one of {', '.join(PRECISIONS)} (default: the workload's)")
    add("--device", metavar="NAME", help="cpu, cuda or auto (default: cpu)")
    add("--threads", type=int, help="CPU threads (default: every core)")
    add("--seed", type=int, help="seed of the model and the batches (default: 0)")
    add("--eval-every", type=int, metavar="STEPS", help="steps between evaluations (default: the workload's)")
    add("--checkpoint-every", type=int, metavar="STEPS", help="steps between checkpoints (default: 100)")
    add("--keep-checkpoints", type=int, metavar="K", help="checkpoints kept (default: 3)")
    add("--spike-factor", type=float, help="a loss above this multiple of the recent median rolls back (default: 4)")
    add("--spike-window", type=int, metavar="STEPS", help="losses in the recent median (default: 50)")
    add("--max-consecutive-skips", type=int, metavar="K",
        help="non-finite steps in a row that roll back (default: 5)")
    add("--rollback-lr-factor", type=float, metavar="F", help="lr multiplier at each rollback (default: 0.5)")
    add("--max-rollbacks", type=int, metavar="K", help="rollbacks before the run stops (default: 3)")
    add("--nproc", type=int, default=None, metavar="N",
        help="processes on this machine: runs this command under torchrun with N workers (default: 1)")
    add("--strategy", metavar="NAME",
        help=f"one of {', '.join(STRATEGIES)} (default: single for 1 process, ddp for more)")
    add("--strategy-options", type=parse_options, metavar="K=V,...",
        help="strategy settings, e.g. compression=powersgd,rank=2 for ddp")
    add("--max-restarts", type=int, default=0, metavar="R",
        help="with --nproc: times torchrun restarts the workers after a failure; they resume (default: 0)")
    add("--out", type=output_folder, default=None, metavar="DIR", help="run folder (default: runs/WORKLOAD)")
    add("--resume", action="store_true", default=False,
        help="continue the run in --out from its newest usable checkpoint, with the settings it was written under")
    add("--allow-change", type=lambda text: [part.strip() for part in text.split(",") if part.strip()], default=[],
        metavar="NAMES", help=f"with --resume: settings that may differ from the run's, of {', '.join(CHANGEABLE)}")
    add("--no-progress", action="store_true", default=False, help="no progress bar")
    parser.set_defaults(handler=run)


def build_config(args: argparse.Namespace) -> tuple[TrainConfig, Path]:
    """The run's config and folder: defaults, then --config, then the options given (or the saved run's)."""
    given = {field: getattr(args, dest) for dest, field in OPTION_FIELDS.items() if hasattr(args, dest)}
    base = TrainConfig.from_toml(args.config) if args.config is not None else TrainConfig()
    workload = given.get("workload", base.workload)
    out = args.out if args.out is not None else Path("runs") / workload
    allowed = check_allowed_changes(args.allow_change)
    if allowed and not args.resume:
        raise UsageError("--allow-change goes with --resume")
    saved = read_saved_config(out) if args.resume else None
    if saved is not None:
        config = TrainConfig.from_dict(saved, source=str(out / "config.json"))
        if (difference := settings_difference(config.to_dict(), given, allowed)) is not None:
            raise UsageError(f"--resume: the run in {str(out)!r} was {difference}; resume with its own settings")
        return dataclasses.replace(config, **{name: value for name, value in given.items() if name in allowed}), out
    return dataclasses.replace(base, **given), out


def launch(args: argparse.Namespace, config: TrainConfig, out: Path) -> int:
    """Check everything a worker would check, then run this command under torchrun with ``--nproc`` workers."""
    check_int("max_restarts", args.max_restarts, 0)
    config = resolved_config(config)
    check_strategy(config.strategy, config.strategy_options, args.nproc)
    check_run_folder(out, config, args.resume, check_allowed_changes(args.allow_change))
    return run_under_torchrun(args.nproc, args.argv, args.max_restarts, out)


def discard_unstarted_run(out: Path) -> None:
    """Remove ``out``, made by this command, if it holds no checkpoint past step 0: a run refused at its
    first step (out of memory) leaves nothing behind, and the same command with a smaller size can start
    afresh. A folder with later checkpoints is kept: they are work that ``--resume`` can continue."""
    progress = [path for path in out.rglob("step-*") if int(re.sub(r"\D", "", path.name) or 0) > 0]
    if not progress:
        shutil.rmtree(out, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    check_int("max_restarts", args.max_restarts, 0)
    if args.nproc is not None:
        check_int("nproc", args.nproc, 1)
        if "RANK" in os.environ:
            raise UsageError("--nproc launches torchrun; under torchrun leave it out")
    if args.max_restarts and (args.nproc or 1) == 1:
        raise UsageError("--max-restarts needs --nproc N with N > 1 (under torchrun, give --max-restarts to torchrun)")
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if restarted:
        args.resume = True  # a worker restarted by torchrun continues from the newest checkpoint
    config, out = build_config(args)
    args.run_folder = out  # where a worker that loses its peers keeps its traceback
    if args.out is None:
        check_output_folder(str(out))  # the default runs/WORKLOAD: the same checks as a given --out
    if args.nproc is not None and args.nproc > 1:
        return launch(args, config, out)
    if args.nproc == 1:
        check_strategy(config.strategy, config.strategy_options, 1)
    main = int(os.environ.get("RANK", "0")) == 0
    fresh = not out.exists()
    try:
        result = train(config, out, resume=args.resume, progress=not args.no_progress, allow_changes=args.allow_change,
                       restarted=restarted)
    except TrainingDiverged as diverged:
        if main:
            print(str(diverged.report), file=sys.stderr)
            print(f"wrote {out / 'report.json'} and {out / 'training.png'}", file=sys.stderr)
        return 1
    except (NonFiniteWeights, OSError) as failed:  # runtime failures, not bad input: exit 1
        if main:
            print(f"gradwise train: error: {failed}", file=sys.stderr)
        return 1
    except Exception as error:
        if fresh and "RANK" not in os.environ and out_of_memory(error) is not None:
            discard_unstarted_run(out)
        raise  # cli.main turns it into one line
    if not main:
        return 0
    for skipped in result.skipped_checkpoints:
        print(f"skipped checkpoint {skipped.path}: {skipped.reason}")
    if result.resumed_from_step is not None:
        print(f"resumed from the checkpoint of step {result.resumed_from_step}")
    target = result.target
    measured = result.final_metrics[target.metric]
    comparison = ">=" if target.higher_is_better else "<="
    print(f"{result.workload}: {result.description}")
    if result.processes > 1:
        print(f"strategy {result.strategy} on {result.processes} processes, "
              f"{result.bytes_communicated:,} bytes communicated per process")
    print(f"{result.steps} steps in {result.wall_time_s:.1f} s, {result.items_per_s:,.0f} {result.unit}/s "
          f"(training steps only), {result.skipped_steps} skipped updates, {len(result.rollbacks)} rollbacks")
    print(f"final {target.metric}: {measured:.4f}; {target.baseline_name}: "
          f"{target.baseline:.4f}; target {comparison} {target.value:.4f}: "
          f"{'reached' if result.target_reached else 'NOT reached'}")
    print(f"wrote {out}/metrics.jsonl, metrics.csv, training.png, summary.json, model.pt, checkpoints/")
    return 0

