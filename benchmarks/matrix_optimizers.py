"""Step time and optimizer-state bytes of the matrix and memory-efficient optimizers.

On the GPT-shaped parameter set of ``step_throughput.py`` (about 16.8M fp32 values in 51
tensors), each algorithm runs next to torch.optim's implementation (Adafactor, Muon) and the
PyPI packages ``pytorch-optimizer`` and ``heavyball`` where they have the same optimizer.
Every implementation gets its own copy of the parameters and gradients (some peers write
into ``.grad``). Timing rounds are interleaved in a new random order each round; a round of
Shampoo or SOAP is exactly ``refresh`` steps, so it contains one preconditioner refresh and
its mean is the amortised step time. The table gives medians and the ratio to the reference
implementation of the same algorithm (torch.optim where it has one, else pytorch-optimizer).

State bytes per parameter are measured from the state tensors (step counters excluded) and
set beside what the paper's method stores for these shapes.

``--tiny-gpt`` adds a whole training step (forward, backward, optimizer) of the ``tiny-gpt``
model for each optimizer against AdamW (K-FAC twice: statistics every step, its default, and
every tenth step, ``stats_every=10``).

Usage::

    python benchmarks/matrix_optimizers.py                 # prints the tables, writes JSON
    python benchmarks/matrix_optimizers.py --algorithms muon,adafactor --rounds 5
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from step_throughput import gpt_shaped_params  # noqa: E402

import gradwise.optim as gw  # noqa: E402
from gradwise.bench.machine import describe_machine  # noqa: E402
from gradwise.curvature.gauss_newton_bartlett import gauss_newton_bartlett  # noqa: E402
from gradwise.optim.shampoo import block_layout, matrix_view_shape  # noqa: E402

LR = 1e-6  # small: hundreds of steps leave the parameters where they were
BLOCK = 1024  # Shampoo's block size and SOAP's max_precond_dim, for every implementation


@dataclass
class Implementation:
    algorithm: str
    name: str
    make: Callable[[list[torch.Tensor]], torch.optim.Optimizer]
    matrices_only: bool = False  # torch.optim.Muon takes 2-D parameters only
    reference: bool = False  # the implementation the others are compared with
    steps_per_round: int | None = None  # None: the command-line default
    expected_bytes: Callable[[list[torch.Tensor]], float] | None = None  # per parameter, from the paper
    timings: list[float] = field(default_factory=list)


def _matrices(params):
    return [p for p in params if p.ndim == 2]


def adafactor_bytes(params) -> float:
    """Shazeer & Stern: a row and a column vector per matrix, a full vector for vectors."""
    total = sum((p.shape[0] + p.shape[1]) if p.ndim == 2 else p.numel() for p in params)
    return 4 * total / sum(p.numel() for p in params)


def momentum_bytes(params) -> float:
    return 4.0


def adam_bytes(params) -> float:
    return 8.0


def shampoo_bytes(params) -> float:
    """Gupta et al. (blocked as in Distributed Shampoo): L, R and their inverse roots per
    block, plus the Adagrad graft's accumulator (4 bytes per parameter)."""
    values = 0
    for p in params:
        rows, cols = matrix_view_shape(p)
        (rb, bm), (cb, bn) = block_layout(rows, BLOCK), block_layout(cols, BLOCK)
        values += rb * cb * 2 * sum(size * size for size in (bm, bn) if size > 1)
    count = sum(p.numel() for p in params)
    return 4 * values / count + 4


def soap_bytes(params) -> float:
    """Vyas et al.: Adam's two moments, plus L, R and their eigenbases for each side of at
    most ``max_precond_dim`` (and longer than 1)."""
    values = 0
    for p in params:
        rows, cols = matrix_view_shape(p)
        if p.ndim >= 2:  # vectors: plain Adam (precondition_1d=False, the paper's code's default)
            values += 2 * sum(size * size for size in (rows, cols) if 1 < size <= BLOCK)
    return 4 * values / sum(p.numel() for p in params) + 8


