"""Plots of the planning models, where a curve says more than a number (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

GB = 1e9


def plot_memory_by_stage(rows: list[dict], title: str, path: Path) -> Path:
    """Stacked bars of bytes per device by kind, one bar per ZeRO stage."""
    kinds = ["parameters", "gradients", "master_weights", "optimizer_state", "activations"]
    figure = Figure(figsize=(8, 4.5), layout="constrained")
    axes = figure.add_subplot()
    labels = [row["label"] for row in rows]
    bottom = [0.0] * len(rows)
    for kind in kinds:
        heights = [row["bytes"][kind] / GB for row in rows]
        if any(heights):
            axes.bar(labels, heights, bottom=bottom, label=kind.replace("_", " "))
            bottom = [b + h for b, h in zip(bottom, heights)]
    for x, total in enumerate(bottom):
        axes.annotate(f"{total:.3g} GB", (x, total), ha="center", va="bottom", fontsize="small")
    axes.set_ylabel("GB per device")
    axes.set_title(title)
    axes.legend(fontsize="small")
    axes.grid(axis="y", alpha=0.3)
    figure.savefig(path, dpi=120)
    return path


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
