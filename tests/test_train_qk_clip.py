"""QK-Clip in the training loop (``gradwise train --qk-clip TAU``, issue 15): after each update the
heads whose logits exceeded TAU in the step's forward passes are scaled back to TAU; refused where
it cannot hold (no attention that reports its logits, a strategy that splits heads); runs recorded
before the setting existed still resume. Its equality to one process under DDP (logits combined by
an all-reduce MAX) is in ``tests/test_dist_train_strategies.py``."""

from __future__ import annotations

import json

import pytest
import torch

from gradwise.cli import main
from gradwise.train import TrainConfig, Trainer
from gradwise.train.config import settings_difference

GPT = dict(seq_len=16, d_model=32, n_layer=2, n_head=2, eval_windows=4, final_eval_windows=4)


def one_step(qk_clip: float, lr: float = 1e-30) -> tuple[Trainer, dict[int, torch.Tensor], torch.Tensor]:
    """A one-step tiny-gpt run with ``qk_clip``; returns the trainer, the per-layer logits its clip saw
    and the step's input tokens. ``lr`` so small that the update leaves the weights as they were."""
    config = TrainConfig(workload="tiny-gpt", workload_options=GPT, steps=1, lr=lr, weight_decay=0.0,
                         eval_every=1000, threads=1, schedule="constant", warmup_steps=0, batch_size=8,
                         clip=None, precision="fp32", qk_clip=qk_clip)
    trainer = Trainer(config)
    seen: dict[int, torch.Tensor] = {}
    batches: list = []
    clip, loss = trainer.qk_clip.clip, trainer.workload.loss

    def spy_clip() -> None:
        seen.update({index: logits.clone() for index, logits in trainer.qk_clip.max_logits.items()})
        clip()

    def spy_loss(model, batch):
        batches.append(batch)
        return loss(model, batch)

    trainer.qk_clip.clip, trainer.workload.loss = spy_clip, spy_loss
    trainer.run()
    return trainer, seen, batches[0][0]


def logits_now(trainer: Trainer, tokens: torch.Tensor) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    for module in trainer.qk_clip.modules:
        module.logit_observer = seen.append
    with torch.no_grad():
        trainer.model(tokens)
    return seen


def test_each_head_above_tau_is_scaled_to_tau_and_the_others_are_left() -> None:
    _, seen, _ = one_step(qk_clip=1e9)  # nothing clipped: the heads' logits on the first batch
    heads = torch.cat([seen[0], seen[1]]).sort().values
    tau = float(heads[1] + heads[2]) / 2  # two heads above, two below
    trainer, seen_again, tokens = one_step(qk_clip=tau)
    assert torch.equal(torch.cat([seen_again[0], seen_again[1]]).sort().values, heads)  # same batch, same weights
    for before, after in zip((seen_again[0], seen_again[1]), logits_now(trainer, tokens)):
        torch.testing.assert_close(after, before.clamp(max=tau), rtol=1e-5, atol=0.0)
    assert trainer.qk_clip.max_logits == {}  # forgotten after the clip


def test_training_with_qk_clip_keeps_the_logits_near_tau(tmp_path) -> None:
    """TAU at half the initial logits: with the clip, the trained model's logits on a batch stay near TAU
    (the clip acts on the step's own batch and weights, so another batch and the update move them a little);
    without it they stay above."""
    out = tmp_path / "run"
    argv = ["train", "--workload", "tiny-gpt", "--workload-options",
            ",".join(f"{key}={value}" for key, value in GPT.items()), "--batch-size", "8", "--steps", "12",
            "--threads", "1", "--no-progress", "--optimizer", "muon", "--qk-clip", "0.02", "--out", str(out)]
    assert main(argv) == 0
    assert json.loads((out / "config.json").read_text())["qk_clip"] == 0.02
    trainer, seen, tokens = one_step(qk_clip=1e9)
    state = torch.load(out / "model.pt", weights_only=True)
    trainer.model.load_state_dict(state["model"] if "model" in state else state)
    assert max(float(logits.max()) for logits in logits_now(trainer, tokens)) < 0.02 * 1.25
    unclipped = tmp_path / "unclipped"
    assert main([*argv[:-4], "--out", str(unclipped)]) == 0
    trainer.model.load_state_dict(torch.load(unclipped / "model.pt", weights_only=True))
    assert max(float(logits.max()) for logits in logits_now(trainer, tokens)) > 0.02 * 1.75  # the clip did work


@pytest.mark.parametrize(("extra", "message"), [
    (["--qk-clip", "0"], "qk_clip must be"),
    (["--qk-clip", "1", "--strategy", "fsdp", "--nproc", "2"], "qk_clip rescales whole attention heads"),
    (["--qk-clip", "1", "--workload", "mlp"], "reports its attention logits"),
])
def test_impossible_qk_clip_is_a_one_line_error(extra, message, capsys) -> None:
    argv = ["train", "--steps", "1", "--threads", "1", "--no-progress", *extra]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1


def test_a_run_recorded_before_qk_clip_existed_resumes_and_a_changed_threshold_does_not() -> None:
    recorded = {**TrainConfig().to_dict()}
    del recorded["qk_clip"]
    assert settings_difference(recorded, TrainConfig().to_dict()) is None
    assert "qk_clip" in settings_difference(recorded, TrainConfig(qk_clip=50.0).to_dict())
