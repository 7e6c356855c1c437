"""SVRG and SAGA: linear convergence where SGD with the same step stalls; the SAGA table's
bookkeeping; dynamic sampling; exact resume and bad inputs."""

from __future__ import annotations

import io

import pytest
import torch

import gradwise.optim as gw

N, D = 200, 5


def finite_sum(seed: int = 0):
    """Ridge regression: f_i(w) = (a_i^T w - b_i)^2 / 2 + mu |w|^2 / 2, noisy labels so that
    the per-example gradients do not vanish at the optimum."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(N, D, generator=generator, dtype=torch.float64)
    truth = torch.randn(D, generator=generator, dtype=torch.float64)
    b = a @ truth + torch.randn(N, generator=generator, dtype=torch.float64)
    mu = 0.1
    solution = torch.linalg.solve(a.T @ a / N + mu * torch.eye(D, dtype=torch.float64), a.T @ b / N)
    smoothness = float((a**2).sum(1).max()) + mu

    def loss(w, rows=None):
        rows = torch.arange(N) if rows is None else rows
        return 0.5 * ((a[rows] @ w - b[rows]) ** 2).mean() + 0.5 * mu * (w * w).sum()

    return loss, solution, smoothness


def closure_for(loss, w, rows=None):
    def closure():
        value = loss(w, rows)
        value.backward()
        return value

    return closure


def run_svrg(loss, lr: float, epochs: int, seed: int = 1) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    w = torch.zeros(D, dtype=torch.float64, requires_grad=True)
    optimizer = gw.SVRG([w], lr=lr)
    iterates = []
    for _ in range(epochs):
        optimizer.update_snapshot(closure_for(loss, w))
        for _ in range(N):
            optimizer.step(closure_for(loss, w, torch.randint(N, (1,), generator=generator)))
        iterates.append(w.detach().clone())
    return iterates


def run_saga(loss, lr: float, epochs: int, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    w = torch.zeros(D, dtype=torch.float64, requires_grad=True)
    optimizer = gw.SAGA([w], lr=lr, num_slots=N)
    iterates = []
    for _ in range(epochs):
        for _ in range(N):
            j = int(torch.randint(N, (), generator=generator))
            optimizer.step(j, closure_for(loss, w, torch.tensor([j])))
        iterates.append(w.detach().clone())
    return iterates


def run_sgd(loss, lr: float, epochs: int, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    w = torch.zeros(D, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.SGD([w], lr=lr)
    iterates = []
    for _ in range(epochs):
        for _ in range(N):
            optimizer.zero_grad()
            loss(w, torch.randint(N, (1,), generator=generator)).backward()
            optimizer.step()
        iterates.append(w.detach().clone())
    return iterates


@pytest.mark.parametrize("runner, step_factor", [(run_svrg, 0.2), (run_saga, 1 / 3)])
def test_variance_reduction_converges_linearly_where_sgd_stalls(runner, step_factor):
    loss, solution, smoothness = finite_sum()
    lr = step_factor / smoothness
    errors = [float((w - solution).norm()) for w in runner(loss, lr, 25)]
    assert errors[-1] < 1e-5
    # Linear convergence: a steady factor per epoch, at least 10x per 10 epochs in both
    # halves (per-epoch errors are noisy: the iterate moves at random).
    assert errors[14] < 0.1 * errors[4]
    assert errors[24] < 0.1 * errors[14] or errors[24] < 1e-13
    sgd_errors = [float((w - solution).norm()) for w in run_sgd(loss, lr, 25)]
    # SGD with the same step stalls at a noise floor set by lr * variance.
    assert sgd_errors[-1] > 1e-4
    assert sgd_errors[-1] > 0.3 * sgd_errors[9]


def test_saga_step_by_hand():
    """Two examples f_j(w) = (w - c_j)^2 / 2: check the table, the mean and the iterate."""
    c = torch.tensor([1.0, 3.0], dtype=torch.float64)
    w = torch.tensor([0.0], dtype=torch.float64, requires_grad=True)
    optimizer = gw.SAGA([w], lr=0.5, num_slots=2)

    def example(j):
        return closure_for(lambda w, rows: 0.5 * ((w - c[j]) ** 2).sum(), w)

    optimizer.step(0, example(0))  # g = -1; v = -1 - 0 + 0; w = 0.5; mean = -0.5
    assert float(w) == pytest.approx(0.5)
    optimizer.step(1, example(1))  # g = -2.5; v = -2.5 - 0 + (-0.5) = -3; w = 2; mean = -1.75
    assert float(w) == pytest.approx(2.0)
    state = optimizer.state[w]
    assert torch.allclose(state["gradient_table"].squeeze(1), torch.tensor([-1.0, -2.5], dtype=torch.float64))
    assert float(state["gradient_mean"]) == pytest.approx(-1.75)
    optimizer.step(0, example(0))  # g = 1; v = 1 - (-1) + (-1.75) = 0.25; w = 1.875
    assert float(w) == pytest.approx(1.875)


def test_svrg_estimate_is_the_full_gradient_at_the_snapshot():
    loss, _, _ = finite_sum()
    w = torch.randn(D, dtype=torch.float64).requires_grad_()
    optimizer = gw.SVRG([w], lr=0.0)
    optimizer.update_snapshot(closure_for(loss, w))
    full = torch.autograd.grad(loss(w), w)[0]
    optimizer.step(closure_for(loss, w, torch.tensor([3, 7])))
    assert torch.allclose(w.grad, full, atol=1e-14)


def test_variance_reduced_state_dicts_round_trip_exactly():
    loss, _, _ = finite_sum()
    for make, stepper in [
        (lambda w: gw.SAGA([w], lr=0.01, num_slots=N),
         lambda opt, w, j: opt.step(j, closure_for(loss, w, torch.tensor([j])))),
        (lambda w: gw.SVRG([w], lr=0.01), lambda opt, w, j: opt.step(closure_for(loss, w, torch.tensor([j])))),
    ]:
        w = torch.zeros(D, dtype=torch.float64, requires_grad=True)
        optimizer = make(w)
        if isinstance(optimizer, gw.SVRG):
            optimizer.update_snapshot(closure_for(loss, w))
        for j in range(10):
            stepper(optimizer, w, j)
        buffer = io.BytesIO()
        torch.save({"w": w.detach().clone(), "state": optimizer.state_dict()}, buffer)
        for j in range(10, 20):
            stepper(optimizer, w, j)
        buffer.seek(0)
        saved = torch.load(buffer)
        v = saved["w"].clone().requires_grad_()
        resumed = make(v)
        resumed.load_state_dict(saved["state"])
        for j in range(10, 20):
            stepper(resumed, v, j)
        assert torch.equal(w.detach(), v.detach())


def test_geometric_batch_size_schedule():
    schedule = gw.GeometricBatchSize(initial=16, factor=1.5, maximum=100)
    assert [schedule(k) for k in range(7)] == [16, 24, 36, 54, 81, 100, 100]
    assert schedule.examples_seen(3) == 16 + 24 + 36
    assert [schedule.next() for _ in range(3)] == [16, 24, 36]
    resumed = gw.GeometricBatchSize(1, 2.0)
    resumed.load_state_dict(schedule.state_dict())
    assert resumed.next() == schedule.next() == 54
    unbounded = gw.GeometricBatchSize(initial=10, factor=2.0)
    assert unbounded(10) == 10 * 2**10


def test_dynamic_sampling_converges_linearly_with_a_constant_step():
    """Growing batches shrink the gradient noise geometrically, so SGD with a constant step
    keeps converging (Bottou, Curtis & Nocedal 2018, Thm. 5.3) where fixed batches stall."""
    loss, solution, _ = finite_sum()
    hessian = torch.autograd.functional.hessian(loss, torch.zeros(D, dtype=torch.float64))
    lr = 0.5 / float(torch.linalg.eigvalsh(hessian)[-1])
    generator = torch.Generator().manual_seed(0)
    errors = {}
    for name, schedule in [("growing", gw.GeometricBatchSize(8, 1.15)), ("fixed", gw.GeometricBatchSize(8, 1.0))]:
        w = torch.zeros(D, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.SGD([w], lr=lr)
        for _ in range(60):
            optimizer.zero_grad()
            loss(w, torch.randint(N, (schedule.next(),), generator=generator)).backward()
            optimizer.step()
        errors[name] = float((w.detach() - solution).norm())
    assert errors["growing"] < 0.1 * errors["fixed"]


@pytest.mark.parametrize(
    "factory, message",
    [
        (lambda p: gw.SAGA(p, lr=-1.0), "lr must be >= 0"),
        (lambda p: gw.SAGA(p, num_slots=0), "num_slots must be an integer >= 1"),
        (lambda p: gw.SVRG(p, lr=float("nan")), "lr must be >= 0"),
        (lambda p: gw.GeometricBatchSize(0, 2.0), "initial must be an integer >= 1"),
        (lambda p: gw.GeometricBatchSize(4, 0.5), "factor must be >= 1"),
        (lambda p: gw.GeometricBatchSize(4, 2.0, maximum=2), "maximum must be an integer >= 4"),
    ],
)
def test_bad_inputs_raise_clear_errors(factory, message):
    with pytest.raises(ValueError, match=message):
        factory([torch.zeros(2, requires_grad=True)])


def test_missing_closures_and_snapshots_raise_clear_errors():
    w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="update_snapshot"):
        gw.SVRG([w]).step(lambda: (w**2).sum().backward())
    with pytest.raises(RuntimeError, match="needs a closure"):
        gw.SVRG([w]).step()
    with pytest.raises(RuntimeError, match="slot index and a closure"):
        gw.SAGA([w], num_slots=3).step(1)
    with pytest.raises(ValueError, match="slot must be an integer"):
        gw.SAGA([w], num_slots=3).step(3, lambda: (w**2).sum().backward())
