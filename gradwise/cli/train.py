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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gradwise.cli.parsing import UsageError, check_output_folder, out_of_memory, output_folder
from gradwise.train.config import CHANGEABLE, TrainConfig, check_allowed_changes, settings_difference
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


def none_or(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """A parser of ``parse``'s values, or ``none`` for "off"."""

    def parse_or_none(text: str) -> Any:
        if text.strip().lower() == "none":
            return None
        try:
            return parse(text)
        except ValueError:
            wanted = "a number" if parse in (int, float) else "a value"
            raise argparse.ArgumentTypeError(f"expected {wanted} or 'none', got {text!r}") from None

    return parse_or_none


def parse_names(text: str) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]`` (empty items dropped, case kept: file names and setting names)."""
    return [part.strip() for part in text.split(",") if part.strip()]


PARSERS: dict[str, Callable[[str], Any]] = {
    "int": int, "float": float, "str": str, "dict[str, Any]": parse_options, "list[str]": parse_names
}
"""A ``TrainConfig`` field's type (``None`` aside) -> the argparse ``type`` of its option."""


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per ``TrainConfig`` field, as its metadata says (:func:`gradwise.train.config.setting`)."""
    for item in dataclasses.fields(TrainConfig):
        meta = item.metadata
        kind = item.type.removesuffix(" | None")
        help_text = meta["help"].replace("%", "%%")
        if "choices" in meta:
            help_text = help_text.format(choices=", ".join(meta["choices"]()))
        parser.add_argument(f"--{meta.get('flag', item.name).replace('_', '-')}", dest=item.name,
                            type=none_or(PARSERS[kind]) if meta.get("none_is_off") else PARSERS[kind],
                            metavar=meta.get("metavar"), help=help_text)


def register(subparsers: argparse._SubParsersAction, summary: str) -> None:
    """Add the ``train`` parser; ``summary`` is its line in ``gradwise --help``."""
    from gradwise.train.config import workload_names

    parser = subparsers.add_parser(
        "train",
        help=summary,
        description=DESCRIPTION.format(workloads=", ".join(workload_names())),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,  # only the options given appear in args, and override the config
    )
    add = parser.add_argument
    add("--config", type=Path, default=None, metavar="FILE",
        help="TOML file with any of the settings below (by field name)")
    add_config_options(parser)
    add("--nproc", type=int, default=None, metavar="N",
        help="processes on this machine: runs this command under torchrun with N workers (default: 1)")
    add("--max-restarts", type=int, default=0, metavar="R",
        help="with --nproc: times torchrun restarts the workers after a failure; they resume (default: 0)")
    add("--out", type=output_folder, default=None, metavar="DIR", help="run folder (default: runs/WORKLOAD)")
    add("--resume", action="store_true", default=False,
        help="continue the run in --out from its newest usable checkpoint, with the settings it was written under")
    add("--allow-change", type=parse_names, default=[],
        metavar="NAMES", help=f"with --resume: settings that may differ from the run's, of {', '.join(CHANGEABLE)}")
    add("--no-progress", action="store_true", default=False, help="no progress bar")
    parser.set_defaults(handler=run)


def build_config(args: argparse.Namespace) -> tuple[TrainConfig, Path]:
    """The run's config and folder: defaults, then --config, then the options given (or the saved run's)."""
    from gradwise.train.loop import read_saved_config

    fields = dataclasses.fields(TrainConfig)
    given = {item.name: getattr(args, item.name) for item in fields if hasattr(args, item.name)}
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
    from gradwise.cli.launch import run_under_torchrun
    from gradwise.distributed.strategies.registry import check_strategy
    from gradwise.train.loop import check_run_folder, resolved_config
    from gradwise.train.optimizers import check_optimizer_strategy

    check_int("max_restarts", args.max_restarts, 0)
    config = resolved_config(config)
    check_optimizer_strategy(config.optimizer, check_strategy(config.strategy, config.strategy_options, args.nproc))
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
    from gradwise.distributed.strategies.registry import check_strategy
    from gradwise.train import NonFiniteWeights, TrainingDiverged, train

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

