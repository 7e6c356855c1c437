"""Adam and AdamW: bias-corrected first and second moment estimates."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from gradwise.optim.base import (
    AMP_SCALING_KEYS,
    GradwiseOptimizer,
    ParamsT,
    addcdiv_scaled_,
    apply_weight_decay,
    by_device_and_dtype,
    cache_blocks,
    cautious_updates,
    check_state_shapes,
    fused_kernel_applies,
    fused_scaling,
    is_dtensor,
    mars_buffers,
    maybe_negate,
    roots_to_edit,
    scalar_values,
    undo_skipped_steps,
    zeros_like,
)
from gradwise.optim.description import Description, Preset, StateSize, moment_buffers, numel
from gradwise.optim.kernels import adam_4bit_cpu, adam_8bit_cpu, adam_bf16_cpu, optional_kernel
from gradwise.optim.state_formats import (
    ABSMAX_SUFFIX,
    BLOCK,
    BLOCK_4BIT,
    DRAWS_KEY,
    STATE_FORMATS,
    draw_seed,
    dynamic_map,
    linear_map_4bit,
    quantize_4bit,
    quantize_8bit,
    rank1_normalised,
)
from gradwise.validation import check_betas, check_range


def update_moments(
    exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], grads: list[Tensor], beta1: float, beta2: float
) -> None:
    """Adam's moment estimates in place: m <- beta1 m + (1 - beta1) g, v <- beta2 v + (1 - beta2) g^2."""
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)


def _adam_state(shape, options) -> StateSize:
    """Two moments (three with ``amsgrad``: the running maximum; one more with MARS: the
    previous gradient) and a step counter."""
    return moment_buffers(shape, signed=1, unsigned=2 if options.get("amsgrad", False) else 1,
                          others=mars_buffers(options) * numel(shape), scalars=1)


