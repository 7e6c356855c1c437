"""Adagrad: per-coordinate step sizes from the sum of squared gradients."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gradwise.optim.base import (
    GradwiseOptimizer,
    ParamsT,
    addcdiv_scaled_,
    by_device_and_dtype,
    cache_blocks,
    check_state_shapes,
    fused_kernel_applies,
    fused_scaling,
    maybe_negate,
    roots_to_edit,
    scalar_values,
    undo_skipped_steps,
    with_l2_penalty,
)
from gradwise.optim.description import Description, Preset, moments
from gradwise.validation import check_range


class Adagrad(GradwiseOptimizer):
    r"""Adagrad (Duchi, Hazan & Singer 2011, JMLR 12; McMahan & Streeter 2010).

    With gradient :math:`g_t` (plus :math:`\lambda\theta_{t-1}` for weight decay):

    .. math::
        s_t = s_{t-1} + g_t^2,\qquad
        \eta_t = \frac{\eta}{1 + (t-1)\,\delta},\qquad
        \theta_t = \theta_{t-1} - \eta_t\,\frac{g_t}{\sqrt{s_t} + \epsilon}

    with :math:`s_0` = ``initial_accumulator_value`` and :math:`\delta` = ``lr_decay``.
    Same update and defaults as ``torch.optim.Adagrad``.

    State: the sum :math:`s` (4 bytes per fp32 parameter) and a step counter.

    By default (``fused=None``) dense, contiguous floating-point parameters on CPU or CUDA
    are updated by torch's fused Adagrad kernel, which computes exactly this update;
    ``fused=False`` uses the ``torch._foreach_*`` path, ``foreach=False`` torch's
    single-tensor path. Sparse gradients are supported (without weight decay), as in torch.

    Example::

        opt = gradwise.optim.Adagrad(model.parameters(), lr=0.01)
        loss_fn(model(x), y).backward()
        opt.step(); opt.zero_grad()
    """

    description = Description(
        drive="step",
        sharding="element",
        state=moments(1, scalars=1),  # sum of squares; step
        lr_range=(10**-2.5, 10**1.5),  # steps shrink like lr / sqrt(t): larger rates than Adam's
        presets={"adagrad": Preset("Adagrad", train={}, race={}, race_default=True)},
    )

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-2,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            lr_decay=lr_decay,
            weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value,
            eps=eps,
            foreach=foreach,
            maximize=maximize,
            differentiable=differentiable,
            fused=fused,
        )
        super().__init__(params, defaults)

    def _validate(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        check_range("lr_decay", group["lr_decay"], 0.0)
        check_range("weight_decay", group["weight_decay"], 0.0)
        check_range("initial_accumulator_value", group["initial_accumulator_value"], 0.0)
        check_range("eps", group["eps"], 0.0)

    def _sums(self, group: dict[str, Any], params: list[Tensor]) -> list[Tensor]:
        initial = group["initial_accumulator_value"]
        return [self._state(p, "sum", lambda p: torch.full_like(p, initial)) for p in params]

    def _sparse_update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        """Sparse gradients (an ``nn.Embedding(sparse=True)``), as torch supports them: only
        the accumulator entries and parameter rows present in the gradient change. Weight
        decay would make the gradient dense, so it is refused (as torch refuses it)."""
        if group["weight_decay"] != 0:
            raise RuntimeError(
                f"Adagrad: weight_decay={group['weight_decay']!r} is not compatible with sparse gradients"
            )
        sums = self._sums(group, params)
        steps = self._step_counters(params, on_device=False)
        torch._foreach_add_(steps, 1)
        for param, grad, accumulated, step in zip(params, grads, sums, steps):
            grad = (-grad if group["maximize"] else grad).coalesce()
            indices, values = grad._indices(), grad._values()
            accumulated.add_(torch.sparse_coo_tensor(indices, values.pow(2), grad.shape))
            scale = accumulated.sparse_mask(grad)._values().sqrt_().add_(group["eps"])
            step_size = group["lr"] / (1 + (step.item() - 1) * group["lr_decay"])
            param.add_(torch.sparse_coo_tensor(indices, values / scale, grad.shape), alpha=-step_size)

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        sums = self._sums(group, params)
        fused = fused_kernel_applies(group, params, "Adagrad")
        if fused:
            check_state_shapes("Adagrad", params, sums)
        steps = self._step_counters(params, on_device=fused or group.get("capturable", False))
        for device_lists in by_device_and_dtype(params, grads, sums, steps):
            if fused:
                self._fused_update(group, *device_lists)
            else:
                self._foreach_update(group, *device_lists)

    @staticmethod
    def _foreach_update(
        group: dict[str, Any], params: list[Tensor], grads: list[Tensor], sums: list[Tensor], steps: list[Tensor]
    ) -> None:
        torch._foreach_add_(steps, 1)
        lr, lr_decay = group["lr"], group["lr_decay"]
        minus_step_sizes = [-lr / (1 + (t - 1) * lr_decay) for t in scalar_values(steps, group)]
        for block_params, block_grads, block_sums, block_steps in cache_blocks(params, grads, sums, minus_step_sizes):
            block_grads = maybe_negate(block_grads, group["maximize"])
            block_grads = with_l2_penalty(block_grads, block_params, group["weight_decay"])
            torch._foreach_addcmul_(block_sums, block_grads, block_grads, value=1)
            denominators = roots_to_edit(block_sums, group["differentiable"])
            torch._foreach_add_(denominators, group["eps"])
            addcdiv_scaled_(block_params, block_grads, denominators, block_steps)

    @staticmethod
    @torch._disable_dynamo
    def _fused_update(
        group: dict[str, Any], params: list[Tensor], grads: list[Tensor], sums: list[Tensor], steps: list[Tensor]
    ) -> None:
        torch._foreach_add_(steps, 1)
        torch._fused_adagrad_(
            params,
            grads,
            sums,
            steps,
            lr=group["lr"],
            lr_decay=group["lr_decay"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
            **fused_scaling(group),
        )
        undo_skipped_steps(steps, group)