def implementations() -> list[Implementation]:
    import heavyball
    import pytorch_optimizer as po

    refresh = 10
    return [
        Implementation("Adafactor", "gradwise", lambda p: gw.Adafactor(p, lr=LR), expected_bytes=adafactor_bytes),
        Implementation("Adafactor", "torch foreach", lambda p: torch.optim.Adafactor(p, lr=LR, foreach=True),
                       reference=True),
        Implementation("Adafactor", "torch single-tensor", lambda p: torch.optim.Adafactor(p, lr=LR, foreach=False)),
        Implementation("Adafactor", "pytorch-optimizer", lambda p: po.AdaFactor(p, lr=LR, betas=(None, 0.999))),
        Implementation("Muon", "gradwise (bf16 NS)", lambda p: gw.Muon(p, lr=LR, use_muon=True), True,
                       expected_bytes=momentum_bytes),
        Implementation("Muon", "gradwise (fp32 NS)",
                       lambda p: gw.Muon(p, lr=LR, use_muon=True, ns_dtype=torch.float32), True),
        Implementation("Muon", "torch", lambda p: torch.optim.Muon(p, lr=LR), True, reference=True),
        Implementation("Muon", "pytorch-optimizer", lambda p: po.Muon([{"params": p, "use_muon": True}], lr=LR), True),
        Implementation("Muon", "heavyball", lambda p: heavyball.Muon(p, lr=LR), True),
        Implementation(
            "Muon + AdamW (all)", "gradwise",
            lambda p: gw.Muon([{"params": [t for t in p if t.ndim >= 2]},
                               {"params": [t for t in p if t.ndim < 2], "use_muon": False}],
                              lr=LR, adamw_lr=LR),
        ),
        Implementation(
            "Shampoo", "gradwise", lambda p: gw.Shampoo(p, lr=LR, block_size=BLOCK, precondition_every=refresh,
                                                        start_preconditioning_step=1),
            steps_per_round=refresh, expected_bytes=shampoo_bytes,
        ),
        Implementation(
            "Shampoo", "gradwise (fp64 eigh)",
            lambda p: gw.Shampoo(p, lr=LR, block_size=BLOCK, precondition_every=refresh,
                                 start_preconditioning_step=1, eigh_dtype=torch.float64),
            steps_per_round=refresh,
        ),
        Implementation(
            "Shampoo", "pytorch-optimizer", lambda p: po.ScalableShampoo(
                p, lr=LR, block_size=BLOCK, preconditioning_compute_steps=refresh, start_preconditioning_step=1),
            reference=True, steps_per_round=refresh,
        ),
        Implementation("SOAP", "gradwise",
                       lambda p: gw.SOAP(p, lr=LR, precondition_every=refresh, max_precond_dim=BLOCK,
                                         precondition_1d=False),  # as the peers' defaults
                       steps_per_round=refresh, expected_bytes=soap_bytes),
        Implementation("SOAP", "pytorch-optimizer", lambda p: po.SOAP(p, lr=LR, precondition_every=refresh,
                                                                      max_precondition_dim=BLOCK),
                       reference=True, steps_per_round=refresh),
        Implementation("SOAP", "heavyball", lambda p: heavyball.SOAP(p, lr=LR, precondition_every=refresh,
                                                                     max_precond_dim=BLOCK),
                       steps_per_round=refresh),
        Implementation("Sophia", "gradwise", lambda p: gw.Sophia(p, lr=LR), expected_bytes=adam_bytes),
        Implementation("AdamW (for scale)", "gradwise", lambda p: gw.AdamW(p, lr=LR), reference=True,
                       expected_bytes=adam_bytes),
    ]