class Adam(GradwiseOptimizer):
    r"""Adam (Kingma & Ba 2015, arXiv:1412.6980), AMSGrad (Reddi, Kale & Kumar 2018) and,
    with ``decoupled_weight_decay=True``, AdamW (Loshchilov & Hutter 2019, arXiv:1711.05101).

    With gradient :math:`g_t` (plus :math:`\lambda\theta_{t-1}` for coupled L2 decay):

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\qquad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\\
        \theta_t = \theta_{t-1} - \frac{\eta}{1-\beta_1^t}\,
            \frac{m_t}{\sqrt{\hat v_t / (1-\beta_2^t)} + \epsilon},

    where :math:`\hat v_t = v_t`, or :math:`\max(\hat v_{t-1}, v_t)` with ``amsgrad``.
    Decoupled decay first shrinks :math:`\theta_{t-1}` by :math:`1-\eta\lambda`.
    On :math:`\theta^2/2` from 2.0 with ``lr=0.1`` the iterates are 1.900000, 1.800166,
    1.700623. Same update and defaults as ``torch.optim.Adam``.

    State: :math:`m` and :math:`v` (8 bytes per fp32 parameter), plus :math:`\hat v` with
    ``amsgrad`` (12 bytes), and a step counter.

    By default (``fused=None``) dense floating-point parameters on CPU or CUDA are updated
    by torch's fused Adam/AdamW kernel, which computes exactly this update; ``fused=False``
    uses the ``torch._foreach_*`` path.

    Two options shared with the other momentum optimizers (see :mod:`gradwise.optim.base`):
    ``cautious=True`` (C-AdamW, Liang et al. 2024, arXiv:2411.16085) masks the coordinates
    where :math:`m_t` and :math:`g_t` disagree in sign and rescales the rest
    (:func:`~gradwise.optim.base.cautious_updates`; it runs on the foreach path);
    ``mars_gamma`` (MARS-AdamW, Yuan et al. 2024, arXiv:2411.10438; the paper uses 0.025 with
    betas (0.95, 0.99)) feeds the clipped variance-reduced gradient :math:`\tilde c_t` to both
    moments in place of :math:`g_t`, keeping :math:`g_{t-1}` (4 more bytes per parameter).
    ``state_format`` stores the moments in fewer bits (``"bf16"``, ``"bf16-sr"``, ``"8bit"``,
    ``"4bit"``; default ``"fp32"``, torch's rule; see :mod:`gradwise.optim.state_formats`):
    :math:`m` signed, :math:`v` and :math:`\hat v` unsigned; 8-bit AdamW keeps 2 bytes per
    parameter and 8 per block of 256, 4-bit AdamW 1 byte per parameter, 4 per block of 128 of
    :math:`m` and 4 per row and column of :math:`v`. The fused CPU kernels (8 bits, 4 bits, bf16; see
    :meth:`_fused_formatted_update`) take the correctly rounded square root, torch.sqrt MKL's (not
    correctly rounded), so they agree with ``fused=False`` to the parameters' last bits.
    ``param_rounding`` (``"stochastic"`` or ``"kahan"``; default ``"nearest"``, torch's rule) steps
    bf16 parameters in float32 and stores them back by stochastic rounding or with a bf16 Kahan
    compensation (:mod:`gradwise.optim.param_rounding`), for pure-bf16 training.

    Example::

        opt = gradwise.optim.Adam(model.parameters(), lr=3e-4, betas=(0.9, 0.95))
        loss_fn(model(x), y).backward()
        opt.step(); opt.zero_grad()
    """

    _formatted_state = {"exp_avg": True, "exp_avg_sq": False, "max_exp_avg_sq": False}
    _state_formats = STATE_FORMATS

    description = Description(
        drive="step",
        sharding="element",
        state=_adam_state,
        lr_range=(1e-3, 10.0),  # steps are at most about lr per coordinate, whatever the gradient's scale
        presets={
            "adam": Preset("Adam", train={}, race={}, race_default=True),
            "adam-amsgrad": Preset("Adam with AMSGrad", {"amsgrad": True}),
        },
    )

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        cautious: bool = False,
        mars_gamma: float | None = None,
        state_format: str = "fp32",
        param_rounding: str = "nearest",
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
            cautious=cautious,
            mars_gamma=mars_gamma,
            state_format=state_format,
            param_rounding=param_rounding,
        )
        super().__init__(params, defaults)

    def _validate(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        check_betas("betas", group["betas"])
        check_range("eps", group["eps"], 0.0)
        check_range("weight_decay", group["weight_decay"], 0.0)

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        adam_update(self, group, params, grads)

    def _fused_formatted_update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> bool:
        """8-bit, 4-bit or bf16 moments of float32 CPU parameters: one pass of a fused kernel over the
        stored moments (``gradwise/optim/kernels/adam_8bit_cpu.cpp``: the codes and block scales;
        ``adam_4bit_cpu.cpp``: the packed codes, block scales and rank-1 maxima, with a first pass over
        the gradient and v's codes for the maxima of a tensor of two or more dimensions;
        ``adam_bf16_cpu.cpp``: the bf16 tensors). Each computes the generic path's step
        (``fused=False``) operation for operation except the square root of :math:`v`: the CPU's
        correctly rounded one, where torch.sqrt on float32 CPU tensors calls MKL's, which is not
        correctly rounded (matching it cost an eighth of the step). So 8-bit and 4-bit codes and scales
        and round-to-nearest bf16 moments are the generic path's bit for bit (with coupled weight decay,
        a moment may land on the neighbouring value), the parameters agree to the last bits of each
        step, and a run resumed with the kernel is bit for bit the uninterrupted one. ``"bf16-sr"``
        draws its rounding noise from a counter-based hash seeded as the generic path seeds its
        generator: the same distribution, other draws. Elsewhere (other formats, dtypes or devices,
        strided parameters, ``amsgrad``, ``cautious``, ``foreach=False``, AMP's ``grad_scale``, a
        differentiable, capturable or compiled step, moments loaded in another format) it returns
        False and the generic path runs; so it does when the kernel cannot be built (warned once;
        an error under ``fused=True``)."""
        if not _adam_kernel_applies(self, group, params):
            return False
        state_format = group["state_format"]
        loader = {"8bit": adam_8bit_cpu, "4bit": adam_4bit_cpu}.get(state_format, adam_bf16_cpu)
        kernel = loader() if group["fused"] else optional_kernel(loader)
        if kernel is None:
            return False
        steps = self._step_counters(params, on_device=False)
        for param in params:  # a fresh moment: what the generic path stores (zeros' codes and scales)
            state = self.param_state(param)
            for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
                if key not in state and state_format in ("8bit", "4bit"):
                    quantize = quantize_8bit if state_format == "8bit" else quantize_4bit
                    state[key], state[key + ABSMAX_SUFFIX] = quantize(torch.zeros_like(param), signed)
                elif key not in state:
                    state[key] = torch.zeros_like(param, dtype=torch.bfloat16)
        lr, (beta1, beta2) = group["lr"], group["betas"]
        torch._foreach_add_(steps, 1)
        counts = [step.item() for step in steps]
        step_sizes = [-lr / (1 - beta1**t) for t in counts]
        bias_corrections = [(1 - beta2**t) ** 0.5 for t in counts]
        scalars = (beta1, beta2, group["eps"], group["weight_decay"], lr, group["decoupled_weight_decay"],
                   group["maximize"])
        states = [self.param_state(p) for p in params]
        moments = [[state[key] for state in states] for key in ("exp_avg", "exp_avg_sq")]
        if state_format in ("8bit", "4bit"):
            scales = [[state[key + ABSMAX_SUFFIX] for state in states] for key in ("exp_avg", "exp_avg_sq")]
            update = kernel.adam_8bit_ if state_format == "8bit" else kernel.adam_4bit_
            update(params, grads, moments[0], scales[0], moments[1], scales[1], *_maps(state_format), step_sizes,
                   bias_corrections, *scalars)
            return True
        seeds = []
        if state_format == "bf16-sr":  # the generic path's counters: one draw per moment written
            for param, state in zip(params, states):
                draws = state.get(DRAWS_KEY, 0)
                seeds += [draw_seed(draws, "exp_avg", param.numel()), draw_seed(draws + 1, "exp_avg_sq", param.numel())]
                state[DRAWS_KEY] = draws + 2
        kernel.adam_bf16_(params, grads, moments[0], moments[1], step_sizes, bias_corrections, *scalars,
                          state_format == "bf16-sr", seeds)
        return True

    @staticmethod
    def _foreach_update(
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        max_exp_avg_sqs: list[Tensor],
        steps: list[Tensor],
    ) -> None:
        lr, (beta1, beta2), weight_decay = group["lr"], group["betas"], group["weight_decay"]
        torch._foreach_add_(steps, 1)
        counts = scalar_values(steps, group)
        minus_step_sizes = [-lr / (1 - beta1**t) for t in counts]
        bias_correction2_sqrts = [(1 - beta2**t) ** 0.5 for t in counts]
        columns = [params, grads, exp_avgs, exp_avg_sqs, minus_step_sizes, bias_correction2_sqrts]
        if group["amsgrad"]:
            columns.append(max_exp_avg_sqs)
        for params, grads, exp_avgs, exp_avg_sqs, minus_step_sizes, bias_correction2_sqrts, *maxima in cache_blocks(
            *columns, whole_tensors=group.get("cautious", False)
        ):
            grads = maybe_negate(grads, group["maximize"])
            grads = apply_weight_decay(params, grads, lr, weight_decay, group["decoupled_weight_decay"])
            update_moments(exp_avgs, exp_avg_sqs, grads, beta1, beta2)
            if maxima:
                torch._foreach_maximum_(maxima[0], exp_avg_sqs)
                denominators = roots_to_edit(maxima[0], group.get("differentiable", False))
            else:
                denominators = roots_to_edit(exp_avg_sqs, group.get("differentiable", False))
            torch._foreach_div_(denominators, bias_correction2_sqrts)
            torch._foreach_add_(denominators, group["eps"])
            # the update m / denominator has the sign of m, so masking m masks the update
            numerators = cautious_updates(exp_avgs, grads) if group.get("cautious") else exp_avgs
            addcdiv_scaled_(params, numerators, denominators, minus_step_sizes)

    @staticmethod
    @torch._disable_dynamo
    def _fused_update(
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        max_exp_avg_sqs: list[Tensor],
        steps: list[Tensor],
    ) -> None:
        beta1, beta2 = group["betas"]
        kernel = torch._fused_adamw_ if group["decoupled_weight_decay"] else torch._fused_adam_
        torch._foreach_add_(steps, 1)
        kernel(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            max_exp_avg_sqs,
            steps,
            amsgrad=group["amsgrad"],
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
            **fused_scaling(group),
        )
        undo_skipped_steps(steps, group)


@functools.cache
def _maps(state_format: str) -> tuple[Tensor, Tensor]:
    """The signed and unsigned maps of the 8-bit or 4-bit format, which its fused kernel decodes through."""
    if state_format == "8bit":
        return dynamic_map(True), dynamic_map(False)
    return dynamic_map(True, decades=3), linear_map_4bit()


FUSED_FORMATS = ("8bit", "4bit", "bf16", "bf16-sr")
"""The state formats with a fused CPU Adam kernel (:meth:`Adam._fused_formatted_update`)."""


def _adam_kernel_applies(optimizer: GradwiseOptimizer, group: dict[str, Any], params: list[Tensor]) -> bool:
    """Whether a fused kernel computes ``group``'s step of ``params`` as the generic path with
    ``fused=False`` would, up to the square root's last bit (see :meth:`Adam._fused_formatted_update`)."""
    state_format = group["state_format"]
    if (state_format not in FUSED_FORMATS or group["fused"] is False or group["amsgrad"] or group.get("cautious")
            or group.get("foreach") is False or group.get("differentiable") or group.get("capturable")
            or any(group.get(key) is not None for key in AMP_SCALING_KEYS) or torch.compiler.is_compiling()):
        return False
    for param in params:
        if (param.device.type != "cpu" or param.dtype != torch.float32 or not param.is_contiguous()
                or is_dtensor(param) or param in optimizer._complex_owners):
            return False
        state = optimizer.param_state(param)
        for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            if not _kernel_reads(state_format, param, state.get(key), state.get(key + ABSMAX_SUFFIX), signed):
                return False
    return True


def _kernel_reads(state_format: str, param: Tensor, stored: Tensor | None, scales: Tensor | None,
                  signed: bool) -> bool:
    """Whether a moment (``signed`` or not) stored as ``stored`` (and ``scales``) is what the fused
    kernel of ``state_format`` reads for ``param``: absent (a fresh moment), or in the format's
    layout: bf16 of the parameter's shape; 8-bit codes of its shape and a scale per 256 values;
    4-bit codes packed flat, ``ceil(n / 2)`` bytes, and a scale per 128 values or, for an unsigned
    moment of two or more dimensions, the rank-1 maxima (``sum(shape)`` of them)."""
    if stored is None and scales is None:
        return True
    if stored is None or not stored.is_contiguous() or stored.device != param.device:
        return False
    count = param.numel()
    if state_format in ("bf16", "bf16-sr"):
        return stored.dtype == torch.bfloat16 and stored.shape == param.shape and scales is None
    if state_format == "8bit":
        shape, scale_count = param.shape, -(-count // BLOCK)
    else:
        shape = torch.Size([-(-count // 2)])
        rank1 = not signed and rank1_normalised(tuple(param.shape))
        scale_count = sum(param.shape) if rank1 else -(-count // BLOCK_4BIT)
    return (stored.dtype == torch.uint8 and stored.shape == shape and scales is not None
            and scales.dtype == torch.float32 and scales.is_contiguous() and scales.numel() == scale_count)


def adam_update(optimizer: GradwiseOptimizer, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
    """One Adam step of ``params`` with ``grads`` under the hyperparameters of ``group`` (Adam's
    keys: ``lr``, ``betas``, ``eps``, ``weight_decay``, ``amsgrad``, ``maximize``,
    ``decoupled_weight_decay``, ``foreach``, ``fused``, ``capturable``, ``differentiable``),
    the moments kept in ``optimizer``'s state. Adam and AdamW step with it, and so do the
    optimizers that route some tensors to AdamW (Muon's vectors): one implementation."""
    fused = fused_kernel_applies(group, params, type(optimizer).__name__, dtensors=True)
    lists = [
        params,
        grads,
        [optimizer._state(p, "exp_avg", zeros_like) for p in params],
        [optimizer._state(p, "exp_avg_sq", zeros_like) for p in params],
        optimizer._step_counters(params, on_device=fused or group["capturable"]),
    ]
    if group["amsgrad"]:
        lists.append([optimizer._state(p, "max_exp_avg_sq", zeros_like) for p in params])
    if fused:
        check_state_shapes(type(optimizer).__name__, params, *lists[2:4], *lists[5:])
    update = Adam._fused_update if fused else Adam._foreach_update
    for device_params, device_grads, exp_avgs, exp_avg_sqs, steps, *maxima in by_device_and_dtype(*lists):
        max_exp_avg_sqs = maxima[0] if maxima else []
        update(group, device_params, device_grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)


class AdamW(Adam):
    r"""AdamW (Loshchilov & Hutter 2019, arXiv:1711.05101): Adam with decoupled weight decay,

    .. math:: \theta \leftarrow (1 - \eta\lambda)\,\theta \text{ before the Adam step,}

    with torch's default :math:`\lambda = 10^{-2}`. See :class:`Adam` for the update, the
    state and the fused kernel; this is ``Adam(..., decoupled_weight_decay=True)``.

    Example::

        groups = gradwise.optim.weight_decay_groups(model, weight_decay=0.1)
        opt = gradwise.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95))
        loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()
    """

    description = Description(
        drive="step",
        sharding="element",
        state=_adam_state,
        lr_range=(1e-3, 10.0),
        presets={
            # training uses the betas of GPT-style training (nanoGPT) rather than the paper's
            "adamw": Preset(
                "AdamW (decoupled weight decay 0.01)", train={"betas": (0.9, 0.95)}, race={}, race_default=True
            ),
            "adamw-amsgrad": Preset("AdamW with AMSGrad", {"amsgrad": True}),
            "adamw-cautious": Preset(
                "cautious AdamW (Liang et al. 2024)", {"cautious": True}, train={"betas": (0.9, 0.95)}, race={}
            ),
            # the MARS paper's GPT-2 settings: gamma 0.025, betas (0.95, 0.99)
            "mars-adamw": Preset(
                "MARS-AdamW (Yuan et al. 2024)", {"mars_gamma": 0.025}, train={"betas": (0.95, 0.99)}, race={}
            ),
            # the moments in fewer bits (gradwise.optim.state_formats): names the race and the planner can use
            "adamw-8bit": Preset(
                "AdamW with 8-bit block-wise moments (Dettmers et al. 2021)", {"state_format": "8bit"},
                train={"betas": (0.9, 0.95)},
            ),
            "adamw-bf16-sr": Preset(
                "AdamW with bf16 moments, stochastic rounding", {"state_format": "bf16-sr"},
                train={"betas": (0.9, 0.95)},
            ),
            "adamw-4bit": Preset(
                "AdamW with 4-bit moments (Li et al. 2023)", {"state_format": "4bit"}, train={"betas": (0.9, 0.95)},
            ),
        },
    )

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        cautious: bool = False,
        mars_gamma: float | None = None,
        state_format: str = "fp32",
        param_rounding: str = "nearest",
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
            cautious=cautious,
            mars_gamma=mars_gamma,
            state_format=state_format,
            param_rounding=param_rounding,
        )

    # An AdamW is an AdamW whatever state_dict it loads (an Adam's says otherwise).
    _forced_options = {"decoupled_weight_decay": True}
