"""Plots of the planning models, where a curve says more than a number (matplotlib, Agg).

The memory plan's bars are not here: they are written as SVG without matplotlib
(:mod:`gradwise.plan.svg_bars`), so that ``gradwise plan memory`` starts fast.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure


def plot_step_time(devices: list[int], curves: dict[str, list[float]], latency_share: dict[str, list[float]],
                   title: str, path: Path) -> Path:
    """Step time against devices per number format (log-log), and the latency's share."""
    figure = Figure(figsize=(10, 4.5), layout="constrained")
    time_axes, share_axes = figure.subplots(1, 2)
    for name, seconds in curves.items():
        time_axes.loglog(devices, [s * 1e3 for s in seconds], marker="o", label=name)
        share_axes.semilogx(devices, latency_share[name], marker="o", label=name)
    time_axes.set_xlabel("devices")
    time_axes.set_ylabel("step time (ms)")
    time_axes.set_title(title, fontsize="medium")
    share_axes.set_xlabel("devices")
    share_axes.set_ylabel("share of the step spent in latency")
    share_axes.set_ylim(0, 1)
    for axes in (time_axes, share_axes):
        axes.grid(alpha=0.3, which="both")
        axes.legend(fontsize="small")
    figure.savefig(path, dpi=120)
    return path


def plot_stability_region(taus: list[int], formula: list[float], simulated: list[float] | None,
                          marked: tuple[int, float] | None, path: Path) -> Path:
    """The stable region of delayed gradient descent in the (tau, eta a) plane."""
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.add_subplot()
    axes.fill_between(taus, 0, formula, alpha=0.25, label="stable: eta a < 2 sin(pi / (4 tau + 2))")
    axes.plot(taus, formula, color="C0")
    if simulated is not None:
        axes.plot(taus, simulated, "kx", label="boundary found by simulation")
    if marked is not None:
        axes.plot([marked[0]], [marked[1]], "r*", markersize=12, label=f"tau = {marked[0]}, eta a = {marked[1]:.3g}")
    axes.set_xlabel("delay tau (steps)")
    axes.set_ylabel("eta a")
    axes.set_ylim(0, 2.1)
    axes.set_title("Delayed gradient descent on a quadratic: stability region")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.savefig(path, dpi=120)
    return path
