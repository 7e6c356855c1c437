"""AdEMAMix against the paper's formulas (arXiv:2409.03137, Algorithm 1), against
pytorch_optimizer's AdEMAMix over many steps, and by convergence; its options refused by name."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pytorch_optimizer import AdEMAMix as ReferenceAdEMAMix

import gradwise.optim as gw
from gradwise.optim.ademamix import alpha_schedule, beta3_schedule


def _paper_steps(theta: torch.Tensor, grads: list[torch.Tensor], lr, betas, alpha, warmup, eps, weight_decay):
    """Algorithm 1 of the paper written out one scalar formula at a time (float64)."""
    beta1, beta2, beta3 = betas
    m1, m2, nu = torch.zeros_like(theta), torch.zeros_like(theta), torch.zeros_like(theta)
    for t, g in enumerate(grads, start=1):
        if warmup is None:
            alpha_t, beta3_t = alpha, beta3
        else:
            alpha_t = min(t * alpha / warmup, alpha)
            a = t / warmup
            beta3_t = min(math.exp(math.log(beta1) * math.log(beta3)
                                   / ((1 - a) * math.log(beta3) + a * math.log(beta1))), beta3)
        m1 = beta1 * m1 + (1 - beta1) * g
        m2 = beta3_t * m2 + (1 - beta3_t) * g
        nu = beta2 * nu + (1 - beta2) * g * g
        m1_hat, nu_hat = m1 / (1 - beta1**t), nu / (1 - beta2**t)
        theta = theta - lr * ((m1_hat + alpha_t * m2) / (nu_hat.sqrt() + eps) + weight_decay * theta)
    return theta


def _gradients(shape, steps: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(steps)]


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    beta3=st.floats(0.95, 0.9999),
    alpha=st.floats(0.0, 10.0),
    warmup=st.one_of(st.none(), st.integers(1, 80)),
    weight_decay=st.sampled_from([0.0, 0.1]),
)
def test_equals_the_papers_algorithm(seed, beta3, alpha, warmup, weight_decay):
    """120 steps on a matrix equal Algorithm 1 (slow EMA not bias corrected, decay inside the lr)."""
    grads = _gradients((4, 3), 120, seed)
    kwargs = dict(lr=0.01, betas=(0.9, 0.99, beta3), alpha=alpha, eps=1e-8, weight_decay=weight_decay)
    theta = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    expected = _paper_steps(theta.clone(), grads, warmup=warmup, **kwargs)
    param = theta.clone()
    optimizer = gw.AdEMAMix([param], t_alpha_beta3=warmup, **kwargs)
    for g in grads:
        param.grad = g
        optimizer.step()
    torch.testing.assert_close(param, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("warmup", [None, 60])
@pytest.mark.parametrize("path", [{}, {"foreach": False}])
def test_matches_pytorch_optimizer_on_a_model(warmup, path):
    """150 steps of a small MLP (matrices and vectors, mini-batches) in float32: the same
    iterates as pytorch_optimizer's AdEMAMix with decoupled decay (weight_decouple=True)."""
    torch.manual_seed(0)
    ours_model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    theirs_model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    theirs_model.load_state_dict(ours_model.state_dict())
    kwargs = dict(lr=3e-3, betas=(0.9, 0.999, 0.999), alpha=5.0, t_alpha_beta3=warmup, eps=1e-8, weight_decay=0.05)
    ours = gw.AdEMAMix(ours_model.parameters(), **kwargs, **path)
    theirs = ReferenceAdEMAMix(theirs_model.parameters(), weight_decouple=True, **kwargs)
    generator = torch.Generator().manual_seed(1)
    for _ in range(150):
        x, y = torch.randn(16, 6, generator=generator), torch.randn(16, 2, generator=generator)
        for model, optimizer in ((ours_model, ours), (theirs_model, theirs)):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
    for mine, reference in zip(ours_model.parameters(), theirs_model.parameters()):
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-6)
    state = ours.state[ours_model[0].weight]
    reference_state = theirs.state[theirs_model[0].weight]
    for key in ("exp_avg", "exp_avg_sq", "exp_avg_slow"):
        torch.testing.assert_close(state[key], reference_state[key], rtol=1e-5, atol=1e-7)


