"""gradwise's first-order optimizers against torch.optim, hand-checked steps, exact resume
and validation of every hyperparameter."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from optimizer_cases import CASES, CASES_WITH_TWIN, Case, path_id, with_paths

import gradwise.optim as gw


def random_shapes(rng: np.random.Generator, count: int) -> list[tuple[int, ...]]:
    shapes = []
    for _ in range(count):
        ndim = int(rng.integers(0, 4))
        shapes.append(tuple(int(n) for n in rng.integers(1, 6, size=ndim)))
    return shapes


def make_params(shapes, seed: int, dtype=torch.float64) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=dtype).requires_grad_() for shape in shapes]


def stochastic_loss(params: list[torch.Tensor], step: int) -> torch.Tensor:
    """A smooth nonconvex loss with a step-dependent linear term (a noisy gradient)."""
    generator = torch.Generator().manual_seed(1000 + step)
    total = torch.zeros((), dtype=params[0].dtype)
    for index, p in enumerate(params):
        noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        curvature = 0.5 + index
        total = total + (0.5 * curvature * p**2 + torch.sin(3 * p) + noise * p).sum()
    return total


def run_steps(optimizer: torch.optim.Optimizer, params, steps: range) -> None:
    for step in steps:
        optimizer.zero_grad()
        stochastic_loss(params, step).backward()
        optimizer.step()


def param_groups(params, hyperparameters: list[dict]) -> list[dict]:
    """Split ``params`` into one group per hyperparameter set."""
    count = len(hyperparameters)
    return [{"params": params[i::count], **hyperparameters[i]} for i in range(count) if params[i::count]]


@pytest.mark.parametrize("case, path", with_paths(CASES_WITH_TWIN), ids=path_id)
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_matches_torch_optim(case: Case, path: dict, seed: int) -> None:
    """100 steps, random shapes and hyperparameters, several param groups: allclose in float64."""
    rng = np.random.default_rng(seed)
    shapes = random_shapes(rng, int(rng.integers(2, 6)))
    hyperparameters = [case.sample(rng) for _ in range(int(rng.integers(1, 3)))]
    ours, theirs = make_params(shapes, seed), make_params(shapes, seed)
    options = dict(path)
    for key in case.constructor_only:
        options[key] = hyperparameters[0][key]
        for group in hyperparameters:
            del group[key]
    ours_opt = case.optimizer(param_groups(ours, hyperparameters), **options)
    torch_options = {key: options[key] for key in case.constructor_only}
    torch_opt = case.torch_twin(param_groups(theirs, hyperparameters), **torch_options)
    for step in range(100):
        run_steps(ours_opt, ours, range(step, step + 1))
        run_steps(torch_opt, theirs, range(step, step + 1))
    for mine, reference in zip(ours, theirs):
        torch.testing.assert_close(mine, reference, rtol=1e-6, atol=1e-12)
    # The state has torch's layout too, so checkpoints move between the two.
    for mine, reference in zip(ours, theirs):
        for key, value in torch_opt.state[reference].items():
            torch.testing.assert_close(
                ours_opt.state[mine][key].cpu().to(value.dtype), value.cpu(), rtol=1e-6, atol=1e-12
            )


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
        torch.testing.assert_close(optimizer.state[p]["exp_avg"], expected_exp_avg.to(dtype), rtol=tolerance, atol=tolerance)


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


@pytest.mark.parametrize("case, path", with_paths(CASES), ids=path_id)
def test_state_dict_resume_is_exact(case: Case, path: dict, tmp_path) -> None:
    """Saved mid-run and loaded into a fresh optimizer, the run continues bit for bit."""
    rng = np.random.default_rng(7)
    shapes = random_shapes(rng, 4)
    hyperparameters = [case.sample(rng), case.sample(rng)]
    options = dict(path)
    params = make_params(shapes, 1)
    optimizer = case.optimizer(param_groups(params, hyperparameters), **options)
    run_steps(optimizer, params, range(10))
    torch.save({"params": [p.detach() for p in params], "optimizer": optimizer.state_dict()}, tmp_path / "ckpt.pt")
    run_steps(optimizer, params, range(10, 20))

    checkpoint = torch.load(tmp_path / "ckpt.pt")
    resumed = [p.clone().requires_grad_() for p in checkpoint["params"]]
    fresh = case.optimizer(param_groups(resumed, [case.sample(rng), case.sample(rng)]), **options)
    fresh.load_state_dict(checkpoint["optimizer"])
    run_steps(fresh, resumed, range(10, 20))
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", CASES_WITH_TWIN, ids=str)
def test_loads_a_torch_optim_state_dict(case: Case) -> None:
    """A checkpoint written with torch.optim continues identically under gradwise."""
    rng = np.random.default_rng(11)
    hyperparameters = [case.sample(rng)]
    shapes = random_shapes(rng, 3)
    theirs, ours = make_params(shapes, 2), make_params(shapes, 2)
    torch_opt = case.torch_twin(param_groups(theirs, hyperparameters))
    run_steps(torch_opt, theirs, range(5))
    with torch.no_grad():
        for a, b in zip(ours, theirs):
            a.copy_(b)
    ours_opt = case.optimizer(param_groups(ours, hyperparameters))
    buffer = io.BytesIO()
    torch.save(torch_opt.state_dict(), buffer)
    buffer.seek(0)
    ours_opt.load_state_dict(torch.load(buffer))
    run_steps(torch_opt, theirs, range(5, 15))
    run_steps(ours_opt, ours, range(5, 15))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize(
    "case, keyword, value",
    [(case, keyword, value) for case in CASES for keyword, value in case.invalid],
    ids=lambda item: str(item) if not isinstance(item, float) or math.isfinite(item) else repr(item),
)
def test_invalid_hyperparameter_is_named(case: Case, keyword: str, value) -> None:
    param = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match=keyword):
        case.optimizer([param], **{keyword: value})
    # The same value in a param group of its own is caught too.
    with pytest.raises(ValueError, match=keyword):
        case.optimizer([{"params": [param], keyword: value}])


@pytest.mark.parametrize("case", CASES, ids=str)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_fuzzed_hyperparameters_are_accepted_or_named(case: Case, data) -> None:
    """Any value for any numeric hyperparameter is either accepted or rejected by name."""
    numeric = [key for key, value in case.optimizer([torch.zeros(1)]).defaults.items()
               if isinstance(value, float)]
    keyword = data.draw(st.sampled_from(numeric))
    value = data.draw(st.floats(allow_nan=True, allow_infinity=True) | st.integers(-10, 10))
    param = torch.zeros(2, requires_grad=True)
    try:
        optimizer = case.optimizer([param], **{keyword: value})
    except ValueError as error:
        assert keyword in str(error) and repr(value) in str(error)
        return
    assert math.isfinite(value) and value >= 0
    assert optimizer.param_groups[0][keyword] == value


@pytest.mark.parametrize("case", [case for case in CASES if case.name not in ("SGD", "Adagrad")], ids=str)
def test_skips_params_without_grad_and_rejects_sparse(case: Case) -> None:
    used, unused = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    optimizer = case.optimizer([used, unused], lr=0.1)
    used.grad = torch.ones(3)
    optimizer.step()
    assert not torch.equal(used, torch.ones(3))
    assert torch.equal(unused, torch.ones(3)) and unused not in optimizer.state
    used.grad = torch.ones(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        optimizer.step()


CONVERGENCE_LR = {"SGD": 0.1, "Adagrad": 0.5, "RMSprop": 0.01, "Adam": 0.05, "AdamW": 0.05, "NAdam": 0.05, "Lion": 0.01}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_converges_to_the_minimiser_of_a_quadratic(case: Case) -> None:
    """f(x) = 1/2 sum_i a_i (x_i - c_i)^2 has its minimum 0 at c; every optimizer gets there."""
    curvature = torch.linspace(0.5, 2.0, 10, dtype=torch.float64)
    centre = torch.linspace(-1.0, 1.0, 10, dtype=torch.float64)
    x = torch.zeros(10, dtype=torch.float64, requires_grad=True)
    extra = {"weight_decay": 0.0} if "weight_decay" in case.optimizer([torch.zeros(1)]).defaults else {}
    optimizer = case.optimizer([x], lr=CONVERGENCE_LR[case.name], **extra)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=2000)
    for _ in range(2000):
        optimizer.zero_grad()
        (0.5 * curvature * (x - centre) ** 2).sum().backward()
        optimizer.step()
        schedule.step()
    assert torch.linalg.vector_norm(x.detach() - centre) < 1e-3


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
