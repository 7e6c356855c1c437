r"""Step time of 3-D parallel training: compute, the pipeline bubble and each mesh dimension's traffic.

The layout is :mod:`gradwise.plan.parallelism`'s (Narayanan et al. 2021, arXiv:2104.04473):
:math:`p` stages of :math:`L/p` layers, each split over :math:`t` tensor-parallel ranks, :math:`d`
data-parallel replicas; a step of :math:`B` sequences of :math:`s` tokens runs as :math:`m`
micro-batches of :math:`b = B/(dm)` sequences per replica.

**Compute** (Narayanan et al., section 5.1 and appendix): one layer's forward pass on :math:`b`
sequences costs :math:`24bsh^2 + 4bs^2h` FLOPs (the matrix products and the attention's scores
and weighted values), the backward pass twice that: :math:`72bsh^2(1 + s/(6h))` per layer,
:math:`96bsh^2(1 + s/(6h))` with full activation checkpointing (a second forward pass); the
logits :math:`6bshV`. A step then costs the paper's
:math:`F = 96Bslh^2(1 + s/(6h) + V/(16lh))` with checkpointing. A device computes its stage's
layers split over :math:`t` and, on the last stage, the whole logits (gradwise keeps the output
layer whole on every tensor rank), at :math:`R` FLOP/s.

**The pipeline.** A micro-batch's slot on a stage is its compute, its tensor-parallel
all-reduces, its two sends (activations forward, their gradient backward; :math:`2v` with :math:`v`
interleaved chunks), the all-gathers FSDP2 repeats for every micro-batch (below) and ``overhead``: the
software's fixed cost of running one micro-batch's forward and backward on a stage (launching the
operators, the schedule's bookkeeping), zero on the paper's ideal device, measured where it is not
(``benchmarks/emulated_links.py`` calibrates it on unlimited links). The slowest stage's slot
:math:`t_{mb}` sets the pace: the :math:`m` micro-batches take :math:`(m + (p - 1)/v)\,t_{mb}`, of which
:math:`(p - 1)/v\;t_{mb}` is the bubble (:func:`gradwise.plan.parallelism.bubble_fraction`). What a stage
communicates once per step lies on the critical path too: each stage's first forward and first backward
pass wait for its once-per-step all-gathers, and the pipeline's fill and drain pass through every stage
in turn, so these add up over the stages; the gradient reductions (DDP's all-reduce, FSDP2's
reduce-scatters) follow a stage's last backward pass, the slowest stage's after the flush, and so does the
tied embedding's all-reduce. Nothing is overlapped: an upper bound where the runtime overlaps.

**Traffic** per device per step, in :class:`gradwise.distributed.traffic.TrafficMeter`'s terms
(payload: the tensor an all-reduce reduces, the shard an all-gather contributes, the whole input
of a reduce-scatter, each message sent or received), with :math:`X = sbh` activation values:

* tensor: 4 all-reduces of :math:`X` per layer per micro-batch over :math:`t` (2 forward after the
  row-wise layers, 2 backward before the column-wise ones; Megatron-LM, Shoeybi et al. 2019):
  :math:`8X(t - 1)/t` per layer per micro-batch on a ring's link, Narayanan et al.'s figure.
  Sequence parallelism replaces each by an all-gather and a reduce-scatter of the same volume
  (Korthikanti et al. 2022), not modelled apart. DTensor issues the two backward ones inside
  another operator's dispatch, where a ``TorchDispatchMode`` such as ``TrafficMeter`` does not
  see them; ``torch.distributed.tensor.debug.CommDebugMode`` counts all four.
* pipeline: :math:`X` per micro-batch across each stage boundary, forward and backward: a middle
  device sends and receives :math:`2vm` messages each, an end device :math:`(2v - 1)m`.
* data, ZeRO stages 0-2: the stage's gradients all-reduced over :math:`d` in DDP's buckets.
  Stage 3, FSDP2 under ``torch.distributed.pipelining``: the schedule turns gradient reduction and
  resharding after backward off for every micro-batch but the last, so each layer (its own FSDP
  unit) is all-gathered before each forward (resharded after it) and once for the backward passes,
  :math:`m + 1` times (once without ``reshard_after_forward``); the stage's root (embeddings, final
  norm, output layer) once; each unit reduce-scattered once. Shards are FSDP2's, padded to
  :math:`\lceil n/d\rceil` rows.
* tied: the tied embedding's gradient (its local shard) all-reduced over the :math:`p` stages once
  per step, the middle stages adding zeros (:class:`gradwise.problems.tiny_gpt_pipeline.TinyGPTPipeline`).

Each collective is timed by the alpha-beta model (:mod:`gradwise.plan.communication`) on its
group's link; tensor-parallel groups may have their own (``tp_link``: within a node), and a kind of
collective its own (``collective_links``: gloo's reduce-scatter, for one, moves an all-reduce's bytes and
so takes twice a ring's time). Scalar collectives (the loss, the gradient norm) are not counted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from gradwise.plan.communication import AlphaBeta, collective_time, terms
from gradwise.plan.memory import PRECISIONS, parameter_count
from gradwise.plan.parallelism import Layout, Transformer, bubble_fraction, data_shard, stage_shapes, stage_units
from gradwise.plan.step_time import DDP_BUCKET_BYTES
from gradwise.validation import check_bool, check_choice, check_int, check_range

ALL_REDUCE, ALL_GATHER, REDUCE_SCATTER, SEND_RECV = "all-reduce", "all-gather", "reduce-scatter", "send/recv"
"""The kinds of :mod:`gradwise.distributed.traffic`, which the planner may not import (a lower layer)."""

ALGORITHM = {ALL_REDUCE: "ring_all_reduce", ALL_GATHER: "ring_all_gather", REDUCE_SCATTER: "ring_reduce_scatter"}
DIMENSIONS = ("tensor", "pipeline", "data", "tied")


@dataclass(frozen=True)
class Traffic:
    """One kind of collective in one mesh dimension, per device per step."""

    dimension: str  # one of DIMENSIONS
    collective: str  # TrafficMeter's kind
    calls: int
    payload_bytes: int  # TrafficMeter's payload, summed over the calls
    group: int  # ranks in each call's group
    each_micro_batch: bool = False  # the calls recur in every micro-batch's slot (counted over the step)

    def seconds(self, link: AlphaBeta) -> tuple[float, float]:
        """(seconds, latency part) of all the calls of a collective on ``link`` (a ring). Sends and
        receives are timed on the pipeline's critical path instead (:func:`parallel_step_time`)."""
        if self.collective not in ALGORITHM:
            raise ValueError(f"only collectives are timed per device, got {self.collective!r}")
        algorithm = ALGORITHM[self.collective]
        whole = self.payload_bytes * (self.group if self.collective == ALL_GATHER else 1)
        messages_per_call, volume = terms(algorithm, whole, self.group)
        latency = self.calls * messages_per_call * link.alpha
        return latency + volume * link.beta, latency


