r"""Hessian-vector products :math:`H v = \nabla^2 f(x)\, v` without forming :math:`H`.

Three ways, all for a functional loss ``loss_fn(params)`` (see :mod:`.vectors`):

- :func:`hvp_double_backward` (reverse-over-reverse, Pearlmutter 1994): differentiate
  :math:`\nabla f(x)^\top v` once more; two backward passes, exact up to rounding.
- :func:`hvp_forward_over_reverse`: the directional derivative of the gradient,
  ``torch.func.jvp(torch.func.grad(f), (x,), (v,))``; one forward-mode pass through the
  backward pass, usually the cheapest exact method.
- :func:`hvp_finite_difference`: :math:`(\nabla f(x + \epsilon v) - \nabla f(x))/\epsilon`,
  two gradients and no second-order autograd, error :math:`O(\epsilon)` plus rounding
  :math:`O(u/\epsilon)`; see :func:`default_fd_eps`.

:func:`hvp` dispatches on ``method``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from gradwise.curvature.vectors import LossFn, check_like, norm
from gradwise.validation import check_choice, check_range

METHODS = ("double_backward", "forward_over_reverse", "finite_difference")


def _gradient(loss_fn: LossFn, params: Sequence[Tensor], create_graph: bool) -> tuple[list[Tensor], list[Tensor]]:
    leaves = [p.detach().requires_grad_(True) for p in params]
    with torch.enable_grad():
        loss = loss_fn(leaves)
        if loss.ndim != 0:
            raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
        grads = torch.autograd.grad(loss, leaves, create_graph=create_graph, allow_unused=True, materialize_grads=True)
    return leaves, list(grads)


def gradient(loss_fn: LossFn, params: Sequence[Tensor]) -> list[Tensor]:
    """:math:`\\nabla f` at ``params`` (detached from any graph)."""
    return _gradient(loss_fn, params, create_graph=False)[1]


def gradient_graph(loss_fn: LossFn, params: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """The leaves (``params`` detached, requiring grad) and :math:`\\nabla f` at them with its graph, to be
    differentiated again: one forward and backward pass serves any number of Hessian-vector products
    ``torch.autograd.grad(grads, leaves, v, retain_graph=True)``."""
    return _gradient(loss_fn, params, create_graph=True)


def hvp_double_backward(loss_fn: LossFn, params: Sequence[Tensor], vector: Sequence[Tensor]) -> list[Tensor]:
    r"""Reverse-over-reverse: :math:`Hv = \nabla_x (\nabla f(x)^\top v)`."""
    vector = check_like("vector", vector, params)
    leaves, grads = gradient_graph(loss_fn, params)
    with torch.enable_grad():
        return list(torch.autograd.grad(grads, leaves, vector, allow_unused=True, materialize_grads=True))


def hvp_forward_over_reverse(loss_fn: LossFn, params: Sequence[Tensor], vector: Sequence[Tensor]) -> list[Tensor]:
    r"""Forward-over-reverse: :math:`Hv = \frac{d}{dt} \nabla f(x + t v)\big|_{t=0}` by ``torch.func``.

    ``loss_fn`` must compute the loss from the tensors it receives (functional), since
    ``torch.func`` passes it dual tensors.
    """
    vector = check_like("vector", vector, params)
    primals = tuple(p.detach() for p in params)
    tangents = tuple(v.detach() for v in vector)

    def grad_fn(*xs: Tensor) -> tuple[Tensor, ...]:
        return tuple(torch.func.grad(lambda ys: loss_fn(list(ys)))(xs))

    _, product = torch.func.jvp(grad_fn, primals, tangents)  # type: ignore[misc]  # torch.func.jvp is annotated 2-or-3-tuple (no overload on has_aux)
    return list(product)


def default_fd_eps(params: Sequence[Tensor], vector: Sequence[Tensor]) -> float:
    r"""The default step of :func:`hvp_finite_difference`:

    .. math:: \epsilon = \sqrt{u}\,\frac{1 + \lVert x\rVert}{\lVert v\rVert},

    with :math:`u` the unit roundoff of the parameters' float type (``torch.finfo(dtype).eps``:
    2.2e-16 for float64, 1.2e-7 for float32). The forward difference has truncation error
    :math:`\tfrac{\epsilon}{2}\lVert \nabla^3 f[v, v]\rVert` and rounding error about
    :math:`u (\lVert\nabla f\rVert + \lVert H\rVert\lVert x\rVert)/\epsilon`; with third
    derivatives and gradients of the order of the curvature, the two balance at
    :math:`\epsilon \approx \sqrt{u}` relative to the size of the perturbed point, which gives
    this rule (the standard Jacobian-free Newton-Krylov choice; Knoll & Keyes 2004,
    J. Comput. Phys. 193; Nocedal & Wright 2006, Sec. 8.1). The relative error of the product
    is then :math:`O(\sqrt{u})`: about 1e-8 in float64, 3e-4 in float32.
    """
    u = torch.finfo(params[0].dtype).eps
    v_norm = float(norm(vector))
    if v_norm == 0:
        return math.sqrt(u)
    return math.sqrt(u) * (1.0 + float(norm([p.detach() for p in params]))) / v_norm


def hvp_finite_difference(
    loss_fn: LossFn,
    params: Sequence[Tensor],
    vector: Sequence[Tensor],
    eps: float | None = None,
    *,
    grad_at_params: Sequence[Tensor] | None = None,
) -> list[Tensor]:
    r"""Forward difference of gradients, :math:`(\nabla f(x + \epsilon v) - \nabla f(x)) / \epsilon`.

    ``eps=None`` uses :func:`default_fd_eps`. ``grad_at_params``, if given, is reused as
    :math:`\nabla f(x)` (saving one gradient).
    """
    vector = check_like("vector", vector, params)
    eps = default_fd_eps(params, vector) if eps is None else check_range("eps", eps, 0.0, low_open=True)
    base = gradient(loss_fn, params) if grad_at_params is None else list(grad_at_params)
    shifted_point = [p.detach() + eps * v for p, v in zip(params, vector)]
    shifted = gradient(loss_fn, shifted_point)
    return [(g1 - g0) / eps for g1, g0 in zip(shifted, base)]


def hvp(
    loss_fn: LossFn,
    params: Sequence[Tensor],
    vector: Sequence[Tensor],
    method: str = "double_backward",
    eps: float | None = None,
) -> list[Tensor]:
    """The Hessian-vector product of ``loss_fn`` at ``params`` with ``vector`` by ``method``
    (one of ``double_backward``, ``forward_over_reverse``, ``finite_difference``; ``eps``
    applies to the last only).

    Example::

        loss_fn, params = module_loss(model, F.mse_loss, x, y)
        Hv = hvp(loss_fn, params, [torch.randn_like(p) for p in params])
    """
    check_choice("method", method, METHODS)
    if method == "finite_difference":
        return hvp_finite_difference(loss_fn, params, vector, eps)
    if eps is not None:
        raise ValueError(f"eps applies to method='finite_difference' only, got method={method!r}")
    if method == "forward_over_reverse":
        return hvp_forward_over_reverse(loss_fn, params, vector)
    return hvp_double_backward(loss_fn, params, vector)
