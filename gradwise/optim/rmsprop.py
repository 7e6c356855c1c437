"""RMSprop: steps scaled by a running root-mean-square of the gradients."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gradwise.optim.base import (
    GradwiseOptimizer,
    ParamsT,
    by_device_and_dtype,
    cache_blocks,
    maybe_negate,
    roots_to_edit,
    with_l2_penalty,
    zeros_like,
)
from gradwise.optim.description import Description, Preset, StateSize, numel
from gradwise.validation import check_range


def _rmsprop_state(shape, options) -> StateSize:
    """The square average, plus the gradient average when ``centered`` and a momentum buffer
    when ``momentum > 0``; a step counter."""
    buffers = 1 + bool(options.get("centered", False)) + (options.get("momentum", 0) > 0)
    return StateSize(buffers * numel(shape), scalars=1)


class RMSprop(GradwiseOptimizer):
    r"""RMSprop (Tieleman & Hinton 2012, Coursera lecture 6.5), with the centered variant
    of Graves (2013, arXiv:1308.0850) and optional momentum.

    With gradient :math:`g_t` (plus :math:`\lambda\theta_{t-1}` for weight decay) and
    smoothing constant :math:`\alpha`:

    .. math::
        v_t = \alpha v_{t-1} + (1-\alpha) g_t^2,\qquad
        \bar g_t = \alpha \bar g_{t-1} + (1-\alpha) g_t \ \text{(centered only)},\\
        d_t = \sqrt{v_t - \bar g_t^2} + \epsilon \ \text{(centered)}\quad\text{or}\quad
        \sqrt{v_t} + \epsilon,\\
        b_t = \mu b_{t-1} + g_t / d_t,\qquad \theta_t = \theta_{t-1} - \eta\, b_t
        \quad (\theta_t = \theta_{t-1} - \eta\, g_t/d_t \text{ when } \mu = 0).

    Same update and defaults as ``torch.optim.RMSprop``.

    State: :math:`v` (4 bytes per fp32 parameter), plus :math:`\bar g` when centered and
    :math:`b` when ``momentum > 0``, and a step counter. torch has no fused RMSprop kernel;
    this is the ``torch._foreach_*`` path.

    Example::

        opt = gradwise.optim.RMSprop(model.parameters(), lr=1e-3, centered=True)
        loss_fn(model(x), y).backward()
        opt.step(); opt.zero_grad()
    """

    description = Description(
        drive="step",
        sharding="element",
        state=_rmsprop_state,
        lr_range=(1e-4, 1.0),  # no bias correction: first steps are lr / sqrt(1 - alpha) = 10 lr
        presets={
            "rmsprop": Preset("RMSprop (alpha 0.99, no bias correction)", train={}, race={}, race_default=True),
            "rmsprop-centered": Preset("RMSprop, centered", {"centered": True}),
            "rmsprop-momentum": Preset("RMSprop, centered, momentum 0.9", {"centered": True, "momentum": 0.9}),
        },
    )

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            alpha=alpha,
            eps=eps,
            weight_decay=weight_decay,
            momentum=momentum,
            centered=centered,
            capturable=capturable,
            foreach=foreach,
            maximize=maximize,
            differentiable=differentiable,
        )
        super().__init__(params, defaults)

    def _validate(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        check_range("alpha", group["alpha"], 0.0, 1.0)
        check_range("eps", group["eps"], 0.0)
        check_range("weight_decay", group["weight_decay"], 0.0)
        check_range("momentum", group["momentum"], 0.0)

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        square_avgs = [self._state(p, "square_avg", zeros_like) for p in params]
        lists = [params, grads, square_avgs, self._step_counters(params, on_device=False)]
        if group["centered"]:
            lists.append([self._state(p, "grad_avg", zeros_like) for p in params])
        if group["momentum"] > 0:
            lists.append([self._state(p, "momentum_buffer", zeros_like) for p in params])
        for device_lists in by_device_and_dtype(*lists):
            self._foreach_update(group, *device_lists)

    @staticmethod
    def _foreach_update(
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        square_avgs: list[Tensor],
        steps: list[Tensor],
        *extra: list[Tensor],
    ) -> None:
        alpha, eps, lr = group["alpha"], group["eps"], group["lr"]
        torch._foreach_add_(steps, 1)
        for block_params, block_grads, block_squares, *extra_blocks in cache_blocks(params, grads, square_avgs, *extra):
            grad_avgs = extra_blocks.pop(0) if group["centered"] else None
            buffers = extra_blocks.pop(0) if group["momentum"] > 0 else None
            block_grads = maybe_negate(block_grads, group["maximize"])
            block_grads = with_l2_penalty(block_grads, block_params, group["weight_decay"])
            torch._foreach_mul_(block_squares, alpha)
            torch._foreach_addcmul_(block_squares, block_grads, block_grads, value=1 - alpha)
            if grad_avgs is not None:
                torch._foreach_lerp_(grad_avgs, block_grads, 1 - alpha)
                variances = torch._foreach_addcmul(block_squares, grad_avgs, grad_avgs, value=-1)
                denominators = roots_to_edit(variances, group["differentiable"])
            else:
                denominators = roots_to_edit(block_squares, group["differentiable"])
            torch._foreach_add_(denominators, eps)
            if buffers is not None:
                torch._foreach_mul_(buffers, group["momentum"])
                torch._foreach_addcdiv_(buffers, block_grads, denominators)
                torch._foreach_add_(block_params, buffers, alpha=-lr)
            else:
                torch._foreach_addcdiv_(block_params, block_grads, denominators, value=-lr)
