"""Landscapes and sharpness (gradwise.curvature.landscape, .sharpness) against closed forms: quadratics with
known spectra per block, a plane and a line of known functions, filter norms, and the stated costs counted."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradwise.curvature import sharpness
from gradwise.curvature.landscape import (
    MAX_GRID,
    MAX_POINTS,
    Cost,
    alpha_grid,
    filter_normalized,
    interpolate,
    line_cost,
    plane,
    plane_coordinates,
    plane_cost,
    random_direction,
)
from gradwise.curvature.landscape_plots import plot_contour, plot_layers, plot_line, plot_surface
from gradwise.curvature.sharpness import (
    DENSE_LIMIT,
    LayerCurvature,
    block_hessian_operators,
    layer_curvature,
    layer_curvature_cost,
    sharpness_cost,
)

F64 = torch.float64


def symmetric(eigenvalues: list[float], seed: int) -> torch.Tensor:
    """``Q diag(eigenvalues) Q^T`` for a random orthogonal ``Q``: a matrix with exactly this spectrum."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=generator, dtype=F64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=F64)) @ q.T


def block_quadratic(blocks: list[torch.Tensor], shapes: list[tuple[int, ...]]):
    """``f(theta) = sum_i theta_i^T A_i theta_i / 2`` with ``theta_i`` shaped ``shapes[i]``: the Hessian is
    block-diagonal with blocks ``A_i``."""

    def loss_fn(params):
        return sum(0.5 * p.reshape(-1) @ a @ p.reshape(-1) for p, a in zip(params, blocks))

    params = [torch.ones(shape, dtype=F64) for shape in shapes]
    return loss_fn, params


def counted(loss_fn):
    """``loss_fn`` and a list whose length is the number of calls."""
    calls = []

    def wrapped(params):
        calls.append(1)
        return loss_fn(params)

    return wrapped, calls


# --- sharpness: the top eigenvalue and the trace --------------------------------------------------------------


def test_the_top_eigenvalue_lies_within_its_residual_of_the_truth_and_the_dense_values_are_exact():
    spectrum = [float(v) for v in np.geomspace(0.01, 1.0, 299)] + [50.0]  # the top well separated
    loss_fn, params = block_quadratic([symmetric(spectrum, 0)], [(300,)])
    found = sharpness.sharpness(
        loss_fn, params, steps=12, probes=10, dense=False, generator=torch.Generator().manual_seed(1)
    )
    assert found.top_eigenvalue_error > 0
    assert abs(found.top_eigenvalue - 50.0) <= found.top_eigenvalue_error
    assert found.exact is None and found.lanczos_steps == 12 and found.dimension == 300
    exact = sharpness.sharpness(loss_fn, params, steps=12, probes=10, dense=True).exact
    assert exact is not None
    assert exact.top_eigenvalue == pytest.approx(50.0, rel=1e-12)
    assert exact.bottom_eigenvalue == pytest.approx(0.01, rel=1e-9)
    assert exact.trace == pytest.approx(sum(spectrum), rel=1e-12)


def test_with_as_many_lanczos_steps_as_parameters_the_top_eigenvalue_is_exact():
    loss_fn, params = block_quadratic([symmetric([1.0, 2.0, 3.0, 7.5], 3)], [(2, 2)])
    found = sharpness.sharpness(loss_fn, params, steps=20, probes=2, generator=torch.Generator().manual_seed(0))
    assert found.top_eigenvalue == pytest.approx(7.5, abs=1e-12) and found.top_eigenvalue_error < 1e-12


