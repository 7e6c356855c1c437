"""Joining a ``torch.distributed`` job: who am I, how many are we, which device and backend.

A process launched by ``torchrun`` finds its place in the job in the environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); a process
started by :func:`gradwise.distributed.spawn.run_processes` is already in a process group.
:func:`init_distributed` handles both and returns a :class:`DistContext`. The backend
follows the device: NCCL for CUDA, gloo for the CPU.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

ENDPOINT_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""What ``torchrun`` sets and the env:// rendezvous reads."""


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files and prints."""
        return self.rank == 0


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA devices, gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def device_for(local_rank: int, device: str = "auto") -> torch.device:
    """``cuda:local_rank`` when CUDA is asked for (or ``auto`` and available), else the CPU."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device; use 'cpu' or 'auto'")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(device: str = "auto", timeout_s: float = 300.0) -> DistContext:
    """Join the job (once) and describe this process's place in it.

    Raises ``ValueError`` naming the missing variables when the process was not started by
    ``torchrun`` (or another env:// launcher) and no process group exists yet.
    """
    if dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        resolved = device_for(local_rank, device)
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, resolved, dist.get_backend())
    missing = [name for name in ENDPOINT_VARIABLES if not os.environ.get(name)]
    if missing:
        raise ValueError(
            f"no rendezvous endpoint: {', '.join(missing)} not set; launch with torchrun "
            f"(or gradwise train --nproc N)"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = device_for(local_rank, device)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    backend = backend_for(resolved)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, resolved, backend)


def shutdown() -> None:
    """Leave the process group, if this process is in one."""
    if dist.is_initialized():
        dist.destroy_process_group()
