"""Sharded checkpoints: exact round trip, corrupt ones skipped, keep-k, resharding N -> M, kill -9 under torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from gradwise.checkpoints.sharded import ShardedCheckpoints
from gradwise.distributed import run_processes
from gradwise.distributed.strategies.fsdp import shard_model
from gradwise.optim import AdamW
from gradwise.train import TrainConfig
from gradwise.train import train as train_run

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(120)]

KINDS = ("replicated", "fsdp")
SAVE_AT, STEPS = 3, 6
RUN_STEPS, RUN_EVERY, KILL_AFTER = 60, 10, 12
RUN = TrainConfig(workload="mlp", workload_options={"dim": 8, "hidden": 16, "train_examples": 256, "val_examples": 64},
                  lr=0.01, threads=1, batch_size=8, eval_every=1000, steps=RUN_STEPS, checkpoint_every=RUN_EVERY,
                  strategy="fsdp")
"""The ``gradwise train`` run killed and restarted (FSDP2: its checkpoints are ``ShardedCheckpoints``)."""
RUN_ARGUMENTS = ["train", "--strategy", "fsdp", "--workload", "mlp", "--workload-options",
                 "dim=8,hidden=16,train_examples=256,val_examples=64", "--lr", "0.01", "--threads", "1",
                 "--batch-size", "8", "--eval-every", "1000", "--no-progress", "--steps", str(RUN_STEPS),
                 "--checkpoint-every", str(RUN_EVERY)]
GLOBAL_BATCH = 8


class Blocks(nn.Module):
    """Two tanh blocks in a ``ModuleList`` (each its own FSDP2 unit under ``shard_model``) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(6, 16), nn.Linear(16, 16)])
        self.head = nn.Linear(16, 3)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            inputs = torch.tanh(block(inputs))
        return self.head(inputs)


def build(kind: str, world_size: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model for ``world_size`` ranks (plain for one process, DDP, or FSDP2) and gradwise's AdamW."""
    torch.manual_seed(0)
    model = Blocks()
    if kind == "fsdp":
        model = shard_model(model)
    elif kind == "replicated":
        model = DistributedDataParallel(model)
    return model, AdamW(model.parameters(), lr=0.05, weight_decay=0.1)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, start: int, stop: int, rank: int = 0,
          world_size: int = 1) -> None:
    """Steps ``start..stop-1``; each rank takes its rows of the global batch drawn for that step."""
    rows = GLOBAL_BATCH // world_size
    for step in range(start, stop):
        generator = torch.Generator().manual_seed(step)
        inputs = torch.randn(GLOBAL_BATCH, 6, generator=generator)
        targets = torch.randn(GLOBAL_BATCH, 3, generator=generator)
        mine = slice(rank * rows, (rank + 1) * rows)
        nn.functional.mse_loss(model(inputs[mine]), targets[mine]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def full(value: torch.Tensor) -> torch.Tensor:
    return (value.full_tensor() if isinstance(value, DTensor) else value).detach().clone()


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every parameter and optimizer-state tensor, gathered whole, by name."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    tensors = {f"model.{name}": full(value) for name, value in model_state.items()}
    for name, state in optimizer_state["state"].items():
        tensors.update({f"optimizer.{name}.{key}": full(value) for key, value in state.items()})
    return tensors


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name.removeprefix("module."): full(value) for name, value in model.named_parameters()}



