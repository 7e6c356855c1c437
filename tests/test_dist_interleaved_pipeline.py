"""Interleaved 1F1B (``schedule=interleaved-1f1b``, virtual stages) through the training loop, against one process.

One 2-process job: ``pp`` and ``3d`` (pp=2, dp=tp=1) on 2 ranks of 2 chunks each (4 chunks of one block:
rank 0 holds blocks 0 and 2 and the embedding, rank 1 blocks 1 and 3 and the output layer), each run
4 steps with checkpoints and resumed from its step-2 checkpoint (per-rank files for ``pp``, DCP shards
for ``3d``); the refusals. Each is compared with one process on the same global batch.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from gradwise.cli import main
from gradwise.distributed import run_processes
from gradwise.distributed.strategies.registry import check_strategy
from gradwise.distributed.traffic import BROADCAST
from gradwise.plan.parallel_step_time import stage_traffic
from gradwise.plan.parallelism import Layout, Transformer
from gradwise.problems.tiny_gpt import TinyGPT
from gradwise.train import TrainConfig, Trainer

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(200)]

GPT = dict(seq_len=8, d_model=16, n_layer=4, n_head=2, eval_windows=2, final_eval_windows=2)
BATCH, STEPS, MICROBATCHES = 8, 4, 2
INTERLEAVED = {"microbatches": MICROBATCHES, "schedule": "interleaved-1f1b", "virtual_stages": 2}


def config(strategy: str, **settings) -> TrainConfig:
    options = INTERLEAVED | ({"pp": 2} if strategy == "3d" else {})
    base = dict(workload="tiny-gpt", workload_options=GPT, steps=STEPS, lr=1e-2, eval_every=1000, threads=1,
                schedule="constant", warmup_steps=0, precision="fp32", batch_size=BATCH, clip=0.5,
                checkpoint_every=2, strategy=strategy, strategy_options=options)
    return TrainConfig(**{**base, **settings})


def one_process() -> TrainConfig:
    return TrainConfig(**{**config("pp").to_dict(), "strategy": None, "strategy_options": {},
                          "checkpoint_every": 1000})


def report(config: TrainConfig, out=None, resume=False) -> dict:
    trainer = Trainer(config, out, resume=resume)
    result = trainer.run()
    state = trainer.strategy.full_model_state(trainer.model)
    return {"params": {k: v.detach().cpu().numpy().copy() for k, v in state.items()},
            "losses": [loss for _, loss in trainer.guard.last_losses], "resumed_from": result.resumed_from_step,
            "bytes": dict(trainer.strategy.bytes_by_kind),
            "stage": sorted(name for name, _ in trainer.strategy.trained_module(trainer.model).named_parameters())}


def without_last_checkpoint(run: Path, resumed: Path) -> None:
    shutil.copytree(run, resumed)
    for last in (resumed / "checkpoints").rglob(f"step-{STEPS:08d}*"):
        shutil.rmtree(last) if last.is_dir() else last.unlink()


def refusal() -> str:
    from gradwise.problems.tiny_gpt_pipeline import TinyGPTPipeline  # not at the top: 0.7 s of CPU

    torch.manual_seed(0)
    try:
        TinyGPTPipeline(TinyGPT(8, 16, 6, 2), stages=2, microbatches=2, schedule="interleaved-1f1b",
                        virtual_stages=2)
    except ValueError as error:
        return str(error)
    return "no error"


def two_ranks(rank: int, world_size: int, folder: str) -> dict:
    results = {"refusal": refusal()}
    for strategy in ("pp", "3d"):
        run, resumed = Path(folder) / strategy, Path(folder) / f"{strategy} resumed"
        results[strategy] = report(config(strategy), run)
        if rank == 0:
            without_last_checkpoint(run, resumed)
        dist.barrier()
        results[f"{strategy} resumed"] = report(config(strategy), resumed, resume=True)
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("interleaved")
    return run_processes(two_ranks, 2, str(folder), timeout_s=180), report(one_process())


def blocks(names: set[str]) -> set[int]:
    return {int(name.split(".")[1]) for name in names if name.startswith("blocks.")}


@pytest.mark.parametrize("strategy", ["pp", "3d"])
def test_interleaved_1f1b_on_two_ranks_of_two_chunks_equals_one_process(runs, strategy):
    ranks, expected = runs
    first, last = (set(rank[strategy]["stage"]) for rank in ranks)
    assert blocks(first) == {0, 2} and {"token_embedding.weight", "position_embedding.weight"} <= first
    assert blocks(last) == {1, 3} and {"norm.weight", "output_weight"} <= last
    for rank in ranks:
        result = rank[strategy]
        assert result["losses"] == pytest.approx(expected["losses"], rel=1e-5)
        assert result["params"].keys() == expected["params"].keys()
        for key, tensor in expected["params"].items():
            torch.testing.assert_close(torch.from_numpy(result["params"][key]), torch.from_numpy(tensor),
                                       rtol=1e-5, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
    assert expected["losses"][-1] < expected["losses"][0]


@pytest.mark.parametrize("strategy", ["pp", "3d"])
def test_interleaved_run_resumes_from_its_middle_checkpoint_bit_for_bit(runs, strategy):
    ranks, _ = runs
    for rank in ranks:
        resumed, uninterrupted = rank[f"{strategy} resumed"], rank[strategy]
        assert resumed["resumed_from"] == 2 and resumed["losses"][-2:] == uninterrupted["losses"][-2:]
        for key, tensor in uninterrupted["params"].items():
            assert (resumed["params"][key] == tensor).all(), key


def test_interleaved_traffic_per_step_is_the_planners_closed_form(runs):
    """Each rank's bytes per step (the 4-step run less the 2-step resumed one: free of the first step's shape
    inference) against :func:`gradwise.plan.parallel_step_time.stage_traffic` with 2 virtual stages: an end
    rank sends and receives (2v - 1) m activations (or their gradients) a step, 3 m here against 1F1B's m,
    plus the tied all-reduce and the loss broadcast (4 bytes)."""
    ranks, _ = runs
    model = Transformer(GPT["n_layer"], GPT["d_model"], GPT["n_head"], 256, GPT["seq_len"])
    layout = Layout(pp=2, microbatches=MICROBATCHES, schedule="interleaved-1f1b", virtual_stages=2)
    for stage, rank in enumerate(ranks):
        expected: Counter[str] = Counter({BROADCAST: 4})
        for traffic in stage_traffic(model, layout, stage, BATCH // MICROBATCHES, precision="fp32", zero_stage=3):
            expected[traffic.collective] += traffic.payload_bytes
        for strategy in ("pp", "3d"):
            four_steps, two_steps = Counter(rank[strategy]["bytes"]), Counter(rank[f"{strategy} resumed"]["bytes"])
            assert {kind: (four_steps[kind] - two_steps[kind]) / 2 for kind in four_steps} == dict(expected)


def test_virtual_stages_that_do_not_divide_the_layers_are_refused_by_the_pipeline(runs):
    ranks, _ = runs
    assert [rank["refusal"] for rank in ranks] == [
        "n_layer must be a multiple of stages x virtual_stages, got n_layer=6, stages=2, virtual_stages=2"] * 2


@pytest.mark.parametrize("strategy, options, world_size, message", [
    ("pp", {"schedule": "1f1b", "virtual_stages": 2}, 2,
     "virtual_stages > 1 goes with the interleaved-1f1b schedule and it needs them, got schedule='1f1b', "
     "virtual_stages=2"),
    ("pp", {"schedule": "interleaved-1f1b", "virtual_stages": 1}, 2,
     "virtual_stages > 1 goes with the interleaved-1f1b schedule and it needs them, got "
     "schedule='interleaved-1f1b', virtual_stages=1"),
    ("pp", {"schedule": "interleaved-1f1b", "virtual_stages": 0}, 2, "virtual_stages must be an integer >= 1, got 0"),
    ("pp", {"schedule": "interleaved-1f1b", "microbatches": 5}, 2,
     "interleaved-1f1b runs the micro-batches in max(1, microbatches // stages) = 2 equal rounds, got "
     "microbatches=5 for stages=2"),
    ("3d", {"pp": 4, "schedule": "interleaved-1f1b", "microbatches": 9}, 4,
     "interleaved-1f1b runs the micro-batches in max(1, microbatches // stages) = 2 equal rounds, got "
     "microbatches=9 for stages=4"),
    ("3d", {"pp": 2, "schedule": "zero-bubble"}, 2, "schedule must be one of 'gpipe', '1f1b', 'interleaved-1f1b'"),
])
def test_impossible_schedules_are_refused_before_any_process_starts(strategy, options, world_size, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_strategy(strategy, options, world_size)


def test_interleaving_needs_no_option_but_the_schedule_and_allows_what_torch_runs():
    """Two chunks a rank by default; m <= p micro-batches run in one round, m a multiple of p in m / p."""
    for microbatches in (1, 3, 4, 6, 8):
        check_strategy("pp", {"schedule": "interleaved-1f1b", "microbatches": microbatches}, 4)
    from gradwise.distributed.strategies.pipeline import PipelineStrategy

    assert PipelineStrategy.check_options({"schedule": "interleaved-1f1b"})["virtual_stages"] == 2
    assert PipelineStrategy.check_options({"schedule": "1f1b"})["virtual_stages"] == 1


def test_a_bad_virtual_stages_option_is_one_line_and_exit_code_2(tmp_path, capsys, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    code = main(["train", "--workload", "tiny-gpt", "--steps", "2", "--out", str(tmp_path / "run"), "--nproc", "2",
                 "--strategy", "pp", "--strategy-options", "schedule=gpipe,virtual_stages=2"])
    error = capsys.readouterr().err
    assert code == 2
    assert error.count("\n") == 1 and "virtual_stages > 1 goes with the interleaved-1f1b schedule" in error, error
