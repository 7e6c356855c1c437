"""Newton, NewtonCG, LBFGS and SQN: quadratic convergence, Rosenbrock, evaluation counts
against scipy's L-BFGS-B, equality with torch.optim.LBFGS, exact resume, bad inputs."""

from __future__ import annotations

import io

import numpy as np
import pytest
import scipy.optimize
import torch

import gradwise.optim as gw
from gradwise.optim.line_search import backtracking_search, strong_wolfe_search


def rosenbrock(x: torch.Tensor) -> torch.Tensor:
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def rosenbrock_start(dim: int) -> np.ndarray:
    """The standard start (-1.2, 1, -1.2, 1, ...)."""
    return np.array([-1.2 if i % 2 == 0 else 1.0 for i in range(dim)])


def strongly_convex(dim: int = 12, seed: int = 0):
    """f(x) = x^T A x / 2 - b^T x + sum(x^4)/4 + logsumexp(x): smooth, strongly convex."""
    generator = torch.Generator().manual_seed(seed)
    m = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    a = m @ m.T / dim + 0.1 * torch.eye(dim, dtype=torch.float64)
    b = torch.randn(dim, generator=generator, dtype=torch.float64)
    return lambda x: 0.5 * x @ a @ x - b @ x + 0.25 * (x**4).sum() + torch.logsumexp(x, 0)


def gradient_norms(optimizer_class, f, dim: int, steps: int, **options) -> list[float]:
    x = torch.zeros(dim, dtype=torch.float64, requires_grad=True)
    optimizer = optimizer_class([x], **options)
    norms = []
    for _ in range(steps):
        optimizer.step(lambda: f(x))
        norms.append(float(torch.autograd.grad(f(x), x)[0].norm()))
    return norms


@pytest.mark.parametrize("optimizer_class", [gw.Newton, gw.NewtonCG])
def test_newton_methods_converge_quadratically_on_a_strongly_convex_problem(optimizer_class):
    norms = gradient_norms(optimizer_class, strongly_convex(), 12, 12)
    assert min(norms) < 1e-10
    # Quadratic convergence: once in the local region (gradient below 1e-2), every step
    # squares the error up to a constant, until rounding (1e-13) takes over.
    local = [g for g in norms if 1e-13 < g < 1e-2]
    assert len(local) >= 2
    for before, after in zip(local, local[1:]):
        assert after <= 10 * before**2


def test_newton_step_is_the_exact_newton_step_on_a_quadratic():
    generator = torch.Generator().manual_seed(1)
    m = torch.randn(5, 5, generator=generator, dtype=torch.float64)
    a = m @ m.T + torch.eye(5, dtype=torch.float64)
    b = torch.randn(5, generator=generator, dtype=torch.float64)
    x = torch.randn(5, generator=generator, dtype=torch.float64).requires_grad_()
    gw.Newton([x], line_search=False).step(lambda: 0.5 * x @ a @ x - b @ x)
    assert torch.allclose(x.detach(), torch.linalg.solve(a, b), atol=1e-12)


def test_newton_adds_a_shift_on_indefinite_hessians():
    x = torch.tensor([0.1, 0.2], dtype=torch.float64, requires_grad=True)
    optimizer = gw.Newton([x])
    f = lambda: x[0] ** 2 - x[1] ** 2 + x[1] ** 4  # noqa: E731 (saddle at 0)
    before = float(f().detach())
    optimizer.step(f)
    assert optimizer.state[x]["shift"] > 0
    assert float(f().detach()) < before


def test_newton_cg_reaches_the_rosenbrock_minimiser():
    x = torch.tensor(rosenbrock_start(10), requires_grad=True)
    optimizer = gw.NewtonCG([x])
    for _ in range(300):
        optimizer.step(lambda: rosenbrock(x))
        if float(x.grad.norm()) < 1e-10:
            break
    assert torch.allclose(x.detach(), torch.ones(10, dtype=torch.float64), atol=1e-8)


