"""gradwise.optim.LBFGS against torch.optim.LBFGS: defaults, iterates, state_dict both ways,
exact resume, early exits, complex / zero-size / low-precision parameters, non-finite values."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing._internal.common_optimizers import optim_inputs_func_lbfgs

import gradwise.optim as gw

SEARCHES = [None, "strong_wolfe"]


def rosenbrock(x: torch.Tensor) -> torch.Tensor:
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def rosenbrock_start(dim: int, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor([-1.2 if i % 2 == 0 else 1.0 for i in range(dim)], dtype=dtype)


class Run:
    """One optimizer over one parameter tensor, driven by ``loss(x)`` through a closure."""

    def __init__(self, cls, start: torch.Tensor, loss=rosenbrock, **options) -> None:
        self.x = start.clone().requires_grad_()
        self.loss = loss
        self.optimizer = cls([self.x], **options)

    def closure(self):
        self.optimizer.zero_grad()
        value = self.loss(self.x)
        value.backward()
        return value

    def steps(self, count: int) -> list[tuple[torch.Tensor, float]]:
        """Each step's returned loss and the iterate after it."""
        return [(float(self.optimizer.step(self.closure).detach()), self.x.detach().clone()) for _ in range(count)]

    @property
    def state(self) -> dict:
        return self.optimizer.state[self.x]


def assert_same_trajectory(ours: list, theirs: list, rtol: float = 1e-10, atol: float = 1e-12) -> None:
    assert len(ours) == len(theirs)
    for step, ((our_loss, our_x), (their_loss, their_x)) in enumerate(zip(ours, theirs)):
        assert math.isclose(our_loss, their_loss, rel_tol=rtol, abs_tol=atol), (step, our_loss, their_loss)
        torch.testing.assert_close(our_x, their_x, rtol=rtol, atol=atol, msg=f"step {step}")


def test_defaults_are_torchs() -> None:
    x = torch.zeros(3, requires_grad=True)
    assert gw.LBFGS([x]).defaults == torch.optim.LBFGS([x]).defaults
    assert gw.LBFGS([x], max_iter=9).defaults["max_eval"] == 11  # max_iter * 5 // 4, as torch


@pytest.mark.parametrize("search", SEARCHES)
@pytest.mark.parametrize("dim, history_size, max_iter, lr", [(2, 100, 20, 1.0), (10, 5, 7, 1.0), (6, 3, 4, 0.3)])
def test_iterates_equal_torch_on_rosenbrock(search, dim, history_size, max_iter, lr) -> None:
    options = dict(line_search_fn=search, history_size=history_size, max_iter=max_iter, lr=lr)
    ours = Run(gw.LBFGS, rosenbrock_start(dim), **options)
    theirs = Run(torch.optim.LBFGS, rosenbrock_start(dim), **options)
    assert_same_trajectory(ours.steps(15), theirs.steps(15))
    assert ours.state["func_evals"] == theirs.state["func_evals"]
    assert ours.state["n_iter"] == theirs.state["n_iter"]
    if search == "strong_wolfe" and max_iter == 20:  # 300 iterations: at the minimiser
        assert float(rosenbrock(ours.x.detach())) < 1e-6 * float(rosenbrock(rosenbrock_start(dim)))


