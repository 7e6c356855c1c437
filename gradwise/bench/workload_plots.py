"""Plots of a workload race: validation loss against steps and against seconds, with the seeds' band."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from gradwise.bench.workload_race import RaceRuns, Timing


def plot_workload_race(runs: RaceRuns, timing: Timing, goals: dict[str, float], title: str,
                       out: Path) -> list[Path]:
    """``loss-vs-step.png`` and ``loss-vs-time.png`` in ``out``: each optimizer's best point, the mean
    over its seeds (line) between their lowest and highest loss (band), the targets dashed. Time is
    steps x the optimizer's measured seconds per step (evaluations not counted)."""
    written = []
    shown: list[float] = []
    for axis, filename in (("step", "loss-vs-step.png"), ("time", "loss-vs-time.png")):
        figure = Figure(figsize=(8, 5), layout="constrained")
        axes = figure.add_subplot()
        for index, (name, results) in enumerate(runs.seeds.items()):
            curves = [result.curve for result in results if result.final_loss is not None]
            if not curves:
                continue
            length = min(len(curve) for curve in curves)  # a seed's curve is cut where the others end
            steps = np.array([step for step, _ in curves[0][:length]], dtype=float)
            losses = np.array([[loss for _, loss in curve[:length]] for curve in curves])
            x = steps if axis == "step" else steps * timing.costs[name].seconds_per_step
            shown += [float(losses.min()), float(losses.max())]
            colour = f"C{index % 10}"
            axes.plot(x, losses.mean(axis=0), color=colour, label=f"{name} ({len(curves)} seed(s))")
            if len(curves) > 1:
                axes.fill_between(x, losses.min(axis=0), losses.max(axis=0), color=colour, alpha=0.2)
        for goal, value in goals.items():
            axes.axhline(value, color="black", linestyle="--" if goal == "target" else ":", linewidth=0.8,
                         label=f"{goal} {value:.4g}")
        axes.set_xlabel("step" if axis == "step" else "seconds of training steps (measured side by side)")
        axes.set_ylabel("validation loss")
        axes.set_title(title, fontsize="medium")
        if shown:  # from the lowest loss to 1.6x the target: the early steps' losses would flatten the race
            axes.set_ylim(min(shown) - 0.02 * abs(min(shown)), min(max(shown), 1.6 * goals["target"]))
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
        path = out / filename
        figure.savefig(path, dpi=120)
        written.append(path)
    return written
