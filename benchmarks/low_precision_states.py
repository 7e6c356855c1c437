"""Must m and v stay in fp32? Final loss of tiny-gpt with the optimizer's moments in each state format.

Issue 16's measured answer. tiny-gpt at the race's settings (2 layers, 400 steps of 32 x 128
bytes, cosine schedule, bf16 autocast) with each optimizer at its tuned lr from the race
(``benchmarks/results/race_tiny_gpt_400.json``: AdamW 2e-3, Lion 4e-4, Muon 0.03; weight
decay 0.1), 3 seeds per (optimizer, format):

- AdamW with ``state_format`` fp32, bf16 (round to nearest), bf16-sr (stochastic rounding), 8bit,
  4bit;
- Lion and Muon (its momentum; the embedding and vectors' AdamW moments too) in fp32, bf16-sr
  and 8bit.

For each: the final validation loss (mean and spread over seeds), the validation curve, and the
optimizer state's bytes (the real tensors, ``gradwise.plan.memory.measured_bytes``). For the bf16
AdamW runs also the mechanism the fp32 claim rests on (:class:`SecondMomentProbe`): how many of
``v``'s updates are under half a bf16 ulp of ``v`` (round to nearest drops them), and how far the
stored ``v`` has drifted from an exact float32 shadow fed the same gradients.

Prints a table, writes ``benchmarks/results/low_precision_states.json`` and
``low_precision_states.png``. Runs already in ``--out`` (a ``result.json``) are read, not re-run:
an interrupted study continues. About 80 minutes on two cores (33 runs)::

    .venv/bin/python benchmarks/low_precision_states.py --out runs/low-precision-states
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch

from gradwise.bench.machine import describe_machine
from gradwise.plan.memory import measured_bytes
from gradwise.train import TrainConfig, Trainer
from gradwise.train.metrics import read_records

RESULTS = Path(__file__).parent / "results" / "low_precision_states.json"
SEEDS = (0, 1, 2)
TUNED = {"adamw": 2e-3, "lion": 4e-4, "muon": 0.03}
"""The race's best lr per optimizer on these settings (race_tiny_gpt_400.json)."""
STUDY = [("adamw", fmt) for fmt in ("fp32", "bf16", "bf16-sr", "8bit", "4bit")] + [
    (name, fmt) for name in ("lion", "muon") for fmt in ("fp32", "bf16-sr", "8bit")
]
MECHANISM_EVERY = 10


