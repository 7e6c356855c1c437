r"""The Gauss-Newton-Bartlett estimator of the Gauss-Newton diagonal of a softmax model.

For a model with logits :math:`f(\theta, x)` and the cross-entropy loss, the Gauss-Newton
matrix is :math:`J^\top S J` with :math:`S` the Hessian of the loss in the logits. Bartlett's
second identity, :math:`\mathbb{E}_{\hat y \sim p_\theta}[\nabla \ell\, \nabla \ell^\top] =
\mathbb{E}[\nabla^2 \ell]` for labels :math:`\hat y` drawn from the model's own softmax,
makes the outer product of sampled-label gradients an unbiased estimate of it (Liu et al.
2023, "Sophia", arXiv:2305.14342, Algorithm 2):

.. math::
    \hat L(\theta) = \frac1B \sum_{b=1}^B \ell\big(f(\theta, x_b), \hat y_b\big),\quad
    \hat y_b \sim \operatorname{softmax}(f(\theta, x_b)),\qquad
    \hat h = B\, \nabla \hat L(\theta) \odot \nabla \hat L(\theta).

It costs one extra backward pass through the logits of a training step and no
Hessian-vector product.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def sample_labels(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One label per row of ``logits`` (shape ``(..., classes)``), drawn from its softmax;
    shape ``logits.shape[:-1]``."""
    probabilities = torch.softmax(logits.detach().reshape(-1, logits.shape[-1]).float(), dim=-1)
    return torch.multinomial(probabilities, 1, generator=generator).view(logits.shape[:-1])


def gauss_newton_bartlett(
    logits: Tensor, params: Sequence[Tensor], generator: torch.Generator | None = None
) -> list[Tensor]:
    r"""The estimate :math:`\hat h` of the Gauss-Newton diagonal (see the module docstring).

    Args:
        logits: the model's logits for a batch, shape ``(..., classes)``, still attached to
            the graph; every leading position is one of the :math:`B` examples (tokens of
            a language model included). The graph is kept, so the training loss can
            backpropagate through the same logits afterwards.
        params: the parameters to estimate for; those the logits do not depend on get zeros.
        generator: source of the sampled labels, for reproducible estimates.

    Returns:
        Detached tensors shaped like ``params``, non-negative.

    Example::

        logits = model(x)
        if sophia.hessian_update_due:
            sophia.update_hessian(gauss_newton_bartlett(logits, params))
        F.cross_entropy(logits.flatten(0, -2), y.flatten()).backward()
        sophia.step()
    """
    params = list(params)
    flat = logits.reshape(-1, logits.shape[-1])
    labels = sample_labels(flat, generator)
    loss = F.cross_entropy(flat, labels)
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True, materialize_grads=True)
    batch = flat.shape[0]
    return [grad.detach().square().mul_(batch) for grad in grads]
