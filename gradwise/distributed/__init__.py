"""Distributed training on ``torch.distributed`` (gloo on the CPU, NCCL on GPUs), launched with ``torchrun``.

The names below are importable from ``gradwise.distributed``; all but the process-group
basics load on first use, so that a single-process run does not pay for DTensor, FSDP2 or
the pipelining package.

- Joining a job: :func:`init_distributed`, :class:`DistContext`, :func:`shutdown`;
  :func:`run_processes` for tests and notebooks; :class:`RankSlice`, each rank's rows.
- Sharding: :class:`ZeroOptimizer` (ZeRO-1/2), :func:`shard_model` (FSDP2, ZeRO-3),
  :func:`optimizer_state_bytes`.
- Model parallel: :func:`parallelize_tiny_gpt`, :func:`data_tensor_mesh`,
  :class:`TinyGPTPipeline`.
- Less communication: :class:`LocalSGD`, :class:`DiLoCo`.
- Asynchronous and federated: :class:`ParameterServer`, :class:`ParameterWorker`,
  :class:`FedAvg`, :func:`consensus_admm`, :class:`SplitClient`, :class:`SplitServer`,
  :class:`FederatedLogistic`.
- Fault tolerance and measurement: :class:`ShardedCheckpoints`, :class:`TrafficMeter`.
"""

from __future__ import annotations

import importlib
from typing import Any

from gradwise.distributed.context import DistContext, init_distributed, shutdown
from gradwise.distributed.data import RankSlice
from gradwise.distributed.spawn import WorkerFailed, run_processes

LAZY = {
    "ZeroOptimizer": "zero", "shard_model": "fsdp", "optimizer_state_bytes": "state_bytes",
    "parallelize_tiny_gpt": "tensor_parallel", "data_tensor_mesh": "tensor_parallel",
    "TinyGPTPipeline": "pipeline", "LocalSGD": "local_sgd", "DiLoCo": "local_sgd",
    "ParameterServer": "parameter_server", "ParameterWorker": "parameter_server", "ServerLog": "parameter_server",
    "FedAvg": "federated", "consensus_admm": "admm", "ADMMResult": "admm", "SplitClient": "split_learning",
    "SplitServer": "split_learning", "FederatedLogistic": "federated_logistic",
    "ShardedCheckpoints": "checkpoint", "TrafficMeter": "traffic",
}
"""Public name -> the module of ``gradwise.distributed`` that defines it (imported on first use)."""

__all__ = ["DistContext", "RankSlice", "WorkerFailed", "init_distributed", "run_processes", "shutdown", *LAZY]


def __getattr__(name: str) -> Any:
    if name not in LAZY:
        raise AttributeError(f"module 'gradwise.distributed' has no attribute {name!r}")
    return getattr(importlib.import_module(f"gradwise.distributed.{LAZY[name]}"), name)
