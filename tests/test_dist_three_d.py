"""The ``3d`` strategy (pipeline x FSDP2 x tensor parallel) through the training loop, against one process.

One 8-process job runs the (pp, dp, tp) = 2 x 2 x 2 mesh, checkpointing, and resumes it from its middle
checkpoint (the two runs' traffic differ by two steps'); one 4-process job runs 2 x 1 x 2 and 2 x 2 x 1
(1F1B, and with 8-bit and 4-bit AdamW moments), resumes the latter from their middle checkpoints, and
resumes the
8-process run's on 2 x 1 x 2 (the DTensor shards resharded over the new data-parallel size). Each
is compared with one process on the same global batch.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from gradwise.distributed import run_processes
from gradwise.distributed.strategies.registry import check_strategy, tensor_parallel_degree
from gradwise.distributed.traffic import BROADCAST
from gradwise.plan.parallel_step_time import stage_traffic
from gradwise.plan.parallelism import Layout, Transformer
from gradwise.train import TrainConfig, Trainer

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(400)]

GPT = dict(seq_len=8, d_model=16, n_layer=2, n_head=2, eval_windows=2, final_eval_windows=2)
GLOBAL_BATCH, STEPS, MICROBATCHES = 8, 4, 2


def config(pp: int, dp: int, tp: int, **settings) -> TrainConfig:
    base = dict(workload="tiny-gpt", workload_options=GPT, steps=STEPS, lr=1e-2, eval_every=1000, threads=1,
                schedule="constant", warmup_steps=0, precision="fp32", batch_size=GLOBAL_BATCH // dp, clip=0.5,
                strategy="3d", strategy_options={"pp": pp, "tp": tp, "microbatches": MICROBATCHES})
    return TrainConfig(**{**base, **settings})


MUON = dict(optimizer="muon", lr=0.02, optimizer_options={"ns_dtype": torch.float32})
"""Newton-Schulz in float32: the tensor-parallel qkv is orthogonalised with its rows in the head-wise
order, which bf16's rounding would tell apart from the plain order (exact arithmetic would not)."""


def one_process() -> TrainConfig:
    return TrainConfig(**{**config(2, 1, 1).to_dict(), "strategy": None, "strategy_options": {},
                          "batch_size": GLOBAL_BATCH})


def report(config: TrainConfig, out=None, resume=False, allow_changes=()) -> dict:
    trainer = Trainer(config, out, resume=resume, allow_changes=allow_changes)
    result = trainer.run()
    state = trainer.strategy.full_model_state(trainer.model)
    return {"params": {k: v.detach().cpu().numpy().copy() for k, v in state.items()},
            "losses": [loss for _, loss in trainer.guard.last_losses], "resumed_from": result.resumed_from_step,
            "bytes": dict(trainer.strategy.bytes_by_kind)}


def without_last_checkpoint(source: Path, target: Path) -> None:
    shutil.copytree(source, target)
    shutil.rmtree(target / "checkpoints" / f"step-{STEPS:08d}")


def eight_ranks(rank: int, world_size: int, folder: str) -> dict:
    result = report(config(2, 2, 2, checkpoint_every=2), f"{folder}/2x2x2")
    if rank == 0:
        without_last_checkpoint(Path(folder) / "2x2x2", Path(folder) / "resharded")
        without_last_checkpoint(Path(folder) / "2x2x2", Path(folder) / "resumed8")
    dist.barrier()
    return {"2x2x2": result, "2x2x2 resumed": report(config(2, 2, 2, checkpoint_every=2), f"{folder}/resumed8",
                                                     resume=True)}