def test_matches_pytorch_optimizer_on_random_tensors():
    """200 steps on a matrix and a vector in float64, maximizing: equal to rounding."""
    shapes = [(5, 4), (7,)]
    ours = [torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
            for i, shape in enumerate(shapes)]
    theirs = [p.clone() for p in ours]
    kwargs = dict(lr=1e-2, betas=(0.8, 0.99, 0.9995), alpha=8.0, t_alpha_beta3=100, eps=1e-10, weight_decay=0.1,
                  maximize=True)
    ours_opt = gw.AdEMAMix(ours, **kwargs)
    theirs_opt = ReferenceAdEMAMix(theirs, weight_decouple=True, **kwargs)
    generator = torch.Generator().manual_seed(7)
    for _ in range(200):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=generator, dtype=torch.float64)
            b.grad = a.grad.clone()
        ours_opt.step()
        theirs_opt.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_schedules_by_hand():
    """alpha ramps linearly; beta3 runs from beta1 to beta3, linear in 1/ln(beta)."""
    assert alpha_schedule(25, 8.0, 100) == 2.0
    assert alpha_schedule(250, 8.0, 100) == 8.0
    assert alpha_schedule(3, 8.0, None) == 8.0
    assert beta3_schedule(0, 0.9, 0.9999, 100) == pytest.approx(0.9)
    assert beta3_schedule(100, 0.9, 0.9999, 100) == pytest.approx(0.9999)
    assert beta3_schedule(10**6, 0.9, 0.9999, 100) == 0.9999
    halfway = beta3_schedule(50, 0.9, 0.9999, 100)
    assert 1 / math.log(halfway) == pytest.approx((1 / math.log(0.9) + 1 / math.log(0.9999)) / 2)
    assert beta3_schedule(torch.tensor(50.0, dtype=torch.float64), 0.9, 0.9999, 100).item() == pytest.approx(halfway)


def test_alpha_zero_is_adamw():
    """With alpha = 0 the slow EMA has no weight: AdEMAMix steps as torch's AdamW."""
    ours, theirs = torch.randn(6, 5, dtype=torch.float64), None
    theirs = ours.clone()
    ours_opt = gw.AdEMAMix([ours], lr=0.01, betas=(0.9, 0.99, 0.999), alpha=0.0, weight_decay=0.1)
    theirs_opt = torch.optim.AdamW([theirs], lr=0.01, betas=(0.9, 0.99), weight_decay=0.1)
    for g in _gradients((6, 5), 50, 3):
        ours.grad, theirs.grad = g, g.clone()
        ours_opt.step()
        theirs_opt.step()
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)


def test_converges_on_a_quadratic():
    """A slow EMA sized to the run (beta3 0.999, warmed up over 500 steps) with a cosine lr
    reaches the minimiser of an ill-conditioned quadratic."""
    curvature = torch.linspace(0.5, 2.0, 10, dtype=torch.float64)
    centre = torch.linspace(-1.0, 1.0, 10, dtype=torch.float64)
    x = torch.zeros(10, dtype=torch.float64, requires_grad=True)
    optimizer = gw.AdEMAMix([x], lr=0.05, betas=(0.9, 0.999, 0.999), alpha=5.0, t_alpha_beta3=500)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=3000)
    for _ in range(3000):
        optimizer.zero_grad()
        (0.5 * curvature * (x - centre) ** 2).sum().backward()
        optimizer.step()
        schedule.step()
    assert torch.linalg.vector_norm(x.detach() - centre) < 1e-3


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"betas": (0.9, 0.999)}, "betas"),
        ({"betas": (0.9, 0.999, 1.0)}, "beta3"),
        ({"alpha": float("nan")}, "alpha"),
        ({"t_alpha_beta3": 0}, "t_alpha_beta3"),
        ({"t_alpha_beta3": True}, "t_alpha_beta3"),
        ({"t_alpha_beta3": 10, "betas": (0.0, 0.999, 0.9999)}, "t_alpha_beta3"),
        ({"t_alpha_beta3": 10, "betas": (0.99, 0.999, 0.9)}, "beta1 <= beta3"),
    ],
)
def test_hostile_options_are_refused_by_name(options, named):
    with pytest.raises(ValueError, match=named):
        gw.AdEMAMix([torch.zeros(2)], **options)


def test_state_and_memory_rule():
    """Three buffers and a step counter (four buffers with MARS), as the description predicts."""
    for options, buffers in (({}, 3), ({"mars_gamma": 0.025}, 4)):
        param = torch.zeros(3, 4)
        optimizer = gw.AdEMAMix([param], **options)
        param.grad = torch.ones(3, 4)
        optimizer.step()
        tensors = [v for v in optimizer.state[param].values() if v.dim() > 0]
        assert len(tensors) == buffers
        size = gw.AdEMAMix.description.state((3, 4), options)
        assert (size.values, size.scalars) == (12 * buffers, 1)