def test_hutchinson_is_exact_with_zero_error_on_a_diagonal_hessian():
    diagonal = torch.diag(torch.tensor([1.0, -2.0, 3.0, 40.0], dtype=F64))
    loss_fn, params = block_quadratic([diagonal], [(4,)])
    found = sharpness.sharpness(loss_fn, params, steps=4, probes=5, generator=torch.Generator().manual_seed(0))
    assert found.trace == pytest.approx(42.0, abs=1e-12) and found.trace_standard_error == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_trace_lies_within_a_few_standard_errors_and_the_error_follows_hutchinsons_variance(seed):
    a = symmetric([float(v) for v in np.linspace(-3.0, 10.0, 60)], seed)
    loss_fn, params = block_quadratic([a], [(60,)])
    probes = 400
    found = sharpness.sharpness(
        loss_fn, params, steps=5, probes=probes, dense=False, generator=torch.Generator().manual_seed(seed)
    )
    truth = float(torch.trace(a))
    assert abs(found.trace - truth) <= 4 * found.trace_standard_error
    # Rademacher probes: Var(u^T A u) = 2 sum_{i != j} A_ij^2 (Hutchinson 1990)
    off_diagonal = a - torch.diag(torch.diag(a))
    predicted = math.sqrt(2 * float((off_diagonal**2).sum()) / probes)
    assert found.trace_standard_error == pytest.approx(predicted, rel=0.15)


def test_dense_is_refused_above_the_limit_and_automatic_below():
    side = math.isqrt(DENSE_LIMIT) + 1
    with pytest.raises(ValueError, match=r"dense must be False for 4,097 parameters.*DENSE_LIMIT=16,777,216"):
        sharpness_cost(side, dense=True)
    assert sharpness_cost(side).hessian_vector == 20 + 1 + 20  # no dense Hessian: only the estimates
    assert sharpness_cost(10, steps=30, probes=4).hessian_vector == 10 + 1 + 4 + 10  # Lanczos capped, dense
    with pytest.raises(ValueError, match="dense must be False"):
        sharpness.dense_hessian(lambda v: v, side)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(steps=0), "steps must be an integer >= 1, got 0"),
        (dict(probes=1), "probes must be an integer >= 2, got 1"),
    ],
)
def test_bad_sharpness_arguments_name_themselves(arguments, message):
    loss_fn, params = block_quadratic([torch.eye(3, dtype=F64)], [(3,)])
    with pytest.raises(ValueError, match=message):
        sharpness.sharpness(loss_fn, params, **arguments)


def test_the_stated_cost_is_the_count_of_products(monkeypatch):
    loss_fn, params = block_quadratic([symmetric(list(range(1, 41)), 5)], [(40,)])
    products = []
    real = sharpness.hessian_operator

    def counting(loss_fn, params):
        matvec = real(loss_fn, params)
        return lambda vector: products.append(1) or matvec(vector)

    monkeypatch.setattr(sharpness, "hessian_operator", counting)
    counting_loss, forwards = counted(loss_fn)
    sharpness.sharpness(counting_loss, params, steps=7, probes=6, dense=False)
    assert (
        Cost(forward_backward=len(forwards), hessian_vector=len(products))
        == sharpness_cost(40, steps=7, probes=6, dense=False)
        == Cost(0, 1, 7 + 1 + 6)
    )


# --- per-layer curvature -----------------------------------------------------------------------------------


SPECTRA = {
    "embedding": [0.001, 0.5, 2.0, 10.0, 3.0, 1.0],
    "attention": [1.0, 4.0, 100.0, 7.0],
    "indefinite": [-2.0, 1.0, 5.0],
    "singular": [0.0, 0.0, 3.0, 6.0],
}


def layered_quadratic():
    names = list(SPECTRA)
    shapes = [(3, 2), (2, 2), (3,), (4, 1)]
    return names, *block_quadratic([symmetric(SPECTRA[name], index) for index, name in enumerate(names)], shapes)


def test_each_block_gets_its_own_extreme_eigenvalues_and_condition_number_exactly():
    names, loss_fn, params = layered_quadratic()
    rows = layer_curvature(loss_fn, params, names, steps=10, generator=torch.Generator().manual_seed(0))
    assert [row.name for row in rows] == names and [row.size for row in rows] == [6, 4, 3, 4]
    for row in rows:
        spectrum = SPECTRA[row.name]
        assert row.lambda_max == pytest.approx(max(spectrum), abs=1e-10)
        assert row.lambda_min == pytest.approx(min(spectrum), abs=1e-10)
        assert row.lambda_max_error < 1e-10 and row.lambda_min_error < 1e-10
    conditions = {row.name: row.condition for row in rows}
    assert conditions["embedding"] == pytest.approx(1e4, rel=1e-8)
    assert conditions["attention"] == pytest.approx(1e2, rel=1e-12)
    assert math.isinf(conditions["indefinite"])  # a negative Ritz value proves a negative eigenvalue
    assert conditions["singular"] > 1e12  # zero to rounding: infinite, or beyond 1 / unit roundoff
    assert rows[2].to_dict()["condition"] is None and rows[2].to_dict()["lambda_min"] == pytest.approx(-2.0)


