"""Owner-computes: whole-matrix optimizers on sharded (DTensor) matrices equal one process, each matrix on one rank.

Matrices of uneven sizes (one whose single row leaves a rank's shard empty, a 3-D batch of
matrices) are sharded over a 1-D mesh by rows (FSDP2's ``Shard(0)``) or by columns (a tensor-parallel
``Shard(1)``) and stepped with given gradients beside the same optimizer on the plain tensors in the
same process: every element is the same arithmetic on the same whole tensors, so the two are equal bit
for bit. Three jobs (1, 2 and 4 processes) pass a ``ShardedCheckpoints`` checkpoint along
(1 -> 2 -> 4 ranks, and 2 -> 1), and count each rank's traffic, state and optimizer FLOPs.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from gradwise.checkpoints.sharded import ShardedCheckpoints
from gradwise.distributed import run_processes
from gradwise.distributed.state_bytes import optimizer_state_bytes
from gradwise.distributed.traffic import TrafficMeter
from gradwise.optim import KFAC, SOAP, Adafactor, AdamW, Muon, PSGDKron, Shampoo
from gradwise.optim.owner_computes import assign_owners, chunk_bounds, matrix_cost

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]

SHAPES = [(6, 5), (5, 7), (1, 4), (3, 4, 4), (9, 3)]
STEPS, SAVE_AT = 4, 2
CASES = {
    "muon": lambda params: Muon(params, lr=0.02, ns_dtype=torch.float32, use_muon=True),
    "normuon": lambda params: Muon(params, lr=0.02, ns_dtype=torch.float32, use_muon=True, normuon_beta2=0.95,
                                   orthogonalization="polar_express"),
    "shampoo": lambda params: Shampoo(params, lr=0.05, precondition_every=2, block_size=4),
    "soap": lambda params: SOAP(params, lr=0.05, precondition_every=2),
    "adafactor": lambda params: Adafactor(params, lr=0.05),
    "psgd-kron": lambda params: PSGDKron(params, lr=0.05),
}
PLACEMENTS = {"rows": 0, "columns": 1}  # FSDP2's Shard(0); a tensor-parallel Shard(1)
RUNS = [(name, "rows") for name in CASES] + [("muon", "columns"), ("shampoo", "columns")]
RESUMED = [("muon", "rows"), ("shampoo", "rows"), ("soap", "rows"), ("muon", "columns")]


def gradients(step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return [torch.randn(shape, generator=generator) * (1 + step) for shape in SHAPES]


def initial() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100)
    return [torch.randn(shape, generator=generator) for shape in SHAPES]


def sharded(mesh, dim: int) -> list[torch.nn.Parameter]:
    from torch.distributed.tensor import Shard, distribute_tensor

    return [torch.nn.Parameter(distribute_tensor(value, mesh, [Shard(dim)])) for value in initial()]


def step(params, optimizer, steps, dim: int | None = None, mesh=None, meter: TrafficMeter | None = None) -> None:
    """Step ``optimizer`` on the gradients of ``steps``, sharded along ``dim`` over ``mesh`` if given;
    ``meter`` counts the optimizer's collectives (not the gradients' distribution)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    for at in steps:
        for param, grad in zip(params, gradients(at)):
            param.grad = grad if mesh is None else distribute_tensor(grad, mesh, [Shard(dim)])
        with meter or nullcontext():
            optimizer.step()


def module_of(params) -> torch.nn.Module:
    module = torch.nn.Module()
    for index, param in enumerate(params):
        module.register_parameter(f"p{index}", param)
    return module


def whole(params) -> list[torch.Tensor]:
    return [p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone() for p in params]


def reference(name: str) -> tuple[list[torch.Tensor], int]:
    """One process's parameters after ``STEPS`` steps of optimizer ``name``, and its state's bytes."""
    params = [torch.nn.Parameter(value) for value in initial()]
    optimizer = CASES[name](params)
    step(params, optimizer, range(STEPS))
    return whole(params), optimizer_state_bytes(optimizer)


def job(rank: int, world_size: int, folder: str, load_from: int | None, runs: list[tuple[str, str]]) -> dict:
    """Each of ``runs`` (optimizer, placement): step; save a checkpoint at ``SAVE_AT`` under
    ``folder/<world_size>``; load the one ``load_from`` ranks wrote and step on from it."""
    from torch.distributed.tensor import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,))
    results = {}
    for name, placement in runs:
        dim, make = PLACEMENTS[placement], CASES[name]
        params = sharded(mesh, dim)
        optimizer = make(params)
        step(params, optimizer, range(SAVE_AT), dim, mesh)
        checkpoints = ShardedCheckpoints(Path(folder) / str(world_size) / name / placement, keep=1)
        if (name, placement) in RESUMED:
            checkpoints.save(SAVE_AT, module_of(params), optimizer, {})
        meter = TrafficMeter()
        step(params, optimizer, [SAVE_AT], dim, mesh, meter)
        step(params, optimizer, range(SAVE_AT + 1, STEPS), dim, mesh)
        case = dict(final=whole(params), state_bytes=optimizer_state_bytes(optimizer),
                    owned=[bool(optimizer.state.get(p)) for p in params],
                    traffic=dict(meter.payload_by_kind), unknown=dict(meter.unknown))
        if load_from is not None and (name, placement) in RESUMED:
            resumed_params = sharded(mesh, dim)
            resumed = make(resumed_params)
            source = ShardedCheckpoints(Path(folder) / str(load_from) / name / placement, keep=1)
            case["loaded"] = source.load_newest(module_of(resumed_params), resumed)
            case["skipped"] = [str(skipped) for skipped in source.skipped]
            step(resumed_params, resumed, range(SAVE_AT, STEPS), dim, mesh)
            case["resumed"] = whole(resumed_params)
        results[name, placement] = case
    results["flops"] = muon_flops(mesh)
    results["refusals"] = refusals(mesh)
    return results


