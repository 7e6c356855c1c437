"""The training loop: accumulation, clipping, guards (skip, rollback, stop) and precision."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from gradwise.problems.workloads import make_workload
from gradwise.train import Precision, TrainConfig, TrainingDiverged, train


def mlp_config(**settings) -> TrainConfig:
    base = dict(workload="mlp", steps=8, batch_size=16, eval_every=1000, threads=1)
    return TrainConfig(**{**base, **settings})


def final_parameters(workload) -> list[torch.Tensor]:
    return [p.detach().clone() for p in workload.model.parameters()]


def test_accumulating_k_micro_batches_equals_one_k_times_larger_batch():
    runs = {}
    for batch_size, accumulate in ((32, 1), (8, 4)):
        workload = make_workload("mlp", batch_size, seed=3)
        train(mlp_config(batch_size=batch_size, accumulate=accumulate, clip=None, seed=3), workload=workload)
        runs[accumulate] = final_parameters(workload)
    start = final_parameters(make_workload("mlp", 8, seed=3))
    for big, accumulated, initial in zip(runs[1], runs[4], start, strict=True):
        torch.testing.assert_close(accumulated, big, rtol=1e-5, atol=1e-6)
        assert not torch.equal(big, initial)  # the runs did train


def sgd_update(clip=None, clip_value=None, lr=1.0):
    """Parameters before and after one plain SGD step (update = -lr * applied gradient), and the raw gradient."""
    workload = make_workload("mlp", 64, seed=1)
    probe = make_workload("mlp", 64, seed=1)  # same model and first batch: gives the raw gradient
    probe.loss(probe.model, probe.train_data.next_batch()).backward()
    raw = torch.cat([p.grad.flatten() for p in probe.model.parameters()])
    before = torch.cat([p.detach().flatten() for p in workload.model.parameters()])
    config = mlp_config(steps=1, optimizer="sgd", lr=lr, weight_decay=0.0, warmup_steps=0, schedule="constant",
                        clip=clip, clip_value=clip_value)
    train(config, workload=workload)
    after = torch.cat([p.detach().flatten() for p in workload.model.parameters()])
    return (before - after) / lr, raw


def test_clipping_by_norm_limits_the_applied_gradient_and_is_a_no_op_below_the_limit():
    applied, raw = sgd_update(clip=None)
    torch.testing.assert_close(applied, raw, rtol=1e-4, atol=1e-7)
    raw_norm = raw.norm().item()
    applied, _ = sgd_update(clip=raw_norm / 4)
    assert applied.norm().item() <= raw_norm / 4 * (1 + 1e-5)
    assert applied.norm().item() == pytest.approx(raw_norm / 4, rel=1e-4)
    torch.testing.assert_close(applied / applied.norm(), raw / raw_norm, rtol=1e-3, atol=1e-6)  # same direction
    applied, _ = sgd_update(clip=raw_norm * 2)
    torch.testing.assert_close(applied, raw, rtol=1e-4, atol=1e-7)


def test_clipping_by_value_bounds_every_entry():
    _, raw = sgd_update()
    limit = raw.abs().max().item() / 3
    applied, _ = sgd_update(clip_value=limit, clip=None)
    assert applied.abs().max().item() <= limit * (1 + 1e-4)
    torch.testing.assert_close(applied, raw.clamp(-limit, limit), rtol=1e-4, atol=1e-7)


class Injector:
    """Wraps a workload's loss: from micro-batch ``start`` on (``times`` of them), corrupt one gradient or the loss."""

    def __init__(self, workload, start: int, times: int, kind: str, tensor: str = "2.weight") -> None:
        self.calls, self.start, self.times, self.kind = 0, start, times, kind
        self.active = False
        self.loss = workload.loss
        workload.loss = self
        parameter = dict(workload.model.named_parameters())[tensor]
        parameter.register_hook(lambda grad: grad * math.nan if self.active and self.kind == "nan" else grad)

    def __call__(self, model, batch):
        self.calls += 1
        self.active = self.start <= self.calls < self.start + self.times
        loss = self.loss(model, batch)
        return loss * 50 if self.active and self.kind == "spike" else loss


def read_metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_a_nan_in_one_gradient_skips_that_update_and_is_counted(tmp_path):
    workload = make_workload("mlp", 16, seed=0)
    Injector(workload, start=7, times=1, kind="nan")
    result = train(mlp_config(steps=12), tmp_path / "run", workload=workload)
    assert result.skipped_steps == 1 and result.rollbacks == []
    records = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert [r["step"] for r in records if r["event"] == "skip-nonfinite"] == [7]
    assert records[6]["grad_norm"] == "nan"
    assert all(torch.isfinite(p).all() for p in workload.model.parameters())


