"""The pipeline bubble measured against (p - 1) / (m + p - 1), and (p - 1) / (v m + p - 1) interleaved.

Two gloo processes, one pipeline stage of tiny-gpt each (one thread each, so that the two stages run
in parallel on two cores), step batches of ``m`` micro-batches of a fixed size under GPipe's,
1F1B's and interleaved 1F1B's schedules (:class:`gradwise.problems.tiny_gpt_pipeline.TinyGPTPipeline`;
interleaved: ``v = 2`` chunks per process, the 4 layers cut into 4 chunks of one). With a fixed
micro-batch, a stage's busy time grows as ``m t`` and a step takes ``(m + p - 1) t`` plus what does
not depend on ``m``: the measured step times of all ``m`` are fitted by least squares as
``T(m) = a + m t``; the bubble of each ``m`` is then the share of its step not spent on its own
micro-batches, ``1 - m t / T(m)``, beside the formula's ``(p - 1) / (m + p - 1)`` (Huang et al. 2019,
arXiv:1811.06965; Narayanan et al. 2021, arXiv:2104.04473). Interleaved, the ramp takes ``p - 1``
chunk steps of ``t / v`` each, so a step is ``(m + (p - 1) / v) t`` and the bubble
``(p - 1) / (v m + p - 1)`` in the same units of a whole stage's ``t`` (Narayanan et al. 2021,
section 2.2.2), for ``v`` times the messages. The fixed part ``a`` (the loss
broadcast, the tied gradient's all-reduce, Python) counts as bubble here, as it idles the stages
too. Steps are timed in interleaved rounds (every ``m`` and schedule once per round, in a new
random order), the median of the rounds reported.

Usage::

    python benchmarks/pipeline_bubble.py            # prints the table, writes JSON
    python benchmarks/pipeline_bubble.py --rounds 3  # a quick look
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from gradwise.bench.machine import describe_machine
from gradwise.distributed import run_processes
from gradwise.plan.parallelism import bubble_fraction

MICROBATCHES = (2, 3, 4, 6, 8)
"""1F1B needs at least as many micro-batches as stages; interleaved, torch runs each of these on 2 stages
(in max(1, m // 2) equal rounds)."""
SCHEDULES = {"gpipe": 1, "1f1b": 1, "interleaved-1f1b": 2}
"""Each schedule's chunks (virtual stages) per process."""
STAGES = 2


def stage_times(rank: int, world_size: int, rounds: int, rows: int, width: int, layers: int) -> dict:
    """Each (schedule, m)'s step times over the rounds, on this stage."""
    import torch.distributed as dist

    from gradwise.problems.tiny_gpt import TinyGPT
    from gradwise.problems.tiny_gpt_pipeline import TinyGPTPipeline

    torch.manual_seed(0)
    pipelines = {(schedule, m): TinyGPTPipeline(TinyGPT(seq_len=64, d_model=width, n_layer=layers, n_head=4),
                                                STAGES, m, schedule, virtual_stages=virtual)
                 for schedule, virtual in SCHEDULES.items() for m in MICROBATCHES}
    tokens = torch.randint(0, 256, (rows * max(MICROBATCHES), 65), generator=torch.Generator().manual_seed(1))
    order = random.Random(2)  # the same order on both ranks
    times: dict[str, list[float]] = {f"{schedule} m={m}": [] for schedule, m in pipelines}
    for round_ in range(rounds + 1):  # the first round warms up
        keys = list(pipelines)
        order.shuffle(keys)
        for schedule, m in keys:
            batch = tokens[: rows * m]
            dist.barrier()
            start = time.perf_counter()
            pipelines[schedule, m].step(batch[:, :-1], batch[:, 1:])
            elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the step ends when the slower stage does
            if round_:
                times[f"{schedule} m={m}"].append(float(elapsed))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--rows", type=int, default=8, help="sequences per micro-batch (default: 8)")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "pipeline_bubble.json")
    args = parser.parse_args()
    times = run_processes(stage_times, STAGES, args.rounds, args.rows, args.width, args.layers, timeout_s=3000)[0]
    rows = []
    for schedule, virtual in SCHEDULES.items():
        medians = np.array([statistics.median(times[f"{schedule} m={m}"]) for m in MICROBATCHES])
        per_microbatch, fixed = np.polyfit(np.array(MICROBATCHES, dtype=float), medians, 1)
        for m, median in zip(MICROBATCHES, medians):
            measured = 1 - m * per_microbatch / median
            rows.append({"schedule": schedule, "microbatches": m, "step_s": float(median),
                         "measured_bubble": float(measured), "formula_bubble": bubble_fraction(STAGES, m, virtual),
                         "per_microbatch_s": float(per_microbatch), "fixed_s": float(fixed)})
    print(f"{'schedule':<16} {'m':>3} {'step (ms)':>10} {'bubble measured':>16} {'(p-1)/(vm+p-1)':>15}")
    for row in rows:
        print(f"{row['schedule']:<16} {row['microbatches']:>3} {1e3 * row['step_s']:>10.1f} "
              f"{row['measured_bubble']:>16.3f} {row['formula_bubble']:>15.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": describe_machine(), "stages": STAGES, "virtual_stages": SCHEDULES,
                                    "rows_per_microbatch": args.rows,
                                    "width": args.width, "layers": args.layers, "rounds": args.rounds,
                                    "results": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
