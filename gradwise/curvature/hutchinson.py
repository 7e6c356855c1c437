r"""Hutchinson's randomized estimates of the Hessian diagonal and trace.

With Rademacher probes :math:`u` (entries :math:`\pm 1` with probability 1/2 each),
:math:`\mathbb{E}[u u^\top] = I`, hence

.. math::
    \mathbb{E}[u \odot H u] = \operatorname{diag}(H),\qquad
    \mathbb{E}[u^\top H u] = \operatorname{tr}(H).

Each probe costs one Hessian-vector product. The variance of the diagonal estimate in
coordinate :math:`i` is :math:`\sum_{j\ne i} H_{ij}^2` per probe (zero for a diagonal
:math:`H`, for which one probe is exact), and that of the trace estimate is
:math:`2\sum_{i\ne j} H_{ij}^2` (Hutchinson 1990, Commun. Stat. Simul. Comput. 19;
Bekas, Kokiopoulou & Saad 2007 for the diagonal; used by AdaHessian, arXiv:2006.00719, and
Sophia, arXiv:2305.14342).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from gradwise.curvature.hvp import gradient_graph
from gradwise.curvature.vectors import LossFn
from gradwise.validation import check_int

LossOrGrads = LossFn | Sequence[Tensor]


def rademacher_like(tensors: Sequence[Tensor], generator: torch.Generator | None = None) -> list[Tensor]:
    """Independent Rademacher (+-1) tensors shaped, typed and placed like ``tensors``.

    ``generator`` must live on the tensors' device (a CPU generator for CPU tensors).
    """
    probes = []
    for t in tensors:
        bits = torch.randint(0, 2, t.shape, generator=generator, device=t.device, dtype=torch.int8)
        probes.append(bits.to(t.dtype).mul_(2).sub_(1))
    return probes


def _hvp_closure(loss_fn_or_grads: LossOrGrads, params: Sequence[Tensor]) -> Callable[[list[Tensor]], list[Tensor]]:
    """A function ``v -> Hv`` by double backward, from a loss closure or from gradients
    that were computed with ``create_graph=True``."""
    params = list(params)
    grads: Sequence[Tensor]
    if callable(loss_fn_or_grads):
        leaves, grads = gradient_graph(loss_fn_or_grads, params)
    else:
        grads = list(loss_fn_or_grads)
        leaves = params
        if len(grads) != len(params):
            raise ValueError(f"expected one gradient per parameter ({len(params)}), got {len(grads)}")
        if not all(g.requires_grad for g in grads):
            raise ValueError(
                "gradients must carry a graph: compute them with torch.autograd.grad(loss, params, create_graph=True)"
            )

    def product(vector: list[Tensor]) -> list[Tensor]:
        with torch.enable_grad():
            return list(
                torch.autograd.grad(grads, leaves, vector, retain_graph=True, allow_unused=True, materialize_grads=True)
            )

    return product


def hutchinson_diagonal(
    loss_fn_or_grads: LossOrGrads,
    params: Sequence[Tensor],
    samples: int = 1,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    r"""Estimate :math:`\operatorname{diag}(\nabla^2 f)` as the mean of :math:`u \odot Hu` over
    ``samples`` Rademacher probes :math:`u`.

    Args:
        loss_fn_or_grads: either a functional loss ``loss_fn(params) -> scalar`` (evaluated
            once at ``params``), or the gradients of the loss with respect to ``params``
            computed with ``torch.autograd.grad(loss, params, create_graph=True)`` (reuses the
            graph of a training step; the form an optimizer such as Sophia wants).
        params: the parameters (tensors); with gradients given, the very tensors they were
            taken with respect to.
        samples: number of probes (>= 1); the variance falls as ``1 / samples``.
        generator: source of the probes, for reproducible estimates.

    Returns:
        Tensors shaped like ``params`` (detached), unbiased for the Hessian's diagonal.

    Example::

        grads = torch.autograd.grad(loss, params, create_graph=True)
        diag = hutchinson_diagonal(grads, params, samples=1, generator=g)
    """
    check_int("samples", samples, 1)
    product = _hvp_closure(loss_fn_or_grads, params)
    estimate = [torch.zeros_like(p, memory_format=torch.contiguous_format).detach() for p in params]
    for _ in range(samples):
        probes = rademacher_like(estimate, generator)
        for acc, u, hu in zip(estimate, probes, product(probes)):
            acc.addcmul_(u, hu.detach(), value=1.0 / samples)
    return estimate


def hutchinson_trace(
    loss_fn_or_grads: LossOrGrads,
    params: Sequence[Tensor],
    samples: int = 10,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Estimate :math:`\operatorname{tr}(\nabla^2 f)` as the mean of :math:`u^\top H u` over
    ``samples`` Rademacher probes (same arguments as :func:`hutchinson_diagonal`)."""
    check_int("samples", samples, 1)
    product = _hvp_closure(loss_fn_or_grads, params)
    total = torch.zeros((), dtype=params[0].dtype, device=params[0].device)
    for _ in range(samples):
        probes = rademacher_like(list(params), generator)
        for u, hu in zip(probes, product(probes)):
            total += torch.vdot(u.reshape(-1), hu.detach().reshape(-1))
    return total / samples
