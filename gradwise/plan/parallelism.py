r"""3-D parallelism: a transformer's bytes per device on a ``(pp, dp, tp)`` mesh.

Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using
Megatron-LM" (arXiv:2104.04473): :math:`p` pipeline stages, each a run of :math:`L/p`
consecutive layers (the first stage also holds the token and position embeddings, the last the
final LayerNorm and a copy of the tied output layer); each stage's matrices split over :math:`t`
tensor-parallel ranks in Megatron's layout (Shoeybi et al. 2019, arXiv:1909.08053); :math:`d`
data-parallel replicas of the whole: :math:`p d t` devices.

**Parameters.** In a layer of width :math:`h` the QKV and first MLP projections are split by
output rows (weights and biases), the attention output and second MLP projections by input
columns (their biases whole), the four LayerNorm vectors whole: :math:`12h^2/t + 7h/t + 6h` per
device. The embeddings (:math:`V h` tokens, :math:`s h` positions), the final LayerNorm and the
output layer's copy stay whole on every rank of the group, as gradwise lays out tiny-gpt
(:mod:`gradwise.problems.tiny_gpt_tensor_parallel`; Megatron splits the vocabulary instead).
Without parallelism the model has Narayanan's :math:`P = 12lh^2(1 + 13/(12h) + (V + s)/(12lh))`
parameters plus the final LayerNorm's :math:`2h` (his count leaves it out).

**Over the data dimension.** ZeRO stages 1 and 2 shard as :func:`gradwise.plan.memory.estimate_memory`
does (ZeRO's model: :math:`1/d` of the sharded kinds). Stage 3 is FSDP2, the data dimension of
gradwise's ``3d`` strategy: every tensor of a device is cut along dim 0 into :math:`d` chunks and
data rank :math:`r` keeps rows :math:`[r\lceil n/d\rceil, (r+1)\lceil n/d\rceil)`, so these are
the bytes of the real shards (rank 0 holds the most) and the optimizer state follows each
shard's shape. As in ZeRO's figures, the parameters FSDP gathers for the step are not counted.

**Activations.** Per layer and micro-batch, Korthikanti et al. 2022 (arXiv:2205.05198):
:func:`gradwise.plan.memory.layer_activation_bytes` (its tensor-parallel form, or with sequence
parallelism). A stage keeps its layers' activations for every micro-batch in flight at its peak
(the embeddings' and the logits' activations are not counted):

* GPipe (Huang et al. 2019, arXiv:1811.06965): all :math:`m`.
* 1F1B (PipeDream-Flush; Narayanan et al. 2021, section 2.2.1): stage :math:`i` (from 0) runs
  :math:`p - i - 1` forward passes before its first backward, so it holds :math:`\min(p - i, m)`;
  the first stage :math:`p` micro-batches of :math:`L/p` layers: :math:`L` layers' activations
  whatever :math:`p` (Korthikanti et al., section 4.3).
* Interleaved 1F1B with :math:`v` chunks per device (Narayanan et al., section 2.2.2): device
  :math:`i` holds chunks :math:`i, i + p, \dots` of :math:`L/(pv)` layers and runs
  :math:`2(p - i - 1) + (v - 1)p` forward chunks before its first backward (Megatron's warm-up),
  so it holds :math:`\min(vp + p - 1 - 2i, vm)` chunks: on the first device
  :math:`L(1 + (p - 1)/(pv))` layers' activations (Korthikanti et al., section 4.3).

**The pipeline bubble.** With :math:`m` micro-batches of time :math:`t` per stage, a GPipe or 1F1B
step takes :math:`(m + p - 1)t` of which :math:`(p - 1)t` idle: the fraction
:math:`(p - 1)/(m + p - 1)` (Narayanan et al.'s :math:`(p - 1)/m` of the ideal time). Interleaving
:math:`v` chunks shrinks the idle time :math:`v`-fold: :math:`(p - 1)/(vm + p - 1)`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

from gradwise.plan.memory import (
    PRECISIONS,
    MemoryEstimate,
    Shapes,
    estimate_memory,
    layer_activation_bytes,
    merge_shapes,
    parameter_count,
    transformer_shapes,
)
from gradwise.validation import check_bool, check_choice, check_int

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b")
"""GPipe (all forwards, then all backwards), 1F1B (PipeDream-Flush) and Megatron's interleaved 1F1B."""


