r"""SVRG: stochastic variance-reduced gradient with a snapshot full gradient."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gradwise.optim.base import GradwiseOptimizer, ParamsT, lr_value
from gradwise.optim.description import Description, Preset, moments
from gradwise.validation import check_range

Closure = Callable[[], Any]


def gradients_of(closure: Closure, params: list[Tensor]) -> tuple[Any, list[Tensor]]:
    """Run a torch-style ``closure`` (zero grads, loss, ``backward()``) and copy the gradients."""
    for p in params:
        p.grad = None
    with torch.enable_grad():
        loss = closure()
    grads = []
    for p in params:
        if p.grad is not None and p.grad.is_sparse:
            raise RuntimeError("sparse gradients are not supported")
        grads.append(torch.zeros_like(p) if p.grad is None else p.grad.detach().clone())
    return loss, grads


class SVRG(GradwiseOptimizer):
    r"""Stochastic variance-reduced gradient (Johnson & Zhang 2013, NeurIPS).

    For :math:`F(x) = \frac1n\sum_i f_i(x)`, a snapshot :math:`\tilde x` with its full
    gradient :math:`\mu = \nabla F(\tilde x)` is taken (typically once per epoch,
    :meth:`update_snapshot`); each step then samples a batch :math:`B` and moves along

    .. math:: v = \nabla f_B(x) - \nabla f_B(\tilde x) + \mu,\qquad x \leftarrow x - \eta v,

    an unbiased gradient estimate whose variance vanishes as :math:`x, \tilde x \to x^*`, so a
    constant step converges linearly on strongly convex sums (step about :math:`1/(10L)` in
    the analysis; larger works in practice).

    API: ``update_snapshot(full_closure)`` with a closure that computes the full objective
    (or the mean of all per-example losses) and calls ``backward()``; then
    ``step(closure)`` with a closure that computes the loss of one batch (the same batch each
    time it is called within the step) and calls ``backward()``: the optimizer calls it twice,
    at :math:`x` and at :math:`\tilde x`. Cost: one full gradient per snapshot and two batch
    gradients per step. After a step, ``.grad`` holds :math:`v`. State: :math:`\tilde x` and
    :math:`\mu` (two copies of the parameters).

    Example::

        opt = gradwise.optim.SVRG(model.parameters(), lr=0.1)
        for epoch in range(epochs):
            opt.update_snapshot(full_loss_closure)
            for xb, yb in loader:
                opt.step(lambda: batch_loss_closure(xb, yb))
    """

    description = Description(
        drive="snapshot_closure",
        sharding=None,
        state=moments(2),  # the snapshot and its full gradient (Johnson & Zhang 2013)
        presets={"svrg": Preset("SVRG (stochastic variance-reduced gradient)", train={}, lr_scale=30.0)},
    )

    def __init__(self, params: ParamsT, lr: float = 0.01) -> None:
        super().__init__(params, dict(lr=lr))

    def _validate(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def update_snapshot(self, full_closure: Closure) -> Any:
        r"""Take :math:`\tilde x = x` and :math:`\mu = \nabla F(\tilde x)` from ``full_closure``; returns its loss."""
        params = self._params()
        loss, grads = gradients_of(full_closure, params)
        for p, g in zip(params, grads):
            self.state[p]["snapshot"] = p.detach().clone()
            self.state[p]["snapshot_grad"] = g
        return loss

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Any:
        """One variance-reduced step on the batch that ``closure`` evaluates."""
        if closure is None:
            raise RuntimeError("SVRG.step needs a closure that computes one batch's loss and calls backward()")
        params = self._params()
        if any("snapshot" not in self.state[p] for p in params):
            raise RuntimeError("SVRG needs a snapshot first: call update_snapshot(full_closure)")
        loss, grads_now = gradients_of(closure, params)
        current = [p.detach().clone() for p in params]
        torch._foreach_copy_(params, [self.state[p]["snapshot"] for p in params])
        _, grads_then = gradients_of(closure, params)
        torch._foreach_copy_(params, current)
        estimate = torch._foreach_sub(grads_now, grads_then)
        torch._foreach_add_(estimate, [self.state[p]["snapshot_grad"] for p in params])
        for p, v in zip(params, estimate):
            p.grad = v
        for group in self.param_groups:
            torch._foreach_add_(group["params"], [p.grad for p in group["params"]], alpha=-lr_value(group))
        return loss
