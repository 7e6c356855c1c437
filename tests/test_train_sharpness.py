"""Sharpness during training (``gradwise train --track-sharpness EVERY``, issue 17): the recorded top Hessian
eigenvalue against the dense Hessian's, the warm start against a cold one, the edge of stability of gradient
descent made visible, bit-exact resume, a run measured exactly as one not measured, the thresholds of
SGD's momentum forms, the plot's panel and the one-line refusals."""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import pytest
import torch

from gradwise.cli import main
from gradwise.distributed import run_processes
from gradwise.optim import SGD
from gradwise.problems.workloads import make_workload
from gradwise.train import TrainConfig, Trainer, train
from gradwise.train.config import settings_difference
from gradwise.train.metrics import read_records
from gradwise.train.plots import plot_training
from gradwise.train.sharpness import SharpnessTracker, fixed_sample, threshold_factor

GD = dict(
    optimizer="sgd", schedule="constant", warmup_steps=0, weight_decay=0.0, clip=None, threads=1, eval_every=10**6
)
"""Plain gradient descent at a constant lr: the update whose threshold is 2/lr."""
GPT = dict(seq_len=16, d_model=32, n_layer=2, n_head=2, eval_windows=4, final_eval_windows=4)


@pytest.fixture
def no_plot(monkeypatch) -> None:
    """Runs whose plot is not under test skip it (matplotlib's layout takes most of a short run's time)."""
    monkeypatch.setattr(Trainer, "plot", lambda self, out: None)


def measured(folder: Path) -> list[dict]:
    return [record for record in read_records(folder / "metrics.jsonl") if "sharpness" in record]


def dense_top_eigenvalue(workload_name: str, options: dict, state: dict, sample) -> float:
    """The top eigenvalue of the Hessian of ``workload``'s loss on ``sample`` at ``state``, formed densely."""
    workload = make_workload(workload_name, 8, 0, **options)
    model = workload.model.double()
    names = [name for name, _ in model.named_parameters()]
    shapes = [param.shape for _, param in model.named_parameters()]
    flat = torch.cat([state[name].double().reshape(-1) for name in names])
    inputs, targets = sample[0].double(), sample[1]

    def loss(vector: torch.Tensor) -> torch.Tensor:
        pieces = dict(
            zip(names, (piece.view(shape) for piece, shape in zip(vector.split([s.numel() for s in shapes]), shapes)))
        )
        return workload.loss(lambda x: torch.func.functional_call(model, pieces, (x,)), (inputs, targets))

    return float(torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat))[-1])


def test_the_recorded_sharpness_is_the_dense_hessians_top_eigenvalue_within_its_residual(tmp_path, no_plot) -> None:
    """logreg with 21 parameters, 3 Lanczos steps (fewer than the dimension: not exact by construction)."""
    options = dict(dim=6, classes=3)
    out = tmp_path / "run"
    train(
        TrainConfig(
            workload="logreg",
            workload_options=options,
            batch_size=64,
            steps=6,
            lr=0.5,
            track_sharpness=3,
            sharpness_steps=3,
            **GD,
        ),
        out,
    )
    last = measured(out)[-1]
    assert [record["step"] for record in measured(out)] == [3, 6] and last["sharpness_products"] == 4
    sample = fixed_sample(make_workload("logreg", 64, 0, **options).train_data)
    exact = dense_top_eigenvalue("logreg", options, torch.load(out / "model.pt", weights_only=True), sample)
    assert abs(last["sharpness"] - exact) <= last["sharpness_residual"] + 1e-6
    assert last["sharpness"] <= exact + 1e-6  # a Rayleigh quotient never exceeds the top eigenvalue
    assert last["stability_threshold"] == 2 / 0.5


