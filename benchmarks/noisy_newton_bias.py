"""The bias of a subsampled Newton step, measured by Monte Carlo against the second-order
prediction Var(h_b) / H^2 (see ``gradwise.curvature.noisy_newton``). Prints the table and
writes ``benchmarks/results/noisy_newton_bias.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch
from matplotlib.figure import Figure

from gradwise.bench.machine import describe_machine
from gradwise.curvature import gamma_curvatures, noisy_newton_bias

RESULTS = Path(__file__).parent / "results"
BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128]
SHAPE = 4.0  # gamma curvatures with coefficient of variation 1/2


def plot(result, path: Path) -> Path:
    figure = Figure(figsize=(6, 4), dpi=130)
    axes = figure.subplots()
    axes.errorbar(result.batch_sizes, result.measured, yerr=[2 * e for e in result.standard_error], fmt="o",
                  label="measured E[step] / Newton step - 1 (2 s.e.)")
    axes.plot(result.batch_sizes, result.predicted, "-", label="second-order prediction Var(h_b) / H^2")
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xlabel("Hessian sample size b")
    axes.set_ylabel("relative bias of the expected step")
    axes.set_title("Subsampled Newton: the expected step overshoots", fontsize=10)
    axes.legend(fontsize=8)
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    return path


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    curvatures = gamma_curvatures(10_000, shape=SHAPE, mean=1.0, seed=0)
    result = noisy_newton_bias(curvatures, 1.0, BATCH_SIZES, trials=200_000, generator=torch.Generator().manual_seed(0))
    print(f"{'b':>4} {'measured':>10} {'std err':>9} {'predicted':>10} {'ratio':>6}")
    for b, m, e, p in zip(result.batch_sizes, result.measured, result.standard_error, result.predicted):
        print(f"{b:>4} {m:>10.5f} {e:>9.5f} {p:>10.5f} {m / p:>6.3f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    png = plot(result, RESULTS / "noisy_newton_bias.png")
    path = RESULTS / "noisy_newton_bias.json"
    payload = {"machine": describe_machine(), "gamma_shape": SHAPE, **asdict(result)}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
