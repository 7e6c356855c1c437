"""3-D parallelism planning: the papers' formulas reproduced, the micro-batches in flight of torch's own
pipeline schedules, and per-device bytes equal to the real shards of tiny-gpt on a (pp, dp, tp) mesh."""

from __future__ import annotations

import multiprocessing
from fractions import Fraction

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.pipelining.schedules import (
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    _ComputationType,
)

from gradwise.optim.description import presets
from gradwise.optim.param_groups import training_param_groups
from gradwise.plan import memory
from gradwise.plan.parallelism import (
    Layout,
    Transformer,
    bubble_fraction,
    data_shard,
    largest_device,
    largest_stage,
    layers_in_flight,
    stage_activation_bytes,
    stage_memory,
    stage_shapes,
)

SEQ_LEN, VOCAB = 2048, 51200
KORTHIKANTI = {  # Korthikanti et al. 2022, Table 3: heads, width, layers, tensor- and pipeline-parallel size
    "22B": (64, 6144, 48, 8, 1),
    "175B": (96, 12288, 96, 8, 8),
    "530B": (128, 20480, 105, 8, 35),
    "1T": (160, 25600, 128, 8, 64),
}
NARAYANAN = {  # Narayanan et al. 2021, Table 1: parameters (billions) -> heads, width, layers
    1.7: (24, 2304, 24), 3.6: (32, 3072, 30), 7.5: (32, 4096, 36), 18.4: (48, 6144, 40), 39.1: (64, 8192, 48),
    76.1: (80, 10240, 60), 145.6: (96, 12288, 80), 310.1: (128, 16384, 96), 529.6: (128, 20480, 105),
    1008.0: (160, 25600, 128),
}


@pytest.mark.parametrize("name", KORTHIKANTI)
def test_activations_per_layer_are_korthikanti_et_al_table_2(name):
    a, h, _, t, _ = KORTHIKANTI[name]
    s, b = SEQ_LEN, 1
    sbh = s * b * h

    def layer(**kwargs):
        return memory.layer_activation_bytes(h, a, s, b, 2, **kwargs)

    assert layer() == sbh * (34 + Fraction(5 * a * s, h))
    assert layer(tensor_parallel=t) == sbh * (10 + Fraction(24, t) + Fraction(5 * a * s, h * t))
    assert layer(tensor_parallel=t, sequence_parallel=True) == sbh * (34 + Fraction(5 * a * s, h)) / t
    # full recomputation keeps each layer's input, 2sbh bytes (Table 2), plus one layer being recomputed
    assert memory.transformer_activation_bytes(4, h, a, s, b, 2, checkpointing=True, tensor_parallel=t) == (
        4 * 2 * sbh + layer(tensor_parallel=t))


@pytest.mark.parametrize("name", [name for name in KORTHIKANTI if KORTHIKANTI[name][4] > 1])
def test_the_first_stage_holds_korthikanti_et_al_section_4_3_layers(name):
    a, h, layers, t, p = KORTHIKANTI[name]
    model = Transformer(layers, h, a, VOCAB, SEQ_LEN)
    per_layer = memory.layer_activation_bytes(h, a, SEQ_LEN, 1, 2, t, True)
    one_f_one_b = Layout(pp=p, tp=t, microbatches=2 * p, sequence_parallel=True)
    # 1F1B: p micro-batches of L/p layers, L layers' activations whatever p
    assert stage_activation_bytes(model, one_f_one_b, 0) == layers * per_layer
    v = {"175B": 2, "530B": 3, "1T": 2}[name]
    interleaved = Layout(pp=p, tp=t, microbatches=2 * p, schedule="interleaved-1f1b", virtual_stages=v,
                         sequence_parallel=True)
    assert stage_activation_bytes(model, interleaved, 0) == layers * (1 + Fraction(p - 1, p * v)) * per_layer


def peak_in_flight(actions) -> int:
    """The most forward passes whose backward has not run yet, along one rank's actions."""
    live = peak = 0
    for action in filter(None, actions):
        live += {_ComputationType.FORWARD: 1, _ComputationType.FULL_BACKWARD: -1}.get(action.computation_type, 0)
        peak = max(peak, live)
    return peak