@dataclass(frozen=True)
class ParallelStepTime:
    """Seconds of one 3-D parallel step, by part, and every stage's traffic."""

    micro_batch: int  # sequences per micro-batch per data replica
    compute: float  # the slowest stage's m micro-batches
    tensor: float
    pipeline: float
    bubble: float
    data: float  # FSDP2's gathers in the slowest stage's slots, then the once-per-step data collectives
    tied: float
    overhead: float  # the slowest stage's m micro-batches' fixed software cost
    latency: float  # the latency part of the communication (bubble excluded)
    bubble_fraction: float
    traffic: tuple[tuple[Traffic, ...], ...]  # per stage

    @property
    def total(self) -> float:
        return self.compute + self.tensor + self.pipeline + self.bubble + self.data + self.tied + self.overhead

    @property
    def latency_share(self) -> float:
        return self.latency / self.total if self.total > 0 else 0.0


def micro_batch_size(model: Transformer, layout: Layout, tokens_per_step: float) -> int:
    """Sequences per micro-batch: ``tokens_per_step / (dp microbatches seq_len)``, a whole number."""
    check_range("tokens_per_step", tokens_per_step, 0.0, low_open=True)
    sequences = tokens_per_step / (layout.dp * layout.microbatches * model.seq_len)
    if sequences < 1 or abs(sequences - round(sequences)) > 1e-9 * sequences:
        raise ValueError(f"tokens per step must be a whole number of micro-batches of whole sequences: "
                         f"dp {layout.dp} x microbatches {layout.microbatches} x seq_len {model.seq_len} x "
                         f"micro-batch size, got {tokens_per_step:g} tokens")
    return int(round(sequences))


