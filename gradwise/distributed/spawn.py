"""Run a function in N real processes joined in a ``torch.distributed`` group, with a deadline.

``run_processes(fn, world_size, *args)`` starts ``world_size`` fresh Python processes,
joins them through a file rendezvous (no port to pick, so concurrent jobs on
one machine cannot collide), calls ``fn(rank, world_size, *args)`` in each and returns the
list of their return values, by rank. An exception in any process, or the deadline passing,
kills every process and raises in the caller with the failing rank's traceback: a test
never hangs on a peer waiting in a collective forever.

The processes are forked from multiprocessing's fork server (``"forkserver"``), which imports
torch and its distributed and compiler modules once, before it forks anything: a process starts in
a fraction of a second instead of importing torch again (seconds each; an 8-process job spent longer
starting than working). The server runs none of the caller's code, so each process is as fresh as a
spawned one: it holds no state of the caller's, and gets the caller's environment variables as they
are when ``run_processes`` is called. Where there is no fork server (Windows), the processes are
spawned.

This is for tests, benchmarks and notebooks; jobs are launched with ``torchrun``.
"""

from __future__ import annotations

import datetime
import io
import os
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gradwise.validation import check_int, check_range

PRELOADED = ("__main__", "torch", "torch.distributed", "torch.distributed.tensor", "torch._dynamo")
"""What the fork server imports before it forks (``__main__``: multiprocessing's default, the caller's
script where it is one). ``torch._dynamo`` is imported by the first ``torch.optim.Optimizer`` a process
creates, about as long as torch itself."""


def _context() -> Any:
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOADED))  # read when the server starts: the first job only
    return context


class WorkerFailed(RuntimeError):
    """A spawned process raised; the message carries its rank and traceback."""


def _entry(fn: Callable[..., Any], rank: int, world_size: int, init_method: str, backend: str, threads: int,
           timeout_s: float, results: mp.Queue, args: tuple[Any, ...], environment: dict[str, str]) -> None:
    os.environ.clear()  # the caller's, not the fork server's (started by an earlier job)
    os.environ.update(environment, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(threads)
    try:
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        value = fn(rank, world_size, *args)
        dist.barrier()
        dist.destroy_process_group()
        # Serialised to bytes: a tensor put on the queue as is would travel through shared
        # memory that vanishes when this process exits, before the parent reads it.
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # report everything, including a KeyboardInterrupt, to the parent
        results.put((rank, "error", traceback.format_exc()))


def run_processes(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 120.0,
                  threads: int = 1, backend: str = "gloo") -> list[Any]:
    """``[fn(rank, world_size, *args) for rank in range(world_size)]``, each rank in its own process.

    ``fn`` and ``args`` must be picklable (a module-level function). Each process uses
    ``threads`` intra-op threads. Raises :class:`WorkerFailed` if a process raises or dies
    and ``TimeoutError`` when ``timeout_s`` passes first.
    """
    check_int("world_size", world_size, 1)
    check_range("timeout_s", timeout_s, 0.0, low_open=True)
    check_int("threads", threads, 1)
    context = _context()
    results = context.Queue()
    environment = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="gradwise-rendezvous-") as folder:
        init_method = f"file://{os.path.join(folder, 'store')}"
        processes = [
            context.Process(target=_entry, daemon=True,
                            args=(fn, rank, world_size, init_method, backend, threads, timeout_s, results, args,
                                  environment))
            for rank in range(world_size)
        ]
        for process in processes:
            process.start()
        deadline = time.monotonic() + timeout_s
        values: dict[int, Any] = {}
        try:
            while len(values) < world_size:
                try:
                    rank, status, value = results.get(timeout=0.2)
                except queue.Empty:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{world_size} processes running {fn.__name__} did not finish in "
                                           f"{timeout_s:g} s") from None
                    dead = [p for p in processes if p.exitcode not in (None, 0)]
                    if dead:
                        raise WorkerFailed(f"a process running {fn.__name__} died with exit code "
                                           f"{dead[0].exitcode}") from None
                    continue
                if status == "error":
                    raise WorkerFailed(f"rank {rank} of {world_size} running {fn.__name__} failed:\n{value}")
                values[rank] = torch.load(io.BytesIO(value), weights_only=False)
        finally:
            for process in processes:
                if process.is_alive() and len(values) < world_size:
                    process.kill()
                process.join(timeout=10)
            results.close()
    return [values[rank] for rank in range(world_size)]
