"""AdEMAMix: Adam whose numerator mixes a fast and a slow exponential moving average."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from gradwise.optim.base import (
    GradwiseOptimizer,
    ParamsT,
    apply_weight_decay,
    by_device_and_dtype,
    cache_blocks,
    cautious_updates,
    mars_buffers,
    maybe_negate,
    roots_to_edit,
    scalar_values,
    zeros_like,
)
from gradwise.optim.description import Description, Preset, StateSize, numel
from gradwise.validation import check_int, check_range


def _ademamix_state(shape, options) -> StateSize:
    """Three buffers (fast EMA, slow EMA, second moment; a fourth with MARS: the previous
    gradient) and a step counter."""
    return StateSize((3 + mars_buffers(options)) * numel(shape), scalars=1)


def alpha_schedule(step: Any, alpha: float, warmup: int | None) -> Any:
    r"""The paper's :math:`\alpha(t) = \min(t\alpha / T_{\alpha}, \alpha)`: a linear warmup of the
    slow EMA's weight (``alpha`` when ``warmup`` is None). ``step`` is a number or a 0-d tensor."""
    if warmup is None:
        return alpha
    ramp = step * alpha / warmup
    return ramp.clamp(max=alpha) if isinstance(ramp, Tensor) else min(ramp, alpha)


def beta3_schedule(step: Any, beta1: float, beta3: float, warmup: int | None) -> Any:
    r"""The paper's :math:`\beta_3(t)`, from :math:`\beta_{start} = \beta_1` up to :math:`\beta_3`
    over ``warmup`` steps, linear in the half-life-like :math:`1/\ln\beta` (so the slow EMA's
    memory grows steadily rather than jumping to thousands of steps at once):

    .. math:: \beta_3(t) = \min\Big(\exp\frac{\ln\beta_1\,\ln\beta_3}
              {(1 - t/T)\ln\beta_3 + (t/T)\ln\beta_1},\ \beta_3\Big).

    ``beta3`` when ``warmup`` is None. ``step`` is a number or a 0-d tensor."""
    if warmup is None:
        return beta3
    log1, log3 = math.log(beta1), math.log(beta3)
    fraction = step / warmup
    exponent = log1 * log3 / ((1 - fraction) * log3 + fraction * log1)
    if isinstance(exponent, Tensor):
        return exponent.exp().clamp(max=beta3)
    return min(math.exp(exponent), beta3)