@pytest.mark.parametrize("search", SEARCHES)
def test_iterates_equal_torch_for_torchs_own_hyperparameter_sets(search) -> None:
    """The inputs torch's optimizer tests use (Tensor lr included), float32, a logistic loss."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(64, 8, generator=generator)
    labels = (torch.rand(64, generator=generator) < 0.5).float()

    def logistic(w):
        return torch.nn.functional.binary_cross_entropy_with_logits(features @ w, labels) + 1e-3 * w.square().sum()

    for optim_input in optim_inputs_func_lbfgs("cpu"):
        options = {"line_search_fn": search, **optim_input.kwargs}
        start = torch.randn(8, generator=generator)
        ours, theirs = Run(gw.LBFGS, start, logistic, **options), Run(torch.optim.LBFGS, start, logistic, **options)
        assert_same_trajectory(ours.steps(6), theirs.steps(6), rtol=1e-6, atol=1e-7)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    lr=st.floats(0.05, 1.5),
    history_size=st.integers(1, 12),
    max_iter=st.integers(1, 12),
    search=st.sampled_from(SEARCHES),
)
def test_iterates_equal_torch_for_random_hyperparameters(seed, lr, history_size, max_iter, search) -> None:
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(10, 10, generator=generator, dtype=torch.float64)
    hessian = a @ a.T / 10 + 0.1 * torch.eye(10, dtype=torch.float64)
    b = torch.randn(10, generator=generator, dtype=torch.float64)

    def loss(x):  # a convex quadratic plus a quartic, so the curvature changes along the path
        return 0.5 * x @ hessian @ x - b @ x + 0.05 * x.pow(4).sum()

    start = torch.randn(10, generator=generator, dtype=torch.float64)
    options = dict(lr=lr, history_size=history_size, max_iter=max_iter, line_search_fn=search)
    ours, theirs = Run(gw.LBFGS, start, loss, **options), Run(torch.optim.LBFGS, start, loss, **options)
    assert_same_trajectory(ours.steps(6), theirs.steps(6), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("search", SEARCHES)
def test_stepping_again_after_an_early_exit_matches_torch(search) -> None:
    """The first step stops at once (gradient below tolerance_grad, then a directional
    derivative above -tolerance_change); the next steps go on as torch's do (no KeyError)."""
    for options in (dict(tolerance_grad=1e3), dict(tolerance_change=1e3), dict(max_iter=1)):
        ours = Run(gw.LBFGS, rosenbrock_start(4), line_search_fn=search, **options)
        theirs = Run(torch.optim.LBFGS, rosenbrock_start(4), line_search_fn=search, **options)
        assert_same_trajectory(ours.steps(2), theirs.steps(2))
        for run in (ours, theirs):
            for group in run.optimizer.param_groups:
                group.update(tolerance_grad=1e-7, tolerance_change=1e-9, max_iter=20, max_eval=25)
        assert_same_trajectory(ours.steps(4), theirs.steps(4))


@pytest.mark.parametrize("tolerance", [-math.inf, math.inf])
def test_infinite_tolerance_grad_is_accepted_as_in_torch(tolerance) -> None:
    """-inf never stops on the gradient, +inf stops at once: both as torch's LBFGS; NaN is refused."""
    options = dict(tolerance_grad=tolerance, tolerance_change=0.0, max_iter=5)
    ours, theirs = Run(gw.LBFGS, rosenbrock_start(2), **options), Run(torch.optim.LBFGS, rosenbrock_start(2), **options)
    assert_same_trajectory(ours.steps(4), theirs.steps(4))
    with pytest.raises(ValueError, match="tolerance_grad must be"):
        gw.LBFGS([torch.zeros(1, requires_grad=True)], tolerance_grad=math.nan)


def _save_and_reload(run: Run, cls, **options) -> Run:
    """A new optimizer of ``cls`` on a copy of the parameters, loaded from ``run``'s state_dict
    after a trip through torch.save / torch.load(weights_only=True)."""
    buffer = io.BytesIO()
    torch.save(run.optimizer.state_dict(), buffer)
    buffer.seek(0)
    state_dict = torch.load(buffer, weights_only=True)
    resumed = Run(cls, run.x.detach(), run.loss, **options)
    resumed.optimizer.load_state_dict(state_dict)
    return resumed


