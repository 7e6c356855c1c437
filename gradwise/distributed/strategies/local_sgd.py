"""The low-communication strategies of the loop: ``localsgd`` and ``diloco``.

Each rank trains its own replica of the model with the run's optimizer on its slice of
the data (no DDP wrapper, no gradient reduction); after every ``sync_every`` steps the
replicas average their parameter change (:class:`gradwise.distributed.strategies.periodic_averaging.LocalSGD`)
or feed it to an outer Nesterov step (:class:`gradwise.distributed.strategies.periodic_averaging.DiLoCo`,
``outer_lr``, ``outer_momentum``). The logged loss and gradient norm are the means over the
replicas; clipping acts on each replica's own gradient. Checkpoints: one file per rank (the
replicas differ between synchronisations), resumable with the same world size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn
from torch.optim import Optimizer

from gradwise.checkpoints.run import PerRankCheckpoints
from gradwise.distributed.strategies.base import Strategy
from gradwise.distributed.strategies.periodic_averaging import DiLoCo, LocalSGD
from gradwise.validation import check_int, check_range


class LocalSGDStrategy(Strategy):
    """Local SGD: average the replicas every ``sync_every`` steps."""

    name = "localsgd"
    min_world_size = 2
    max_world_size = None
    options = {"sync_every": 8}
    precisions = ("fp32", "bf16")

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        settings = super().check_options(options)
        check_int("sync_every", settings["sync_every"], 1)
        return settings

    def wrap_model(self, model: nn.Module) -> nn.Module:
        self.sync = LocalSGD(model, self.settings["sync_every"])
        return model

    def after_step(self) -> None:
        self.sync.after_step()
        self.bytes_communicated = self.sync.bytes_communicated

    def checkpoints(self, folder: Path, keep: int, model: nn.Module, optimizer: Optimizer) -> Any:

        return PerRankCheckpoints(folder, keep, model, optimizer, self.rank, self.world_size)

    def state_dict(self) -> dict[str, Any]:
        return self.sync.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sync.load_state_dict(state)
        self.bytes_communicated = self.sync.bytes_communicated


class DiLoCoStrategy(LocalSGDStrategy):
    """DiLoCo: the averaged change drives an outer Nesterov SGD every ``sync_every`` steps."""

    name = "diloco"
    options = {"sync_every": 8, "outer_lr": 0.7, "outer_momentum": 0.9}

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        settings = super().check_options(options)
        check_range("outer_lr", settings["outer_lr"], 0.0, low_open=True)
        check_range("outer_momentum", settings["outer_momentum"], 0.0, 1.0, high_open=True)
        return settings

    def wrap_model(self, model: nn.Module) -> nn.Module:
        self.sync = DiLoCo(model, self.settings["sync_every"], self.settings["outer_lr"],
                           self.settings["outer_momentum"])
        return model
