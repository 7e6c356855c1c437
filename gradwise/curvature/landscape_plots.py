"""Pictures of the landscapes and of the per-layer curvature, as PNG files (matplotlib's ``Figure``, no pyplot
state, so any backend and any thread will do).

- :func:`plot_line`: the losses along the line between two parameter sets (:class:`.landscape.LineLandscape`),
  with the two end points marked;
- :func:`plot_contour` and :func:`plot_surface`: a loss on the plane of two directions
  (:class:`.landscape.PlaneLandscape`), as filled contours with the solution marked, and as a 3-D surface;
- :func:`plot_layers`: each tensor's largest block eigenvalue and condition estimate
  (:class:`.sharpness.LayerCurvature`) as horizontal bars on log scales; an infinite condition (a block with a
  Ritz value <= 0: not positive definite) is drawn as a hatched bar to the axis's end, labelled with its
  signed smallest eigenvalue.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from gradwise.curvature.landscape import LineLandscape, PlaneLandscape
from gradwise.curvature.sharpness import LayerCurvature


def plot_line(line: LineLandscape, path: Path, title: str, ends: tuple[str, str] = ("start", "end")) -> None:
    """Each loss against :math:`\\alpha`, the two parameter sets (``ends``' names) at 0 and 1."""
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.subplots()
    for name, values in line.losses.items():
        axes.plot(line.alphas, values, marker="o", markersize=3, label=name)
    for alpha, label in zip((0.0, 1.0), ends):
        axes.axvline(alpha, color="grey", linestyle=":", linewidth=1)
        axes.annotate(label, (alpha, 1.0), xycoords=("data", "axes fraction"), ha="center", va="bottom")
    axes.set_xlabel("alpha  (parameters (1 - alpha) start + alpha end)")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    axes.set_title(title, pad=18)
    figure.savefig(path, dpi=110)


def _finite(values: np.ndarray) -> np.ndarray:
    """Non-finite losses (a point where the model overflows) masked out of the picture."""
    return np.ma.masked_invalid(values)


def plot_contour(surface: PlaneLandscape, loss: str, path: Path, title: str, levels: int = 30) -> None:
    """Filled contours of ``surface.losses[loss]`` over the plane, the centre (the solution) marked."""
    values = _finite(surface.losses[loss])
    figure = Figure(figsize=(6, 5), layout="constrained")
    axes = figure.subplots()
    a, b = np.meshgrid(surface.coordinates, surface.coordinates, indexing="ij")
    filled = axes.contourf(a, b, values, levels=levels, cmap="viridis")
    axes.contour(a, b, values, levels=levels, colors="white", linewidths=0.3, alpha=0.6)
    figure.colorbar(filled, ax=axes, label=loss)
    axes.plot([0.0], [0.0], marker="*", color="red", markersize=12, linestyle="none", label="solution")
    axes.set_xlabel("first direction (filter-normalised)")
    axes.set_ylabel("second direction (filter-normalised)")
    axes.set_aspect("equal")
    axes.legend(loc="upper right")
    axes.set_title(title)
    figure.savefig(path, dpi=110)


def plot_surface(surface: PlaneLandscape, loss: str, path: Path, title: str) -> None:
    """``surface.losses[loss]`` as a 3-D surface over the plane."""
    values = _finite(surface.losses[loss])
    figure = Figure(figsize=(7, 5.5), layout="constrained")
    axes = figure.add_subplot(projection="3d")
    a, b = np.meshgrid(surface.coordinates, surface.coordinates, indexing="ij")
    axes.plot_surface(a, b, values, cmap="viridis", linewidth=0, antialiased=True)
    axes.set_xlabel("first direction")
    axes.set_ylabel("second direction")
    axes.set_zlabel(loss)
    axes.set_title(title)
    figure.savefig(path, dpi=110)


def plot_layers(rows: Sequence[LayerCurvature], path: Path, title: str) -> None:
    """Two panels sharing the tensors: the largest eigenvalue of each block and its condition estimate, on
    log scales. A non-positive largest eigenvalue has no bar (a log scale cannot show it)."""
    names = [row.name for row in rows]
    figure = Figure(figsize=(11, 0.32 * len(rows) + 1.8), layout="constrained")
    top_axes, condition_axes = figure.subplots(1, 2, sharey=True)
    positions = np.arange(len(rows))
    tops = [row.lambda_max if row.lambda_max > 0 else np.nan for row in rows]
    top_axes.barh(positions, tops, xerr=[row.lambda_max_error for row in rows], color="tab:blue")
    top_axes.set_xscale("log")
    top_axes.set_xlabel("largest eigenvalue of the block")
    top_axes.set_yticks(positions, names, fontsize=8)
    top_axes.invert_yaxis()
    conditions = [row.condition for row in rows]
    finite = [value for value in conditions if math.isfinite(value)]
    end = 10 * max(finite) if finite else 10.0
    condition_axes.barh(
        positions, [value if math.isfinite(value) else np.nan for value in conditions], color="tab:orange"
    )
    for position, row, value in zip(positions, rows, conditions):
        if not math.isfinite(value):
            condition_axes.barh(position, end, color="none", edgecolor="tab:red", hatch="//")
            condition_axes.annotate(
                f"inf (lambda_min {row.lambda_min:.2g})", (1.3, position), fontsize=7, va="center", ha="left"
            )
    condition_axes.set_xscale("log")
    condition_axes.set_xlim(1.0, end)
    condition_axes.set_xlabel("condition estimate lambda_max / lambda_min (a lower bound)")
    for axes in (top_axes, condition_axes):
        axes.grid(alpha=0.3, axis="x")
    figure.suptitle(title)
    figure.savefig(path, dpi=110)
