"""The end-of-run plot: training loss (with evaluations), learning rate and gradient norm against the step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure


def plot_training(records: list[dict[str, Any]], path: Path, title: str, eval_metric: str | None = None) -> None:
    """Three stacked panels sharing the step axis, written as a PNG to ``path``."""
    train = [r for r in records if r["kind"] == "train" and isinstance(r["loss"], float)]
    evaluations = [r for r in records if r["kind"] == "eval" and eval_metric in r]
    figure = Figure(figsize=(9, 9), layout="constrained")
    loss_axes, lr_axes, norm_axes = figure.subplots(3, 1, sharex=True)
    loss_axes.plot([r["step"] for r in train], [r["loss"] for r in train], linewidth=0.8, label="training loss")
    if eval_metric is not None and evaluations:
        loss_axes.plot([r["step"] for r in evaluations], [r[eval_metric] for r in evaluations], "o-",
                       markersize=3, label=eval_metric)
    loss_axes.set_ylabel("loss")
    loss_axes.set_yscale("log")
    loss_axes.legend()
    lr_axes.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:green")
    lr_axes.set_ylabel("learning rate")
    norms = [(r["step"], r["grad_norm"]) for r in train if isinstance(r["grad_norm"], float)]
    norm_axes.plot([step for step, _ in norms], [norm for _, norm in norms], color="tab:red", linewidth=0.8)
    norm_axes.set_ylabel("gradient norm (before clipping)")
    norm_axes.set_yscale("log")
    norm_axes.set_xlabel("step")
    for axes in (loss_axes, lr_axes, norm_axes):
        axes.grid(alpha=0.3)
    for event in (r for r in records if r.get("event") == "rollback"):
        for axes in (loss_axes, lr_axes, norm_axes):
            axes.axvline(event["step"], color="grey", linestyle=":", linewidth=1)
    loss_axes.set_title(title)
    figure.savefig(path, dpi=110)
