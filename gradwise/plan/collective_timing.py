"""Time ``torch.distributed`` collectives between local gloo processes.

The measurement behind the alpha-beta model of :mod:`gradwise.plan.communication`: spawn
``world_size`` processes on 127.0.0.1 (gloo backend, one CPU thread each), and time each
collective on messages of the given sizes. Every timing is the slowest rank's wall time of
one call (a barrier lines the ranks up before it), over ``repeats`` calls taken in interleaved
rounds (every size once per round, in a new random order each round) so that the machine's
drift falls on all sizes alike. Both the median and the fastest call are kept: on a shared
machine the fastest call is the one least disturbed by other work, the cost the alpha-beta
model describes.
"""

from __future__ import annotations

import os
import random
import socket
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gradwise.validation import check_choice, check_int

COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather")


@dataclass(frozen=True)
class CollectiveTiming:
    """Seconds of one ``collective`` on ``message_bytes`` bytes among ``world_size`` processes
    (the median and the fastest of ``repeats`` calls).

    ``message_bytes`` is the size of the full vector (for all-gather: the gathered result;
    for reduce-scatter: the input that is reduced), as in the alpha-beta formulas.
    """

    collective: str
    world_size: int
    message_bytes: int
    seconds: float
    fastest: float
    repeats: int


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run_collective(collective: str, vector: torch.Tensor, world_size: int) -> None:
    if collective == "all_reduce":
        dist.all_reduce(vector)
    elif collective == "reduce_scatter":
        # gloo has no reduce_scatter kernel for tensors; the list form runs a reduce-scatter
        # of the chunks (reduce each chunk to its owner).
        chunks = list(vector.chunk(world_size))
        output = torch.empty_like(chunks[0])
        dist.reduce_scatter(output, chunks)
    else:
        chunk = vector.chunk(world_size)[0].contiguous()
        outputs = [torch.empty_like(chunk) for _ in range(world_size)]
        dist.all_gather(outputs, chunk)


def sample_collectives(collectives: Sequence[str], sizes: Sequence[int], repeats: int,
                       seed: int) -> dict[tuple[str, int], list[float]]:
    """Every rank's part in timing each collective on fp32 vectors of each size (rounded down to a
    multiple of ``4 * world_size`` bytes): after a warm-up call of each, ``repeats`` rounds in an order
    shuffled alike on every rank, each call after a barrier and timed as the slowest rank's. Returns
    ``(collective, message bytes) -> seconds`` per call, the same on every rank; a process group must
    be initialised."""
    world_size = dist.get_world_size()
    vectors = {size: torch.ones(max(1, size // 4) // world_size * world_size or world_size) for size in sizes}
    cases = [(collective, size) for collective in collectives for size in sizes]
    for collective, size in cases:  # warm-up: connections, allocations
        _run_collective(collective, vectors[size], world_size)
    samples: dict[tuple[str, int], list[float]] = {case: [] for case in cases}
    order = random.Random(seed)  # the same shuffle on every rank
    for _ in range(repeats):
        order.shuffle(cases)
        for collective, size in cases:
            dist.barrier()
            start = time.perf_counter()
            _run_collective(collective, vectors[size], world_size)
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            samples[(collective, size)].append(float(elapsed))
    return {(collective, vectors[size].numel() * 4): times for (collective, size), times in samples.items()}


def _worker(rank: int, world_size: int, port: int, collectives, sizes, repeats, seed, results) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        samples = sample_collectives(collectives, sizes, repeats, seed)
        if rank == 0:
            for (collective, nbytes), times in samples.items():
                results.append((collective, world_size, nbytes, statistics.median(times), min(times), len(times)))
    finally:
        dist.destroy_process_group()


def time_collectives(
    world_size: int,
    message_bytes: list[int],
    collectives: tuple[str, ...] = ("all_reduce",),
    repeats: int = 20,
    seed: int = 0,
) -> list[CollectiveTiming]:
    """Time of each collective and message size among ``world_size`` local gloo processes.

    Messages are fp32 vectors; each size is rounded down to a multiple of ``4 * world_size``
    bytes so that it splits evenly among the processes.
    """
    check_int("world_size", world_size, 2)
    check_int("repeats", repeats, 1)
    for size in message_bytes:
        check_int("message_bytes", size, 4 * world_size)
    for collective in collectives:
        check_choice("collective", collective, COLLECTIVES)
    with mp.Manager() as manager:
        results = manager.list()
        mp.start_processes(
            _worker,
            args=(world_size, _free_port(), tuple(collectives), tuple(message_bytes), repeats, seed, results),
            nprocs=world_size,
            start_method="spawn",
        )
        rows = list(results)
    return [CollectiveTiming(*row) for row in sorted(rows)]
