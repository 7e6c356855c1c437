"""The default ``gradwise train --workload tiny-gpt`` run, end to end: wall clock, tokens/s, final loss.

Runs the command exactly as a user would (a subprocess with the default settings), so the
wall clock includes start-up, building the corpus, the evaluations, the checkpoints and the
final evaluation on the whole validation split. Prints a table and writes
``benchmarks/results/train_tiny_gpt.json`` with the machine's description and its load
average (the machine is shared: a loaded machine runs slower).

The requirement checked: within ten minutes on two CPU cores, a validation loss (nats per
byte) at most 0.6x the unigram baseline of the same split.

The run gets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it: on a shared machine
with more runnable processes than cores, OpenMP threads that spin-wait at every barrier
(the default) made a training step 2-4x slower than threads that sleep (measured on the
project's 2-core machine at load average 6: 1.95 s vs 0.50 s per step); on an idle
machine the two are within noise. The setting is recorded in the JSON.

    .venv/bin/python benchmarks/train_tiny_gpt.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gradwise.bench.machine import describe_machine

RESULTS = Path(__file__).parent / "results" / "train_tiny_gpt.json"
TIME_LIMIT_S = 600.0
WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON file to write (default: {RESULTS})")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "run"
        load_before = os.getloadavg()
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "gradwise", "train", "--workload", "tiny-gpt", "--out", str(out)],
                       check=True, env={**os.environ, "OMP_WAIT_POLICY": WAIT_POLICY})
        wall = time.perf_counter() - start
        load_after = os.getloadavg()
        summary = json.loads((out / "summary.json").read_text())
        config = json.loads((out / "config.json").read_text())
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    target = summary["target"]
    first_below = next((r for r in records if r["kind"] == "eval" and r["val_loss"] <= target["value"]), None)
    elapsed = {r["step"]: r["elapsed_s"] for r in records if r["kind"] == "train"}
    report = {
        "command": "gradwise train --workload tiny-gpt",
        "config": config,
        "description": summary["description"],
        "wall_clock_s": wall,
        "training_loop_s": summary["wall_time_s"],
        "tokens_per_s": summary["tokens_per_s"],
        "final_val_loss": summary["final_metrics"]["val_loss"],
        "unigram_baseline": target["baseline"],
        "target": target["value"],
        "ratio_to_baseline": summary["final_metrics"]["val_loss"] / target["baseline"],
        "target_reached": target["reached"] and wall <= TIME_LIMIT_S,
        "first_eval_below_target": None if first_below is None else {
            "step": first_below["step"], "val_loss_estimate": first_below["val_loss"],
            "elapsed_s": elapsed[first_below["step"]]},
        "load_average_before_after": [load_before, load_after],
        "omp_wait_policy": WAIT_POLICY,
        "machine": describe_machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    rows = [
        ("wall clock (s)", f"{wall:.1f} (limit {TIME_LIMIT_S:.0f})"),
        ("tokens/s (training steps)", f"{report['tokens_per_s']:,.0f}"),
        ("final validation loss (nats/byte)", f"{report['final_val_loss']:.4f}"),
        ("unigram baseline (nats/byte)", f"{report['unigram_baseline']:.4f}"),
        ("ratio to baseline", f"{report['ratio_to_baseline']:.3f} (target <= 0.6)"),
        ("first evaluation below target", "never" if first_below is None else
         f"step {first_below['step']} at {elapsed[first_below['step']]:.0f} s"),
        ("load average before / after", f"{load_before[0]:.1f} / {load_after[0]:.1f}"),
        ("target reached in time", str(report["target_reached"])),
    ]
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"{name.ljust(width)}  {value}" for name, value in rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
