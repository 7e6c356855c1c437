"""Which blocks of tiny-gpt are ill-conditioned? Sharpness and per-layer curvature at the end of a race run.

Issue 17's measured answer. A common claim puts the embedding's Hessian block near condition number
1e4 and attention's near 1e2. This trains tiny-gpt at the race's settings (2 layers, 400 steps of
32 x 128 bytes, AdamW at 2e-3 with weight decay 0.1, cosine schedule, bf16 autocast, seed 0), then
runs ``gradwise landscape`` on the run: the line from the initial to the final parameters, the
plane of two filter-normalised directions, the sharpness (top eigenvalue and trace) and, for every
parameter tensor, the extreme eigenvalues of its diagonal Hessian block with their Lanczos residuals
and the condition estimate (a lower bound when the bottom Ritz value is positive, infinite when it
is not: see :mod:`gradwise.curvature.sharpness`). Each analysis is timed on its own.

The tensors are grouped as embedding (token, tied to the output layer, and position), attention
(qkv and output projection), MLP and norm (LayerNorm gains and biases), and the claim is judged per
group from the numbers (:func:`verdict`). Writes ``benchmarks/results/landscape_tiny_gpt.json`` and
``landscape_tiny_gpt_layers.png`` (the per-layer bar chart) and ``landscape_tiny_gpt_line.png``.
A run already in ``--out`` (its ``model.pt``) is reused, not retrained. About 40 minutes on two
shared cores::

    .venv/bin/python benchmarks/landscape_tiny_gpt.py --out runs/landscape-tiny-gpt
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from gradwise.bench.machine import describe_machine
from gradwise.cli import main
from gradwise.train import TrainConfig, train

RESULTS = Path(__file__).parent / "results"
SETTINGS: dict[str, Any] = dict(
    workload="tiny-gpt",
    workload_options={"n_layer": 2},
    optimizer="adamw",
    lr=2e-3,
    weight_decay=0.1,
    steps=400,
    eval_every=100,
    seed=0,
)
"""The race's tiny-gpt settings (``benchmarks/results/race_tiny_gpt_400.json``: AdamW's tuned lr)."""
ANALYSES = {
    "line": ["--line", "--points", "21"],
    "plane": ["--plane", "--grid", "11", "--span", "1"],
    "sharpness": ["--sharpness", "--probes", "30", "--lanczos-steps", "30"],
    "layers": ["--layers", "--lanczos-steps", "20"],
}
"""``gradwise landscape``'s options per analysis: the layers take 2 x 21 products per tensor (1,176 for the 28
tensors), the sharpness 61 on the whole model."""
CLAIM = {"embedding": 1e4, "attention": 1e2}
"""The claimed condition numbers of the blocks, per group."""


def group_of(name: str) -> str:
    """The group of a tiny-gpt parameter by its name."""
    if "embedding" in name:
        return "embedding"
    if ".attention." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    return "norm"


def train_run(folder: Path) -> dict[str, Any]:
    """The run's summary, training it first unless ``folder`` holds a finished run."""
    if not (folder / "model.pt").exists():
        train(TrainConfig(**SETTINGS), out=folder, progress=True)
    return json.loads((folder / "summary.json").read_text())


def analyse(folder: Path) -> tuple[dict[str, Any], dict[str, float]]:
    """Each analysis by ``gradwise landscape``, one call (and one output folder) each: the merged report and
    the seconds each took. An analysis whose folder holds its results (an interrupted study) is read, not
    run again."""
    report: dict[str, Any] = {}
    seconds = {}
    for name, options in ANALYSES.items():
        out = folder / "landscape" / name
        if not (out / "seconds.json").exists():
            argv = ["landscape", str(folder), *options, "--threads", "2", "--no-progress", "--out", str(out)]
            started = time.perf_counter()
            if main(argv) != 0:
                raise SystemExit(f"gradwise {' '.join(argv)} failed")
            (out / "seconds.json").write_text(json.dumps(time.perf_counter() - started))
        seconds[name] = json.loads((out / "seconds.json").read_text())
        found = json.loads((out / "landscape.json").read_text())
        report.update({key: value for key, value in found.items() if key != "files"})
    return report, seconds


