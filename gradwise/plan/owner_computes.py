r"""Owner-computes: each rank's optimizer state, compute and traffic for a whole-matrix optimizer.

A whole-matrix optimizer (Muon, Shampoo, SOAP, Adafactor, PSGD-Kron: its update runs per matrix
and its description says ``sharding="tensor"``) on parameters sharded over a 1-D mesh of :math:`N`
ranks (FSDP2 by rows; tensor parallelism by rows or columns, some tensors replicated) steps each
sharded matrix on one rank (:mod:`gradwise.optim.owner_computes`). The
planner replays that rule on the parameters of a model, param group by param group as the optimizer
sees them (the groups :func:`gradwise.optim.param_groups.training_param_groups` gives a training
run, on the meta device for a model that exists only as shapes), with the library's own
:func:`~gradwise.optim.owner_computes.assign_owners`,
:func:`~gradwise.optim.owner_computes.matrix_cost` and
:func:`~gradwise.optim.owner_computes.chunk_bounds`. For rank :math:`r`, a whole-matrix group of
tensors :math:`i` with owners :math:`o_i`, :math:`n_i` elements and :math:`s_i(r)` of them in
rank :math:`r`'s shard (the slices of the sharded dimension :func:`chunk_bounds` gives it):

* **state**: :math:`\sum_{o_i = r} S(\text{shape}_i)`, the whole state of the tensors it owns by the
  optimizer's own rule (:attr:`gradwise.optim.description.Description.state`), plus, for the
  element-wise groups (Muon's embeddings, head, biases and gains, stepped by its AdamW), the rule
  on its shards' shapes: :math:`1/N` of their state, to a row; a replicated tensor's whole state on
  every rank, which also computes its update;
* **compute**: Muon's Newton-Schulz or Polar Express iteration of :math:`k` steps on a batch of
  :math:`b` matrices of :math:`m \times n`, :math:`m \le n` (the wide orientation it runs on), costs
  per step the Gram matrix :math:`A = XX^\top` (:math:`2m^2n` FLOPs), :math:`bA + cA^2` (one
  :math:`m \times m` product, :math:`2m^3`) and its product with :math:`X` (:math:`2m^2n`):

  .. math:: F = b\,k\,(4m^2n + 2m^3),

  the matrix products that ``torch.utils.flop_counter.FlopCounterMode`` counts (the momentum's and
  the normalisation's element-wise work is not counted there, nor here). Rank :math:`r` computes
  :math:`\sum_{o_i = r} F_i`. The other optimizers' compute is not modelled: their matrix roots and
  eigenbases (``eigh``) are not counted by ``FlopCounterMode``, so no count here could be checked;
  :func:`matrix_cost`'s load, by which the owners are balanced, is given instead;
* **bytes on the wire**: one ``all_to_all_single`` gathers the parameter and gradient shards to
  the owners, one sends the updated shards back (per whole-matrix group), so rank :math:`r` sends

  .. math:: \sum_{o_i \ne r} s_i(r)(w + g) + \sum_{o_i = r} (n_i - s_i(r))\,w

  bytes, with :math:`w, g` the bytes of a sharded parameter's and gradient's element: ``TrafficMeter``'s
  "all-to-all" payload. Timed with the alpha-beta model, each exchange costs :math:`(N-1)` messages.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, cast

import torch
from torch import Tensor, nn

from gradwise.optim import Muon
from gradwise.optim.base import GradwiseOptimizer
from gradwise.optim.description import description_of, presets
from gradwise.optim.muon import matrix_shape
from gradwise.optim.owner_computes import assign_owners, chunk_bounds, matrix_cost
from gradwise.optim.param_groups import training_param_groups
from gradwise.plan.communication import AlphaBeta
from gradwise.plan.memory import PRECISIONS, Shapes
from gradwise.plan.parallelism import Layout, Transformer
from gradwise.problems.tiny_gpt import Block, TinyGPT
from gradwise.validation import check_choice, check_int


def muon_update_flops(shape: tuple[int, ...], group: Mapping[str, Any]) -> int:
    """FLOPs of Muon's orthogonalisation of a parameter of ``shape`` under ``group``'s ``ns_steps``:
    :math:`b\\,k\\,(4m^2n + 2m^3)` on its :func:`~gradwise.optim.muon.matrix_shape` batch of
    ``m x n`` matrices, ``m <= n`` (see the module)."""
    batch, rows, cols = matrix_shape(torch.empty(shape, device="meta"))
    m, n = min(rows, cols), max(rows, cols)
    return batch * group["ns_steps"] * (4 * m * m * n + 2 * m**3)


UPDATE_FLOPS: dict[type, Callable[[tuple[int, ...], Mapping[str, Any]], int]] = {Muon: muon_update_flops}
"""The optimizers whose whole-matrix update's FLOPs are modelled (and checked against ``FlopCounterMode``)."""