def two_ranks(rank: int, world_size: int, folder: str) -> dict:
    """Per kind: an uninterrupted run that saves at SAVE_AT and at STEPS (then corrupted); a resume from
    the newest valid save (2 -> 2); a resume from the one-process save (1 -> 2). Then the uninterrupted
    ``gradwise train`` run that the kill test compares with."""
    results = {}
    for kind in KINDS:
        checkpoints = ShardedCheckpoints(Path(folder) / kind, keep=2)
        model, optimizer = build(kind, world_size)
        torch.manual_seed(100 + rank)  # per-rank generators that differ
        train(model, optimizer, 0, SAVE_AT, rank, world_size)
        checkpoints.save(SAVE_AT, model, optimizer, {"next": SAVE_AT, "rank": rank})
        at_save, draw_after_save = snapshot(model, optimizer), torch.rand(3)
        train(model, optimizer, SAVE_AT, STEPS, rank, world_size)
        uninterrupted = params(model)
        checkpoints.save(STEPS, model, optimizer, {})
        if rank == 0:  # one bit flipped in a file that rank 1 verifies (files are checked round robin)
            shard = checkpoints.path(STEPS) / "__0_0.distcp"
            data = bytearray(shard.read_bytes())
            data[-1] ^= 0x01
            shard.write_bytes(bytes(data))

        model, optimizer = build(kind, world_size)
        torch.manual_seed(999)
        step, extra = checkpoints.load_newest(model, optimizer)
        after_load, draw_after_load = snapshot(model, optimizer), torch.rand(3)
        train(model, optimizer, step, STEPS, rank, world_size)
        resumed = params(model)

        model, optimizer = build(kind, world_size)
        from_one = ShardedCheckpoints(Path(folder) / "one", keep=2).load_newest(model, optimizer)
        train(model, optimizer, from_one[0], STEPS, rank, world_size)
        results[kind] = {"uninterrupted": uninterrupted, "resumed": resumed, "from_one": params(model),
                         "at_save": at_save, "after_load": after_load, "draws": (draw_after_save, draw_after_load),
                         "resume": (step, extra), "resume_from_one": from_one,
                         "skipped": [(item.path.name, item.reason) for item in checkpoints.skipped]}
    train_run(RUN, Path(folder) / "uninterrupted")  # the reference for the kill test
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process writes a checkpoint, two ranks write, resume and reshard, one process reads theirs."""
    folder = tmp_path_factory.mktemp("sharded")
    model, optimizer = build("one process", 1)
    train(model, optimizer, 0, SAVE_AT)
    ShardedCheckpoints(folder / "one", keep=2).save(SAVE_AT, model, optimizer, {"next": SAVE_AT})
    train(model, optimizer, SAVE_AT, STEPS)
    one = params(model)
    two = run_processes(two_ranks, 2, str(folder))
    two_on_one = {}
    for kind in KINDS:
        model, optimizer = build("one process", 1)
        step, extra = ShardedCheckpoints(folder / kind, keep=2).load_newest(model, optimizer)
        train(model, optimizer, step, STEPS)
        two_on_one[kind] = {"final": params(model), "resume": (step, extra)}
    return one, two, two_on_one, folder


def assert_same(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor], exact: bool) -> None:
    assert left.keys() == right.keys()
    for name, value in left.items():
        if exact:
            assert torch.equal(value, right[name]), name
        else:
            torch.testing.assert_close(value, right[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_two_rank_round_trip_is_exact(runs, kind):
    _, two, _, _ = runs
    for rank, result in enumerate(two):
        result = result[kind]
        assert_same(result["after_load"], result["at_save"], exact=True)  # parameters, AdamW moments and steps
        assert sum(name.endswith(".exp_avg_sq") for name in result["at_save"]) == 6
        assert_same(result["resumed"], result["uninterrupted"], exact=True)
        assert result["resume"] == (SAVE_AT, {"next": SAVE_AT, "rank": rank})  # each rank's own extra
        assert torch.equal(*result["draws"])  # each rank's generator continues where it was saved
        assert result["skipped"] == [(f"step-{STEPS:08d}", "checksum mismatch in __0_0.distcp (the file was modified)")]
    assert not torch.equal(two[0][kind]["draws"][0], two[1][kind]["draws"][0])


@pytest.mark.parametrize("kind", KINDS)
def test_one_to_two_and_two_to_one_resharding(runs, kind):
    one, two, two_on_one, _ = runs
    for rank in range(2):
        assert_same(two[rank][kind]["uninterrupted"], one, exact=False)  # the 1- and 2-process runs agree
        assert_same(two[rank][kind]["from_one"], one, exact=False)
        assert two[rank][kind]["resume_from_one"] == (SAVE_AT, {"next": SAVE_AT})
    assert_same(two_on_one[kind]["final"], two[0][kind]["uninterrupted"], exact=False)
    assert two_on_one[kind]["resume"] == (SAVE_AT, {"next": SAVE_AT, "rank": 0})  # rank 0's extra



def test_keeps_the_newest_k_and_skips_incomplete_or_corrupt_ones_with_the_reason(tmp_path):
    checkpoints = ShardedCheckpoints(tmp_path, keep=3)
    model, optimizer = build("one process", 1)
    saved = {}
    for step in range(1, 6):
        train(model, optimizer, step - 1, step)
        checkpoints.save(step, model, optimizer, {"step": step})
        saved[step] = params(model)
    assert [step for step, _ in checkpoints.checkpoints()] == [5, 4, 3]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["step-00000003", "step-00000004", "step-00000005"]

    shard = next(checkpoints.path(5).glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit flipped
    shard.write_bytes(bytes(data))
    rank_file = checkpoints.path(4) / "rank-00000.ckpt"
    size = rank_file.stat().st_size
    rank_file.write_bytes(rank_file.read_bytes()[:100])
    (tmp_path / ".step-00000009.tmp").mkdir()  # a save that crashed half-way
    model, optimizer = build("one process", 1)
    assert checkpoints.load_newest(model, optimizer) == (3, {"step": 3})
    assert_same(params(model), saved[3], exact=True)
    assert [(item.path.name, item.reason) for item in checkpoints.skipped] == [
        (".step-00000009.tmp", "incomplete: the save did not finish (temporary folder)"),
        ("step-00000005", f"checksum mismatch in {shard.name} (the file was modified)"),
        ("step-00000004", f"truncated: rank-00000.ckpt has 100 of {size} bytes"),
    ]
    (checkpoints.path(3) / "manifest.json").unlink()
    assert checkpoints.load_newest(model, optimizer) is None
    assert checkpoints.skipped[-1].reason == "incomplete: no manifest.json"
    with pytest.raises(ValueError, match="keep must be an integer >= 1, got 0"):
        ShardedCheckpoints(tmp_path, keep=0)
    with pytest.raises(ValueError, match="extra must hold only tensors, numbers, strings, lists, tuples and dicts, "
                                         "got Unsupported global: GLOBAL iter$"):
        checkpoints.save(6, model, optimizer, {"stream": iter([])})
    assert not list(tmp_path.glob("*step-00000006*"))  # nothing written


def test_an_optimizer_before_its_first_step_is_saved_without_creating_state(tmp_path):
    checkpoints = ShardedCheckpoints(tmp_path, keep=2)
    model, optimizer = build("one process", 1)
    optimizer.param_groups[0]["lr"] = 0.02  # as a warmup schedule sets it
    checkpoints.save(0, model, optimizer, {})
    assert not optimizer.state  # get_state_dict would have taken a zero-lr step to create it
    untouched = params(model)
    train(model, optimizer, 0, 2)
    assert optimizer.state
    assert checkpoints.load_newest(model, optimizer) == (0, {})  # a rollback to step 0
    assert not optimizer.state and optimizer.param_groups[0]["lr"] == 0.02
    assert_same(params(model), untouched, exact=True)


def descendants(pid: int) -> list[int]:
    """The processes started by ``pid``, by their children, and so on (from ``/proc``)."""
    found = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:  # the process ended
        return found
    for task in tasks:
        try:
            children = [int(child) for child in (task / "children").read_text().split()]
        except FileNotFoundError:  # the thread ended
            continue
        for child in children:
            found += [child, *descendants(child)]
    return found


def worker_pid(launcher: int, rank: int) -> int | None:
    """The pid of the process with ``RANK=rank`` in its environment among the descendants of ``launcher``."""
    for pid in descendants(launcher):
        try:
            environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError):
            continue
        if f"RANK={rank}".encode() in environment:
            return pid
    return None


def steps_logged(folder: Path) -> int:
    path = folder / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return max((json.loads(line)["step"] for line in lines if line.endswith("}")), default=0)


@pytest.mark.timeout(240)  # six processes start, each importing torch and gradwise; slow on a busy machine
def test_a_worker_killed_under_torchrun_resumes_from_the_newest_checkpoint_and_ends_equal(runs, tmp_path):
    """``gradwise train --nproc 2 --max-restarts 1``: SIGKILL to rank 1 mid-run; torchrun restarts both
    workers, they resume from the newest sharded checkpoint and end with the uninterrupted run's parameters."""
    out = tmp_path / "killed"
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    log = tmp_path / "output.txt"
    with open(log, "w") as output_file:  # a file, not a pipe: nobody reads a pipe while the test polls
        command = [sys.executable, "-m", "gradwise", *RUN_ARGUMENTS, "--nproc", "2", "--max-restarts", "1",
                   "--out", str(out)]
        launcher = subprocess.Popen(command, env=environment, start_new_session=True, stdout=output_file,
                                    stderr=subprocess.STDOUT)
    killed = None
    try:
        deadline = time.monotonic() + 200
        while killed is None and launcher.poll() is None and time.monotonic() < deadline:
            if steps_logged(out) >= KILL_AFTER and (killed := worker_pid(launcher.pid, rank=1)) is not None:
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.01)
        launcher.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    output = log.read_text()
    assert killed is not None, f"the run ended before step {KILL_AFTER}:\n{output[-3000:]}"
    assert launcher.returncode == 0, output[-3000:]
    resumed = json.loads((out / "summary.json").read_text())["resumed_from_step"]
    assert resumed is not None and resumed % RUN_EVERY == 0 and RUN_EVERY <= resumed <= RUN_STEPS, output[-3000:]
    final = torch.load(out / "model.pt", weights_only=True)
    reference = torch.load(runs[3] / "uninterrupted" / "model.pt", weights_only=True)
    assert_same(final, reference, exact=True)
