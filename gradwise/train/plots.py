"""The end-of-run plot: training loss (with evaluations), learning rate and gradient norm against the step,
and the sharpness with its stability thresholds when the run tracked it (``--track-sharpness``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure


def plot_training(records: list[dict[str, Any]], path: Path, title: str, eval_metric: str | None = None) -> None:
    """Three stacked panels sharing the step axis, four when records carry a finite ``sharpness``, written as a
    PNG to ``path``."""
    train = [r for r in records if r["kind"] == "train" and isinstance(r["loss"], float)]
    evaluations = [r for r in records if r["kind"] == "eval" and eval_metric in r]
    sharpness = [r for r in records if r["kind"] == "train" and isinstance(r.get("sharpness"), float)
                 and math.isfinite(r["sharpness"])]
    panels = 4 if sharpness else 3
    figure = Figure(figsize=(9, 3 * panels), layout="constrained")
    axes_list = list(figure.subplots(panels, 1, sharex=True))
    loss_axes, lr_axes, norm_axes = axes_list[:3]
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
    if sharpness:
        plot_sharpness(axes_list[3], train, sharpness)
    axes_list[-1].set_xlabel("step")
    for axes in axes_list:
        axes.grid(alpha=0.3)
    for event in (r for r in records if r.get("event") == "rollback"):
        for axes in axes_list:
            axes.axvline(event["step"], color="grey", linestyle=":", linewidth=1)
    loss_axes.set_title(title)
    figure.savefig(path, dpi=110)


def plot_sharpness(axes: Axes, train: list[dict[str, Any]], measured: list[dict[str, Any]]) -> None:
    """The measured sharpness (with its residual as the error bar), ``2/lr`` (gradient descent's stability
    threshold, over every step) and, where the records carry one that differs from it, the optimizer's own
    ``stability_threshold`` (SGD with momentum; see :mod:`gradwise.train.sharpness`)."""
    axes.errorbar([r["step"] for r in measured], [r["sharpness"] for r in measured],
                  yerr=[r.get("sharpness_residual", 0.0) for r in measured], fmt="o-", markersize=3, linewidth=0.8,
                  color="tab:purple", label="sharpness (top Hessian eigenvalue)")
    positive = [r for r in train if r["lr"] > 0]
    axes.plot([r["step"] for r in positive], [2 / r["lr"] for r in positive], "--", color="black", linewidth=1,
              label="2/lr (gradient descent's threshold)")
    own = [r for r in measured if isinstance(r.get("stability_threshold"), float)
           and not math.isclose(r["stability_threshold"], 2 / r["lr"])]
    if own:
        axes.plot([r["step"] for r in own], [r["stability_threshold"] for r in own], ":", color="tab:orange",
                  linewidth=1.5, label="the optimizer's threshold (momentum)")
    # the threshold at the peak lr in view; warmup's tiny lrs would put 2/lr decades above everything else
    values = [r["sharpness"] for r in measured]
    top = max([*values, *([2 / max(r["lr"] for r in positive)] if positive else [])])
    if min(values) > 0:
        axes.set_yscale("log")
        axes.set_ylim(min(values) / 2, 2 * top)
    else:
        axes.set_ylim(min(values) - 0.1 * abs(top), 1.2 * top)
    axes.set_ylabel("sharpness")
    axes.legend()
