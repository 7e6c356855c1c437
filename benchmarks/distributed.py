"""Distributed training strategies side by side: step time, throughput, traffic, optimizer state.

For 1, 2 and 4 processes (gloo on the CPU; NCCL on CUDA when ``--device cuda``) and each
strategy - DDP, ZeRO-1, ZeRO-2, FSDP2 (ZeRO-3) and DiLoCo with H = 8 and 32 inner steps -
the ``tiny-gpt`` model (1.24M parameters) trains with AdamW on per-rank batches of
``--batch-size`` windows of 128 bytes (weak scaling: the global batch grows with the
processes). After ``--warmup`` steps, ``--steps`` steps are measured:

- step time: the mean over the measured steps of the slowest rank's step (forward,
  backward, communication, optimizer); the mean, not the median, so that DiLoCo's
  synchronisation every H steps is amortised into it;
- tokens per second: global tokens per step / step time;
- bytes communicated per step: the payload this rank hands to collectives (counted by
  :class:`gradwise.distributed.traffic.TrafficMeter`), averaged over the measured steps,
  and the ring algorithm's bytes on the rank's link;
- optimizer-state bytes per rank: the largest over ranks, after the steps.

On this 2-core machine every process gets one thread, so 4 processes share 2 cores: the
times show the strategies' relative costs, not scaling. The JSON goes to
``benchmarks/results/distributed.json``.

Usage::

    python benchmarks/distributed.py                       # every strategy at 1, 2, 4 processes
    python benchmarks/distributed.py --world-sizes 2 --strategies ddp,zero2 --steps 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from gradwise import optim
from gradwise.bench.machine import describe_machine
from gradwise.distributed import RankSlice, run_processes
from gradwise.distributed.state_bytes import optimizer_state_bytes
from gradwise.distributed.strategies.fsdp import shard_model
from gradwise.distributed.strategies.periodic_averaging import DiLoCo
from gradwise.distributed.strategies.zero_optimizer import ZeroOptimizer
from gradwise.distributed.traffic import TrafficMeter
from gradwise.problems.corpus import stdlib_corpus
from gradwise.problems.data import RandomWindows
from gradwise.problems.tiny_gpt import TinyGPT

STRATEGIES = ("ddp", "zero1", "zero2", "fsdp", "diloco-8", "diloco-32")
SEQ_LEN = 128


def build(strategy: str, model: torch.nn.Module, device: torch.device, lr: float):
    """The module the forward runs on, the optimizer and, for DiLoCo, the outer loop."""
    make_adamw = lambda module: optim.AdamW(optim.weight_decay_groups(module, 0.1), lr=lr, betas=(0.9, 0.95))  # noqa: E731
    if strategy == "ddp":
        device_ids = [device] if device.type == "cuda" else None
        module = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        return module, make_adamw(model), None
    if strategy in ("zero1", "zero2"):
        return model, ZeroOptimizer(make_adamw(model), stage=int(strategy[-1])), None
    if strategy == "fsdp":
        module = shard_model(model)
        return module, make_adamw(module), None
    sync_every = int(strategy.split("-")[1])
    return model, make_adamw(model), DiLoCo(model, sync_every)


def measure(rank: int, world_size: int, strategy: str, batch_size: int, warmup: int, steps: int,
            device_name: str, lr: float) -> dict:
    device = torch.device("cuda", rank) if device_name == "cuda" else torch.device("cpu")
    torch.manual_seed(0)
    model = TinyGPT(SEQ_LEN).to(device)
    data = RankSlice(RandomWindows(stdlib_corpus().train, world_size * batch_size, SEQ_LEN, seed=0), rank, world_size)
    module, optimizer, outer = build(strategy, model, device, lr)
    step_times, payloads, ring = [], [], []
    losses = []
    for step in range(warmup + steps):
        inputs, targets = (t.to(device) for t in data.next_batch())
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        with TrafficMeter(world_size) as meter:
            started = time.perf_counter()
            logits = module(inputs)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
            loss.backward()
            if isinstance(optimizer, ZeroOptimizer):
                optimizer.reduce_gradients()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if outer is not None:
                outer.after_step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - started
        slowest = torch.tensor([elapsed], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        if step >= warmup:
            step_times.append(slowest.item())
            payloads.append(meter.payload_bytes)
            ring.append(meter.ring_link_bytes)
            losses.append(loss.item())
    own_state = optimizer.state_bytes() if isinstance(optimizer, ZeroOptimizer) else optimizer_state_bytes(optimizer)
    state_bytes = torch.tensor([own_state], dtype=torch.float64)
    dist.all_reduce(state_bytes, op=dist.ReduceOp.MAX)
    return {
        "step_time_s": statistics.fmean(step_times),
        "tokens_per_s": world_size * batch_size * SEQ_LEN / statistics.fmean(step_times),
        "payload_bytes_per_step": statistics.fmean(payloads),
        "ring_link_bytes_per_step": statistics.fmean(ring),
        "optimizer_state_bytes_per_rank": int(state_bytes.item()),
        "final_loss": losses[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-sizes", default="1,2,4", help="process counts, comma separated (default: 1,2,4)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help=f"any of {', '.join(STRATEGIES)}")
    parser.add_argument("--batch-size", type=int, default=8, help="windows of 128 bytes per rank and step (default: 8)")
    parser.add_argument("--warmup", type=int, default=2, help="steps before timing (default: 2)")
    parser.add_argument("--steps", type=int, default=32, help="measured steps; a multiple of 32 keeps DiLoCo's "
                        "synchronisations whole (default: 32)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW's learning rate (default: 1e-3)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cpu (gloo) or cuda (nccl)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "distributed.json")
    args = parser.parse_args()
    world_sizes = [int(size) for size in args.world_sizes.split(",")]
    strategies = [name.strip() for name in args.strategies.split(",")]
    unknown = sorted(set(strategies) - set(STRATEGIES))
    if unknown:
        parser.error(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}")
    backend = "nccl" if args.device == "cuda" else "gloo"
    rows = []
    jobs = [(size, strategy) for size in world_sizes for strategy in strategies]
    for size, strategy in tqdm(jobs, unit="job"):
        per_rank = run_processes(measure, size, strategy, args.batch_size, args.warmup, args.steps, args.device,
                                 args.lr, timeout_s=600, backend=backend)
        rows.append({"world_size": size, "strategy": strategy, **per_rank[0],
                     "payload_bytes_per_step_max_rank": max(r["payload_bytes_per_step"] for r in per_rank)})
    header = (f"{'procs':>5} {'strategy':<10} {'step ms':>8} {'tokens/s':>9} {'payload B/step':>15} "
              f"{'ring B/step':>12} {'opt state B/rank':>17}")
    print(header)
    for row in rows:
        print(f"{row['world_size']:>5} {row['strategy']:<10} {1000 * row['step_time_s']:>8.1f} "
              f"{row['tokens_per_s']:>9,.0f} {row['payload_bytes_per_step']:>15,.0f} "
              f"{row['ring_link_bytes_per_step']:>12,.0f} {row['optimizer_state_bytes_per_rank']:>17,}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": describe_machine(), "device": args.device, "backend": backend,
        "model": "tiny-gpt (TinyGPT seq_len 128, d_model 128, 6 layers, 4 heads)",
        "optimizer": f"AdamW lr {args.lr:g} betas (0.9, 0.95) weight decay 0.1 on matrices",
        "batch_per_rank": args.batch_size, "warmup_steps": args.warmup, "measured_steps": args.steps,
        "threads_per_process": 1, "rows": rows,
    }, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
