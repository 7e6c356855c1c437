"""The closure-driven optimizers in ``gradwise train`` (issue 14): L-BFGS, Newton-CG and SQN on mlp
and logreg, SVRG and SAGA on logreg's finite sum; each trains from the command line, resumes bit
for bit, and what the loop cannot honour is refused in one line. Also the shared driver's own
refusals (issue 13)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from gradwise.cli import main
from gradwise.optim import SAGA, Sophia
from gradwise.optim.driving import drive_step
from gradwise.problems.workloads import make_workload
from gradwise.train.closures import ClosureFeed, SampledBlocks
from gradwise.train.config import TrainConfig
from gradwise.train.optimizers import OPTIMIZERS, check_optimizer_strategy

# batch 1024 of logreg's 8192 examples: an epoch is 8 steps, so SVRG takes snapshots at steps 0 and 8
QUICK = ["--batch-size", "1024", "--threads", "1", "--no-progress", "--eval-every", "100"]
RUNS = [("lbfgs", "mlp"), ("lbfgs", "logreg"), ("newton-cg", "mlp"), ("newton-cg", "logreg"), ("sqn", "mlp"),
        ("sqn", "logreg"), ("svrg", "logreg"), ("saga", "logreg")]


def train_losses(out) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def test_train_offers_the_closure_methods():
    assert {"lbfgs", "newton-cg", "sqn", "svrg", "saga"} <= set(OPTIMIZERS)


@pytest.mark.parametrize("optimizer, workload", RUNS)
def test_a_closure_method_trains_from_the_command_line(tmp_path, optimizer, workload):
    out = tmp_path / "run"
    argv = ["train", "--workload", workload, "--optimizer", optimizer, "--steps", "30", *QUICK, "--out", str(out)]
    assert main(argv) == 0
    losses = train_losses(out)
    assert len(losses) == 30 and all(torch.isfinite(torch.tensor(losses)))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_steps"] == 0 and summary["rollbacks"] == []
    assert sum(losses[-3:]) / 3 < 0.9 * losses[0]  # the loss went down from step 0's
    assert summary["final_metrics"]["val_loss"] < 0.9 * losses[0]


@pytest.mark.parametrize("optimizer, workload", [("lbfgs", "mlp"), ("newton-cg", "logreg"), ("sqn", "logreg"),
                                                 ("svrg", "logreg"), ("saga", "logreg")])
def test_a_closure_method_resumes_bit_for_bit(tmp_path, optimizer, workload):
    pairs_early = ["--optimizer-options", "update_every=2"] if optimizer == "sqn" else []  # SQN: pairs by step 4
    argv = ["train", "--workload", workload, "--optimizer", optimizer, "--steps", "10", "--checkpoint-every", "2",
            "--keep-checkpoints", "10", *QUICK, *pairs_early]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main([*argv, "--out", str(full)]) == 0
    assert main([*argv, "--out", str(cut)]) == 0
    for step in (6, 8, 10):  # as if killed after the checkpoint of step 4 (SVRG: mid-epoch, before a snapshot)
        (cut / "checkpoints" / f"step-{step:08d}.ckpt").unlink(missing_ok=True)
    for name in ("summary.json", "model.pt"):
        (cut / name).unlink()
    assert main([*argv, "--out", str(cut), "--resume"]) == 0
    resumed = json.loads((cut / "summary.json").read_text())
    assert resumed["resumed_from_step"] == 4
    assert resumed["final_metrics"] == json.loads((full / "summary.json").read_text())["final_metrics"]
    assert train_losses(cut)[-6:] == train_losses(full)[-6:]
    full_model = torch.load(full / "model.pt", weights_only=True)
    cut_model = torch.load(cut / "model.pt", weights_only=True)
    assert all(torch.equal(full_model[k], cut_model[k]) for k in full_model)


@pytest.mark.parametrize("options, expected", [
    (["--optimizer", "lbfgs", "--accumulate", "2"], "accumulate: optimizer 'lbfgs' evaluates its closures on one"),
    (["--optimizer", "saga", "--clip-value", "1"], "clip_value: optimizer 'saga' evaluates its own gradients"),
    (["--optimizer", "saga", "--optimizer-options", "num_slots=3"], "num_slots of 'saga' is the training set's"),
    (["--optimizer", "svrg", "--workload", "tiny-gpt", "--workload-options",
      "n_layer=1,d_model=16,n_head=1,seq_len=8,eval_windows=1,final_eval_windows=1"],
     "optimizer 'svrg' is variance-reduced over a finite training set"),
])
def test_what_the_loop_cannot_honour_is_refused_in_one_line(tmp_path, capsys, options, expected):
    argv = ["train", "--workload", "logreg", "--steps", "2", *QUICK, *options, "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err


def test_a_loss_scaled_closure_run_is_refused():
    config = TrainConfig(workload="logreg", optimizer="lbfgs", precision="fp16")
    with pytest.raises(ValueError, match="use fp32 or bf16, not 'fp16'"):
        ClosureFeed("closure", config, make_workload("logreg", 64, 0))


@pytest.mark.parametrize("optimizer, strategy, expected", [
    ("lbfgs", "ddp", "run it with strategy 'single', not 'ddp'"),
    ("sophia", "zero1", "run it with strategy single or ddp, not 'zero1'"),
    ("schedule-free-adamw", "fsdp", "run it with strategy single, ddp, zero1, zero2, not 'fsdp'"),
])
def test_a_strategy_the_optimizer_rules_out_is_refused(optimizer, strategy, expected):
    with pytest.raises(ValueError, match=expected):
        check_optimizer_strategy(optimizer, strategy)


@pytest.mark.parametrize("optimizer, strategy", [
    ("lbfgs", "single"), ("sophia", "ddp"), ("schedule-free-adamw", "zero2"), ("adamw", "fsdp"),
])
def test_a_strategy_the_optimizer_allows_passes(optimizer, strategy):
    check_optimizer_strategy(optimizer, strategy)


def test_clipping_scales_the_step_objective_to_the_clipped_gradient(tmp_path):
    """With clip c below the gradient norm, the closure's gradient at the start is the clipped one."""
    from gradwise.train.loop import Trainer

    trainer = Trainer(TrainConfig(workload="logreg", optimizer="saga", steps=1, batch_size=1024, threads=1,
                                  clip=0.01))
    trainer.run()
    table = [trainer.optimizer.state[p]["gradient_table"] for p in trainer.model.parameters()]
    stored = torch.cat([t.flatten(1) for t in table], dim=1).norm(dim=1)  # one block holds the step's gradient
    assert torch.isclose(stored.max(), torch.tensor(0.01), rtol=1e-4)
    assert int((stored > 0).sum()) == 1


def test_sampled_blocks_cut_the_set_into_fixed_blocks_and_resume():
    inputs, targets = torch.arange(10.0).unsqueeze(1), torch.arange(10)
    stream = SampledBlocks(inputs, targets, batch_size=4, seed=3)
    assert stream.blocks == 3
    seen = []
    for _ in range(30):
        x, y = stream.next_batch()
        assert torch.equal(y, torch.arange(4 * stream.block, min(10, 4 * stream.block + 4)))
        seen.append(stream.block)
    assert set(seen) == {0, 1, 2}
    state = stream.state_dict()
    after = [stream.next_batch()[1].tolist() for _ in range(5)]
    again = SampledBlocks(inputs, targets, batch_size=4, seed=3)
    again.load_state_dict(state)
    assert [again.next_batch()[1].tolist() for _ in range(5)] == after


def test_the_driver_refuses_a_missing_slot_and_a_missing_hessian_estimate():
    weight = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="give slot"):
        drive_step(SAGA([weight], lr=0.1, num_slots=2), lambda: (weight * weight).sum())
    with pytest.raises(ValueError, match="give hessian_estimate"):
        drive_step(Sophia([weight]), lambda: (weight * weight).sum())
