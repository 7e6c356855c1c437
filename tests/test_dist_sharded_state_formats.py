"""State formats on sharded (DTensor) parameters: blocks inside each rank's shard, exact checkpoints, resharding.

One spawned job of 2 ranks steps each format on row-sharded DTensors of uneven sizes (one rank's
shard of a single-row tensor is empty) beside a plain optimizer over the same rank's shards as
separate tensors: the blocks lie inside the shard, so the two are bitwise equal. Each then saves a
``ShardedCheckpoints`` checkpoint, loads it into fresh ones and steps on; a 1-rank job reshards it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gradwise.checkpoints.sharded import ShardedCheckpoints
from gradwise.distributed import run_processes
from gradwise.distributed.state_bytes import optimizer_state_bytes
from gradwise.optim import SGD, AdamW, Lion, Muon
from gradwise.plan.memory import predicted_bytes

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(120)]

SHAPES = [(5, 7), (3,), (1, 4), (300, 3)]
STEPS, SAVE_AT = 4, 2
CASES = {
    "adamw-8bit": lambda params: AdamW(params, lr=0.05, weight_decay=0.1, state_format="8bit"),
    "adamw-8bit-generic": lambda params: AdamW(params, lr=0.05, weight_decay=0.1, state_format="8bit", fused=False),
    "adamw-4bit": lambda params: AdamW(params, lr=0.05, weight_decay=0.1, state_format="4bit"),
    "adamw-bf16-sr": lambda params: AdamW(params, lr=0.05, state_format="bf16-sr"),
    "lion-8bit": lambda params: Lion(params, lr=0.01, weight_decay=0.1, state_format="8bit"),
    "sgd-bf16": lambda params: SGD(params, lr=0.1, momentum=0.9, state_format="bf16"),
}


def gradients(step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return [torch.randn(shape, generator=generator) * (1 + step) for shape in SHAPES]


def initial() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100)
    return [torch.randn(shape, generator=generator) for shape in SHAPES]


def sharded(mesh) -> list[torch.nn.Parameter]:
    from torch.distributed.tensor import Shard, distribute_tensor

    return [torch.nn.Parameter(distribute_tensor(value, mesh, [Shard(0)])) for value in initial()]


def step_sharded(params, optimizer, mesh, start: int, stop: int) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor

    for step in range(start, stop):
        for param, grad in zip(params, gradients(step)):
            param.grad = distribute_tensor(grad, mesh, [Shard(0)])
        optimizer.step()


def stored(optimizer) -> list[dict[str, object]]:
    """Each parameter's stored state (codes, scales, counters), copied."""
    return [{key: value.clone() if torch.is_tensor(value) else value for key, value in optimizer.state[p].items()}
            for group in optimizer.param_groups for p in group["params"]]


def same_stored(left, right) -> bool:
    return all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k]
                                             for k in a) for a, b in zip(left, right, strict=True))


def two_ranks(rank: int, world_size: int, folder: str) -> dict:
    from torch.distributed.tensor import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,))
    results = {}
    for name, make in CASES.items():
        params = sharded(mesh)
        optimizer = make(params)
        # the reference: this rank's shards as plain tensors, the same gradients' shards
        shards = [torch.nn.Parameter(p.to_local().detach().clone()) for p in params]
        reference = make(shards)
        for step in range(STEPS):
            for shard, grad in zip(shards, gradients(step)):
                shard.grad = grad.tensor_split(world_size)[rank].clone()  # Shard(0)'s split on 2 ranks
            reference.step()
        step_sharded(params, optimizer, mesh, 0, SAVE_AT)
        checkpoints = ShardedCheckpoints(Path(folder) / name, keep=1)
        checkpoints.save(SAVE_AT, params_module(params), optimizer, {})
        at_save = stored(optimizer)
        presented = optimizer.state_dict()["state"]
        step_sharded(params, optimizer, mesh, SAVE_AT, STEPS)

        resumed_params = sharded(mesh)
        resumed = make(resumed_params)
        loaded = checkpoints.load_newest(params_module(resumed_params), resumed)
        after_load = stored(resumed)
        step_sharded(resumed_params, resumed, mesh, SAVE_AT, STEPS)
        results[name] = dict(
            equal_to_shards=all(torch.equal(p.to_local(), s) for p, s in zip(params, shards)),
            shard_sizes=[p.to_local().shape[0] for p in params],
            bytes=optimizer_state_bytes(optimizer),
            predicted_bytes=predicted_bytes(optimizer)["optimizer_state"],
            reference_bytes=optimizer_state_bytes(reference),
            loaded=loaded is not None, exact_state=same_stored(after_load, at_save),
            presented={key: type(value).__name__ for key, value in presented[0].items()},
            resumed_equal=all(torch.equal(a.to_local(), b.to_local()) for a, b in zip(params, resumed_params)),
            final=[p.full_tensor() for p in params],
        )
    matrix = sharded(mesh)[:1]
    step_sharded(matrix, SGD(matrix, lr=0.0), mesh, 0, 1)  # a gradient on it
    try:
        Muon(matrix, lr=0.02, state_format="8bit").step()
    except ValueError as error:
        results["muon"] = str(error)
    return results