def own_copy(params: list[torch.Tensor]) -> list[torch.Tensor]:
    copies = []
    for p in params:
        copy = p.detach().clone().requires_grad_()
        copy.grad = p.grad.clone()
        copies.append(copy)
    return copies


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every state tensor of ``optimizer`` but scalars (step counters), found in
    dicts, lists and the attributes of objects (pytorch-optimizer's Shampoo keeps its
    statistics in a preconditioner object); each tensor counted once."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    seen = {id(t) for p in params for t in (p, p.grad)}  # referenced by some peers' state objects

    def size(value) -> int:
        if id(value) in seen:
            return 0
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size() if value.ndim > 0 else 0
        if isinstance(value, dict):
            return sum(size(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(size(v) for v in value)
        if hasattr(value, "__dict__") and not isinstance(value, type):
            return sum(size(v) for v in vars(value).values())
        return 0

    return sum(size(state) for state in optimizer.state.values())


def time_steps(
    optimizer: torch.optim.Optimizer, steps: int, params: list[torch.Tensor], grads: list[torch.Tensor]
) -> float:
    """Mean seconds per step. The gradients are handed back before every step, because
    heavyball's optimizers consume them (set ``.grad`` to ``None``)."""
    start = time.perf_counter()
    for _ in range(steps):
        for param, grad in zip(params, grads):
            param.grad = grad
        optimizer.step()
    return (time.perf_counter() - start) / steps


def step_benchmark(args, algorithms: set[str] | None) -> list[dict]:
    params = gpt_shaped_params(args.layers, args.width, args.vocab)
    chosen = [i for i in implementations() if algorithms is None or i.algorithm.split(" ")[0].lower() in algorithms]
    live, records = [], {}
    for impl in tqdm(chosen, desc="building and warming up", unit="impl", file=sys.stderr):
        own = own_copy(_matrices(params) if impl.matrices_only else params)
        grads = [p.grad for p in own]
        try:
            optimizer = impl.make(own)
            time_steps(optimizer, impl.steps_per_round or args.warmup, own, grads)  # state, first refresh, compiling
        except Exception as error:  # a peer library that does not run here is reported, not fatal
            records[id(impl)] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
            continue
        numel = sum(p.numel() for p in own)
        records[id(impl)] = {
            "parameters": numel,
            "state_bytes_per_param": state_bytes(optimizer) / numel,
            "expected_bytes_per_param": impl.expected_bytes(own) if impl.expected_bytes else None,
        }
        live.append((impl, optimizer, own, grads))
    shuffler = random.Random(0)
    for _ in tqdm(range(args.rounds), desc="timing rounds", unit="round", file=sys.stderr):
        shuffler.shuffle(live)
        for impl, optimizer, own, grads in live:
            impl.timings.append(time_steps(optimizer, impl.steps_per_round or args.steps, own, grads))
    reference = {i.algorithm: statistics.median(i.timings) for i, *_ in live if i.reference}
    results = []
    for impl in chosen:
        record = {"algorithm": impl.algorithm, "implementation": impl.name, **records[id(impl)]}
        if impl.timings:
            median = statistics.median(impl.timings)
            record.update(median_ms=median * 1e3, min_ms=min(impl.timings) * 1e3,
                          steps_per_round=impl.steps_per_round or args.steps,
                          ratio_to_reference=(median / reference[impl.algorithm]
                                              if impl.algorithm in reference else None))
        results.append(record)
    return results


def tiny_gpt_benchmark(args) -> list[dict]:
    """Forward, backward and optimizer step of the tiny-gpt model on random bytes."""
    from gradwise.problems.tiny_gpt import TinyGPT

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (args.gpt_batch, 129), generator=generator)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def build(name, model):
        params = list(model.parameters())
        return {
            "AdamW": lambda: gw.AdamW(params, lr=LR),
            "Adafactor": lambda: gw.Adafactor(params, lr=LR),
            "Muon (+AdamW)": lambda: gw.Muon(gw.muon_param_groups(model, adamw_lr=LR), lr=LR),
            "Shampoo": lambda: gw.Shampoo(params, lr=LR, block_size=BLOCK, start_preconditioning_step=1),
            "SOAP": lambda: gw.SOAP(params, lr=LR, max_precond_dim=BLOCK, precondition_1d=False),
            "KFAC": lambda: gw.KFAC(model, lr=LR),
            "KFAC stats/10": lambda: gw.KFAC(model, lr=LR, stats_every=10),
            "Sophia-G": lambda: gw.Sophia(params, lr=LR),
        }[name]()

    names = ["AdamW", "Adafactor", "Muon (+AdamW)", "Shampoo", "SOAP", "KFAC", "KFAC stats/10", "Sophia-G"]
    runs = []
    for name in names:
        torch.manual_seed(0)
        model = TinyGPT()
        optimizer = build(name, model)
        params = list(model.parameters())

        def train_step(model=model, optimizer=optimizer, params=params):
            optimizer.zero_grad(set_to_none=True)
            logits = model(inputs)
            if isinstance(optimizer, gw.Sophia) and optimizer.hessian_update_due:
                optimizer.update_hessian(gauss_newton_bartlett(logits, params, generator=generator))
            F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
            optimizer.step()

        for _ in range(10):  # warm-up: lazy state, first refresh
            train_step()
        runs.append([name, train_step, []])
    shuffler = random.Random(1)
    for _ in tqdm(range(args.rounds), desc="tiny-gpt rounds", unit="round", file=sys.stderr):
        shuffler.shuffle(runs)
        for run in runs:
            start = time.perf_counter()
            for _ in range(10):  # ten steps: each round holds one refresh of every preconditioner
                run[1]()
            run[2].append((time.perf_counter() - start) / 10)
    medians = {name: statistics.median(times) for name, _, times in runs}
    return [{"optimizer": name, "median_ms": medians[name] * 1e3, "ratio_to_adamw": medians[name] / medians["AdamW"]}
            for name in names]


def format_tables(report: dict) -> str:
    setup = report["setup"]
    lines = [
        f"optimizer.step() on {setup['parameters'] / 1e6:.1f}M fp32 GPT-shaped parameters, "
        f"{report['machine']['torch_threads']} thread(s), torch {report['machine']['torch']}; "
        "Shampoo/SOAP: mean over rounds of 10 steps with one refresh",
        f"{'algorithm':<19} {'implementation':<22} {'median ms':>10} {'vs ref':>7} "
        f"{'state B/param':>14} {'paper B/param':>14}",
    ]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"{r['algorithm']:<19} {r['implementation']:<22} failed: {r['error']}")
            continue
        ratio = "" if r.get("ratio_to_reference") is None else f"{r['ratio_to_reference']:.2f}x"
        expected = "" if r["expected_bytes_per_param"] is None else f"{r['expected_bytes_per_param']:.3f}"
        lines.append(
            f"{r['algorithm']:<19} {r['implementation']:<22} {r['median_ms']:>10.1f} {ratio:>7} "
            f"{r['state_bytes_per_param']:>14.3f} {expected:>14}"
        )
    if report.get("tiny_gpt"):
        lines += ["", "tiny-gpt training step (forward, backward, optimizer; mean over 10 steps)",
                  f"{'optimizer':<15} {'median ms':>10} {'vs AdamW':>9}"]
        lines += [f"{r['optimizer']:<15} {r['median_ms']:>10.1f} {r['ratio_to_adamw']:>8.2f}x"
                  for r in report["tiny_gpt"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="steps per timing round (Shampoo/SOAP: 10)")
    parser.add_argument("--warmup", type=int, default=3)
    # One thread by default: on this shared 2-core machine a second LAPACK thread made
    # torch.linalg.eigh of a 1024 x 1024 matrix 25x slower (6 s instead of 0.23 s).
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--algorithms", help="comma-separated subset, e.g. 'muon,adafactor' (default: all)")
    parser.add_argument("--tiny-gpt", action="store_true", help="also time whole tiny-gpt training steps")
    parser.add_argument("--gpt-batch", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "matrix_optimizers.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    algorithms = None if args.algorithms is None else {a.strip().lower() for a in args.algorithms.split(",")}
    params = gpt_shaped_params(args.layers, args.width, args.vocab)
    report = {
        "machine": describe_machine(),
        "setup": {"parameters": sum(p.numel() for p in params), "tensors": len(params), "layers": args.layers,
                  "width": args.width, "vocab": args.vocab, "dtype": "float32", "rounds": args.rounds,
                  "steps_per_round": args.steps, "block_size": BLOCK,
                  "peers": {name: version(name) for name in ("pytorch_optimizer", "heavyball")}},
        "results": step_benchmark(args, algorithms),
    }
    if args.tiny_gpt:
        report["tiny_gpt"] = tiny_gpt_benchmark(args)
    print(format_tables(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(report, indent=2, default=lambda x: None if isinstance(x, float) and math.isnan(x) else x) + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