@dataclass(frozen=True)
class Transformer:
    """A GPT-2-style decoder (tiny-gpt's, Megatron's GPT): ``layers`` blocks of ``width`` with
    ``heads`` attention heads and a 4x MLP, a ``vocab``-row token embedding tied with the output
    layer, learned position embeddings for ``seq_len`` tokens, a final LayerNorm."""

    layers: int
    width: int
    heads: int
    vocab: int
    seq_len: int

    def __post_init__(self) -> None:
        for name in ("layers", "width", "heads", "vocab", "seq_len"):
            check_int(name, getattr(self, name), 1)
        if self.width % self.heads:
            raise ValueError(f"width must be a multiple of heads, got width={self.width}, heads={self.heads}")

    def shapes(self) -> Shapes:
        """The whole model's parameter shapes (the tied matrix once)."""
        return transformer_shapes(self.layers, self.width, self.vocab, self.seq_len)

    def parameter_count(self) -> int:
        return parameter_count(self.shapes())


@dataclass(frozen=True)
class Layout:
    """How a step runs on a ``(pp, dp, tp)`` mesh: ``microbatches`` per step through the
    pipeline's ``schedule`` (``virtual_stages`` chunks per device when interleaved), sequence
    parallelism or not (activations only)."""

    pp: int = 1
    dp: int = 1
    tp: int = 1
    microbatches: int = 1
    schedule: str = "1f1b"
    virtual_stages: int = 1
    sequence_parallel: bool = False

    def __post_init__(self) -> None:
        for name in ("pp", "dp", "tp", "microbatches", "virtual_stages"):
            check_int(name, getattr(self, name), 1)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_bool("sequence_parallel", self.sequence_parallel)
        interleaved = self.schedule == "interleaved-1f1b"
        if interleaved != (self.virtual_stages > 1):
            raise ValueError(f"virtual_stages > 1 goes with the interleaved-1f1b schedule and it needs them, got "
                             f"schedule={self.schedule!r}, virtual_stages={self.virtual_stages}")
        if interleaved and (self.pp < 2 or self.microbatches % self.pp):
            raise ValueError(f"interleaved-1f1b needs pp >= 2 and microbatches a multiple of pp (Megatron's rule), "
                             f"got pp={self.pp}, microbatches={self.microbatches}")

    @property
    def devices(self) -> int:
        return self.pp * self.dp * self.tp

    def check(self, model: Transformer) -> None:
        """Raise ``ValueError`` unless ``model`` splits evenly: heads and width over ``tp``,
        layers over ``pp`` stages of ``virtual_stages`` chunks."""
        if model.heads % self.tp or model.width % self.tp:
            raise ValueError(f"heads and width must be multiples of tp, got heads={model.heads}, "
                             f"width={model.width}, tp={self.tp}")
        if model.layers % (self.pp * self.virtual_stages):
            raise ValueError(f"layers must be a multiple of pp x virtual_stages, got layers={model.layers}, "
                             f"pp={self.pp}, virtual_stages={self.virtual_stages}")

    def check_stage(self, stage: int) -> int:
        return check_int("stage", stage, 0, self.pp - 1)


def bubble_fraction(pp: int, microbatches: int, virtual_stages: int = 1) -> float:
    """The idle share of a pipeline's step: ``(p - 1) / (v m + p - 1)``."""
    for name, value in (("pp", pp), ("microbatches", microbatches), ("virtual_stages", virtual_stages)):
        check_int(name, value, 1)
    return (pp - 1) / (virtual_stages * microbatches + pp - 1)