class SecondMomentProbe:
    """Step hooks on a bf16-state Adam that measure what rounding does to ``v``.

    Beside the stored ``v`` it keeps a float32 shadow updated exactly from the same gradients
    (``beta2 v + (1 - beta2) g^2``). Every :data:`MECHANISM_EVERY` steps it records the fraction
    of entries whose exact update differs from the stored ``v`` by less than half a bf16 ulp of it
    (round to nearest drops those updates; stochastic rounding keeps them on average), and the
    stored ``v`` against the shadow: the mean of ``stored / shadow - 1`` (the bias the rounding has
    accumulated)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.steps = 0
        self.shadows: dict[torch.Tensor, torch.Tensor] = {}
        self.before: dict[torch.Tensor, torch.Tensor] = {}
        self.records: list[dict[str, float]] = []
        optimizer.register_step_pre_hook(lambda *_: self.snapshot())
        optimizer.register_step_post_hook(lambda *_: self.update())

    def moments(self) -> list[tuple[torch.Tensor, float]]:
        return [(param, group["betas"][1]) for group in self.optimizer.param_groups for param in group["params"]
                if param.grad is not None]

    def snapshot(self) -> None:
        self.steps += 1
        self.before = {}
        if self.steps % MECHANISM_EVERY == 0:
            for param, _ in self.moments():
                stored = self.optimizer.state[param].get("exp_avg_sq")
                self.before[param] = stored.float() if stored is not None else torch.zeros_like(param.float())

    def update(self) -> None:
        below_half_ulp = changed = 0
        ratios: list[torch.Tensor] = []
        for param, beta2 in self.moments():
            square = param.grad.float() ** 2
            shadow = self.shadows.setdefault(param, torch.zeros_like(square))
            shadow.mul_(beta2).add_(square, alpha=1 - beta2)
            if param in self.before:
                old = self.before[param]
                increment = (1 - beta2) * (square - old)
                half_ulp = torch.where(old > 0, old * 2.0**-9, torch.zeros_like(old))  # bf16: 8 significant bits
                changed += int((increment != 0).sum())
                below_half_ulp += int(((increment != 0) & (increment.abs() < half_ulp)).sum())
                stored = self.optimizer.state[param]["exp_avg_sq"].float()
                kept = shadow > 0
                ratios.append(stored[kept] / shadow[kept] - 1)
        if self.before:
            drift = torch.cat(ratios)
            self.records.append({"step": self.steps, "below_half_ulp": below_half_ulp / max(changed, 1),
                                 "mean_drift": float(drift.mean()), "median_drift": float(drift.median())})


def run(name: str, state_format: str, seed: int, out: Path) -> dict[str, Any]:
    folder = out / f"{name}-{state_format}-seed{seed}"
    if (folder / "result.json").exists():
        return json.loads((folder / "result.json").read_text())
    if folder.exists():  # an interrupted run: start it again
        for path in sorted(folder.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
    config = TrainConfig(workload="tiny-gpt", workload_options={"n_layer": 2}, optimizer=name, lr=TUNED[name],
                         weight_decay=0.1, steps=400, eval_every=100, seed=seed, state_format=state_format)
    trainer = Trainer(config, folder)
    probe = SecondMomentProbe(trainer.optimizer) if name == "adamw" and state_format.startswith("bf16") else None
    summary = trainer.run()
    records = read_records(folder / "metrics.jsonl")
    result = {
        "optimizer": name, "state_format": state_format, "seed": seed,
        "final_val_loss": summary.final_metrics["val_loss"],
        "val_curve": [(r["step"], r["val_loss"]) for r in records if r.get("kind") == "eval"],
        "state_bytes": measured_bytes(trainer.optimizer)["optimizer_state"],
        "second_moment": probe.records if probe else None,
        "wall_time_s": summary.wall_time_s,
    }
    (folder / "result.json").write_text(json.dumps(result))
    return result


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    rows = {}
    for name, state_format in STUDY:
        runs = [r for r in results if r["optimizer"] == name and r["state_format"] == state_format]
        if not runs:
            continue
        losses = [r["final_val_loss"] for r in runs]
        reference = [r["final_val_loss"] for r in results if r["optimizer"] == name and r["state_format"] == "fp32"]
        by_seed = {r["seed"]: r["final_val_loss"] for r in results if r["optimizer"] == name
                   and r["state_format"] == "fp32"}
        probes = [record for r in runs for record in (r["second_moment"] or [])]
        last = [record for record in probes if record["step"] == max(p["step"] for p in probes)] if probes else []
        rows[f"{name}/{state_format}"] = {
            "optimizer": name, "state_format": state_format, "seeds": len(runs),
            "final_val_loss_mean": statistics.fmean(losses),
            "final_val_loss_min": min(losses), "final_val_loss_max": max(losses),
            "vs_fp32": statistics.fmean(losses) / statistics.fmean(reference) - 1 if reference else None,
            # the same seed's fp32 run (same initialisation and batches): the format's own effect
            "vs_fp32_by_seed": [r["final_val_loss"] / by_seed[r["seed"]] - 1 for r in runs if r["seed"] in by_seed],
            "state_bytes": runs[0]["state_bytes"],
            "v_updates_below_half_ulp": statistics.fmean(p["below_half_ulp"] for p in probes) if probes else None,
            "v_mean_drift_at_end": statistics.fmean(p["mean_drift"] for p in last) if last else None,
        }
    return rows


def plot(results: list[dict[str, Any]], rows: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (curves, bars) = plt.subplots(1, 2, figsize=(13, 5))
    for key, row in rows.items():
        runs = [r for r in results if r["optimizer"] == row["optimizer"] and r["state_format"] == row["state_format"]]
        steps = [step for step, _ in runs[0]["val_curve"]]
        means = [statistics.fmean(r["val_curve"][i][1] for r in runs) for i in range(len(steps))]
        curves.plot(steps, means, marker="o", label=key, linestyle="-" if row["state_format"] == "fp32" else "--")
    curves.set(xlabel="step", ylabel="validation loss (nats/byte, mean of seeds)", title="tiny-gpt, 2 layers")
    curves.set_ylim(top=3.0)
    curves.legend(fontsize=8)
    names = list(rows)
    means = [rows[k]["final_val_loss_mean"] for k in names]
    low = [rows[k]["final_val_loss_mean"] - rows[k]["final_val_loss_min"] for k in names]
    high = [rows[k]["final_val_loss_max"] - rows[k]["final_val_loss_mean"] for k in names]
    bars.barh(names, means, xerr=[low, high], color=["#4c72b0" if "fp32" in k else "#dd8452" for k in names])
    bars.set(xlabel="final validation loss (bars: min-max over seeds)", xlim=(min(means) - 0.2, max(means) + 0.1))
    for index, key in enumerate(names):
        bars.text(rows[key]["final_val_loss_mean"], index, f" {rows[key]['state_bytes'] / 1e6:.2f} MB",
                  va="center", fontsize=8)
    bars.invert_yaxis()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/low-precision-states"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    # seed by seed: an interrupted study has every (optimizer, format) at the first seeds
    results = [run(name, fmt, seed, args.out) for seed in SEEDS for name, fmt in STUDY]
    rows = summarise(results)
    print(f"{'optimizer/format':<18} {'val loss':>9} {'min..max':>15} {'vs fp32':>8} {'by seed':>22} {'state MB':>9}"
          f" {'v <ulp/2':>8} {'v drift':>8}")
    for key, row in rows.items():
        versus = "" if row["vs_fp32"] is None else f"{100 * row['vs_fp32']:+.2f}%"
        below = "" if row["v_updates_below_half_ulp"] is None else f"{100 * row['v_updates_below_half_ulp']:.1f}%"
        drift = "" if row["v_mean_drift_at_end"] is None else f"{100 * row['v_mean_drift_at_end']:+.2f}%"
        seeds = " ".join(f"{100 * value:+.2f}" for value in row["vs_fp32_by_seed"])
        print(f"{key:<18} {row['final_val_loss_mean']:9.4f} {row['final_val_loss_min']:7.4f}.."
              f"{row['final_val_loss_max']:.4f} {versus:>8} {seeds:>22} {row['state_bytes'] / 1e6:9.3f} {below:>8}"
              f" {drift:>8}")
    RESULTS.write_text(json.dumps({"machine": describe_machine(), "settings": {
        "workload": "tiny-gpt", "workload_options": {"n_layer": 2}, "steps": 400, "lr": TUNED, "weight_decay": 0.1,
        "seeds": list(SEEDS)}, "rows": rows, "runs": results}, indent=1))
    plot(results, rows, RESULTS.with_suffix(".png"))
    print(f"wrote {RESULTS} and {RESULTS.with_suffix('.png')}")


if __name__ == "__main__":
    main()
