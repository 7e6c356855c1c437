"""What a workload race found, per optimizer, with its uncertainty: the table, the JSON, the statistics.

Per optimizer, over the seeds of its best point: the final validation loss (mean, sample
standard deviation), and for each target the steps, tokens and seconds to reach it (mean over
the seeds that reached it, and how many did). Against the baseline (AdamW):

- the **time-to-target ratio** ``baseline's mean seconds / this optimizer's`` (above 1: faster),
  with a 95% percentile-bootstrap interval over seeds (both optimizers' seeds resampled,
  :data:`BOOTSTRAP_SAMPLES` times, a seed that never reached the target counting as never:
  infinitely slow), so a ratio resting on one lucky seed shows a wide interval;
- the **final-loss difference** with Welch's t-test p-value (two-sided, unequal variances), when
  both have two seeds or more.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from gradwise.bench.workload_race import LOOSE_TARGET_FACTOR, RaceRuns, RaceSettings, Timing, TrialResult

BOOTSTRAP_SAMPLES = 4000
BOOTSTRAP_SEED = 0


def targets(settings: RaceSettings, runs: RaceRuns) -> dict[str, float]:
    """``{"target": ..., "loose": ...}``: the given target, or the baseline's mean final loss; the loose
    one :data:`LOOSE_TARGET_FACTOR` times it. A ``ValueError`` if the baseline never finished a run."""
    if settings.target is not None:
        strict = settings.target
    else:
        losses = final_losses(runs.seeds[settings.baseline])
        if not losses:
            raise ValueError(f"every run of {settings.baseline}, the baseline, diverged: give a target")
        strict = statistics.fmean(losses)
    return {"target": strict, "loose": strict * LOOSE_TARGET_FACTOR}


def final_losses(results: list[TrialResult]) -> list[float]:
    return [result.final_loss for result in results if result.final_loss is not None]


def steps_to(result: TrialResult, target: float) -> float:
    """The first evaluated step at or below ``target`` (``inf``: never, or the run diverged)."""
    return next((float(step) for step, loss in result.curve if loss <= target), math.inf)


def bootstrap_ratio(baseline: list[float], other: list[float]) -> tuple[float, float]:
    """95% percentile-bootstrap interval of ``mean(baseline) / mean(other)`` (values may be ``inf``)."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    first = np.asarray(baseline)[rng.integers(len(baseline), size=(BOOTSTRAP_SAMPLES, len(baseline)))].mean(axis=1)
    second = np.asarray(other)[rng.integers(len(other), size=(BOOTSTRAP_SAMPLES, len(other)))].mean(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratios = np.where(np.isinf(second) & np.isinf(first), np.nan, first / second)
    ratios = np.sort(ratios[~np.isnan(ratios)])
    if ratios.size == 0:
        return math.nan, math.nan
    # nearest-rank percentiles: interpolating between infinite ratios is undefined
    return float(ratios[int(0.025 * (ratios.size - 1))]), float(ratios[int(math.ceil(0.975 * (ratios.size - 1)))])


def mean_or_inf(values: list[float]) -> float:
    reached = [value for value in values if math.isfinite(value)]
    return statistics.fmean(reached) if reached else math.inf


@dataclass
class OptimizerSummary:
    """One optimizer's line of the race (see the module's docstring)."""

    name: str
    best: dict[str, Any] | None
    lr_at_edge: bool
    final_losses: list[float]
    diverged_runs: int
    to_target: dict[str, dict[str, Any]]
    seconds_per_step: float
    step_time_ratio: float
    state_bytes: int
    loss_p_value: float | None

    @property
    def mean_loss(self) -> float:
        return statistics.fmean(self.final_losses) if self.final_losses else math.nan

    @property
    def loss_spread(self) -> float:
        return statistics.stdev(self.final_losses) if len(self.final_losses) > 1 else 0.0


def summarize(settings: RaceSettings, runs: RaceRuns,
              timing: Timing) -> tuple[dict[str, float], list[OptimizerSummary]]:
    """The targets and every optimizer's summary, in the order raced."""
    goals = targets(settings, runs)
    base = settings.baseline
    base_cost = timing.costs[base].seconds_per_step
    summaries = []
    for name in settings.optimizers:
        cost = timing.costs[name]
        seeds = runs.seeds[name]
        best = runs.best[name]
        lrs = sorted({result.trial.lr for result in runs.tuning[name]})
        to_target = {}
        for goal, value in goals.items():
            steps = [steps_to(result, value) for result in seeds]
            base_steps = [steps_to(result, value) for result in runs.seeds[base]]
            seconds = [s * cost.seconds_per_step for s in steps]
            base_seconds = [s * base_cost for s in base_steps]
            mean_steps = mean_or_inf(steps)
            low, high = bootstrap_ratio(base_seconds, seconds) if seeds and base_steps else (math.nan, math.nan)
            to_target[goal] = {
                "value": value, "reached": sum(math.isfinite(s) for s in steps), "runs": len(steps),
                "steps": mean_steps, "tokens": mean_steps * cost.items_per_step,
                "seconds": mean_or_inf(seconds),
                "speedup": _ratio(mean_or_inf(base_seconds), mean_or_inf(seconds)),
                "speedup_interval": [low, high],
            }
        p_value = None
        losses, base_losses = final_losses(seeds), final_losses(runs.seeds[base])
        if name != base and len(losses) > 1 and len(base_losses) > 1:
            p_value = float(stats.ttest_ind(losses, base_losses, equal_var=False).pvalue)
            p_value = None if math.isnan(p_value) else p_value  # no spread on either side: no test
        summaries.append(OptimizerSummary(
            name=name,
            best=None if best is None else {"lr": best.trial.lr, "weight_decay": best.trial.weight_decay,
                                            "trial": best.trial.index},
            lr_at_edge=best is not None and len(lrs) >= 3 and best.trial.lr in (lrs[0], lrs[-1]),
            final_losses=losses,
            diverged_runs=sum(result.final_loss is None for result in [*runs.tuning[name], *seeds[1:]]),
            to_target=to_target, seconds_per_step=cost.seconds_per_step,
            step_time_ratio=cost.seconds_per_step / base_cost, state_bytes=cost.state_bytes, loss_p_value=p_value,
        ))
    return goals, summaries


def _ratio(numerator: float, denominator: float) -> float:
    if math.isinf(numerator) and math.isinf(denominator):
        return math.nan
    return numerator / denominator if denominator else math.inf


def _number(value: float, digits: int = 3) -> str:
    if math.isnan(value):
        return "-"
    return "never" if math.isinf(value) else f"{value:.{digits}g}"


def _speedup(goal: dict[str, Any]) -> str:
    """``1.8x [1.5, 2.2]``: the mean ratio and its bootstrap interval; ``never`` if no seed reached the target."""
    if goal["reached"] == 0:
        return "never"
    low, high = goal["speedup_interval"]
    return f"{_number(goal['speedup'])}x [{_number(low)}, {_number(high)}]"


def format_race_table(settings: RaceSettings, goals: dict[str, float], summaries: list[OptimizerSummary]) -> str:
    """The race's table: tuned point, final loss, and for the target the steps, tokens and time to it."""
    header = ["optimizer", "lr", "wd", "final val_loss", "p vs " + settings.baseline, "steps to target",
              "time to target", f"faster than {settings.baseline} [95% CI]", "steps to loose", "step time",
              "state MB"]
    rows = []
    for summary in summaries:
        goal, loose = summary.to_target["target"], summary.to_target["loose"]
        best = summary.best or {}
        loss = (f"{summary.mean_loss:.4f} +- {summary.loss_spread:.4f} (n={len(summary.final_losses)})"
                if summary.final_losses else "diverged")
        rows.append([
            summary.name,
            (f"{best['lr']:.3g}" + ("*" if summary.lr_at_edge else "")) if best else "-",
            f"{best['weight_decay']:.3g}" if best else "-",
            loss,
            "-" if summary.loss_p_value is None else f"{summary.loss_p_value:.2g}",
            f"{_number(goal['steps'], 4)} ({goal['reached']}/{goal['runs']})",
            "never" if math.isinf(goal["seconds"]) else f"{goal['seconds']:.3g} s",
            "(baseline)" if summary.name == settings.baseline else _speedup(goal),
            f"{_number(loose['steps'], 4)} ({loose['reached']}/{loose['runs']})",
            f"{summary.step_time_ratio:.2f}x",
            f"{summary.state_bytes / 1e6:.2f}",
        ])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    notes = [f"target: {settings.baseline}'s tuned mean final val_loss {goals['target']:.4f}"
             if settings.target is None else f"target: val_loss {goals['target']:.4f} (given)",
             f"loose target: {goals['loose']:.4f} ({LOOSE_TARGET_FACTOR:g}x the target)",
             "steps to target: mean over the seeds that reached it (reached/seeds); time = steps x step time",
             "p: Welch's t-test of the final losses against the baseline's"]
    if any(math.isinf(goal["speedup_interval"][1]) for summary in summaries for goal in summary.to_target.values()
           if summary.name != settings.baseline and goal["reached"]):
        notes.append(f"[low, never]: in some bootstrap resamples no {settings.baseline} seed reached the target "
                     "(the speedup has no upper bound there)")
    if any(summary.lr_at_edge for summary in summaries):
        notes.append("*: the best lr is at the edge of the values tried; a wider search may find better")
    return "\n".join(lines + [""] + notes)


def race_json(settings: RaceSettings, runs: RaceRuns, timing: Timing, goals: dict[str, float],
              summaries: list[OptimizerSummary], machine: dict[str, Any]) -> dict[str, Any]:
    """Everything, JSON-ready (no NaN or infinity: those are written as strings)."""
    return _finite({
        "settings": settings.to_dict(), "machine": machine, "targets": goals, "baseline": settings.baseline,
        "timing": timing.to_dict(),
        "optimizers": [{**summary.__dict__, "mean_final_loss": summary.mean_loss,
                        "final_loss_spread": summary.loss_spread} for summary in summaries],
        "runs": {name: {"tuning": [result.to_dict() for result in runs.tuning[name]],
                        "seeds": [result.to_dict() for result in runs.seeds[name]]} for name in settings.optimizers},
    })


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value