def muon_flops(mesh) -> float:
    """The FLOPs of one Muon step on this rank, over 16 matrices shaped as 4 blocks of a transformer."""
    from torch.distributed.tensor import Shard, distribute_tensor

    generator = torch.Generator().manual_seed(3)
    shapes = [shape for _ in range(4) for shape in ((96, 32), (32, 32), (128, 32), (32, 128))]
    params = [torch.nn.Parameter(distribute_tensor(torch.randn(s, generator=generator), mesh, [Shard(0)]))
              for s in shapes]
    for param in params:
        param.grad = distribute_tensor(torch.randn(param.shape, generator=generator), mesh, [Shard(0)])
    optimizer = Muon(params, lr=0.02, ns_dtype=torch.float32)
    with FlopCounterMode(display=False) as counter:
        optimizer.step()
    return float(counter.get_total_flops())


def refusals(mesh) -> dict[str, str]:
    from torch.distributed.fsdp import fully_shard

    params = sharded(mesh, 0)[:2]
    step(params, AdamW(params, lr=0.0), [0], 0, mesh)  # gradients on them
    messages = {}
    try:
        Muon(params, lr=0.02, state_format="8bit").step()
    except ValueError as error:
        messages["muon-8bit"] = str(error)
    try:
        KFAC(fully_shard(torch.nn.Linear(4, 4), mesh=mesh), lr=0.01)
    except ValueError as error:
        messages["kfac"] = str(error)
    return messages


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("owner"))
    one = run_processes(job, 1, folder, None, RESUMED, timeout_s=300)
    two = run_processes(job, 2, folder, 1, RUNS, timeout_s=300)
    four = run_processes(job, 4, folder, 2, RUNS, timeout_s=300)
    back = run_processes(job, 1, folder, 2, RESUMED, timeout_s=300)  # 2 -> 1
    return {1: one, 2: two, 4: four, "back": back}


@pytest.mark.parametrize("name, placement", RUNS)
def test_owner_computes_equals_one_process_bit_for_bit(jobs, name, placement):
    expected, _ = reference(name)
    for world in (2, 4):
        for rank_results in jobs[world]:
            for actual, wanted in zip(rank_results[name, placement]["final"], expected, strict=True):
                assert torch.equal(actual, wanted), (world, name, placement)


@pytest.mark.parametrize("name, placement", RESUMED)
def test_checkpoints_reshard_between_process_counts_exactly(jobs, name, placement):
    # 1 -> 2, 2 -> 4 and 2 -> 1: the state is whole tensors keyed by parameter name, so the new owner
    # loads it as the old owner saved it and the run goes on as if uninterrupted
    expected, _ = reference(name)
    for world in (2, 4, "back"):
        for rank_results in jobs[world]:
            case = rank_results[name, placement]
            assert case["loaded"] is not None, case["skipped"]
            assert case["loaded"][0] == SAVE_AT
            for actual, wanted in zip(case["resumed"], expected, strict=True):
                assert torch.equal(actual, wanted), (world, name, placement)


@pytest.mark.parametrize("name", CASES)
def test_each_matrix_state_lives_on_its_owner_only(jobs, name):
    _, whole_bytes = reference(name)
    for world in (2, 4):
        owners = assign_owners([matrix_cost(shape) for shape in SHAPES], world)
        ranks = jobs[world]
        assert sum(r[name, "rows"]["state_bytes"] for r in ranks) == whole_bytes
        for rank, rank_results in enumerate(ranks):
            assert rank_results[name, "rows"]["owned"] == [owner == rank for owner in owners]


def shard_bytes(shape: tuple[int, ...], world: int, rank: int) -> int:
    start, stop = chunk_bounds(shape[0], world)[rank]
    return 4 * (stop - start) * math.prod(shape[1:])


@pytest.mark.parametrize("name", CASES)
def test_traffic_is_one_all_to_all_each_way_of_the_shards_that_move(jobs, name):
    for world in (2, 4):
        owners = assign_owners([matrix_cost(shape) for shape in SHAPES], world)
        for rank, rank_results in enumerate(jobs[world]):
            case = rank_results[name, "rows"]
            shards = [shard_bytes(shape, world, rank) for shape in SHAPES]
            # gather: this rank's parameter and gradient shards of the others' matrices
            sent = sum(2 * size for size, owner in zip(shards, owners) if owner != rank)
            # scatter: the shards of its own matrices that the others hold
            sent += sum(4 * math.prod(shape) - size for shape, size, owner in zip(SHAPES, shards, owners)
                        if owner == rank)
            assert case["unknown"] == {}
            assert case["traffic"] == {"all-to-all": sent}


def test_optimizer_flops_per_rank_fall_as_one_over_n(jobs):
    total = jobs[1][0]["flops"]
    for world in (2, 4):
        flops = [r["flops"] for r in jobs[world]]
        assert sum(flops) == pytest.approx(total, rel=1e-9)  # the same products, divided up
        assert max(flops) <= 1.2 * total / world


def test_refusals_name_the_reason(jobs):
    messages = jobs[2][0]["refusals"]
    assert "state_format='8bit'" in messages["muon-8bit"] and "whole matrices" in messages["muon-8bit"]
    assert "KFAC on sharded (DTensor) parameters" in messages["kfac"]
