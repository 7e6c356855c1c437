"""Function evaluations of gradwise's L-BFGS, torch.optim.LBFGS and scipy's L-BFGS-B to the
N-D Rosenbrock minimiser from (-1.2, 1, -1.2, 1, ...), history 10, stopping at a gradient
inf-norm of 1e-5 (scipy's default pgtol). Prints the table and writes
``benchmarks/results/lbfgs_evaluations.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import scipy.optimize
import torch

import gradwise.optim as gw
from gradwise.bench.machine import describe_machine

RESULTS = Path(__file__).parent / "results"
DIMS = (2, 10, 30, 60, 100, 200)


def rosenbrock(x: torch.Tensor) -> torch.Tensor:
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def count(optimizer_class, start: np.ndarray, **options) -> tuple[int, float]:
    x = torch.tensor(start, requires_grad=True)
    optimizer = optimizer_class(
        [x], history_size=10, max_iter=100_000, max_eval=100_000, tolerance_grad=1e-5, tolerance_change=0.0, **options
    )

    def closure():
        optimizer.zero_grad()
        loss = rosenbrock(x)
        loss.backward()
        return loss

    optimizer.step(closure)
    return optimizer.state[x]["func_evals"], float((x.detach() - 1).abs().max())


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    rows = []
    print(f"{'dim':>4} {'scipy':>6} {'gradwise':>9} {'torch':>6} {'gradwise/scipy':>15} {'torch/scipy':>12}")
    for dim in DIMS:
        start = np.array([-1.2 if i % 2 == 0 else 1.0 for i in range(dim)])
        reference = scipy.optimize.minimize(
            scipy.optimize.rosen, start, jac=scipy.optimize.rosen_der, method="L-BFGS-B",
            options=dict(maxcor=10, gtol=1e-5, ftol=0.0, maxiter=100_000, maxfun=100_000),
        )
        ours, our_distance = count(gw.LBFGS, start, line_search_fn="more_thuente")
        theirs, their_distance = count(torch.optim.LBFGS, start, line_search_fn="strong_wolfe")
        row = dict(
            dim=dim, scipy=int(reference.nfev), gradwise=ours, torch=theirs,
            gradwise_ratio=ours / reference.nfev, torch_ratio=theirs / reference.nfev,
            distances=dict(scipy=float(np.abs(reference.x - 1).max()), gradwise=our_distance, torch=their_distance),
        )
        rows.append(row)
        print(f"{dim:>4} {row['scipy']:>6} {ours:>9} {theirs:>6} "
              f"{row['gradwise_ratio']:>15.3f} {row['torch_ratio']:>12.3f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "lbfgs_evaluations.json"
    path.write_text(json.dumps({"machine": describe_machine(), "rows": rows}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
