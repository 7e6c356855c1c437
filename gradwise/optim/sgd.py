"""Stochastic gradient descent with momentum, dampening, Nesterov and weight decay."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gradwise.optim.base import (
    GradwiseOptimizer,
    ParamsT,
    by_device_and_dtype,
    cache_blocks,
    cautious_updates,
    check_state_shapes,
    fused_kernel_applies,
    fused_scaling,
    maybe_negate,
    with_l2_penalty,
)
from gradwise.optim.description import Description, Preset, StateSize, moment_buffers
from gradwise.optim.state_formats import MOMENTUM_STATE_FORMATS
from gradwise.validation import check_range


def _sgd_state(shape, options) -> StateSize:
    """A momentum buffer when ``momentum`` is nonzero; nothing otherwise."""
    return moment_buffers(shape, signed=1 if options.get("momentum", 0) != 0 else 0)


class SGD(GradwiseOptimizer):
    r"""Stochastic gradient descent (Robbins & Monro 1951), with heavy-ball momentum
    (Polyak 1964) or Nesterov momentum (Nesterov 1983; Sutskever et al. 2013).

    With gradient :math:`g_t` (plus :math:`\lambda\theta_{t-1}` for weight decay), momentum
    :math:`\mu` and dampening :math:`\tau`:

    .. math::
        b_1 = g_1,\qquad b_t = \mu\, b_{t-1} + (1-\tau)\, g_t,\qquad
        \theta_t = \theta_{t-1} - \eta\,\begin{cases}
            g_t + \mu\, b_t & \text{Nesterov}\\ b_t & \text{otherwise}\end{cases}

    and :math:`\theta_t = \theta_{t-1} - \eta g_t` when :math:`\mu = 0`. This is the same
    update as ``torch.optim.SGD`` (the form of Sutskever et al., with the learning rate
    outside the buffer), and its defaults.

    State: one buffer per parameter (4 bytes per fp32 parameter) when ``momentum > 0``,
    none otherwise.

    By default (``fused=None``) dense, contiguous floating-point parameters on CPU or CUDA
    are updated by torch's fused SGD kernel, which computes exactly this update;
    ``fused=False`` uses the ``torch._foreach_*`` path, ``foreach=False`` torch's
    single-tensor path. Sparse gradients are supported, as in torch.

    ``cautious=True`` (with ``momentum > 0``; Liang et al. 2024, arXiv:2411.16085) zeroes the
    coordinates of the step (:math:`b_t`, or the Nesterov direction) whose sign disagrees with
    :math:`g_t` and rescales the rest (:func:`~gradwise.optim.base.cautious_updates`), on the
    foreach path; weight decay enters :math:`g_t` before the mask, as it does the momentum.

    ``state_format`` stores the moments in fewer bits (``"bf16"``, ``"bf16-sr"``, ``"8bit"``;
    default ``"fp32"``, torch's rule; see :mod:`gradwise.optim.state_formats`): the momentum buffer, signed.
    ``param_rounding`` (``"stochastic"`` or ``"kahan"``; default ``"nearest"``, torch's rule) steps
    bf16 parameters in float32 and stores them back by stochastic rounding or with a bf16 Kahan
    compensation (:mod:`gradwise.optim.param_rounding`), for pure-bf16 training.

    Example::

        opt = gradwise.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
        loss_fn(model(x), y).backward()
        opt.step(); opt.zero_grad()
    """

    _formatted_state = {"momentum_buffer": True}
    _state_formats = MOMENTUM_STATE_FORMATS

    description = Description(
        drive="step",
        sharding="element",
        state=_sgd_state,
        # steps of lr * gradient: the best rate is about 1 / L, from about 1e-3 on Rosenbrock's
        # valley to 1 on the unit-scale quadratic
        lr_range=(10**-3.5, 10**0.5),
        presets={
            "sgd": Preset("gradient descent", train={}, race={}, race_default=True),
            "momentum": Preset(
                "SGD with heavy-ball momentum 0.9", {"momentum": 0.9}, train={}, race={}, race_default=True
            ),
            "nesterov": Preset(
                "SGD with Nesterov momentum 0.9",
                {"momentum": 0.9, "nesterov": True},
                train={},
                race={},
                race_default=True,
            ),
            "momentum-cautious": Preset(
                "SGD with heavy-ball momentum 0.9, cautious (Liang et al. 2024)",
                {"momentum": 0.9, "cautious": True},
                train={},
                race={},
            ),
        },
    )

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        cautious: bool = False,
        state_format: str = "fp32",
        param_rounding: str = "nearest",
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
            differentiable=differentiable,
            fused=fused,
            cautious=cautious,
            state_format=state_format,
            param_rounding=param_rounding,
        )
        super().__init__(params, defaults)

    def _validate(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        check_range("momentum", group["momentum"], 0.0)
        check_range("dampening", group["dampening"], 0.0, 1.0)
        check_range("weight_decay", group["weight_decay"], 0.0)
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(
                "nesterov=True requires momentum > 0 and dampening = 0, got "
                f"momentum={group['momentum']!r}, dampening={group['dampening']!r}"
            )
        if group.get("cautious") and group["momentum"] <= 0:
            raise ValueError(
                f"cautious=True masks a momentum update: it requires momentum > 0, got {group['momentum']!r}"
            )

    def _sparse_update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        """Sparse gradients (an ``nn.Embedding(sparse=True)``), the same update one tensor at
        a time, as torch computes it: without momentum or weight decay only the rows present
        in the gradient move; the momentum buffer is itself sparse (rows ever seen); weight
        decay adds the dense parameter, so the step becomes dense (torch's SGD raises there)."""
        if group.get("cautious"):
            raise RuntimeError("SGD(cautious=True) does not support sparse gradients")
        momentum, dampening = group["momentum"], group["dampening"]
        for param, grad in zip(params, grads):
            grad = -grad if group["maximize"] else grad
            if group["weight_decay"] != 0:
                grad = (param * group["weight_decay"]).add(grad)  # dense: torch's order raises here
            if momentum != 0:
                state = self.param_state(param)
                buffer = state.get("momentum_buffer")
                if buffer is None:
                    buffer = state["momentum_buffer"] = grad.clone().detach()
                else:
                    buffer.mul_(momentum).add_(grad, alpha=1 - dampening)
                grad = grad.add(buffer, alpha=momentum) if group["nesterov"] else buffer
            param.add_(grad, alpha=-group["lr"])

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        # Without momentum there is no state: torch keeps no entry for such a parameter.
        buffers = [self.param_state(p).get("momentum_buffer") for p in params] if group["momentum"] else []
        if fused_kernel_applies(group, params, "SGD", cpu_dtypes=(torch.float32, torch.float64)):
            self._fused_update(group, params, grads, buffers)
            return
        if group["momentum"] == 0:
            for device_params, device_grads in by_device_and_dtype(params, grads):
                self._foreach_update(group, device_params, device_grads, [], [])
            return
        fresh = [buffer is None for buffer in buffers]
        for i, param in enumerate(params):
            if fresh[i]:
                buffers[i] = self.param_state(param)["momentum_buffer"] = torch.empty_like(param)
        for device_lists in by_device_and_dtype(params, grads, buffers, fresh):
            self._foreach_update(group, *device_lists)

    @staticmethod
    def _foreach_update(
        group: dict[str, Any], params: list[Tensor], grads: list[Tensor], buffers: list[Tensor], fresh: list[bool]
    ) -> None:
        """``fresh`` marks buffers created this step, which start as b_1 = g_1."""
        momentum, dampening = group["momentum"], group["dampening"]
        columns = (params, grads, buffers, fresh) if momentum != 0 else (params, grads)
        for params, grads, *momentum_columns in cache_blocks(*columns, whole_tensors=group.get("cautious", False)):
            grads = maybe_negate(grads, group["maximize"])
            grads = with_l2_penalty(grads, params, group["weight_decay"])
            direction: list[Tensor] | tuple[Tensor, ...] = grads
            if momentum_columns:
                buffers, fresh = momentum_columns
                new = [i for i, is_new in enumerate(fresh) if is_new]
                old = [i for i, is_new in enumerate(fresh) if not is_new]
                for i in new:  # first step only; a loop because DTensor has no foreach copy
                    buffers[i].copy_(grads[i])
                if old:
                    old_buffers = [buffers[i] for i in old]
                    torch._foreach_mul_(old_buffers, momentum)
                    torch._foreach_add_(old_buffers, [grads[i] for i in old], alpha=1 - dampening)
                if group["nesterov"]:
                    direction = torch._foreach_add(grads, buffers, alpha=momentum)
                else:
                    direction = buffers
                if group.get("cautious"):
                    direction = cautious_updates(direction, grads)
            torch._foreach_add_(params, direction, alpha=-group["lr"])

    def _fused_update(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], buffers: list
    ) -> None:
        """torch's fused kernel; parameters without a buffer yet take the b_1 = g_1 branch."""
        if group["momentum"] == 0:
            self._fused_call(group, params, grads, [], first_step=False)
            return
        new = [i for i, buffer in enumerate(buffers) if buffer is None]
        old = [i for i, buffer in enumerate(buffers) if buffer is not None]
        check_state_shapes("SGD", [params[i] for i in old], [buffers[i] for i in old])
        for i in new:
            buffers[i] = self.param_state(params[i])["momentum_buffer"] = torch.empty_like(params[i])
        for indices, first_step in ((new, True), (old, False)):
            if indices:
                self._fused_call(
                    group,
                    [params[i] for i in indices],
                    [grads[i] for i in indices],
                    [buffers[i] for i in indices],
                    first_step,
                )

    @staticmethod
    def _fused_call(
        group: dict[str, Any], params: list[Tensor], grads: list[Tensor], buffers: list[Tensor], first_step: bool
    ) -> None:
        lists = (params, grads, buffers) if buffers else (params, grads)
        for device_lists in by_device_and_dtype(*lists):
            torch._fused_sgd_(
                device_lists[0],
                device_lists[1],
                device_lists[2] if buffers else [],
                weight_decay=group["weight_decay"],
                momentum=group["momentum"],
                lr=group["lr"],
                dampening=group["dampening"],
                nesterov=group["nesterov"],
                maximize=group["maximize"],
                is_first_step=first_step,
                **fused_scaling(group),
            )
