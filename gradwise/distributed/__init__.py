"""Distributed training on ``torch.distributed`` (gloo on the CPU, NCCL on GPUs), launched with ``torchrun``."""

from gradwise.distributed.context import DistContext, init_distributed, shutdown
from gradwise.distributed.data import RankSlice
from gradwise.distributed.spawn import WorkerFailed, run_processes

__all__ = ["DistContext", "RankSlice", "WorkerFailed", "init_distributed", "run_processes", "shutdown"]
