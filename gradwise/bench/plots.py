"""Pictures of a race: trajectories over the landscape, and loss curves.

Both use one colour per optimizer (its place in the registry), so a reader can match the
two plots of a problem at a glance. Figures are built with matplotlib's object interface
(``matplotlib.figure.Figure``) and saved with the Agg renderer, never through ``pyplot``:
no window opens, and the caller's pyplot backend and state are left alone.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from mpl_toolkits.axes_grid1 import make_axes_locatable

from gradwise.bench.optimizers import OPTIMIZERS
from gradwise.bench.race import Entry, RaceResult
from gradwise.problems import Problem

GRID = 400  # landscape samples per axis
DPI = 130


def optimizer_color(name: str) -> tuple[float, float, float, float]:
    """The colour of optimizer ``name`` in every plot."""
    return matplotlib.colormaps["tab10"](list(OPTIMIZERS).index(name) % 10)


def _depth(rank: int, count: int) -> float:
    """Drawing order (``zorder``) of the run ranked ``rank`` of ``count``: the best on top."""
    return 3.0 + count - rank


def _legend_label(entry: Entry) -> str:
    label = f"{entry.optimizer} (lr {entry.run.lr:.3g})"
    return f"{label}, diverged" if entry.run.diverged else label


def _view(problem: Problem, entries: list[Entry]) -> tuple[tuple[float, float], tuple[float, float]]:
    """The plotting box: the problem's bounds, grown (plus a 3% margin) to show the
    trajectories of the runs that did not diverge, but by at most the box's own size on
    each side (runs that fly far away leave the picture)."""
    view = []
    for axis, (low, high) in enumerate(problem.bounds):
        size = high - low
        for entry in entries:
            points = entry.run.trajectory
            if points is not None and len(points) and not entry.run.diverged:
                low = min(low, max(float(points[:, axis].min()) - 0.03 * size, low - size))
                high = max(high, min(float(points[:, axis].max()) + 0.03 * size, high + size))
        view.append((low, high))
    return view[0], view[1]


def plot_contours(result: RaceResult, problem: Problem, path: str | Path) -> Path:
    """Filled contours of ``log10(f - f*)`` with every optimizer's trajectory on a 2-D problem."""
    if problem.dim != 2:
        raise ValueError(f"contour plots need a 2-D problem, got {problem.label} with dim {problem.dim}")
    entries = result.standings(problem)
    (x_low, x_high), (y_low, y_high) = _view(problem, entries)
    xs = np.linspace(x_low, x_high, GRID)
    ys = np.linspace(y_low, y_high, GRID)
    grid = torch.as_tensor(np.stack(np.meshgrid(xs, ys), axis=-1), dtype=problem.dtype)
    with torch.no_grad():
        gap = (problem(grid) - problem.minimum).double().numpy()
    positive = gap[gap > 0]
    floor = max(float(gap.max()) * 1e-12, float(positive.min()) if positive.size else 1e-12)
    log_gap = np.log10(np.maximum(gap, floor))

    fig = Figure(figsize=(8.0, 8.0))
    ax = fig.subplots()
    filled = ax.contourf(xs, ys, log_gap, levels=30, cmap="viridis", alpha=0.45)
    ax.contour(xs, ys, log_gap, levels=15, colors="white", linewidths=0.4, alpha=0.7)
    colorbar = fig.colorbar(filled, cax=make_axes_locatable(ax).append_axes("right", size="4%", pad=0.15))
    colorbar.set_label("log10(f(x) - f*)")
    for rank, entry in enumerate(entries):
        points = entry.run.trajectory
        if points is None:
            continue
        color = optimizer_color(entry.optimizer)
        depth = _depth(rank, len(entries))
        ax.plot(*points.T, "-", color=color, linewidth=1.4, alpha=0.9, label=_legend_label(entry), zorder=depth)
        ax.plot(*points[-1], "o", color=color, markersize=5, markeredgecolor="black", zorder=depth)
    start = problem.initial_point.double().numpy()
    minimiser = problem.minimiser.double().numpy()
    top = _depth(-1, len(entries))  # the markers above every run
    ax.plot(*start, "s", color="white", markeredgecolor="black", markersize=9, label="start", zorder=top)
    ax.plot(*minimiser, "*", color="gold", markeredgecolor="black", markersize=16, label="minimiser", zorder=top)
    ax.set_xlim(x_low, x_high)
    ax.set_ylim(y_low, y_high)
    ax.set_aspect("equal")
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    ax.set_title(f"{problem.label}: trajectories at each optimizer's chosen lr, {result.steps} steps")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, fontsize=9, frameon=False)
    return _save(fig, path)


def plot_losses(result: RaceResult, problem: Problem, path: str | Path) -> Path:
    """``f(x_t) - f*`` against step ``t`` (log scale), one curve per optimizer."""
    entries = result.standings(problem)
    gaps = [entry.run.losses - problem.minimum for entry in entries]
    # Show down to ten decades below the tolerance, no further: below that a float64 loss
    # is rounding noise. Zeros (an exact hit) are drawn just below the visible range.
    lowest = min((float(g[g > 0].min()) for g in gaps if (g > 0).any()), default=result.tol)
    bottom = max(result.tol * 1e-10, min(lowest, result.tol) / 2)
    floor = bottom / 10
    # Show up to a thousand times the worst starting gap: diverging runs leave at the top.
    top = 1e3 * max((float(g[0]) for g in gaps if len(g)), default=1.0)
    fig = Figure(figsize=(9.0, 5.4))
    ax = fig.subplots()
    for rank, (entry, gap) in enumerate(zip(entries, gaps)):
        color = optimizer_color(entry.optimizer)
        depth = _depth(rank, len(entries))
        curve = np.clip(gap, floor, 10 * top)
        ax.plot(np.arange(len(gap)), curve, color=color, linewidth=1.5, label=_legend_label(entry), zorder=depth)
        if entry.run.diverged and len(gap):
            last = min(curve[-1], top)
            ax.plot(len(gap) - 1, last, "x", color=color, markersize=9, markeredgewidth=2, zorder=depth, clip_on=False)
    ax.axhline(result.tol, color="black", linestyle="--", linewidth=1, label=f"tolerance {result.tol:g}")
    ax.set_yscale("log")
    ax.set_ylim(bottom, max(top, 10 * result.tol))
    ax.set_xlim(0, result.steps)
    ax.set_xlabel("step")
    ax.set_ylabel("f(x) - f*")
    ax.set_title(f"{problem.label}: suboptimality at each optimizer's chosen lr")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    return _save(fig, path)


def plot_race(result: RaceResult, out_dir: str | Path) -> list[Path]:
    """Every plot of a race into ``out_dir``: ``<problem>-loss.png`` for each problem and
    ``<problem>-contour.png`` for each 2-D one. Returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for problem in result.problems:
        if problem.dim == 2:
            paths.append(plot_contours(result, problem, out / f"{problem.label}-contour.png"))
        paths.append(plot_losses(result, problem, out / f"{problem.label}-loss.png"))
    return paths


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path
