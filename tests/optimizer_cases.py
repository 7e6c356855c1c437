"""The optimizers under test, their torch.optim twins and hyperparameter samplers.

One table drives the parameterised tests: each case names a gradwise optimizer, the
torch.optim class with the same algorithm (or None), a sampler of valid hyperparameters and
the hyperparameters that must be rejected.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import gradwise.optim as gw


@dataclass(frozen=True)
class Case:
    name: str
    optimizer: type[torch.optim.Optimizer]
    torch_twin: type[torch.optim.Optimizer] | None
    sample: Callable[[np.random.Generator], dict[str, Any]]
    # (keyword, invalid value) pairs, each of which must raise a ValueError naming it.
    invalid: list[tuple[str, Any]] = field(default_factory=list)
    # Implementation paths to test, as constructor options: {} is the default path.
    paths: tuple[dict[str, Any], ...] = ({},)
    # Options torch.optim reads from its constructor only (it ignores a per-group value).
    constructor_only: tuple[str, ...] = ()

    def __str__(self) -> str:
        return self.name


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _sgd(rng: np.random.Generator) -> dict[str, Any]:
    momentum = float(rng.choice([0.0, rng.uniform(0.1, 0.99)]))
    nesterov = bool(momentum > 0 and rng.random() < 0.5)
    return dict(
        lr=_log_uniform(rng, 1e-4, 1e-1),
        momentum=momentum,
        dampening=0.0 if nesterov else float(rng.choice([0.0, rng.uniform(0, 0.9)])),
        nesterov=nesterov,
        weight_decay=float(rng.choice([0.0, _log_uniform(rng, 1e-5, 1e-1)])),
        maximize=bool(rng.random() < 0.2),
    )


def _adagrad(rng: np.random.Generator) -> dict[str, Any]:
    return dict(
        lr=_log_uniform(rng, 1e-3, 1e-1),
        lr_decay=float(rng.choice([0.0, _log_uniform(rng, 1e-4, 1e-1)])),
        weight_decay=float(rng.choice([0.0, _log_uniform(rng, 1e-5, 1e-1)])),
        initial_accumulator_value=float(rng.choice([0.0, rng.uniform(0, 1)])),
        eps=_log_uniform(rng, 1e-10, 1e-6),
        maximize=bool(rng.random() < 0.2),
    )


def _rmsprop(rng: np.random.Generator) -> dict[str, Any]:
    return dict(
        lr=_log_uniform(rng, 1e-4, 1e-2),
        alpha=rng.uniform(0.8, 0.999),
        eps=_log_uniform(rng, 1e-8, 1e-4),
        weight_decay=float(rng.choice([0.0, _log_uniform(rng, 1e-5, 1e-1)])),
        momentum=float(rng.choice([0.0, rng.uniform(0.1, 0.95)])),
        centered=bool(rng.random() < 0.5),
        maximize=bool(rng.random() < 0.2),
    )


def _betas(rng: np.random.Generator) -> tuple[float, float]:
    return (float(rng.uniform(0.5, 0.99)), float(rng.uniform(0.9, 0.9999)))


def _adam(rng: np.random.Generator) -> dict[str, Any]:
    return dict(
        lr=_log_uniform(rng, 1e-4, 1e-1),
        betas=_betas(rng),
        eps=_log_uniform(rng, 1e-10, 1e-6),
        weight_decay=float(rng.choice([0.0, _log_uniform(rng, 1e-5, 1e-1)])),
        amsgrad=bool(rng.random() < 0.5),
        maximize=bool(rng.random() < 0.2),
    )


def _nadam(rng: np.random.Generator) -> dict[str, Any]:
    return dict(
        lr=_log_uniform(rng, 1e-4, 1e-1),
        betas=_betas(rng),
        eps=_log_uniform(rng, 1e-10, 1e-6),
        weight_decay=float(rng.choice([0.0, _log_uniform(rng, 1e-5, 1e-1)])),
        momentum_decay=_log_uniform(rng, 1e-4, 1e-2),
        decoupled_weight_decay=bool(rng.random() < 0.5),
        maximize=bool(rng.random() < 0.2),
    )


def _lion(rng: np.random.Generator) -> dict[str, Any]:
    return dict(
        lr=_log_uniform(rng, 1e-5, 1e-2),
        betas=_betas(rng),
        weight_decay=float(rng.choice([0.0, _log_uniform(rng, 1e-3, 1.0)])),
        maximize=bool(rng.random() < 0.2),
    )


_COMMON_INVALID = [("lr", -0.1), ("lr", float("nan")), ("lr", float("inf")), ("lr", "fast")]
_BETAS_INVALID = [("betas", (1.0, 0.999)), ("betas", (0.9, -0.1)), ("betas", (0.9,)), ("eps", -1e-8)]

CASES = [
    Case(
        "SGD",
        gw.SGD,
        torch.optim.SGD,
        _sgd,
        _COMMON_INVALID
        + [("momentum", -0.5), ("dampening", 1.5), ("weight_decay", -1e-4), ("nesterov", True)],
        paths=({}, {"fused": False}),
    ),
    Case(
        "Adagrad",
        gw.Adagrad,
        torch.optim.Adagrad,
        _adagrad,
        _COMMON_INVALID
        + [("lr_decay", -1.0), ("weight_decay", -1.0), ("initial_accumulator_value", -1.0), ("eps", -1.0)],
        paths=({}, {"fused": False}),
        constructor_only=("initial_accumulator_value",),
    ),
    Case(
        "RMSprop",
        gw.RMSprop,
        torch.optim.RMSprop,
        _rmsprop,
        _COMMON_INVALID + [("alpha", 1.5), ("alpha", -0.1), ("eps", -1.0), ("momentum", -0.9), ("weight_decay", -1.0)],
    ),
    Case(
        "Adam",
        gw.Adam,
        torch.optim.Adam,
        _adam,
        _COMMON_INVALID + _BETAS_INVALID + [("weight_decay", -1.0)],
        paths=({}, {"fused": False}),
    ),
    Case(
        "AdamW",
        gw.AdamW,
        torch.optim.AdamW,
        _adam,
        _COMMON_INVALID + _BETAS_INVALID + [("weight_decay", -1.0)],
        paths=({}, {"fused": False}),
    ),
    Case(
        "NAdam",
        gw.NAdam,
        torch.optim.NAdam,
        _nadam,
        _COMMON_INVALID + _BETAS_INVALID + [("weight_decay", -1.0), ("momentum_decay", -1e-3)],
    ),
    Case(
        "Lion",
        gw.Lion,
        None,
        _lion,
        _COMMON_INVALID + [("betas", (0.9, 1.0)), ("betas", (-0.1, 0.99)), ("weight_decay", -1.0)],
        paths=({}, {"fused": True}),
    ),
]

CASES_WITH_TWIN = [case for case in CASES if case.torch_twin is not None]


def with_paths(cases: list[Case]) -> list[tuple[Case, dict[str, Any]]]:
    """(case, constructor options) for every implementation path of every case."""
    return [(case, path) for case in cases for path in case.paths]


def path_id(item: Any) -> str:
    if isinstance(item, dict):
        return ",".join(f"{k}={v}" for k, v in item.items()) or "default"
    return str(item)
