"""The parameters of a single-group, closure-driven optimizer viewed as one flat vector.

Line-search and second-order methods (``LBFGS``, ``Newton``, ``NewtonCG``, ``SQN``) reason
about the whole parameter vector: they gather gradients into one vector, move the
parameters along one direction, and restore a saved point. A complex parameter is seen as
its ``torch.view_as_real`` (torch's rule, as torch.optim.LBFGS does): two real coordinates
per element.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class FlatParams:
    """Gather from and scatter to a list of parameters as one flat vector."""

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.params = list(params)
        self.numel = sum(_real(p).numel() for p in self.params)

    def values(self) -> Tensor:
        """A copy of the parameters as one vector."""
        return torch.cat([_real(p.detach()).reshape(-1) for p in self.params])

    def grads(self) -> Tensor:
        """The parameters' ``.grad`` as one vector (zeros where a gradient is ``None``; a
        sparse gradient densified, as torch.optim.LBFGS does)."""
        pieces = []
        for p in self.params:
            if p.grad is None:
                pieces.append(_real(p).new_zeros(_real(p).numel()))
            else:
                grad = p.grad.to_dense() if p.grad.is_sparse else p.grad
                pieces.append(_real(grad).reshape(-1))
        return torch.cat(pieces)

    def pieces(self, vector: Tensor) -> list[Tensor]:
        """Views of ``vector`` shaped like the parameters."""
        reals = [_real(p) for p in self.params]
        return [piece.view_as(p) for piece, p in zip(vector.split([p.numel() for p in reals]), reals)]

    @torch.no_grad()
    def assign(self, vector: Tensor) -> None:
        """Set the parameters to ``vector``."""
        for p, piece in zip(self.params, self.pieces(vector)):
            _real(p).copy_(piece)

    @torch.no_grad()
    def add_(self, vector: Tensor, alpha: float = 1.0) -> None:
        """Move the parameters by ``alpha * vector`` in place."""
        for p, piece in zip(self.params, self.pieces(vector)):
            _real(p).add_(piece, alpha=alpha)


def _real(tensor: Tensor) -> Tensor:
    """``tensor``, or its real view (sharing memory) if it is complex."""
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


def single_group_params(optimizer: torch.optim.Optimizer, complex_params: bool = True) -> FlatParams:
    """The flat view of ``optimizer``'s only param group (these optimizers take one).

    ``complex_params=False`` refuses complex parameters: methods that differentiate the
    gradient again through autograd (Newton's Hessian, Hessian-vector products) would get
    complex (Wirtinger) derivatives, not the curvature of the real view.
    """
    if len(optimizer.param_groups) != 1:
        raise ValueError(f"{type(optimizer).__name__} supports a single param group, got {len(optimizer.param_groups)}")
    params = optimizer.param_groups[0]["params"]
    if not complex_params and any(p.is_complex() for p in params):
        raise RuntimeError(f"{type(optimizer).__name__} does not support complex parameters (second-order products "
                           "through autograd give Wirtinger derivatives, not the real view's curvature)")
    return FlatParams(params)


class SingleParamGroup:
    """Mixin (before the optimizer base class) for optimizers that see their parameters as one
    flat vector with one history: a second param group, at construction or later through
    ``add_param_group``, is refused, as torch.optim.LBFGS refuses per-parameter options."""

    param_groups: list[dict]

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)  # type: ignore[misc]  # torch's checks (duplicates, names) first
        if len(self.param_groups) > 1:
            self.param_groups.pop()
            raise ValueError(f"{type(self).__name__} supports a single param group, got a second one")
