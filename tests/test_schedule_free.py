"""Schedule-free AdamW and SGD (issue 15, item 2): the iterates of the authors' ``schedulefree``
package and of pytorch_optimizer's classes, the paper's three sequences written out, the
``train()``/``eval()`` switch, checkpoints that interchange with the package, and ``gradwise
train``: evaluation at x, training and checkpoints at y, exact resume, ``model.pt`` at x."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import pytorch_optimizer
import schedulefree
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gradwise.checkpoints.atomic import read_checkpoint
from gradwise.cli import main
from gradwise.optim import ScheduleFreeAdamW, ScheduleFreeSGD
from gradwise.train.config import TrainConfig
from gradwise.train.loop import Trainer

PACKAGE = {ScheduleFreeAdamW: schedulefree.AdamWScheduleFree, ScheduleFreeSGD: schedulefree.SGDScheduleFree}
PYTORCH_OPTIMIZER = {ScheduleFreeAdamW: pytorch_optimizer.ScheduleFreeAdamW,
                     ScheduleFreeSGD: pytorch_optimizer.ScheduleFreeSGD}
CLASSES = [ScheduleFreeAdamW, ScheduleFreeSGD]


def hyperparameters(cls: type, lr: float, beta: float, beta2: float, weight_decay: float, warmup: int, r: float,
                    power: float) -> dict[str, Any]:
    common = dict(lr=lr, weight_decay=weight_decay, warmup_steps=warmup, r=r, weight_lr_power=power)
    return {**common, "betas": (beta, beta2)} if cls is ScheduleFreeAdamW else {**common, "momentum": beta}


def tensors(seed: int, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """A matrix and a vector."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 5, generator=generator, dtype=dtype), torch.randn(5, generator=generator, dtype=dtype)]


