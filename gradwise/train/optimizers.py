"""The optimizers a training run can name, and how the run builds one.

Weight decay goes to matrices and embeddings only (:func:`gradwise.optim.weight_decay_groups`);
optimizers without a ``weight_decay`` hyperparameter get a single group. Any other
hyperparameter comes from ``options`` (``betas``, ``momentum``, ...), checked by the
optimizer's own validators.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from gradwise.optim.description import Drive, description_of, presets
from gradwise.optim.param_groups import training_param_groups
from gradwise.train.closures import CLOSURE_DRIVES
from gradwise.validation import check_choice

TRAINED_DRIVES: tuple[Drive, ...] = ("step", "model", "hessian_refresh", *CLOSURE_DRIVES)
"""The drives (:data:`gradwise.optim.description.Drive`) the loop feeds: a plain step after the
backward pass, an optimizer bound to the model (built with it, see :func:`build_optimizer`), a
Hessian refresh before the backward pass (:meth:`gradwise.train.loop.Trainer.refresh_hessian`),
and the closure-driven methods (:mod:`gradwise.train.closures`): every drive there is."""


def _offered(name: str, optimizer_class: type[Optimizer]) -> bool:
    drive = description_of(optimizer_class).drive
    if drive not in TRAINED_DRIVES:
        raise ValueError(f"train preset {name!r}: the loop cannot drive {optimizer_class.__name__} ({drive})")
    return True


OPTIMIZERS: dict[str, tuple[type[Optimizer], dict[str, Any]]] = {
    name: (optimizer_class, preset.train_options())
    for name, (optimizer_class, preset) in presets().items()
    if preset.train is not None and _offered(name, optimizer_class)
}
"""name -> (class, hyperparameters that differ from the class defaults for training), read from
each optimizer's description (:class:`gradwise.optim.description.Preset`: ``train``), for the
drives in :data:`TRAINED_DRIVES`: Muon with the groups of its description
(:func:`gradwise.optim.muon_param_groups`), K-FAC bound to the model, Sophia refreshed by the
loop, L-BFGS, Newton-CG, SQN, SVRG and SAGA through closures (:mod:`gradwise.train.closures`).
"""


BUILDER_ARGUMENTS = ("model", "params", "lr", "weight_decay")
"""Constructor arguments the builder itself passes (the model for a model-bound optimizer, the
param groups, the run's lr and weight decay): never an ``--optimizer-options`` key."""


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
        check_choice(f"{name} option", option, [key for key in accepted if key not in BUILDER_ARGUMENTS])
        # a dtype option (Muon's ns_dtype) arrives from the command line or a TOML file as its name
        named = getattr(torch, str(settings[option]), None)
        if isinstance(accepted[option].default, torch.dtype) and isinstance(named, torch.dtype):
            settings[option] = named
    return optimizer_class, settings


def check_optimizer_options(name: str, options: dict[str, Any]) -> None:
    """Check ``options`` with the optimizer's own validators, before a run needs them.

    The optimizer is built over a throwaway ``nn.Linear(2, 2)``: its ``__init__`` checks every
    hyperparameter (a ``ValueError`` naming it, the value and the allowed range), so the
    ranges live in one place, the optimizer's file.
    """
    optimizer_class, settings = _class_and_settings(name, options)
    model = nn.Linear(2, 2)
    try:
        _construct(optimizer_class, model, training_param_groups(optimizer_class, model, 0.0), 1e-3, settings)
    except TypeError as error:  # a value of the wrong kind that a validator did not name
        raise ValueError(f"optimizer_options of {name}: {error}") from None


def _construct(optimizer_class: type[Optimizer], model: nn.Module, params: Any, lr: float,
               settings: dict[str, Any]) -> Optimizer:
    """``optimizer_class`` over ``params``; one driven by ``"model"`` (K-FAC) is bound to ``model``,
    whose layers' hooks feed it its statistics."""
    # torch's Optimizer.__init__ takes (params, defaults); every optimizer here takes lr and its
    # options by keyword, and a model-bound one the model first.
    construct: Callable[..., Optimizer] = optimizer_class
    if description_of(optimizer_class).drive == "model":
        return construct(model, lr=lr, params=params, **settings)
    return construct(params, lr=lr, **settings)


def drive_of(name: str) -> Drive:
    """How the loop drives optimizer ``name`` (its description's drive), known before it is built."""
    return description_of(OPTIMIZERS[check_choice("optimizer", name, OPTIMIZERS)][0]).drive


HESSIAN_REFRESH_STRATEGIES = ("single", "ddp")
"""Strategies under which every rank holds the whole model and the whole optimizer, as a Hessian
refresh (Sophia's) needs; sharded ones (ZeRO, FSDP, TP, PP) would hand it a part."""

SWITCHING_STRATEGIES = ("single", "ddp", "zero1", "zero2")
"""Strategies under which an optimizer's ``train()``/``eval()`` moves the whole model (ZeRO's
optimizer moves each rank's part and gathers them); FSDP, TP and PP are not checked with it, so refused."""


def check_optimizer_strategy(name: str, strategy: str) -> None:
    """Refuse (one-line ``ValueError``) a strategy the optimizer ``name``'s description rules out: a
    closure-driven one re-evaluates its loss on one process, a Hessian refresh needs the whole model
    on every rank, and an eval switch moves the whole model. Checked by the launcher before any worker
    starts (a refusal inside the workers races their teardown) and by each worker."""
    description = description_of(OPTIMIZERS[check_choice("optimizer", name, OPTIMIZERS)][0], inherited=True)
    if description.drive in CLOSURE_DRIVES and strategy != "single":
        raise ValueError(f"strategy: optimizer {name!r} re-evaluates its loss in closures on one process; "
                         f"run it with strategy 'single', not {strategy!r}")
    if description.drive == "hessian_refresh" and strategy not in HESSIAN_REFRESH_STRATEGIES:
        raise ValueError(f"optimizer {name!r} refreshes a Hessian estimate of the whole model: "
                         f"run it with strategy {' or '.join(HESSIAN_REFRESH_STRATEGIES)}, not {strategy!r}")
    if description.eval_switch and strategy not in SWITCHING_STRATEGIES:
        raise ValueError(f"optimizer {name!r} evaluates at weights of its own (optimizer.eval()): "
                         f"run it with strategy {', '.join(SWITCHING_STRATEGIES)}, not {strategy!r}")


def build_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float,
                    options: dict[str, Any] | None = None) -> Optimizer:
    """The optimizer ``name`` over ``model``'s parameters (bound to ``model`` when its description's
    drive is ``"model"``).

    An optimizer that steps some parameters with an inner AdamW (Muon: embeddings, head, biases
    and gains) gets ``adamw_lr = lr / lr_scale`` unless the options set it: the AdamW lr that
    corresponds to the run's lr (the workload's AdamW lr when no lr is given), so that a sweep
    over ``lr`` moves both. Muon's class default (3e-4) on tiny-gpt's embedding is 7x below the
    workload's tuned AdamW lr: ``gradwise train --workload tiny-gpt --workload-options n_layer=2
    --optimizer muon --lr 0.03 --steps 400`` ends at val loss 1.478, and 1.774 with
    ``--optimizer-options adamw_lr=3e-4`` (the race's Muon, ``benchmarks/results/race_tiny_gpt_400.json``:
    1.480 +- 0.011 over 3 seeds)."""
    optimizer_class, settings = _class_and_settings(name, options)
    if "adamw_lr" in inspect.signature(optimizer_class).parameters and "adamw_lr" not in (options or {}):
        settings["adamw_lr"] = lr / presets()[name][1].lr_scale
    return _construct(optimizer_class, model, training_param_groups(optimizer_class, model, weight_decay), lr, settings)
