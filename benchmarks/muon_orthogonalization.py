"""How close Muon's orthogonalisations get to the exact polar factor U V^T (torch.linalg.svd),
at equal numbers of matrix products: Jordan's quintic Newton-Schulz and Polar Express (Amsel et
al. 2025, arXiv:2505.16932) both cost three products a step.

Matrices: Gaussian ones of several shapes, and real gradients: the hidden matrices of tiny-gpt
(2 layers, width 128) after some AdamW steps on the standard-library corpus, momentum as Muon
would orthogonalise it (the gradient itself at the step measured). Error: ||X - U V^T||_F /
||U V^T||_F, in float32 and in bf16 (Muon's default), and the range of X's singular values.
Prints the table and writes ``benchmarks/results/muon_orthogonalization.json``.

    python benchmarks/muon_orthogonalization.py --steps 3,5,7,10
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from gradwise.bench.machine import describe_machine
from gradwise.optim.muon import newton_schulz, polar_express
from gradwise.problems.tiny_gpt import next_byte_loss, tiny_gpt

RESULTS = Path(__file__).parent / "results"
GAUSSIAN_SHAPES = ((128, 128), (128, 512), (512, 128), (384, 128), (256, 1024))
METHODS = {"newton_schulz": newton_schulz, "polar_express": polar_express}


def gaussian_matrices(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {f"gaussian {m}x{n}": torch.randn(m, n, generator=generator) for m, n in GAUSSIAN_SHAPES}


def tiny_gpt_gradients(steps: int) -> dict[str, torch.Tensor]:
    """The gradients of tiny-gpt's hidden matrices after ``steps`` AdamW steps (lr 2e-3)."""
    workload = tiny_gpt(batch_size=16, seed=0, n_layer=2, d_model=128, n_head=4)
    model = workload.model
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
    for _ in range(steps + 1):
        optimizer.zero_grad()
        next_byte_loss(model, workload.train_data.next_batch()).backward()
        if _ < steps:
            optimizer.step()
    return {f"tiny-gpt {name.removesuffix('.weight')} {tuple(p.shape)[0]}x{tuple(p.shape)[1]}": p.grad.detach().clone()
            for name, p in model.named_parameters() if p.ndim == 2 and "embedding" not in name}


def measure(matrix: torch.Tensor, steps: int, method: str, dtype: torch.dtype, exact: torch.Tensor) -> dict:
    result = METHODS[method](matrix, steps, dtype=dtype).double()
    singular = torch.linalg.svdvals(result)
    return {
        "relative_error": float(torch.linalg.vector_norm(result - exact) / torch.linalg.vector_norm(exact)),
        "singular_min": float(singular.min()),
        "singular_max": float(singular.max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="3,4,5,6,7,8,10", help="iteration counts (3 matrix products each)")
    parser.add_argument("--gpt-steps", type=int, default=50, help="AdamW steps before tiny-gpt's gradients")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "muon_orthogonalization.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    steps_list = [int(s) for s in args.steps.split(",")]
    matrices = {**gaussian_matrices(args.seed), **tiny_gpt_gradients(args.gpt_steps)}
    rows = []
    print(f"{'matrix':38s} {'dtype':8s} {'steps':>5s} {'products':>8s} {'NS error':>9s} {'PE error':>9s} "
          f"{'NS sigma range':>16s} {'PE sigma range':>16s}")
    for name, matrix in matrices.items():
        u, _, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
        exact = u @ vh
        for dtype in (torch.float32, torch.bfloat16):
            for steps in steps_list:
                row = {"matrix": name, "shape": list(matrix.shape), "dtype": str(dtype).removeprefix("torch."),
                       "steps": steps, "matrix_products": 3 * steps}
                for method in METHODS:
                    row[method] = measure(matrix, steps, method, dtype, exact)
                rows.append(row)
                ns, pe = row["newton_schulz"], row["polar_express"]
                print(f"{name:38s} {row['dtype']:8s} {steps:5d} {3 * steps:8d} {ns['relative_error']:9.4f} "
                      f"{pe['relative_error']:9.4f} {ns['singular_min']:7.3f}-{ns['singular_max']:<8.3f} "
                      f"{pe['singular_min']:7.3f}-{pe['singular_max']:<8.3f}")
    summary = {}
    for dtype in ("float32", "bfloat16"):
        for steps in steps_list:
            chosen = [r for r in rows if r["dtype"] == dtype and r["steps"] == steps]
            wins = sum(r["polar_express"]["relative_error"] < r["newton_schulz"]["relative_error"] for r in chosen)
            summary[f"{dtype} {steps} steps"] = {
                "polar_express_closer": f"{wins}/{len(chosen)}",
                "median_error_newton_schulz": float(torch.tensor([r["newton_schulz"]["relative_error"]
                                                                  for r in chosen]).median()),
                "median_error_polar_express": float(torch.tensor([r["polar_express"]["relative_error"]
                                                                  for r in chosen]).median()),
            }
    print()
    for key, value in summary.items():
        print(f"{key:20s} Polar Express closer on {value['polar_express_closer']:>6s}; median error "
              f"NS {value['median_error_newton_schulz']:.4f}, PE {value['median_error_polar_express']:.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": describe_machine(), "summary": summary, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