@dataclass(frozen=True)
class RankLoad:
    """One rank's share of the optimizer step under owner-computes."""

    state_bytes: int  # whole state of its matrices, plus its shards' element-wise state
    matrices: int  # the whole-matrix tensors it owns
    cost: float  # their matrix_cost, the owners' balance
    flops: int | None  # their update's FLOPs; None where the optimizer's are not modelled
    sent_bytes: int  # all-to-all payload per step

    def as_dict(self) -> dict[str, Any]:
        return {"state_bytes": self.state_bytes, "matrices": self.matrices, "cost": self.cost, "flops": self.flops,
                "sent_bytes": self.sent_bytes}


@dataclass(frozen=True)
class OwnerComputes:
    """Every rank's load under owner-computes, and the ``all_to_all_single`` calls per step."""

    optimizer: str
    ranks: tuple[RankLoad, ...]
    exchanges: int

    @property
    def most_loaded(self) -> int:
        """The rank that holds the most state (the first of equals): the one that must fit."""
        return max(range(len(self.ranks)), key=lambda rank: (self.ranks[rank].state_bytes, -rank))

    @property
    def state_spread(self) -> float:
        """The most loaded rank's state over the mean rank's: 1 when the matrices split evenly."""
        mean = sum(rank.state_bytes for rank in self.ranks) / len(self.ranks)
        return self.ranks[self.most_loaded].state_bytes / mean if mean else 1.0

    @property
    def flops_modelled(self) -> bool:
        return all(rank.flops is not None for rank in self.ranks)

    def update_seconds(self, throughput: float) -> float | None:
        """The most loaded rank's update at ``throughput`` FLOP/s; ``None`` where the FLOPs are not modelled."""
        flops = [rank.flops for rank in self.ranks if rank.flops is not None]
        return max(flops) / throughput if len(flops) == len(self.ranks) else None

    def exchange_seconds(self, link: AlphaBeta) -> float:
        """The slowest rank's time in the exchanges of a step on ``link``: each ``all_to_all_single``
        :math:`N - 1` messages (one to each other rank), and the bytes it sends."""
        messages = self.exchanges * (len(self.ranks) - 1)
        return max(messages * link.alpha + rank.sent_bytes * link.beta for rank in self.ranks)

    def as_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer, "ranks": len(self.ranks), "exchanges_per_step": self.exchanges,
                "most_loaded_rank": self.most_loaded, "state_spread": self.state_spread,
                "flops_modelled": self.flops_modelled, "per_rank": [rank.as_dict() for rank in self.ranks]}


def sharded_element_bytes(precision: str) -> int:
    """Bytes of an element of the parameters and gradients the optimizer steps under FSDP2 in
    ``precision``: the sharded parameters are the master copy where there is one (FSDP2's mixed
    precision computes in the low format and keeps the shards in fp32), and a shard's gradient comes
    in its parameter's dtype; otherwise the weights' format."""
    fmt = PRECISIONS[check_choice("precision", precision, PRECISIONS)]
    return max(fmt.master_bytes, fmt.weight_bytes)


def tensor_parallel_dims(model: nn.Module) -> Callable[[Tensor], int | None]:
    """The dimension gradwise's tensor parallelism cuts each parameter of a tiny-gpt-shaped ``model``
    along (Megatron's layout, :func:`gradwise.problems.tiny_gpt_tensor_parallel.parallelize_tiny_gpt`):
    in every block the column-wise Linears (the QKV projection, the MLP's first) by output rows, weight
    and bias (0), the row-wise ones (the attention's output, the MLP's second) their weight by input
    columns (1); everything else (their biases, the norms, the embeddings) replicated (``None``)."""
    dims: dict[Tensor, int] = {}
    for columns, rows in _tensor_parallel_linears(model):
        for linear in columns:
            dims[linear.weight] = dims[linear.bias] = 0
        for linear in rows:
            dims[linear.weight] = 1
    return dims.get