def verdict(group: str, rows: list[dict[str, Any]], claimed: float) -> str:
    """The claim "this group's blocks have condition number near ``claimed``" against the blocks' numbers.

    A block with ``lambda_min <= 0`` has no finite condition number (the claim does not describe it). A
    finite condition is a lower bound: above 10x the claim it refutes the claim; within a factor of 10 it is
    consistent with it; below a tenth of the claim it refutes it only when the bottom eigenvalue has
    converged (its residual under a tenth of it), and decides nothing otherwise.
    """
    said = []
    for row in rows:
        kappa, low, error = row["condition"], row["lambda_min"], row["lambda_min_error"]
        if kappa is None:
            said.append(f"{row['name']}: not positive definite (lambda_min {low:.3g}): no finite condition number")
        elif kappa > 10 * claimed:
            said.append(f"{row['name']}: kappa >= {kappa:.3g}, over 10x the claimed {claimed:.0e}")
        elif kappa >= claimed / 10:
            said.append(f"{row['name']}: kappa >= {kappa:.3g}, within 10x of the claimed {claimed:.0e}")
        elif error < 0.1 * low:
            said.append(f"{row['name']}: kappa = {kappa:.3g} (bottom converged), under a tenth of {claimed:.0e}")
        else:
            said.append(f"{row['name']}: kappa >= {kappa:.3g} only (bottom not converged): undecided")
    consistent = sum("within 10x" in line for line in said)
    return f"{group}: {consistent} of {len(rows)} blocks consistent with kappa ~ {claimed:.0e}; " + "; ".join(said)


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per group: the tensors, the range of their top eigenvalues, how many are indefinite, the finite
    condition lower bounds, and the median ratio |lambda_min| / lambda_max of the indefinite ones."""
    groups: dict[str, dict[str, Any]] = {}
    for group in ("embedding", "attention", "mlp", "norm"):
        members = [row for row in rows if row["group"] == group]
        finite = [row["condition"] for row in members if row["condition"] is not None]
        negative = [
            abs(row["lambda_min"]) / row["lambda_max"]
            for row in members
            if row["lambda_min"] < 0 and row["lambda_max"] > 0
        ]
        groups[group] = {
            "tensors": [row["name"] for row in members],
            "lambda_max_range": [min(row["lambda_max"] for row in members), max(row["lambda_max"] for row in members)],
            "indefinite": sum(row["lambda_min"] < 0 for row in members),
            "finite_condition_lower_bounds": finite,
            "median_negative_ratio": statistics.median(negative) if negative else None,
        }
    return groups


def main_script() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/landscape-tiny-gpt"), help="the run folder")
    args = parser.parse_args()
    summary = train_run(args.out)
    report, seconds = analyse(args.out)
    rows = [{**row, "group": group_of(row["name"])} for row in report["layers"]["rows"]]
    verdicts = {
        group: verdict(group, [row for row in rows if row["group"] == group], claimed)
        for group, claimed in CLAIM.items()
    }
    result = {
        "machine": describe_machine(),
        "settings": {
            **SETTINGS,
            "precision": "bf16 (training); float32, eval mode (landscape)",
            "analyses": ANALYSES,
            "sample": report["sample"],
        },
        "final_val_loss": summary["final_metrics"]["val_loss"],
        "training_s": summary["wall_time_s"],
        "seconds": seconds,
        "costs": {name: report[name]["cost"] for name in ANALYSES},
        "line": report["line"],
        "plane": {key: report["plane"][key] for key in ("grid", "span", "one_dim", "coordinates", "train_loss")},
        "sharpness": report["sharpness"],
        "layers": rows,
        "groups": summarise(rows),
        "claim": CLAIM,
        "verdicts": verdicts,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "landscape_tiny_gpt.json").write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    shutil.copyfile(args.out / "landscape" / "layers" / "layers.png", RESULTS / "landscape_tiny_gpt_layers.png")
    shutil.copyfile(args.out / "landscape" / "line" / "line.png", RESULTS / "landscape_tiny_gpt_line.png")
    sharp = report["sharpness"]
    print(
        f"final val_loss {result['final_val_loss']:.4f}; top eigenvalue {sharp['top_eigenvalue']:.4g} "
        f"+- {sharp['top_eigenvalue_error']:.2g}, trace {sharp['trace']:.4g} +- {sharp['trace_standard_error']:.2g}"
    )
    for name, row in result["groups"].items():
        bounds = ", ".join(f"{kappa:.3g}" for kappa in row["finite_condition_lower_bounds"]) or "none"
        print(
            f"{name}: lambda_max {row['lambda_max_range'][0]:.3g}..{row['lambda_max_range'][1]:.3g}, "
            f"{row['indefinite']} of {len(row['tensors'])} indefinite, finite kappa lower bounds: {bounds}"
        )
    for line in verdicts.values():
        print(line)
    print(
        f"seconds: training {summary['wall_time_s']:.0f}, "
        + ", ".join(f"{name} {value:.0f}" for name, value in seconds.items())
    )
    print(f"wrote {RESULTS / 'landscape_tiny_gpt.json'}, landscape_tiny_gpt_layers.png, landscape_tiny_gpt_line.png")


if __name__ == "__main__":
    main_script()
