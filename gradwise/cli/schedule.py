"""``gradwise schedule``: plot learning-rate schedules, print their lr at chosen steps and their area."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from tqdm import tqdm

from gradwise.cli.parsing import UsageError, output_folder, parse_list
from gradwise.schedules import SCHEDULES, WSD_TAILS, area_under, make_schedule

DESCRIPTION = """\
Plot learning-rate schedules for one run and compare them: prints the lr of each schedule
at chosen steps and the area under its curve (the sum of the per-step lrs), and writes
schedules.png (and schedules.json with --json) to the output folder.
Schedules: constant (no warmup), linear_warmup (warmup, then constant), cosine,
linear_decay, wsd (warmup-stable-decay), cosine_with_restarts (SGDR).
Example: gradwise schedule --total 1000 --warmup 100 --peak 3e-4 --schedules cosine,wsd
"""

PROGRESS_CHUNK = 10_000
"""Steps evaluated between two updates of the progress bar."""


def register(subparsers: argparse._SubParsersAction, summary: str) -> None:
    """Add the ``schedule`` parser; ``summary`` is its line in ``gradwise --help``."""
    parser = subparsers.add_parser(
        "schedule",
        help=summary,
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--schedules", type=parse_list, default=list(SCHEDULES), metavar="NAMES",
        help="comma-separated schedules to show (default: all of them)",
    )
    parser.add_argument("--total", type=int, default=1000, metavar="STEPS", help="training steps (default: 1000)")
    parser.add_argument(
        "--warmup", type=int, metavar="STEPS", help="warmup steps (default: a tenth of --total, 100 for 1000)"
    )
    parser.add_argument("--peak", type=float, default=3e-4, metavar="LR", help="peak learning rate (default: 3e-4)")
    parser.add_argument(
        "--floor", type=float, default=0.0, metavar="FRACTION",
        help="final lr of the decaying schedules, as a fraction of --peak (default: 0)",
    )
    parser.add_argument(
        "--decay-fraction", type=float, default=0.2, metavar="FRACTION",
        help="wsd: length of the decay tail, as a fraction of --total (default: 0.2)",
    )
    parser.add_argument(
        "--tail", choices=WSD_TAILS, default="linear", help="wsd: shape of the decay tail (default: linear)"
    )
    parser.add_argument(
        "--t0", type=int, metavar="STEPS",
        help="cosine_with_restarts: length of the first cycle "
        "(default: three cycles fill the steps after warmup)",
    )
    parser.add_argument(
        "--t-mult", type=int, default=2, metavar="FACTOR",
        help="cosine_with_restarts: growth of each cycle's length (default: 2)",
    )
    parser.add_argument(
        "--at", type=parse_list, metavar="STEPS",
        help="comma-separated steps at which to print the lr "
        "(default: 0, half the warmup, the warmup, half the total, the last step)",
    )
    parser.add_argument("--out", type=output_folder, default=Path("schedule-results"), metavar="DIR",
                        help="folder for schedules.png and schedules.json (default: schedule-results)")
    parser.add_argument("--json", action="store_true", help="also write the table as schedules.json")
    parser.set_defaults(handler=run)


def _default_t0(total: int, warmup: int, t_mult: int) -> int:
    """The first cycle's length for which three cycles, T_0 (1 + T_mult + T_mult**2), fill the run."""
    return max(1, math.ceil((total - warmup) / (1 + t_mult + t_mult**2)))


def _report_steps(at: list[str] | None, total: int, warmup: int) -> list[int]:
    if at is None:
        return sorted({0, warmup // 2, warmup, total // 2, total - 1})
    steps = []
    for item in at:
        try:
            step = int(item)
        except ValueError:
            raise UsageError(f"--at: {item!r} is not an integer step") from None
        if not 0 <= step < total:
            raise UsageError(f"--at: step {step} is outside the run, which has steps 0 to {total - 1}")
        steps.append(step)
    return sorted(set(steps))


def _format_table(rows: list[dict], steps: list[int]) -> str:
    header = ["schedule", *(f"lr@{step}" for step in steps), "area"]
    body = [[row["schedule"], *(f"{lr:.3e}" for lr in row["lr_at"].values()), f"{row['area']:.4g}"] for row in rows]
    widths = [max(len(line[column]) for line in [header, *body]) for column in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) if column == 0 else cell.rjust(width)
                  for column, (cell, width) in enumerate(zip(line, widths)))
        for line in [header, *body]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _plot(curves: dict[str, list[float]], rows: list[dict], table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    total, warmup, peak = table["total_steps"], table["warmup_steps"], table["peak"]
    figure, axes = plt.subplots(figsize=(11, 5), layout="constrained")
    for index, row in enumerate(rows):
        name = row["schedule"]
        # Schedules often coincide for a stretch (the warmup, a plateau at the peak):
        # alternating solid and dashed lines keeps every one of them visible.
        axes.plot(range(total), curves[name], label=f"{name} (area {row['area']:.4g})",
                  linewidth=1.6, linestyle="-" if index % 2 == 0 else "--")
    if warmup:
        axes.axvline(warmup, color="grey", linestyle=":", linewidth=1, label=f"end of warmup ({warmup})")
    axes.set_xlabel("step")
    axes.set_ylabel("learning rate")
    axes.set_title(f"Learning-rate schedules: {total} steps, {warmup} warmup, peak {peak:g}")
    axes.set_xlim(0, total)
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run(args: argparse.Namespace) -> int:
    names = list(dict.fromkeys(args.schedules))
    if not names:
        raise UsageError("--schedules: give at least one schedule name")
    total, peak = args.total, args.peak
    warmup = args.warmup if args.warmup is not None else total // 10
    t0 = args.t0 if args.t0 is not None else _default_t0(total, warmup, args.t_mult)
    options = dict(floor=args.floor, decay_fraction=args.decay_fraction, tail=args.tail, T_0=t0, T_mult=args.t_mult)
    for name in SCHEDULES:  # every option checked by the schedules that take it, shown or not: a typo is refused
        make_schedule(name, total, warmup, **options)
    schedules = {name: make_schedule(name, total, warmup, **options) for name in names}
    steps = _report_steps(args.at, total, warmup)

    curves: dict[str, list[float]] = {}
    rows = []
    with tqdm(total=len(names) * total, desc="evaluating", unit="step", disable=None, leave=False) as progress:
        for name, schedule in schedules.items():
            multipliers: list[float] = []
            for start in range(0, total, PROGRESS_CHUNK):
                multipliers.extend(schedule(step) for step in range(start, min(start + PROGRESS_CHUNK, total)))
                progress.update(min(PROGRESS_CHUNK, total - start))
            curves[name] = [peak * multiplier for multiplier in multipliers]
            rows.append({
                "schedule": name,
                "lr_at": {str(step): curves[name][step] for step in steps},
                "area": area_under(multipliers.__getitem__, total, peak),  # the evaluated curve, not a second pass
            })
    table = {"total_steps": total, "warmup_steps": warmup, "peak": peak, "options": options, "steps": steps,
             "schedules": rows}

    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--out: cannot create {str(args.out)!r}: {error.strerror}") from None
    print(_format_table(rows, steps))
    png = args.out / "schedules.png"
    _plot(curves, rows, table, png)
    print(f"\nwrote {png}")
    if args.json:
        path = args.out / "schedules.json"
        path.write_text(json.dumps(table, indent=2) + "\n")
        print(f"wrote {path}")
    return 0
