"""Stale gradients and convergence rates, checked by simulation and by running SGD."""

from __future__ import annotations

import math

import pytest

from gradwise.plan import stability
from gradwise.problems import Quadratic


def test_critical_step_values():
    assert stability.critical_step(0) == pytest.approx(2.0)
    assert stability.critical_step(1) == pytest.approx(1.0)
    assert stability.critical_step(2) == pytest.approx((math.sqrt(5) - 1) / 2)
    with pytest.raises(ValueError, match="tau must be an integer >= 0"):
        stability.critical_step(-1)


@pytest.mark.parametrize("tau", range(11))
def test_characteristic_roots_reach_the_unit_circle_at_the_critical_step(tau):
    critical = stability.critical_step(tau)
    assert stability.delayed_spectral_radius(critical, tau) == pytest.approx(1.0, abs=1e-9)
    assert stability.delayed_spectral_radius(0.99 * critical, tau) < 1
    assert stability.delayed_spectral_radius(1.01 * critical, tau) > 1


def test_simulation_crosses_from_stable_to_unstable_within_1_percent_of_the_formula():
    taus = list(range(11))
    simulated = stability.simulated_critical_step(taus)
    for tau, found in zip(taus, simulated):
        assert found == pytest.approx(stability.critical_step(tau), rel=0.01), tau


def test_simulated_growth_sign():
    growth = stability.simulate_delayed_growth([0.3, 0.4], [4, 4], 4000)
    assert growth[0] < 0 < growth[1]  # the boundary for tau = 4 is 0.347


def test_gradient_descent_rate_measured_on_a_quadratic_of_known_spectrum():
    problem = Quadratic(dim=20, kappa=100.0, seed=1)  # eigenvalues from 1/100 to 1
    optimal = stability.gradient_descent_rate(1.0, 0.01)
    assert optimal == pytest.approx(99 / 101)
    assert stability.measured_rate(problem, 2 / 1.01, first=100, last=400) == pytest.approx(optimal, rel=1e-3)
    # at step 1/L the flattest direction contracts by 1 - 1/kappa
    assert stability.gradient_descent_rate(1.0, 0.01, step=1.0) == pytest.approx(0.99)
    assert stability.measured_rate(problem, 1.0, first=100, last=400) == pytest.approx(0.99, rel=1e-3)


def test_heavy_ball_rate_measured_on_a_quadratic_of_known_spectrum():
    kappa = 1e4
    problem = Quadratic(dim=20, kappa=kappa, seed=2)
    step, momentum = stability.heavy_ball_parameters(1.0, 1 / kappa)
    formula = stability.optimal_heavy_ball_rate(1.0, 1 / kappa)
    assert formula == pytest.approx(99 / 101)
    assert stability.heavy_ball_rate([1 / kappa, 0.1, 1.0], step, momentum) == pytest.approx(formula, rel=1e-6)
    assert math.sqrt(momentum) == pytest.approx(formula)
    # At the optimal parameters the iteration matrix has a double eigenvalue rho at both ends
    # of the spectrum (a Jordan block), so the error decays like k rho^k and the rate measured
    # over steps [first, last] is rho (last / first)^(1 / (last - first)). Compare logarithms
    # (the decay per step), not rates, which any slow run gets close to.
    first, last = 200, 600
    measured = stability.measured_rate(problem, step, momentum, first=first, last=last)
    expected = math.log(formula) + math.log(last / first) / (last - first)
    assert math.log(measured) == pytest.approx(expected, rel=0.01)
    assert math.log(measured) != pytest.approx(math.log(formula), rel=0.01)  # the k factor is visible


def test_heavy_ball_rate_at_other_parameters_follows_the_spectral_radius():
    problem = Quadratic(dim=20, kappa=100.0, seed=3)
    predicted = stability.heavy_ball_rate(problem.eigenvalues.tolist(), 1.0, 0.5)
    assert predicted == pytest.approx((1.49 + math.sqrt(1.49**2 - 2)) / 2)  # the flattest direction
    measured = stability.measured_rate(problem, 1.0, 0.5, first=200, last=600)
    assert math.log(measured) == pytest.approx(math.log(predicted), rel=0.02)
