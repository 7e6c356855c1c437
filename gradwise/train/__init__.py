"""The training layer: the loop and its parts, one file per concept.

``loop`` (the loop), ``config`` (the settings), ``optimizers`` (by name), ``precision``
(fp32/bf16/fp16), ``guards`` (divergence), ``metrics`` (JSONL/CSV, throughput), ``sharpness``
(the top Hessian eigenvalue during training), ``plots`` (the end-of-run figure). Checkpoints
are a layer of their own below it (:mod:`gradwise.checkpoints`).
Example::

    from gradwise.train import TrainConfig, train
    result = train(TrainConfig(workload="mlp", steps=300), out="runs/mlp", progress=True)
    print(result.final_metrics, result.target_reached)
"""

from __future__ import annotations

import importlib
from typing import Any

LAZY = {
    "CheckpointManager": "gradwise.checkpoints.atomic",
    "CorruptCheckpoint": "gradwise.checkpoints.atomic",
    "TrainConfig": "gradwise.train.config",
    "DivergenceGuard": "gradwise.train.guards",
    "DivergenceReport": "gradwise.train.guards",
    "NonFiniteWeights": "gradwise.train.guards",
    "TrainingDiverged": "gradwise.train.guards",
    "Trainer": "gradwise.train.loop",
    "TrainResult": "gradwise.train.loop",
    "train": "gradwise.train.loop",
    "OPTIMIZERS": "gradwise.train.optimizers",
    "build_optimizer": "gradwise.train.optimizers",
    "PRECISIONS": "gradwise.train.precision",
    "Precision": "gradwise.train.precision",
}
"""Public name -> the module that defines it, imported on first use: importing one light part
(``gradwise.train.config`` for the command line's parsers) must not load the loop and, through
it, every distributed strategy, DTensor and matplotlib."""

__all__ = sorted(LAZY)


def __getattr__(name: str) -> Any:
    if name not in LAZY:
        raise AttributeError(f"module 'gradwise.train' has no attribute {name!r}")
    return getattr(importlib.import_module(LAZY[name]), name)