def four_ranks(rank: int, world_size: int, folder: str) -> dict:
    one_f_one_b = config(2, 2, 1, checkpoint_every=2,
                         strategy_options={"pp": 2, "tp": 1, "microbatches": MICROBATCHES, "schedule": "1f1b"})
    formats = {name: config(2, 2, 1, checkpoint_every=2, state_format=name) for name in ("8bit", "4bit")}
    results = {"2x1x2": report(config(2, 1, 2)), "2x2x1 1f1b": report(one_f_one_b, f"{folder}/2x2x1"),
               "2x1x2 muon": report(config(2, 1, 2, **MUON))}
    results |= {f"2x2x1 {name}": report(run, f"{folder}/{name}") for name, run in formats.items()}
    if rank == 0:
        without_last_checkpoint(Path(folder) / "2x2x1", Path(folder) / "resumed")
        for name in formats:
            without_last_checkpoint(Path(folder) / name, Path(folder) / f"{name}-resumed")
    dist.barrier()
    results["2x2x1 resumed"] = report(one_f_one_b, f"{folder}/resumed", resume=True)
    results |= {f"2x2x1 {name} resumed": report(run, f"{folder}/{name}-resumed", resume=True)
                for name, run in formats.items()}
    # the 8-process run's step-2 checkpoint on half the processes: dp 2 -> 1, twice the rows per rank
    results["2x2x2 -> 2x1x2"] = report(config(2, 1, 2, checkpoint_every=2), f"{folder}/resharded", resume=True,
                                       allow_changes=("world_size", "strategy_options", "batch_size"))
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("three_d")
    eight = run_processes(eight_ranks, 8, str(folder), timeout_s=380)
    four = run_processes(four_ranks, 4, str(folder), timeout_s=380)
    return eight, four, report(one_process())


@pytest.fixture(scope="module")
def muon_on_one_process():
    return report(TrainConfig(**{**one_process().to_dict(), **MUON}))


