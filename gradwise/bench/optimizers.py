"""The optimizers a race can run: name -> how to build one, and where to search its lr.

Every entry is read from an optimizer class's description
(:mod:`gradwise.optim.description`): the presets it offers to the race, the hyperparameters
they set (otherwise the optimizer's documented defaults; momentum 0.9 for the two momentum
variants of SGD) and the class's ``lr_range``.

The learning-rate ranges are where a sweep looks. Every range spans the same four
decades, so a sweep with the same number of points has the same resolution for every
optimizer (9 points, the default: a factor sqrt(10) apart). Each is placed where that
optimizer's step size lives: plain and momentum SGD step by ``lr * gradient``, so their
best rate is about ``1 / L`` (``L`` the steepest curvature), from about 1e-3 on
Rosenbrock's valley to 1 on the unit-scale quadratic; Adam-type and Adagrad steps are at
most about ``lr`` per coordinate whatever the gradient's scale (Adagrad's shrink like
``lr / sqrt(t)``, so it wants larger rates); RMSprop without bias correction starts with
steps of ``lr / sqrt(1 - alpha) = 10 lr``; Lion's sign steps are exactly ``lr`` in every
coordinate and never shrink, so its range sits lower than Adam's (Chen et al. 2023,
arXiv:2302.06675, recommend 3-10x smaller rates for training; on the deterministic test
problems the best Lion rates are about 100x smaller than Adam's). On the default race's
problems every optimizer's best rate lies inside its range; a race notes a chosen rate that lands
on the edge of its range.

K-FAC (:class:`gradwise.optim.KFAC`, driven by a model) offers no race preset: its
preconditioner is built from the inputs and output gradients of a model's
``nn.Linear``/``nn.Conv2d`` layers, and the race's test functions have none (on them it would
be plain SGD). Sophia's entry hands it a
one-probe Hutchinson estimate of the Hessian diagonal every 10 steps (``before_backward``,
given to every optimizer whose description's drive is ``"hessian_refresh"``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from gradwise.curvature.hutchinson import hutchinson_diagonal
from gradwise.optim.description import HessianRefreshed, Preset, description_of, presets
from gradwise.validation import check_choice, check_int


@dataclass(frozen=True)
class OptimizerSpec:
    """How a race builds one optimizer.

    Attributes:
        name: registry name.
        optimizer: the optimizer class.
        lr_range: ``(low, high)`` of the learning-rate sweep, inclusive.
        description: one line for ``--help`` and reports.
        options: hyperparameters other than ``lr`` that differ from the class defaults.
        before_backward: for optimizers that need more than the gradient: called as
            ``before_backward(optimizer, loss, params)`` after each loss evaluation and
            before its backward pass (the loss still has its graph), e.g. to hand Sophia a
            Hessian estimate.
    """

    name: str
    optimizer: type[Optimizer]
    lr_range: tuple[float, float]
    description: str
    options: dict[str, Any] = field(default_factory=dict)
    before_backward: Callable[[Optimizer, Tensor, list[Tensor]], None] | None = None

    def build(self, params: ParamsT, lr: float) -> Optimizer:
        """The optimizer over ``params`` (tensors, or param-group dicts whose ``lr`` wins)."""
        make: Callable[..., Optimizer] = self.optimizer  # a subclass takes its hyperparameters as keywords
        return make(params, lr=lr, **self.options)

    def lr_grid(self, points: int) -> list[float]:
        """``points`` learning rates evenly spaced in log scale over ``lr_range``.

        One point is the geometric middle of the range.
        """
        check_int("points", points, 1)
        low, high = (math.log10(bound) for bound in self.lr_range)
        if points == 1:
            return [10 ** ((low + high) / 2)]
        return [float(lr) for lr in np.logspace(low, high, points)]


# Probes for Sophia-H's estimates: one stream, so a race is reproducible.
_HUTCHINSON_PROBES = torch.Generator().manual_seed(0)


def _hutchinson_refresh(optimizer: Optimizer, loss: Tensor, params: list[Tensor]) -> None:
    """Hand an optimizer driven by ``"hessian_refresh"`` (Sophia) a one-probe Hutchinson
    estimate of the Hessian diagonal when it is due."""
    refreshed = cast(HessianRefreshed, optimizer)
    if refreshed.hessian_update_due:
        grads = torch.autograd.grad(loss, params, create_graph=True)
        refreshed.update_hessian(hutchinson_diagonal(grads, params, generator=_HUTCHINSON_PROBES), params)


def _spec(name: str, optimizer_class: type[Optimizer], preset: Preset) -> OptimizerSpec:
    """The race entry of a preset, read from its class's description."""
    description = description_of(optimizer_class)
    if description.drive not in ("step", "hessian_refresh"):  # the race evaluates each loss once per step
        raise ValueError(
            f"race preset {name!r}: the race cannot drive {optimizer_class.__name__} ({description.drive})"
        )
    if description.lr_range is None:  # a Description with race presets has one; this says so to the type checker
        raise ValueError(f"race preset {name!r}: {optimizer_class.__name__} has no lr_range")
    before_backward = _hutchinson_refresh if description.drive == "hessian_refresh" else None
    return OptimizerSpec(
        name, optimizer_class, description.lr_range, preset.summary, preset.race_options(), before_backward
    )


OPTIMIZERS: dict[str, OptimizerSpec] = {
    name: _spec(name, optimizer_class, preset)
    for name, (optimizer_class, preset) in presets().items()
    if preset.race is not None
}
"""name -> race entry, for every preset whose description offers it to the race."""

DEFAULT_OPTIMIZERS = tuple(name for name, (_, preset) in presets().items() if preset.race_default)
"""The race's optimizers when none are named: the first-order methods of the usual comparisons."""


def get_optimizer(name: str) -> OptimizerSpec:
    """The registry entry called ``name``; a ``ValueError`` lists the known names."""
    return OPTIMIZERS[check_choice("optimizer", name, OPTIMIZERS)]
