"""The owner-computes planner (gradwise.plan.owner_computes) against real FSDP2 and tensor-parallel runs.

One job of 4 processes shards a small tiny-gpt with FSDP2 and, apart, with tensor parallelism, over
all 4 ranks and, on a (2, 2) mesh, over pairs of ranks, steps each whole-matrix optimizer once as
``gradwise train`` builds it, and reports each rank's state bytes, the step's ``TrafficMeter`` payload
and its ``FlopCounterMode`` count: the planner's per-rank numbers equal them exactly.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from gradwise.cli import main
from gradwise.distributed import run_processes
from gradwise.plan.memory import default_width, square_matrix_shapes
from gradwise.plan.owner_computes import meta_tensors, muon_update_flops, owner_computes, tensor_parallel_dims
from gradwise.problems.tiny_gpt import TinyGPT

OPTIMIZERS = ("muon", "normuon", "shampoo", "soap", "adafactor", "psgd-kron")
SIZE = dict(seq_len=8, d_model=32, n_layer=2, n_head=4)
LAYOUTS = ("fsdp", "tp")


def model() -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT(**SIZE)


def job(rank: int, world_size: int) -> dict:
    """Per optimizer, layout and mesh size (4: all ranks; 2: the pairs of a (2, 2) mesh): this rank's
    state bytes, all-to-all payload and FLOPs over one step."""
    from torch.distributed.device_mesh import init_device_mesh

    from gradwise.distributed.state_bytes import optimizer_state_bytes
    from gradwise.distributed.strategies.fsdp import shard_model
    from gradwise.distributed.traffic import TrafficMeter
    from gradwise.problems.tiny_gpt_tensor_parallel import parallelize_tiny_gpt
    from gradwise.train.optimizers import build_optimizer

    pairs = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pair", "fsdp"))["fsdp"]  # ranks {0, 1} and {2, 3}
    meshes = {4: init_device_mesh("cpu", (4,)), 2: pairs}
    tokens = torch.randint(0, 256, (2, SIZE["seq_len"]), generator=torch.Generator().manual_seed(0))
    shard = {"fsdp": lambda mesh: shard_model(model(), mesh=mesh),
             "tp": lambda mesh: parallelize_tiny_gpt(model(), mesh)}
    results = {}
    for (size, mesh), layout, name in itertools.product(meshes.items(), LAYOUTS, OPTIMIZERS):
        sharded = shard[layout](mesh)
        optimizer = build_optimizer(name, sharded, 1e-3, 0.1)
        sharded(tokens).square().mean().backward()
        with FlopCounterMode(display=False) as flops, TrafficMeter() as meter:
            optimizer.step()
        results[name, layout, size] = dict(state=optimizer_state_bytes(optimizer), sent=dict(meter.payload_by_kind),
                                           calls=meter.calls["all-to-all"], flops=flops.get_total_flops())
    return results


@pytest.fixture(scope="module")
def measured():
    return run_processes(job, 4, timeout_s=300)


@pytest.mark.distributed
@pytest.mark.timeout(400)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_predicted_state_traffic_and_flops_equal_a_real_run(measured, name, layout):
    for size in (2, 4):
        reference = model()
        dims = tensor_parallel_dims(reference) if layout == "tp" else None
        plan = owner_computes(name, reference, size, shard_dim=dims)
        assert plan is not None
        for rank, results in enumerate(measured):
            real, predicted = results[name, layout, size], plan.ranks[rank % size]
            where = (name, layout, size, rank)
            assert real["state"] == predicted.state_bytes, where
            assert real["sent"] == {"all-to-all": predicted.sent_bytes}, where
            assert real["calls"] == plan.exchanges, where
            if plan.flops_modelled:
                assert real["flops"] == predicted.flops, where


@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (3, 8, 5), (4, 2, 3, 3)])
def test_muon_flops_are_flop_counter_modes(shape):
    from gradwise.optim import Muon

    param = torch.nn.Parameter(torch.randn(shape))
    param.grad = torch.randn(shape)
    optimizer = Muon([param], lr=0.02, ns_steps=3, ns_dtype=torch.float32)
    with FlopCounterMode(display=False) as counter:
        optimizer.step()
    assert counter.get_total_flops() == muon_update_flops(shape, optimizer.param_groups[0])


def test_one_rank_holds_everything_and_sends_nothing():
    shapes = square_matrix_shapes(5 * 64 * 64 + 7, 64)
    whole, halves = owner_computes("muon", meta_tensors(shapes), 1), owner_computes("muon", meta_tensors(shapes), 2)
    assert whole.ranks[0].sent_bytes == 0 and whole.ranks[0].matrices == 5
    # the matrices' state divided up; the vector's AdamW moments too, and its step counter on each rank
    assert sum(rank.state_bytes for rank in halves.ranks) == whole.ranks[0].state_bytes + 4
    assert [rank.matrices for rank in halves.ranks] == [3, 2] and halves.most_loaded == 0
    mean = sum(rank.state_bytes for rank in halves.ranks) / 2
    assert halves.state_spread == pytest.approx(halves.ranks[0].state_bytes / mean)
    assert owner_computes("adamw", meta_tensors(shapes), 2) is None  # element-wise: ZeRO's model
    assert owner_computes("sophia", meta_tensors(shapes), 2) is None  # whole tensors, but an element-wise update


TINY = ["--layers", "2", "--width", "32", "--heads", "4", "--vocab", "256", "--seq-len", "8", "--precision", "fp32"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_plan_memory_plans_the_measured_model(capsys, layout):
    # the command line's transformer is the measured tiny-gpt: the same owners, state, FLOPs and bytes
    options = ["--zero", "3", "--devices", "4"] if layout == "fsdp" else ["--tp", "2"]
    assert main(["plan", "memory", *TINY, *options, "--optimizer", "muon", "--no-plot", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    reference = model()
    dims = tensor_parallel_dims(reference) if layout == "tp" else None
    plan = owner_computes("muon", reference, 4 if layout == "fsdp" else 2, shard_dim=dims)
    assert plan is not None and data["owner_computes"] == plan.as_dict()
    row = data["by_stage"][3]["bytes"]  # ZeRO-3: FSDP2; under tensor parallelism alone every row
    assert row["optimizer_state"] == plan.ranks[plan.most_loaded].state_bytes


def test_plan_step_reports_owner_computes(capsys):
    assert main(["plan", "step", "--params", "1e6", "--optimizer", "muon", "--zero", "3", "--devices", "4",
                 "--no-plot", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    plan = owner_computes("muon", meta_tensors(square_matrix_shapes(1e6, default_width(1e6))), 4, 4, 4)
    assert plan is not None
    assert {key: data["owner_computes"][key] for key in plan.as_dict()} == plan.as_dict()
    assert data["owner_computes"]["update_s"] == pytest.approx(
        max(rank.flops or 0 for rank in plan.ranks) / data["throughput"]["fp8"])
    assert main(["plan", "step", "--params", "1e6", "--optimizer", "shampoo", "--zero", "3", "--devices", "4",
                 "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "owner-computes over 4 ranks" in out and "not modelled for shampoo" in out


@pytest.mark.parametrize("arguments, message", [
    (["memory", "--params", "1e6", "--optimizer", "muon-8bit", "--zero", "3", "--devices", "2"], "state_format"),
    (["step", "--params", "1e6", "--optimizer", "nope", "--zero", "3"], "optimizer must be one of"),
])
def test_bad_owner_computes_requests_are_one_line_exit_2(capsys, arguments, message):
    assert main(["plan", *arguments, "--no-plot"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
