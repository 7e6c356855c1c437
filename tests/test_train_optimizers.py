"""Every optimizer that `gradwise train` can name trains the mlp workload."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gradwise.train import OPTIMIZERS, TrainConfig, train

LEARNING_RATES = {"sgd": 0.1, "momentum": 0.05, "nesterov": 0.05, "momentum-cautious": 0.05, "adagrad": 0.05,
                  "lion": 1e-3, "schedule-free-sgd": 0.3,
                  # the closure methods at their presets' lr (mlp's 3e-3 x lr_scale)
                  "lbfgs": 0.3, "newton-cg": 0.09, "sqn": 0.09, "svrg": 0.09, "saga": 0.09}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_each_registered_optimizer_trains_the_mlp(name: str, tmp_path) -> None:
    """60 steps lower the training loss and lift validation accuracy well above chance (0.31)."""
    torch.manual_seed(0)
    config = TrainConfig(workload="mlp", optimizer=name, lr=LEARNING_RATES.get(name, 3e-3), steps=60, eval_every=60)
    result = train(config, out=tmp_path / name)
    records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r and math.isfinite(r["loss"])]
    assert result.skipped_steps == 0 and not result.rollbacks
    assert sum(losses[-10:]) < sum(losses[:10])
    assert result.final_metrics["val_accuracy"] > 0.5, (name, result.final_metrics)