def test_a_block_is_the_diagonal_block_not_the_whole_hessian():
    """With coupling between two tensors, each block's spectrum is that of ``H_ii``, not of ``H``."""
    hessian = symmetric([1.0, 2.0, 3.0, 4.0, 5.0, 60.0], 7)

    def loss_fn(params):
        flat = torch.cat([p.reshape(-1) for p in params])
        return 0.5 * flat @ hessian @ flat

    params = [torch.ones(2, 2, dtype=F64), torch.ones(2, dtype=F64)]
    rows = layer_curvature(loss_fn, params, ["a", "b"], steps=8)
    for row, block in zip(rows, (hessian[:4, :4], hessian[4:, 4:])):
        eigenvalues = torch.linalg.eigvalsh(block)
        assert row.lambda_max == pytest.approx(float(eigenvalues[-1]), abs=1e-10)
        assert row.lambda_min == pytest.approx(float(eigenvalues[0]), abs=1e-10)
    operators = block_hessian_operators(loss_fn, params)
    vector = torch.arange(4, dtype=F64)
    assert torch.allclose(operators[0](vector), hessian[:4, :4] @ vector, atol=1e-12)


def test_a_tensor_the_loss_ignores_has_a_zero_block():
    def loss_fn(params):
        return (params[0] ** 2).sum()

    rows = layer_curvature(loss_fn, [torch.ones(3, dtype=F64), torch.ones(2, dtype=F64)], ["used", "unused"])
    assert rows[0].lambda_max == pytest.approx(2.0) and rows[1].lambda_max == 0.0 and rows[1].lambda_min == 0.0
    assert math.isinf(rows[1].condition)


def test_with_few_steps_the_bounds_hold_and_the_condition_is_not_overstated():
    spectrum = [float(v) for v in np.geomspace(1.0, 1000.0, 200)]
    loss_fn, params = block_quadratic([symmetric(spectrum, 11)], [(200,)])
    (row,) = layer_curvature(loss_fn, params, ["w"], steps=15, generator=torch.Generator().manual_seed(0))
    assert min(abs(row.lambda_max - v) for v in spectrum) <= row.lambda_max_error
    assert min(abs(row.lambda_min - v) for v in spectrum) <= row.lambda_min_error
    assert 1.0 <= row.lambda_min and row.lambda_max <= 1000.0 + 1e-9  # Ritz values lie inside the spectrum
    assert row.condition <= 1000.0 + 1e-6


def test_layer_cost_is_the_count_of_block_products(monkeypatch):
    names, loss_fn, params = layered_quadratic()
    products = []
    real = sharpness.block_hessian_operators

    def counting(loss_fn, params):
        return [lambda vector, matvec=matvec: products.append(1) or matvec(vector) for matvec in real(loss_fn, params)]

    monkeypatch.setattr(sharpness, "block_hessian_operators", counting)
    counting_loss, forwards = counted(loss_fn)
    layer_curvature(counting_loss, params[:3], names[:3], steps=5)
    # per tensor: two runs of min(5, size) products and a residual check each
    assert (
        Cost(forward_backward=len(forwards), hessian_vector=len(products))
        == layer_curvature_cost([6, 4, 3], steps=5)
        == Cost(0, 1, 2 * (6 + 5 + 4))
    )
    products.clear()
    singular, params = block_quadratic([symmetric(SPECTRA["singular"], 0)], [(4,)])
    layer_curvature(singular, params, ["singular"], steps=5)  # rank 2: Lanczos stops on an invariant subspace
    assert len(products) < layer_curvature_cost([4], steps=5).hessian_vector == 2 * 5


def test_names_must_match_the_parameters():
    names, loss_fn, params = layered_quadratic()
    with pytest.raises(ValueError, match="names must name each of the 4 parameters, got 3 names"):
        layer_curvature(loss_fn, params, names[:3])


# --- the line and the plane -------------------------------------------------------------------------------


