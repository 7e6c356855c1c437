"""Adafactor: factored second-moment estimates, relative step sizes and update clipping."""

from __future__ import annotations

import math
from collections.abc import MutableMapping
from typing import Any

import torch
from torch import Tensor

from gradwise.optim.base import GradwiseOptimizer, ParamsT, maybe_negate, scalar_dtype, zeros_like
from gradwise.optim.description import Description, Preset, StateSize, numel
from gradwise.validation import check_range


def _adafactor_state(shape, options) -> StateSize:
    """Shazeer & Stern 2018 (arXiv:1804.04235): a tensor of two or more dimensions keeps a row
    and a column second moment over its last two dimensions (per leading index); a vector
    keeps a full one. Optional first moment (``beta1``). A step counter."""
    if len(shape) >= 2:
        *leading, rows, cols = shape
        second = math.prod(leading) * (rows + cols)
    else:
        second = numel(shape)
    first = numel(shape) if options.get("beta1") is not None else 0
    return StateSize(second + first, scalars=1)


class Adafactor(GradwiseOptimizer):
    r"""Adafactor (Shazeer & Stern 2018, "Adafactor: Adaptive Learning Rates with Sublinear
    Memory Cost", arXiv:1804.04235).

    For a matrix gradient :math:`G_t \in \mathbb{R}^{m\times n}` (the last two dimensions of a
    tensor with two or more) it keeps only row and column means of :math:`G^2`:

    .. math::
        \hat\beta_{2,t} = 1 - t^{c},\qquad
        R_t = \hat\beta_{2,t} R_{t-1} + (1-\hat\beta_{2,t})\,\operatorname{mean}_j G_t^2,\qquad
        C_t = \hat\beta_{2,t} C_{t-1} + (1-\hat\beta_{2,t})\,\operatorname{mean}_i G_t^2,\\
        \hat V_t = \frac{R_t C_t}{\operatorname{mean}_i R_t},\qquad
        U_t = \frac{G_t}{\sqrt{\max(\hat V_t, \epsilon_1^2)}},\qquad
        \hat U_t = \frac{U_t}{\max\big(1, \operatorname{RMS}(U_t)/d\big)},

    (vectors and scalars keep the full :math:`V_t`), then
    :math:`\theta_t = \theta_{t-1} - \alpha_t \hat U_t` with the relative step size
    :math:`\alpha_t = \max(\epsilon_2, \operatorname{RMS}(\theta_{t-1}))\,\min(\eta, 1/\sqrt t)`,
    or :math:`\alpha_t = \eta` with ``relative_step=False``. ``beta2_decay`` is :math:`c`
    (the paper's :math:`\hat\beta_{2,t} = 1 - t^{-0.8}` schedule), ``d`` the clipping
    threshold. ``beta1`` (off by default, as in the paper's memory-saving setting) adds
    momentum on the clipped update: :math:`M_t = \beta_1 M_{t-1} + (1-\beta_1)\hat U_t` is
    then the step. Decoupled weight decay shrinks :math:`\theta` by :math:`1-\eta\lambda`.

    Defaults, the update and the state layout (``row_var`` of shape ``(..., m, 1)``,
    ``col_var`` ``(..., 1, n)``, ``variance``, ``step``) are torch.optim.Adafactor's
    (``eps=(None, 1e-3)``: :math:`\epsilon_1` is the dtype's machine epsilon), so a torch
    checkpoint loads here. ``relative_step=False`` and ``beta1`` are the paper's options
    that torch does not have.

    State: :math:`m + n` values per :math:`m \times n` matrix (O(m + n) instead of Adam's
    O(mn); about 0.01 bytes per parameter for a 512 x 2048 fp32 matrix), a full
    :math:`V` (4 bytes per fp32 parameter) for vectors, plus :math:`M` (4 bytes) with
    ``beta1``.

    The relative step and the clipping read two norms per tensor; they are gathered with
    one ``torch._foreach_norm`` per list and read in one host transfer per step.

    Example::

        opt = gradwise.optim.Adafactor(model.parameters(), lr=1e-2)
        loss_fn(model(x), y).backward()
        opt.step(); opt.zero_grad()
    """

    _per_matrix = True

    description = Description(
        drive="step",
        sharding="tensor",  # row and column statistics need the whole tensor
        state=_adafactor_state,
        lr_range=(1e-4, 1.0),
        presets={
            "adafactor": Preset("Adafactor (relative step, update clipping)", train={}, race={}, lr_scale=15.0),
            "adafactor-momentum": Preset("Adafactor with a first moment (beta1 0.9)", {"beta1": 0.9}),
        },
    )

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-2,
        beta2_decay: float = -0.8,
        eps: tuple[float | None, float] = (None, 1e-3),
        d: float = 1.0,
        weight_decay: float = 0.0,
        *,
        beta1: float | None = None,
        relative_step: bool = True,
        foreach: bool | None = None,
        maximize: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            beta2_decay=beta2_decay,
            eps=eps,
            d=d,
            weight_decay=weight_decay,
            beta1=beta1,
            relative_step=relative_step,
            foreach=foreach,
            maximize=maximize,
        )
        super().__init__(params, defaults)

    def _validate(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        check_range("beta2_decay", group["beta2_decay"], high=0.0)
        eps = group["eps"]
        if not isinstance(eps, (tuple, list)) or len(eps) != 2:
            raise ValueError(f"eps must be a pair (eps1 or None, eps2), got {eps!r}")
        if eps[0] is not None:
            check_range("eps[0]", eps[0], 0.0)
        check_range("eps[1]", eps[1], 0.0)
        check_range("d", group["d"], 1.0)
        check_range("weight_decay", group["weight_decay"], 0.0)
        if group["beta1"] is not None:
            check_range("beta1", group["beta1"], 0.0, 1.0, high_open=True)

    def _init_state(self, param: Tensor) -> None:
        state = self.param_state(param)
        if "step" in state:
            return
        state["step"] = torch.zeros((), dtype=scalar_dtype())
        if param.ndim > 1:
            state["row_var"] = param.new_zeros(param.shape[:-1] + (1,))
            state["col_var"] = param.new_zeros(param.shape[:-2] + (1, param.shape[-1]))
        else:
            state["variance"] = zeros_like(param)

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        lr, weight_decay, beta1 = group["lr"], group["weight_decay"], group["beta1"]
        grads = maybe_negate(grads, group["maximize"])
        for param in params:
            self._init_state(param)
        steps = self._step_counters(params, on_device=False)
        torch._foreach_add_(steps, 1)
        counts = [step.item() for step in steps]
        # Relative step sizes need RMS(theta) before the decay and the update.
        param_norms = torch._foreach_norm(params) if group["relative_step"] else None
        if weight_decay != 0:
            torch._foreach_mul_(params, 1 - lr * weight_decay)

        eps1 = group["eps"][0]
        for param, grad, t in zip(params, grads, counts):
            _update_second_moment(self.param_state(param), grad, t ** group["beta2_decay"])
        # Whether the floor eps1^2 on R C / mean(R) binds anywhere in a matrix: one host
        # transfer for all of them. Where it does not, U is G scaled by rows and columns.
        floors = [
            _floor_binds(self.param_state(p), torch.finfo(p.dtype).eps if eps1 is None else eps1)
            for p in params
            if p.ndim == 2
        ]
        binds = iter(torch.stack(floors).tolist() if floors else [])
        updates, sqrt_means = [], []
        for param, grad in zip(params, grads):
            floor_binds = next(binds) if param.ndim == 2 else True
            update, sqrt_mean = _scaled_gradient(self.param_state(param), grad, eps1, floor_binds)
            updates.append(update)
            sqrt_means.append(sqrt_mean)
        # Clipping: U / max(1, RMS(U) / d). RMS of the factored U is sqrt(mean) * RMS(U').
        scalars = list(torch._foreach_norm(updates)) + sqrt_means + list(param_norms or [])
        # one host transfer for every norm of the step
        host = torch.stack([x.to(params[0].device, torch.float64).view(()) for x in scalars]).tolist()
        count = len(params)
        scales = []
        for index, (param, t) in enumerate(zip(params, counts)):
            numel_sqrt = math.sqrt(param.numel())
            sqrt_mean = host[count + index]
            rms_update = host[index] * sqrt_mean / numel_sqrt
            if group["relative_step"]:
                rms_param = host[2 * count + index] / numel_sqrt
                alpha = max(group["eps"][1], rms_param) * min(lr, 1 / math.sqrt(t))
            else:
                alpha = lr
            scales.append((alpha, sqrt_mean / max(1.0, rms_update / group["d"])))
        if beta1 is None:
            for param, update, (alpha, scale) in zip(params, updates, scales):
                param.add_(update, alpha=-alpha * scale)
            return
        for param, update, (alpha, scale) in zip(params, updates, scales):
            exp_avg = self._state(param, "exp_avg", zeros_like)
            exp_avg.mul_(beta1).add_(update, alpha=(1 - beta1) * scale)
            param.add_(exp_avg, alpha=-alpha)


def _update_second_moment(state: MutableMapping[str, Tensor], grad: Tensor, one_minus_beta2: float) -> None:
    """The running mean of G^2: full for vectors, row and column means for matrices."""
    if grad.ndim <= 1:
        state["variance"].lerp_(grad * grad, one_minus_beta2)
        return
    # mean of g^2 along a dimension, as a squared norm, without a g^2 temporary.
    row_mean = torch.linalg.vector_norm(grad, dim=-1, keepdim=True).square_().div_(grad.shape[-1])
    col_mean = torch.linalg.vector_norm(grad, dim=-2, keepdim=True).square_().div_(grad.shape[-2])
    state["row_var"].lerp_(row_mean, one_minus_beta2)
    state["col_var"].lerp_(col_mean, one_minus_beta2)


def _mean_row_var(state: MutableMapping[str, Tensor], eps1: float) -> Tensor:
    return state["row_var"].mean(dim=-2, keepdim=True).clamp_(min=eps1)


def _floor_binds(state: MutableMapping[str, Tensor], eps1: float) -> Tensor:
    """Whether min(R) min(C) / mean(R) < eps1^2 for a matrix (a bool tensor)."""
    row_var, col_var = state["row_var"], state["col_var"]
    return row_var.min() * col_var.min() < (eps1 * eps1) * _mean_row_var(state, eps1).view(())


def _scaled_gradient(
    state: MutableMapping[str, Tensor], grad: Tensor, eps1: float | None, floor_binds: bool
) -> tuple[Tensor, Tensor]:
    r"""``(U', s)`` with the unclipped update :math:`U = s U'` (``s`` a scalar tensor).

    For matrices :math:`\hat V = R C / \mu` with :math:`\mu = \operatorname{mean} R`. Where
    the floor does not bind, :math:`U = \sqrt\mu\, (G / \sqrt R) / \sqrt C`: two passes over
    the matrix, and :math:`\sqrt\mu` joins the step size. Otherwise
    :math:`U = \sqrt\mu\, G / \sqrt{\max(RC, \epsilon_1^2\mu)}`, elementwise.
    """
    if eps1 is None:
        eps1 = torch.finfo(grad.dtype).eps
    if grad.ndim <= 1:
        return state["variance"].clamp(min=eps1 * eps1).rsqrt_().mul_(grad), grad.new_ones(())
    row_var, col_var = state["row_var"], state["col_var"]
    row_mean = _mean_row_var(state, eps1)
    if grad.ndim > 2:
        # One mean per matrix of a batch: fold it into the row factor instead.
        denominator = (row_var / row_mean) * col_var
        return denominator.clamp_(min=eps1 * eps1).rsqrt_().mul_(grad), grad.new_ones(())
    if not floor_binds:
        return torch.mul(grad, row_var.rsqrt()).mul_(col_var.rsqrt()), row_mean.sqrt().view(())
    denominator = row_var * col_var
    denominator.clamp_(min=(eps1 * eps1) * row_mean).rsqrt_().mul_(grad)
    return denominator, row_mean.sqrt().view(())
