"""Why Lion, Adafactor, Sophia and K-FAC miss the tuned AdamW's loss in the tiny-gpt race.

The race (``make race-tiny-gpt``, ``benchmarks/results/race_tiny_gpt_400.json``) ranks the
optimizers; this script tests one mechanism per loser with runs of ``gradwise train`` at the
race's settings (tiny-gpt, 2 layers, 400 steps, batch 32 x 128 bytes, cosine, bf16, seed 0)
and the loser's tuned lr and weight decay, changing one thing:

- Adafactor without and with a first moment (``beta1=0.9``): the preset keeps the paper's
  memory-saving setting (no momentum).
- K-FAC at 2.5x its tuned lr (the race's best was at the edge of its range), and how far each
  parameter moved from its initialisation (``||W_final - W_0|| / ||W_0||``) against AdamW's
  run: K-FAC preconditions ``nn.Linear`` layers only, so the tied embedding (also the output
  layer) steps by momentum SGD.
- Lion, whose steps are bounded per coordinate (sign steps), at 4x the batch beside AdamW at 4x
  the batch: Chen et al. (2023) report that Lion's advantage grows with the batch. For Lion and
  Sophia (whose clipped steps are bounded too), the fraction of each tensor's coordinates
  that moved at least 90% of the most a bounded step allows (``sum_t lr_t``). For Sophia also
  the fraction of coordinates whose step is clipped at the end of the run (``|m| >= rho h``: a
  sign step of size lr, as Lion's), read from its final checkpoint.

Prints a table and writes ``benchmarks/results/race_tiny_gpt_probes.json``. Runs that already
have a ``summary.json`` in ``--out`` are read, not re-run (an interrupted study continues).
About 25 minutes on two idle cores::

    .venv/bin/python benchmarks/race_probes.py --out runs/race-probes
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradwise.bench.machine import describe_machine
from gradwise.checkpoints.atomic import read_checkpoint
from gradwise.problems.tiny_gpt import TinyGPT

RESULTS = Path(__file__).parent / "results" / "race_tiny_gpt_probes.json"
RACE = ["--workload", "tiny-gpt", "--workload-options", "n_layer=2", "--steps", "400", "--eval-every", "100",
        "--seed", "0", "--no-progress"]

PROBES: dict[str, list[str]] = {
    # the race's tuned points (race_tiny_gpt_400.json), then one change each
    "adamw": ["--optimizer", "adamw", "--lr", "0.002", "--weight-decay", "0.1"],
    "adafactor": ["--optimizer", "adafactor", "--lr", "0.0711", "--weight-decay", "0.0333"],
    "adafactor-beta1": ["--optimizer", "adafactor", "--lr", "0.0711", "--weight-decay", "0.0333",
                        "--optimizer-options", "beta1=0.9"],
    "kfac": ["--optimizer", "kfac", "--lr", "0.0237", "--weight-decay", "0.0333"],
    "kfac-lr-2.5x": ["--optimizer", "kfac", "--lr", "0.06", "--weight-decay", "0.0333"],
    "adamw-batch128": ["--optimizer", "adamw", "--lr", "0.002", "--weight-decay", "0.1", "--batch-size", "128"],
    "lion": ["--optimizer", "lion", "--lr", "0.0004", "--weight-decay", "0.1"],
    "lion-batch128": ["--optimizer", "lion", "--lr", "0.0004", "--weight-decay", "0.1", "--batch-size", "128"],
    "sophia": ["--optimizer", "sophia", "--lr", "0.0004217", "--weight-decay", "0.2"],
    # the initialisation (an lr of 1e-12 for one step): the reference for how far weights moved
    "init": ["--optimizer", "sgd", "--lr", "1e-12", "--steps", "1", "--eval-every", "1000"],
}
MOVED = ("token_embedding.weight", "position_embedding.weight", "blocks.0.attention.qkv.weight",
         "blocks.0.mlp.0.weight", "blocks.1.mlp.2.weight")


def run(name: str, out: Path) -> dict[str, Any]:
    folder = out / name
    if not (folder / "summary.json").exists():
        print(f"running {name} ...", flush=True)
        # a probe's own option follows the race's and wins (argparse keeps the last value)
        command = [sys.executable, "-m", "gradwise", "train", *RACE, *PROBES[name], "--out", str(folder)]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads((folder / "summary.json").read_text())


def moved(folder: Path, init: dict[str, torch.Tensor]) -> dict[str, float]:
    """How far each of :data:`MOVED` went from its initialisation, relative to its initial norm."""
    final = torch.load(folder / "model.pt", weights_only=True, map_location="cpu")
    return {key: float((final[key].float() - init[key].float()).norm() / init[key].float().norm()) for key in MOVED}


def at_budget(folder: Path, init: dict[str, torch.Tensor]) -> dict[str, float]:
    """The fraction of each of :data:`MOVED`'s coordinates that went at least 90% of the way a
    bounded-step optimizer can take them: ``sum_t lr_t`` (Lion's sign steps, Sophia's clipped
    ones), which a coordinate reaches only by stepping the same way at every step."""
    with open(folder / "metrics.csv", newline="") as file:
        budget = sum(float(row["lr"]) for row in csv.DictReader(file) if row["kind"] == "train")
    final = torch.load(folder / "model.pt", weights_only=True, map_location="cpu")
    return {key: float(((final[key].float() - init[key].float()).abs() >= 0.9 * budget).float().mean())
            for key in MOVED}


def linear_share() -> float:
    """The share of the race's model's parameters in ``nn.Linear`` layers: what K-FAC preconditions."""
    model = TinyGPT(n_layer=2)
    linear = sum(p.numel() for module in model.modules() if isinstance(module, nn.Linear) for p in module.parameters())
    return linear / sum(p.numel() for p in model.parameters())


def sophia_clipped(folder: Path) -> float:
    """The fraction of coordinates whose last Sophia step was clipped (``|m| >= rho * h``)."""
    [checkpoint] = sorted((folder / "checkpoints").glob("*.ckpt"))[-1:]
    optimizer = read_checkpoint(checkpoint)["optimizer"]
    clipped = total = 0
    for group in optimizer["param_groups"]:
        for index in group["params"]:
            state = optimizer["state"][index]
            ratio = state["exp_avg"].abs() / (group["rho"] * state["hessian"]).clamp(min=group["eps"])
            clipped += int((ratio >= 1).sum())
            total += ratio.numel()
    return clipped / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("race-results/probes"), help="folder of the runs")
    args = parser.parse_args()
    losses = {name: run(name, args.out)["final_metrics"]["val_loss"] for name in PROBES if name != "init"}
    run("init", args.out)
    init = torch.load(args.out / "init" / "model.pt", weights_only=True, map_location="cpu")
    movement = {name: moved(args.out / name, init) for name in ("adamw", "kfac", "kfac-lr-2.5x", "lion", "sophia")}
    saturated = {name: at_budget(args.out / name, init) for name in ("lion", "lion-batch128", "sophia")}
    clipped = sophia_clipped(args.out / "sophia")
    print(f"{'run':<16} final val_loss")
    for name, loss in losses.items():
        print(f"{name:<16} {loss:.4f}")
    print(f"\nmoved from init  {'  '.join(f'{key:>29}' for key in MOVED)}")
    for name, row in movement.items():
        print(f"{name:<16} {'  '.join(f'{row[key]:>29.3f}' for key in MOVED)}")
    print(f"\nat 90% of sum(lr) {'  '.join(f'{key:>29}' for key in MOVED)}")
    for name, row in saturated.items():
        print(f"{name:<16} {'  '.join(f'{row[key]:>29.3f}' for key in MOVED)}")
    print(f"\nSophia's coordinates clipped at the end: {clipped:.1%}")
    print(f"K-FAC preconditions {linear_share():.1%} of the parameters (nn.Linear)")
    RESULTS.write_text(json.dumps({"machine": describe_machine(), "settings": RACE, "probes": PROBES,
                                   "final_val_loss": losses, "moved_from_init": movement,
                                   "coordinates_at_the_step_budget": saturated,
                                   "sophia_clipped_fraction": clipped,
                                   "kfac_preconditioned_share": linear_share()}, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
