"""The optimizers a training run can name, and how the run builds one.

Weight decay goes to matrices and embeddings only (:func:`gradwise.optim.weight_decay_groups`);
optimizers without a ``weight_decay`` hyperparameter get a single group. Any other
hyperparameter comes from ``options`` (``betas``, ``momentum``, ...), checked by the
optimizer's own validators.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from gradwise import optim
from gradwise.optim.description import presets
from gradwise.validation import check_choice

OPTIMIZERS: dict[str, tuple[type[Optimizer], dict[str, Any]]] = {
    name: (optimizer_class, preset.train_options())
    for name, (optimizer_class, preset) in presets().items()
    if preset.train is not None
}
"""name -> (class, hyperparameters that differ from the class defaults for training), read from
each optimizer's description (:class:`gradwise.optim.description.Preset`: ``train``).

Those driven by a plain ``step()`` after the backward pass are offered; Muon (which needs its
own param groups, see :func:`gradwise.optim.muon_param_groups`), Sophia and K-FAC (which need
the loop to feed them curvature) and the closure-driven second-order methods are not yet.
"""


def _class_and_settings(name: str, options: dict[str, Any] | None) -> tuple[type[Optimizer], dict[str, Any]]:
    """The class of optimizer ``name`` and its keyword arguments besides ``params`` and ``lr``."""
    optimizer_class, defaults = OPTIMIZERS[check_choice("optimizer", name, OPTIMIZERS)]
    settings = {**defaults, **(options or {})}
    if isinstance(settings.get("betas"), list):
        settings["betas"] = tuple(settings["betas"])
    accepted = inspect.signature(optimizer_class).parameters
    for option in options or {}:
        if option == "weight_decay":  # its own setting leaves biases and norms undecayed; the groups would override it
            raise ValueError("optimizer_options: weight_decay is its own setting (--weight-decay), not an option here")
        check_choice(f"{name} option", option, [key for key in accepted if key not in ("params", "lr", "weight_decay")])
    return optimizer_class, settings


def check_optimizer_options(name: str, options: dict[str, Any]) -> None:
    """Check ``options`` with the optimizer's own validators, before a run needs them.

    The optimizer is built over one throwaway parameter: its ``__init__`` checks every
    hyperparameter (a ``ValueError`` naming it, the value and the allowed range), so the
    ranges live in one place, the optimizer's file.
    """
    optimizer_class, settings = _class_and_settings(name, options)
    try:
        optimizer_class([torch.zeros(2, 2, requires_grad=True)], lr=1e-3, **settings)
    except TypeError as error:  # a value of the wrong kind that a validator did not name
        raise ValueError(f"optimizer_options of {name}: {error}") from None


def build_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float,
                    options: dict[str, Any] | None = None) -> Optimizer:
    """The optimizer ``name`` over ``model``'s parameters."""
    optimizer_class, settings = _class_and_settings(name, options)
    accepted = inspect.signature(optimizer_class).parameters
    if "weight_decay" in accepted and weight_decay > 0:
        return optimizer_class(optim.weight_decay_groups(model, weight_decay), lr=lr, **settings)
    return optimizer_class(model.parameters(), lr=lr, **settings)