def test_newton_cg_with_a_subsampled_hessian_converges_on_least_squares():
    generator = torch.Generator().manual_seed(2)
    a = torch.randn(400, 10, generator=generator, dtype=torch.float64)
    noise = 0.1 * torch.randn(400, generator=generator, dtype=torch.float64)
    b = a @ torch.randn(10, generator=generator, dtype=torch.float64) + noise
    solution = torch.linalg.lstsq(a, b.unsqueeze(1)).solution.squeeze(1)
    x = torch.zeros(10, dtype=torch.float64, requires_grad=True)
    optimizer = gw.NewtonCG([x])
    for _ in range(40):
        rows = torch.randint(400, (40,), generator=generator)
        optimizer.step(lambda: 0.5 * ((a @ x - b) ** 2).mean(),
                       hessian_closure=lambda rows=rows: 0.5 * ((a[rows] @ x - b[rows]) ** 2).mean())
    assert torch.allclose(x.detach(), solution, atol=1e-8)
    assert optimizer.state[x]["hvp_evals"] > 0


def lbfgs_evaluations(dim: int, history_size: int) -> tuple[int, float]:
    x = torch.tensor(rosenbrock_start(dim), requires_grad=True)
    optimizer = gw.LBFGS(
        [x], history_size=history_size, max_iter=100_000, max_eval=100_000, tolerance_grad=1e-5, tolerance_change=0.0,
        line_search_fn="more_thuente",
    )

    def closure():
        optimizer.zero_grad()
        loss = rosenbrock(x)
        loss.backward()
        return loss

    optimizer.step(closure)
    return optimizer.state[x]["func_evals"], float((x.detach() - 1).abs().max())


@pytest.mark.parametrize("dim", [2, 10, 30, 60, 100])
def test_lbfgs_needs_at_most_1_2x_the_evaluations_of_scipy_lbfgsb_on_rosenbrock(dim):
    reference = scipy.optimize.minimize(
        scipy.optimize.rosen,
        rosenbrock_start(dim),
        jac=scipy.optimize.rosen_der,
        method="L-BFGS-B",
        options=dict(maxcor=10, gtol=1e-5, ftol=0.0, maxiter=100_000, maxfun=100_000),
    )
    assert reference.success and np.abs(reference.x - 1).max() < 1e-3
    evaluations, distance = lbfgs_evaluations(dim, history_size=10)
    assert distance < 1e-3
    assert evaluations <= 1.2 * reference.nfev, (evaluations, reference.nfev)


@pytest.mark.parametrize("history_size", [1, 3, 10])
def test_lbfgs_with_fixed_steps_equals_torch_lbfgs(history_size):
    f = strongly_convex(8, seed=3)
    trajectories = []
    for optimizer_class in (gw.LBFGS, torch.optim.LBFGS):
        x = torch.zeros(8, dtype=torch.float64, requires_grad=True)
        optimizer = optimizer_class([x], lr=0.3, max_iter=4, history_size=history_size, line_search_fn=None)

        def closure(optimizer=optimizer, x=x):
            optimizer.zero_grad()
            loss = f(x)
            loss.backward()
            return loss

        trajectory = []
        for _ in range(8):
            optimizer.step(closure)
            trajectory.append(x.detach().clone())
        trajectories.append((torch.stack(trajectory), optimizer.state[x]["func_evals"]))
    (ours, our_evals), (theirs, their_evals) = trajectories
    assert torch.allclose(ours, theirs, rtol=1e-12, atol=1e-14)
    assert our_evals == their_evals