def _tensor_parallel_linears(model: nn.Module) -> Iterator[tuple[tuple[nn.Linear, ...], tuple[nn.Linear, ...]]]:
    """Each tiny-gpt block's column-wise Linears (QKV, the MLP's first) and row-wise ones (the
    attention's output, the MLP's second): the modules Megatron's layout makes DTensors of, the
    row-wise biases replicated ones."""
    for block in (module for module in model.modules() if isinstance(module, Block)):
        expand, contract = cast(nn.Linear, block.mlp[0]), cast(nn.Linear, block.mlp[2])
        yield (block.attention.qkv, expand), (block.attention.proj, contract)


def _training_optimizer(optimizer: str, model: nn.Module, state_format: str) -> tuple[Any, Any, list[bool]] | None:
    """The preset ``optimizer`` built as a training run builds it on ``model``'s parameters, its
    description, and for each param group whether its update is per matrix; ``None`` for an optimizer
    that does not update whole matrices or that ``gradwise train`` does not build. Raises ``ValueError``
    for a state format on the whole-matrix groups (the optimizer refuses it on sharded parameters)."""
    table = presets()
    if optimizer not in table or table[optimizer][1].train is None:
        return None
    optimizer_class, preset = table[optimizer]
    description = description_of(optimizer_class)
    if description.sharding != "tensor":  # element-wise, or K-FAC's layers (refused on sharded parameters)
        return None
    settings = {**preset.train_options(), **({"state_format": state_format} if state_format != "fp32" else {})}
    built = optimizer_class(training_param_groups(optimizer_class, model, 0.1), lr=1e-3, **settings)
    whole = [isinstance(built, GradwiseOptimizer) and built._updates_matrices(group) for group in built.param_groups]
    if not any(whole):
        return None
    if any(group.get("state_format", "fp32") != "fp32" for group, per_matrix in zip(built.param_groups, whole)
           if per_matrix):
        raise ValueError(f"optimizer {optimizer!r} keeps its moments in blocks that would cross the shards: "
                         "refused on FSDP2's sharded parameters (state_format must be fp32)")
    return built, description, whole


def meta_transformer(layers: int, width: int, vocab: int, positions: int = 0) -> nn.Module:
    """The GPT of :func:`gradwise.plan.memory.transformer_shapes` on the meta device, as tiny-gpt lays
    it out (token and position embeddings, its blocks, a final LayerNorm), for the optimizer's groups."""
    with torch.device("meta"):
        model = nn.Module()
        model.token_embedding = nn.Embedding(vocab, width)
        if positions:
            model.position_embedding = nn.Embedding(positions, width)
        model.blocks = nn.ModuleList(Block(width, 1, layers) for _ in range(layers))
        model.norm = nn.LayerNorm(width)
    return model


def meta_tensors(shapes: Shapes) -> nn.Module:
    """Tensors of ``shapes`` on the meta device, as the parameters of one module."""
    model = nn.Module()
    for index, param in enumerate(torch.empty(shape, device="meta") for shape, count in shapes for _ in range(count)):
        model.register_parameter(f"p{index}", nn.Parameter(param))
    return model


