"""3-D step time: Narayanan et al.'s FLOPs and communication volumes, the bubble, FSDP2's traffic under a
pipeline, and the data-parallel model it reduces to."""

from __future__ import annotations

import pytest

from gradwise.plan import memory
from gradwise.plan.communication import AlphaBeta
from gradwise.plan.parallel_step_time import (
    ALL_GATHER,
    REDUCE_SCATTER,
    SEND_RECV,
    Traffic,
    micro_batch_size,
    parallel_step_time,
    stage_traffic,
)
from gradwise.plan.parallelism import Layout, Transformer, stage_memory, stage_shapes
from gradwise.plan.step_time import gradient_sync_time

LINK = AlphaBeta.from_link(latency=5e-6, bandwidth=25e9)
GPT3 = Transformer(layers=96, width=12288, heads=96, vocab=51200, seq_len=2048)
TINY = Transformer(layers=4, width=32, heads=4, vocab=256, seq_len=16)


def by_kind(traffic: tuple[Traffic, ...]) -> dict[tuple[str, str], Traffic]:
    return {(entry.dimension, entry.collective): entry for entry in traffic}


def test_flops_with_checkpointing_are_narayanan_et_al_equation_3():
    layout, b, rate = Layout(microbatches=4), 2, 1e15
    step = parallel_step_time(GPT3, layout, 4 * b * 2048, rate, LINK, checkpointing=True)
    B, s, L, h, V = 4 * b, 2048, 96, 12288, 51200
    narayanan = 96 * B * s * L * h * h * (1 + s / (6 * h) + V / (16 * L * h))
    assert step.compute * rate == pytest.approx(narayanan, rel=1e-12)
    plain = parallel_step_time(GPT3, layout, 4 * b * 2048, rate, LINK)
    logits = 6 * B * s * h * V
    assert (plain.compute * rate - logits) / (step.compute * rate - logits) == pytest.approx(3 / 4)


def test_tensor_parallel_volume_is_narayanan_et_al_8bsh_per_layer():
    layout = Layout(pp=2, tp=8, microbatches=3)
    b, t = 2, 8
    tensor = by_kind(stage_traffic(GPT3, layout, 0, b, "bf16"))[("tensor", "all-reduce")]
    per_layer_per_micro_batch = 2 * (t - 1) / t * tensor.payload_bytes / (48 * 3)  # a ring's bytes
    assert per_layer_per_micro_batch == pytest.approx(8 * b * 2048 * 12288 * (t - 1) / t * 2)  # bf16
    assert tensor.calls == 4 * 48 * 3 and tensor.group == t


@pytest.mark.parametrize(("chunks", "schedule"), [(1, "1f1b"), (2, "interleaved-1f1b")])
def test_pipeline_sends_one_activation_per_micro_batch_and_boundary(chunks, schedule):
    model = Transformer(layers=8, width=64, heads=4, vocab=256, seq_len=32)
    layout = Layout(pp=4, microbatches=8, schedule=schedule, virtual_stages=chunks)
    message = 32 * 1 * 64 * 2  # sbh in bf16
    for stage, messages in enumerate([(2 * chunks - 1) * 8, 2 * chunks * 8, 2 * chunks * 8, (2 * chunks - 1) * 8]):
        sends = by_kind(stage_traffic(model, layout, stage))[("pipeline", SEND_RECV)]
        assert (sends.calls, sends.payload_bytes) == (2 * messages, 2 * messages * message)  # sent and received


def test_bubble_is_p_minus_1_micro_batch_slots_over_v():
    for layout in (Layout(pp=4, tp=2, dp=2, microbatches=8), Layout(pp=4, microbatches=8, schedule="interleaved-1f1b",
                                                                     virtual_stages=3)):
        model = Transformer(layers=24, width=256, heads=8, vocab=1000, seq_len=128)
        step = parallel_step_time(model, layout, 128 * 8 * layout.dp * 2, 1e12, LINK)
        busy = step.compute + step.tensor + step.pipeline
        assert step.bubble / busy == pytest.approx((4 - 1) / (layout.virtual_stages * 8))
        assert step.bubble_fraction == pytest.approx(3 / (layout.virtual_stages * 8 + 3))  # 3/11 and 1/9
        assert step.total == pytest.approx(busy + step.bubble + step.data + step.tied)


