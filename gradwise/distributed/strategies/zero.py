"""The sharded data-parallel strategies of the loop: ``zero1``, ``zero2`` and ``fsdp`` (ZeRO stage 3).

* ``zero1``/``zero2``: the model is not wrapped; :class:`gradwise.distributed.strategies.zero_optimizer.ZeroOptimizer`
  reduces the gradients once per step (all-reduce for stage 1, reduce-scatter for stage 2),
  gives the global gradient norm, clips, updates this rank's shard and all-gathers the
  parameters. Non-final micro-batches need no ``no_sync``: nothing is communicated during
  backward. Checkpoints: the optimizer shards gathered into the unsharded optimizer's
  state_dict, one file written by rank 0, loadable with another world size (or by one process).
* ``fsdp``: :func:`gradwise.distributed.strategies.fsdp.shard_model` (FSDP2 ``fully_shard``), with
  ``reshard=false`` keeping the parameters gathered from forward to backward. The optimizer
  is built on the DTensor shards; non-final micro-batches skip the gradient reduce-scatter
  (``set_requires_gradient_sync(False)``). Checkpoints: ``torch.distributed.checkpoint``,
  loadable with another world size.

Bytes communicated are measured by :class:`gradwise.distributed.traffic.TrafficMeter`
around the gradient reduction and the optimizer step (ZeRO) or around each micro-batch's
forward and backward (FSDP: parameter all-gathers and gradient reduce-scatters); the
scalar all-reduce of the gradient norm is not counted.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.optim import Optimizer

from gradwise.checkpoints.run import ConsolidatedCheckpoints
from gradwise.distributed.strategies.base import Strategy, local_grad_norm
from gradwise.distributed.strategies.dtensor import DTensorStrategy
from gradwise.distributed.strategies.fsdp import shard_model
from gradwise.distributed.strategies.zero_optimizer import ZeroOptimizer
from gradwise.validation import check_choice


class ZeroStrategy(Strategy):
    """ZeRO stage 1: optimizer state sharded, gradients all-reduced."""

    name = "zero1"
    stage = 1
    min_world_size = 2
    max_world_size = None
    precisions = ("fp32", "bf16")

    def wrap_model(self, model: nn.Module) -> nn.Module:
        with torch.no_grad():  # every rank starts from rank 0's parameters, as DDP does
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor, src=0)
        return model

    def wrap_optimizer(self, optimizer: Optimizer) -> Optimizer:
        self.optimizer = ZeroOptimizer(optimizer, stage=self.stage)
        return self.optimizer

    def reduce_gradients(self) -> None:
        with self.counting():
            self.optimizer.reduce_gradients()

    def grad_norm(self, named_parameters: list[tuple[str, nn.Parameter]]) -> tuple[float, list[str]]:
        norm = self.optimizer.grad_norm()
        return norm, [] if math.isfinite(norm) else local_grad_norm(named_parameters)[1]

    def clip_grad_norm_(self, parameters: list[nn.Parameter], max_norm: float) -> None:
        self.optimizer.clip_grad_norm_(max_norm)

    def optimizer_step(self, scaler: torch.amp.GradScaler, optimizer: Optimizer) -> None:
        with self.counting():
            scaler.step(optimizer)

    def checkpoints(self, folder: Path, keep: int, model: nn.Module, optimizer: Optimizer) -> Any:

        return ConsolidatedCheckpoints(folder, keep, model, optimizer, self.rank, self.world_size)


class Zero2Strategy(ZeroStrategy):
    """ZeRO stage 2: optimizer state and gradients sharded (reduce-scatter)."""

    name = "zero2"
    stage = 2


class FSDPStrategy(DTensorStrategy):
    """ZeRO stage 3 through FSDP2: parameters, gradients and optimizer state sharded."""

    name = "fsdp"
    min_world_size = 2
    max_world_size = None
    options = {"reshard": True}
    precisions = ("fp32", "bf16")

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        settings = super().check_options(options)
        check_choice("reshard", settings["reshard"], (True, False))
        return settings

    def wrap_model(self, model: nn.Module) -> nn.Module:
        self.model = shard_model(model, reshard_after_forward=self.settings["reshard"])
        return self.model

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        cast(FSDPModule, self.model).set_requires_gradient_sync(last)  # shard_model made it an FSDPModule
        with self.counting():
            yield

