r"""The bias of a Newton step whose curvature is a noisy (subsampled) estimate.

On :math:`f(x) = \frac1n \sum_i f_i(x)` in one dimension, the Newton step is
:math:`-f'(x)/f''(x)`. Subsampled Newton methods replace :math:`f''` by the mean
:math:`h_b` of :math:`b` sampled curvatures :math:`f_i''(x)`: an unbiased estimate of
:math:`H = f''(x)`, but the step divides by it, and :math:`1/h` is convex, so by Jensen's
inequality the expected step is longer than the Newton step. Expanding
:math:`1/h = 1/H - (h-H)/H^2 + (h-H)^2/H^3 - \dots`,

.. math::
    \mathbb{E}\Big[-\frac{f'(x)}{h_b}\Big] \approx -\frac{f'(x)}{H}\Big(1 + \frac{\operatorname{Var}(h_b)}{H^2}\Big),
    \qquad \operatorname{Var}(h_b) = \frac{\sigma^2}{b}

(sampling with replacement, :math:`\sigma^2` the variance of the :math:`f_i''`): a relative
bias of :math:`\sigma^2/(b H^2)`, the squared coefficient of variation of the estimate
(Bottou, Curtis & Nocedal 2018, SIAM Review 60, Sec. 6.1.1 on the subsampled Hessian;
the same Jensen gap makes noisy curvature estimates overshoot). A noisy *gradient* with
exact curvature gives no bias: the step is linear in it. :func:`noisy_newton_bias` measures
the bias by Monte Carlo and returns it next to this prediction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from gradwise.validation import check_int, check_range


@dataclass(frozen=True)
class NoisyNewtonBias:
    """Measured and predicted relative bias of the expected subsampled Newton step."""

    batch_sizes: list[int]
    measured: list[float]
    """``E[step] / newton_step - 1`` by Monte Carlo, per batch size."""
    standard_error: list[float]
    """Standard error of each measured value."""
    predicted: list[float]
    """Second-order prediction ``Var(h_b) / H^2``."""


def gamma_curvatures(count: int, shape: float, mean: float, seed: int = 0) -> Tensor:
    """``count`` positive per-example curvatures ``f_i''`` (float64) drawn from a gamma
    distribution with the given ``shape`` (coefficient of variation ``1/sqrt(shape)``) and
    ``mean``, reproducibly from ``seed``."""
    check_int("count", count, 1)
    check_range("shape", shape, 0.0, low_open=True)
    check_range("mean", mean, 0.0, low_open=True)
    draws = np.random.default_rng(seed).gamma(shape, mean / shape, size=count)
    return torch.from_numpy(np.maximum(draws, np.finfo(np.float64).tiny))


def noisy_newton_bias(
    curvatures: Tensor,
    gradient: float,
    batch_sizes: list[int],
    trials: int = 100_000,
    generator: torch.Generator | None = None,
) -> NoisyNewtonBias:
    r"""Monte Carlo of the subsampled Newton step :math:`-g/h_b`, :math:`h_b` the mean of
    ``b`` curvatures drawn with replacement from ``curvatures`` (all positive), for each
    ``b`` in ``batch_sizes``, against the exact step :math:`-g/H` with :math:`H` the mean
    curvature.

    Example::

        bias = noisy_newton_bias(gamma_curvatures(1000, 2.0, 1.0), 1.0, [4, 8, 16, 32], generator=g)
        bias.measured, bias.predicted   # both about 1 / (2 b) for gamma shape 2
    """
    if curvatures.ndim != 1 or curvatures.numel() == 0 or bool((curvatures <= 0).any()):
        raise ValueError("curvatures must be a non-empty 1-D tensor of positive numbers")
    check_range("gradient", gradient)
    check_int("trials", trials, 2)
    for b in batch_sizes:
        check_int("batch size", b, 1)
    curvatures = curvatures.to(torch.float64)
    mean = float(curvatures.mean())
    variance = float(curvatures.var(unbiased=False))
    newton_step = -gradient / mean
    measured, errors, predicted = [], [], []
    for b in batch_sizes:
        picks = torch.randint(0, curvatures.numel(), (trials, b), generator=generator)
        steps = -gradient / curvatures[picks].mean(dim=1)
        ratio = steps / newton_step
        measured.append(float(ratio.mean()) - 1.0)
        errors.append(float(ratio.std()) / trials**0.5)
        predicted.append(variance / (b * mean**2))
    return NoisyNewtonBias(list(batch_sizes), measured, errors, predicted)
