r"""Line searches along a direction :math:`d` for :math:`\phi(t) = f(x + t d)`.

- :func:`strong_wolfe_search`: the Moré-Thuente search (Moré & Thuente 1994, ACM TOMS 20,
  "Line search algorithms with guaranteed sufficient decrease"), the one MINPACK-2 and
  L-BFGS-B use: safeguarded cubic/quadratic interpolation on an interval of uncertainty
  until the strong Wolfe conditions

  .. math::
      \phi(t) \le \phi(0) + c_1 t \phi'(0),\qquad |\phi'(t)| \le c_2 |\phi'(0)|

  hold. It evaluates :math:`\phi` only where the interpolation points, which makes it
  frugal with function evaluations.
- :func:`bracketing_wolfe_search`: the search of minFunc (Schmidt 2005) that torch.optim.LBFGS
  ports: extrapolate by cubic interpolation until an interval brackets a strong Wolfe point,
  then zoom into it (Nocedal & Wright 2006, Alg. 3.5-3.6). Its arithmetic follows torch's,
  so an L-BFGS driven by it takes torch's iterates.
- :func:`backtracking_search`: Armijo backtracking, :math:`t \leftarrow \rho t` until
  sufficient decrease.

``phi(t)`` returns ``(value, slope, payload)``; the payload (say, the gradient at the trial
point) is returned for the accepted step so the caller need not re-evaluate there.
:func:`bracketing_wolfe_search` also takes slopes (and steps) as 0-d tensors and then
computes with them as torch does, in their dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from torch import Tensor

Phi = Callable[[float], tuple[float, float, Any]]


@dataclass
class LineSearchResult:
    """The accepted step, its value, slope and payload, and the evaluations spent."""

    step: float
    value: float
    slope: float
    payload: Any
    evaluations: int
    converged: bool


def _cubic_minimiser(t0: float, f0: float, d0: float, t1: float, f1: float, d1: float, sign: float) -> float:
    """The minimiser of the cubic through (t0, f0, d0) and (t1, f1, d1), in a form that
    avoids overflow; ``sign`` selects the root (Moré & Thuente 1994, Sec. 4)."""
    theta = 3.0 * (f0 - f1) / (t1 - t0) + d0 + d1
    scale = max(abs(theta), abs(d0), abs(d1))
    gamma = scale * math.sqrt(max(0.0, (theta / scale) ** 2 - (d0 / scale) * (d1 / scale)))
    if sign * (t1 - t0) < 0:
        gamma = -gamma
    p = (gamma - d0) + theta
    q = ((gamma - d0) + gamma) + d1
    return t0 + (p / q) * (t1 - t0)


def _trial_step(
    stx: float, fx: float, dx: float, sty: float, fy: float, dy: float, stp: float, fp: float, dp: float,
    bracketed: bool, stmin: float, stmax: float,
) -> tuple[float, float, float, float, float, float, float, bool]:
    """One update of the interval of uncertainty [stx, sty] with the trial (stp, fp, dp), and
    the next trial step (the four cases of Moré & Thuente 1994, Sec. 4)."""
    same_sign = dp * math.copysign(1.0, dx) > 0
    if fp > fx:
        # Case 1: higher value; the minimum is bracketed. Cubic, or half way to the quadratic.
        cubic = _cubic_minimiser(stx, fx, dx, stp, fp, dp, 1.0)
        quadratic = stx + (dx / ((fx - fp) / (stp - stx) + dx)) / 2.0 * (stp - stx)
        new = cubic if abs(cubic - stx) < abs(quadratic - stx) else cubic + (quadratic - cubic) / 2.0
        bracketed = True
    elif not same_sign:
        # Case 2: lower value, slopes of opposite sign; bracketed. The step farther from stp.
        cubic = _cubic_minimiser(stp, fp, dp, stx, fx, dx, 1.0)
        secant = stp + (dp / (dp - dx)) * (stx - stp)
        new = cubic if abs(cubic - stp) > abs(secant - stp) else secant
        bracketed = True
    elif abs(dp) < abs(dx):
        # Case 3: lower value, same sign, slope decreasing in magnitude.
        theta = 3.0 * (fx - fp) / (stp - stx) + dx + dp
        scale = max(abs(theta), abs(dx), abs(dp))
        gamma = scale * math.sqrt(max(0.0, (theta / scale) ** 2 - (dx / scale) * (dp / scale)))
        if stp > stx:
            gamma = -gamma
        r = ((gamma - dp) + theta) / ((gamma + (dx - dp)) + gamma)
        if r < 0 and gamma != 0:
            cubic = stp + r * (stx - stp)
        else:
            cubic = stmax if stp > stx else stmin
        secant = stp + (dp / (dp - dx)) * (stx - stp)
        if bracketed:
            new = cubic if abs(cubic - stp) < abs(secant - stp) else secant
            bound = stp + 0.66 * (sty - stp)
            new = min(bound, new) if stp > stx else max(bound, new)
        else:
            new = cubic if abs(cubic - stp) > abs(secant - stp) else secant
            new = min(stmax, max(stmin, new))
    else:
        # Case 4: lower value, same sign, slope not decreasing: extrapolate, or cubic to sty.
        if bracketed:
            new = _cubic_minimiser(stp, fp, dp, sty, fy, dy, 1.0)
        else:
            new = stmax if stp > stx else stmin
    if fp > fx:
        sty, fy, dy = stp, fp, dp
    else:
        if not same_sign:
            sty, fy, dy = stx, fx, dx
        stx, fx, dx = stp, fp, dp
    return stx, fx, dx, sty, fy, dy, new, bracketed


def strong_wolfe_search(
    phi: Phi,
    value0: float,
    slope0: float,
    step: float,
    *,
    c1: float = 1e-3,
    c2: float = 0.9,
    xtol: float = 0.1,
    max_step: float = 1e10,
    max_evaluations: int = 20,
) -> LineSearchResult:
    """Moré-Thuente search for a step satisfying the strong Wolfe conditions.

    Defaults are L-BFGS-B's (``c1=1e-3``, ``c2=0.9``, ``xtol=0.1``, at most 20 evaluations).
    ``slope0 = phi'(0)`` must be negative. When no step satisfies the conditions within the
    budget (or the interval shrinks below ``xtol``), the best point seen is returned with
    ``converged=False``.
    """
    if not slope0 < 0:
        raise ValueError(f"the search direction must be a descent direction, got phi'(0) = {slope0}")
    extrapolate_low, extrapolate_high = 1.1, 4.0
    bracketed = False
    stage = 1
    test_slope = c1 * slope0
    width = max_step
    width_before = 2.0 * width
    stx, fx, dx = 0.0, value0, slope0
    sty, fy, dy = 0.0, value0, slope0
    stmin, stmax = 0.0, step + extrapolate_high * step
    best = None  # (step, value, slope, payload) of the lowest point tried
    evaluations = 0
    while True:
        value, slope, payload = phi(step)
        evaluations += 1
        if best is None or value < best[1]:
            best = (step, value, slope, payload)
        sufficient = value <= value0 + step * test_slope
        if sufficient and abs(slope) <= c2 * -slope0:
            return LineSearchResult(step, value, slope, payload, evaluations, True)
        stalled = bracketed and (step <= stmin or step >= stmax or stmax - stmin <= xtol * stmax)
        at_max = step == max_step and sufficient and slope <= test_slope
        if stalled or at_max or evaluations >= max_evaluations:
            break
        if stage == 1 and sufficient and slope >= 0:
            stage = 2
        if stage == 1 and value <= fx and not sufficient:
            # Work with the modified function psi(t) = phi(t) - phi(0) - c1 t phi'(0) until a
            # point with sufficient decrease and non-negative slope is found.
            stx, fxm, dxm, sty, fym, dym, step, bracketed = _trial_step(
                stx, fx - stx * test_slope, dx - test_slope, sty, fy - sty * test_slope, dy - test_slope,
                step, value - step * test_slope, slope - test_slope, bracketed, stmin, stmax,
            )
            fx, dx = fxm + stx * test_slope, dxm + test_slope
            fy, dy = fym + sty * test_slope, dym + test_slope
        else:
            stx, fx, dx, sty, fy, dy, step, bracketed = _trial_step(
                stx, fx, dx, sty, fy, dy, step, value, slope, bracketed, stmin, stmax
            )
        if bracketed:
            if abs(sty - stx) >= 0.66 * width_before:
                step = stx + 0.5 * (sty - stx)
            width_before, width = width, abs(sty - stx)
            stmin, stmax = min(stx, sty), max(stx, sty)
        else:
            stmin = step + extrapolate_low * (step - stx)
            stmax = step + extrapolate_high * (step - stx)
        step = min(max(step, 0.0), max_step)
        if bracketed and (step <= stmin or step >= stmax or stmax - stmin <= xtol * stmax):
            break
    return LineSearchResult(best[0], best[1], best[2], best[3], evaluations, False)


class _Point(NamedTuple):
    step: float
    value: float
    slope: float
    payload: Any


def _cubic_step(
    t1: float, f1: float, g1: float, t2: float, f2: float, g2: float, bounds: tuple[float, float] | None = None
) -> float:
    """The minimiser of the cubic through (t1, f1, g1) and (t2, f2, g2), clipped to ``bounds``
    (default: the interval between the points); the middle of the bounds when the cubic has
    no minimiser (or the points coincide). minFunc's ``polyinterp`` for two points, as torch
    computes it."""
    low, high = bounds if bounds is not None else ((t1, t2) if t1 <= t2 else (t2, t1))
    if t1 == t2:
        return (low + high) / 2.0
    d1 = g1 + g2 - 3 * (f1 - f2) / (t1 - t2)
    square = d1**2 - g1 * g2
    if not square >= 0:
        return (low + high) / 2.0
    d2 = square.sqrt() if isinstance(square, Tensor) else math.sqrt(square)
    if t1 <= t2:
        denominator = g2 - g1 + 2 * d2
        minimiser = t2 - (t2 - t1) * ((g2 + d2 - d1) / denominator) if denominator != 0 else math.nan
    else:
        denominator = g1 - g2 + 2 * d2
        minimiser = t1 - (t1 - t2) * ((g1 + d2 - d1) / denominator) if denominator != 0 else math.nan
    if math.isnan(minimiser):
        return (low + high) / 2.0
    return min(max(minimiser, low), high)


def bracketing_wolfe_search(  # noqa: C901 (one algorithm)
    phi: Phi,
    value0: float,
    slope0: float,
    step: float,
    payload0: Any,
    *,
    c1: float = 1e-4,
    c2: float = 0.9,
    tolerance: float = 1e-9,
    direction_scale: float = 1.0,
    max_evaluations: int = 25,
) -> LineSearchResult:
    """Strong Wolfe search by bracketing and zoom (minFunc's ``WolfeLineSearch``, as
    ``torch.optim.LBFGS`` runs it, with torch's defaults ``c1=1e-4``, ``c2=0.9``).

    Bracketing: from ``step``, extrapolate with the cubic through the last two points
    (clipped to ``[t + 0.01 (t - t_prev), 10 t]``) until a point fails sufficient decrease,
    stops decreasing, has a non-negative slope (an interval now brackets a Wolfe point) or
    satisfies the strong Wolfe conditions. Zoom: cubic interpolation inside the interval,
    moved to 10% of its width from an end when it lands too close to one twice running,
    until the conditions hold, the interval is shorter than ``tolerance`` (measured as
    ``width * direction_scale``, the largest change of a coordinate; torch: ``max|d|``) or
    ``max_evaluations`` evaluations are spent. ``payload0`` is the payload of the point
    ``t = 0`` (the search may return it when the budget runs out). Returns the lowest point
    of the final interval; ``converged`` says whether it satisfies the conditions.
    """
    evaluations = 0

    def evaluate(t: float) -> _Point:
        nonlocal evaluations
        evaluations += 1
        value, slope, payload = phi(t)
        return _Point(t, value, slope, payload)

    def sufficient_decrease(point: _Point) -> bool:
        return point.value <= value0 + c1 * point.step * slope0

    def curvature(point: _Point) -> bool:
        return abs(point.slope) <= -c2 * slope0

    origin = _Point(0.0, value0, slope0, payload0)
    previous, point = origin, evaluate(step)
    iteration, done = 0, False
    bracket: list[_Point] = []
    while iteration < max_evaluations:
        if not sufficient_decrease(point) or (iteration > 1 and point.value >= previous.value):
            bracket = [previous, point]
            break
        if curvature(point):
            bracket, done = [point], True
            break
        if point.slope >= 0:
            bracket = [previous, point]
            break
        bounds = (point.step + 0.01 * (point.step - previous.step), point.step * 10)
        trial = _cubic_step(*previous[:3], *point[:3], bounds=bounds)
        previous, point = point, evaluate(trial)
        iteration += 1
    if iteration == max_evaluations:
        bracket = [origin, point]

    low, high = (0, 1) if bracket[0].value <= bracket[-1].value else (1, 0)
    insufficient_progress = False
    while not done and iteration < max_evaluations:
        left, right = min(bracket[0].step, bracket[1].step), max(bracket[0].step, bracket[1].step)
        if abs(bracket[1].step - bracket[0].step) * direction_scale < tolerance:
            break
        trial = _cubic_step(*bracket[0][:3], *bracket[1][:3])
        margin = 0.1 * (right - left)
        if min(right - trial, trial - left) < margin:
            # Too close to an end: accept once, then move 10% of the width inside.
            if insufficient_progress or trial >= right or trial <= left:
                trial = right - margin if abs(trial - right) < abs(trial - left) else left + margin
                insufficient_progress = False
            else:
                insufficient_progress = True
        else:
            insufficient_progress = False
        point = evaluate(trial)
        iteration += 1
        if not sufficient_decrease(point) or point.value >= bracket[low].value:
            bracket[high] = point
            low, high = (0, 1) if bracket[0].value <= bracket[1].value else (1, 0)
        else:
            if curvature(point):
                done = True
            elif point.slope * (bracket[high].step - bracket[low].step) >= 0:
                bracket[high] = bracket[low]
            bracket[low] = point
    best = bracket[low]
    return LineSearchResult(best.step, best.value, best.slope, best.payload, evaluations, done)


def backtracking_search(
    phi: Phi,
    value0: float,
    slope0: float,
    step: float,
    *,
    c1: float = 1e-4,
    shrink: float = 0.5,
    max_evaluations: int = 30,
    value_tolerance: float = 0.0,
) -> LineSearchResult:
    """Armijo backtracking: the first ``step * shrink**k`` with
    ``phi(t) <= phi(0) + c1 t phi'(0) + value_tolerance``; ``converged=False`` (and the last
    trial) if none is found within ``max_evaluations``. A ``value_tolerance`` of a few units
    of rounding in ``phi(0)`` lets a full step through near a minimiser, where the decrease
    to be certified is below the resolution of the function values (as in Hager & Zhang's
    approximate Wolfe conditions, SIAM J. Optim. 16, 2005)."""
    if not slope0 < 0:
        raise ValueError(f"the search direction must be a descent direction, got phi'(0) = {slope0}")
    for evaluation in range(1, max_evaluations + 1):
        value, slope, payload = phi(step)
        if value <= value0 + c1 * step * slope0 + value_tolerance:
            return LineSearchResult(step, value, slope, payload, evaluation, True)
        if evaluation < max_evaluations:
            step *= shrink
    return LineSearchResult(step, value, slope, payload, max_evaluations, False)