def test_the_warm_start_beats_a_cold_one_with_the_same_steps() -> None:
    """Two Lanczos steps per measurement: warm-started from the last Ritz vector, the estimates converge over
    the run (each measurement continues the last one's search); cold, each stays two steps deep."""
    workload = make_workload("mlp", 256, 0, train_examples=512)
    sample = fixed_sample(workload.train_data)

    def tracker(steps: int, seed: int = 0) -> SharpnessTracker:
        return SharpnessTracker(workload.model, workload.loss, sample, every=5, steps=steps, seed=seed, factor=2.0)

    warm = tracker(2)
    optimizer = torch.optim.SGD(workload.model.parameters(), lr=0.3)
    errors = []
    for step in range(1, 51):
        optimizer.zero_grad()
        workload.loss(workload.model, workload.train_data.next_batch()).backward()
        optimizer.step()
        if step % 5 == 0:
            truth = tracker(40).measure(0.3)
            assert truth["sharpness_residual"] < 1e-4
            errors.append(
                (
                    abs(warm.measure(0.3)["sharpness"] - truth["sharpness"]),
                    abs(tracker(2, seed=step).measure(0.3)["sharpness"] - truth["sharpness"]),
                    truth["sharpness"],
                )
            )
    assert all(warm_error < cold_error for warm_error, cold_error, _ in errors[1:])
    warm_error, cold_error, truth_value = errors[-1]
    assert warm_error < 0.02 * truth_value < 0.1 * truth_value < cold_error


