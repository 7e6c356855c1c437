r"""The ``3d`` strategy of the loop: pipeline x data (FSDP2) x tensor parallel ``tiny-gpt`` on one device mesh.

The world is a ``(pp, dp, tp)`` mesh (:func:`gradwise.distributed.mesh.pipeline_data_tensor_mesh`,
``strategy_options pp=P,tp=T``; ``dp`` is the world size over ``P T``), Narayanan et al. 2021's
layout (arXiv:2104.04473): the blocks are cut into ``P`` stages run under the pipeline's schedule
(:class:`gradwise.problems.tiny_gpt_pipeline.TinyGPTPipeline`: GPipe, 1F1B or interleaved 1F1B over
``microbatches``, the last with ``virtual_stages`` chunks per stage, each split and sharded as below);
each stage is split over its ``T`` tensor-parallel ranks in Megatron's layout
(:func:`gradwise.problems.tiny_gpt_tensor_parallel.parallelize_stage`) and then sharded with FSDP2
over its ``dp`` replicas (each block its own unit), whose rows of the global batch it is fed. So a
parameter is a DTensor on the stage's ``(dp, tp)`` sub-mesh, and every element-wise optimizer steps
its local shard; after the schedule's backward passes FSDP2 has averaged the gradients over ``dp``,
and the tied embedding / output matrix (a copy on the first and on the last stage, sharded alike)
has its two gradients summed over the pipeline, shard by shard.

Why a strategy of its own rather than ``pp`` with more options: its parameters are DTensors, so its
checkpoints are ``torch.distributed.checkpoint`` shards keyed by parameter name (each stage writes
its own names), which load into another ``(dp, tp)`` shape with the same ``pp``; ``pp`` keeps its
per-rank files, which its existing runs resume from.

The gradient norm for clipping is global over all three dimensions: each stage's squared norm of
its DTensor gradients reduced over its ``(dp, tp)`` sub-mesh, then summed over the stages, the tied
matrix counted once. Evaluation and ``model.pt`` gather the whole model on every rank: each stage
assembles its parameters (``full_tensor``; the qkv rows put back in the single-process order) and
broadcasts them over the pipeline. fp32 only, as ``pp``.

Example::

    gradwise train --workload tiny-gpt --nproc 8 --strategy 3d --strategy-options pp=2,tp=2
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.optim import Optimizer

from gradwise.checkpoints.run import ShardedRunCheckpoints
from gradwise.distributed.mesh import pipeline_data_tensor_mesh
from gradwise.distributed.strategies.base import sharded_grad_norm
from gradwise.distributed.strategies.pipeline import PipelineStrategy
from gradwise.problems.tiny_gpt import TinyGPT
from gradwise.problems.tiny_gpt_pipeline import TinyGPTStage
from gradwise.problems.tiny_gpt_tensor_parallel import parallelize_stage, qkv_row_order
from gradwise.validation import check_int

QKV = ".attention.qkv."


class ThreeDStrategy(PipelineStrategy):
    """Pipeline stages whose ranks are tensor parallel and FSDP2-sharded data-parallel replicas."""

    name = "3d"
    min_world_size = 2
    max_world_size = None
    options = {"pp": 2, "tp": 1, "microbatches": 2, "schedule": "gpipe", "virtual_stages": None}

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        settings = super().check_options(options)
        check_int("pp", settings["pp"], 2)
        check_int("tp", settings["tp"], 1)
        return settings

    @classmethod
    def check_world_size(cls, world_size: int, settings: dict[str, Any]) -> None:
        super().check_world_size(world_size, settings)
        if world_size % (settings["pp"] * settings["tp"]):
            raise ValueError(f"world size {world_size} is not a multiple of pp x tp = "
                             f"{settings['pp']} x {settings['tp']}")

    @classmethod
    def pipeline_stages(cls, world_size: int, settings: dict[str, Any]) -> int:
        return settings["pp"]

    @property
    def tp(self) -> int:
        return self.settings["tp"]

    @property
    def dp_size(self) -> int:
        return self.world_size // (self.stages * self.tp)

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp) % self.dp_size

    @property
    def pipeline_group(self) -> dist.ProcessGroup:
        return self.mesh["pp"].get_group()

    def wrap_model(self, model: nn.Module) -> nn.Module:
        # gathering a parameter sharded over dp and tp is two all-gathers, which DTensor warns of at every
        # evaluation: the gather is rare (evaluation, model.pt), not the step
        logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
        if not isinstance(model, TinyGPT):
            raise ValueError(f"strategy '3d' cuts a tiny-gpt model into stages, got a {type(model).__name__}; "
                             f"use --workload tiny-gpt (or text)")
        self.mesh = pipeline_data_tensor_mesh(self.stages, self.dp_size, self.tp, self.joined.device.type)
        whole = copy.deepcopy(model)  # the stage splits the model's own modules; evaluation needs whole ones
        stage_module = super().wrap_model(model)
        self.whole = whole
        return stage_module

    def split_stage(self, stage: TinyGPTStage) -> nn.Module:
        """Megatron's layout over ``tp``, then FSDP2 over ``dp`` with each block a unit and the stage (or
        chunk: each chunk is its own FSDP2 root, which the schedule drives) the rest."""
        if self.tp > 1:
            parallelize_stage(stage, self.mesh["tp"])
        if self.dp_size > 1:
            for block in stage.blocks.values():
                fully_shard(block, mesh=self.mesh["dp"])
            fully_shard(stage, mesh=self.mesh["dp"])
        return stage

    def stage_grad_norm(self, named_parameters: list[tuple[str, nn.Parameter]]) -> tuple[float, list[str]]:
        return sharded_grad_norm(named_parameters)

    @torch.no_grad()
    def gather_whole_model(self) -> None:
        """Every parameter of the whole model, from the stage that holds it, on every rank."""
        stage = dict(self.pipeline.module.named_parameters())
        for name, param in self.whole.named_parameters():
            owner = self.owner(name)
            if owner == self.pipeline.stage_index:
                value: torch.Tensor = stage[name]
                value = value.full_tensor() if hasattr(value, "full_tensor") else value
                if QKV in name and self.tp > 1:  # back from the head-wise order of the tensor-parallel layout
                    value = value[torch.argsort(qkv_row_order(value.shape[0] // 3, self.tp))]
                param.copy_(value)
            dist.broadcast(param, src=dist.get_global_rank(self.pipeline_group, owner), group=self.pipeline_group)

    def checkpoints(self, folder: Path, keep: int, model: nn.Module, optimizer: Optimizer) -> Any:
        return ShardedRunCheckpoints(folder, keep, model, optimizer, stages=True)
