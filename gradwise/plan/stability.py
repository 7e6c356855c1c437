r"""How stale an update may be, and how fast gradient descent and heavy ball converge.

Delayed gradient descent on :math:`f(x) = \frac a2 x^2` with a gradient :math:`\tau` steps old
(asynchronous workers, pipelined updates),

.. math:: x_{k+1} = x_k - \eta a\, x_{k-\tau},

is stable if and only if :math:`C = \eta a < 2\sin\!\big(\frac{\pi}{4\tau + 2}\big)`
(:math:`\tau = 0`: 2, :math:`\tau = 1`: 1, :math:`\tau = 2`: 0.618...); the roots of
:math:`z^{\tau+1} - z^\tau + C` leave the unit disc there. The critical step shrinks like
:math:`\pi/(2\tau)`: a run tuned at :math:`\eta a` close to 2 without delay diverges with any.
(Derived for the delay equation by Levin & May 1976, "A note on difference-delay equations",
Theoretical Population Biology 9(2); for asynchronous SGD see e.g. Mitliagkas et al. 2016,
"Asynchrony begets momentum", arXiv:1605.09774.) :func:`simulated_critical_step` finds the
boundary by running the recursion itself.

On a quadratic whose Hessian has eigenvalues in :math:`[\mu, L]`, :math:`\kappa = L/\mu`,
gradient descent with step :math:`2/(L+\mu)` contracts the error by
:math:`(\kappa-1)/(\kappa+1)` per step, and heavy-ball momentum
:math:`x_{k+1} = x_k - \alpha\nabla f(x_k) + \beta(x_k - x_{k-1})` with
:math:`\alpha = 4/(\sqrt L + \sqrt\mu)^2`, :math:`\beta = \big(\frac{\sqrt\kappa-1}{\sqrt\kappa+1}\big)^2`
by :math:`(\sqrt\kappa-1)/(\sqrt\kappa+1)` (Polyak 1964, "Some methods of speeding up the
convergence of iteration methods"; Nesterov 2004, "Introductory Lectures on Convex
Optimization", section 2.1). At those parameters heavy ball's iteration matrix has a double
eigenvalue at both ends of the spectrum, so its error decays like :math:`k\rho^k`.
:func:`measured_rate` runs gradwise's SGD on a quadratic of known spectrum to check them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from gradwise.optim import SGD
from gradwise.validation import check_int, check_range

if TYPE_CHECKING:
    from gradwise.problems.base import Problem


def critical_step(tau: int) -> float:
    """The largest stable ``eta * a`` of delayed gradient descent with delay ``tau``."""
    check_int("tau", tau, 0)
    return 2.0 * math.sin(math.pi / (4 * tau + 2))


def delayed_spectral_radius(step: float, tau: int) -> float:
    """Largest modulus of the roots of ``z^(tau+1) - z^tau + step``: the asymptotic growth
    factor per iteration of delayed gradient descent with ``eta * a = step``."""
    check_range("step", step, 0.0)
    check_int("tau", tau, 0)
    if tau == 0:
        return abs(1.0 - step)
    coefficients = np.zeros(tau + 2)
    coefficients[0], coefficients[1], coefficients[-1] = 1.0, -1.0, step
    return float(np.abs(np.roots(coefficients)).max())


def simulate_delayed_growth(steps_c: np.ndarray, taus: np.ndarray, iterations: int) -> np.ndarray:
    """Run ``x_{k+1} = x_k - c x_{k - tau}`` from ``x = 1`` (history included) for every pair
    ``(c, tau)`` at once, and return each run's log growth of ``max |x|`` over a window of
    ``4 tau + 2`` iterations (one oscillation period at the boundary) from the middle of the
    run to its end: negative for a stable run, positive for an unstable one."""
    steps_c = np.asarray(steps_c, dtype=float)
    taus = np.asarray(taus, dtype=int)
    check_int("iterations", iterations, 2)
    columns = np.arange(steps_c.size)
    history = int(taus.max()) + 1
    window = 4 * int(taus.max()) + 2
    ring = np.ones((history, steps_c.size))
    log_scale = np.zeros(steps_c.size)
    peaks = {"middle": np.full(steps_c.size, -np.inf), "end": np.full(steps_c.size, -np.inf)}
    middle = iterations // 2
    for k in range(iterations):
        current = ring[k % history]
        delayed = ring[(k - taus) % history, columns]
        ring[(k + 1) % history] = current - steps_c * delayed
        if k % 32 == 31:  # rescale so that unstable runs do not overflow
            size = np.abs(ring).max(axis=0)
            size[size == 0] = 1.0
            ring /= size
            log_scale += np.log(size)
        for name, start in (("middle", middle - window), ("end", iterations - window)):
            if start <= k < start + window:
                value = np.log(np.abs(ring[(k + 1) % history]) + 1e-300) + log_scale
                peaks[name] = np.maximum(peaks[name], value)
    return peaks["end"] - peaks["middle"]


def simulated_critical_step(
    taus: Sequence[int], iterations: int = 20_000, candidates: int = 48, rounds: int = 3
) -> list[float]:
    """The stable-to-unstable crossing of delayed gradient descent found by simulation, for
    each ``tau``: the bracket ``[0, 2.5]`` is cut into ``candidates`` points, each simulated,
    and narrowed to the last stable and first unstable point, ``rounds`` times."""
    taus = [check_int("tau", tau, 0) for tau in taus]
    check_int("candidates", candidates, 3)
    low = np.zeros(len(taus))
    high = np.full(len(taus), 2.5)
    for _ in range(rounds):
        grid = low[:, None] + (high - low)[:, None] * np.linspace(0.0, 1.0, candidates)[None, :]
        tau_grid = np.repeat(np.array(taus)[:, None], candidates, axis=1)
        growth = simulate_delayed_growth(grid.ravel(), tau_grid.ravel(), iterations).reshape(grid.shape)
        for row in range(len(taus)):
            unstable = np.nonzero(growth[row] > 0)[0]
            first = unstable[0] if unstable.size else candidates - 1
            low[row], high[row] = grid[row, max(first - 1, 0)], grid[row, first]
    return list((low + high) / 2)


def gradient_descent_rate(lipschitz: float, strong_convexity: float, step: float | None = None) -> float:
    """Contraction per step of gradient descent on a quadratic with spectrum in ``[mu, L]``:
    ``max(|1 - step mu|, |1 - step L|)``; by default at the optimal step ``2 / (L + mu)``,
    where it is ``(kappa - 1) / (kappa + 1)``."""
    L, mu = _spectrum(lipschitz, strong_convexity)
    step = 2.0 / (L + mu) if step is None else check_range("step", step, 0.0, low_open=True)
    return max(abs(1 - step * mu), abs(1 - step * L))


def heavy_ball_parameters(lipschitz: float, strong_convexity: float) -> tuple[float, float]:
    """Polyak's optimal (step, momentum): ``4 / (sqrt L + sqrt mu)^2`` and
    ``((sqrt L - sqrt mu) / (sqrt L + sqrt mu))^2``."""
    L, mu = _spectrum(lipschitz, strong_convexity)
    root_l, root_mu = math.sqrt(L), math.sqrt(mu)
    return 4.0 / (root_l + root_mu) ** 2, ((root_l - root_mu) / (root_l + root_mu)) ** 2


def heavy_ball_rate(eigenvalues: Sequence[float], step: float, momentum: float) -> float:
    """Spectral radius of heavy ball's iteration on a quadratic with these Hessian eigenvalues:
    the largest root modulus of ``z^2 - (1 + momentum - step lambda) z + momentum``."""
    check_range("step", step, 0.0, low_open=True)
    check_range("momentum", momentum, 0.0, 1.0, high_open=True)
    worst = 0.0
    for eigenvalue in eigenvalues:
        roots = np.roots([1.0, -(1.0 + momentum - step * eigenvalue), momentum])
        worst = max(worst, float(np.abs(roots).max()))
    return worst


def optimal_heavy_ball_rate(lipschitz: float, strong_convexity: float) -> float:
    """``(sqrt kappa - 1) / (sqrt kappa + 1)``."""
    L, mu = _spectrum(lipschitz, strong_convexity)
    root_kappa = math.sqrt(L / mu)
    return (root_kappa - 1) / (root_kappa + 1)


def _spectrum(lipschitz: float, strong_convexity: float) -> tuple[float, float]:
    check_range("strong_convexity", strong_convexity, 0.0, low_open=True)
    check_range("lipschitz", lipschitz, strong_convexity)
    return float(lipschitz), float(strong_convexity)


def measured_rate(
    problem: Problem, step: float, momentum: float = 0.0, first: int = 200, last: int = 600
) -> float:
    """Contraction per step measured by running ``gradwise.optim.SGD`` (heavy ball when
    ``momentum > 0``) on ``problem`` (a :class:`gradwise.problems.Quadratic`) from its
    initial point: ``(|x_last - x*| / |x_first - x*|)^(1 / (last - first))``."""
    check_int("first", first, 0)
    check_int("last", last, first + 1)
    x = problem.initial_point.clone().requires_grad_()
    optimizer = SGD([x], lr=step, momentum=momentum)
    distances = {}
    for k in range(last + 1):
        if k in (first, last):
            distances[k] = float((x.detach() - problem.minimiser).norm())
        optimizer.zero_grad()
        problem(x).backward()
        optimizer.step()
    return (distances[last] / distances[first]) ** (1.0 / (last - first))