def test_without_model_parallelism_the_data_traffic_is_the_data_parallel_models():
    step = parallel_step_time(GPT3, Layout(dp=64), 64 * 2048, 1e15, LINK, "bf16")
    assert (step.tensor, step.pipeline, step.bubble, step.tied) == (0, 0, 0, 0)
    gradients = GPT3.parameter_count() * 2
    assert step.data == pytest.approx(gradient_sync_time(LINK, gradients, 64)[0], rel=1e-12)


def test_fsdp_under_a_pipeline_gathers_each_layer_per_micro_batch_and_once_for_backward():
    layout = Layout(pp=2, dp=4, tp=2, microbatches=3)
    for stage in (0, 1):
        shard = stage_memory(TINY, layout, stage, "adamw", "bf16", 3).parameters  # rank 0's shards, bf16
        traffic = stage_traffic(TINY, layout, stage, precision="bf16", zero_stage=3)
        once = by_kind(stage_traffic(TINY, layout, stage, precision="bf16", zero_stage=3, reshard_after_forward=False))
        assert once[("data", ALL_GATHER)].calls == 2 + 1  # two layers and the root, once each
        assert once[("data", ALL_GATHER)].payload_bytes == shard
        gathers = {entry.each_micro_batch: entry for entry in traffic if entry.collective == ALL_GATHER}
        assert (gathers[True].calls, gathers[False].calls) == (2 * 3, 2 + 1)  # before each forward; once more each
        root = memory.parameter_count(stage_shapes(TINY, layout, stage)) - 2 * (12 * 32 * 32 // 2 + 7 * 16 + 6 * 32)
        layers_shard = shard - 2 * root // 4  # bf16 bytes of the two layers' quarter
        assert (gathers[True].payload_bytes, gathers[False].payload_bytes) == (3 * layers_shard, shard)
        scatter = by_kind(traffic)[("data", REDUCE_SCATTER)]
        assert (scatter.calls, scatter.payload_bytes, scatter.each_micro_batch) == (3, 4 * shard, False)


def test_the_critical_path_repeats_the_slot_and_adds_each_stages_once_per_step_gathers():
    """1F1B with FSDP2 under it: (m + p - 1) slots of the slowest stage, each with its per-micro-batch
    gathers; every stage's once-per-step gathers in turn (the fill and drain pass through each); the
    slowest stage's reduce-scatters (stage 0's: its root holds the position embedding too) and the tied
    all-reduce after the flush."""
    layout, rate = Layout(pp=2, dp=4, microbatches=3), 1e9
    step = parallel_step_time(TINY, layout, 16 * 4 * 3, rate, LINK, "bf16", zero_stage=3)
    traffic = [stage_traffic(TINY, layout, stage, 1, "bf16", 3) for stage in (0, 1)]

    def seconds(stage: int, keep) -> float:
        return sum(entry.seconds(LINK)[0] for entry in traffic[stage] if entry.collective != SEND_RECV and keep(entry))

    slot_gathers = seconds(1, lambda entry: entry.each_micro_batch)
    compute = 3 * (2 * (72 * 16 * 32 * 32 + 12 * 16 * 16 * 32) + 6 * 16 * 32 * 256) / rate  # the last stage
    send = LINK.alpha + 16 * 32 * 2 * LINK.beta
    assert step.compute == pytest.approx(compute) and step.pipeline == pytest.approx(3 * 2 * send)
    slot = (compute + 3 * 2 * send + slot_gathers) / 3
    fill = sum(seconds(stage, lambda entry: entry.collective == ALL_GATHER and not entry.each_micro_batch)
               for stage in (0, 1))
    drain = max(seconds(stage, lambda entry: entry.collective == REDUCE_SCATTER) for stage in (0, 1))
    assert step.bubble == pytest.approx(slot)
    assert step.data == pytest.approx(slot_gathers + fill + drain)
    assert step.total == pytest.approx((3 + 1) * slot + fill + drain + step.tied)

    def alpha(stage: int, keep) -> float:
        return sum(entry.seconds(LINK)[1] for entry in traffic[stage] if entry.collective != SEND_RECV and keep(entry))

    # the latency part of the same path: each alpha counted as often as its seconds are
    slot_alpha = 3 * 2 * LINK.alpha + alpha(1, lambda entry: entry.each_micro_batch)
    once_alpha = sum(alpha(stage, lambda entry: entry.collective == ALL_GATHER and not entry.each_micro_batch)
                     for stage in (0, 1)) + alpha(0, lambda entry: not entry.each_micro_batch
                                                  and entry.collective != ALL_GATHER)
    assert step.latency == pytest.approx(slot_alpha * (3 + 1) / 3 + once_alpha)


def test_a_collectives_own_link_and_the_software_overhead_change_only_their_parts():
    layout = Layout(pp=2, dp=4, microbatches=3)
    tokens, plain = 16 * 4 * 3, parallel_step_time(TINY, layout, 16 * 4 * 3, 1e9, LINK, "bf16", zero_stage=3)
    half = AlphaBeta(LINK.alpha, 2 * LINK.beta)  # gloo's reduce-scatter: an all-reduce's bytes
    slow = parallel_step_time(TINY, layout, tokens, 1e9, LINK, "bf16", zero_stage=3,
                              collective_links={REDUCE_SCATTER: half})
    scatter = by_kind(stage_traffic(TINY, layout, 0, 1, "bf16", 3))[("data", REDUCE_SCATTER)]  # stage 0's, the larger
    assert slow.data - plain.data == pytest.approx(scatter.seconds(half)[0] - scatter.seconds(LINK)[0])
    assert (slow.compute, slow.bubble, slow.pipeline) == (plain.compute, plain.bubble, plain.pipeline)
    busy = parallel_step_time(TINY, layout, tokens, 1e9, LINK, "bf16", zero_stage=3, overhead=0.01)
    assert busy.overhead == pytest.approx(3 * 0.01)
    assert busy.total - plain.total == pytest.approx((3 + 1) * 0.01)  # in every slot, the bubble's included
    with pytest.raises(ValueError, match="collective_links"):
        parallel_step_time(TINY, layout, tokens, 1e9, LINK, collective_links={"broadcast": LINK})
    with pytest.raises(ValueError, match="overhead"):
        parallel_step_time(TINY, layout, tokens, 1e9, LINK, overhead=-1.0)


def test_the_tied_gradient_is_all_reduced_over_the_pipeline():
    tied = by_kind(stage_traffic(TINY, Layout(pp=2, dp=4), 1, precision="fp32", zero_stage=3))[("tied", "all-reduce")]
    assert (tied.calls, tied.payload_bytes, tied.group) == (1, 256 // 4 * 32 * 4, 2)
    assert ("tied", "all-reduce") not in by_kind(stage_traffic(TINY, Layout(dp=4), 0))


def test_a_faster_tensor_parallel_link_shortens_only_the_tensor_part():
    layout = Layout(pp=2, dp=2, tp=4, microbatches=4)
    slow = parallel_step_time(GPT3, layout, 2048 * 16, 4e14, LINK)
    fast = parallel_step_time(GPT3, layout, 2048 * 16, 4e14, LINK, tp_link=AlphaBeta.from_link(2e-6, 450e9))
    assert fast.tensor < slow.tensor / 10
    assert (fast.compute, fast.pipeline, fast.data, fast.tied) == (slow.compute, slow.pipeline, slow.data, slow.tied)


def test_the_global_batch_must_split_into_whole_micro_batches():
    assert micro_batch_size(TINY, Layout(dp=2, microbatches=4), 16 * 8 * 3) == 3
    with pytest.raises(ValueError, match="whole number of micro-batches"):
        micro_batch_size(TINY, Layout(dp=2, microbatches=4), 16 * 4)
    with pytest.raises(ValueError, match="only collectives"):
        by_kind(stage_traffic(TINY, Layout(pp=2), 0))[("pipeline", SEND_RECV)].seconds(LINK)