@pytest.mark.parametrize("search", [None, "strong_wolfe", "more_thuente"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_state_dict_round_trip_resumes_exactly(search, dtype) -> None:
    options = dict(line_search_fn=search, history_size=4, max_iter=3)
    straight = Run(gw.LBFGS, rosenbrock_start(6, dtype), **options)
    expected = straight.steps(8)
    interrupted = Run(gw.LBFGS, rosenbrock_start(6, dtype), **options)
    before = interrupted.steps(3)
    resumed = _save_and_reload(interrupted, gw.LBFGS, **options)
    after = resumed.steps(5)
    for (our_loss, our_x), (their_loss, their_x) in zip(before + after, expected):
        assert our_loss == their_loss and torch.equal(our_x, their_x)
    assert all(math.isfinite(loss) for loss, _ in after)


def test_state_dict_is_deterministic() -> None:
    run = Run(gw.LBFGS, rosenbrock_start(4), history_size=3, max_iter=4)
    run.steps(3)
    first = run.optimizer.state_dict()
    resumed = _save_and_reload(run, gw.LBFGS, history_size=3, max_iter=4)
    second = resumed.optimizer.state_dict()
    assert first["param_groups"] == second["param_groups"]
    assert first["state"].keys() == second["state"].keys()
    for key, value in first["state"][0].items():
        other = second["state"][0][key]
        if isinstance(value, list):
            assert len(value) == len(other) and all(torch.equal(a, b) for a, b in zip(value, other)), key
        elif isinstance(value, torch.Tensor):
            assert torch.equal(value, other), key
        else:
            assert value == other, key


@pytest.mark.parametrize("search", SEARCHES)
@pytest.mark.parametrize("source, target", [(torch.optim.LBFGS, gw.LBFGS), (gw.LBFGS, torch.optim.LBFGS)])
def test_state_dict_moves_between_torch_and_gradwise(search, source, target) -> None:
    options = dict(line_search_fn=search, history_size=5, max_iter=4)
    expected = Run(torch.optim.LBFGS, rosenbrock_start(6), **options).steps(7)
    first = Run(source, rosenbrock_start(6), **options)
    before = first.steps(3)
    after = _save_and_reload(first, target, **options).steps(4)
    assert_same_trajectory(before + after, expected)


@pytest.mark.parametrize("search", SEARCHES)
def test_complex_parameters_are_optimized_as_their_real_view(search) -> None:
    generator = torch.Generator().manual_seed(1)
    target = torch.randn(5, dtype=torch.complex128, generator=generator)
    start = torch.randn(5, dtype=torch.complex128, generator=generator)

    def loss(z):
        return (z - target).abs().pow(2).sum() + 0.1 * (z * z).real.sum()

    options = dict(line_search_fn=search, history_size=4, max_iter=5)
    ours, theirs = Run(gw.LBFGS, start, loss, **options), Run(torch.optim.LBFGS, start, loss, **options)
    assert_same_trajectory(ours.steps(4), theirs.steps(4))
    real = Run(gw.LBFGS, torch.view_as_real(start), lambda r: loss(torch.view_as_complex(r)), **options)
    for (_, z), (_, r) in zip(Run(gw.LBFGS, start, loss, **options).steps(4), real.steps(4)):
        torch.testing.assert_close(torch.view_as_real(z), r, rtol=1e-12, atol=1e-14)
    assert ours.x.imag.abs().max() > 0.1  # the imaginary part moved


def test_zero_size_parameters_change_nothing() -> None:
    empty = torch.zeros(0, 3, dtype=torch.float64, requires_grad=True)
    x = rosenbrock_start(4).requires_grad_()
    with_empty = gw.LBFGS([empty, x], history_size=4)
    reference_x = rosenbrock_start(4).requires_grad_()
    reference = gw.LBFGS([reference_x], history_size=4)
    for optimizer, params in ((with_empty, [empty, x]), (reference, [reference_x])):
        def closure(optimizer=optimizer, point=params[-1], params=params):
            optimizer.zero_grad()
            loss = rosenbrock(point) + sum(p.sum() for p in params[:-1])
            loss.backward()
            return loss

        for _ in range(3):
            optimizer.step(closure)
    assert torch.equal(x, reference_x)
    only_empty = gw.LBFGS([empty])

    def empty_closure():
        only_empty.zero_grad()
        loss = empty.sum() + 1.0
        loss.backward()
        return loss

    assert float(only_empty.step(empty_closure).detach()) == 1.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("search", [None, "strong_wolfe", "more_thuente"])
def test_low_precision_parameters_descend(dtype, search) -> None:
    target = torch.linspace(-1, 1, 16)

    def loss(x):
        return (x.float() - target).square().sum()

    run = Run(gw.LBFGS, torch.zeros(16, dtype=dtype), loss, line_search_fn=search, max_iter=10)
    run.steps(2)
    assert run.x.dtype == dtype and float(loss(run.x.detach())) < 0.01 * float(loss(torch.zeros(16)))


def test_named_parameters_are_accepted() -> None:
    model = torch.nn.Linear(3, 1, dtype=torch.float64)
    optimizer = gw.LBFGS(model.named_parameters(), line_search_fn="strong_wolfe")
    inputs = torch.randn(20, 3, dtype=torch.float64)
    targets = inputs @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.3

    def closure():
        optimizer.zero_grad()
        loss = (model(inputs).squeeze(1) - targets).square().mean()
        loss.backward()
        return loss

    optimizer.step(closure)
    assert optimizer.state_dict()["param_groups"][0]["param_names"] == ["weight", "bias"]
    torch.testing.assert_close(model.bias.detach(), torch.tensor([0.3], dtype=torch.float64), atol=1e-4, rtol=0)


@pytest.mark.parametrize("search", [None, "strong_wolfe", "more_thuente"])
def test_a_non_finite_start_changes_nothing(search) -> None:
    run = Run(gw.LBFGS, torch.tensor([1.0, 2.0]), lambda x: x.sum() * torch.tensor(math.nan), line_search_fn=search)
    run.steps(2)
    assert torch.equal(run.x.detach(), torch.tensor([1.0, 2.0])) and run.state["nonfinite"]


@pytest.mark.parametrize("search", [None, "strong_wolfe", "more_thuente"])
def test_a_step_onto_non_finite_values_is_undone(search) -> None:
    """log(x) is NaN for x < 0: the first move (a unit step at x = 0.5) lands there."""

    def loss(x):
        return (x - torch.log(x)).sum() + 0.0 * x.sum()

    start = torch.tensor([0.05, 0.05], dtype=torch.float64)
    run = Run(gw.LBFGS, start, loss, line_search_fn=search, lr=10.0, max_iter=5)
    run.steps(3)
    assert torch.isfinite(run.x).all() and bool((run.x > 0).all())
    assert math.isfinite(float(loss(run.x)))


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(line_search_fn="armijo"), "line_search_fn must be one of None, 'strong_wolfe', 'more_thuente'"),
        (dict(tolerance_change=-1.0), "tolerance_change must be >= 0"),
        (dict(max_iter=0), "max_iter must be an integer >= 1"),
        (dict(history_size=0), "history_size must be an integer >= 1"),
    ],
)
def test_bad_options_are_named(options, message) -> None:
    with pytest.raises(ValueError, match=message):
        gw.LBFGS([torch.zeros(2, requires_grad=True)], **options)


