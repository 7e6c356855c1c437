"""PSGD-Kron against HeavyBall's ``PSGDKron``, against the explicit Kronecker product and Li's
fixed point, and its schedule, state, memory rule and command line.

HeavyBall draws each refresh's probe from torch's global generator, one stream for all tensors;
gradwise seeds a generator per tensor and step (``probe_seed(seed, step)``), so that a run is the
same under ZeRO and resumes without generator state. The reference runs therefore give
HeavyBall one optimizer per tensor (``multi_tensor=False`` semantics: no stacking of same-shape
tensors, whose initial scale HeavyBall would take over the stack) and seed torch's generator the
same way before each of its steps: then both draw the same probes, and the iterates agree to
float32 rounding.
"""

from __future__ import annotations

import copy
import json
import math

import heavyball
import heavyball.utils
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gradwise.cli import main
from gradwise.optim import PSGDKron
from gradwise.optim.description import StateSize
from gradwise.optim.psgd_kron import preconditioned_shape, probe_seed, refresh_probability, trust_region_clip

SHAPES = [(6, 5), (5,), (3, 1, 4), (1,), (7, 3, 2), ()]


@pytest.fixture(autouse=True)
def _heavyball_eager(monkeypatch):
    """HeavyBall compiles its kernels by default (minutes on a CPU); its eager path is the same math."""
    monkeypatch.setattr(heavyball.utils, "compile_mode", None)


def _quartic_loss(params, targets):
    """A separable, non-quadratic loss with a different curvature per tensor."""
    return sum(((p - t) ** 2 * (1 + i)).sum() + 0.01 * (p**4).sum() for i, (p, t) in enumerate(zip(params, targets)))


def _heavyball_step(optimizers, seed: int, step: int) -> None:
    for optimizer in optimizers:
        torch.manual_seed(probe_seed(seed, step))
        optimizer.step()


def _run_both(
    shapes, steps: int, seed: int, ours_options: dict, theirs_options: dict, heavyball_seed: int | None = None
):
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=generator) for s in shapes]
    targets = [torch.randn(s, generator=generator) for s in shapes]
    ours = [p.clone().requires_grad_() for p in start]
    theirs = [p.clone().requires_grad_() for p in start]
    optimizer = PSGDKron(ours, seed=seed, **ours_options)
    references = [heavyball.PSGDKron([p], multi_tensor=False, **theirs_options) for p in theirs]
    for step in range(1, steps + 1):
        _quartic_loss(ours, targets).backward()
        optimizer.step()
        optimizer.zero_grad()
        _quartic_loss(theirs, targets).backward()
        _heavyball_step(references, seed if heavyball_seed is None else heavyball_seed, step)
    return ours, theirs


@pytest.mark.parametrize(
    ("ours_options", "theirs_options"),
    [
        ({"lr": 0.01, "weight_decay": 0.01}, {"lr": 0.01, "weight_decay": 0.01}),
        # a refresh every fourth step (deterministic), the gradient fitted, a smaller Q step
        ({"lr": 0.02, "beta": 0.5, "precond_update_prob": 0.25, "momentum_into_precond_update": False,
          "precond_lr": 0.05},
         {"lr": 0.02, "beta": 0.5, "preconditioner_update_probability": 0.25, "momentum_into_precond_update": False,
          "precond_lr": 0.05}),
        # no trust-region clip (HeavyBall then fuses the update), dense factors only up to 4
        ({"lr": 3e-3, "clip_update": False, "max_size_triangular": 4},
         {"lr": 3e-3, "update_clipping": None, "max_size_triangular": 4}),
    ],
    ids=["defaults", "sparse-refresh-gradient-fit", "unclipped-small-dense"],
)
def test_iterates_equal_heavyballs_on_random_tensors(ours_options, theirs_options):
    """60 steps on a matrix, a vector, 3-D tensors with unit dimensions, a 1-element vector and
    a scalar: HeavyBall's iterates to float32 rounding."""
    ours, theirs = _run_both(SHAPES, 60, seed=3, ours_options=ours_options, theirs_options=theirs_options)
    for shape, a, b in zip(SHAPES, ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6, msg=lambda m, shape=shape: f"{shape}: {m}")


def test_other_probes_give_other_iterates():
    """The agreement above rests on the same probes: with HeavyBall's generator seeded otherwise,
    the iterates part (so the comparison can fail)."""
    ours, theirs = _run_both(SHAPES[:1], 20, seed=3, ours_options={"lr": 0.01}, theirs_options={"lr": 0.01},
                             heavyball_seed=4)
    assert (ours[0] - theirs[0]).abs().max() > 1e-4


