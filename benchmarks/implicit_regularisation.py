"""Implicit regularisation on the mlp workload: SGD with momentum and AdamW, each stopped at the first step
where its full training loss falls below a common target, compared by the sharpness of the solution
(top Hessian eigenvalue with its Lanczos residual, Hutchinson trace with its standard error), the
validation loss and the 1-D interpolation between the two solutions of the same seed (Li et al. 2018,
arXiv:1712.09913); and, for SGD, a small against a large batch at the linear-scaling lr (Keskar et al.
2017, arXiv:1609.04836). Prints the tables and writes ``benchmarks/results/implicit_regularisation.json``
and ``.png``.

Each optimizer's lr is picked from a small grid on seed 0 (the lr that reaches the target in the fewest
steps) and then run on every seed. No weight decay, no clipping, a constant lr: what differs between the
solutions is the optimizer, not an explicit regulariser. Same seed, same initial weights and batch order.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from update_only import UPDATE_ONLY  # beside this script

from gradwise.bench.machine import describe_machine
from gradwise.curvature import module_loss
from gradwise.curvature.landscape import alpha_grid, interpolate
from gradwise.curvature.sharpness import sharpness
from gradwise.problems.mlp import teacher_data
from gradwise.train import TrainConfig, Trainer

RESULTS = Path(__file__).parent / "results"
TRAIN_EXAMPLES = 2048
VAL_EXAMPLES = 2048
TARGET = 0.02
"""The common target T: each run stops at the first step whose full training loss (2048 examples) is below it."""
SEEDS = (0, 1, 2)
BATCH = 64
SGD_LRS = (0.02, 0.05, 0.1)
ADAMW_LRS = (3e-4, 1e-3, 3e-3)
MOMENTUM = 0.9
SMALL_BATCH, LARGE_BATCH = 16, 256
"""The batch-size comparison: SGD at these batches (and BATCH), each at lr = tuned SGD lr x batch / BATCH."""
MAX_EXAMPLES = 64 * 4000
"""A run that has not reached the target after this many examples (125 epochs) stops and is reported as such."""
LANCZOS_STEPS = 20
PROBES = 30
ALPHAS = (-0.25, 1.25, 31)
COMMON = dict(
    workload="mlp",
    workload_options=dict(train_examples=TRAIN_EXAMPLES, val_examples=VAL_EXAMPLES),
    threads=2,
    **UPDATE_ONLY,
)

inputs, labels, _ = teacher_data(8, 4, TRAIN_EXAMPLES + VAL_EXAMPLES, 8)
TRAIN = (inputs[:TRAIN_EXAMPLES], labels[:TRAIN_EXAMPLES])
VAL = (inputs[TRAIN_EXAMPLES:], labels[TRAIN_EXAMPLES:])


def train_to_target(optimizer: str, lr: float, batch: int, seed: int) -> tuple[dict[str, Any], Trainer]:
    """Train until the full training loss is below TARGET (checked after every step) or MAX_EXAMPLES."""
    options = dict(momentum=MOMENTUM) if optimizer == "sgd" else {}
    max_steps = MAX_EXAMPLES // batch
    trainer = Trainer(TrainConfig(optimizer=optimizer, optimizer_options=options, lr=lr, batch_size=batch,
                                  steps=max_steps, seed=seed, **COMMON))
    trainer.model.train()
    started = time.perf_counter()
    loss, reached = float("nan"), None
    for step in range(1, max_steps + 1):
        trainer.train_step()
        with torch.no_grad():
            loss = F.cross_entropy(trainer.model(TRAIN[0]), TRAIN[1]).item()
        if not np.isfinite(loss):
            break
        if loss < TARGET:
            reached = step
            break
    run = {"optimizer": optimizer, "lr": lr, "batch": batch, "seed": seed, "steps": reached,
           "train_loss": loss, "seconds": time.perf_counter() - started}
    print(f"  {optimizer:5} lr {lr:<6g} batch {batch:<4} seed {seed}: "
          f"{'reached at step ' + str(reached) if reached else 'did not reach'} (loss {loss:.4f})", flush=True)
    return run, trainer


def measure(run: dict[str, Any], trainer: Trainer) -> dict[str, Any]:
    model = trainer.model.eval()
    loss_fn, params = module_loss(model, F.cross_entropy, *TRAIN)
    found = sharpness(loss_fn, params, steps=LANCZOS_STEPS, probes=PROBES,
                      generator=torch.Generator().manual_seed(run["seed"]))
    with torch.no_grad():
        logits = model(VAL[0])
        val_loss = F.cross_entropy(logits, VAL[1]).item()
        val_accuracy = (logits.argmax(1) == VAL[1]).float().mean().item()
    return {**run, "val_loss": val_loss, "val_accuracy": val_accuracy,
            "sharpness": {k: v for k, v in found.to_dict().items() if k != "exact"},
            "params": [p.detach().clone() for p in params]}


def tune(optimizer: str, lrs: tuple[float, ...]) -> tuple[float, list[dict[str, Any]], tuple]:
    grid, best = [], None
    for lr in lrs:
        run, trainer = train_to_target(optimizer, lr, BATCH, SEEDS[0])
        grid.append(run)
        if run["steps"] is not None and (best is None or run["steps"] < best[0]["steps"]):
            best = (run, trainer)
    if best is None:
        raise SystemExit(f"no {optimizer} lr in {lrs} reached the target {TARGET}")
    return best[0]["lr"], grid, best


def line(sgd: dict[str, Any], adamw: dict[str, Any]) -> dict[str, Any]:
    model = Trainer(TrainConfig(optimizer="sgd", lr=0.1, steps=1, seed=0, **COMMON)).model.eval()
    train_fn, _ = module_loss(model, F.cross_entropy, *TRAIN)
    val_fn, _ = module_loss(model, F.cross_entropy, *VAL)
    found = interpolate({"train": train_fn, "val": val_fn}, sgd["params"], adamw["params"], alpha_grid(*ALPHAS))
    train = found.losses["train"]
    inside = (found.alphas >= 0) & (found.alphas <= 1)
    ends = max(train[np.argmin(abs(found.alphas))], train[np.argmin(abs(found.alphas - 1))])
    return {"seed": sgd["seed"], "alphas": found.alphas.tolist(), "train": train.tolist(),
            "val": found.losses["val"].tolist(), "train_barrier": float(train[inside].max() - ends),
            "val_max_inside": float(found.losses["val"][inside].max())}


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def stats(values: list[float]) -> dict[str, float]:
        return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values), "max": max(values)}
    reached = [r for r in runs if r["steps"] is not None]
    return {
        "reached": f"{len(reached)}/{len(runs)}",
        "steps": stats([r["steps"] for r in reached]),
        "top_eigenvalue": stats([r["sharpness"]["top_eigenvalue"] for r in reached]),
        "trace": stats([r["sharpness"]["trace"] for r in reached]),
        "val_loss": stats([r["val_loss"] for r in reached]),
        "val_accuracy": stats([r["val_accuracy"] for r in reached]),
    }


def plot(groups: dict[str, list[dict[str, Any]]], lines: list[dict[str, Any]], path: Path) -> Path:
    figure = Figure(figsize=(11, 4.2), dpi=130, layout="constrained")
    line_axes, scatter_axes = figure.subplots(1, 2)
    for entry, color in zip(lines, ("tab:blue", "tab:orange", "tab:green")):
        line_axes.plot(entry["alphas"], entry["train"], "-", color=color, label=f"seed {entry['seed']} train")
        line_axes.plot(entry["alphas"], entry["val"], "--", color=color, label=f"seed {entry['seed']} val")
    line_axes.axhline(TARGET, color="gray", linewidth=0.7, linestyle=":")
    line_axes.set_yscale("log")
    line_axes.set_xlabel("alpha (0: SGD solution, 1: AdamW solution)")
    line_axes.set_ylabel("loss")
    line_axes.set_title("Interpolation SGD -> AdamW (same seed)", fontsize=10)
    line_axes.legend(fontsize=7)
    for (name, runs), marker in zip(groups.items(), ("o", "s", "^", "v")):
        done = [r for r in runs if r["steps"] is not None]
        scatter_axes.errorbar([r["sharpness"]["top_eigenvalue"] for r in done], [r["val_loss"] for r in done],
                              xerr=[r["sharpness"]["top_eigenvalue_error"] for r in done], fmt=marker, label=name)
    scatter_axes.set_xlabel("top Hessian eigenvalue of the training loss")
    scatter_axes.set_ylabel("validation loss")
    scatter_axes.set_title(f"Solutions at training loss < {TARGET} (mlp, 3 seeds)", fontsize=10)
    scatter_axes.legend(fontsize=8)
    for axes in (line_axes, scatter_axes):
        axes.grid(True, which="both", alpha=0.3)
    figure.savefig(path)
    return path


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    torch.set_num_threads(2)
    print(f"tuning on seed {SEEDS[0]} (target training loss {TARGET})")
    sgd_lr, sgd_grid, sgd_best = tune("sgd", SGD_LRS)
    adamw_lr, adamw_grid, adamw_best = tune("adamw", ADAMW_LRS)
    sgd_runs, adamw_runs = [measure(*sgd_best)], [measure(*adamw_best)]
    for seed in SEEDS[1:]:
        sgd_runs.append(measure(*train_to_target("sgd", sgd_lr, BATCH, seed)))
        adamw_runs.append(measure(*train_to_target("adamw", adamw_lr, BATCH, seed)))
    lines = [line(s, a) for s, a in zip(sgd_runs, adamw_runs) if s["steps"] and a["steps"]]
    large_lr, small_lr = sgd_lr * LARGE_BATCH / BATCH, sgd_lr * SMALL_BATCH / BATCH
    large_runs = [measure(*train_to_target("sgd", large_lr, LARGE_BATCH, seed)) for seed in SEEDS]
    small_runs = [measure(*train_to_target("sgd", small_lr, SMALL_BATCH, seed)) for seed in SEEDS]
    groups = {f"SGD b{BATCH} lr {sgd_lr:g}": sgd_runs, f"AdamW b{BATCH} lr {adamw_lr:g}": adamw_runs,
              f"SGD b{LARGE_BATCH} lr {large_lr:g}": large_runs, f"SGD b{SMALL_BATCH} lr {small_lr:g}": small_runs}
    summaries = {name: summary(runs) for name, runs in groups.items()}
    print(f"\n{'group':>22} {'reached':>7} {'steps':>12} {'top eigenvalue':>18} {'trace':>18} {'val loss':>16}")
    for name, s in summaries.items():
        print(f"{name:>22} {s['reached']:>7} {s['steps']['mean']:>6.0f} +- {s['steps']['std']:<4.0f}"
              f"{s['top_eigenvalue']['mean']:>9.2f} +- {s['top_eigenvalue']['std']:<5.2f}"
              f"{s['trace']['mean']:>9.1f} +- {s['trace']['std']:<6.1f}"
              f"{s['val_loss']['mean']:>8.4f} +- {s['val_loss']['std']:.4f}")
    for entry in lines:
        print(f"seed {entry['seed']}: train-loss barrier between the SGD and AdamW solutions "
              f"{entry['train_barrier']:.4f}, highest val loss on the segment {entry['val_max_inside']:.4f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    png = plot(groups, lines, RESULTS / "implicit_regularisation.png")
    for runs in groups.values():
        for run in runs:
            run.pop("params")
    path = RESULTS / "implicit_regularisation.json"
    payload = {
        "machine": describe_machine(),
        "workload": "mlp",
        "train_examples": TRAIN_EXAMPLES,
        "val_examples": VAL_EXAMPLES,
        "target_train_loss": TARGET,
        "momentum": MOMENTUM,
        "weight_decay": 0.0,
        "schedule": "constant",
        "lanczos_steps": LANCZOS_STEPS,
        "hutchinson_probes": PROBES,
        "max_examples": MAX_EXAMPLES,
        "tuning": {"seed": SEEDS[0], "batch": BATCH, "sgd": sgd_grid, "adamw": adamw_grid,
                   "sgd_lr": sgd_lr, "adamw_lr": adamw_lr},
        "groups": {name: {"runs": runs, "summary": summaries[name]} for name, runs in groups.items()},
        "interpolation": lines,
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
