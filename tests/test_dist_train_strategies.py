"""Every parallel strategy through the training loop on 2 gloo processes, against one process on the global batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from gradwise.distributed import run_processes
from gradwise.distributed.strategies.registry import check_strategy
from gradwise.train import TrainConfig, Trainer

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(180)]

MLP = dict(dim=8, hidden=16, train_examples=512, val_examples=128)
PARAMETER_BYTES = 4 * 484
"""fp32 parameters (and gradient) of that mlp."""
GPT = dict(seq_len=16, d_model=32, n_layer=2, n_head=2, eval_windows=4, final_eval_windows=4)
STEPS = 6


def config(**settings) -> TrainConfig:
    base = dict(workload="mlp", workload_options=MLP, steps=STEPS, lr=1e-2, eval_every=1000, threads=1,
                schedule="constant", warmup_steps=0, batch_size=8)
    return TrainConfig(**{**base, **settings})


RUNS = {
    "zero1": config(strategy="zero1", checkpoint_every=3),
    "zero2": config(strategy="zero2", optimizer="lion", lr=1e-3),
    # evaluations at x in the middle of the run: ZeroOptimizer.eval() moves each rank's part and gathers them
    "zero2-schedule-free": config(strategy="zero2", optimizer="schedule-free-adamw", eval_every=2, warmup_steps=2),
    "fsdp": config(strategy="fsdp", accumulate=2, batch_size=4),
    # QK-Clip at about the initial logits, so it acts on most heads and steps: the ranks combine their maxima
    "ddp-qk-clip": config(strategy="ddp", workload="tiny-gpt", workload_options=GPT, optimizer="momentum", lr=0.1,
                          batch_size=4, steps=4, qk_clip=0.03, precision="fp32"),
    "localsgd": config(strategy="localsgd", strategy_options={"sync_every": 1}, optimizer="sgd", clip=None),
    "diloco": config(strategy="diloco", strategy_options={"sync_every": 2}),
    "tp": config(strategy="tp", workload="tiny-gpt", workload_options=GPT, lr=3e-3, batch_size=4, steps=4),
    # owner-computes: each matrix orthogonalised whole on one rank; ns_dtype by name, as the command line gives it
    "fsdp-muon": config(strategy="fsdp", workload="tiny-gpt", workload_options=GPT, optimizer="muon", lr=0.02,
                        optimizer_options={"ns_dtype": "float32"}, batch_size=2, steps=4),
    "tp-muon": config(strategy="tp", workload="tiny-gpt", workload_options=GPT, optimizer="muon", lr=0.02,
                      optimizer_options={"ns_dtype": "float32"}, batch_size=4, steps=4),
    "pp": config(strategy="pp", strategy_options={"microbatches": 2}, workload="tiny-gpt", workload_options=GPT,
                 optimizer="momentum", lr=0.1, batch_size=4, steps=4, accumulate=2, precision="fp32"),
}
"""The distributed runs; each one's reference is the same config on one process with the global batch (twice
the per-rank batch; the same batch for tp and pp, whose two ranks share one replica)."""


def reference(name: str) -> TrainConfig:
    run = RUNS[name]
    return TrainConfig(**{**run.to_dict(), "strategy": None, "strategy_options": {},
                          "batch_size": run.batch_size * (1 if run.strategy in ("tp", "pp") else 2)})


def train_and_report(config: TrainConfig, out=None, resume=False) -> dict:
    trainer = Trainer(config, out, resume=resume)
    result = trainer.run()
    state = trainer.strategy.full_model_state(trainer.model)
    losses = [loss for _, loss in trainer.guard.last_losses]  # every step's global loss (the last 20)
    # numpy: crosses the process boundary by value
    return {"params": {k: v.detach().cpu().numpy().copy() for k, v in state.items()}, "losses": losses,
            "bytes": result.bytes_communicated, "resumed_from": result.resumed_from_step}


def every_strategy(rank: int, world_size: int, folder: str) -> dict[str, dict]:
    results = {name: train_and_report(run, f"{folder}/{name}" if name == "zero1" else None)
               for name, run in RUNS.items()}
    # ZeRO-1 again from its step-3 checkpoint (one file, the optimizer state consolidated by rank 0)
    if rank == 0:
        (Path(folder) / "zero1" / "checkpoints" / f"step-{STEPS:08d}.ckpt").unlink()
    dist.barrier()
    results["zero1 resumed"] = train_and_report(RUNS["zero1"], f"{folder}/zero1", resume=True)
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("strategies")
    return run_processes(every_strategy, 2, str(folder), timeout_s=170), folder


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero2-schedule-free", "fsdp", "ddp-qk-clip", "localsgd", "pp"])
def test_the_strategy_equals_one_process_on_the_global_batch(ranks, name):
    results, _ = ranks
    expected = train_and_report(reference(name))
    ours = results[0][name]
    assert ours["losses"] == pytest.approx(expected["losses"], rel=1e-5)
    for key, tensor in expected["params"].items():
        torch.testing.assert_close(torch.from_numpy(ours["params"][key]), torch.from_numpy(tensor),
                                   rtol=1e-5, atol=1e-6)


def test_qk_clip_scales_the_same_heads_by_the_same_factors_on_every_rank(ranks):
    """Each rank sees half the batch, hence other logits; the all-reduce MAX makes the factors agree, so
    the replicas stay bitwise equal (DDP itself synchronises the gradients, not the weights)."""
    results, _ = ranks
    first, second = (rank["ddp-qk-clip"]["params"] for rank in results)
    for key, tensor in first.items():
        assert (second[key] == tensor).all(), key


# Muon (a whole matrix normalised by Newton-Schulz) carries the rounding of the gradients' sums, which
# differ in order between the ranks' reductions and one process: 2e-5 relative by the fourth step here
@pytest.mark.parametrize("name", ["tp", "tp-muon", "fsdp-muon"])
def test_sharded_tiny_gpt_has_the_loss_curve_of_one_process(ranks, name):
    results, _ = ranks
    expected = train_and_report(reference(name))
    for rank in results:
        assert rank[name]["losses"] == pytest.approx(expected["losses"], rel=1e-4)


def test_zero_checkpoints_resume_to_the_same_parameters_bit_for_bit(ranks):
    results, folder = ranks
    names = sorted(path.name for path in (folder / "zero1" / "checkpoints").iterdir())
    assert names == ["step-00000000.ckpt", "step-00000003.ckpt", f"step-{STEPS:08d}.ckpt"]
    for result in results:
        resumed, uninterrupted = result["zero1 resumed"], result["zero1"]
        assert resumed["resumed_from"] == 3 and resumed["losses"][-3:] == uninterrupted["losses"][-3:]
        for key, tensor in uninterrupted["params"].items():
            assert (resumed["params"][key] == tensor).all()


def test_diloco_communicates_once_every_sync_every_steps(ranks):
    results, _ = ranks
    assert [rank["diloco"]["bytes"] for rank in results] == [STEPS // 2 * PARAMETER_BYTES] * 2
    for key, tensor in results[0]["diloco"]["params"].items():  # synchronised at the last step
        assert (tensor == results[1]["diloco"]["params"][key]).all()


def test_sharded_strategies_count_their_gradient_and_parameter_traffic(ranks):
    results, _ = ranks
    shard = PARAMETER_BYTES // 2
    for rank in results:
        # stage 1: all-reduce of the gradient + all-gather of this rank's updated half; stage 2: the same
        # bytes through a reduce-scatter (its whole input counts)
        assert rank["zero1"]["bytes"] == rank["zero2"]["bytes"] == STEPS * (PARAMETER_BYTES + shard)
        # fsdp, 2 micro-batches: each all-gathers the parameters for forward and again for backward
        # (resharded in between); the gradient is reduce-scattered once per step, after the last
        assert rank["fsdp"]["bytes"] == STEPS * (2 * 2 * shard + PARAMETER_BYTES)


@pytest.mark.parametrize("options, world_size, message", [
    ({"tp": 2}, 3, "world size 3 is not a multiple of the tensor-parallel degree tp=2"),
    ({"sync_every": 0}, 2, None),
])
def test_a_world_size_that_does_not_divide_is_one_line(options, world_size, message):
    name = "tp" if "tp" in options else "localsgd"
    with pytest.raises(ValueError, match=message or "sync_every must be an integer >= 1, got 0"):
        check_strategy(name, options, world_size)


def test_every_rank_sees_the_same_global_loss_bit_for_bit(ranks):
    """The divergence guard's input, hence its verdict, is the same on every rank (local SGD's replicas too)."""
    results, _ = ranks
    for name in results[0]:
        assert results[0][name]["losses"] == results[1][name]["losses"], name