def assert_equal_to_one_process(result: dict, expected: dict) -> None:
    assert result["losses"] == pytest.approx(expected["losses"], rel=1e-5)
    assert result["params"].keys() == expected["params"].keys()
    for key, tensor in expected["params"].items():
        torch.testing.assert_close(torch.from_numpy(result["params"][key]), torch.from_numpy(tensor),
                                   rtol=1e-5, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


def test_2x2x2_equals_one_process_on_the_global_batch(runs):
    eight, _, expected = runs
    for rank in eight:
        assert_equal_to_one_process(rank["2x2x2"], expected)


@pytest.mark.parametrize("name", ["2x1x2", "2x2x1 1f1b"])
def test_smaller_meshes_equal_one_process(runs, name):
    _, four, expected = runs
    for rank in four:
        assert_equal_to_one_process(rank[name], expected)


def test_a_run_resumes_from_its_sharded_checkpoint_bit_for_bit(runs):
    _, four, _ = runs
    for rank in four:
        resumed, uninterrupted = rank["2x2x1 resumed"], rank["2x2x1 1f1b"]
        assert resumed["resumed_from"] == 2 and resumed["losses"][-2:] == uninterrupted["losses"][-2:]
        for key, tensor in uninterrupted["params"].items():
            assert (resumed["params"][key] == tensor).all(), key


@pytest.mark.parametrize("state_format", ["8bit", "4bit"])
def test_quantised_adamw_state_trains_on_2x2x1_and_resumes_bit_for_bit(runs, state_format):
    """A state format under the 3-D strategy: each rank's moments in blocks inside its FSDP2 shard. Its
    losses stay within 2% of fp32 AdamW on one process, and a resume from the middle checkpoint (the
    moments' values and scales as DTensors, re-quantised on loading) ends on the uninterrupted run's
    weights bit for bit (the embedding's and output layer's moments once did not load: torch's loader
    handed back an empty dict for their block scales)."""
    _, four, expected = runs
    for rank in four:
        run, resumed = rank[f"2x2x1 {state_format}"], rank[f"2x2x1 {state_format} resumed"]
        assert run["losses"] == pytest.approx(expected["losses"], rel=2e-2)
        assert run["losses"] != pytest.approx(expected["losses"], rel=1e-7)  # the moments are quantised
        assert resumed["resumed_from"] == 2 and resumed["losses"][-2:] == run["losses"][-2:]
        for key, tensor in run["params"].items():
            assert (resumed["params"][key] == tensor).all(), key


def test_muon_on_2x1x2_equals_one_process(runs, muon_on_one_process):
    """A whole-matrix optimizer: each stage's tensor-parallel matrices gathered to be orthogonalised, the
    last stage's copy of the tied output layer in Muon's AdamW as the whole model's embedding (the
    orthogonalised copy this guards against moved the loss by 0.04 in one step)."""
    _, four, _ = runs
    for rank in four:
        assert_equal_to_one_process(rank["2x1x2 muon"], muon_on_one_process)


def test_a_2x2x2_checkpoint_resumes_on_2x1x2(runs):
    _, four, expected = runs
    for rank in four:
        resumed = rank["2x2x2 -> 2x1x2"]
        assert resumed["resumed_from"] == 2
        assert_equal_to_one_process(resumed | {"losses": resumed["losses"][-2:]},
                                    expected | {"losses": expected["losses"][-2:]})


MESHES = {"2x1x2": (2, 1, 2, "gpipe", "2x2x2 -> 2x1x2"), "2x2x1 1f1b": (2, 2, 1, "1f1b", "2x2x1 resumed"),
          "2x2x2": (2, 2, 2, "gpipe", "2x2x2 resumed")}
"""Each mesh with a 4-step run and a 2-step one (resumed): their difference is two steps' traffic, free of
what is sent once (the pipeline's shape inference on the first step)."""


@pytest.mark.parametrize("name", MESHES)
def test_traffic_per_dimension_is_the_planners_closed_form(runs, name):
    """Every rank's bytes per step by kind of collective (``TrafficMeter``: the pipeline's sends and
    receives, the tensor-parallel all-reduces forward and backward, FSDP2's all-gathers and reduce-scatters,
    the tied matrix's all-reduce) against :func:`gradwise.plan.parallel_step_time.stage_traffic`, plus the
    loss the last stage broadcasts (4 bytes a step), which the planner leaves out."""
    eight, four, _ = runs
    pp, dp, tp, schedule, shorter = MESHES[name]
    model = Transformer(GPT["n_layer"], GPT["d_model"], GPT["n_head"], 256, GPT["seq_len"])
    layout = Layout(pp=pp, dp=dp, tp=tp, microbatches=MICROBATCHES, schedule=schedule)
    for rank, result in enumerate(eight if pp * dp * tp == 8 else four):
        expected: Counter[str] = Counter({BROADCAST: 4})
        for traffic in stage_traffic(model, layout, rank // (dp * tp), GLOBAL_BATCH // dp // MICROBATCHES,
                                     precision="fp32", zero_stage=3):
            expected[traffic.collective] += traffic.payload_bytes
        four_steps, two_steps = Counter(result[name]["bytes"]), Counter(result[shorter]["bytes"])
        per_step = {kind: (four_steps[kind] - two_steps[kind]) / 2 for kind in four_steps}
        assert per_step == dict(expected), (rank, four_steps, two_steps)


@pytest.mark.parametrize("options, world_size, message", [
    ({"pp": 2, "tp": 2}, 6, "world size 6 is not a multiple of pp x tp = 2 x 2"),
    ({"pp": 1}, 2, "pp must be an integer >= 2, got 1"),
])
def test_impossible_meshes_are_refused_before_any_process_starts(options, world_size, message):
    with pytest.raises(ValueError, match=message):
        check_strategy("3d", options, world_size)


@pytest.mark.parametrize("saved, degree", [
    ({"strategy": "tp", "strategy_options": {}, "world_size": 4}, 4),
    ({"strategy": "tp", "strategy_options": {"tp": 2}, "world_size": 4}, 2),
    ({"strategy": "3d", "strategy_options": {"pp": 2, "tp": 2}, "world_size": 8}, 2),
    ({"strategy": "3d", "strategy_options": {"pp": 2}, "world_size": 4}, 1),
    ({"strategy": "fsdp", "strategy_options": {}, "world_size": 2}, 1),
])
def test_a_checkpoint_in_another_tensor_parallel_order_is_refused_even_where_the_strategy_may_change(saved, degree):
    """The qkv rows of a checkpoint are in its tensor-parallel degree's head-wise order: another degree
    would read them scrambled, so that checkpoint is skipped with the reason whatever --allow-change says."""
    assert tensor_parallel_degree(saved) == degree
    trainer = Trainer(one_process(), allow_changes=("world_size", "strategy", "strategy_options", "batch_size"))
    reason = trainer.accept({"settings": {**trainer.settings, **saved}})
    if degree == 1:
        assert reason is None
    else:
        assert reason == (f"written with tensor-parallel degree {degree}, whose head-wise qkv order this run's "
                          "degree 1 does not read")
