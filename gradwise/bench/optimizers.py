"""The optimizers a race can run: name -> how to build one, and where to search its lr.

Each entry builds a ``gradwise.optim`` optimizer from parameters and a learning rate, with
every other hyperparameter at the optimizer's documented default. The classes are imported
inside the factories, so this registry can be read without importing ``gradwise.optim``.

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
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from gradwise.validation import check_choice, check_int


@dataclass(frozen=True)
class OptimizerSpec:
    """How a race builds one optimizer.

    Attributes:
        name: registry name.
        build: ``build(params, lr)`` returns the optimizer; ``params`` is anything torch
            optimizers take (tensors or param-group dicts, whose ``lr`` wins).
        lr_range: ``(low, high)`` of the learning-rate sweep, inclusive.
        description: one line for ``--help`` and reports.
    """

    name: str
    build: Callable[[ParamsT, float], Optimizer]
    lr_range: tuple[float, float]
    description: str

    def lr_grid(self, points: int) -> list[float]:
        """``points`` learning rates evenly spaced in log scale over ``lr_range``.

        One point is the geometric middle of the range.
        """
        check_int("points", points, 1)
        low, high = (math.log10(bound) for bound in self.lr_range)
        if points == 1:
            return [10 ** ((low + high) / 2)]
        return [float(lr) for lr in np.logspace(low, high, points)]


def _sgd(params: ParamsT, lr: float) -> Optimizer:
    from gradwise.optim import SGD

    return SGD(params, lr=lr)


def _momentum(params: ParamsT, lr: float) -> Optimizer:
    from gradwise.optim import SGD

    return SGD(params, lr=lr, momentum=0.9)


def _nesterov(params: ParamsT, lr: float) -> Optimizer:
    from gradwise.optim import SGD

    return SGD(params, lr=lr, momentum=0.9, nesterov=True)


def _adagrad(params: ParamsT, lr: float) -> Optimizer:
    from gradwise.optim import Adagrad

    return Adagrad(params, lr=lr)


def _rmsprop(params: ParamsT, lr: float) -> Optimizer:
    from gradwise.optim import RMSprop

    return RMSprop(params, lr=lr)


def _adam(params: ParamsT, lr: float) -> Optimizer:
    from gradwise.optim import Adam

    return Adam(params, lr=lr)


def _adamw(params: ParamsT, lr: float) -> Optimizer:
    from gradwise.optim import AdamW

    return AdamW(params, lr=lr)


def _nadam(params: ParamsT, lr: float) -> Optimizer:
    from gradwise.optim import NAdam

    return NAdam(params, lr=lr)


def _lion(params: ParamsT, lr: float) -> Optimizer:
    from gradwise.optim import Lion

    return Lion(params, lr=lr)


OPTIMIZERS: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in (
        OptimizerSpec("sgd", _sgd, (10**-3.5, 10**0.5), "gradient descent"),
        OptimizerSpec("momentum", _momentum, (10**-3.5, 10**0.5), "SGD with heavy-ball momentum 0.9"),
        OptimizerSpec("nesterov", _nesterov, (10**-3.5, 10**0.5), "SGD with Nesterov momentum 0.9"),
        OptimizerSpec("adagrad", _adagrad, (10**-2.5, 10**1.5), "Adagrad"),
        OptimizerSpec("rmsprop", _rmsprop, (1e-4, 1.0), "RMSprop (alpha 0.99, no bias correction)"),
        OptimizerSpec("adam", _adam, (1e-3, 10.0), "Adam"),
        OptimizerSpec("adamw", _adamw, (1e-3, 10.0), "AdamW (decoupled weight decay 0.01)"),
        OptimizerSpec("nadam", _nadam, (1e-3, 10.0), "NAdam (Adam with Nesterov momentum)"),
        OptimizerSpec("lion", _lion, (10**-4.5, 10**-0.5), "Lion (sign of interpolated momentum)"),
    )
}

DEFAULT_OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw", "lion")


def get_optimizer(name: str) -> OptimizerSpec:
    """The registry entry called ``name``; a ``ValueError`` lists the known names."""
    return OPTIMIZERS[check_choice("optimizer", name, OPTIMIZERS)]