def test_deepcopy_continues_identically() -> None:
    run = Run(gw.LBFGS, rosenbrock_start(4), line_search_fn="strong_wolfe", max_iter=3)
    run.steps(2)
    twin = Run(gw.LBFGS, run.x.detach(), line_search_fn="strong_wolfe", max_iter=3)
    twin.optimizer.load_state_dict(copy.deepcopy(run.optimizer.state_dict()))
    assert_same_trajectory(run.steps(3), twin.steps(3), rtol=0, atol=0)


def test_a_second_param_group_is_refused() -> None:
    x, y = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="LBFGS supports a single param group"):
        gw.LBFGS([{"params": [x]}, {"params": [y]}])
    optimizer = gw.LBFGS([x])
    with pytest.raises(ValueError, match="LBFGS supports a single param group"):
        optimizer.add_param_group({"params": [y]})


def test_sparse_gradients_are_densified_as_torch_does() -> None:
    runs = []
    for cls in (gw.LBFGS, torch.optim.LBFGS):
        embedding = torch.nn.Embedding(5, 3, sparse=True, dtype=torch.float64)
        with torch.no_grad():
            embedding.weight.copy_(torch.arange(15, dtype=torch.float64).view(5, 3) / 10)
        optimizer = cls(embedding.parameters(), line_search_fn="strong_wolfe", max_iter=5)

        def closure(optimizer=optimizer, embedding=embedding):
            optimizer.zero_grad()
            loss = (embedding(torch.tensor([0, 2, 2])) - 1).square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        assert embedding.weight.grad.is_sparse
        runs.append(embedding.weight.detach())
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-12, atol=1e-14)