def loss_of(params: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """A non-quadratic loss coupling the matrix and the vector."""
    matrix, vector = params
    return ((matrix - target) ** 2).sum() + (vector**4).sum() / 4 + (matrix.sum(0) * vector).sum()


def run_pair(ours: torch.optim.Optimizer, theirs: torch.optim.Optimizer, mine: list[torch.Tensor],
             other: list[torch.Tensor], steps: int, target: torch.Tensor, switch_every: int = 0) -> None:
    """Step both on the same loss; every ``switch_every`` steps both go to eval() and back."""
    for step in range(steps):
        for params, optimizer in ((mine, ours), (other, theirs)):
            optimizer.zero_grad()
            loss_of(params, target).backward()
            optimizer.step()
        if switch_every and step % switch_every == switch_every - 1:
            for optimizer in (ours, theirs):
                optimizer.eval()
                optimizer.train()


# --- the references ----------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(
    cls=st.sampled_from(CLASSES),
    seed=st.integers(0, 2**16),
    lr=st.floats(1e-3, 5e-2),
    beta=st.floats(0.5, 0.98),
    beta2=st.floats(0.9, 0.999),
    weight_decay=st.sampled_from([0.0, 1e-3, 0.1]),
    warmup=st.integers(0, 40),
    r=st.sampled_from([0.0, 0.5, 1.0]),
    power=st.sampled_from([0.0, 1.0, 2.0]),
)
def test_iterates_equal_the_schedulefree_package(cls, seed, lr, beta, beta2, weight_decay, warmup, r, power):
    """120 steps (switching to x and back every 25) with random hyperparameters, weight decay and
    warmup: y while training and x after eval() are the package's, to float64 rounding."""
    kwargs = hyperparameters(cls, lr, beta, beta2, weight_decay, warmup, r, power)
    start = tensors(seed)
    mine = [t.clone().requires_grad_() for t in start]
    other = [t.clone().requires_grad_() for t in start]
    ours, theirs = cls(mine, **kwargs), PACKAGE[cls](other, **kwargs)
    theirs.train()
    target = torch.randn(6, 5, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    run_pair(ours, theirs, mine, other, 120, target, switch_every=25)
    for a, b in zip(mine, other):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    ours.eval()
    theirs.eval()
    for a, b in zip(mine, other):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    assert ours.param_groups[0]["k"] == theirs.param_groups[0]["k"] == 120
    assert ours.param_groups[0]["weight_sum"] == pytest.approx(theirs.param_groups[0]["weight_sum"], rel=1e-14)


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_a_small_model_with_two_param_groups_trains_as_with_the_package(cls):
    """150 mini-batch steps of an MLP in float32, weight decay on the matrices only and another lr
    for the biases: the package's weights at y and at x (allclose)."""
    models = [SmallNet(), SmallNet()]
    groups = [
        [{"params": [m.body[0].weight, m.body[2].weight], "weight_decay": 0.05},
         {"params": [m.body[0].bias, m.body[2].bias], "weight_decay": 0.0, "lr": 0.004}]
        for m in models
    ]
    kwargs = hyperparameters(cls, 0.01, 0.9, 0.99, 0.0, 20, 0.0, 2.0)
    ours, theirs = cls(groups[0], **kwargs), PACKAGE[cls](groups[1], **kwargs)
    theirs.train()
    generator = torch.Generator().manual_seed(0)
    for _ in range(150):
        x, y = torch.randn(32, 8, generator=generator), torch.randint(4, (32,), generator=generator)
        for model, optimizer in zip(models, (ours, theirs)):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    for mode in ("train", "eval"):
        getattr(ours, mode)()
        getattr(theirs, mode)()
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(models[0].body[0].weight, SmallNet().body[0].weight)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_iterates_equal_pytorch_optimizers_classes(cls):
    """pytorch_optimizer 4.1's ScheduleFreeAdamW/SGD (an independent port) take the same 150 steps."""
    kwargs = hyperparameters(cls, 0.02, 0.9, 0.995, 0.01, 10, 0.0, 2.0)
    start = tensors(7)
    mine = [t.clone().requires_grad_() for t in start]
    other = [t.clone().requires_grad_() for t in start]
    ours, theirs = cls(mine, **kwargs), PYTORCH_OPTIMIZER[cls](other, **kwargs)
    theirs.train()
    run_pair(ours, theirs, mine, other, 150, torch.zeros(6, 5, dtype=torch.float64))
    ours.eval()
    theirs.eval()
    for a, b in zip(mine, other):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_the_papers_three_sequences(cls):
    """Algorithm 1 of arXiv:2405.15682 written out with x, y and z kept apart (the optimizer keeps
    only y and z): z_{t+1} = z_t - lr_t d_t at y_t, x_{t+1} = (1-c) x_t + c z_{t+1},
    y_{t+1} = (1-beta) z_{t+1} + beta x_{t+1}, c = w_t / sum w, w_t = t^r max(lr)^2,
    lr_t = lr min(1, t/W), weight decay at y."""
    lr, beta, beta2, eps, decay, warmup, r = 0.03, 0.8, 0.99, 1e-8, 0.05, 7, 0.5
    kwargs = hyperparameters(cls, lr, beta, beta2, decay, warmup, r, 2.0)
    start = tensors(11)
    param = [t.clone().requires_grad_() for t in start]
    optimizer = cls(param, **kwargs)
    target = torch.ones(6, 5, dtype=torch.float64)
    x = [t.clone() for t in start]
    z = [t.clone() for t in start]
    y = [t.clone() for t in start]
    v = [torch.zeros_like(t) for t in start]
    weight_sum, lr_max = 0.0, 0.0
    for t in range(1, 101):
        at_y = [p.clone().requires_grad_() for p in y]
        grads = torch.autograd.grad(loss_of(at_y, target), at_y)
        lr_t = lr * min(1.0, t / warmup)
        lr_max = max(lr_max, lr_t)
        weight = t**r * lr_max**2
        weight_sum += weight
        c = weight / weight_sum
        for i, g in enumerate(grads):
            if cls is ScheduleFreeAdamW:
                v[i] = beta2 * v[i] + (1 - beta2) * g * g
                d = g / ((v[i] / (1 - beta2**t)).sqrt() + eps) + decay * y[i]
            else:
                d = g + decay * y[i]
            z[i] = z[i] - lr_t * d
            x[i] = (1 - c) * x[i] + c * z[i]
            y[i] = (1 - beta) * z[i] + beta * x[i]
        optimizer.zero_grad()
        loss_of(param, target).backward()
        optimizer.step()
    for p, expected in zip(param, y):
        torch.testing.assert_close(p.detach(), expected, rtol=1e-10, atol=1e-12)
    optimizer.eval()
    for p, expected in zip(param, x):
        torch.testing.assert_close(p.detach(), expected, rtol=1e-10, atol=1e-12)
    optimizer.train()
    for p, expected in zip(param, y):
        torch.testing.assert_close(p.detach(), expected, rtol=1e-10, atol=1e-12)


# --- the switch and the state -------------------------------------------------------------------


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_step_in_evaluation_mode_is_refused_and_the_switch_is_idempotent(cls):
    param = torch.ones(3, requires_grad=True)
    optimizer = cls([param], lr=0.1)
    optimizer.eval()  # before any step x = y = z: nothing moves
    assert torch.equal(param.detach(), torch.ones(3))
    param.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match=r"evaluation mode.*optimizer\.train\(\)"):
        optimizer.step()
    optimizer.train()
    for _ in range(3):
        optimizer.step()
    optimizer.eval()
    at_x = param.detach().clone()
    optimizer.eval()
    assert torch.equal(param.detach(), at_x)
    optimizer.train()
    at_y = param.detach().clone()
    optimizer.train()
    assert torch.equal(param.detach(), at_y) and not torch.equal(at_x, at_y)
    assert optimizer.param_groups[0]["train_mode"] is True


