"""Local SGD and DiLoCo on real processes: bytes, equivalences, the outer Nesterov step, resume, mlp loss.

Every check runs in one 2-process job (spawning costs seconds on this machine); the tests
below read its results.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gradwise.distributed import RankSlice, run_processes
from gradwise.distributed.strategies.periodic_averaging import DiLoCo, LocalSGD
from gradwise.optim import SGD, AdamW
from gradwise.problems.workloads import make_workload

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(120)]

WORLD = 2
STEPS = 8
LR = 0.1
MLP_STEPS, MLP_BATCH = 200, 32


class Tiny(nn.Module):
    """A few dozen parameters in two dtypes, so the byte count covers both element sizes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.hidden = nn.Linear(6, 5)
        self.out = nn.Linear(5, 3)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 3, dtype=torch.float64))

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x))) * self.scale.float()


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(4, 6, generator=generator), torch.randn(4, 3, generator=generator)


def payload_bytes(model: nn.Module) -> int:
    """What one DDP gradient all-reduce sends: every gradient's elements times their size."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def tensor(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])


def train_tiny(rank: int, make_sync, steps: int = STEPS, ddp: bool = False):
    model = Tiny()
    net = DistributedDataParallel(model) if ddp else model
    optimizer = SGD(model.parameters(), lr=LR)
    sync = make_sync(model) if make_sync else None
    for step in range(steps):
        x, y = batch(rank, step)
        F.mse_loss(net(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        if sync:
            sync.after_step()
    return model, sync


def resume_run(rank: int, interrupt_at: int | None, steps: int = 10) -> torch.Tensor:
    """DiLoCo (H = 3) with AdamW; optionally checkpointed in memory after ``interrupt_at``
    steps (mid-period, after two outer steps) and continued on fresh objects."""
    def build():
        model = Tiny()
        optimizer = AdamW(model.parameters(), lr=0.05)
        return model, optimizer, DiLoCo(model, sync_every=3)

    model, optimizer, diloco = build()
    for step in range(steps):
        if step == interrupt_at:
            saved = copy.deepcopy((model.state_dict(), optimizer.state_dict(), diloco.state_dict()))
            model, optimizer, diloco = build()
            model.load_state_dict(saved[0])
            optimizer.load_state_dict(saved[1])
            diloco.load_state_dict(saved[2])
        x, y = batch(rank, step)
        F.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        diloco.after_step()
    return torch.cat([flat(model), torch.tensor([diloco.steps, diloco.bytes_communicated], dtype=torch.float64)])


def train_mlp(rank: int, world_size: int, strategy: str) -> tuple[float, int]:
    """2 ranks x 32 examples per step on ``mlp`` with AdamW; the final loss on the whole training set."""
    workload = make_workload("mlp", batch_size=world_size * MLP_BATCH, seed=0)
    model = workload.model
    net = DistributedDataParallel(model) if strategy == "ddp" else model
    sync = {"ddp": None, "localsgd": lambda: LocalSGD(model, 4), "diloco": lambda: DiLoCo(model, 8)}[strategy]
    sync = sync() if sync else None
    optimizer = AdamW(model.parameters(), lr=3e-3)
    data = RankSlice(workload.train_data, rank, world_size)
    for _ in range(MLP_STEPS):
        workload.loss(net, data.next_batch()).backward()
        optimizer.step()
        optimizer.zero_grad()
        if sync:
            sync.after_step()
    stream = workload.train_data
    with torch.no_grad():
        loss = workload.loss(model, (stream.inputs, stream.targets)).item()
    return loss, sync.bytes_communicated if sync else MLP_STEPS * payload_bytes(model)


def all_checks(rank: int, world_size: int) -> dict:
    results: dict = {"payload": payload_bytes(Tiny())}
    for name, make in (("localsgd", LocalSGD), ("diloco", DiLoCo)):
        for every in (2, 4):
            model, sync = train_tiny(rank, lambda m, make=make, every=every: make(m, every))
            results[name, every] = (sync.bytes_communicated, flat(model))
    results["h1"] = flat(train_tiny(rank, lambda m: LocalSGD(m, 1))[0])
    results["ddp"] = flat(train_tiny(rank, None, ddp=True)[0])
    results["diloco-plain"] = flat(train_tiny(rank, lambda m: DiLoCo(m, 2, outer_lr=1.0, outer_momentum=0.0))[0])
    results["resume"] = (resume_run(rank, None), resume_run(rank, 7))
    for strategy in ("ddp", "localsgd", "diloco"):
        results["mlp", strategy] = train_mlp(rank, world_size, strategy)
    # tensors would travel back through shared memory that dies with the process: send numbers
    return {key: ([v.tolist() if isinstance(v, torch.Tensor) else v for v in value] if isinstance(value, tuple)
                  else value.tolist() if isinstance(value, torch.Tensor) else value) for key, value in results.items()}


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_processes(all_checks, WORLD, timeout_s=100)


def reference(every: int, outer_lr: float, outer_momentum: float) -> torch.Tensor:
    """DiLoCo by hand in one process: two replicas, then Nesterov on the mean change."""
    anchor = Tiny()
    momentum = [torch.zeros_like(p) for p in anchor.parameters()]
    replicas = [copy.deepcopy(anchor) for _ in range(WORLD)]
    optimizers = [torch.optim.SGD(replica.parameters(), lr=LR) for replica in replicas]
    for step in range(STEPS):
        for rank, (replica, optimizer) in enumerate(zip(replicas, optimizers)):
            x, y = batch(rank, step)
            F.mse_loss(replica(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
        if (step + 1) % every == 0:
            with torch.no_grad():
                for index, theta in enumerate(anchor.parameters()):
                    delta = sum(theta - list(r.parameters())[index] for r in replicas) / WORLD
                    momentum[index].mul_(outer_momentum).add_(delta)
                    theta.sub_(outer_lr * (delta + outer_momentum * momentum[index]))
                for replica in replicas:
                    replica.load_state_dict(anchor.state_dict())
    return flat(anchor)


@pytest.mark.parametrize("name", ["localsgd", "diloco"])
@pytest.mark.parametrize("every", [2, 4])
def test_h_steps_between_syncs_send_h_times_fewer_bytes_than_ddp(ranks, name, every):
    ddp_bytes = STEPS * ranks[0]["payload"]
    assert ranks[0]["payload"] == (6 * 5 + 5 + 5 * 3 + 3) * 4 + 3 * 8
    for result in ranks:
        assert result[name, every][0] * every == ddp_bytes


@pytest.mark.parametrize("name", ["localsgd", "diloco"])
@pytest.mark.parametrize("every", [2, 4])
def test_replicas_agree_after_a_sync_and_match_the_single_process_reference(ranks, name, every):
    assert ranks[0][name, every][1] == ranks[1][name, every][1]
    outer = (0.7, 0.9) if name == "diloco" else (1.0, 0.0)
    torch.testing.assert_close(tensor(ranks[0][name, every][1]), reference(every, *outer), rtol=1e-5, atol=1e-6)


def test_local_sgd_every_step_is_synchronous_data_parallel_sgd(ranks):
    for result in ranks:
        torch.testing.assert_close(tensor(result["h1"]), tensor(result["ddp"]), rtol=1e-5, atol=1e-6)


def test_diloco_without_momentum_at_outer_lr_one_is_local_sgd(ranks):
    torch.testing.assert_close(tensor(ranks[0]["diloco-plain"]), tensor(ranks[0]["localsgd", 2][1]),
                               rtol=1e-6, atol=1e-7)


def test_diloco_resumes_exactly_mid_period(ranks):
    for result in ranks:
        uninterrupted, resumed = result["resume"]
        assert resumed == uninterrupted
        assert uninterrupted[-2:] == [10, 3 * payload_bytes(Tiny())]


def test_local_sgd_and_diloco_reach_ddps_loss_on_mlp_with_fewer_bytes(ranks):
    ddp_loss, ddp_bytes = ranks[0]["mlp", "ddp"]
    for strategy, every in (("localsgd", 4), ("diloco", 8)):
        loss, sent = ranks[0]["mlp", strategy]
        assert abs(loss - ddp_loss) <= 0.05 * ddp_loss, (strategy, loss, ddp_loss)
        assert sent * every == ddp_bytes
        assert ranks[1]["mlp", strategy] == [loss, sent]


def test_bad_sync_settings_are_refused():
    with pytest.raises(ValueError, match="sync_every must be an integer >= 1, got 0"):
        LocalSGD(Tiny(), 0)
    with pytest.raises(ValueError, match=r"outer_momentum must be in \[0, 1\), got 1.0"):
        DiLoCo(Tiny(), 4, outer_momentum=1.0)
    with pytest.raises(RuntimeError, match="needs a torch.distributed process group"):
        LocalSGD(Tiny(), 4)