def layer_shapes(model: Transformer, tp: int) -> Shapes:
    """One layer's parameters on one rank of a ``tp`` group (Megatron's layout)."""
    h = model.width
    return merge_shapes([
        ((h,), 4),  # the two LayerNorms, whole
        ((3 * h // tp, h), 1), ((3 * h // tp,), 1),  # QKV, split by rows
        ((h, h // tp), 1), ((h,), 1),  # attention output, split by columns; its bias whole
        ((4 * h // tp, h), 1), ((4 * h // tp,), 1),  # first MLP projection, by rows
        ((h, 4 * h // tp), 1), ((h,), 1),  # second MLP projection, by columns; its bias whole
    ])


def stage_shapes(model: Transformer, layout: Layout, stage: int) -> Shapes:
    """The parameter shapes on one device of pipeline ``stage`` before data sharding."""
    layout.check(model)
    layout.check_stage(stage)
    per_stage = model.layers // layout.pp
    shapes = [(shape, count * per_stage) for shape, count in layer_shapes(model, layout.tp)]
    if stage == 0:
        shapes += [((model.vocab, model.width), 1), ((model.seq_len, model.width), 1)]
    if stage == layout.pp - 1:
        shapes.append(((model.width,), 2))  # the final LayerNorm
        if layout.pp > 1:  # the tied output layer's copy (one tensor with the embedding on a single stage)
            shapes.append(((model.vocab, model.width), 1))
    return merge_shapes(shapes)


def stage_units(model: Transformer, layout: Layout, stage: int) -> list[Shapes]:
    """The FSDP units of ``stage``: each layer its own, then the rest (embeddings, final norm,
    output layer), which the stage's root module holds; the root is left out when it holds nothing."""
    whole = dict(stage_shapes(model, layout, stage))
    layer = layer_shapes(model, layout.tp)
    units = [layer] * (model.layers // layout.pp)
    for shape, count in layer:
        whole[shape] -= count * len(units)
    root = [(shape, count) for shape, count in whole.items() if count]
    return units + ([root] if root else [])


def data_shard(shapes: Shapes, dp: int, rank: int = 0) -> Shapes:
    """Data rank ``rank``'s part of every tensor under FSDP2: dim 0 cut into chunks of
    ``ceil(n / dp)`` rows, the last ones shorter or empty."""
    check_int("dp", dp, 1)
    check_int("rank", rank, 0, dp - 1)
    shards = []
    for shape, count in shapes:
        chunk = math.ceil(shape[0] / dp)
        rows = max(0, min(chunk, shape[0] - rank * chunk))
        shards.append(((rows, *shape[1:]), count))
    return merge_shapes(shards)


def layers_in_flight(model: Transformer, layout: Layout, stage: int) -> int:
    """Layer activations (one layer, one micro-batch each) that ``stage`` holds at its peak."""
    layout.check(model)
    layout.check_stage(stage)
    p, m, v = layout.pp, layout.microbatches, layout.virtual_stages
    if layout.schedule == "gpipe":
        return model.layers // p * m
    if layout.schedule == "1f1b":
        return model.layers // p * min(p - stage, m)
    return model.layers // (p * v) * min(v * p + p - 1 - 2 * stage, v * m)


def stage_activation_bytes(model: Transformer, layout: Layout, stage: int, micro_batch: int = 1,
                           activation_bytes: int = 2, checkpointing: bool = False) -> int:
    """Activation bytes on one device of ``stage`` at its peak: :func:`layers_in_flight` times one
    layer's (:func:`gradwise.plan.memory.layer_activation_bytes`); with full checkpointing each of
    them keeps only its input (``sbh`` values, split by sequence parallelism), plus one layer's
    activations while it is recomputed."""
    check_int("micro_batch", micro_batch, 1)
    sets = layers_in_flight(model, layout, stage)
    per_layer = layer_activation_bytes(model.width, model.heads, model.seq_len, micro_batch, activation_bytes,
                                       layout.tp, layout.sequence_parallel)
    if not checkpointing:
        return sets * per_layer
    layer_input = model.seq_len * micro_batch * model.width * activation_bytes
    return sets * (layer_input // layout.tp if layout.sequence_parallel else layer_input) + per_layer


def stage_memory(
    model: Transformer,
    layout: Layout,
    stage: int,
    optimizer: str = "adamw",
    precision: str = "bf16",
    zero_stage: int = 0,
    state_format: str = "fp32",
    micro_batch: int = 1,
    checkpointing: bool = False,
    dp_rank: int = 0,
    tp_rank: int = 0,
) -> MemoryEstimate:
    """Bytes on the device of pipeline ``stage``, data rank ``dp_rank`` and tensor rank ``tp_rank``,
    by kind. Under ZeRO stage 3 (FSDP2) the bytes of that rank's shards; under stages 1-2 ZeRO's
    average over the ``dp`` ranks (``dp_rank`` unused). The tensor ranks hold the same bytes, but for
    an optimizer that updates whole matrices, whose state under FSDP2 or tensor parallelism alone lies
    with each matrix's owner (:func:`gradwise.plan.owner_computes.stage_state_bytes`)."""
    fmt = PRECISIONS[check_choice("precision", precision, PRECISIONS)]
    check_choice("zero_stage", zero_stage, (0, 1, 2, 3))
    check_int("dp_rank", dp_rank, 0, layout.dp - 1)
    check_int("tp_rank", tp_rank, 0, layout.tp - 1)
    shapes = stage_shapes(model, layout, stage)
    activations = stage_activation_bytes(model, layout, stage, micro_batch, fmt.activation_bytes, checkpointing)
    if zero_stage == 3:
        shard = data_shard(shapes, layout.dp, dp_rank)
        estimate = estimate_memory(shard, optimizer, precision, 0, 1, activations, state_format)
    else:
        estimate = estimate_memory(shapes, optimizer, precision, zero_stage, layout.dp, activations, state_format)
    states = _owned_state(model, layout, stage, optimizer, precision, zero_stage, state_format)
    if states is not None:
        return dataclasses.replace(estimate, optimizer_state=float(states[(dp_rank, tp_rank)]))
    return estimate


def _owned_state(model: Transformer, layout: Layout, stage: int, optimizer: str, precision: str, zero_stage: int,
                 state_format: str) -> Mapping[tuple[int, int], int] | None:
    """Every device's optimizer-state bytes where the stage's parameters are DTensors (FSDP2, or tensor
    parallelism alone) and ``optimizer`` updates whole matrices; ``None`` otherwise."""
    if zero_stage != 3 and layout.dp > 1:
        return None
    from gradwise.plan.owner_computes import stage_state_bytes  # here: that module imports this one

    return stage_state_bytes(optimizer, model, layout, stage, PRECISIONS[precision].state_bytes, state_format)


def largest_device(
    model: Transformer,
    layout: Layout,
    stage: int,
    optimizer: str = "adamw",
    precision: str = "bf16",
    zero_stage: int = 0,
    state_format: str = "fp32",
    micro_batch: int = 1,
    checkpointing: bool = False,
) -> MemoryEstimate:
    """The bytes of the device of pipeline ``stage`` that holds the most (the first of equals): data
    rank 0, whose FSDP2 shards are the largest (``torch.chunk``'s cut), or, for an optimizer that
    updates whole matrices, whichever device adds the most owned state to its shards."""
    def device(dp_rank: int, tp_rank: int) -> MemoryEstimate:
        return stage_memory(model, layout, stage, optimizer, precision, zero_stage, state_format, micro_batch,
                            checkpointing, dp_rank, tp_rank)

    states = _owned_state(model, layout, stage, optimizer, precision, zero_stage, state_format)
    if states is None:
        return device(0, 0)
    # each data rank's shards are the same on its tensor ranks: its tensor rank with the most state
    candidates = []
    for d in range(layout.dp):
        tp_rank = max(range(layout.tp), key=lambda t: states[(d, t)])  # noqa: B023 (used at once)
        candidates.append(device(d, tp_rank))
    return max(candidates, key=lambda estimate: estimate.total)


def largest_stage(estimates: list[MemoryEstimate]) -> int:
    """The stage whose device needs the most bytes (the first of equals): the one that must fit."""
    return max(range(len(estimates)), key=lambda stage: (estimates[stage].total, -stage))
