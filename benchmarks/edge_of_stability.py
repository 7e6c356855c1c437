"""Gradient descent at the edge of stability (Cohen et al. 2021, arXiv:2103.00065), seen through
``gradwise train --track-sharpness``: full-batch GD on the mlp workload (512 examples, cross-entropy) at
several constant learning rates, the sharpness measured every 5 steps; and what a measurement costs on
tiny-gpt, timed beside its training steps. Prints the tables and writes
``benchmarks/results/edge_of_stability.json`` and ``.png``.

At a learning rate whose 2/lr lies below the sharpness the network would otherwise reach, the sharpness
rises to 2/lr and hovers there while the loss keeps falling; at a small learning rate it settles below
2/lr on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from update_only import UPDATE_ONLY  # beside this script

from gradwise.bench.machine import describe_machine
from gradwise.train import TrainConfig, Trainer, train
from gradwise.train.metrics import read_records

RESULTS = Path(__file__).parent / "results"
LRS = [0.1, 0.2, 0.5, 1.0]
STEPS = 300
EVERY = 5
HOVER = (30, 150)
"""The steps over which the median sharpness is taken: after the rise, before the loss nears zero (where
cross-entropy's sharpness falls whatever the lr)."""
GD = dict(optimizer="sgd", threads=2, **UPDATE_ONLY)


def gradient_descent(lr: float, folder: Path) -> dict[str, Any]:
    out = folder / f"lr-{lr}"
    train(
        TrainConfig(
            workload="mlp",
            workload_options=dict(train_examples=512),
            batch_size=512,
            steps=STEPS,
            lr=lr,
            track_sharpness=EVERY,
            **GD,
        ),
        out,
    )
    records = [r for r in read_records(out / "metrics.jsonl") if "sharpness" in r]
    hovering = [r["sharpness"] for r in records if HOVER[0] <= r["step"] <= HOVER[1]]
    return {
        "lr": lr,
        "two_over_lr": 2 / lr,
        "median_sharpness": statistics.median(hovering),
        "max_sharpness": max(r["sharpness"] for r in records),
        "median_over_two_over_lr": statistics.median(hovering) * lr / 2,
        "steps": [r["step"] for r in records],
        "sharpness": [r["sharpness"] for r in records],
        "residual": [r["sharpness_residual"] for r in records],
        "sample_loss": [r["sharpness_sample_loss"] for r in records],
    }


def measurement_cost(folder: Path, steps: int = 8) -> dict[str, Any]:
    """tiny-gpt at its defaults (bf16, 32 x 128 bytes): seconds per training step and per measurement (K = 5),
    alternated in one run; the medians after the first pair, and the load average around them."""
    trainer = Trainer(TrainConfig(workload="tiny-gpt", steps=steps, track_sharpness=1, threads=2), folder / "gpt")
    trainer.model.train()
    step_seconds, measure_seconds = [], []
    for _ in range(steps):
        started = time.perf_counter()
        trainer.train_step()
        step_seconds.append(time.perf_counter() - started)
        started = time.perf_counter()
        measured = trainer.measure_sharpness(trainer.optimizer.param_groups[0]["lr"])
        measure_seconds.append(time.perf_counter() - started)
    step, measure = statistics.median(step_seconds[1:]), statistics.median(measure_seconds[1:])
    return {
        "workload": "tiny-gpt",
        "load_average_1min": os.getloadavg()[0],
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "sharpness_steps": 5,
        "products": measured["sharpness_products"],
        "step_s": step,
        "measurement_s": measure,
        "measurement_over_step": measure / step,
    }


def plot(runs: list[dict[str, Any]], path: Path) -> Path:
    figure = Figure(figsize=(7, 6), dpi=130, layout="constrained")
    sharpness_axes, loss_axes = figure.subplots(2, 1, sharex=True)
    for run, color in zip(runs, ("tab:blue", "tab:orange", "tab:green", "tab:red")):
        sharpness_axes.plot(run["steps"], run["sharpness"], "-", color=color, linewidth=1, label=f"lr {run['lr']:g}")
        sharpness_axes.axhline(run["two_over_lr"], color=color, linestyle="--", linewidth=0.8)
        loss_axes.plot(run["steps"], run["sample_loss"], color=color, linewidth=1)
    sharpness_axes.set_ylabel("sharpness (dashed: 2/lr)")
    sharpness_axes.set_yscale("log")
    sharpness_axes.set_title("Full-batch GD on the mlp (512 examples): the sharpness meets 2/lr", fontsize=10)
    sharpness_axes.legend(fontsize=8)
    loss_axes.set_ylabel("training loss")
    loss_axes.set_yscale("log")
    loss_axes.set_xlabel("step")
    for axes in (sharpness_axes, loss_axes):
        axes.grid(True, which="both", alpha=0.3)
    figure.savefig(path)
    return path


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    with tempfile.TemporaryDirectory() as folder:
        runs = [gradient_descent(lr, Path(folder)) for lr in LRS]
        cost = measurement_cost(Path(folder))
    print(f"{'lr':>5} {'2/lr':>6} {'first':>6} {'max':>6} {'median':>7} {'median x lr/2':>13} {'final loss':>10}")
    for run in runs:
        print(
            f"{run['lr']:>5g} {run['two_over_lr']:>6.2f} {run['sharpness'][0]:>6.2f} {run['max_sharpness']:>6.2f} "
            f"{run['median_sharpness']:>7.2f} {run['median_over_two_over_lr']:>13.2f} {run['sample_loss'][-1]:>10.4f}"
        )
    print(
        f"median over steps {HOVER[0]}-{HOVER[1]}; tiny-gpt ({cost['parameters']:,} parameters): a training step "
        f"{cost['step_s']:.3f} s, a measurement ({cost['products']} products) {cost['measurement_s']:.3f} s = "
        f"{cost['measurement_over_step']:.1f} steps (load average {cost['load_average_1min']:.1f})"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    png = plot(runs, RESULTS / "edge_of_stability.png")
    path = RESULTS / "edge_of_stability.json"
    payload = {
        "machine": describe_machine(),
        "workload": "mlp",
        "train_examples": 512,
        "steps": STEPS,
        "every": EVERY,
        "sharpness_steps": 5,
        "hover_steps": list(HOVER),
        "runs": runs,
        "cost": cost,
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
