"""Distributed training on ``torch.distributed`` (gloo on the CPU, NCCL on GPUs), launched with ``torchrun``.

The folder holds the infrastructure (``context``, ``spawn``, ``data``, ``mesh``, ``traffic``,
``state_bytes``), the training strategies of ``gradwise train`` (:mod:`.strategies`) and,
apart from them, the algorithms that are not a strategy (:mod:`.algorithms`). The names
below are importable from ``gradwise.distributed``; all but the process-group basics load
on first use, so that a single-process run does not pay for DTensor, FSDP2 or the
pipelining package.

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
    "ZeroOptimizer": "gradwise.distributed.strategies.zero_optimizer",
    "shard_model": "gradwise.distributed.strategies.fsdp",
    "optimizer_state_bytes": "gradwise.distributed.state_bytes",
    "parallelize_tiny_gpt": "gradwise.problems.tiny_gpt_tensor_parallel",
    "data_tensor_mesh": "gradwise.distributed.mesh",
    "TinyGPTPipeline": "gradwise.problems.tiny_gpt_pipeline",
    "LocalSGD": "gradwise.distributed.strategies.periodic_averaging",
    "DiLoCo": "gradwise.distributed.strategies.periodic_averaging",
    "ParameterServer": "gradwise.distributed.algorithms.parameter_server",
    "ParameterWorker": "gradwise.distributed.algorithms.parameter_server",
    "ServerLog": "gradwise.distributed.algorithms.parameter_server",
    "FedAvg": "gradwise.distributed.algorithms.federated",
    "consensus_admm": "gradwise.distributed.algorithms.admm",
    "ADMMResult": "gradwise.distributed.algorithms.admm",
    "SplitClient": "gradwise.distributed.algorithms.split_learning",
    "SplitServer": "gradwise.distributed.algorithms.split_learning",
    "FederatedLogistic": "gradwise.distributed.algorithms.federated_logistic",
    "ShardedCheckpoints": "gradwise.checkpoints.sharded",
    "TrafficMeter": "gradwise.distributed.traffic",
}
"""Public name -> the module that defines it (imported on first use). The model-specific
parallel plans live beside the model in :mod:`gradwise.problems`, the sharded checkpoints in
:mod:`gradwise.checkpoints`; they are re-exported here because a distributed user looks here."""

__all__ = ["DistContext", "RankSlice", "WorkerFailed", "init_distributed", "run_processes", "shutdown", *LAZY]


def __getattr__(name: str) -> Any:
    if name not in LAZY:
        raise AttributeError(f"module 'gradwise.distributed' has no attribute {name!r}")
    return getattr(importlib.import_module(LAZY[name]), name)
