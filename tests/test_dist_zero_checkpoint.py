"""ZeRO checkpoints across world sizes: the consolidated state is the unsharded optimizer's
state_dict, so a checkpoint written by 2 ranks loads into 1 (a plain optimizer) or 2, and one
written by a plain optimizer loads into 2 ranks; through ``gradwise train --strategy zero2``
a 2-process run resumes on 1 process to the parameters of the uninterrupted run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_dist_zero import GLOBAL_BATCH, OPTIMIZERS, STEPS, make_model, params_of, train

from gradwise.checkpoints.atomic import decode
from gradwise.distributed import run_processes
from gradwise.distributed.strategies.zero_optimizer import ZeroOptimizer
from gradwise.train import TrainConfig, Trainer

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(120)]

CASES = [("adamw", 2), ("muon", 1), ("nadam", 1), ("adamw-8bit", 2), ("lion-bf16-sr", 1)]
"""Element-wise flat shards (the 63 parameters split 32 + 31 with one element of padding;
NAdam's ``mu_product`` is scalar state), Muon's whole tensors with its AdamW-routed ones, and
state formats (uint8 codes with their block scales; bf16 moments with an int count of rounding draws)."""

RUN = dict(workload="mlp", workload_options=dict(dim=8, hidden=16, train_examples=512, val_examples=128),
           steps=6, lr=1e-2, eval_every=1000, threads=1, schedule="cosine", warmup_steps=2, checkpoint_every=3)



def checkpoint_cases(rank: int, world_size: int, folder: str) -> dict:
    results = {}
    for name, stage in CASES:
        model = make_model()
        zero = ZeroOptimizer(OPTIMIZERS[name](model), stage=stage)
        train(model, zero, range(STEPS - 1), rank=rank, schedule=False)
        consolidated = zero.consolidated_state_dict()
        saved_model = {key: value.clone() for key, value in model.state_dict().items()}
        train(model, zero, range(STEPS - 1, STEPS), rank=rank, schedule=False)
        # 2 -> 2: fresh ranks load the consolidated state and take the last step
        reloaded = make_model()
        reloaded.load_state_dict(saved_model)
        zero = ZeroOptimizer(OPTIMIZERS[name](reloaded), stage=stage)
        zero.load_consolidated_state_dict(consolidated)
        train(reloaded, zero, range(STEPS - 1, STEPS), rank=rank, schedule=False)
        # 1 -> 2: a plain optimizer's state_dict (one process, the global batch) into 2 ranks
        single = make_model()
        plain = OPTIMIZERS[name](single)
        train(single, plain, range(STEPS - 1), schedule=False)
        from_one = make_model()
        from_one.load_state_dict(single.state_dict())
        zero = ZeroOptimizer(OPTIMIZERS[name](from_one), stage=stage)
        zero.load_consolidated_state_dict(plain.state_dict())
        train(from_one, zero, range(STEPS - 1, STEPS), rank=rank, schedule=False)
        train(single, plain, range(STEPS - 1, STEPS), schedule=False)
        results[name] = dict(consolidated=consolidated, saved_model=saved_model,
                             straight=params_of(model), reloaded=params_of(reloaded),
                             from_one=params_of(from_one), single=params_of(single))
    Trainer(TrainConfig(**RUN, strategy="zero2", batch_size=GLOBAL_BATCH // world_size), Path(folder)).run()
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zero2")
    return run_processes(checkpoint_cases, 2, str(folder), timeout_s=100), folder


def assert_params_close(actual, expected):
    torch.testing.assert_close([torch.tensor(p) for p in actual], [torch.tensor(p) for p in expected],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, stage", CASES)
def test_consolidated_state_is_the_unsharded_optimizers_state_dict(ranks, name, stage):
    results, _ = ranks
    model = make_model()
    plain = OPTIMIZERS[name](model)
    train(model, plain, range(STEPS - 1), schedule=False)
    expected = plain.state_dict()
    for rank in results:
        state = rank[name]["consolidated"]
        assert state["param_groups"] == expected["param_groups"]
        assert state["state"].keys() == expected["state"].keys()
        for index, entry in expected["state"].items():
            assert state["state"][index].keys() == entry.keys()
            for key, value in entry.items():
                if not isinstance(value, torch.Tensor):  # a count (bf16-sr's rounding draws)
                    assert state["state"][index][key] == value
                    continue
                torch.testing.assert_close(state["state"][index][key], value.cpu(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name, stage", CASES)
def test_two_ranks_save_and_one_or_two_load_to_the_uninterrupted_parameters(ranks, name, stage):
    results, _ = ranks
    case = results[0][name]
    # 2 -> 1: a plain optimizer on the global batch takes the last step from the consolidated state
    model = make_model()
    model.load_state_dict(case["saved_model"])
    plain = OPTIMIZERS[name](model)
    plain.load_state_dict(case["consolidated"])
    train(model, plain, range(STEPS - 1, STEPS), schedule=False)
    assert_params_close(params_of(model), case["straight"])
    for rank in results:
        assert_params_close(rank[name]["reloaded"], rank[name]["straight"])
        assert_params_close(rank[name]["from_one"], rank[name]["single"])


def test_a_zero2_run_on_two_processes_resumes_on_one_to_the_same_parameters(ranks, tmp_path):
    _, folder = ranks
    names = sorted(path.name for path in (folder / "checkpoints").iterdir())
    assert names == ["step-00000000.ckpt", "step-00000003.ckpt", "step-00000006.ckpt"]
    uninterrupted = decode((folder / "checkpoints" / "step-00000006.ckpt").read_bytes())
    resumed_folder = tmp_path / "resumed"
    (resumed_folder / "checkpoints").mkdir(parents=True)
    (resumed_folder / "checkpoints" / "step-00000003.ckpt").write_bytes(
        (folder / "checkpoints" / "step-00000003.ckpt").read_bytes())
    trainer = Trainer(TrainConfig(**RUN, batch_size=GLOBAL_BATCH), resumed_folder, resume=True,
                      allow_changes={"strategy", "world_size", "batch_size"})  # the same global batch on one process
    result = trainer.run()
    assert result.resumed_from_step == 3
    for key, value in trainer.model.state_dict().items():
        torch.testing.assert_close(value, uninterrupted["model"][key], rtol=1e-5, atol=1e-6)
