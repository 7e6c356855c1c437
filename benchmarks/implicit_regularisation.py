"""Implicit regularisation on the mlp and tiny-gpt workloads: SGD with momentum and AdamW, each stopped at the first
check where its training loss falls below a common target, compared by the sharpness of the solution (top Hessian
eigenvalue with its Lanczos residual, Hutchinson trace with its standard error), the validation loss and the 1-D
interpolation between the two solutions of the same seed (Li et al. 2018, arXiv:1712.09913); and, for SGD, a small
against a large batch at the linear-scaling lr (Keskar et al. 2017, arXiv:1609.04836). Prints the tables and writes
``benchmarks/results/implicit_regularisation.json`` and ``.png`` (mlp) and ``implicit_regularisation_tiny_gpt.json``
and ``.png`` (tiny-gpt).

Each optimizer's lr is picked from a small grid on seed 0 (the lr that reaches the target in the fewest
steps) and then run on every seed. No weight decay, no clipping, a constant lr: what differs between the
solutions is the optimizer, not an explicit regulariser. Same seed, same initial weights and batch order.

The training loss is that of a fixed training sample, on which the sharpness and the interpolation are measured
too: on the mlp its whole training set, checked after every step; on tiny-gpt, a small configuration trained on the
stream of the standard-library corpus (so that one sharpness measurement takes seconds, not minutes), evenly spaced
windows of the training split, checked every few steps. The validation loss is that of a fixed validation sample.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from update_only import UPDATE_ONLY  # beside this script

from gradwise.bench.machine import describe_machine
from gradwise.curvature import module_loss
from gradwise.curvature.landscape import alpha_grid, interpolate
from gradwise.curvature.sharpness import sharpness
from gradwise.problems.corpus import stdlib_corpus
from gradwise.problems.data import Batch
from gradwise.problems.mlp import teacher_data
from gradwise.train import TrainConfig, Trainer

RESULTS = Path(__file__).parent / "results"
SEEDS = (0, 1, 2)
MOMENTUM = 0.9
ALPHAS = (-0.25, 1.25, 31)
MLP_TRAIN_EXAMPLES = 2048
MLP_VAL_EXAMPLES = 2048
GPT = dict(seq_len=32, d_model=32, n_layer=2, n_head=2)
GPT_TRAIN_WINDOWS = 128
GPT_VAL_WINDOWS = 512


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """The mean cross-entropy over every prediction: one per example (mlp), one per byte of each window (tiny-gpt)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def mlp_samples() -> tuple[Batch, Batch]:
    """The mlp workload's whole training set (the teacher's first examples) and a validation set after it."""
    inputs, labels, _ = teacher_data(8, 4, MLP_TRAIN_EXAMPLES + MLP_VAL_EXAMPLES, 8)
    return ((inputs[:MLP_TRAIN_EXAMPLES], labels[:MLP_TRAIN_EXAMPLES]),
            (inputs[MLP_TRAIN_EXAMPLES:], labels[MLP_TRAIN_EXAMPLES:]))


