r"""Owner-computes under FSDP2: Muon's compute per rank at 1, 2 and 4 processes, against the planner.

The default ``tiny-gpt`` (6 layers of width 128, 1.24M parameters) is sharded with FSDP2
(:func:`gradwise.distributed.strategies.fsdp.shard_model`) over :math:`N` gloo processes and stepped
by Muon as ``gradwise train`` builds it (its 24 hidden matrices orthogonalised, the embeddings,
biases and gains by its AdamW, element-wise on the shards). One forward and backward pass gives the
gradients; the optimizer then steps on them ``--steps`` times after ``--warmup``. Measured per rank:

- **compute**: the time inside Muon's update of its matrices (its ``_update`` on the Muon group,
  wrapped: the whole matrices this rank owns, after the gather and before the scatter, so the
  exchange is not in it), wall clock and the thread's CPU time, median over ``--steps`` steps. Two
  processes run one thread each, pinned to its own core (``os.sched_setaffinity``; this machine
  has 2 cores), and hold two sharded copies: one over both (:math:`N = 2`) and one over a mesh of
  their own (:math:`N = 1`: each process steps the whole model alone, at the same time as the other,
  so each core carries the same load in both cases), timed in ``--rounds`` interleaved rounds
  (1, 2, 1, 2, ...); the figure is the median over rounds of the slowest process's median. The CPU
  time is the steadier on a shared machine (it leaves out the time another job held the core).
  Target: the :math:`N = 2` figure is 1/2 of the :math:`N = 1` one within 20%;
- **FLOPs**: ``FlopCounterMode`` over one step, at 1, 2 and 4 processes (an operation count: 4
  processes share the 2 cores, so no time is taken there), against
  :func:`gradwise.plan.owner_computes.owner_computes`;
- **bytes on the wire**: ``TrafficMeter``'s all-to-all payload per step, and the optimizer state
  per rank, against the planner's.

Prints a table and writes ``benchmarks/results/owner_computes.json`` with the machine's description.

Usage::

    nice -n 5 python benchmarks/owner_computes.py
    python benchmarks/owner_computes.py --rounds 1 --steps 5   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from gradwise.bench.machine import describe_machine
from gradwise.distributed import run_processes
from gradwise.distributed.state_bytes import optimizer_state_bytes
from gradwise.distributed.strategies.fsdp import shard_model
from gradwise.distributed.traffic import TrafficMeter
from gradwise.plan.owner_computes import owner_computes
from gradwise.problems.tiny_gpt import TinyGPT
from gradwise.train.optimizers import build_optimizer

OPTIMIZER = "muon"
TIMED_WORLDS = (1, 2)
COUNTED_WORLDS = (1, 2, 4)
TARGET = 0.2  # the 2-process compute within 20% of half the 1-process compute
OUT = Path(__file__).resolve().parent / "results" / "owner_computes.json"


def model() -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT()


def meshes(world_size: int) -> dict[int, Any]:
    """1-D meshes of 1 rank (each rank its own) and of ``world_size`` ranks (all of them)."""
    from torch.distributed.device_mesh import init_device_mesh

    alone = init_device_mesh("cpu", (world_size, 1), mesh_dim_names=("replica", "fsdp"))["fsdp"]
    return {1: alone, world_size: init_device_mesh("cpu", (world_size,))}


class Run:
    """Muon on an FSDP2-sharded tiny-gpt over ``mesh``, with gradients from one backward pass, its
    update of the whole matrices timed (wall clock and this thread's CPU time)."""

    def __init__(self, mesh: Any, rank: int) -> None:
        sharded = shard_model(model(), mesh=mesh)
        self.optimizer = build_optimizer(OPTIMIZER, sharded, 0.02, 0.1)
        tokens = torch.randint(0, 256, (4, 128), generator=torch.Generator().manual_seed(rank))
        sharded(tokens).square().mean().backward()  # gradients, kept for every step
        self.wall: list[float] = []
        self.cpu: list[float] = []
        update = self.optimizer._update  # type: ignore[attr-defined]

        def timed_update(group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
            start_wall, start_cpu = time.perf_counter(), time.thread_time()
            update(group, params, grads)
            if group["use_muon"] is not False:  # the whole matrices; the AdamW groups are element-wise
                self.wall.append(time.perf_counter() - start_wall)
                self.cpu.append(time.thread_time() - start_cpu)

        self.optimizer._update = timed_update  # type: ignore[attr-defined]

    def counts(self) -> dict[str, Any]:
        """One step's FLOPs and all-to-all bytes, and the state after it."""
        with FlopCounterMode(display=False) as counter, TrafficMeter() as meter:
            self.optimizer.step()
        return {"flops": counter.get_total_flops(), "sent": meter.payload_by_kind["all-to-all"],
                "unknown": dict(meter.unknown), "state": optimizer_state_bytes(self.optimizer)}

    def timed(self, steps: int, warmup: int) -> tuple[float, float]:
        """Median (wall, CPU) seconds of the update over ``steps`` steps after ``warmup``."""
        for _ in range(warmup + steps):
            self.optimizer.step()
        wall, cpu = self.wall[-steps:], self.cpu[-steps:]
        return statistics.median(wall), statistics.median(cpu)


def job(rank: int, world_size: int, rounds: int, steps: int, warmup: int) -> dict[int, dict[str, Any]]:
    """Counts at 1 rank and at ``world_size``; with ``rounds``, each process pinned to core ``rank``
    and the two timed in interleaved rounds (at 1 rank every process steps the whole model alone, at
    the same time as the others: the same load on each core as the shared run)."""
    if rounds:
        os.sched_setaffinity(0, {rank})
    runs = {size: Run(mesh, rank) for size, mesh in meshes(world_size).items()}
    results = {size: run.counts() for size, run in runs.items()}
    for size in runs:
        results[size]["rounds"] = []
    for _ in range(rounds):
        for size, run in runs.items():
            results[size]["rounds"].append(run.timed(steps, warmup))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds of the timed runs (default: 7)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round (default: 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before each round (default: 2)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"JSON file (default: {OUT})")
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs 2 cores to pin one process to each")

    timed = run_processes(job, 2, args.rounds, args.steps, args.warmup, timeout_s=900)
    four = run_processes(job, 4, 0, 0, 0, timeout_s=600)
    counted = {1: [timed[0][1]], 2: [r[2] for r in timed], 4: [r[4] for r in four]}

    worlds: dict[str, Any] = {}
    for world in COUNTED_WORLDS:
        ranks = counted[world]
        plan = owner_computes(OPTIMIZER, model(), world)
        assert plan is not None
        entry: dict[str, Any] = {
            "flops": [r["flops"] for r in ranks], "predicted_flops": [rank.flops for rank in plan.ranks],
            "sent_bytes": [r["sent"] for r in ranks], "predicted_sent_bytes": [rank.sent_bytes for rank in plan.ranks],
            "state_bytes": [r["state"] for r in ranks],
            "predicted_state_bytes": [rank.state_bytes for rank in plan.ranks],
            "unknown_collectives": [r["unknown"] for r in ranks],
            "flop_ratio": max(r["flops"] for r in ranks) / counted[1][0]["flops"],
        }
        if world in TIMED_WORLDS:
            source = [r[world]["rounds"] for r in timed]  # per process, per round: (wall, cpu)
            for index, kind in enumerate(("wall_s", "cpu_s")):
                # each round: the slowest rank (at 1 rank: the slower of the processes stepping alone)
                slowest = [max(process[i][index] for process in source) for i in range(args.rounds)]
                entry[f"update_{kind}"] = {"median": statistics.median(slowest), "rounds": slowest}
        worlds[str(world)] = entry
    for world in TIMED_WORLDS:
        entry = worlds[str(world)]
        for kind in ("wall_s", "cpu_s"):
            entry[f"time_ratio_{kind}"] = entry[f"update_{kind}"]["median"] / worlds["1"][f"update_{kind}"]["median"]
    two = worlds["2"]
    payload = {
        "machine": describe_machine(),
        "settings": {"optimizer": OPTIMIZER, "model": "tiny-gpt default (6 layers x 128, seq 128)",
                     "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup, "threads_per_process": 1,
                     "pinned": "each of 2 processes to its own core; at 1 rank both step the whole model alone"},
        "load_average": os.getloadavg(),
        "target": f"update time per rank at 2 processes within {TARGET:.0%} of 1/2 the 1-process time",
        "met_wall": abs(two["time_ratio_wall_s"] / 0.5 - 1) <= TARGET,
        "met_cpu": abs(two["time_ratio_cpu_s"] / 0.5 - 1) <= TARGET,
        "worlds": worlds,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")

    print(f"{'N':>2}  {'update ms (wall)':>16}  {'ratio':>6}  {'cpu ms':>7}  {'ratio':>6}  {'max GFLOP':>9}  "
          f"{'ratio':>6}  {'plan':>5}  {'sent KB (max)':>13}  {'plan':>5}  {'state KB (max)':>14}  {'plan':>5}")
    for world in COUNTED_WORLDS:
        e = worlds[str(world)]
        timing = (f"{e['update_wall_s']['median'] * 1e3:16.3f}  {e['time_ratio_wall_s']:6.3f}  "
                  f"{e['update_cpu_s']['median'] * 1e3:7.3f}  {e['time_ratio_cpu_s']:6.3f}") if "update_wall_s" in e \
            else f"{'-':>16}  {'-':>6}  {'-':>7}  {'-':>6}"
        same = {key: "=" if e[key] == e[f"predicted_{key}"] else "DIFF"
                for key in ("flops", "sent_bytes", "state_bytes")}
        print(f"{world:>2}  {timing}  {max(e['flops']) / 1e9:9.4f}  {e['flop_ratio']:6.3f}  {same['flops']:>5}  "
              f"{max(e['sent_bytes']) / 1e3:13.1f}  {same['sent_bytes']:>5}  {max(e['state_bytes']) / 1e3:14.1f}  "
              f"{same['state_bytes']:>5}")
    print(f"target ({payload['target']}): wall {'met' if payload['met_wall'] else 'NOT met'}, CPU time "
          f"{'met' if payload['met_cpu'] else 'NOT met'}; wrote {args.out}")


if __name__ == "__main__":
    main()