def test_a_loss_spike_rolls_back_to_the_last_checkpoint_with_a_lower_lr(tmp_path):
    workload = make_workload("mlp", 16, seed=0)
    Injector(workload, start=14, times=1, kind="spike")
    config = mlp_config(steps=20, spike_window=10, checkpoint_every=5, rollback_lr_factor=0.25, schedule="constant",
                        warmup_steps=0, lr=1e-3)
    result = train(config, tmp_path / "run", workload=workload)
    assert len(result.rollbacks) == 1
    rollback = result.rollbacks[0]
    assert (rollback["step"], rollback["to_step"], rollback["lr_scale"]) == (14, 10, 0.25)
    assert "loss spike" in rollback["reason"]
    records = read_metrics(tmp_path / "run")
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == [*range(1, 14), *range(11, 21)]  # steps 11-13 redone
    assert {r["lr"] for r in train_records[:13]} == {1e-3}
    assert {r["lr"] for r in train_records[13:]} == {2.5e-4}
    assert result.steps == 20


def test_a_run_that_cannot_recover_stops_with_a_report(tmp_path):
    workload = make_workload("mlp", 16, seed=0)
    Injector(workload, start=6, times=10**9, kind="nan")
    config = mlp_config(steps=40, checkpoint_every=4, max_consecutive_skips=3, max_rollbacks=2)
    with pytest.raises(TrainingDiverged) as raised:
        train(config, tmp_path / "run", workload=workload)
    report = raised.value.report
    assert report.nonfinite_tensors == ["2.weight"]
    assert len(report.rollbacks) == 2 and report.rollbacks[1]["lr_scale"] == 0.25
    assert "2 rollbacks spent" in report.reason and "non-finite" in report.reason
    assert any(math.isnan(norm) for _, norm in report.grad_norm_history)
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["nonfinite_tensors"] == ["2.weight"] and saved["step"] == report.step
    assert "training stopped at step" in str(report) and "2.weight" in str(report)


def test_the_command_line_prints_the_report_of_a_diverged_run_without_a_traceback(tmp_path):
    command = [sys.executable, "-m", "gradwise", "train", "--workload", "mlp", "--optimizer", "sgd", "--lr", "1e30",
               "--clip", "none", "--steps", "30", "--threads", "1", "--no-progress", "--out", str(tmp_path / "run")]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 1, finished.stderr
    assert "Traceback" not in finished.stderr
    assert "training stopped at step" in finished.stderr and "3 rollbacks spent" in finished.stderr
    assert (tmp_path / "run" / "report.json").exists() and (tmp_path / "run" / "training.png").exists()


def test_bf16_on_cpu_trains_the_mlp_to_the_accuracy_of_fp32():
    accuracy = {}
    for precision in ("fp32", "bf16"):
        result = train(mlp_config(steps=300, batch_size=64, precision=precision))
        accuracy[precision] = result.final_metrics["val_accuracy"]
    assert accuracy["fp32"] >= 0.82
    assert abs(accuracy["bf16"] - accuracy["fp32"]) <= 0.03, accuracy


def test_unsupported_precision_on_this_device_is_a_clear_error():
    with pytest.raises(ValueError, match="fp16' needs a CUDA device"):
        Precision("fp16", torch.device("cpu"))
    with pytest.raises(ValueError, match="precision must be one of"):
        Precision("fp8", torch.device("cpu"))
    with pytest.raises(ValueError, match="fp16' needs a CUDA device"):
        train(mlp_config(precision="fp16"))


def test_bf16_autocast_runs_the_forward_pass_in_bf16_and_keeps_fp32_weights():
    precision = Precision("bf16", torch.device("cpu"))
    layer = torch.nn.Linear(4, 4)
    with precision.autocast():
        output = layer(torch.randn(2, 4))
    assert output.dtype == torch.bfloat16 and layer.weight.dtype == torch.float32
    assert not precision.grad_scaler().is_enabled()


class CpuFp16(Precision):
    """fp16 autocast with a dynamic loss scaler on CPU: refused to users (slow, and not what fp16 is for),
    but torch runs it, so the loop's loss-scaling path is exercised on machines without a GPU."""

    def __post_init__(self) -> None:
        pass


def test_fp16_loss_scaling_skips_overflowing_steps_without_counting_them_as_divergence(tmp_path):
    from gradwise.train import Trainer

    trainer = Trainer(mlp_config(steps=40, lr=1e-2), tmp_path / "run")
    trainer.precision = CpuFp16("fp16", torch.device("cpu"))
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**30)  # large enough to overflow fp16 at first
    initial_scale = trainer.scaler.get_scale()
    result = trainer.run()
    records = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    overflows = [r["step"] for r in records if r["event"] == "loss-scale-overflow"]
    assert overflows and result.skipped_steps == 0 and result.rollbacks == []
    assert trainer.scaler.get_scale() == initial_scale / 2 ** len(overflows)  # halved at every overflow
    assert records[-1]["loss"] < records[0]["loss"]
