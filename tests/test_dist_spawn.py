"""The process launcher every distributed test uses: results by rank, failures and deadlines surface."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from gradwise.distributed import RankSlice, WorkerFailed, init_distributed, run_processes
from gradwise.problems.data import ShuffledEpochs

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(120)]


def all_reduce_rank(rank: int, world_size: int, offset: float) -> float:
    value = torch.tensor([rank + offset])
    dist.all_reduce(value)
    return value.item()


def fail_on_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ArithmeticError("rank one gives up")
    dist.barrier()


def sleep_on_rank_zero(rank: int, world_size: int) -> None:
    if rank == 0:
        time.sleep(60)
    dist.barrier()


def describe(rank: int, world_size: int) -> tuple[int, int, str]:
    context = init_distributed("cpu")
    return context.rank, context.world_size, context.backend


@pytest.mark.parametrize("world_size", [2, 3])
def test_every_rank_returns_its_result(world_size):
    expected = sum(range(world_size)) + 0.5 * world_size
    assert run_processes(all_reduce_rank, world_size, 0.5) == [expected] * world_size


def test_a_failing_rank_raises_with_its_traceback():
    with pytest.raises(WorkerFailed, match="(?s)rank 1 of 2.*rank one gives up"):
        run_processes(fail_on_rank_one, 2)


def test_a_hanging_job_times_out_instead_of_blocking():
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish in 3 s"):
        run_processes(sleep_on_rank_zero, 2, timeout_s=3)
    assert time.monotonic() - started < 20


def test_init_distributed_inside_a_group_describes_it():
    assert run_processes(describe, 2) == [(0, 2, "gloo"), (1, 2, "gloo")]


def test_init_distributed_without_an_endpoint_names_what_is_missing(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="no rendezvous endpoint: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT not set"):
        init_distributed("cpu")


def test_rank_slices_concatenate_to_the_global_batch():
    inputs, targets = torch.randn(40, 3), torch.arange(40)
    whole = ShuffledEpochs(inputs, targets, 12, seed=5)
    slices = [RankSlice(ShuffledEpochs(inputs, targets, 12, seed=5), rank, 3) for rank in range(3)]
    for _ in range(5):
        big_inputs, big_targets = whole.next_batch()
        parts = [stream.next_batch() for stream in slices]
        torch.testing.assert_close(torch.cat([p[0] for p in parts]), big_inputs, rtol=0, atol=0)
        torch.testing.assert_close(torch.cat([p[1] for p in parts]), big_targets, rtol=0, atol=0)
    assert all(stream.state_dict() == whole.state_dict() for stream in slices)


def test_a_global_batch_that_does_not_split_evenly_is_refused():
    stream = RankSlice(ShuffledEpochs(torch.randn(10, 2), torch.arange(10), 5), 0, 2)
    with pytest.raises(ValueError, match="global batch of 5 rows does not split evenly over 2 ranks"):
        stream.next_batch()


def return_tensors(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    return {"rank": torch.full((3,), float(rank)), "big": torch.arange(100_000)}


def test_tensors_come_back_intact_after_the_processes_exit():
    results = run_processes(return_tensors, 2)
    for rank, result in enumerate(results):
        assert torch.equal(result["rank"], torch.full((3,), float(rank)))
        assert torch.equal(result["big"], torch.arange(100_000))


def test_every_public_name_of_the_package_resolves():
    import gradwise.distributed as package

    for name in package.__all__:
        assert getattr(package, name).__name__ == name
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        package.Nope  # noqa: B018