def owner_computes(optimizer: str, model: nn.Module, ranks: int, param_bytes: int = 4, grad_bytes: int = 4,
                   state_bytes: int = 4, state_format: str = "fp32",
                   shard_dim: Callable[[Tensor], int | None] | None = None) -> OwnerComputes | None:
    """Each of ``ranks`` ranks' state, FLOPs and bytes sent when ``model``'s parameters are sharded over
    a 1-D mesh and the preset ``optimizer`` (its training options, on the param groups a run gives it:
    :func:`gradwise.optim.param_groups.training_param_groups`) steps them by owner-computes (see the
    module). ``shard_dim(param)``: the dimension a parameter is cut along, ``None`` for a replicated
    one (whole on every rank, which steps it and keeps its state); by default 0 for all, FSDP2's rows
    (:func:`tensor_parallel_dims`: tensor parallelism's).
    ``param_bytes``, ``grad_bytes``: a sharded parameter's and gradient's element
    (:func:`sharded_element_bytes`); ``state_bytes``: a state value's; ``state_format``: the moments'
    (:mod:`gradwise.optim.state_formats`). Raises ``ValueError`` for a state format whose blocks would
    cross the shards (the optimizer refuses it). ``None`` where a run would not use owner-computes: an
    optimizer whose update is not per matrix (its state shards element by element, as ZeRO's model has
    it), or one that ``gradwise train`` does not build."""
    check_int("ranks", ranks, 1)
    training = _training_optimizer(optimizer, model, state_format)
    if training is None:
        return None
    built, description, whole = training
    whole_groups = [group for group, per_matrix in zip(built.param_groups, whole) if per_matrix]
    flops_of = UPDATE_FLOPS.get(type(built))
    dim_of = shard_dim or (lambda param: 0)
    state = [0] * ranks
    matrices = [0] * ranks
    cost = [0.0] * ranks
    flops = [0] * ranks
    sent = [0] * ranks
    for group, per_matrix in zip(built.param_groups, whole):
        params = [param for param in group["params"] if param.numel() > 0]
        for param in params:  # replicated: whole on every rank, which steps it and keeps its state
            if dim_of(param) is None:
                shape = tuple(param.shape)
                for rank in range(ranks):
                    state[rank] += description.state(shape, group).bytes(state_bytes)
                    flops[rank] += flops_of(shape, group) if flops_of and per_matrix else 0
        sharded = [(tuple(param.shape), dim) for param in params if (dim := dim_of(param)) is not None]
        bounds = [chunk_bounds(shape[dim], ranks) for shape, dim in sharded]
        if not per_matrix:  # element-wise: each rank its shard's state
            for (shape, dim), cuts in zip(sharded, bounds):
                for rank, (start, stop) in enumerate(cuts):
                    shard = (*shape[:dim], stop - start, *shape[dim + 1:])
                    state[rank] += description.state(shard, group).bytes(state_bytes)
            continue
        owners = assign_owners([matrix_cost(shape) for shape, _ in sharded], ranks)
        for (shape, dim), cuts, owner in zip(sharded, bounds, owners):
            per_slice = math.prod(shape) // shape[dim]  # elements per index of the sharded dim
            state[owner] += description.state(shape, group).bytes(state_bytes)
            matrices[owner] += 1
            cost[owner] += matrix_cost(shape)
            flops[owner] += flops_of(shape, group) if flops_of else 0
            for rank, (start, stop) in enumerate(cuts):
                shard = (stop - start) * per_slice
                sent[rank] += shard * (param_bytes + grad_bytes) if rank != owner else (
                    (math.prod(shape) - shard) * param_bytes)
    loads = tuple(RankLoad(state[r], matrices[r], cost[r], flops[r] if flops_of else None, sent[r])
                  for r in range(ranks))
    return OwnerComputes(optimizer, loads, 2 * len(whole_groups))


def meta_stage(model: Transformer, layout: Layout, stage: int) -> nn.Module:
    """Pipeline ``stage`` of ``model`` on the meta device, cut as the ``3d`` strategy cuts tiny-gpt
    (:class:`gradwise.problems.tiny_gpt_pipeline.TinyGPTStage`: its blocks, the embeddings on the first,
    the final norm and the tied output layer's copy on the last); interleaved, its chunks in a list; the
    whole model for one stage."""
    from gradwise.problems.tiny_gpt_pipeline import TinyGPTStage

    layout.check(model)
    layout.check_stage(stage)
    gpt = _meta_gpt(model)
    if layout.pp == 1:
        return gpt  # the whole model, the output layer tied to the embedding itself
    chunks, per_chunk = layout.pp * layout.virtual_stages, model.layers // (layout.pp * layout.virtual_stages)
    stages = [TinyGPTStage(gpt, index * per_chunk, (index + 1) * per_chunk, index == 0, index == chunks - 1)
              for index in range(stage, chunks, layout.pp)]
    return stages[0] if len(stages) == 1 else nn.ModuleList(stages)


