r"""The condition number of a loss at a point, :math:`\kappa = \lambda_{\max}(H)/\lambda_{\min}(H)`.

Estimated from the extreme Ritz values of a few Lanczos steps on the Hessian
(:mod:`.spectrum`). Lanczos approaches the extreme eigenvalues from inside the spectrum, so
with few steps :math:`\kappa` is underestimated; when :math:`\lambda_{\min} \le 0` the point
is not in a strongly convex region and :math:`\kappa` is reported as infinite.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gradwise.curvature.operator import hessian_operator
from gradwise.curvature.spectrum import extreme_eigenvalues
from gradwise.curvature.vectors import LossFn, module_loss


@dataclass(frozen=True)
class ConditionEstimate:
    """Extreme Hessian eigenvalue estimates and their ratio."""

    smallest: float
    largest: float

    @property
    def condition_number(self) -> float:
        """``largest / smallest``, or ``inf`` when the smallest is not positive."""
        return self.largest / self.smallest if self.smallest > 0 else math.inf


def condition_number(
    loss_fn: LossFn, params: Sequence[Tensor], *, steps: int = 30, generator: torch.Generator | None = None
) -> ConditionEstimate:
    """Estimate the Hessian's extreme eigenvalues and condition number of ``loss_fn`` at
    ``params`` with ``steps`` Lanczos steps (one Hessian-vector product each).

    Example::

        estimate = condition_number(loss_fn, params, steps=40)
        print(estimate.smallest, estimate.largest, estimate.condition_number)
    """
    dim = sum(p.numel() for p in params)
    smallest, largest = extreme_eigenvalues(
        hessian_operator(loss_fn, params),
        dim,
        steps=steps,
        generator=generator,
        dtype=params[0].dtype,
        device=params[0].device,
    )
    return ConditionEstimate(smallest, largest)


def model_condition_number(
    model: nn.Module,
    criterion: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    *,
    steps: int = 30,
    generator: torch.Generator | None = None,
) -> ConditionEstimate:
    """:func:`condition_number` of ``criterion(model(inputs), targets)`` at the model's
    current parameters."""
    loss_fn, params = module_loss(model, criterion, inputs, targets)
    return condition_number(loss_fn, params, steps=steps, generator=generator)
