"""Tests for gradwise.problems: optima, gradients, Hessians, hand-computed values, validation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradwise.problems import PROBLEMS, Beale, Problem, Quadratic, Rastrigin, Rosenbrock, make_problem

CASES = [
    Rosenbrock(),
    Rosenbrock(dim=7),
    Beale(),
    Rastrigin(),
    Rastrigin(dim=5),
    Quadratic(),
    Quadratic(dim=6, kappa=1e4, seed=3),
]


def _ids(problem: Problem) -> str:
    return problem.label


@pytest.mark.parametrize("problem", CASES, ids=_ids)
def test_value_at_minimiser_is_the_minimum(problem):
    assert problem(problem.minimiser).item() == pytest.approx(problem.minimum, abs=1e-12)


@pytest.mark.parametrize("problem", CASES, ids=_ids)
def test_gradient_vanishes_at_minimiser(problem):
    x = problem.minimiser.requires_grad_()
    (gradient,) = torch.autograd.grad(problem(x), x)
    assert gradient.abs().max().item() < 1e-10


@pytest.mark.parametrize("problem", CASES, ids=_ids)
def test_start_is_not_optimal_and_shapes_match(problem):
    start = problem.initial_point
    assert start.shape == problem.minimiser.shape == (problem.dim,)
    assert start.dtype == problem.dtype
    assert problem(start).item() > problem.minimum + 0.1
    assert len(problem.bounds) == problem.dim
    assert all(low < high for low, high in problem.bounds)


@pytest.mark.parametrize("problem", CASES, ids=_ids)
def test_batched_evaluation_matches_pointwise(problem):
    points = torch.randn(5, 3, problem.dim, generator=torch.Generator().manual_seed(0), dtype=problem.dtype)
    values = problem(points)
    assert values.shape == (5, 3)
    expected = torch.stack([torch.stack([problem(p) for p in row]) for row in points])
    torch.testing.assert_close(values, expected)


@pytest.mark.parametrize("problem", CASES, ids=_ids)
def test_initial_point_is_a_fresh_tensor(problem):
    problem.initial_point.add_(100.0)
    problem.minimiser.add_(100.0)
    assert problem(problem.minimiser).item() == pytest.approx(problem.minimum, abs=1e-12)
    assert problem(problem.initial_point).item() < 1e6


def test_standard_starting_points():
    assert Rosenbrock().initial_point.tolist() == [-1.2, 1.0]
    assert Rosenbrock(dim=5).initial_point.tolist() == [-1.2, 1.0, -1.2, 1.0, -1.2]
    assert Beale().initial_point.tolist() == [1.0, 1.0]
    assert Rastrigin(dim=3).initial_point.tolist() == [2.5, 2.5, 2.5]
    assert Quadratic(dim=4).initial_point.tolist() == [0.0] * 4


@pytest.mark.parametrize(
    ("point", "expected"),
    [
        ([-1.2, 1.0], 24.2),  # 100 (1 - 1.44)^2 + 2.2^2
        ([0.0, 0.0, 0.0, 0.0], 3.0),  # three terms (1 - 0)^2
        ([1.0, 2.0, 3.0], 201.0),  # [100 (2 - 1)^2 + 0] + [100 (3 - 4)^2 + (1 - 2)^2]
        ([2.0, 1.0, 1.0], 100 * 9 + 1 + 0),  # [100 (1 - 4)^2 + (1 - 2)^2] + [100 (1 - 1)^2 + 0]
    ],
)
def test_rosenbrock_by_hand(point, expected):
    problem = Rosenbrock(dim=len(point))
    assert problem(torch.tensor(point, dtype=torch.float64)).item() == pytest.approx(expected)


def test_beale_and_rastrigin_by_hand():
    # (1.5 - 1 + 1)^2 + (2.25 - 1 + 1)^2 + (2.625 - 1 + 1)^2
    assert Beale()(torch.tensor([1.0, 1.0], dtype=torch.float64)).item() == pytest.approx(14.203125)
    # 10 n + sum(x^2 - 10 cos(2 pi x)): at integers cos = 1, at 0.5 cos = -1
    assert Rastrigin(dim=2)(torch.tensor([1.0, 2.0], dtype=torch.float64)).item() == pytest.approx(5.0)
    assert Rastrigin(dim=1)(torch.tensor([0.5], dtype=torch.float64)).item() == pytest.approx(20.25)


@pytest.mark.parametrize(("dim", "kappa"), [(2, 100.0), (5, 1e3), (12, 1e6), (3, 1.0)])
def test_quadratic_hessian_has_the_requested_condition_number(dim, kappa):
    problem = Quadratic(dim=dim, kappa=kappa, seed=1)
    hessian = torch.autograd.functional.hessian(problem, problem.initial_point)
    assert hessian.shape == (dim, dim)
    torch.testing.assert_close(hessian, hessian.T)
    eigenvalues = torch.linalg.eigvalsh(hessian)
    assert eigenvalues.max().item() == pytest.approx(1.0)
    assert eigenvalues.min().item() == pytest.approx(1.0 / kappa, rel=1e-6)
    assert (eigenvalues.max() / eigenvalues.min()).item() == pytest.approx(kappa, rel=1e-6)
    # log-spaced spectrum
    ratios = eigenvalues[1:] / eigenvalues[:-1]
    torch.testing.assert_close(ratios, torch.full_like(ratios, kappa ** (1 / (dim - 1))))


def test_quadratic_is_rotated_and_reproducible():
    problem = Quadratic(dim=4, kappa=100.0, seed=7)
    off_diagonal = problem.hessian - torch.diag(torch.diagonal(problem.hessian))
    assert off_diagonal.abs().max().item() > 1e-2
    torch.testing.assert_close(Quadratic(dim=4, kappa=100.0, seed=7).hessian, problem.hessian)
    assert not torch.allclose(Quadratic(dim=4, kappa=100.0, seed=8).hessian, problem.hessian)
    # the start has an error of size 1 along every eigenvector: f(x0) = sum(eigenvalues) / 2
    assert problem(problem.initial_point).item() == pytest.approx(problem.eigenvalues.sum().item() / 2)


def test_float32_problems():
    for name in PROBLEMS:
        problem = make_problem(name, dtype=torch.float32)
        assert problem.initial_point.dtype == torch.float32
        assert problem(problem.initial_point).dtype == torch.float32


def test_registry_and_labels():
    assert set(PROBLEMS) == {"rosenbrock", "beale", "rastrigin", "quadratic"}
    assert make_problem("rosenbrock", dim=4).label == "rosenbrock-4d"
    assert make_problem("beale").label == "beale"
    assert make_problem("quadratic", dim=3, kappa=1000).label == "quadratic-3d-kappa1000"


@pytest.mark.parametrize(
    ("build", "parameter"),
    [
        (lambda: Rosenbrock(dim=1), "dim"),
        (lambda: Rosenbrock(dim=2.5), "dim"),
        (lambda: Rastrigin(dim=0), "dim"),
        (lambda: Quadratic(dim=1), "dim"),
        (lambda: Quadratic(kappa=0.5), "kappa"),
        (lambda: Quadratic(kappa=math.inf), "kappa"),
        (lambda: Quadratic(seed=-1), "seed"),
        (lambda: Beale(dtype=torch.int64), "dtype"),
        (lambda: make_problem("himmelblau"), "problem"),
    ],
)
def test_invalid_arguments_name_the_parameter(build, parameter):
    with pytest.raises(ValueError, match=rf"^{parameter} must"):
        build()


def test_wrong_shape_is_rejected():
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 2\)"):
        Beale()(torch.zeros(3, dtype=torch.float64))


@settings(max_examples=200, deadline=None)
@given(
    name=st.sampled_from(sorted(PROBLEMS)),
    coordinates=st.lists(st.floats(-6.0, 6.0, allow_nan=False), min_size=3, max_size=3),
)
def test_no_point_beats_the_minimum(name, coordinates):
    problem = make_problem(name) if name == "beale" else make_problem(name, dim=3)
    x = torch.tensor(coordinates[: problem.dim], dtype=torch.float64)
    assert problem(x).item() >= problem.minimum - 1e-12