def layer_flops(model: Transformer, micro_batch: int, checkpointing: bool = False) -> int:
    """FLOPs of one layer's forward and backward passes on ``micro_batch`` sequences:
    ``72 bsh^2 (1 + s / (6h))``, ``96 bsh^2 (1 + s / (6h))`` with full checkpointing."""
    b, s, h = micro_batch, model.seq_len, model.width
    forward = 24 * b * s * h * h + 4 * b * s * s * h
    return (4 if checkpointing else 3) * forward


def logit_flops(model: Transformer, micro_batch: int) -> int:
    """FLOPs of the output layer's forward and backward passes on ``micro_batch`` sequences: ``6 bshV``."""
    return 6 * micro_batch * model.seq_len * model.width * model.vocab


def stage_traffic(
    model: Transformer,
    layout: Layout,
    stage: int,
    micro_batch: int = 1,
    precision: str = "bf16",
    zero_stage: int = 0,
    bucket_bytes: float = DDP_BUCKET_BYTES,
    reshard_after_forward: bool = True,
) -> tuple[Traffic, ...]:
    """The traffic of one device of pipeline ``stage`` (data rank 0, which FSDP2's padded shards
    make no different from the others) in one step."""
    fmt = PRECISIONS[check_choice("precision", precision, PRECISIONS)]
    check_choice("zero_stage", zero_stage, (0, 1, 2, 3))
    check_int("micro_batch", micro_batch, 1)
    check_range("bucket_bytes", bucket_bytes, 0.0, low_open=True)
    check_bool("reshard_after_forward", reshard_after_forward)
    shapes = stage_shapes(model, layout, stage)
    p, d, t, m, v = layout.pp, layout.dp, layout.tp, layout.microbatches, layout.virtual_stages
    activation = model.seq_len * micro_batch * model.width * fmt.activation_bytes
    per_stage = model.layers // p
    traffic = []
    if t > 1:
        calls = 4 * per_stage * m
        traffic.append(Traffic("tensor", ALL_REDUCE, calls, calls * activation, t, each_micro_batch=True))
    if p > 1:
        sends = m * (2 * v - (stage == 0) - (stage == p - 1))
        traffic.append(Traffic("pipeline", SEND_RECV, 2 * sends, 2 * sends * activation, 2, each_micro_batch=True))
    if d > 1 and zero_stage < 3:
        gradients = parameter_count(shapes) * fmt.grad_bytes
        traffic.append(Traffic("data", ALL_REDUCE, max(1, math.ceil(gradients / bucket_bytes)), gradients, d))
    elif d > 1:
        units = stage_units(model, layout, stage)  # the stage's layers, then its root
        shards = [parameter_count(data_shard(unit, d)) for unit in units]
        if reshard_after_forward:  # each layer gathered again before every micro-batch's forward pass
            traffic.append(Traffic("data", ALL_GATHER, m * per_stage, m * sum(shards[:per_stage]) * fmt.weight_bytes,
                                   d, each_micro_batch=True))
        # every unit once more: the layers for the backward passes (or only once), the root once
        traffic.append(Traffic("data", ALL_GATHER, len(units), sum(shards) * fmt.weight_bytes, d))
        traffic.append(Traffic("data", REDUCE_SCATTER, len(units), d * sum(shards) * fmt.grad_bytes, d))
    if p > 1:
        rows = math.ceil(model.vocab / d) if zero_stage == 3 else model.vocab
        traffic.append(Traffic("tied", ALL_REDUCE, 1, rows * model.width * fmt.grad_bytes, p))
    return tuple(traffic)