@pytest.mark.parametrize("writer", ["package", "gradwise"])
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_checkpoints_continue_in_the_package_and_back(cls, writer):
    """The state_dict has the package's keys: a checkpoint of either continues in the other."""
    kwargs = hyperparameters(cls, 0.02, 0.9, 0.99, 0.01, 5, 0.0, 2.0)
    first, second = (PACKAGE[cls], cls) if writer == "package" else (cls, PACKAGE[cls])
    target = torch.zeros(6, 5, dtype=torch.float64)
    written_params = [t.clone().requires_grad_() for t in tensors(5)]
    written = first(written_params, **kwargs)
    written.train()
    for _ in range(10):
        written.zero_grad()
        loss_of(written_params, target).backward()
        written.step()
    loaded_params = [p.detach().clone().requires_grad_() for p in written_params]
    loaded = second(loaded_params, **kwargs)
    loaded.load_state_dict(copy.deepcopy(written.state_dict()))  # a state_dict shares the state's tensors
    run_pair(written, loaded, written_params, loaded_params, 10, target)
    written.eval()
    loaded.eval()
    for a, b in zip(written_params, loaded_params):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize(("cls", "keyword", "value"), [
    (ScheduleFreeAdamW, "betas", (0.0, 0.999)),
    (ScheduleFreeSGD, "momentum", 0.0),
    (ScheduleFreeSGD, "momentum", 1.0),
    (ScheduleFreeSGD, "warmup_steps", -3),
    (ScheduleFreeAdamW, "weight_lr_power", float("nan")),
])
def test_values_the_interpolation_cannot_take_are_named(cls, keyword, value):
    """x is recovered from y and z by dividing by the momentum: 0 is refused, with the range."""
    with pytest.raises(ValueError, match=keyword) as error:
        cls([torch.zeros(2, requires_grad=True)], **{keyword: value})
    assert "got" in str(error.value)


@pytest.mark.parametrize("counter, value", [("k", -1), ("weight_sum", float("nan")), ("train_mode", "yes")])
def test_a_hostile_state_dict_is_refused(counter, value):
    param = torch.zeros(2, requires_grad=True)
    saved = ScheduleFreeSGD([param]).state_dict()
    saved["param_groups"][0][counter] = value
    with pytest.raises(ValueError, match=counter):
        ScheduleFreeSGD([param]).load_state_dict(saved)


# --- gradwise train -----------------------------------------------------------------------------

SMALL_GPT = ["--workload", "tiny-gpt", "--workload-options",
             "n_layer=2,d_model=32,n_head=2,seq_len=32,eval_windows=4,final_eval_windows=8", "--batch-size", "4"]
MLP = ["--workload", "mlp", "--batch-size", "32"]
QUICK = ["--steps", "4", "--eval-every", "2", "--checkpoint-every", "2", "--threads", "1", "--no-progress",
         "--schedule", "linear_warmup"]
LRS = {"schedule-free-adamw": "0.01", "schedule-free-sgd": "0.1"}


def train(out: Path, optimizer: str, *argv: str) -> int:
    return main(["train", *argv, *QUICK, "--optimizer", optimizer, "--lr", LRS[optimizer], "--out", str(out)])