def test_iterates_equal_heavyballs_on_a_small_model():
    """50 steps of a two-layer network on a regression batch: HeavyBall's weights and biases."""
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=generator), torch.randn(32, 3, generator=generator)

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))

    ours_model, theirs_model = model(), model()
    optimizer = PSGDKron(ours_model.parameters(), lr=3e-3, weight_decay=0.1, seed=7)
    references = [heavyball.PSGDKron([p], lr=3e-3, weight_decay=0.1, multi_tensor=False)
                  for p in theirs_model.parameters()]
    for step in range(1, 51):
        nn.functional.mse_loss(ours_model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        nn.functional.mse_loss(theirs_model(x), y).backward()
        _heavyball_step(references, 7, step)
    for (name, a), b in zip(ours_model.named_parameters(), theirs_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_the_update_is_the_kronecker_product_of_the_factors():
    """After a step, the move of a 3 x 4 matrix is -lr (Q1'Q1 (x) Q2'Q2) vec(m): the mode products
    equal the explicit Kronecker product (clip off, no decay), on the factors the step fitted."""
    param = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    param.grad = torch.randn(3, 4, dtype=torch.float64)
    before = param.detach().clone()
    optimizer = PSGDKron([param], lr=0.1, clip_update=False)
    optimizer.step()
    state = optimizer.state[param]
    q1, q2 = state["Q0"], state["Q1"]
    assert torch.equal(q1, q1.triu()) and torch.equal(q2, q2.triu())  # the fit stays on the triangular group
    preconditioner = torch.kron(q1.T @ q1, q2.T @ q2)
    expected = before.flatten() - 0.1 * preconditioner @ state["exp_avg"].flatten()
    torch.testing.assert_close(param.detach().flatten(), expected, rtol=1e-12, atol=1e-14)


def test_the_fit_whitens_the_gradients():
    r"""Li's criterion :math:`E[h^\top P h + v^\top P^{-1} v]` is least at :math:`P = E[hh^\top]^{-1/2}`.
    With gradients drawn from :math:`N(0, C_1 \otimes C_2)`, no momentum and lr 0 (only the factors
    move), 3000 refreshes bring :math:`P = Q_1^\top Q_1 \otimes Q_2^\top Q_2` to
    :math:`C^{-1/2}` within the noise of the stochastic fit."""
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(3, 3, generator=generator, dtype=torch.float64)
    right = torch.randn(4, 4, generator=generator, dtype=torch.float64)
    c1 = left @ left.T + 0.5 * torch.eye(3, dtype=torch.float64)
    c2 = right @ right.T + 0.5 * torch.eye(4, dtype=torch.float64)
    l1, l2 = torch.linalg.cholesky(c1), torch.linalg.cholesky(c2)
    param = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)
    optimizer = PSGDKron([param], lr=0.0, beta=0.0, precond_lr=0.05, precond_update_prob=1.0)
    for _ in range(3000):
        param.grad = l1 @ torch.randn(3, 4, generator=generator, dtype=torch.float64) @ l2.T
        optimizer.step()
    state = optimizer.state[param]
    fitted = torch.kron(state["Q0"].T @ state["Q0"], state["Q1"].T @ state["Q1"])
    eigenvalues, vectors = torch.linalg.eigh(torch.kron(c1, c2))
    target = vectors @ torch.diag(eigenvalues.rsqrt()) @ vectors.T
    assert torch.linalg.matrix_norm(fitted - target) / torch.linalg.matrix_norm(target) < 0.15
    # and not the identity it started near
    start = torch.eye(12, dtype=torch.float64) * fitted.trace() / 12
    assert torch.linalg.matrix_norm(start - target) / torch.linalg.matrix_norm(target) > 0.5


def test_refreshes_follow_the_summed_probabilities():
    """With probability 0.25 the factors change exactly when floor(0.25 t) grows, every fourth
    step (deterministic, as HeavyBall 3.2.1; they are created on the first); the default schedule
    is 1 for 1000 steps, then anneals to 0.03."""
    param = torch.randn(4, 3, requires_grad=True)
    optimizer = PSGDKron([param], lr=0.01, precond_update_prob=0.25)
    changed = []
    previous = None
    for _ in range(20):
        param.grad = torch.randn(4, 3)
        optimizer.step()
        factor = optimizer.state[param]["Q0"].clone()
        changed.append(previous is None or not torch.equal(factor, previous))
        previous = factor
    assert changed == [t == 1 or t % 4 == 0 for t in range(1, 21)]
    assert refresh_probability(1000, None) == 1.0
    assert refresh_probability(1001, None) == pytest.approx(0.999)
    assert refresh_probability(10_000, None) == 0.03
    assert refresh_probability(5, 0.5) == 0.5


@pytest.mark.parametrize(
    ("shape", "options", "kinds"),
    [
        ((3, 50), {"max_size_triangular": 10}, [(3, 3), (50,)]),
        ((5,), {}, [(5,)]),
        ((1, 4, 1), {}, [(4,)]),
        ((), {}, [(1,)]),
        ((2, 3, 4), {"min_ndim_triangular": 4}, [(2,), (3,), (4,)]),
        ((2, 3, 4), {}, [(2, 2), (3, 3), (4, 4)]),
    ],
)
def test_factors_and_the_memory_rule(shape, options, kinds):
    """Dense factors for 1 < d <= max_size_triangular (tensors of >= min_ndim_triangular dims),
    diagonals elsewhere; the description's rule counts exactly the state kept."""
    param = torch.randn(shape, requires_grad=True)
    param.grad = torch.randn(shape)
    optimizer = PSGDKron([param], **options)
    optimizer.step()
    state = optimizer.state[param]
    factors = [state[f"Q{i}"] for i in range(len(preconditioned_shape(shape)))]
    assert [tuple(f.shape) for f in factors] == kinds
    values = state["exp_avg"].numel() + sum(f.numel() for f in factors)
    scalars = state["step"].numel() + 2 * state["refresh_credit"].numel() + 2 * state["lower_bound"].numel()
    assert PSGDKron.description.state(shape, {**optimizer.defaults, **options}) == StateSize(values, scalars)


def test_a_zero_first_gradient_is_refused_unless_a_scale_is_given():
    param = torch.zeros(3, 2, requires_grad=True)
    param.grad = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="precond_init_scale"):
        PSGDKron([param]).step()
    optimizer = PSGDKron([param], precond_init_scale=1.0)
    optimizer.step()
    assert torch.equal(param, torch.zeros(3, 2))  # a zero momentum moves nothing
    factor = optimizer.state[param]["Q0"]
    assert torch.isfinite(factor).all() and torch.equal(factor, factor.triu())
    param.grad = torch.ones(3, 2)
    optimizer.step()
    assert (param < 0).all()