def torch_pipeline_order(schedule: str, pp: int, microbatches: int, chunks: int) -> dict[int, list]:
    """Every rank's actions under torch's own schedule (its schedule IR), built without processes."""
    if schedule == "interleaved-1f1b":
        interleaved = object.__new__(ScheduleInterleaved1F1B)
        interleaved.n_local_stages, interleaved.pp_group_size, interleaved._n_microbatches = chunks, pp, microbatches
        interleaved.number_of_rounds = max(1, microbatches // pp)
        interleaved.microbatches_per_round = microbatches // interleaved.number_of_rounds
        return {rank: interleaved._calculate_single_rank_operations(rank) for rank in range(pp)}
    single = object.__new__({"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule])
    single._num_stages, single._n_microbatches = pp, microbatches
    return single._get_pipeline_order()


@pytest.mark.parametrize(("schedule", "pp", "microbatches", "chunks"), [
    ("gpipe", 4, 6, 1), ("1f1b", 4, 6, 1), ("1f1b", 4, 4, 1), ("1f1b", 3, 8, 1),
    ("interleaved-1f1b", 4, 8, 2), ("interleaved-1f1b", 2, 4, 3), ("interleaved-1f1b", 4, 4, 2),
])
def test_micro_batches_in_flight_are_those_of_torchs_schedules(schedule, pp, microbatches, chunks):
    layers_per_chunk = 2
    model = Transformer(pp * chunks * layers_per_chunk, 64, 4, 256, 16)
    layout = Layout(pp=pp, microbatches=microbatches, schedule=schedule, virtual_stages=chunks)
    order = torch_pipeline_order(schedule, pp, microbatches, chunks)
    for stage in range(pp):
        assert layers_in_flight(model, layout, stage) == layers_per_chunk * peak_in_flight(order[stage])


@pytest.mark.parametrize("billions", NARAYANAN)
def test_parameter_count_is_narayanan_et_al_table_1(billions):
    a, h, layers = NARAYANAN[billions]
    count = Transformer(layers, h, a, VOCAB, SEQ_LEN).parameter_count()
    # P = 12 l h^2 (1 + 13 / (12 h) + (V + s) / (12 l h)), without the final LayerNorm's 2h
    assert count - 2 * h == 12 * layers * h * h + 13 * layers * h + (VOCAB + SEQ_LEN) * h
    assert round(count / 1e9, 1) == billions


def test_transformer_shapes_count_gpt2_small_with_its_position_embeddings():
    assert memory.parameter_count(memory.transformer_shapes(12, 768, 50257, positions=1024)) == 124_439_808


@pytest.mark.parametrize(("pp", "microbatches", "chunks", "expected"), [
    (1, 8, 1, 0.0), (4, 1, 1, 3 / 4), (4, 12, 1, 3 / 15), (8, 24, 2, 7 / 55),
])
def test_bubble_fraction(pp, microbatches, chunks, expected):
    fraction = bubble_fraction(pp, microbatches, chunks)
    assert fraction == pytest.approx(expected)
    # Narayanan et al.: the bubble is (p - 1) / (v m) of the ideal time
    assert fraction / (1 - fraction) == pytest.approx((pp - 1) / (chunks * microbatches))


def test_stage_shapes_split_layers_and_place_the_embeddings():
    model = Transformer(layers=4, width=32, heads=4, vocab=256, seq_len=16)
    h, v, s = 32, 256, 16
    whole = model.parameter_count()
    assert memory.parameter_count(stage_shapes(model, Layout(), 0)) == whole
    pipeline = [memory.parameter_count(stage_shapes(model, Layout(pp=2), stage)) for stage in (0, 1)]
    assert sum(pipeline) == whole + v * h  # the last stage's copy of the tied matrix
    first, last = (memory.parameter_count(stage_shapes(model, Layout(pp=2, tp=2), stage)) for stage in (0, 1))
    per_layer = 12 * h * h // 2 + 7 * h // 2 + 6 * h  # 12h^2/t + 7h/t + 6h
    assert first == 2 * per_layer + v * h + s * h
    assert last == 2 * per_layer + 2 * h + v * h  # the final norm and the output layer, whole


def test_data_shards_are_fsdp2s_chunks():
    assert data_shard([((10, 3), 1), ((2,), 4)], dp=4, rank=0) == [((3, 3), 1), ((1,), 4)]
    assert data_shard([((10, 3), 1), ((2,), 4)], dp=4, rank=3) == [((1, 3), 1), ((0,), 4)]


def test_the_first_stage_must_fit_under_1f1b():
    model = Transformer(96, 12288, 96, VOCAB, SEQ_LEN)
    layout = Layout(pp=8, dp=8, tp=8, microbatches=24)
    estimates = [stage_memory(model, layout, stage, "adam", "mixed", 1) for stage in range(8)]
    assert largest_stage(estimates) == 0
    assert [e.activations for e in estimates] == sorted((e.activations for e in estimates), reverse=True)
    gpipe = [stage_memory(model, Layout(pp=8, dp=8, tp=8, microbatches=24, schedule="gpipe"), stage, "adam", "mixed",
                          1) for stage in range(8)]
    assert gpipe[0].activations == 24 / 8 * estimates[0].activations


def test_fsdp_shards_average_to_zeros_model_on_even_shapes():
    model = Transformer(layers=4, width=32, heads=4, vocab=256, seq_len=16)
    layout = Layout(pp=2, dp=4, tp=2)
    for stage in range(2):
        shards = stage_memory(model, layout, stage, "adamw", "bf16", 3)
        average = memory.estimate_memory(stage_shapes(model, layout, stage), "adamw", "bf16", 3, 4,
                                         shards.activations)
        assert (shards.parameters, shards.gradients) == (average.parameters, average.gradients)
        # the step counters are one per tensor on every rank, not sharded
        assert shards.optimizer_state > average.optimizer_state


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"tp": 3}, "heads and width must be multiples of tp"),
    ({"pp": 3}, "layers must be a multiple of pp"),
    ({"microbatches": 0}, "microbatches must be an integer >= 1"),
    ({"pp": 2, "microbatches": 3, "schedule": "interleaved-1f1b", "virtual_stages": 2}, "multiple of pp"),
    ({"virtual_stages": 2}, "virtual_stages > 1 goes with the interleaved-1f1b schedule"),
    ({"schedule": "zero-bubble"}, "schedule must be one of"),
])
def test_impossible_layouts_are_refused(kwargs, message):
    model = Transformer(layers=4, width=32, heads=4, vocab=256, seq_len=16)
    with pytest.raises(ValueError, match=message):
        stage_shapes(model, Layout(**kwargs), 0)