def replayed(out: Path, step: int) -> Trainer:
    """A trainer of the run in ``out`` holding its checkpoint of ``step`` (the training point y)."""
    trainer = Trainer(TrainConfig.from_dict(json.loads((out / "config.json").read_text())))
    payload = read_checkpoint(out / "checkpoints" / f"step-{step:08d}.ckpt")
    trainer.model.load_state_dict(payload["model"])
    trainer.optimizer.load_state_dict(payload["optimizer"])
    return trainer


@pytest.mark.parametrize("optimizer", ["schedule-free-adamw", "schedule-free-sgd"])
@pytest.mark.parametrize("workload", ["mlp", "tiny-gpt"])
def test_train_evaluates_and_saves_at_x(tmp_path, optimizer, workload):
    """From the command line: the quick evaluation of step 2 and the final one are of x (a manual
    evaluation after optimizer.eval() of the checkpoint, which holds y), model.pt holds x."""
    argv = MLP if workload == "mlp" else [*SMALL_GPT, "--precision", "bf16"]
    out = tmp_path / "run"
    assert train(out, optimizer, *argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 4 and summary["final_metrics"]["val_loss"] < records[0]["loss"] + 0.5

    trainer = replayed(out, 4)
    at_y = trainer.workload.evaluate(trainer.model, True)
    trainer.optimizer.eval()
    at_x = trainer.workload.evaluate(trainer.model, True)
    assert summary["final_metrics"] == at_x != at_y
    deployed = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.equal(deployed[name], value) for name, value in trainer.model.state_dict().items())

    [quick] = [r for r in records if r["kind"] == "eval" and r["step"] == 2]
    trainer = replayed(out, 2)  # y after the evaluation's round trip to x and back: x to rounding
    with trainer.precision.autocast(), torch.no_grad():
        quick_at_y = trainer.workload.evaluate(trainer.model, False)
    trainer.optimizer.eval()  # outside autocast, whose cache of bf16 weights would outlive the switch
    with trainer.precision.autocast(), torch.no_grad():
        again = trainer.workload.evaluate(trainer.model, False)
    assert again["val_loss"] == pytest.approx(quick["val_loss"], rel=1e-6)
    assert quick_at_y["val_loss"] != pytest.approx(quick["val_loss"], rel=1e-6)  # y would have been told apart


@pytest.mark.parametrize("optimizer", ["schedule-free-adamw", "schedule-free-sgd"])
def test_a_resumed_run_is_bit_identical(tmp_path, optimizer):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert train(full, optimizer, *MLP) == 0
    assert train(cut, optimizer, *MLP) == 0
    (cut / "checkpoints" / "step-00000004.ckpt").unlink()  # as if killed after the checkpoint of step 2
    for name in ("summary.json", "model.pt"):
        (cut / name).unlink()
    assert main(["train", *MLP, *QUICK, "--optimizer", optimizer, "--lr", LRS[optimizer], "--out", str(cut),
                 "--resume"]) == 0
    resumed = json.loads((cut / "summary.json").read_text())
    assert resumed["resumed_from_step"] == 2
    assert resumed["final_metrics"] == json.loads((full / "summary.json").read_text())["final_metrics"]
    full_model = torch.load(full / "model.pt", weights_only=True)
    cut_model = torch.load(cut / "model.pt", weights_only=True)
    assert all(torch.equal(full_model[k], cut_model[k]) for k in full_model)


def test_a_decaying_schedule_is_replaced_by_warmup_then_constant():
    """Schedule-free averages its iterates instead of decaying the lr: the run's cosine becomes
    linear_warmup (and the config records it); a constant schedule and other optimizers are left alone."""
    config = TrainConfig(workload="mlp", optimizer="schedule-free-adamw", schedule="cosine", steps=2, threads=1)
    with pytest.warns(UserWarning, match="'cosine' replaced by 'linear_warmup'"):
        trainer = Trainer(config)
    assert trainer.config.schedule == "linear_warmup"
    trainer.run()
    assert trainer.optimizer.param_groups[0]["lr"] == trainer.config.lr  # warmup done, then constant
    assert Trainer(TrainConfig(workload="mlp", optimizer="adamw", schedule="cosine", steps=2)).config.schedule == \
        "cosine"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Trainer(TrainConfig(workload="mlp", optimizer="schedule-free-sgd", schedule="constant",
                                   steps=2)).config.schedule == "constant"