class AdEMAMix(GradwiseOptimizer):
    r"""AdEMAMix (Pagliardini, Ablin & Grangier 2024, "The AdEMAMix Optimizer: Better, Faster,
    Older", arXiv:2409.03137, Algorithm 1).

    Adam's single EMA of the gradient must choose between reacting fast (small
    :math:`\beta_1`) and remembering old gradients (large); AdEMAMix keeps both and adds a
    slow EMA (:math:`\beta_3` about 0.9999: a memory of some 10,000 steps) to Adam's fast one:

    .. math::
        m_1 &= \beta_1 m_1 + (1-\beta_1) g_t,\qquad
        m_2 = \beta_3(t)\, m_2 + (1-\beta_3(t))\, g_t,\qquad
        \nu = \beta_2 \nu + (1-\beta_2) g_t^2,\\
        \theta_t &= \theta_{t-1} - \eta\Big(\frac{m_1/(1-\beta_1^t) + \alpha(t)\, m_2}
            {\sqrt{\nu/(1-\beta_2^t)} + \epsilon} + \lambda\,\theta_{t-1}\Big).

    The slow EMA is not bias corrected (the paper's choice: early on it is small, which acts
    as a warmup of its weight). With ``t_alpha_beta3`` = :math:`T`, :math:`\alpha(t)` and
    :math:`\beta_3(t)` warm up over :math:`T` steps (:func:`alpha_schedule`,
    :func:`beta3_schedule`); the paper sets :math:`T` to the length of the run and finds the
    warmup needed for large :math:`\beta_3` (without it early slow-EMA updates destabilise
    training). Weight decay is decoupled, as in AdamW (:math:`\lambda` = ``weight_decay``).

    Defaults: ``betas=(0.9, 0.999, 0.9999)``, ``alpha=5.0``, ``eps=1e-8`` from the paper
    (it uses :math:`\alpha` between 4 and 10) and pytorch_optimizer's ``AdEMAMix``; ``lr=1e-3``
    and no weight decay, as Adam.

    Agreement with pytorch_optimizer's ``AdEMAMix`` (``weight_decouple=True``): the same
    update and schedules (tests/test_ademamix.py compares 150 steps). Differences: its
    ``t_alpha_beta3`` counts one step per param group, here each parameter counts its own steps
    (as Adam's step counters), which differ only for a parameter that skipped steps; its
    ``cautious=True`` masks the fast EMA alone, here (the paper's rule) the whole update
    :math:`m_1/(1-\beta_1^t) + \alpha(t) m_2` is masked where its sign disagrees with
    :math:`g_t`. ``mars_gamma`` feeds MARS's variance-reduced gradient to all three moments.

    State: :math:`m_1, m_2, \nu` (12 bytes per fp32 parameter, 4 more than Adam's) and a step
    counter; 16 bytes with ``mars_gamma``.

    Runs on ``torch._foreach_*`` lists, block by block on a CPU (:func:`~gradwise.optim.base.cache_blocks`;
    ``foreach=False``: one tensor at a time).

    Example::

        opt = gradwise.optim.AdEMAMix(model.parameters(), lr=1e-3, alpha=5.0, t_alpha_beta3=total_steps)
        loss_fn(model(x), y).backward()
        opt.step(); opt.zero_grad()
    """

    description = Description(
        drive="step",
        sharding="element",
        state=_ademamix_state,
        lr_range=(1e-3, 10.0),  # Adam's: the same normalised step, plus alpha times a bounded slow EMA
        presets={
            # short runs: beta3 0.999 (a memory of ~1,000 steps, not the paper's 10,000 for runs of
            # 100k+ steps) warmed up over 1,000 steps, GPT-style beta2
            "ademamix": Preset(
                "AdEMAMix (fast and slow EMAs mixed)",
                train={"betas": (0.9, 0.95, 0.999), "alpha": 5.0, "t_alpha_beta3": 1000},
                race={},
            ),
            "ademamix-cautious": Preset(
                "cautious AdEMAMix (Liang et al. 2024)",
                {"cautious": True},
                train={"betas": (0.9, 0.95, 0.999), "alpha": 5.0, "t_alpha_beta3": 1000},
                race={},
            ),
        },
    )

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
        alpha: float = 5.0,
        t_alpha_beta3: int | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        cautious: bool = False,
        mars_gamma: float | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            alpha=alpha,
            t_alpha_beta3=t_alpha_beta3,
            eps=eps,
            weight_decay=weight_decay,
            foreach=foreach,
            maximize=maximize,
            cautious=cautious,
            mars_gamma=mars_gamma,
        )
        super().__init__(params, defaults)

    def _validate(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 3:
            raise ValueError(f"betas must be three numbers (beta1, beta2, beta3), got {betas!r}")
        for name, beta in zip(("beta1", "beta2", "beta3"), betas):
            check_range(f"betas: {name}", beta, 0.0, 1.0, high_open=True)
        check_range("alpha", group["alpha"], 0.0)
        check_range("eps", group["eps"], 0.0)
        check_range("weight_decay", group["weight_decay"], 0.0)
        if group["t_alpha_beta3"] is not None:
            check_int("t_alpha_beta3", group["t_alpha_beta3"], 1)
            beta1, _, beta3 = betas
            if not 0 < beta1 <= beta3:
                raise ValueError(
                    "t_alpha_beta3 warms beta3 up from beta1: it needs 0 < beta1 <= beta3, got "
                    f"betas={tuple(betas)!r}"
                )

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        lists = (
            params,
            grads,
            [self._state(p, "exp_avg", zeros_like) for p in params],
            [self._state(p, "exp_avg_slow", zeros_like) for p in params],
            [self._state(p, "exp_avg_sq", zeros_like) for p in params],
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
        exp_avg_slows: list[Tensor],
        exp_avg_sqs: list[Tensor],
        steps: list[Tensor],
    ) -> None:
        lr, (beta1, beta2, beta3), warmup = group["lr"], group["betas"], group["t_alpha_beta3"]
        torch._foreach_add_(steps, 1)
        counts = scalar_values(steps, group)
        alphas = [alpha_schedule(t, group["alpha"], warmup) for t in counts]
        slow_weights = [1 - beta3_schedule(t, beta1, beta3, warmup) for t in counts]
        bias_corrections1 = [1 - beta1**t for t in counts]
        bias_correction2_sqrts = [(1 - beta2**t) ** 0.5 for t in counts]

        columns = (params, grads, exp_avgs, exp_avg_slows, exp_avg_sqs, alphas, slow_weights, bias_corrections1,
                   bias_correction2_sqrts)
        for (params, grads, exp_avgs, exp_avg_slows, exp_avg_sqs, alphas, slow_weights, bias_corrections1,
             bias_correction2_sqrts) in cache_blocks(*columns, whole_tensors=group["cautious"]):
            grads = maybe_negate(grads, group["maximize"])
            apply_weight_decay(params, grads, lr, group["weight_decay"], decoupled=True)
            torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
            torch._foreach_lerp_(exp_avg_slows, grads, slow_weights)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)

            denominators = roots_to_edit(exp_avg_sqs, group.get("differentiable", False))
            torch._foreach_div_(denominators, bias_correction2_sqrts)
            torch._foreach_add_(denominators, group["eps"])
            updates = list(torch._foreach_div(exp_avgs, bias_corrections1))
            torch._foreach_add_(updates, torch._foreach_mul(exp_avg_slows, alphas))
            if group["cautious"]:
                updates = cautious_updates(updates, grads)
            torch._foreach_addcdiv_(params, updates, denominators, value=-lr)
