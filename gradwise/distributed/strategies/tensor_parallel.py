"""The ``tp`` strategy of the loop: tensor parallel ``tiny-gpt``, composed with data parallelism.

The world is a ``(dp, tp)`` mesh (:func:`gradwise.distributed.mesh.data_tensor_mesh`,
``strategy_options tp=T``, default: every process in one tensor-parallel group): each row of
``tp`` ranks holds one replica of the model split in Megatron's layout
(:func:`gradwise.problems.tiny_gpt_tensor_parallel.parallelize_tiny_gpt`) and feeds it the same
rows; the ``dp`` replicas split the global batch and average their gradients after the
backward passes (:func:`gradwise.distributed.mesh.average_gradients`, counted in
``bytes_communicated``; the activations' all-reduces inside the forward and backward are
the tensor-parallel part and are not). The world size must be a multiple of ``tp`` and the
heads must split evenly over it. Checkpoints: ``torch.distributed.checkpoint`` (DTensor
shards); ``model.pt`` holds the gathered tensors, with each block's ``qkv`` rows in the
head-wise order of :func:`gradwise.problems.tiny_gpt_tensor_parallel.qkv_row_order`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from gradwise.distributed.mesh import average_gradients, data_tensor_mesh
from gradwise.distributed.strategies.dtensor import DTensorStrategy
from gradwise.problems.tiny_gpt import TinyGPT
from gradwise.problems.tiny_gpt_tensor_parallel import parallelize_tiny_gpt
from gradwise.validation import check_int


class TensorParallelStrategy(DTensorStrategy):
    """Tensor parallel over groups of ``tp`` ranks, data parallel over ``world_size / tp`` such groups."""

    name = "tp"
    min_world_size = 2
    max_world_size = None
    options = {"tp": 0}
    workloads = ("tiny-gpt", "text")
    """``tp`` 0: the whole world."""
    precisions = ("fp32", "bf16")

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        settings = super().check_options(options)
        check_int("tp", settings["tp"], 0)
        return settings

    @classmethod
    def check_world_size(cls, world_size: int, settings: dict[str, Any]) -> None:
        super().check_world_size(world_size, settings)
        if settings["tp"] and world_size % settings["tp"]:
            raise ValueError(f"world size {world_size} is not a multiple of the tensor-parallel degree "
                             f"tp={settings['tp']}")

    @property
    def tp(self) -> int:
        return self.settings["tp"] or self.world_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def dp_size(self) -> int:
        return self.world_size // self.tp

    def wrap_model(self, model: nn.Module) -> nn.Module:
        if not isinstance(model, TinyGPT):
            raise ValueError(f"strategy 'tp' splits a tiny-gpt model, got a {type(model).__name__}; "
                             f"use --workload tiny-gpt (or text)")
        self.mesh = data_tensor_mesh(self.dp_size, self.tp, self.joined.device.type)
        self.model = parallelize_tiny_gpt(model, self.mesh["tp"])
        return self.model

    def reduce_gradients(self) -> None:
        if self.dp_size > 1:
            with self.counting():
                average_gradients(self.model, self.mesh["dp"])

