"""The training layer: the loop and its parts, one file per concept.

``loop`` (the loop), ``config`` (the settings), ``optimizers`` (by name), ``precision``
(fp32/bf16/fp16), ``guards`` (divergence), ``metrics`` (JSONL/CSV, throughput), ``plots``
(the end-of-run figure). Checkpoints are a layer of their own below it (:mod:`gradwise.checkpoints`).
Example::

    from gradwise.train import TrainConfig, train
    result = train(TrainConfig(workload="mlp", steps=300), out="runs/mlp", progress=True)
    print(result.final_metrics, result.target_reached)
"""

from gradwise.checkpoints.atomic import CheckpointManager, CorruptCheckpoint
from gradwise.train.config import TrainConfig
from gradwise.train.guards import DivergenceGuard, DivergenceReport, NonFiniteWeights, TrainingDiverged
from gradwise.train.loop import Trainer, TrainResult, train
from gradwise.train.optimizers import OPTIMIZERS, build_optimizer
from gradwise.train.precision import PRECISIONS, Precision

__all__ = [
    "OPTIMIZERS",
    "PRECISIONS",
    "CheckpointManager",
    "CorruptCheckpoint",
    "DivergenceGuard",
    "DivergenceReport",
    "NonFiniteWeights",
    "Precision",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingDiverged",
    "build_optimizer",
    "train",
]
