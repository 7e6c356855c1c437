"""The optimizers a race can run: name -> how to build one, and where to search its lr.

Each entry builds a ``gradwise.optim`` optimizer from parameters and a learning rate, with
every other hyperparameter at the optimizer's documented default unless the entry says
otherwise (momentum 0.9 for the two momentum variants of SGD).

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

K-FAC (:class:`gradwise.optim.KFAC`) has no entry: its preconditioner is built from the
inputs and output gradients of a model's ``nn.Linear``/``nn.Conv2d`` layers, and the race's
test functions have none (on them it would be plain SGD). Sophia's entry hands it a
one-probe Hutchinson estimate of the Hessian diagonal every 10 steps (``before_backward``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from gradwise import optim
from gradwise.curvature.hutchinson import hutchinson_diagonal
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
        return self.optimizer(params, lr=lr, **self.options)

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


def _hutchinson_for_sophia(optimizer: optim.Sophia, loss: Tensor, params: list[Tensor]) -> None:
    """Hand Sophia a one-probe Hutchinson estimate of the Hessian diagonal when it is due."""
    if optimizer.hessian_update_due:
        grads = torch.autograd.grad(loss, params, create_graph=True)
        optimizer.update_hessian(hutchinson_diagonal(grads, params, generator=_HUTCHINSON_PROBES), params)


OPTIMIZERS: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in (
        OptimizerSpec("sgd", optim.SGD, (10**-3.5, 10**0.5), "gradient descent"),
        OptimizerSpec("momentum", optim.SGD, (10**-3.5, 10**0.5), "SGD with heavy-ball momentum 0.9", {"momentum": 0.9}),
        OptimizerSpec(
            "nesterov", optim.SGD, (10**-3.5, 10**0.5), "SGD with Nesterov momentum 0.9", {"momentum": 0.9, "nesterov": True}
        ),
        OptimizerSpec("adagrad", optim.Adagrad, (10**-2.5, 10**1.5), "Adagrad"),
        OptimizerSpec("rmsprop", optim.RMSprop, (1e-4, 1.0), "RMSprop (alpha 0.99, no bias correction)"),
        OptimizerSpec("adam", optim.Adam, (1e-3, 10.0), "Adam"),
        OptimizerSpec("adamw", optim.AdamW, (1e-3, 10.0), "AdamW (decoupled weight decay 0.01)"),
        OptimizerSpec("nadam", optim.NAdam, (1e-3, 10.0), "NAdam (Adam with Nesterov momentum)"),
        OptimizerSpec("lion", optim.Lion, (10**-4.5, 10**-0.5), "Lion (sign of interpolated momentum)"),
        OptimizerSpec("adafactor", optim.Adafactor, (1e-4, 1.0), "Adafactor (relative step, update clipping)"),
        OptimizerSpec(
            "muon", optim.Muon, (1e-3, 10.0), "Muon on the point as a 1 x n matrix: normalised Nesterov momentum",
            {"use_muon": True, "weight_decay": 0.0},
        ),
        OptimizerSpec("shampoo", optim.Shampoo, (10**-2.5, 10**1.5), "Shampoo (Adagrad grafting, roots every 10 steps)"),
        OptimizerSpec("soap", optim.SOAP, (1e-3, 10.0), "SOAP (Adam in Shampoo's eigenbasis)", {"weight_decay": 0.0}),
        OptimizerSpec(
            "sophia", optim.Sophia, (1e-4, 1.0), "Sophia-H (Hutchinson diagonal every 10 steps, rho 1)",
            {"rho": 1.0, "weight_decay": 0.0}, before_backward=_hutchinson_for_sophia,
        ),
    )
}

DEFAULT_OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw", "lion")


def get_optimizer(name: str) -> OptimizerSpec:
    """The registry entry called ``name``; a ``ValueError`` lists the known names."""
    return OPTIMIZERS[check_choice("optimizer", name, OPTIMIZERS)]