def windows(tokens: Tensor, count: int, length: int) -> Batch:
    """``count`` evenly spaced non-overlapping windows of ``tokens``: the first ``length`` bytes of each and the
    ``length`` bytes that follow them one place on (the next-byte targets)."""
    starts = torch.linspace(0, (tokens.numel() - 1) // length - 1, count).long() * length
    window = tokens[starts[:, None] + torch.arange(length + 1)].long()
    return window[:, :-1], window[:, 1:]


def gpt_samples() -> tuple[Batch, Batch]:
    """Evenly spaced windows of the standard-library corpus's training and validation splits."""
    corpus = stdlib_corpus()
    return (windows(corpus.train, GPT_TRAIN_WINDOWS, GPT["seq_len"]),
            windows(corpus.validation, GPT_VAL_WINDOWS, GPT["seq_len"]))


@dataclass(frozen=True)
class Study:
    """One workload's study: what it trains, where and how often it checks the target, what it measures."""

    workload: str
    config: dict[str, Any]
    """The run settings beside UPDATE_ONLY: the workload's options, the precision, the threads."""
    samples: Callable[[], tuple[Batch, Batch]]
    """The fixed training sample (target, sharpness, interpolation) and validation sample."""
    sample_description: str
    target: float
    """The common target T: each run stops at the first check whose training-sample loss is below it."""
    check_every: int
    """Steps between checks of the training-sample loss."""
    batch: int
    sgd_lrs: tuple[float, ...]
    adamw_lrs: tuple[float, ...]
    other_batches: tuple[int, ...]
    """SGD at these batches too, each at lr = tuned SGD lr x batch / ``batch`` (linear scaling)."""
    max_examples: int
    """A run that has not reached the target after this many examples stops and is reported as such."""
    lanczos_steps: int
    probes: int
    results: str
    """The results' file name, without the suffix."""


STUDIES = {
    "mlp": Study(
        workload="mlp",
        config=dict(workload_options=dict(train_examples=MLP_TRAIN_EXAMPLES, val_examples=MLP_VAL_EXAMPLES),
                    precision="fp32", threads=2),
        samples=mlp_samples,
        sample_description=f"training: the whole training set ({MLP_TRAIN_EXAMPLES} examples); "
                           f"validation: {MLP_VAL_EXAMPLES} examples from the same teacher",
        target=0.02,
        check_every=1,
        batch=64,
        sgd_lrs=(0.02, 0.05, 0.1),
        adamw_lrs=(3e-4, 1e-3, 3e-3),
        other_batches=(256, 16),
        max_examples=64 * 4000,  # 125 epochs
        lanczos_steps=20,
        probes=30,
        results="implicit_regularisation",
    ),
    # One thread: on two loaded shared cores a step took 21 ms with one thread, 0.3 to 1.1 s with two.
    "tiny-gpt": Study(
        workload="tiny-gpt",
        config=dict(workload_options=GPT, precision="fp32", threads=1),
        samples=gpt_samples,
        sample_description=f"training: {GPT_TRAIN_WINDOWS} evenly spaced windows of the training split; validation: "
                           f"{GPT_VAL_WINDOWS} evenly spaced windows of the validation split ({GPT['seq_len']} "
                           "predicted bytes each)",
        target=2.1,
        check_every=10,
        batch=32,
        sgd_lrs=(0.1, 0.3, 1.0),
        adamw_lrs=(1e-3, 3e-3, 1e-2),
        other_batches=(128, 8),
        max_examples=32 * 3000,  # 3000 steps at batch 32
        lanczos_steps=10,
        probes=10,
        results="implicit_regularisation_tiny_gpt",
    ),
}


class Experiment:
    """A study's runs, on its fixed samples."""

    def __init__(self, study: Study) -> None:
        self.study = study
        self.train, self.val = study.samples()

    def trainer(self, optimizer: str, lr: float, batch: int, steps: int, seed: int) -> Trainer:
        options = dict(momentum=MOMENTUM) if optimizer == "sgd" else {}
        return Trainer(TrainConfig(workload=self.study.workload, optimizer=optimizer, optimizer_options=options, lr=lr,
                                   batch_size=batch, steps=steps, seed=seed, **self.study.config, **UPDATE_ONLY))

    def train_to_target(self, optimizer: str, lr: float, batch: int, seed: int) -> tuple[dict[str, Any], Trainer]:
        """Train until the training-sample loss is below the target (checked every ``check_every`` steps) or
        ``max_examples`` examples."""
        study = self.study
        max_steps = study.max_examples // batch
        trainer = self.trainer(optimizer, lr, batch, max_steps, seed)
        trainer.model.train()
        started = time.perf_counter()
        loss, reached = float("nan"), None
        for step in range(1, max_steps + 1):
            trainer.train_step()
            if step % study.check_every:
                continue
            with torch.no_grad():
                loss = cross_entropy(trainer.model(self.train[0]), self.train[1]).item()
            if not np.isfinite(loss):
                break
            if loss < study.target:
                reached = step
                break
        diverged = not np.isfinite(loss)
        run = {"optimizer": optimizer, "lr": lr, "batch": batch, "seed": seed, "steps": reached,
               "train_loss": None if diverged else loss, "diverged": diverged, "seconds": time.perf_counter() - started}
        outcome = f"reached at step {reached}" if reached else "diverged" if diverged else "did not reach"
        print(f"  {optimizer:5} lr {lr:<6g} batch {batch:<4} seed {seed}: {outcome} (loss {loss:.4f}, "
              f"{run['seconds']:.0f} s)", flush=True)
        return run, trainer

    def measure(self, run: dict[str, Any], trainer: Trainer) -> dict[str, Any]:
        if run["steps"] is None:
            return run  # not a solution at the target: nothing to compare
        model = trainer.model.eval()
        loss_fn, params = module_loss(model, cross_entropy, *self.train)
        started = time.perf_counter()
        with sdpa_kernel(SDPBackend.MATH):  # attention in the form that has second derivatives
            found = sharpness(loss_fn, params, steps=self.study.lanczos_steps, probes=self.study.probes,
                              generator=torch.Generator().manual_seed(run["seed"]))
        seconds = time.perf_counter() - started
        with torch.no_grad():
            logits = model(self.val[0])
            val_loss = cross_entropy(logits, self.val[1]).item()
            val_accuracy = (logits.argmax(-1) == self.val[1]).float().mean().item()
        print(f"    top eigenvalue {found.top_eigenvalue:.4g} (residual {found.top_eigenvalue_error:.2g}), trace "
              f"{found.trace:.4g} +- {found.trace_standard_error:.2g}, val loss {val_loss:.4f} ({seconds:.0f} s)",
              flush=True)
        return {**run, "val_loss": val_loss, "val_accuracy": val_accuracy, "sharpness_seconds": seconds,
                "sharpness": {k: v for k, v in found.to_dict().items() if k != "exact"},
                "params": [p.detach().clone() for p in params]}

    def tune(self, optimizer: str, lrs: tuple[float, ...]) -> tuple[float, list[dict[str, Any]], tuple]:
        grid, best = [], None
        for lr in lrs:
            run, trainer = self.train_to_target(optimizer, lr, self.study.batch, SEEDS[0])
            grid.append(run)
            if run["steps"] is not None and (best is None or run["steps"] < best[0]["steps"]):
                best = (run, trainer)
        if best is None:
            raise SystemExit(f"no {optimizer} lr in {lrs} reached the target {self.study.target}")
        return best[0]["lr"], grid, best

    def line(self, sgd: dict[str, Any], adamw: dict[str, Any]) -> dict[str, Any]:
        model = self.trainer("sgd", 0.1, self.study.batch, 1, 0).model.eval()  # the shape; its weights go unused
        train_fn, _ = module_loss(model, cross_entropy, *self.train)
        val_fn, _ = module_loss(model, cross_entropy, *self.val)
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
    if not reached:
        return {"reached": f"0/{len(runs)}"}
    return {
        "reached": f"{len(reached)}/{len(runs)}",
        "steps": stats([r["steps"] for r in reached]),
        "top_eigenvalue": stats([r["sharpness"]["top_eigenvalue"] for r in reached]),
        "top_eigenvalue_residual": stats([r["sharpness"]["top_eigenvalue_error"] for r in reached]),
        "trace": stats([r["sharpness"]["trace"] for r in reached]),
        "val_loss": stats([r["val_loss"] for r in reached]),
        "val_accuracy": stats([r["val_accuracy"] for r in reached]),
    }


def plot(study: Study, groups: dict[str, list[dict[str, Any]]], lines: list[dict[str, Any]], path: Path) -> Path:
    figure = Figure(figsize=(11, 4.2), dpi=130, layout="constrained")
    line_axes, scatter_axes = figure.subplots(1, 2)
    for entry, color in zip(lines, ("tab:blue", "tab:orange", "tab:green")):
        line_axes.plot(entry["alphas"], entry["train"], "-", color=color, label=f"seed {entry['seed']} train")
        line_axes.plot(entry["alphas"], entry["val"], "--", color=color, label=f"seed {entry['seed']} val")
    line_axes.axhline(study.target, color="gray", linewidth=0.7, linestyle=":")
    line_axes.set_yscale("log")
    line_axes.set_xlabel("alpha (0: SGD solution, 1: AdamW solution)")
    line_axes.set_ylabel("loss")
    line_axes.set_title(f"Interpolation SGD -> AdamW (same seed, {study.workload})", fontsize=10)
    line_axes.legend(fontsize=7)
    for (name, runs), marker in zip(groups.items(), ("o", "s", "^", "v")):
        done = [r for r in runs if r["steps"] is not None]
        if not done:
            continue
        scatter_axes.errorbar([r["sharpness"]["top_eigenvalue"] for r in done], [r["val_loss"] for r in done],
                              xerr=[r["sharpness"]["top_eigenvalue_error"] for r in done], fmt=marker, label=name)
    scatter_axes.set_xlabel("top Hessian eigenvalue of the training loss")
    scatter_axes.set_ylabel("validation loss")
    scatter_axes.set_title(f"Solutions at training loss < {study.target:g} ({study.workload}, {len(SEEDS)} seeds)",
                           fontsize=10)
    scatter_axes.legend(fontsize=8)
    for axes in (line_axes, scatter_axes):
        axes.grid(True, which="both", alpha=0.3)
    figure.savefig(path)
    return path


def run_study(study: Study) -> None:
    started = time.perf_counter()
    experiment = Experiment(study)
    print(f"{study.workload}: tuning on seed {SEEDS[0]} (target training loss {study.target})", flush=True)
    sgd_lr, sgd_grid, sgd_best = experiment.tune("sgd", study.sgd_lrs)
    adamw_lr, adamw_grid, adamw_best = experiment.tune("adamw", study.adamw_lrs)
    sgd_runs, adamw_runs = [experiment.measure(*sgd_best)], [experiment.measure(*adamw_best)]
    for seed in SEEDS[1:]:
        sgd_runs.append(experiment.measure(*experiment.train_to_target("sgd", sgd_lr, study.batch, seed)))
        adamw_runs.append(experiment.measure(*experiment.train_to_target("adamw", adamw_lr, study.batch, seed)))
    lines = [experiment.line(s, a) for s, a in zip(sgd_runs, adamw_runs) if s["steps"] and a["steps"]]
    groups = {f"SGD b{study.batch} lr {sgd_lr:g}": sgd_runs, f"AdamW b{study.batch} lr {adamw_lr:g}": adamw_runs}
    for batch in study.other_batches:
        lr = sgd_lr * batch / study.batch
        groups[f"SGD b{batch} lr {lr:g}"] = [experiment.measure(*experiment.train_to_target("sgd", lr, batch, seed))
                                             for seed in SEEDS]
    summaries = {name: summary(runs) for name, runs in groups.items()}
    print(f"\n{'group':>22} {'reached':>7} {'steps':>12} {'top eigenvalue':>18} {'trace':>18} {'val loss':>16}")
    for name, s in summaries.items():
        if "steps" not in s:
            print(f"{name:>22} {s['reached']:>7}")
            continue
        print(f"{name:>22} {s['reached']:>7} {s['steps']['mean']:>6.0f} +- {s['steps']['std']:<4.0f}"
              f"{s['top_eigenvalue']['mean']:>9.2f} +- {s['top_eigenvalue']['std']:<5.2f}"
              f"{s['trace']['mean']:>9.1f} +- {s['trace']['std']:<6.1f}"
              f"{s['val_loss']['mean']:>8.4f} +- {s['val_loss']['std']:.4f}")
    for entry in lines:
        print(f"seed {entry['seed']}: train-loss barrier between the SGD and AdamW solutions "
              f"{entry['train_barrier']:.4f}, highest val loss on the segment {entry['val_max_inside']:.4f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    png = plot(study, groups, lines, RESULTS / f"{study.results}.png")
    parameters = sum(p.numel() for p in sgd_runs[0]["params"])
    for runs in groups.values():
        for run in runs:
            run.pop("params", None)
    path = RESULTS / f"{study.results}.json"
    payload = {
        "machine": describe_machine(),
        "load_average_1min_at_end": os.getloadavg()[0],
        "wall_seconds": time.perf_counter() - started,
        "workload": study.workload,
        "workload_options": study.config["workload_options"],
        "parameters": parameters,
        "precision": study.config["precision"],
        "samples": study.sample_description,
        "target_train_loss": study.target,
        "check_every": study.check_every,
        "momentum": MOMENTUM,
        "weight_decay": 0.0,
        "schedule": "constant",
        "lanczos_steps": study.lanczos_steps,
        "hutchinson_probes": study.probes,
        "max_examples": study.max_examples,
        "tuning": {"seed": SEEDS[0], "batch": study.batch, "sgd": sgd_grid, "adamw": adamw_grid,
                   "sgd_lr": sgd_lr, "adamw_lr": adamw_lr},
        "groups": {name: {"runs": runs, "summary": summaries[name]} for name, runs in groups.items()},
        "interpolation": lines,
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path} and {png} ({payload['wall_seconds']:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", nargs="+", choices=list(STUDIES), default=list(STUDIES),
                        help="the studies to run (default: all)")
    for name in parser.parse_args().workload:
        run_study(STUDIES[name])


if __name__ == "__main__":
    main()
