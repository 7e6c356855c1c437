"""Data parallel training through the loop: DDP on 2 gloo processes equals one process on the 2x batch."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from gradwise.distributed import DistContext, run_processes
from gradwise.distributed.strategies.ddp import DDPStrategy
from gradwise.distributed.strategies.registry import check_strategy, make_strategy
from gradwise.train import TrainConfig, Trainer

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(120)]

MLP = dict(dim=8, hidden=16, train_examples=512, val_examples=128)
PARAMETER_BYTES = 4 * (8 * 16 + 16 + 16 * 16 + 16 + 16 * 4 + 4)
"""fp32 gradient of the mlp above: 484 numbers, all in one DDP bucket."""
STEPS = 6


def mlp_config(**settings) -> TrainConfig:
    base = dict(workload="mlp", workload_options=MLP, steps=STEPS, lr=1e-2, eval_every=1000, threads=1,
                schedule="constant", warmup_steps=0)
    return TrainConfig(**{**base, **settings})


def run_config(config: TrainConfig, out=None) -> dict:
    trainer = Trainer(config, out)
    result = trainer.run()
    # numpy arrays: they cross the process boundary by value (torch tensors would go by shared memory)
    return {"params": [p.detach().numpy().copy() for p in trainer.model.parameters()],
            "bytes": result.bytes_communicated, "loss": result.final_metrics["val_loss"]}


def ddp_runs(rank: int, world_size: int, folder: str) -> dict[str, dict]:
    """Every DDP run of this file, in one 2-process job (spawning costs seconds)."""
    runs = {
        "plain": (dict(batch_size=8), None),
        "accumulate": (dict(batch_size=4, accumulate=2), None),
        "fp16": (dict(batch_size=8, strategy_options={"compression": "fp16"}), None),
        "powersgd": (dict(batch_size=8, steps=20, strategy_options={"compression": "powersgd", "start_iter": 2}),
                     f"{folder}/powersgd"),
    }
    return {name: run_config(mlp_config(strategy="ddp", **settings), out) for name, (settings, out) in runs.items()}


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    return run_processes(ddp_runs, 2, str(folder)), folder


@pytest.mark.parametrize("name", ["plain", "accumulate"])
def test_two_ranks_with_batch_b_equal_one_process_with_batch_2b(ddp, name):
    ranks, _ = ddp
    reference = run_config(mlp_config(batch_size=16))
    for rank in ranks:
        for ours, theirs in zip(rank[name]["params"], reference["params"], strict=True):
            torch.testing.assert_close(torch.from_numpy(ours), torch.from_numpy(theirs), rtol=1e-5, atol=1e-6)
    initial = Trainer(mlp_config(batch_size=16)).model.parameters()
    assert not all(torch.equal(torch.from_numpy(a), b) for a, b in zip(ranks[0][name]["params"], initial, strict=True))


@pytest.mark.parametrize("name", ["plain", "accumulate"])
def test_gradients_are_all_reduced_once_per_step_even_with_accumulation(ddp, name):
    ranks, _ = ddp
    assert [rank[name]["bytes"] for rank in ranks] == [STEPS * PARAMETER_BYTES] * 2


def test_fp16_compression_halves_the_bytes_and_stays_close_to_fp32(ddp):
    ranks, _ = ddp
    assert ranks[0]["fp16"]["bytes"] == STEPS * PARAMETER_BYTES // 2
    for ours, exact in zip(ranks[0]["fp16"]["params"], ranks[0]["plain"]["params"], strict=True):
        torch.testing.assert_close(torch.from_numpy(ours), torch.from_numpy(exact), rtol=0, atol=2e-3)


def test_powersgd_sends_low_rank_factors_after_its_warm_up_and_trains(ddp):
    ranks, folder = ddp
    # rank 1: P and Q of the 16x8, 16x16 and 4x16 matrices, (16+8) + (16+16) + (4+16) = 76 numbers, and the
    # 36 bias entries whole; the first start_iter = 2 steps send all 484 numbers
    compressed = 4 * (76 + 36)
    assert [rank["powersgd"]["bytes"] for rank in ranks] == [2 * PARAMETER_BYTES + 18 * compressed] * 2
    assert compressed / PARAMETER_BYTES == pytest.approx(0.2314, abs=1e-4)
    records = [json.loads(line) for line in (folder / "powersgd" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 20  # rank 0 alone writes the metrics
    assert sum(losses[-5:]) / 5 < 0.9 * losses[0]
    for ours, theirs in zip(ranks[0]["powersgd"]["params"], ranks[1]["powersgd"]["params"], strict=True):
        assert (ours == theirs).all()  # the replicas stay identical


def test_bf16_compression_on_gloo_is_refused_with_a_clear_error():
    strategy = DDPStrategy(DistContext(0, 2, 0, torch.device("cpu"), "gloo"), {"compression": "bf16"})
    with pytest.raises(ValueError, match="compression 'bf16' needs the nccl backend"):
        strategy.wrap_model(nn.Linear(2, 2))


@pytest.mark.parametrize("name, options, world_size, message", [
    ("nope", {}, 2, "strategy must be one of"),
    ("ddp", {}, 1, "strategy 'ddp' needs at least 2 processes, got 1"),
    ("single", {}, 2, "strategy 'single' runs at most 1 process"),
    ("ddp", {"compression": "zip"}, 2, "compression must be one of"),
    ("ddp", {"ranks": 2}, 2, "strategy 'ddp' option must be one of"),
    ("ddp", {"rank": 0}, 2, "rank must be an integer >= 1, got 0"),
])
def test_bad_strategy_settings_are_named(name, options, world_size, message):
    with pytest.raises(ValueError, match=message):
        check_strategy(name, options, world_size)


def test_one_process_runs_the_single_strategy_by_default():
    assert make_strategy(None, {}, None).name == "single"
    assert check_strategy(None, {}, 4) == "ddp"