def test_gradient_descent_sharpens_to_2_over_lr_and_hovers_there(tmp_path, no_plot) -> None:
    """Cohen et al. 2021 on the mlp (512 examples, full batch, cross-entropy): from about 1.5 at the start, the
    sharpness rises to 2/lr and stays near it, at lr 0.5 (2/lr = 4) as at lr 1 (2/lr = 2), while the loss falls."""
    workload = make_workload("mlp", 512, 0, train_examples=512)
    initial = SharpnessTracker(
        workload.model, workload.loss, fixed_sample(workload.train_data), every=1, steps=20, seed=0, factor=2.0
    ).measure(1.0)
    for lr in (0.5, 1.0):
        out = tmp_path / f"lr{lr}"
        train(
            TrainConfig(
                workload="mlp",
                workload_options=dict(train_examples=512),
                batch_size=512,
                steps=120,
                lr=lr,
                track_sharpness=10,
                spike_factor=1e6,
                **GD,
            ),
            out,
        )
        records = measured(out)
        hovering = sorted(record["sharpness"] for record in records if record["step"] >= 30)
        assert initial["sharpness"] < 0.8 * 2 / lr
        assert 0.9 * 2 / lr < hovering[len(hovering) // 2] < 1.3 * 2 / lr  # the median
        assert max(hovering) < 2 * 2 / lr
        assert records[-1]["sharpness_sample_loss"] < 0.5 * initial["sharpness_sample_loss"]


def test_a_resumed_run_records_the_same_sharpness_as_one_never_interrupted(tmp_path, no_plot) -> None:
    """Measured at steps 3, 6, 9, 12, checkpoints at 4, 8, 12: resumed from step 8, the measurement of step 9
    starts from the vector of step 6, which only the checkpoint holds (a cold start would differ)."""
    config = TrainConfig(
        workload="mlp", batch_size=32, steps=12, lr=0.2, checkpoint_every=4, track_sharpness=3, sharpness_steps=2, **GD
    )
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    train(config, whole)
    train(config, resumed)
    for checkpoint in (resumed / "checkpoints").iterdir():  # as if killed after the checkpoint of step 8
        if checkpoint.name.startswith("step-") and int("".join(filter(str.isdigit, checkpoint.name))) > 8:
            checkpoint.unlink()
    assert train(config, resumed, resume=True).resumed_from_step == 8
    keys = ("step", "loss", "sharpness", "sharpness_residual", "sharpness_products", "sharpness_sample_loss")
    expected = [{key: record[key] for key in keys} for record in measured(whole)]
    assert [{key: record[key] for key in keys} for record in measured(resumed)] == expected
    assert [record["step"] for record in expected] == [3, 6, 9, 12]
    cold = tmp_path / "cold"  # the same weights at step 9, measured from the cold start
    train(dataclasses.replace(config, steps=9, track_sharpness=9), cold)
    (record,) = measured(cold)
    assert record["loss"] == expected[2]["loss"] and record["sharpness"] != expected[2]["sharpness"]


def replicated_runs(rank: int, world_size: int, folder: str) -> dict[str, list[float]]:
    """On each rank, ddp and zero1 runs that measure every 2 steps; returns each run's last warm start."""
    Trainer.plot = lambda self, out: None  # this process's own class: no plot here either
    vectors = {}
    for strategy in ("ddp", "zero1"):
        trainer = Trainer(dataclasses.replace(REPLICATED, strategy=strategy), f"{folder}/{strategy}")
        trainer.run()
        vectors[strategy] = trainer.sharpness.vector.tolist()
    return vectors


REPLICATED = TrainConfig(workload="mlp", batch_size=16, steps=4, lr=0.2, track_sharpness=2, **GD)


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_ddp_and_zero1_ranks_measure_alike_and_as_one_process_on_the_global_batch(tmp_path, no_plot) -> None:
    """No communication: every rank measures the same sample (the first global batch) at the same weights."""
    vectors = run_processes(replicated_runs, 2, str(tmp_path), timeout_s=170)
    single = tmp_path / "single"
    train(dataclasses.replace(REPLICATED, batch_size=32), single)
    for strategy in ("ddp", "zero1"):
        assert vectors[0][strategy] == vectors[1][strategy]
        records = measured(tmp_path / strategy)
        assert [record["step"] for record in records] == [2, 4]
        for record, reference in zip(records, measured(single)):
            assert record["sharpness"] == pytest.approx(reference["sharpness"], rel=1e-5)


def test_tracking_changes_nothing_the_run_trains(tmp_path, no_plot) -> None:
    """The same losses, bit for bit, with and without tracking: tiny-gpt with QK-Clip (whose clip the
    sample's forward passes must not feed: without the loop's forget this run's losses differ) and the mlp
    with momentum."""
    for workload, options in (
        ("tiny-gpt", dict(workload_options=GPT, qk_clip=0.03, precision="fp32", lr=0.5)),
        ("mlp", dict(optimizer_options=dict(momentum=0.9), lr=0.05)),
    ):
        losses = []
        for every in (None, 1):
            out = tmp_path / f"{workload}-{every}"
            train(
                TrainConfig(workload=workload, batch_size=8, steps=6, track_sharpness=every, **{**GD, **options}), out
            )
            losses.append(
                [record["loss"] for record in read_records(out / "metrics.jsonl") if record["kind"] == "train"]
            )
        assert losses[0] == losses[1]


def test_tracking_in_bf16_measures_the_float32_loss_at_the_master_weights(tmp_path, no_plot) -> None:
    """Under bf16 autocast the measurement is of the float32 loss (no autocast) at the float32 weights; with
    bf16 parameters, at those weights cast up."""
    out = tmp_path / "autocast"
    train(
        TrainConfig(
            workload="logreg",
            workload_options=dict(dim=6, classes=3),
            batch_size=64,
            steps=4,
            lr=0.5,
            precision="bf16",
            track_sharpness=4,
            sharpness_steps=20,
            **GD,
        ),
        out,
    )
    sample = fixed_sample(make_workload("logreg", 64, 0, dim=6, classes=3).train_data)
    exact = dense_top_eigenvalue(
        "logreg", dict(dim=6, classes=3), torch.load(out / "model.pt", weights_only=True), sample
    )
    assert measured(out)[0]["sharpness"] == pytest.approx(exact, rel=1e-5)
    pure = tmp_path / "pure"
    train(
        TrainConfig(workload="mlp", batch_size=16, steps=2, lr=0.05, bf16_params="stochastic", track_sharpness=1, **GD),
        pure,
    )
    assert all(torch.isfinite(torch.tensor(record["sharpness"])) for record in measured(pure))


@pytest.mark.parametrize(
    ("options", "factor"),
    [
        ({}, 2.0),
        ({"momentum": 0.9}, 3.8),
        ({"momentum": 0.9, "dampening": 0.5}, 7.6),
        ({"momentum": 0.9, "nesterov": True}, 3.8 / 2.8),
    ],
)
def test_each_sgd_threshold_separates_convergence_from_divergence_on_a_quadratic(options, factor) -> None:
    """On f = a x^2 / 2, gradwise's SGD converges for a 2% below ``factor / lr`` and diverges 2% above."""
    assert threshold_factor(SGD, options) == pytest.approx(factor)
    lr = 0.1
    for scale, converges in ((0.98, True), (1.02, False)):
        x = torch.ones(1, dtype=torch.float64, requires_grad=True)
        optimizer = SGD([x], lr=lr, **options)
        for _ in range(300):
            optimizer.zero_grad()
            (0.5 * scale * factor / lr * x.square()).sum().backward()
            optimizer.step()
        assert (abs(float(x.detach())) < 1e-3) == converges
    assert threshold_factor(SGD, {"momentum": 0.9, "cautious": True}) is None
    assert threshold_factor(torch.optim.Adam, {}) is None


def png_height(path: Path) -> int:
    return struct.unpack(">II", path.read_bytes()[16:24])[1]


def test_the_plot_has_a_sharpness_panel_only_when_the_records_carry_sharpness(tmp_path) -> None:
    records = [
        {"kind": "train", "step": step, "loss": 1.0 / step, "lr": 0.5, "grad_norm": 1.0, "event": ""}
        for step in range(1, 11)
    ]
    plot_training(records, tmp_path / "plain.png", "plain")
    for record in records[4::5]:
        record.update(sharpness=3.9, sharpness_residual=0.1, stability_threshold=7.6)
    plot_training(records, tmp_path / "sharp.png", "sharp")
    assert png_height(tmp_path / "sharp.png") == png_height(tmp_path / "plain.png") * 4 // 3


def test_the_command_line_records_and_plots_the_sharpness(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    argv = [
        "train",
        "--workload",
        "logreg",
        "--steps",
        "4",
        "--batch-size",
        "16",
        "--threads",
        "1",
        "--no-progress",
        "--track-sharpness",
        "2",
        "--sharpness-steps",
        "3",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert json.loads((out / "config.json").read_text())["track_sharpness"] == 2
    assert [record["sharpness_products"] for record in measured(out)] == [4, 4]
    assert "sharpness" in (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert png_height(out / "training.png") == 4 * 3 * 110


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--track-sharpness", "0"], "track_sharpness must be"),
        (["--track-sharpness", "-3"], "track_sharpness must be"),
        (["--track-sharpness", "2", "--sharpness-steps", "0"], "sharpness_steps must be"),
        (["--track-sharpness", "2", "--strategy", "fsdp", "--nproc", "2"], "track_sharpness measures the whole model"),
        (["--track-sharpness", "2", "--strategy", "localsgd", "--nproc", "2"], "track_sharpness measures the whole"),
    ],
)
def test_impossible_tracking_is_a_one_line_error(extra, message, tmp_path, capsys) -> None:
    argv = [
        "train",
        "--workload",
        "mlp",
        "--steps",
        "1",
        "--threads",
        "1",
        "--no-progress",
        "--out",
        str(tmp_path / "run"),
        *extra,
    ]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1
    assert not (tmp_path / "run").exists()  # refused before any worker started


def test_a_run_recorded_before_tracking_existed_resumes_and_may_start_tracking_when_allowed() -> None:
    recorded = TrainConfig().to_dict()
    del recorded["track_sharpness"], recorded["sharpness_steps"]
    assert settings_difference(recorded, TrainConfig().to_dict()) is None
    assert "track_sharpness" in settings_difference(recorded, TrainConfig(track_sharpness=10).to_dict())
    assert settings_difference(recorded, TrainConfig(track_sharpness=10).to_dict(), {"track_sharpness"}) is None