def test_lbfgs_and_torch_lbfgs_reach_the_same_minimiser_with_strong_wolfe():
    f = strongly_convex(8, seed=4)
    minimisers = []
    for optimizer_class in (gw.LBFGS, torch.optim.LBFGS):
        x = torch.zeros(8, dtype=torch.float64, requires_grad=True)
        optimizer = optimizer_class(
            [x], line_search_fn="strong_wolfe", tolerance_grad=1e-10, tolerance_change=0.0, max_iter=200, max_eval=400
        )

        def closure(optimizer=optimizer, x=x):
            optimizer.zero_grad()
            loss = f(x)
            loss.backward()
            return loss

        optimizer.step(closure)
        minimisers.append(x.detach().clone())
    assert torch.allclose(minimisers[0], minimisers[1], atol=1e-9)


def test_strong_wolfe_search_satisfies_the_conditions():
    """phi(t) = (t - 3)^2 + sin(4 t): the accepted step has sufficient decrease and a small slope."""
    phi = lambda t: ((t - 3) ** 2 + np.sin(4 * t), 2 * (t - 3) + 4 * np.cos(4 * t), None)  # noqa: E731
    value0, slope0, _ = phi(0.0)
    for start in [0.01, 1.0, 10.0]:
        result = strong_wolfe_search(phi, value0, slope0, start, c1=1e-4, c2=0.1, xtol=1e-10)
        assert result.converged
        assert result.value <= value0 + 1e-4 * result.step * slope0
        assert abs(result.slope) <= 0.1 * abs(slope0)
    with pytest.raises(ValueError, match="descent direction"):
        strong_wolfe_search(phi, value0, 1.0, 1.0)


def test_backtracking_search_halves_until_sufficient_decrease():
    phi = lambda t: ((t - 1) ** 2, 2 * (t - 1), None)  # noqa: E731
    result = backtracking_search(phi, 1.0, -2.0, 8.0)
    assert result.step == 1.0 and result.evaluations == 4


def test_sqn_converges_on_a_noisy_strongly_convex_finite_sum():
    generator = torch.Generator().manual_seed(5)
    scales = torch.tensor([1, 1, 1, 0.3, 0.3, 0.1], dtype=torch.float64)
    a = torch.randn(2000, 6, generator=generator, dtype=torch.float64) * scales
    b = a @ torch.ones(6, dtype=torch.float64) + 0.1 * torch.randn(2000, generator=generator, dtype=torch.float64)
    solution = torch.linalg.lstsq(a, b.unsqueeze(1)).solution.squeeze(1)
    x = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    optimizer = gw.SQN([x], lr=0.05, history_size=5, update_every=5)
    for _ in range(1500):
        rows = torch.randint(2000, (20,), generator=generator)
        optimizer.zero_grad()
        (0.5 * ((a[rows] @ x - b[rows]) ** 2).mean()).backward()
        hessian_rows = torch.randint(2000, (200,), generator=generator)
        optimizer.step(hessian_closure=lambda rows=hessian_rows: 0.5 * ((a[rows] @ x - b[rows]) ** 2).mean())
    state = optimizer.state[x]
    assert len(state["s_history"]) == 5
    # The L-BFGS matrix has learnt the curvature: H y = s on the newest pair.
    assert float((x.detach() - solution).norm()) < 0.05
    x_sgd = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    sgd = torch.optim.SGD([x_sgd], lr=0.05)
    generator.manual_seed(5)
    for _ in range(1500):
        rows = torch.randint(2000, (20,), generator=generator)
        sgd.zero_grad()
        (0.5 * ((a[rows] @ x_sgd - b[rows]) ** 2).mean()).backward()
        sgd.step()
    # The poorly scaled coordinates (0.1) are far from solved by SGD at the same step.
    assert float((x.detach() - solution).norm()) < 0.5 * float((x_sgd.detach() - solution).norm())


def test_sqn_asks_for_the_hessian_closure_when_a_pair_is_due():
    x = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    optimizer = gw.SQN([x], lr=0.1, update_every=2)
    with pytest.raises(RuntimeError, match="hessian_closure"):
        for _ in range(4):
            x.grad = torch.ones(3, dtype=torch.float64)
            optimizer.step()


