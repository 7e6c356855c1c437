"""The classic comparison on sparse logistic regression: SGD, SVRG, SAGA, L-BFGS, SQN and
Newton-CG, objective gap against examples accessed (Bottou, Curtis & Nocedal 2018, Fig. 3.1).

Prints the table, writes ``benchmarks/results/logistic_comparison.json`` (with the machine's
description) and ``benchmarks/results/logistic_comparison.png``. The default size runs in
a few minutes on 2 cores; ``--full-size`` uses RCV1's shape (20,000 x 47,000).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

from gradwise.bench.logistic_race import (
    DEFAULT_SIZE,
    FULL_SIZE,
    STOCHASTIC,
    format_logistic_table,
    logistic_race,
    plot_logistic_race,
    to_json,
)
from gradwise.bench.machine import describe_machine
from gradwise.problems.logistic import SparseLogistic

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=float, default=20.0, help="budget per method in epochs (default: 20)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--full-size", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    size = FULL_SIZE if args.full_size else DEFAULT_SIZE
    start = time.perf_counter()
    problem = SparseLogistic(**size)
    result = logistic_race(problem, epochs=args.epochs, batch_size=args.batch_size)
    print(format_logistic_table(result))
    n = result.num_examples
    best_stochastic_1 = min(result.curves[m].gap_at(n) for m in STOCHASTIC)
    best_batch_1 = min(result.curves[m].gap_at(n) for m in ("lbfgs", "newton_cg"))
    best_end = min(result.curves.items(), key=lambda item: item[1].gap_at(args.epochs * n))[0]
    finding = {
        "sgd_gap_after_1_epoch": result.curves["sgd"].gap_at(n),
        "best_batch_gap_after_1_epoch": best_batch_1,
        "best_stochastic_gap_after_1_epoch": best_stochastic_1,
        "best_method_at_end": best_end,
        "sgd_gap_at_end": result.curves["sgd"].gap_at(args.epochs * n),
        "lbfgs_gap_at_end": result.curves["lbfgs"].gap_at(args.epochs * n),
    }
    print(
        f"\nafter 1 epoch: SGD {finding['sgd_gap_after_1_epoch']:.2e} vs best batch method {best_batch_1:.2e}; "
        f"after {args.epochs:g} epochs: best is {best_end}, L-BFGS {finding['lbfgs_gap_at_end']:.2e} "
        f"vs SGD {finding['sgd_gap_at_end']:.2e}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    plot = plot_logistic_race(result, args.out / "logistic_comparison.png")
    payload = {
        "machine": describe_machine(), "seconds": time.perf_counter() - start, "finding": finding, **to_json(result)
    }
    path = args.out / "logistic_comparison.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path} and {plot}")


if __name__ == "__main__":
    main()