@settings(max_examples=30, deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True, width=32))
def test_trust_region_clip_is_bounded_odd_and_monotone(u):
    x = torch.tensor([u, -u, u * 0.5])
    clipped = trust_region_clip(x)
    if math.isnan(u):
        assert clipped.isnan().all()
        return
    assert clipped.abs().max() <= 2.0
    assert clipped[0] == -clipped[1]
    assert (clipped[0] - clipped[2]) * math.copysign(1.0, u) >= 0
    assert trust_region_clip(torch.tensor(1e-4)).item() == pytest.approx(1e-4, rel=1e-3)  # linear at zero


def test_bf16_resume_is_exact_and_keeps_the_factors_in_float32():
    """Saved mid-run (between refreshes of a 0.5 schedule) and loaded into a new optimizer over
    bf16 parameters: the factors, bounds and credit keep their dtypes and the run continues bit for bit."""
    def grads(step):
        generator = torch.Generator().manual_seed(step)
        return torch.randn(5, 4, generator=generator).bfloat16()

    param = torch.randn(5, 4).bfloat16().requires_grad_()
    optimizer = PSGDKron([param], lr=0.01, precond_update_prob=0.5)
    for step in range(5):
        param.grad = grads(step)
        optimizer.step()
    saved = {"param": param.detach().clone(), "optimizer": copy.deepcopy(optimizer.state_dict())}
    for step in range(5, 10):
        param.grad = grads(step)
        optimizer.step()
    resumed = saved["param"].clone().requires_grad_()
    fresh = PSGDKron([resumed], lr=0.01, precond_update_prob=0.5)
    fresh.load_state_dict(saved["optimizer"])
    state = fresh.state[resumed]
    assert (state["Q0"].dtype, state["lower_bound"].dtype, state["refresh_credit"].dtype) == (
        torch.float32, torch.float64, torch.float64)
    for step in range(5, 10):
        resumed.grad = grads(step)
        fresh.step()
    assert torch.equal(resumed, param)


@pytest.mark.parametrize("workload", ["mlp", "tiny-gpt"])
def test_trains_from_the_command_line(tmp_path, workload):
    """``gradwise train --optimizer psgd-kron``: 4 finite steps, checkpoints, a summary."""
    argv = (["--workload", "mlp", "--batch-size", "32"] if workload == "mlp" else
            ["--workload", "tiny-gpt", "--workload-options",
             "n_layer=2,d_model=32,n_head=2,seq_len=32,eval_windows=4,final_eval_windows=8", "--batch-size", "4",
             "--precision", "bf16"])
    out = tmp_path / "run"
    assert main(["train", *argv, "--steps", "4", "--eval-every", "2", "--checkpoint-every", "2", "--threads", "1",
                 "--no-progress", "--optimizer", "psgd-kron", "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


def test_memory_plan(tmp_path, capsys):
    """``gradwise plan memory --optimizer psgd-kron`` reads the rule: for the 16.8M GPT shapes the
    state is the momentum plus dense factors of the 512- and 2048-wide sides (the 8192-wide
    embedding side diagonal)."""
    assert main(["plan", "memory", "--optimizer", "psgd-kron", "--layers", "4", "--width", "512", "--vocab", "8192",
                 "--out", str(tmp_path)]) == 0
    output = capsys.readouterr().out
    assert "psgd-kron" in output
    per_param = float(output.split("optimizer state ")[1].split()[0])
    assert 4 < per_param < 40  # momentum 4 bytes plus factors; SOAP's is 79