def test_the_line_through_a_quadratic_matches_its_closed_form():
    a = symmetric([0.5, 2.0, 9.0], 1)
    b = torch.tensor([1.0, -2.0, 0.5], dtype=F64)

    def loss_fn(params):
        return 0.5 * params[0] @ a @ params[0] + b @ params[0]

    start, end = [torch.tensor([1.0, 2.0, 3.0], dtype=F64)], [torch.tensor([-1.0, 0.0, 4.0], dtype=F64)]
    alphas = alpha_grid(-0.5, 1.5, 9)
    line = interpolate({"f": loss_fn, "twice": lambda p: 2 * loss_fn(p)}, start, end, alphas)
    delta = end[0] - start[0]
    gradient = a @ start[0] + b
    closed = [float(loss_fn(start) + alpha * gradient @ delta + 0.5 * alpha**2 * delta @ a @ delta) for alpha in alphas]
    np.testing.assert_allclose(line.losses["f"], closed, rtol=1e-12)
    np.testing.assert_allclose(line.losses["twice"], 2 * np.array(closed), rtol=1e-12)
    assert line.alphas.tolist() == [-0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]


def known(params):
    """A function that tells the two axes apart: ``x^2 + 3 y + x y`` of the first two entries."""
    x, y = params[0][0], params[0][1]
    return x**2 + 3 * y + x * y


@settings(max_examples=25, deadline=None)
@given(cx=st.floats(-2, 2), cy=st.floats(-2, 2), grid=st.integers(2, 7), span=st.floats(0.01, 5.0))
def test_the_plane_of_a_known_function_is_exact_and_indexed_first_direction_first(cx, cy, grid, span):
    center = [torch.tensor([cx, cy, 7.0], dtype=F64)]
    first, second = [torch.tensor([1.0, 0.0, 5.0], dtype=F64)], [torch.tensor([0.0, 2.0, -1.0], dtype=F64)]
    coordinates = plane_coordinates(span, grid)
    surface = plane({"f": known}, center, (first, second), coordinates)
    expected = np.array(
        [[(cx + a) ** 2 + 3 * (cy + 2 * b) + (cx + a) * (cy + 2 * b) for b in coordinates] for a in coordinates]
    )
    np.testing.assert_allclose(surface.losses["f"], expected, rtol=1e-12, atol=1e-12)
    assert surface.coordinates[0] == -span and surface.coordinates[-1] == span


def test_the_line_and_the_plane_cost_one_forward_pass_per_loss_and_point():
    loss_fn, calls = counted(lambda params: params[0].sum())
    point = [torch.zeros(2, dtype=F64)]
    interpolate({"a": loss_fn, "b": loss_fn}, point, point, alpha_grid(0, 1, 7))
    assert Cost(forward=len(calls)) == line_cost(7, 2) == Cost(forward=14)
    calls.clear()
    plane({"a": loss_fn}, point, (point, point), plane_coordinates(1.0, 6))
    assert Cost(forward=len(calls)) == plane_cost(6) == Cost(forward=36)
    assert plane_cost(3, 2).describe() == "18 forward passes"
    assert (
        Cost(forward_backward=1) + Cost(hessian_vector=1)
    ).describe() == "1 forward+backward pass, 1 Hessian-vector product"


def test_non_finite_losses_are_null_in_json():
    line = interpolate(
        {"f": lambda p: torch.log(p[0])}, [torch.tensor(-1.0)], [torch.tensor(1.0)], alpha_grid(0.0, 1.0, 3)
    )
    assert line.to_dict() == {"alphas": [0.0, 0.5, 1.0], "f": [None, None, 0.0]}


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: alpha_grid(1.0, 0.0, 5), "high must be > 1, got 0.0"),
        (lambda: alpha_grid(0.0, float("inf"), 5), "high must be > 0, got inf"),
        (lambda: alpha_grid(0.0, 1.0, 1), "points must be an integer in \\[2, 1001\\], got 1"),
        (lambda: alpha_grid(0.0, 1.0, MAX_POINTS + 1), "points must be an integer in \\[2, 1001\\]"),
        (lambda: plane_coordinates(1.0, 1), "grid must be an integer in \\[2, 201\\], got 1"),
        (lambda: plane_coordinates(1.0, MAX_GRID + 1), "grid must be an integer in \\[2, 201\\], got 202"),
        (lambda: plane_coordinates(-1.0, 5), "span must be > 0, got -1.0"),
        (lambda: plane_coordinates(0.0, 5), "span must be > 0, got 0.0"),
        (lambda: filter_normalized([torch.ones(2)], [torch.ones(2)], one_dim="keep"), "one_dim must be one of"),
        (lambda: filter_normalized([torch.ones(3)], [torch.ones(2)]), "direction must have one tensor per parameter"),
        (lambda: interpolate({}, [torch.ones(1)], [torch.ones(1)], [0.0]), "losses must name at least one"),
    ],
)
def test_bad_grids_and_directions_are_refused_naming_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --- filter-wise normalisation (Li et al. 2018) ---------------------------------------------------------------