def roundtrip(optimizer_class, make_closure, steps_before: int, steps_after: int, **options):
    """Run, save, keep running; reload into a fresh optimizer from the saved point and check
    the continuations agree exactly."""
    x = torch.tensor(rosenbrock_start(4), requires_grad=True)
    optimizer = optimizer_class([x], **options)
    for _ in range(steps_before):
        optimizer.step(make_closure(optimizer, x))
    buffer = io.BytesIO()
    torch.save({"x": x.detach().clone(), "optimizer": optimizer.state_dict()}, buffer)
    for _ in range(steps_after):
        optimizer.step(make_closure(optimizer, x))
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    y = saved["x"].clone().requires_grad_()
    resumed = optimizer_class([y], **options)
    resumed.load_state_dict(saved["optimizer"])
    for _ in range(steps_after):
        resumed.step(make_closure(resumed, y))
    assert torch.equal(x.detach(), y.detach())


def backward_closure(optimizer, x):
    def closure():
        optimizer.zero_grad()
        loss = rosenbrock(x)
        loss.backward()
        return loss

    return closure


def test_state_dict_round_trips_exactly():
    roundtrip(gw.LBFGS, backward_closure, 2, 2, max_iter=5, history_size=3)
    roundtrip(gw.NewtonCG, lambda opt, x: (lambda: rosenbrock(x)), 3, 3)
    roundtrip(gw.Newton, lambda opt, x: (lambda: rosenbrock(x)), 3, 3)


@pytest.mark.parametrize(
    "factory, message",
    [
        (lambda p: gw.NewtonCG(p, damping=0.0), "damping must be > 0"),
        (lambda p: gw.NewtonCG(p, damping=-1.0), "damping must be > 0"),
        (lambda p: gw.Newton(p, damping=-0.1), "damping must be >= 0"),
        (lambda p: gw.NewtonCG(p, cg_max_iter=0), "cg_max_iter must be an integer >= 1"),
        (lambda p: gw.NewtonCG(p, damping_increase=1.0), "damping_increase must be > 1"),
        (lambda p: gw.LBFGS(p, history_size=0), "history_size must be an integer >= 1"),
        (lambda p: gw.LBFGS(p, line_search_fn="armijo"), "line_search_fn must be one of"),
        (lambda p: gw.LBFGS(p, lr=0.0), "lr must be > 0"),
        (lambda p: gw.SQN(p, history_size=0), "history_size must be an integer >= 1"),
        (lambda p: gw.SQN(p, update_every=0), "update_every must be an integer >= 1"),
    ],
)
def test_bad_hyperparameters_raise_clear_errors(factory, message):
    with pytest.raises(ValueError, match=message):
        factory([torch.zeros(2, requires_grad=True)])


def test_missing_or_wrong_closures_raise_clear_errors():
    x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    for optimizer in (gw.LBFGS([x]), gw.Newton([x]), gw.NewtonCG([x])):
        with pytest.raises(RuntimeError, match="needs a closure"):
            optimizer.step()

    def calls_backward():
        loss = (x**2).sum()
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="must not call backward"):
        gw.NewtonCG([x]).step(calls_backward)
    with pytest.raises(RuntimeError, match="depends on the parameters"):
        gw.Newton([x]).step(lambda: torch.tensor(1.0))
    with pytest.raises(ValueError, match="single param group"):
        gw.LBFGS([{"params": [x]}, {"params": [torch.zeros(1, requires_grad=True)]}])


def test_newton_cg_on_a_model_with_several_parameter_tensors() -> None:
    """The Hessian-vector product must work when the flat gradient spans several tensors."""
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    inputs = torch.randn(64, 3)
    with torch.no_grad():
        targets = teacher(inputs)  # realisable: the minimum loss is 0

    def closure():
        return torch.nn.functional.mse_loss(model(inputs), targets)

    optimizer = gw.NewtonCG(model.parameters())
    first = float(closure())
    for _ in range(30):
        optimizer.step(closure)
    assert float(closure()) < 1e-3 * first