# ---- per-device bytes against the real tensors -------------------------------------------------


def local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def real_bytes(pp: int, dp: int, tp: int, rank: int, optimizer: str) -> dict[str, int]:
    """Bytes of the parameters, gradients and optimizer state that ``rank`` of a ``(pp, dp, tp)`` mesh holds
    for tiny-gpt laid out as gradwise's ``3d`` strategy lays it out (a pipeline stage, Megatron's layout over
    ``tp``, FSDP2 over ``dp``), built as that rank of a fake process group (no communication: only shapes)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from gradwise.problems.tiny_gpt import TinyGPT
    from gradwise.problems.tiny_gpt_pipeline import TinyGPTStage
    from gradwise.problems.tiny_gpt_tensor_parallel import parallelize_tiny_gpt

    dist.init_process_group("fake", rank=rank, world_size=pp * dp * tp, store=FakeStore())
    try:
        mesh = init_device_mesh("cpu", (pp, dp, tp), mesh_dim_names=("pp", "dp", "tp"))  # rank = (stage, dp, tp)
        torch.manual_seed(0)
        model = TinyGPT(seq_len=16, d_model=32, n_layer=4, n_head=4)
        if tp > 1:
            parallelize_tiny_gpt(model, mesh["tp"])
        stage, per_stage = rank // (dp * tp), 4 // pp
        module = model if pp == 1 else TinyGPTStage(model, stage * per_stage, (stage + 1) * per_stage, stage == 0,
                                                    stage == pp - 1)
        if dp > 1:
            for block in module.blocks.values() if pp > 1 else model.blocks:
                fully_shard(block, mesh=mesh["dp"])
            fully_shard(module, mesh=mesh["dp"])
        params = list(module.parameters())
        optimizer_class, preset = presets()[optimizer]  # as a training run builds it
        step = optimizer_class(training_param_groups(optimizer_class, module, 0.1), lr=1e-3, **preset.train_options())
        for param in params:
            param.grad = torch.zeros_like(param)
        step.step()
        states = [value for state in step.state.values() for value in state.values() if isinstance(value, torch.Tensor)]
        return {kind: sum(local(t).numel() * local(t).element_size() for t in tensors) for kind, tensors in
                (("parameters", params), ("gradients", [p.grad for p in params]), ("optimizer_state", states))}
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("pp", "dp", "tp", "rank", "optimizer"), [
    (2, 2, 2, 0, "adamw"), (2, 2, 2, 7, "adamw"), (2, 3, 2, 11, "momentum"),  # dp 3: uneven shards
    (1, 2, 2, 3, "adamw"), (2, 1, 2, 2, "momentum"), (2, 1, 1, 1, "adamw"),
    # whole-matrix optimizers: owner-computes on a 1-D mesh (dp or tp), whole matrices on every device of a 2-D one
    (2, 2, 2, 5, "muon"), (2, 1, 2, 2, "muon"), (2, 1, 2, 3, "muon"), (2, 2, 1, 0, "muon"), (2, 3, 1, 4, "soap"),
    (1, 1, 2, 1, "shampoo"),
])
def test_per_device_bytes_equal_the_real_shards_of_tiny_gpt(pp, dp, tp, rank, optimizer):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    model = Transformer(layers=4, width=32, heads=4, vocab=256, seq_len=16)
    layout = Layout(pp=pp, dp=dp, tp=tp)
    stage, dp_rank, tp_rank = rank // (dp * tp), rank // tp % dp, rank % tp
    predicted = stage_memory(model, layout, stage, optimizer, "fp32", 3 if dp > 1 else 0, dp_rank=dp_rank,
                             tp_rank=tp_rank)
    if dp > 1 and tp > 1 and optimizer == "muon":
        # full_tensor on a 2-D mesh, which in a process that held an earlier world finds that world's mesh
        # (and process groups) in one of DTensor's caches: a process of its own
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            measured = pool.apply(real_bytes, (pp, dp, tp, rank, optimizer))
    else:
        measured = real_bytes(pp, dp, tp, rank, optimizer)
    assert {kind: predicted.as_dict()[kind] for kind in measured} == measured


@pytest.mark.parametrize(("layers", "width", "layout", "optimizer", "first_holds_most"), [
    (4, 32, Layout(pp=2, dp=3, tp=2), "adamw", True), (4, 32, Layout(pp=2, dp=2, tp=2), "muon", True),
    (4, 48, Layout(pp=2, dp=3, tp=1), "soap", False), (3, 32, Layout(tp=4), "muon", False),  # data rank 1, tensor 2
])
def test_the_largest_device_of_a_stage_is_the_one_that_holds_the_most(layers, width, layout, optimizer,
                                                                     first_holds_most):
    """Every device's bytes compared: data rank 0's shards, or owner-computes' most loaded owner."""
    model = Transformer(layers=layers, width=width, heads=4, vocab=256, seq_len=16)
    for stage in range(layout.pp):
        every = [stage_memory(model, layout, stage, optimizer, "fp32", 3, dp_rank=d, tp_rank=t)
                 for d in range(layout.dp) for t in range(layout.tp)]
        assert largest_device(model, layout, stage, optimizer, "fp32", 3).total == max(e.total for e in every)
    assert (max(e.total for e in every) == every[0].total) == first_holds_most
