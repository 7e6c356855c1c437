"""Algorithm-specific checks of gradwise's first-order optimizers: hand-computed steps and
kernels checked against their formula. The checks every optimizer shares (torch parity,
resume, state_dict, keywords, inputs, validation, convergence) run over the contract table
in test_contract.py."""

from __future__ import annotations

import pytest
import torch

import gradwise.optim as gw


def make_params(shapes, seed: int, dtype=torch.float64) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=dtype).requires_grad_() for shape in shapes]


@pytest.mark.parametrize("fused", [None, False], ids=["default", "foreach"])
def test_adam_hand_checked_iterates(fused) -> None:
    """Adam on theta^2/2 from 2.0, lr 0.1, betas (0.9, 0.999): the exact iterates."""
    theta = torch.tensor([2.0], requires_grad=True)
    optimizer = gw.Adam([theta], lr=0.1, fused=fused)
    iterates = []
    for _ in range(5):
        optimizer.zero_grad()
        (theta**2 / 2).sum().backward()
        optimizer.step()
        iterates.append(theta.item())
    # Step 1 moves by exactly lr (m_hat / sqrt(v_hat) = 1); later steps follow the formula.
    assert iterates == pytest.approx([1.900000, 1.800166, 1.700623, 1.601505, 1.502956], abs=5e-7)


def test_adagrad_honours_per_group_initial_accumulator() -> None:
    """Unlike torch.optim.Adagrad, which reads it from the constructor only."""
    first, second = torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)
    optimizer = gw.Adagrad([{"params": [first]}, {"params": [second], "initial_accumulator_value": 3.0}])
    first.grad, second.grad = torch.ones(2), torch.ones(2)
    optimizer.step()
    assert torch.equal(optimizer.state[first]["sum"], torch.ones(2))
    assert torch.equal(optimizer.state[second]["sum"], torch.full((2,), 4.0))


def test_lion_step_matches_formula() -> None:
    lr, beta1, beta2, weight_decay = 0.05, 0.8, 0.95, 0.3
    theta0 = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    momentum0 = torch.tensor([0.5, 0.5, -1.0, -0.2], dtype=torch.float64)
    grad = torch.tensor([-1.0, 0.2, 2.0, 0.2], dtype=torch.float64)
    theta = theta0.clone().requires_grad_()
    optimizer = gw.Lion([theta], lr=lr, betas=(beta1, beta2), weight_decay=weight_decay)
    optimizer.state[theta]["exp_avg"] = momentum0.clone()
    theta.grad = grad.clone()
    optimizer.step()
    # c = beta1 m + (1 - beta1) g = [0.2, 0.44, -0.4, -0.12]: signs +, +, -, -.
    expected_sign = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    expected_theta = theta0 - lr * (expected_sign + weight_decay * theta0)
    expected_momentum = beta2 * momentum0 + (1 - beta2) * grad
    torch.testing.assert_close(theta.detach(), expected_theta, rtol=0, atol=1e-15)
    torch.testing.assert_close(optimizer.state[theta]["exp_avg"], expected_momentum, rtol=0, atol=1e-15)


@pytest.mark.parametrize(
    "dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-6), (torch.bfloat16, 2**-7)], ids=str
)
def test_lion_fused_cpu_kernel_matches_formula(dtype, tolerance) -> None:
    """One fused step equals the formula computed in float64 (rounded once to ``dtype``).

    Parameters are compared where sign(c) is well defined: where c is within rounding of
    zero, the kernel's float arithmetic may flip it.
    """
    shapes = [(700, 500), (13,), (3, 4, 2), ()]  # the first spans many threads' chunks
    lr, beta1, beta2, weight_decay = 1e-2, 0.9, 0.99, 0.1
    params = make_params(shapes, 3, dtype)
    generator = torch.Generator().manual_seed(4)
    grads = [torch.randn(p.shape, generator=generator).to(dtype) for p in params]
    exp_avgs = [torch.randn(p.shape, generator=generator).to(dtype) for p in params]
    expected = []
    for p, g, m in zip(params, grads, exp_avgs):
        p64, g64, m64 = p.detach().double(), g.double(), m.double()
        interpolation = beta1 * m64 + (1 - beta1) * g64
        expected.append(
            (
                (1 - lr * weight_decay) * p64 - lr * torch.sign(interpolation),
                beta2 * m64 + (1 - beta2) * g64,
                interpolation.abs() > 1e-3,
            )
        )
    optimizer = gw.Lion(params, lr=lr, betas=(beta1, beta2), weight_decay=weight_decay, fused=True)
    for p, g, m in zip(params, grads, exp_avgs):
        p.grad = g
        optimizer.state[p]["exp_avg"] = m.clone()
    optimizer.step()
    for p, (expected_param, expected_exp_avg, sign_defined) in zip(params, expected):
        assert sign_defined.double().mean() > 0.99
        torch.testing.assert_close(
            p.detach()[sign_defined], expected_param.to(dtype)[sign_defined], rtol=tolerance, atol=tolerance
        )
        torch.testing.assert_close(optimizer.state[p]["exp_avg"], expected_exp_avg.to(dtype),
                                   rtol=tolerance, atol=tolerance)


def test_lion_compiled_kernel_for_other_devices_matches_foreach() -> None:
    """The inductor kernel that fused Lion uses off the CPU, checked here on CPU tensors."""
    from gradwise.optim.lion import _compiled_lion_kernel

    generator = torch.Generator().manual_seed(5)
    params, grads, exp_avgs = ([torch.randn(n, generator=generator) for n in (17, 300)] for _ in range(3))
    expected_params = [p.clone() for p in params]
    expected_exp_avgs = [m.clone() for m in exp_avgs]
    lr, weight_decay, beta1, beta2 = 0.01, 0.5, 0.9, 0.99
    for p, g, m in zip(expected_params, grads, expected_exp_avgs):
        p.mul_(1 - lr * weight_decay).sub_(lr * torch.sign(beta1 * m + (1 - beta1) * g))
        m.mul_(beta2).add_((1 - beta2) * g)
    scalars = [torch.tensor(v) for v in (lr, 1 - lr * weight_decay, beta1, 1 - beta2)]
    _compiled_lion_kernel()(params, grads, exp_avgs, *scalars)
    for actual, expected in zip(params + exp_avgs, expected_params + expected_exp_avgs):
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)


def test_weight_decay_groups_exempt_biases_and_norms() -> None:
    model = torch.nn.Sequential(
        torch.nn.Embedding(10, 4), torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2)
    )
    groups = gw.weight_decay_groups(model, 0.1, lr=1e-3)
    decayed = {id(p) for p in groups[0]["params"]}
    exempt = {id(p) for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert all(group["lr"] == 1e-3 for group in groups)
    assert decayed == {id(model[0].weight), id(model[1].weight), id(model[3].weight)}
    assert exempt == {id(model[1].bias), id(model[2].weight), id(model[2].bias), id(model[3].bias)}
    without_embeddings = gw.weight_decay_groups(model, 0.1, exclude_embeddings=True)
    assert id(model[0].weight) in {id(p) for p in without_embeddings[1]["params"]}
    with pytest.raises(ValueError, match="weight_decay"):
        gw.weight_decay_groups(model, -0.1)
