"""The Hessian of a loss at a point as a linear operator on flat vectors.

Spectral routines (:mod:`.spectrum`) want ``matvec(v) -> Hv`` on flat vectors; building the
gradient graph once and differentiating it again for every product saves one forward and
backward pass per product compared with :func:`.hvp.hvp_double_backward`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from gradwise.curvature.hvp import gradient_graph
from gradwise.curvature.vectors import LossFn, flatten, unflatten

MatVec = Callable[[Tensor], Tensor]


def hessian_operator(loss_fn: LossFn, params: Sequence[Tensor]) -> MatVec:
    """``v -> H v`` (flat vectors of ``sum(p.numel())`` entries) for the Hessian of ``loss_fn`` at ``params``.

    Example::

        matvec = hessian_operator(loss_fn, params)
        top = power_iteration(matvec, dim=sum(p.numel() for p in params))
    """
    leaves, grads = gradient_graph(loss_fn, params)

    def matvec(vector: Tensor) -> Tensor:
        with torch.enable_grad():
            product = torch.autograd.grad(
                grads, leaves, unflatten(vector, leaves), retain_graph=True, allow_unused=True, materialize_grads=True
            )
        return flatten(product).detach()

    return matvec


def matrix_operator(matrix: Tensor) -> MatVec:
    """``v -> A v`` for an explicit symmetric matrix (handy for tests and small problems)."""
    return lambda vector: matrix @ vector
