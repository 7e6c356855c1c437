"""What the strategies whose parameters are DTensors (``fsdp``, ``tp``) share.

A DTensor parameter's gradient is a DTensor too: its norm is reduced over the mesh
(:func:`~gradwise.distributed.strategies.base.sharded_grad_norm`), clipping scales every shard by
the one global factor, checkpoints are ``torch.distributed.checkpoint`` shards that load
into another world size, and ``model.pt`` needs the full tensors gathered (a collective).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.optim import Optimizer

from gradwise.checkpoints.run import ShardedRunCheckpoints
from gradwise.distributed.strategies.base import Strategy, clip_by_norm_, sharded_grad_norm


class DTensorStrategy(Strategy):
    """A strategy whose trained parameters are DTensors; subclasses shard or split the model."""

    def grad_norm(self, named_parameters: list[tuple[str, nn.Parameter]]) -> tuple[float, list[str]]:
        return sharded_grad_norm(named_parameters)

    def clip_grad_norm_(self, parameters: list[nn.Parameter], max_norm: float) -> None:
        norm, _ = sharded_grad_norm([("", p) for p in parameters])
        clip_by_norm_(parameters, norm, max_norm)

    def checkpoints(self, folder: Path, keep: int, model: nn.Module, optimizer: Optimizer) -> Any:

        return ShardedRunCheckpoints(folder, keep, model, optimizer)

    def full_model_state(self, model: nn.Module) -> dict[str, Any]:
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