def one_rank(rank: int, world_size: int, folder: str) -> dict:
    """Each case's 2-rank checkpoint loaded on a 1-rank mesh (the blocks re-cut), stepped to the end."""
    from torch.distributed.tensor import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,))
    results = {}
    for name, make in CASES.items():
        params = sharded(mesh)
        optimizer = make(params)
        loaded = ShardedCheckpoints(Path(folder) / name, keep=1).load_newest(params_module(params), optimizer)
        step_sharded(params, optimizer, mesh, SAVE_AT, STEPS)
        results[name] = dict(loaded=loaded, final=[p.full_tensor() for p in params])
    return results


def params_module(params) -> torch.nn.Module:
    module = torch.nn.Module()
    for index, param in enumerate(params):
        module.register_parameter(f"p{index}", param)
    return module


def step_sharded_plain(params, optimizer) -> None:
    for param, grad in zip(params, gradients(0)):
        param.grad = grad
    optimizer.step()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("formats")
    two = run_processes(two_ranks, 2, str(folder), timeout_s=100)
    return folder, two


@pytest.fixture(scope="module")
def resharded(runs):
    """The 2-rank checkpoints loaded by a 1-rank job."""
    return run_processes(one_rank, 1, str(runs[0]), timeout_s=100)[0]


@pytest.mark.parametrize("name", CASES)
def test_a_sharded_step_equals_the_same_step_on_each_shard_alone(runs, name):
    _, two = runs
    for rank in range(2):
        case = two[rank][name]
        assert case["equal_to_shards"]
        assert case["bytes"] == case["reference_bytes"]  # codes and scales of this rank's shards only
        assert case["predicted_bytes"] == case["bytes"]  # the memory rule, on the rank's shards
    assert [two[rank][name]["shard_sizes"] for rank in range(2)] == [[3, 2, 1, 150], [2, 1, 0, 150]]


@pytest.mark.parametrize("name", CASES)
def test_sharded_checkpoints_of_formatted_state_resume_exactly(runs, name):
    _, two = runs
    for rank in range(2):
        case = two[rank][name]
        assert case["loaded"] and case["exact_state"] and case["resumed_equal"]
        # in state_dict() the moments are DTensors of their values (a signed quantised one's scales per
        # value), never the rank's own blocks
        moments = {key: kind for key, kind in case["presented"].items() if key not in ("step", "rounding_draws")}
        assert set(moments.values()) == {"DTensor"}


@pytest.mark.parametrize("name", CASES)
def test_two_ranks_reshard_to_one_with_the_blocks_recut(runs, resharded, name):
    _, two = runs
    one = resharded
    assert one[name]["loaded"] == (SAVE_AT, {})
    # the blocks differ, so the moments were re-quantised: the runs part by far less than the steps moved
    # (4 bits: 7 magnitudes per sign, a re-quantised first moment moves by up to half a code)
    share = 0.1 if "4bit" in name else 0.05
    for recut, uninterrupted, begin in zip(one[name]["final"], two[0][name]["final"], initial()):
        moved = (uninterrupted - begin).abs().max()
        assert (recut - uninterrupted).abs().max() <= share * moved


def test_a_plain_optimizer_refuses_sharded_formatted_moments_with_the_reason(runs):
    folder, _ = runs
    params = [torch.nn.Parameter(value) for value in initial()]
    checkpoints = ShardedCheckpoints(folder / "adamw-8bit", keep=1)
    optimizer = CASES["adamw-8bit"](params)
    step_sharded_plain(params, optimizer)
    assert checkpoints.load_newest(params_module(params), optimizer) is None
    assert "was saved as torch.float32, this run keeps torch.uint8" in checkpoints.skipped[0].reason


def test_muon_refuses_a_state_format_on_sharded_matrices(runs):
    _, two = runs
    assert "needs whole matrices" in two[0]["muon"]


@pytest.mark.timeout(240)  # two launches of 2 processes each
def test_gradwise_train_fsdp_with_8bit_state_resumes_to_the_uninterrupted_run(tmp_path):
    """``gradwise train --strategy fsdp --state-format 8bit``: a copy of the run folder without its last
    checkpoint resumes from the one before and ends with the uninterrupted run's weights, bit for bit."""
    arguments = ["train", "--strategy", "fsdp", "--nproc", "2", "--workload", "mlp", "--workload-options",
                 "dim=8,hidden=16,train_examples=256,val_examples=64", "--state-format", "8bit", "--lr", "0.01",
                 "--threads", "1", "--batch-size", "8", "--eval-every", "1000", "--no-progress", "--steps", "8",
                 "--checkpoint-every", "4"]
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    run = subprocess.run([sys.executable, "-m", "gradwise", *arguments, "--out", str(uninterrupted)],
                         env=environment, capture_output=True, text=True, timeout=200)
    assert run.returncode == 0, run.stderr[-3000:]
    shutil.copytree(uninterrupted, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000008")
    run = subprocess.run([sys.executable, "-m", "gradwise", *arguments, "--out", str(resumed), "--resume"],
                         env=environment, capture_output=True, text=True, timeout=200)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((resumed / "summary.json").read_text())["resumed_from_step"] == 4
    final = torch.load(resumed / "model.pt", weights_only=True)
    reference = torch.load(uninterrupted / "model.pt", weights_only=True)
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[name], reference[name]) for name in final)
