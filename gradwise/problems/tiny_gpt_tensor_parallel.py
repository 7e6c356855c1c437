"""Tensor parallelism for :class:`~gradwise.problems.tiny_gpt.TinyGPT` (the model-specific plan;
the mesh helpers are in :mod:`gradwise.distributed.mesh`).

Megatron-LM's layout (Shoeybi et al. 2019, arXiv:1909.08053, section 3) on
``torch.distributed.tensor.parallel``: in every block the first Linear of each pair is split
by output columns and the second by input rows,

    attention:  [q k v] = x W_qkv  (W_qkv column-wise: rank r computes its n_head / t heads)
                y = [y_1 ... y_t] W_proj = sum_r y_r W_proj^(r)  (row-wise, one all-reduce)
    MLP:        h = GELU(x W_1)  (column-wise),  y = sum_r h_r W_2^(r)  (row-wise, one all-reduce)

so a block's forward costs two all-reduces of the activations and so does its backward
(of the input gradients, at the column-wise layers). Embeddings, LayerNorms and the tied
output layer stay whole on every rank (``Replicate()`` DTensors): the residual stream is
replicated, so every rank computes the same gradient for them without communicating.
Every parameter is thus a DTensor, and what works on DTensors works unchanged:
``torch.nn.utils.clip_grad_norm_`` returns the global norm, gradwise's and torch's
optimizers step the local shards, ``torch.distributed.checkpoint`` saves the shards.

``W_qkv`` stacks the rows of q, k and v; a contiguous shard of it would hand rank 0 all of
q and part of k. :func:`parallelize_tiny_gpt` therefore regroups its rows head-wise first,
``[q_1 k_1 v_1 | q_2 k_2 v_2 | ...]`` (rank r's heads in block r), as Megatron stores the
fused projection. The regrouping is a fixed row permutation of a parameter, so training is
unchanged (element-wise optimizers and orthogonalisation commute with it) but the
``full_tensor()`` of a tensor-parallel ``qkv`` is the permuted single-process matrix;
:func:`qkv_row_order` gives the permutation.

Data parallelism over a second mesh dimension (a ``(dp, tp)`` mesh from
:func:`gradwise.distributed.mesh.data_tensor_mesh`): each row of the mesh is one tensor-parallel model replica fed its
slice of the global batch (:class:`~gradwise.distributed.data.RankSlice` with the dp rank),
and :func:`gradwise.distributed.mesh.average_gradients` averages the gradients' local shards over the dp group before
the optimizer step, which then equals the step of one process on the global batch.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, distribute_module
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from gradwise.problems.tiny_gpt import Block, TinyGPT
from gradwise.problems.tiny_gpt_pipeline import TinyGPTStage


def qkv_row_order(d_model: int, tp: int) -> torch.Tensor:
    """Indices that regroup the rows ``[q; k; v]`` of a ``(3 d_model, d_model)`` qkv weight as
    ``[q_1; k_1; v_1; ...; q_tp; k_tp; v_tp]``, block ``r`` holding rank ``r``'s heads."""
    return torch.arange(3 * d_model).view(3, tp, d_model // tp).transpose(0, 1).reshape(-1)


def parallelize_tiny_gpt(model: TinyGPT, tp_mesh: DeviceMesh) -> TinyGPT:
    """Shard ``model``'s blocks over the one-dimensional ``tp_mesh`` in Megatron's layout, in place.

    Every rank must pass the same model (same seed), and every rank of a tensor-parallel
    group the same inputs. The parameters become ``DTensor``s:
    ``Shard(0)`` for the column-wise Linears (weight and bias), ``Shard(1)`` for the
    row-wise weights, ``Replicate()`` for everything else. Inside the model the residual
    stream is a replicated DTensor; the forward pass takes and returns ordinary tensors, so
    the loss and the training loop are unchanged. Raises ``ValueError`` when the heads do
    not split evenly over the mesh.
    """
    _parallelize_blocks(model.transformer_blocks(), tp_mesh)
    for embedding in (model.token_embedding, model.position_embedding):
        # The ignores: torch annotates input_fn/output_fn as returning None, though it uses what they return
        distribute_module(embedding, tp_mesh, input_fn=_replicated_inputs)  # type: ignore[arg-type]
    distribute_module(model, tp_mesh, output_fn=_local_output)  # type: ignore[arg-type]  # in place
    return model


def parallelize_stage(stage: TinyGPTStage, tp_mesh: DeviceMesh) -> TinyGPTStage:
    """Shard a pipeline stage's blocks over ``tp_mesh`` as :func:`parallelize_tiny_gpt` shards a whole
    model's, in place: the first stage's embeddings, the last stage's norm and tied output layer
    replicated; a later stage takes the residual stream (the same on every rank of the group) as a
    replicated DTensor; every stage returns an ordinary tensor, which the pipeline sends on."""
    _parallelize_blocks([cast(Block, block) for block in stage.blocks.values()], tp_mesh)  # Blocks only
    if stage.is_first:
        for embedding in (stage.token_embedding, stage.position_embedding):
            distribute_module(embedding, tp_mesh, input_fn=_replicated_inputs)  # type: ignore[arg-type]
    inputs = None if stage.is_first else _replicated_inputs
    distribute_module(stage, tp_mesh, input_fn=inputs, output_fn=_local_output)  # type: ignore[arg-type]
    return stage


def _parallelize_blocks(blocks: list[Block], tp_mesh: DeviceMesh) -> None:
    """Megatron's layout on each block, its qkv rows first regrouped head-wise (:func:`qkv_row_order`)."""
    if tp_mesh.ndim != 1:
        raise ValueError(f"tp_mesh must be one-dimensional, got a mesh of shape {tuple(tp_mesh.shape)}")
    tp = tp_mesh.size()
    n_head = blocks[0].attention.n_head
    if n_head % tp:
        raise ValueError(f"n_head must be a multiple of the tensor-parallel degree, got n_head={n_head}, tp={tp}")
    for block in blocks:
        attention = block.attention
        order = qkv_row_order(attention.qkv.in_features, tp)
        with torch.no_grad():
            attention.qkv.weight.copy_(attention.qkv.weight[order])
            attention.qkv.bias.copy_(attention.qkv.bias[order])
        parallelize_module(block, tp_mesh, {
            "attention.qkv": ColwiseParallel(),
            "attention.proj": RowwiseParallel(use_local_output=False),
            "mlp.0": ColwiseParallel(),
            "mlp.2": RowwiseParallel(use_local_output=False),
        })


def _replicated_inputs(module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
    """The same tensor on every rank, as a replicated DTensor (no communication)."""
    return tuple(DTensor.from_local(x, mesh, [Replicate()], run_check=False) for x in inputs)


def _local_output(module: nn.Module, output: DTensor, mesh: DeviceMesh) -> torch.Tensor:
    return output.to_local()