shapes = st.lists(st.lists(st.integers(1, 5), min_size=0, max_size=4).map(tuple), min_size=1, max_size=4)


@settings(max_examples=40, deadline=None)
@given(shapes=shapes, seed=st.integers(0, 1000), one_dim=st.sampled_from(["zero", "filter"]))
def test_each_direction_filter_has_the_norm_of_its_parameter_filter(shapes, seed, one_dim):
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(shape, generator=generator, dtype=F64) for shape in shapes]
    direction = random_direction(params, generator, one_dim=one_dim)
    for d, p in zip(direction, params):
        assert d.shape == p.shape
        if p.ndim <= 1:
            expected = 0.0 if one_dim == "zero" else float(p.norm())
            assert float(d.norm()) == pytest.approx(expected, rel=1e-12, abs=1e-12)
            continue
        d_norms = torch.linalg.vector_norm(d.reshape(p.shape[0], -1), dim=1)
        p_norms = torch.linalg.vector_norm(p.reshape(p.shape[0], -1), dim=1)
        torch.testing.assert_close(d_norms, p_norms, rtol=1e-12, atol=1e-12)


def test_normalisation_keeps_each_filters_direction_and_zero_filters_stay_zero():
    param = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]], dtype=F64)
    direction = torch.tensor([[1.0, 0.0], [2.0, 2.0], [0.0, 0.0]], dtype=F64)
    (normalized,) = filter_normalized([direction], [param])
    assert normalized.tolist() == [[5.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    convolution = torch.randn(4, 3, 2, 2, dtype=F64)
    (out,) = filter_normalized([torch.ones_like(convolution)], [convolution])
    torch.testing.assert_close(out[1], torch.full((3, 2, 2), float(convolution[1].norm()) / 12**0.5, dtype=F64))


def test_the_same_seed_gives_the_same_directions():
    params = [torch.randn(3, 4), torch.randn(4)]
    first = random_direction(params, torch.Generator().manual_seed(5))
    again = random_direction(params, torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(first, again))


# --- pictures -----------------------------------------------------------------------------------------------


def test_the_plots_are_written_as_pngs_also_with_infinite_conditions(tmp_path):
    line = interpolate({"train": lambda p: p[0].sum() ** 2}, [torch.zeros(2)], [torch.ones(2)], alpha_grid(0, 1, 3))
    surface = plane(
        {"train": known},
        [torch.zeros(2)],
        ([torch.tensor([1.0, 0.0])], [torch.tensor([0.0, 1.0])]),
        plane_coordinates(1.0, 4),
    )
    rows = [
        LayerCurvature("w", 6, 10.0, 0.1, 0.1, 0.01),
        LayerCurvature("b", 3, 2.0, 0.0, -1.0, 0.0),
        LayerCurvature("dead", 2, 0.0, 0.0, 0.0, 0.0),
    ]
    plot_line(line, tmp_path / "line.png", "line")
    plot_contour(surface, "train", tmp_path / "contour.png", "contour")
    plot_surface(surface, "train", tmp_path / "surface.png", "surface")
    plot_layers(rows, tmp_path / "layers.png", "layers")
    plot_layers(rows[1:], tmp_path / "all_infinite.png", "layers")
    for name in ("line", "contour", "surface", "layers", "all_infinite"):
        assert (tmp_path / f"{name}.png").read_bytes().startswith(b"\x89PNG")
