"""Param groups with no weight decay for biases and normalisation weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gradwise.validation import check_range

NORMALIZATION_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)


def weight_decay_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    exclude_embeddings: bool = False,
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Two param groups: weights that decay, and biases, gains and norms that do not.

    Decaying a bias or a normalisation gain pulls it toward zero, which only restricts the
    model (it does not control its capacity), so the common practice (BERT, GPT-2/3,
    nanoGPT) is to decay matrices and convolution kernels only. A parameter is exempt when
    it has fewer than two dimensions or belongs to a normalisation layer (BatchNorm,
    InstanceNorm, LayerNorm, GroupNorm, LocalResponseNorm, RMSNorm), and also when it
    belongs to an ``nn.Embedding`` if ``exclude_embeddings``. Shared parameters are counted
    once. Extra keyword options (``lr=...``) go into both groups.

    Example::

        opt = gradwise.optim.AdamW(weight_decay_groups(model, 0.1), lr=3e-4)
    """
    check_range("weight_decay", weight_decay, 0.0)
    exempt_layers = NORMALIZATION_LAYERS + ((nn.Embedding,) if exclude_embeddings else ())
    decay: list[torch.Tensor] = []
    no_decay: list[torch.Tensor] = []
    seen: set[int] = set()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            exempt = param.ndim < 2 or isinstance(module, exempt_layers)
            (no_decay if exempt else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, **group_options},
        {"params": no_decay, "weight_decay": 0.0, **group_options},
    ]
    return [group for group in groups if group["params"]]


def training_param_groups(optimizer_class: type, model: nn.Module, weight_decay: float) -> Any:
    """The parameters or param groups of ``model`` that a training run gives ``optimizer_class``: its
    description's ``groups`` if it has them (Muon), else weight decay for matrices and embeddings only
    when it decays (:func:`weight_decay_groups`), else all parameters in one group."""
    import inspect

    from gradwise.optim.description import description_of  # here: the optimizer files import this module

    description = description_of(optimizer_class)
    if description.groups is not None:
        return description.groups(model, weight_decay)
    if "weight_decay" in inspect.signature(optimizer_class).parameters and weight_decay > 0:
        return weight_decay_groups(model, weight_decay)
    return [p for p in model.parameters() if p.requires_grad]
