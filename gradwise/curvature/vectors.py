"""Vectors in parameter space: lists of tensors shaped like a model's parameters.

Every routine in :mod:`gradwise.curvature` takes the loss as a *functional* closure
``loss_fn(params) -> scalar tensor`` that computes the loss from the tensors it is given
(so that it can be evaluated at a perturbed point, or under ``torch.func`` transforms), and
a vector ``v`` as a list of tensors with the shapes of ``params``. :func:`module_loss` builds
such a closure for an ``nn.Module`` with ``torch.func.functional_call``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

LossFn = Callable[[Sequence[Tensor]], Tensor]


def module_loss(
    model: nn.Module, criterion: Callable[[Tensor, Tensor], Tensor], inputs: Tensor, targets: Tensor
) -> tuple[LossFn, list[Tensor]]:
    """A functional loss ``params -> criterion(model(inputs), targets)`` and the model's
    trainable parameters (the point at which to evaluate it).

    Example::

        loss_fn, params = module_loss(model, nn.functional.cross_entropy, x, y)
        Hv = hvp(loss_fn, params, v)
    """
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    params: list[Tensor] = [p for p in model.parameters() if p.requires_grad]

    def loss_fn(values: Sequence[Tensor]) -> Tensor:
        outputs = torch.func.functional_call(model, dict(zip(names, values)), (inputs,))
        return criterion(outputs, targets)

    return loss_fn, params


def module_outputs(model: nn.Module, inputs: Tensor) -> tuple[Callable[[Sequence[Tensor]], Tensor], list[Tensor]]:
    """A functional ``params -> model(inputs)`` and the model's trainable parameters."""
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    params: list[Tensor] = [p for p in model.parameters() if p.requires_grad]

    def outputs_fn(values: Sequence[Tensor]) -> Tensor:
        return torch.func.functional_call(model, dict(zip(names, values)), (inputs,))

    return outputs_fn, params


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate ``tensors`` into one flat vector (a copy)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat ``vector`` into views shaped like ``like``."""
    pieces = vector.split([t.numel() for t in like])
    return [piece.view_as(t) for piece, t in zip(pieces, like)]


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """The inner product of two parameter-space vectors (a scalar tensor)."""
    return sum((torch.vdot(x.reshape(-1), y.reshape(-1)) for x, y in zip(a, b)), torch.zeros((), dtype=a[0].dtype))


def norm(a: Sequence[Tensor]) -> Tensor:
    """The Euclidean norm of a parameter-space vector."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in a]))


def check_like(name: str, vector: Sequence[Tensor], params: Sequence[Tensor]) -> list[Tensor]:
    """Check that ``vector`` has one tensor per parameter with the same shape."""
    vector = list(vector)
    if len(vector) != len(params) or any(v.shape != p.shape for v, p in zip(vector, params)):
        got = [tuple(v.shape) for v in vector]
        want = [tuple(p.shape) for p in params]
        raise ValueError(f"{name} must have one tensor per parameter with shapes {want}, got {got}")
    return vector