def parallel_step_time(
    model: Transformer,
    layout: Layout,
    tokens_per_step: float,
    throughput: float,
    link: AlphaBeta,
    precision: str = "bf16",
    zero_stage: int = 0,
    tp_link: AlphaBeta | None = None,
    checkpointing: bool = False,
    bucket_bytes: float = DDP_BUCKET_BYTES,
    reshard_after_forward: bool = True,
    collective_links: Mapping[str, AlphaBeta] | None = None,
    overhead: float = 0.0,
) -> ParallelStepTime:
    """Seconds per step of ``model`` trained on ``tokens_per_step`` tokens (the global batch) in
    ``layout``, each device at ``throughput`` FLOP/s, links ``link`` (``tp_link`` within
    tensor-parallel groups, default ``link``; ``collective_links`` by kind of collective, e.g.
    ``{"reduce-scatter": ...}``, elsewhere), ``overhead`` seconds of software per micro-batch per stage."""
    check_range("throughput", throughput, 0.0, low_open=True)
    check_bool("checkpointing", checkpointing)
    check_range("overhead", overhead, 0.0)
    by_collective = dict(collective_links or {})
    for kind in by_collective:
        check_choice("collective_links", kind, tuple(ALGORITHM))
    b = micro_batch_size(model, layout, tokens_per_step)
    p, m, v = layout.pp, layout.microbatches, layout.virtual_stages
    traffic = tuple(stage_traffic(model, layout, stage, b, precision, zero_stage, bucket_bytes, reshard_after_forward)
                    for stage in range(p))

    def link_of(entry: Traffic) -> AlphaBeta:
        if entry.dimension == "tensor" and tp_link is not None:
            return tp_link
        return by_collective.get(entry.collective, link)

    # per stage: seconds by part in the slots, and once per step (the gathers before the first passes, the
    # reductions and the tied all-reduce after the last); beside each, its latency part
    slot: list[dict[str, float]] = []
    once: list[dict[str, float]] = []
    slot_latency: list[float] = []
    once_latency: list[dict[str, float]] = []
    activation = model.seq_len * b * model.width * PRECISIONS[precision].activation_bytes
    sends = m * 2 * v if p > 1 else 0  # on the critical path: one boundary per chunk, each direction
    for stage, entries in enumerate(traffic):
        layers = model.layers // p * layer_flops(model, b, checkpointing) / layout.tp
        flops = m * (layers + (logit_flops(model, b) if stage == p - 1 else 0))
        slot.append({"compute": flops / throughput, "tensor": 0.0, "data": 0.0, "overhead": m * overhead,
                     "pipeline": sends * collective_time(link, "send_recv", activation, 2)})
        once.append({"gather": 0.0, "reduce": 0.0, "tied": 0.0})
        once_latency.append(dict.fromkeys(once[stage], 0.0))
        slot_latency.append(sends * link.alpha)
        for entry in entries:
            if entry.collective == SEND_RECV:
                continue  # on the critical path, above
            time, alpha = entry.seconds(link_of(entry))
            if entry.each_micro_batch:
                slot[stage][entry.dimension] += time
                slot_latency[stage] += alpha
            else:
                part = "tied" if entry.dimension == "tied" else "gather" if entry.collective == ALL_GATHER else "reduce"
                once[stage][part] += time
                once_latency[stage][part] += alpha
    pace = max(range(p), key=lambda stage: sum(slot[stage].values()))  # the slowest stage sets the slots
    busy = sum(slot[pace].values())
    fill = sum(parts["gather"] for parts in once)  # every stage's first passes, one after another
    drain = max(range(p), key=lambda stage: once[stage]["reduce"] + once[stage]["tied"])
    return ParallelStepTime(
        micro_batch=b,
        compute=slot[pace]["compute"],
        tensor=slot[pace]["tensor"],
        pipeline=slot[pace]["pipeline"],
        bubble=(p - 1) / v * busy / m,
        data=slot[pace]["data"] + fill + once[drain]["reduce"],
        tied=once[drain]["tied"],
        overhead=slot[pace]["overhead"],
        latency=(slot_latency[pace] * (1 + (p - 1) / (v * m)) + sum(parts["gather"] for parts in once_latency)
                 + once_latency[drain]["reduce"] + once_latency[drain]["tied"]),
        bubble_fraction=bubble_fraction(p, m, v),
        traffic=traffic,
    )