@functools.lru_cache(maxsize=4)  # the stages of one model cut from one build (a large model's takes a second)
def _meta_gpt(model: Transformer) -> TinyGPT:
    """tiny-gpt of ``model``'s shape on the meta device, with ``model``'s vocabulary."""
    with torch.device("meta"):
        gpt = TinyGPT(model.seq_len, model.width, model.layers, model.heads)
        gpt.token_embedding = nn.Embedding(model.vocab, model.width)
    return gpt


@functools.lru_cache(maxsize=32)  # a planner asks for every device of a stage: one optimizer built per stage
def stage_state_bytes(optimizer: str, model: Transformer, layout: Layout, stage: int, state_bytes: int = 4,
                      state_format: str = "fp32") -> Mapping[tuple[int, int], int] | None:
    """Optimizer-state bytes of every device ``(dp_rank, tp_rank)`` of pipeline ``stage`` under the
    ``3d`` strategy (FSDP2 over ``dp``, Megatron's layout over ``tp``) for the preset ``optimizer`` whose
    update is per matrix; ``None`` for one whose is not (its state shards as the parameters do).

    Per parameter, as :mod:`gradwise.optim.owner_computes` steps it: in an element-wise group, the
    state of the device's shard (the tensor-parallel cut, then FSDP2's rows); in a whole-matrix group,
    a plain tensor's whole state on every device; a DTensor on a 1-D mesh (FSDP2 alone, or tensor
    parallelism alone) on its owner among that mesh's ranks, replicated ones on every rank; a DTensor
    on the 2-D mesh (a tensor-parallel matrix sharded by FSDP2 as well) gathered whole and its whole
    state kept on every device."""
    module = meta_stage(model, layout, stage)
    training = _training_optimizer(optimizer, module, state_format)
    if training is None:
        return None
    built, description, whole = training
    dp, tp = layout.dp, layout.tp
    parallel: dict[Tensor, int | None] = {}  # tensor-parallel parameters: their cut dimension (None: replicated)
    if tp > 1:
        cut = tensor_parallel_dims(module)
        parallel = {param: cut(param) for pair in _tensor_parallel_linears(module) for linears in pair
                    for linear in linears for param in (linear.weight, linear.bias)}
    devices = [(d, t) for d in range(dp) for t in range(tp)]
    state = dict.fromkeys(devices, 0)

    def shards(shape: tuple[int, ...], param: Tensor) -> dict[tuple[int, int], tuple[int, ...]]:
        """Every device's shard of ``param``: the tensor-parallel cut, then FSDP2's rows."""
        dim = parallel.get(param)
        cut = ([(*shape[:dim], stop - start, *shape[dim + 1:]) for start, stop in chunk_bounds(shape[dim], tp)]
               if dim is not None else [shape] * tp)
        rows = [[(stop - start, *local[1:]) for start, stop in chunk_bounds(local[0], dp)] if dp > 1 else [local]
                for local in cut]
        return {(d, t): rows[t][d] for d, t in devices}

    for group, per_matrix in zip(built.param_groups, whole):
        owned: list[Tensor] = []  # the group's matrices on a 1-D sharded mesh, in the optimizer's order

        @functools.cache
        def bytes_of(shape: tuple[int, ...], group: dict = group) -> int:  # a few shard shapes, many devices
            return description.state(shape, group).bytes(state_bytes)

        for param in group["params"]:
            shape = tuple(param.shape)
            # a DTensor over dp alone, or over tp alone and cut there (not a replicated bias): owner-computes
            one_d_sharded = (param not in parallel) if dp > 1 else parallel.get(param) is not None
            if not per_matrix:
                for device, local in shards(shape, param).items():
                    state[device] += bytes_of(local)
            elif not one_d_sharded:  # plain, replicated, or 2-D: whole on every device
                for device in devices:
                    state[device] += bytes_of(shape)
            elif param.numel() > 0:
                owned.append(param)
        ranks = dp if dp > 1 else tp
        for param, owner in zip(owned, assign_owners([matrix_cost(tuple(p.shape)) for p in owned], ranks)):
            for d, t in devices:
                if (d if dp > 1 else t) == owner:
                    state[(d, t)] += bytes_of(tuple(param.shape))
    return MappingProxyType(state)
