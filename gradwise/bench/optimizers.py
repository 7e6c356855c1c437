"""The optimizers a race can run: name -> how to build one, and where to search its lr.

Each entry builds a ``gradwise.optim`` optimizer from parameters and a learning rate, with
every other hyperparameter at the optimizer's documented default. The classes are imported
inside the factories, so this registry can be read without importing ``gradwise.optim``.

The learning-rate ranges are where a sweep looks; every range spans the same four decades
(so a sweep with the same number of points has the same resolution for every optimizer),
placed where the optimizer's step size lives on problems of unit scale: plain and momentum
SGD steps are ``lr * gradient`` and need small rates on steep problems; Adam-type steps
are ``lr`` per coordinate at most; Adagrad's steps shrink like ``lr / sqrt(t)`` and need
larger rates; Lion's sign steps have size exactly ``lr`` in every coordinate, so its range
sits lower than Adam's (Chen et al. 2023, arXiv:2302.06675, recommend a 3-10x smaller lr).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from torch import Tensor
from torch.optim import Optimizer

from gradwise.validation import check_choice, check_int


@dataclass(frozen=True)
class OptimizerSpec:
    """How a race builds one optimizer.

    Attributes:
        name: registry name.
        build: ``build(params, lr)`` returns the optimizer.
        lr_range: ``(low, high)`` of the learning-rate sweep, inclusive.
        description: one line for ``--help`` and reports.
    """

    name: str
    build: Callable[[Iterable[Tensor], float], Optimizer]
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


def _sgd(params: Iterable[Tensor], lr: float) -> Optimizer:
    from gradwise.optim import SGD

    return SGD(params, lr=lr)


def _momentum(params: Iterable[Tensor], lr: float) -> Optimizer:
    from gradwise.optim import SGD

    return SGD(params, lr=lr, momentum=0.9)


def _nesterov(params: Iterable[Tensor], lr: float) -> Optimizer:
    from gradwise.optim import SGD

    return SGD(params, lr=lr, momentum=0.9, nesterov=True)


def _adagrad(params: Iterable[Tensor], lr: float) -> Optimizer:
    from gradwise.optim import Adagrad

    return Adagrad(params, lr=lr)


def _rmsprop(params: Iterable[Tensor], lr: float) -> Optimizer:
    from gradwise.optim import RMSprop

    return RMSprop(params, lr=lr)


def _adam(params: Iterable[Tensor], lr: float) -> Optimizer:
    from gradwise.optim import Adam

    return Adam(params, lr=lr)


def _adamw(params: Iterable[Tensor], lr: float) -> Optimizer:
    from gradwise.optim import AdamW

    return AdamW(params, lr=lr)


def _nadam(params: Iterable[Tensor], lr: float) -> Optimizer:
    from gradwise.optim import NAdam

    return NAdam(params, lr=lr)


def _lion(params: Iterable[Tensor], lr: float) -> Optimizer:
    from gradwise.optim import Lion

    return Lion(params, lr=lr)


OPTIMIZERS: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in (
        OptimizerSpec("sgd", _sgd, (1e-4, 1.0), "gradient descent"),
        OptimizerSpec("momentum", _momentum, (1e-4, 1.0), "SGD with heavy-ball momentum 0.9"),
        OptimizerSpec("nesterov", _nesterov, (1e-4, 1.0), "SGD with Nesterov momentum 0.9"),
        OptimizerSpec("adagrad", _adagrad, (1e-3, 10.0), "Adagrad"),
        OptimizerSpec("rmsprop", _rmsprop, (1e-5, 0.1), "RMSprop"),
        OptimizerSpec("adam", _adam, (1e-4, 1.0), "Adam"),
        OptimizerSpec("adamw", _adamw, (1e-4, 1.0), "AdamW (decoupled weight decay 0.01)"),
        OptimizerSpec("nadam", _nadam, (1e-4, 1.0), "Adam with Nesterov momentum"),
        OptimizerSpec("lion", _lion, (1e-5, 0.1), "Lion (sign momentum)"),
    )
}

DEFAULT_OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw", "lion")


def get_optimizer(name: str) -> OptimizerSpec:
    """The registry entry called ``name``; a ``ValueError`` lists the known names."""
    return OPTIMIZERS[check_choice("optimizer", name, OPTIMIZERS)]
