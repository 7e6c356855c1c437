"""NAdam: Adam with Nesterov momentum and a momentum-decay schedule."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gradwise.optim.adam import update_moments
from gradwise.optim.base import (
    GradwiseOptimizer,
    ParamsT,
    addcdiv_scaled_,
    apply_weight_decay,
    by_device_and_dtype,
    cache_blocks,
    maybe_negate,
    roots_to_edit,
    scalar_dtype,
    scalar_values,
    zeros_like,
)
from gradwise.optim.description import Description, Preset, moments
from gradwise.validation import check_betas, check_range


class NAdam(GradwiseOptimizer):
    r"""NAdam (Dozat 2016, "Incorporating Nesterov Momentum into Adam", ICLR workshop).

    With gradient :math:`g_t` (plus :math:`\lambda\theta_{t-1}` for coupled L2 decay, or a
    shrink of :math:`\theta_{t-1}` by :math:`1-\eta\lambda` when decoupled) and momentum
    schedule :math:`\mu_t = \beta_1 (1 - \tfrac12\, 0.96^{t\psi})` (:math:`\psi` =
    ``momentum_decay``):

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\qquad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\qquad
        d_t = \sqrt{v_t / (1-\beta_2^t)} + \epsilon,\\
        \theta_t = \theta_{t-1}
            - \eta\,\frac{1-\mu_t}{1-\prod_{i\le t}\mu_i}\,\frac{g_t}{d_t}
            - \eta\,\frac{\mu_{t+1}}{1-\prod_{i\le t+1}\mu_i}\,\frac{m_t}{d_t}.

    Same update and defaults as ``torch.optim.NAdam``.

    State: :math:`m`, :math:`v` (8 bytes per fp32 parameter), the running product of
    :math:`\mu` and a step counter. torch has no fused NAdam kernel; this is the
    ``torch._foreach_*`` path.

    Example::

        opt = gradwise.optim.NAdam(model.parameters(), lr=2e-3)
        loss_fn(model(x), y).backward()
        opt.step(); opt.zero_grad()
    """

    description = Description(
        drive="step",
        sharding="element",
        state=moments(2, scalars=2),  # moments; step and the product of the mu_t
        lr_range=(1e-3, 10.0),
        presets={"nadam": Preset("NAdam (Adam with Nesterov momentum)", train={}, race={})},
    )

    def __init__(
        self,
        params: ParamsT,
        lr: float = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum_decay: float = 4e-3,
        decoupled_weight_decay: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            momentum_decay=momentum_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
        )
        super().__init__(params, defaults)

    _scalar_state_keys = ("mu_product",)

    def _validate(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        check_betas("betas", group["betas"])
        check_range("eps", group["eps"], 0.0)
        check_range("weight_decay", group["weight_decay"], 0.0)
        check_range("momentum_decay", group["momentum_decay"], 0.0)

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        lists = (
            params,
            grads,
            [self._state(p, "exp_avg", zeros_like) for p in params],
            [self._state(p, "exp_avg_sq", zeros_like) for p in params],
            [self._state(p, "mu_product", lambda p: torch.ones((), dtype=scalar_dtype())) for p in params],
            self._step_counters(params, on_device=False),
        )
        for device_lists in by_device_and_dtype(*lists):
            self._foreach_update(group, *device_lists)

    @staticmethod
    def _foreach_update(
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        mu_products: list[Tensor],
        steps: list[Tensor],
    ) -> None:
        lr, (beta1, beta2), weight_decay = group["lr"], group["betas"], group["weight_decay"]
        psi = group["momentum_decay"]
        torch._foreach_add_(steps, 1)
        counts = scalar_values(steps, group)
        mus = [beta1 * (1.0 - 0.5 * 0.96 ** (t * psi)) for t in counts]
        next_mus = [beta1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * psi)) for t in counts]
        torch._foreach_mul_(mu_products, mus)
        products = scalar_values(mu_products, group)
        bias_correction2_sqrts = [(1 - beta2**t) ** 0.5 for t in counts]
        grad_step_sizes = [-lr * (1 - mu) / (1 - product) for mu, product in zip(mus, products)]
        momentum_step_sizes = [
            -lr * next_mu / (1 - product * next_mu) for next_mu, product in zip(next_mus, products)
        ]
        blocks = cache_blocks(
            params, grads, exp_avgs, exp_avg_sqs, bias_correction2_sqrts, grad_step_sizes, momentum_step_sizes
        )
        for (
            params, grads, exp_avgs, exp_avg_sqs, bias_correction2_sqrts, grad_step_sizes, momentum_step_sizes
        ) in blocks:
            grads = maybe_negate(grads, group["maximize"])
            grads = apply_weight_decay(params, grads, lr, weight_decay, group["decoupled_weight_decay"])
            update_moments(exp_avgs, exp_avg_sqs, grads, beta1, beta2)
            denominators = roots_to_edit(exp_avg_sqs, group["differentiable"])
            torch._foreach_div_(denominators, bias_correction2_sqrts)
            torch._foreach_add_(denominators, group["eps"])
            addcdiv_scaled_(params, grads, denominators, grad_step_sizes)
            addcdiv_scaled_(params, exp_avgs, denominators, momentum_step_sizes)
