"""Time per ``optimizer.step()`` and effective bytes per second, side by side.

Every gradwise optimizer runs on the same GPT-shaped parameters (about 16M fp32 values) next
to torch.optim's implementations of the same algorithm (single-tensor, foreach and fused)
and, for Lion, the PyPI packages ``pytorch-optimizer`` and ``lion-pytorch``, for schedule-free
AdamW and SGD the authors' ``schedulefree`` and ``pytorch-optimizer``, for PSGD-Kron ``heavyball``. The
implementations are timed in interleaved rounds, in a new random order each round, so that
the machine's drift, other load and the caches left by the previous implementation fall on
all of them alike; the table reports each one's median and its ratio to the fastest
torch.optim implementation of the same algorithm.

Effective bandwidth counts the bytes an ideal kernel must move per step: every tensor the
update reads (parameter, gradient, state) and writes (parameter, state) once.

Usage::

    python benchmarks/step_throughput.py                  # prints the table, writes JSON
    python benchmarks/step_throughput.py --rounds 3 --layers 1  # a quick look
    python benchmarks/step_throughput.py --state-formats  # AdamW's state formats and 8-bit peers

``--state-formats`` times AdamW with its moments in each ``state_format`` (torch's fused fp32
AdamW as the bar; bf16, bf16 with stochastic rounding, 8 bits and 4 bits each through the generic
path and through gradwise's fused kernel) beside bitsandbytes' ``AdamW8bit`` and torchao's
``AdamW8bit`` and ``AdamW4bit`` (block-wise states too), where they install and run; one that fails
is reported as such. Bytes moved then count each format's own bytes: 8-bit moments are 1 byte per
value plus a 4-byte scale per block of 256, read and written once (the 4-bit kernel reads the
gradient and v's codes of a matrix twice, which is not counted).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import gradwise.optim as gw
from gradwise.bench.machine import describe_machine


@dataclass
class Implementation:
    algorithm: str
    name: str  # e.g. "gradwise (fused)", "torch foreach"
    make: Callable[[list[torch.Tensor]], torch.optim.Optimizer]
    tensors_moved: int  # tensors read plus tensors written per parameter by an ideal kernel
    state_bytes: float | None = None  # bytes of state read plus written per parameter, where not fp32 tensors


@dataclass
class Result:
    algorithm: str
    implementation: str
    median_ms: float
    min_ms: float
    gbytes_per_s: float
    ratio_to_best_torch: float | None


def gpt_shaped_params(layers: int, width: int, vocab: int) -> list[torch.Tensor]:
    """Token embedding, then per block: 2 LayerNorms, QKV, attention out, MLP in and out."""
    shapes: list[tuple[int, ...]] = [(vocab, width)]
    for _ in range(layers):
        shapes += [(width,), (width,), (3 * width, width), (3 * width,), (width, width), (width,)]
        shapes += [(width,), (width,), (4 * width, width), (4 * width,), (width, 4 * width), (width,)]
    shapes += [(width,), (width,)]
    generator = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        param = torch.randn(shape, generator=generator).mul_(0.02).requires_grad_()
        param.grad = torch.randn(shape, generator=generator).mul_(1e-3)
        params.append(param)
    return params


def implementations() -> list[Implementation]:
    lr = 1e-6  # small, so that hundreds of steps leave the parameters where they were
    torch_paths = {"torch single-tensor": {"foreach": False}, "torch foreach": {"foreach": True}}
    fused_path = {"torch fused": {"fused": True}}

    def torch_variants(algorithm, cls, tensors, fused, **options):
        paths = {**torch_paths, **(fused_path if fused else {})}
        return [
            Implementation(algorithm, name, lambda p, o=extra: cls(p, lr=lr, **options, **o), tensors)
            for name, extra in paths.items()
        ]

    def ours(algorithm, cls, tensors, fused, **options):
        result = [Implementation(algorithm, "gradwise (default)", lambda p: cls(p, lr=lr, **options), tensors)]
        if fused:
            result.append(
                Implementation(algorithm, "gradwise foreach", lambda p: cls(p, lr=lr, fused=False, **options), tensors)
            )
        return result

    table = [
        ("SGD", gw.SGD, torch.optim.SGD, 3, True, {}),
        ("SGD momentum", gw.SGD, torch.optim.SGD, 5, True, {"momentum": 0.9}),
        ("SGD Nesterov", gw.SGD, torch.optim.SGD, 5, True, {"momentum": 0.9, "nesterov": True}),
        ("Adagrad", gw.Adagrad, torch.optim.Adagrad, 5, True, {}),
        ("RMSprop", gw.RMSprop, torch.optim.RMSprop, 5, False, {}),
        ("Adam", gw.Adam, torch.optim.Adam, 7, True, {}),
        ("AdamW", gw.AdamW, torch.optim.AdamW, 7, True, {"weight_decay": 0.1}),
        ("NAdam", gw.NAdam, torch.optim.NAdam, 7, False, {}),
    ]
    result = []
    for algorithm, ours_cls, torch_cls, tensors, fused, options in table:
        result += ours(algorithm, ours_cls, tensors, fused, **options)
        result += torch_variants(algorithm, torch_cls, tensors, fused, **options)

    import lion_pytorch
    import pytorch_optimizer

    lion_options = {"betas": (0.9, 0.99), "weight_decay": 0.1}
    result += [
        Implementation("Lion", "gradwise foreach", lambda p: gw.Lion(p, lr=lr, **lion_options), 5),
        Implementation("Lion", "gradwise fused", lambda p: gw.Lion(p, lr=lr, fused=True, **lion_options), 5),
        Implementation("Lion", "pytorch-optimizer", lambda p: pytorch_optimizer.Lion(p, lr=lr, **lion_options), 5),
        Implementation("Lion", "lion-pytorch", lambda p: lion_pytorch.Lion(p, lr=lr, **lion_options), 5),
    ]

    # Schedule-free: the authors' package and pytorch_optimizer's port (torch.optim has none). An ideal
    # kernel reads y, g, z (and v) and writes y, z (and v). The package divides p.grad in place by the
    # denominator; the gradients stay near unit scale, so the other implementations' timings are unaffected.
    import schedulefree

    schedule_free = [
        ("ScheduleFreeAdamW", gw.ScheduleFreeAdamW, schedulefree.AdamWScheduleFree, pytorch_optimizer.ScheduleFreeAdamW,
         7, {"weight_decay": 0.1}),
        ("ScheduleFreeSGD", gw.ScheduleFreeSGD, schedulefree.SGDScheduleFree, pytorch_optimizer.ScheduleFreeSGD,
         5, {"weight_decay": 0.1}),
    ]
    for algorithm, ours_cls, package_cls, port_cls, tensors, options in schedule_free:

        def in_train_mode(cls, params, options=options):
            optimizer = cls(params, lr=lr, **options)
            optimizer.train()
            return optimizer

        result += [
            Implementation(algorithm, "gradwise foreach", lambda p, c=ours_cls: in_train_mode(c, p), tensors),
            Implementation(algorithm, "schedulefree", lambda p, c=package_cls: in_train_mode(c, p), tensors),
            Implementation(algorithm, "pytorch-optimizer", lambda p, c=port_cls: in_train_mode(c, p), tensors),
        ]

    # PSGD-Kron beside HeavyBall's (the reference; torch.optim has none), each at its defaults (HeavyBall
    # stacks same-shape tensors and compiles its kernels with inductor). HeavyBall drops .grad after a
    # step unless told not to. An ideal element-wise kernel moves p, g, m in and p, m out; the factor
    # products come on top.
    import heavyball

    result += [
        Implementation("PSGD-Kron", "gradwise", lambda p: gw.PSGDKron(p, lr=lr), 5),
        Implementation("PSGD-Kron", "heavyball", lambda p: heavyball.PSGDKron(p, lr=lr, consume_grad=False), 5),
    ]
    return result


def state_format_implementations() -> list[Implementation]:
    """AdamW (weight decay 0.1) with its moments in each state format, beside the 8-bit AdamW of
    bitsandbytes and of torchao. An ideal kernel reads p and g and writes p (12 bytes per fp32
    parameter) and reads and writes both moments: 8 bytes of bf16, 2 bytes of codes and 16 bytes
    of scales per 256 values in 8 bits, 1 byte of codes and m's 8 bytes of scales per 128 values
    in 4 bits. torchao's AdamW4bit beside gradwise's 4 bits."""
    lr, options = 1e-6, {"weight_decay": 0.1}
    eight_bit = 2 * (2 * 1 + 2 * 4 / 256)
    four_bit = 2 * (2 * 0.5 + 4 / 128)  # and v's rank-1 scales, a few per row and column

    def adamw(**extra):
        return lambda p: gw.AdamW(p, lr=lr, **options, **extra)

    result = [
        Implementation("AdamW formats", "torch fused fp32",
                       lambda p: torch.optim.AdamW(p, lr=lr, fused=True, **options), 7),
        Implementation("AdamW formats", "gradwise fp32", adamw(), 7),
        Implementation("AdamW formats", "gradwise bf16 generic", adamw(state_format="bf16", fused=False), 3, 8.0),
        Implementation("AdamW formats", "gradwise bf16 fused", adamw(state_format="bf16"), 3, 8.0),
        Implementation("AdamW formats", "gradwise bf16-sr generic", adamw(state_format="bf16-sr", fused=False), 3, 8.0),
        Implementation("AdamW formats", "gradwise bf16-sr fused", adamw(state_format="bf16-sr"), 3, 8.0),
        Implementation("AdamW formats", "gradwise 8bit generic", adamw(state_format="8bit", fused=False), 3, eight_bit),
        Implementation("AdamW formats", "gradwise 8bit fused", adamw(state_format="8bit"), 3, eight_bit),
        Implementation("AdamW formats", "gradwise 4bit generic", adamw(state_format="4bit", fused=False), 3, four_bit),
        Implementation("AdamW formats", "gradwise 4bit fused", adamw(state_format="4bit"), 3, four_bit),
    ]

    def bitsandbytes_adamw8bit(params):
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params, lr=lr, min_8bit_size=1, **options)

    def torchao_adamw8bit(params):
        import torchao.optim

        return torchao.optim.AdamW8bit(params, lr=lr, **options)

    def torchao_adamw4bit(params):
        import torchao.optim

        return torchao.optim.AdamW4bit(params, lr=lr, **options)

    result += [
        Implementation("AdamW formats", "bitsandbytes AdamW8bit", bitsandbytes_adamw8bit, 3, eight_bit),
        Implementation("AdamW formats", "torchao AdamW8bit", torchao_adamw8bit, 3, eight_bit),
        Implementation("AdamW formats", "torchao AdamW4bit", torchao_adamw4bit, 3, four_bit),
    ]
    return result


def time_steps(optimizer: torch.optim.Optimizer, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    return (time.perf_counter() - start) / steps


def run(
    layers: int, width: int, vocab: int, rounds: int, steps: int, warmup: int, algorithms: set[str] | None = None,
    state_formats: bool = False,
) -> dict[str, object]:
    params = gpt_shaped_params(layers, width, vocab)
    numel = sum(p.numel() for p in params)
    pool = state_format_implementations() if state_formats else implementations()
    candidates = [i for i in pool if algorithms is None or i.algorithm.lower() in algorithms]
    optimizers, failures = [], {}
    for impl in tqdm(list(candidates), desc="warming up", unit="impl"):
        try:
            optimizer = impl.make(params)
            time_steps(optimizer, warmup)  # lazily created state, compiled kernels
        except Exception as error:  # a peer library that does not install or run here is reported
            if not state_formats:
                raise
            failures[impl.name] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            candidates.remove(impl)
            continue
        optimizers.append(optimizer)
    timings: list[list[float]] = [[] for _ in candidates]
    order = list(range(len(candidates)))
    shuffler = random.Random(0)
    for _ in tqdm(range(rounds), desc="timing rounds", unit="round"):
        shuffler.shuffle(order)
        for index in order:
            timings[index].append(time_steps(optimizers[index], steps))

    medians = [statistics.median(t) for t in timings]
    best_torch = {}
    for impl, median in zip(candidates, medians):
        if impl.name.startswith("torch "):
            best_torch[impl.algorithm] = min(median, best_torch.get(impl.algorithm, float("inf")))
    results = []
    for impl, times, median in zip(candidates, timings, medians):
        best = best_torch.get(impl.algorithm)
        moved = impl.tensors_moved * numel * params[0].element_size() + (impl.state_bytes or 0) * numel
        results.append(
            Result(
                algorithm=impl.algorithm,
                implementation=impl.name,
                median_ms=median * 1e3,
                min_ms=min(times) * 1e3,
                gbytes_per_s=moved / median / 1e9,
                ratio_to_best_torch=None if best is None else median / best,
            )
        )
    return {
        "machine": describe_machine(),
        "setup": {"parameters": numel, "tensors": len(params), "layers": layers, "width": width,
                  "vocab": vocab, "dtype": "float32", "rounds": rounds, "steps_per_round": steps},
        "results": [asdict(r) for r in results],
        **({"did_not_run": failures} if failures else {}),
    }


def format_table(report: dict[str, object]) -> str:
    setup = report["setup"]
    lines = [
        f"optimizer.step() on {setup['parameters'] / 1e6:.1f}M fp32 parameters in {setup['tensors']} "
        f"GPT-shaped tensors, {report['machine']['torch_threads']} threads, torch {report['machine']['torch']}",
        f"{'algorithm':<14} {'implementation':<20} {'median ms':>10} {'GB/s':>7} {'vs best torch':>14}",
    ]
    for r in report["results"]:
        ratio = "" if r["ratio_to_best_torch"] is None else f"{r['ratio_to_best_torch']:.2f}x"
        lines.append(
            f"{r['algorithm']:<14} {r['implementation']:<20} {r['median_ms']:>10.2f} "
            f"{r['gbytes_per_s']:>7.1f} {ratio:>14}"
        )
    for name, error in report.get("did_not_run", {}).items():
        lines.append(f"{'':<14} {name:<20} did not run: {error}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=5, help="steps per timing round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--algorithms", help="comma-separated subset, e.g. 'adamw,lion' (default: all)")
    parser.add_argument("--state-formats", action="store_true",
                        help="time AdamW's state formats and bitsandbytes'/torchao's 8-bit AdamW instead")
    parser.add_argument("--out", type=Path, help="JSON to write (default: results/step_throughput.json, "
                        "or results/step_throughput_state_formats.json with --state-formats)")
    args = parser.parse_args()
    if args.out is None:
        name = "step_throughput_state_formats.json" if args.state_formats else "step_throughput.json"
        args.out = Path(__file__).parent / "results" / name
    algorithms = None if args.algorithms is None else {a.strip().lower() for a in args.algorithms.split(",")}
    report = run(args.layers, args.width, args.vocab, args.rounds, args.steps, args.warmup, algorithms,
                 state_formats=args.state_formats)
    print(format_table(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
