"""gradwise.curvature against exact Hessians, known spectra and the predicted error laws."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from gradwise.curvature import (
    condition_number,
    default_fd_eps,
    extreme_eigenvalues,
    flatten,
    gamma_curvatures,
    gnvp,
    hessian_operator,
    hutchinson_diagonal,
    hutchinson_trace,
    hvp,
    hvp_finite_difference,
    lanczos,
    matrix_operator,
    model_condition_number,
    module_loss,
    module_outputs,
    noisy_newton_bias,
    power_iteration,
    rademacher_like,
    top_eigenpair,
    unflatten,
)

METHODS = ("double_backward", "forward_over_reverse", "finite_difference")


def small_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Softplus(), nn.Linear(4, 3)).double()


def exact_hessian(loss_fn, params) -> torch.Tensor:
    """The dense Hessian by torch.autograd.functional.hessian on the flat parameter vector."""
    flat = flatten([p.detach() for p in params])
    return torch.autograd.functional.hessian(lambda x: loss_fn(unflatten(x, params)), flat, vectorize=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("method", METHODS)
def test_hvp_matches_autograd_hessian_on_random_nets(seed, method):
    net = small_net(seed)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(7, 3, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=generator)
    loss_fn, params = module_loss(net, nn.functional.cross_entropy, x, y)
    hessian = exact_hessian(loss_fn, params)
    vector = [torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in params]
    product = flatten(hvp(loss_fn, params, vector, method=method))
    expected = hessian @ flatten(vector)
    tolerance = 1e-6 if method == "finite_difference" else 1e-12
    assert torch.allclose(product, expected, atol=tolerance * float(expected.abs().max()), rtol=0)


def test_finite_difference_error_follows_the_predicted_law():
    """f(x) = sum(exp(a x)): H v = a^2 e^{ax} v, and the forward difference's error is
    (eps/2) a^3 e^{ax} v^2 + O(eps^2) while truncation dominates, growing like u/eps below
    the default step; the default eps lands near the best step of a grid."""
    a = torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64)
    x = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    v = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)

    def loss_fn(params):
        return torch.exp(a * params[0]).sum()

    exact = a**2 * torch.exp(a * x) * v
    truncation = 0.5 * a**3 * torch.exp(a * x) * v**2
    errors = {}
    for eps in [1e-2, 1e-3, 1e-4]:
        error = hvp_finite_difference(loss_fn, [x], [v], eps)[0] - exact
        assert torch.allclose(error / eps, truncation, rtol=0.05)
    grid = [10.0**k for k in range(-14, -1)]
    for eps in grid:
        errors[eps] = float((hvp_finite_difference(loss_fn, [x], [v], eps)[0] - exact).norm())
    # Rounding regime: error grows as eps shrinks (roughly like 1/eps).
    assert errors[1e-14] > 100 * errors[1e-10] > 0
    default = default_fd_eps([x], [v])
    assert default == pytest.approx(math.sqrt(torch.finfo(torch.float64).eps) * (1 + x.norm()) / v.norm())
    default_error = float((hvp_finite_difference(loss_fn, [x], [v])[0] - exact).norm())
    assert default_error <= 10 * min(errors.values())
    assert default_error / float(exact.norm()) < 1e-7


def test_finite_difference_default_eps_in_float32():
    x = torch.tensor([0.3, -0.2], dtype=torch.float32)
    v = torch.tensor([1.0, 1.0], dtype=torch.float32)
    expected = math.sqrt(torch.finfo(torch.float32).eps) * (1 + float(x.norm())) / math.sqrt(2)
    assert default_fd_eps([x], [v]) == pytest.approx(expected)
    product = hvp_finite_difference(lambda p: (p[0] ** 3).sum(), [x], [v])[0]
    assert torch.allclose(product, 6 * x * v, rtol=2e-3, atol=2e-3)


def test_gauss_newton_product_matches_explicit_jacobian_form():
    net = small_net(3)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=generator)
    outputs_fn, params = module_outputs(net, x)
    flat = flatten([p.detach() for p in params])
    jacobian = torch.autograd.functional.jacobian(lambda w: outputs_fn(unflatten(w, params)), flat)
    jacobian = jacobian.reshape(-1, flat.numel())
    z = outputs_fn(params).detach()
    loss_hessian = torch.autograd.functional.hessian(
        lambda out: nn.functional.cross_entropy(out.reshape(z.shape), y), z.reshape(-1)
    )
    vector = [torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in params]
    expected = jacobian.T @ loss_hessian @ jacobian @ flatten(vector)
    product = flatten(gnvp(outputs_fn, lambda out: nn.functional.cross_entropy(out, y), params, vector))
    assert torch.allclose(product, expected, atol=1e-12)


def test_gauss_newton_equals_hessian_for_linear_least_squares():
    generator = torch.Generator().manual_seed(4)
    a = torch.randn(10, 4, generator=generator, dtype=torch.float64)
    b = torch.randn(10, generator=generator, dtype=torch.float64)
    w = torch.randn(4, generator=generator, dtype=torch.float64)
    v = torch.randn(4, generator=generator, dtype=torch.float64)
    gn = gnvp(lambda ps: a @ ps[0], lambda z: 0.5 * ((z - b) ** 2).sum(), [w], [v])[0]
    assert torch.allclose(gn, a.T @ a @ v, atol=1e-12)


def test_hutchinson_diagonal_is_exact_for_a_diagonal_hessian_and_unbiased_otherwise():
    d = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64)
    w = torch.zeros(4, dtype=torch.float64)
    diag = hutchinson_diagonal(lambda ps: 0.5 * (d * ps[0] ** 2).sum(), [w], samples=1)
    assert torch.equal(diag[0], d)

    generator = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=generator, dtype=torch.float64)
    h = m @ m.T
    start = [torch.zeros(6, dtype=torch.float64)]
    estimate = hutchinson_diagonal(lambda ps: 0.5 * ps[0] @ h @ ps[0], start, 1000, generator)[0]
    # Standard error per coordinate: sqrt(sum_{j != i} H_ij^2 / samples).
    stderr = ((h**2).sum(1) - h.diagonal() ** 2).sqrt() / math.sqrt(1000)
    assert ((estimate - h.diagonal()).abs() < 5 * stderr).all()


def test_hutchinson_diagonal_from_gradients_with_graph_matches_closure_form():
    """The form Sophia uses: gradients taken with create_graph=True."""
    net = small_net(5)
    x = torch.randn(8, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    params = list(net.parameters())
    loss = nn.functional.cross_entropy(net(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    from_grads = hutchinson_diagonal(grads, params, samples=3, generator=torch.Generator().manual_seed(9))
    loss_fn, _ = module_loss(net, nn.functional.cross_entropy, x, y)
    from_closure = hutchinson_diagonal(loss_fn, params, samples=3, generator=torch.Generator().manual_seed(9))
    for a, b in zip(from_grads, from_closure):
        assert torch.allclose(a, b, atol=1e-14)
    with pytest.raises(ValueError, match="create_graph=True"):
        hutchinson_diagonal([g.detach() for g in grads], params)
    with pytest.raises(ValueError, match="samples"):
        hutchinson_diagonal(loss_fn, params, samples=0)


def test_hutchinson_trace_is_unbiased():
    generator = torch.Generator().manual_seed(1)
    m = torch.randn(8, 8, generator=generator, dtype=torch.float64)
    h = m @ m.T
    w = torch.zeros(8, dtype=torch.float64)
    samples = 1000
    estimate = float(hutchinson_trace(lambda ps: 0.5 * ps[0] @ h @ ps[0], [w], samples, generator))
    stderr = math.sqrt(2 * float((h**2).sum() - (h.diagonal() ** 2).sum()) / samples)
    assert abs(estimate - float(h.trace())) < 5 * stderr


def test_rademacher_probes_are_plus_minus_one():
    probes = rademacher_like([torch.zeros(1000, dtype=torch.float32)], torch.Generator().manual_seed(0))[0]
    assert set(probes.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(probes.mean())) < 0.1


def known_spectrum(eigenvalues, seed=0) -> torch.Tensor:
    eigenvalues = torch.as_tensor(eigenvalues, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=generator, dtype=torch.float64))
    return q @ torch.diag(eigenvalues) @ q.T


def test_power_iteration_recovers_the_dominant_eigenvalue():
    eigenvalues = torch.linspace(0.1, 5.0, 30).tolist() + [10.0]
    result = power_iteration(
        matrix_operator(known_spectrum(eigenvalues)),
        31,
        iterations=500,
        tol=1e-12,
        generator=torch.Generator().manual_seed(0),
    )
    assert result.converged
    assert result.eigenvalue == pytest.approx(10.0, rel=1e-9)
    negative = power_iteration(matrix_operator(known_spectrum([-7.0, 1.0, 2.0])), 3, iterations=500, tol=1e-12)
    assert negative.eigenvalue == pytest.approx(-7.0, rel=1e-9)


def test_lanczos_recovers_extreme_eigenvalues_of_a_quadratic():
    eigenvalues = np.concatenate([[0.01], np.linspace(1.0, 2.0, 198), [100.0]])
    matvec = matrix_operator(known_spectrum(eigenvalues, seed=2))
    smallest, largest = extreme_eigenvalues(matvec, 200, steps=40, generator=torch.Generator().manual_seed(0))
    assert smallest == pytest.approx(0.01, rel=1e-6)
    assert largest == pytest.approx(100.0, rel=1e-10)
    # With as many steps as the dimension, every eigenvalue is found.
    ritz = lanczos(matrix_operator(known_spectrum([1.0, 2.0, 3.0, 4.0, 5.0])), 5, steps=10)
    assert np.allclose(ritz, [1, 2, 3, 4, 5], atol=1e-10)


def test_top_eigenpair_bounds_its_error_and_converges_faster_from_a_warm_start():
    eigenvalues = np.concatenate([np.linspace(0.0, 1.0, 99), [4.0]])
    matrix = known_spectrum(eigenvalues, seed=4)
    matvec = matrix_operator(matrix)
    cold = top_eigenpair(matvec, 100, steps=3, generator=torch.Generator().manual_seed(0))
    # The residual bounds the distance to the nearest eigenvalue (4.0 here) and is not vacuous.
    assert abs(cold.eigenvalue - 4.0) <= cold.residual + 1e-12
    assert cold.products == 4
    exact = torch.linalg.eigh(matrix).eigenvectors[:, -1]
    assert float((cold.eigenvector @ exact).abs()) < 1.0 - 1e-9
    # Started from a slightly perturbed exact eigenvector, two products land far closer.
    start = exact + 1e-4 * torch.randn(100, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    warm = top_eigenpair(matvec, 100, steps=2, start=start)
    assert abs(warm.eigenvalue - 4.0) <= warm.residual
    assert abs(warm.eigenvalue - 4.0) < 1e-4 * abs(cold.eigenvalue - 4.0)
    assert warm.residual < 1e-2 * cold.residual
    # An invariant start (an eigenvector itself) stops after one product with zero residual.
    assert top_eigenpair(matvec, 100, steps=5, start=exact).residual < 1e-10
    with pytest.raises(ValueError, match="start must be a finite nonzero vector of 100 entries"):
        top_eigenpair(matvec, 100, start=torch.zeros(100, dtype=torch.float64))


def test_condition_number_of_a_quadratic_loss_and_of_a_model():
    h = known_spectrum(np.geomspace(0.5, 500.0, 20), seed=3)
    w = torch.randn(20, dtype=torch.float64)
    estimate = condition_number(lambda ps: 0.5 * ps[0] @ h @ ps[0], [w], steps=20)
    assert estimate.condition_number == pytest.approx(1000.0, rel=1e-8)

    model = nn.Linear(4, 1).double()
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.randn(50, 1, dtype=torch.float64)
    features = torch.cat([x, torch.ones(50, 1, dtype=torch.float64)], dim=1)
    expected = torch.linalg.eigvalsh(2 * features.T @ features / 50)  # Hessian of the mean squared error
    estimate = model_condition_number(model, lambda out, t: ((out - t) ** 2).mean(), x, y, steps=10)
    assert estimate.smallest == pytest.approx(float(expected[0]), rel=1e-8)
    assert estimate.condition_number == pytest.approx(float(expected[-1] / expected[0]), rel=1e-8)


def test_hessian_operator_matches_dense_hessian():
    net = small_net(6)
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    loss_fn, params = module_loss(net, nn.functional.cross_entropy, x, y)
    hessian = exact_hessian(loss_fn, params)
    vector = torch.randn(hessian.shape[0], dtype=torch.float64)
    assert torch.allclose(hessian_operator(loss_fn, params)(vector), hessian @ vector, atol=1e-12)


def test_noisy_newton_bias_matches_second_order_prediction():
    curvatures = gamma_curvatures(2000, shape=4.0, mean=2.0, seed=0)
    generator = torch.Generator().manual_seed(0)
    result = noisy_newton_bias(curvatures, 1.5, [8, 16, 32, 64], trials=40_000, generator=generator)
    for measured, error, predicted in zip(result.measured, result.standard_error, result.predicted):
        assert measured > 0  # Jensen: the expected step is longer than the Newton step
        # The neglected terms are O(cv^4 / b^2); at b >= 8 with cv^2 = 1/4 they are under 10%.
        assert abs(measured - predicted) < 0.12 * predicted + 4 * error
    # The bias falls like 1/b.
    assert result.measured[0] / result.measured[-1] == pytest.approx(8.0, rel=0.25)


def test_bad_inputs_raise_clear_errors():
    w = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="method must be one of"):
        hvp(lambda ps: (ps[0] ** 2).sum(), [w], [w], method="magic")
    with pytest.raises(ValueError, match="vector must have one tensor per parameter"):
        hvp(lambda ps: (ps[0] ** 2).sum(), [w], [torch.zeros(2)])
    with pytest.raises(ValueError, match="eps must be > 0"):
        hvp_finite_difference(lambda ps: (ps[0] ** 2).sum(), [w], [w], eps=0.0)
    with pytest.raises(ValueError, match="eps applies"):
        hvp(lambda ps: (ps[0] ** 2).sum(), [w], [w], eps=1e-3)
    with pytest.raises(ValueError, match="curvatures"):
        noisy_newton_bias(torch.tensor([1.0, -1.0]), 1.0, [2])


@pytest.mark.parametrize("build", [
    lambda loss_fn, w: hessian_operator(loss_fn, [w]),
    lambda loss_fn, w: hvp(loss_fn, [w], [w], method="double_backward"),
    lambda loss_fn, w: hutchinson_trace(loss_fn, [w]),
])
def test_a_loss_that_is_not_a_scalar_is_refused_by_every_gradient_graph(build):
    """Every product built on one gradient graph checks the loss first: a ValueError that says so, not autograd's
    "grad can be implicitly created only for scalar outputs"."""
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar, got shape \(3,\)"):
        build(lambda ps: ps[0] ** 2, torch.ones(3, dtype=torch.float64))
