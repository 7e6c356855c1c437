"""The ``pp`` strategy of the loop: pipeline parallel ``tiny-gpt``, one stage per process.

:class:`gradwise.problems.tiny_gpt_pipeline.TinyGPTPipeline` cuts the blocks into ``world_size``
stages and runs each batch through them in ``microbatches`` micro-batches (``schedule``
``gpipe``, ``1f1b`` or ``interleaved-1f1b``); every rank draws the same global batch and trains
its stage's parameters (the optimizer is built on them). ``interleaved-1f1b`` (Narayanan et al.
2021, arXiv:2104.04473) cuts them into ``virtual_stages x world_size`` chunks instead (default 2
per rank), rank ``r`` holding chunks ``r, r + p, ...``: the bubble falls from
``(p - 1) / (m + p - 1)`` to ``(p - 1) / (v m + p - 1)`` of the step, for ``v`` times the
messages. Gradient accumulation over ``accumulate`` batches divides the summed gradients by
``accumulate`` (the pipeline's own backward gives each batch's mean-loss gradient). The global
gradient norm is ``sqrt(sum over stages ||g_stage||^2)``, the tied embedding/output matrix
counted once (its two copies hold the same, summed gradient). For evaluation and ``model.pt``
every stage broadcasts its parameters into the whole model on every rank. Checkpoints: one file
per rank (its stage or chunks and their optimizer state), resumable with the same world size and
virtual stages. fp32 only (the stages' activation buffers are fp32). ``bytes_communicated``
counts the pipeline's messages (activations, their gradients, the tied gradient and the loss
broadcast).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from gradwise.checkpoints.run import PerRankCheckpoints
from gradwise.distributed.strategies.base import Strategy, clip_by_norm_, local_grad_norm
from gradwise.problems.tiny_gpt import TinyGPT
from gradwise.problems.tiny_gpt_pipeline import TinyGPTPipeline, TinyGPTStage, check_schedule

BLOCK = re.compile(r"^blocks\.(\d+)\.")


class PipelineStrategy(Strategy):
    """One pipeline stage of TinyGPT per process."""

    name = "pp"
    min_world_size = 2
    max_world_size = None
    options = {"microbatches": 2, "schedule": "gpipe", "virtual_stages": None}
    """``virtual_stages`` None: 2 under ``interleaved-1f1b``, 1 (one chunk per rank) otherwise."""
    workloads = ("tiny-gpt", "text")
    precisions = ("fp32",)

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        settings = super().check_options(options)
        if settings["virtual_stages"] is None:
            settings["virtual_stages"] = 2 if settings["schedule"] == "interleaved-1f1b" else 1
        check_schedule(settings["schedule"], settings["microbatches"], settings["virtual_stages"])
        return settings

    @classmethod
    def check_world_size(cls, world_size: int, settings: dict[str, Any]) -> None:
        super().check_world_size(world_size, settings)
        check_schedule(settings["schedule"], settings["microbatches"], settings["virtual_stages"],
                       cls.pipeline_stages(world_size, settings))

    @classmethod
    def pipeline_stages(cls, world_size: int, settings: dict[str, Any]) -> int:
        """The pipeline's stages in a job of ``world_size`` processes: one per process."""
        return world_size

    @property
    def dp_rank(self) -> int:
        return 0

    @property
    def dp_size(self) -> int:
        return 1

    @property
    def stages(self) -> int:
        """Pipeline stages (ranks of the pipeline; each holds ``virtual_stages`` chunks)."""
        return self.pipeline_stages(self.world_size, self.settings)

    @property
    def pipeline_group(self) -> dist.ProcessGroup | None:
        """The group of this process's stage and the others it sends to (None: the whole job)."""
        return None

    def wrap_model(self, model: nn.Module) -> nn.Module:
        if not isinstance(model, TinyGPT):
            raise ValueError(f"strategy 'pp' cuts a tiny-gpt model into stages, got a {type(model).__name__}; "
                             f"use --workload tiny-gpt (or text)")
        self.whole = model
        self.pipeline = TinyGPTPipeline(model, self.stages, self.settings["microbatches"],
                                        self.settings["schedule"], group=self.pipeline_group,
                                        parallelize=self.split_stage, virtual_stages=self.settings["virtual_stages"])
        self.accumulate = 1
        return self.pipeline.module

    def split_stage(self, stage: TinyGPTStage) -> nn.Module:
        """Split this process's stage (each of its chunks) further before the pipeline is built (``pp``: it
        stays whole)."""
        return stage

    def trained_module(self, model: nn.Module) -> nn.Module:
        return self.pipeline.module

    def forward_backward(self, loss, model, batch, precision, scaler, accumulate) -> torch.Tensor:
        self.accumulate = accumulate
        with self.counting():
            value = self.pipeline.step(*batch)
        return torch.tensor(value / accumulate, device=self.joined.device)

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        if self.accumulate > 1:
            for param in self.pipeline.module.parameters():
                if param.grad is not None:
                    param.grad.div_(self.accumulate)

    def grad_norm(self, named_parameters: list[tuple[str, nn.Parameter]]) -> tuple[float, list[str]]:
        first = self.pipeline.module.is_first
        counted = [(name, p) for name, p in named_parameters if name != "output_weight" or first]
        local, nonfinite = self.stage_grad_norm(counted)
        total = torch.tensor(local**2, dtype=torch.float64)
        dist.all_reduce(total, group=self.pipeline_group)
        return total.sqrt().item(), nonfinite

    def stage_grad_norm(self, named_parameters: list[tuple[str, nn.Parameter]]) -> tuple[float, list[str]]:
        """The norm of this stage's gradient (its parameters are whole here)."""
        return local_grad_norm(named_parameters)

    def clip_grad_norm_(self, parameters: list[nn.Parameter], max_norm: float) -> None:
        norm, _ = self.grad_norm(list(self.pipeline.module.named_parameters()))
        clip_by_norm_(parameters, norm, max_norm)

    def owner(self, name: str) -> int:
        """The stage (pipeline rank) holding the whole model's parameter ``name``: chunk ``c`` of
        ``stages x virtual_stages`` is on stage ``c mod stages``."""
        if name.startswith(("token_embedding.", "position_embedding.")):
            return 0
        block = BLOCK.match(name)
        if block is None:  # the final norm
            return self.stages - 1
        per_chunk = len(self.whole.blocks) // (self.stages * self.settings["virtual_stages"])
        return int(block.group(1)) // per_chunk % self.stages

    @torch.no_grad()
    def gather_whole_model(self) -> None:
        for name, param in self.whole.named_parameters():
            dist.broadcast(param, src=self.owner(name))

    def evaluation_model(self, model: nn.Module) -> nn.Module:
        self.gather_whole_model()
        return self.whole

    def full_model_state(self, model: nn.Module) -> dict[str, Any]:
        self.gather_whole_model()
        return self.whole.state_dict()

    def checkpoints(self, folder: Path, keep: int, model: nn.Module, optimizer: Optimizer) -> Any:

        return PerRankCheckpoints(folder, keep, model, optimizer, self.rank, self.world_size)
