"""PSGD-Kron: SGD preconditioned by a Kronecker product of factors fitted on a matrix Lie group."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from gradwise.optim.base import GradwiseOptimizer, ParamsT, maybe_negate, scalar_dtype
from gradwise.optim.description import Description, Preset, StateSize, numel
from gradwise.validation import check_bool, check_int, check_range

# torch tensors have at most this many dimensions: one state key per possible factor.
_MAX_FACTORS = 64
_FACTOR_KEYS = tuple(f"Q{i}" for i in range(_MAX_FACTORS))

# The annealed probability of refreshing the preconditioner (HeavyBall's
# ``precond_update_prob_schedule()``): 1 for the first 1000 steps, then times 0.999 per step,
# down to 0.03 (reached after about 4500 steps).
_PROB_FLAT_STEPS = 1000
_PROB_DECAY = 0.999
_PROB_MIN = 0.03

# HeavyBall refuses an automatic initial scale above this (a zero or vanishing first gradient).
_MAX_INIT_SCALE = 100.0


def preconditioned_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape a tensor is preconditioned as: its dimensions of size 1 dropped (they carry no
    coupling), a scalar or all-ones shape as a 1-element vector."""
    kept = tuple(size for size in shape if size != 1)
    return kept or (1,)


def factor_is_dense(size: int, ndim: int, options: Mapping[str, Any]) -> bool:
    """Whether the factor of a dimension of ``size`` (of a tensor preconditioned with ``ndim``
    dimensions) is a dense triangular matrix, else a diagonal: dense for ``1 < size <=
    max_size_triangular`` when the tensor has at least ``min_ndim_triangular`` dimensions."""
    return 1 < size <= options.get("max_size_triangular", 2048) and ndim >= options.get("min_ndim_triangular", 2)


def _psgd_kron_state(shape, options) -> StateSize:
    """Li 2018 as HeavyBall keeps it: the momentum (the size of the parameter), one factor per
    dimension of the preconditioned shape (``d x d`` dense or ``d`` diagonal, in at least float32),
    one float64 running lower bound per factor (two 4-byte scalars each), the step counter and
    the running sum of refresh probabilities (float64: two)."""
    kept = preconditioned_shape(tuple(shape))
    factors = sum(size * size if factor_is_dense(size, len(kept), options) else size for size in kept)
    return StateSize(numel(shape) + factors, scalars=1 + 2 + 2 * len(kept))


def probe_seed(seed: int, step: int) -> int:
    """The seed of the generator that draws a tensor's probe at ``step``: ``(step + seed *
    0x9E3779B9) mod 2**32``. torch's CPU generator (a Mersenne Twister) keeps 32 bits of a
    seed, so the option and the step share them: the multiplier (odd, the golden ratio's 32-bit
    fraction) sets different seeds' streams of steps far apart, and one seed repeats a probe only
    after 2**32 refreshes."""
    return (step + seed * 0x9E3779B9) % 2**32


def refresh_probability(step: int, probability: float | None) -> float:
    """The probability of refreshing the preconditioner at ``step`` (1-based): ``probability``
    when given, else HeavyBall's annealed schedule ``max(0.03, 0.999 ** max(step - 1000, 0))``."""
    if probability is not None:
        return probability
    return max(_PROB_MIN, _PROB_DECAY ** max(step - _PROB_FLAT_STEPS, 0))


class PSGDKron(GradwiseOptimizer):
    r"""PSGD-Kron, preconditioned SGD with a Kronecker-factored preconditioner fitted on a
    matrix Lie group (Xi-Lin Li 2018, "Preconditioner on Matrix Lie Group for SGD",
    arXiv:1809.10232; Li 2015, arXiv:1512.04202), as HeavyBall 3.2.1's ``PSGDKron`` computes it.

    Each tensor, its dimensions of size 1 dropped, has one factor :math:`Q_i` per dimension
    :math:`i`: an upper-triangular :math:`d_i \times d_i` matrix when
    :math:`1 < d_i \le` ``max_size_triangular`` and the tensor has at least
    ``min_ndim_triangular`` dimensions, else a diagonal. The preconditioner is
    :math:`P = \bigotimes_i Q_i^\top Q_i`, applied mode by mode (:math:`\times_i`). Per step
    :math:`t`, with the gradient :math:`g_t`:

    .. math::
        m_t = m_{t-1} + \frac{1-\beta}{1-\beta^t}\,(g_t - m_{t-1})
        \quad\text{(the bias-corrected EMA)},\qquad
        u_t = m_t \times_1 Q_1^\top Q_1 \cdots \times_k Q_k^\top Q_k,\\
        \theta_t = (1 - \eta\lambda)\,\theta_{t-1} - \eta\,\operatorname{clip}(u_t),\qquad
        \operatorname{clip}(u) = \Big[1.5\big(0.9\tanh\tfrac{u}{1.5}
            + 0.1\,\operatorname{sign}(u)\log(1 + \tfrac{|u|}{1.5})\big)\Big]_{-2}^{2}

    (HeavyBall's trust-region clip, element-wise; ``clip_update=False`` leaves :math:`u_t`).
    Before :math:`u_t` is formed, when a refresh is due, the factors are fitted to the pair
    :math:`(v, h)`, :math:`v \sim \mathcal N(0, I)` and :math:`h = m_t + (\delta +
    \epsilon_{32}|m_t|)\,v` (``dampening`` :math:`\delta`; :math:`g_t` in place of :math:`m_t`
    with ``momentum_into_precond_update=False``), descending Li's criterion
    :math:`\mathbb E[h^\top P h + v^\top P^{-1} v]` on the Lie group: the factors are first
    balanced (each scaled so that its largest entry is the geometric mean of all of theirs),
    then with :math:`A = h \times_i Q_i` and :math:`B = v \times_i Q_i^{-\top}`, per factor,
    :math:`A_{(i)}` the mode-:math:`i` unfolding,

    .. math::
        E_i = A_{(i)}A_{(i)}^\top - B_{(i)}B_{(i)}^\top,\qquad
        \ell_i \leftarrow \max\big(\lambda_{\max}(A_{(i)}A_{(i)}^\top + B_{(i)}B_{(i)}^\top),\;
            0.9\,\ell_i + 0.1\,\lambda_{\max}(\cdot)\big),\\
        Q_i \leftarrow Q_i - \frac{\eta_Q}{\ell_i}\,\operatorname{triu}(E_i)\,Q_i

    (``precond_lr`` :math:`\eta_Q`, ``lower_bound_beta`` 0.9; :math:`\lambda_{\max}` by two
    power iterations started from the largest row; for a diagonal factor :math:`E_i` and the
    bound use the diagonals, the bound their largest entry). Refreshes are deterministic, as in
    HeavyBall 3.2.1: the probabilities :math:`p_s` (``precond_update_prob``, or 1 for 1000
    steps, then :math:`0.999^{s-1000}` down to 0.03) are summed, and step :math:`t` refreshes
    when :math:`\lfloor\sum_{s\le t}p_s\rfloor` grows. The factors start at
    :math:`Q_i = s^{1/k} I` on the first step, :math:`s` = ``precond_init_scale`` or
    :math:`\operatorname{mean}(|g_1|^4)^{-1/16}` (HeavyBall's heuristic; a first gradient of
    zeros has no such scale and is refused, as HeavyBall refuses it).

    Randomness: the probe :math:`v` of a tensor's refresh at step :math:`t` comes from a
    generator on the parameter's device seeded with :func:`probe_seed` of ``seed`` and :math:`t`,
    so a run is reproducible, resumes bit for bit from a ``state_dict`` (no generator state to
    save), and is the same when ZeRO gives each rank a share of the tensors. HeavyBall draws
    from torch's global generator instead; with that generator seeded the same way per tensor
    and step the iterates are HeavyBall's (tests/test_psgd_kron.py).

    Differences from HeavyBall: dense factors are stored as full matrices (HeavyBall keeps the
    upper triangle as a line, half the bytes, at the cost of a scatter and a gather per step);
    tensors of the same shape are not stacked (HeavyBall stacks them and takes the initial scale
    over the stack); HeavyBall's ``memory_save_mode``, cached factors, delayed preconditioning,
    Hessian-vector probes and gradient accumulation are not offered.

    Defaults are HeavyBall's (``lr=1e-3``, ``beta=0.9``, ``precond_lr=0.1``,
    ``max_size_triangular=2048``, ``min_ndim_triangular=2``, ``lower_bound_beta=0.9``,
    ``dampening=1e-9``, two power iterations, trust-region clip on).

    State per tensor: :math:`m` (the parameter's size and dtype) and the factors
    (:math:`d_i^2` or :math:`d_i` values each, in at least float32): for an
    :math:`m \times n` matrix with both sides dense, :math:`mn + m^2 + n^2` values.

    Example::

        opt = gradwise.optim.PSGDKron(model.parameters(), lr=1e-3)
        loss_fn(model(x), y).backward()
        opt.step(); opt.zero_grad()
    """

    _per_matrix = True
    # Kept in their own dtype on a load (torch would cast them to a 16-bit parameter's dtype):
    # the float64 running lower bounds and refresh-probability sum, and the factors.
    _scalar_state_keys = ("lower_bound", "refresh_credit")
    _float32_state_keys = _FACTOR_KEYS

    description = Description(
        drive="step",
        sharding="tensor",  # each factor needs the whole tensor
        state=_psgd_kron_state,
        # the clipped update moves each coordinate by at most 2 lr: Adam-like rates
        lr_range=(1e-4, 1.0),
        presets={
            # lr_scale measured on tiny-gpt (2 layers, 100 steps, bf16, 1 seed): final validation loss
            # 3.893 / 2.915 / 2.556 at 0.3x / 1x / 3x the workload's AdamW lr 2e-3 (AdamW at 1x: 2.785)
            "psgd-kron": Preset(
                "PSGD-Kron (Kronecker-factored preconditioner on a Lie group)", train={},
                race={"weight_decay": 0.0}, lr_scale=3.0,
            ),
        },
    )

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        beta: float = 0.9,
        weight_decay: float = 0.0,
        *,
        precond_lr: float = 0.1,
        precond_update_prob: float | None = None,
        max_size_triangular: int = 2048,
        min_ndim_triangular: int = 2,
        precond_init_scale: float | None = None,
        lower_bound_beta: float = 0.9,
        dampening: float = 1e-9,
        power_iterations: int = 2,
        momentum_into_precond_update: bool = True,
        clip_update: bool = True,
        seed: int = 0,
        maximize: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, beta=beta, weight_decay=weight_decay, precond_lr=precond_lr,
            precond_update_prob=precond_update_prob, max_size_triangular=max_size_triangular,
            min_ndim_triangular=min_ndim_triangular, precond_init_scale=precond_init_scale,
            lower_bound_beta=lower_bound_beta, dampening=dampening, power_iterations=power_iterations,
            momentum_into_precond_update=momentum_into_precond_update, clip_update=clip_update, seed=seed,
            maximize=maximize,
        )
        super().__init__(params, defaults)

    def _validate(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        check_range("beta", group["beta"], 0.0, 1.0, high_open=True)
        check_range("weight_decay", group["weight_decay"], 0.0)
        check_range("precond_lr", group["precond_lr"], 0.0, low_open=True)
        if group["precond_update_prob"] is not None:
            check_range("precond_update_prob", group["precond_update_prob"], 0.0, 1.0, low_open=True)
        check_int("max_size_triangular", group["max_size_triangular"], 1)
        check_int("min_ndim_triangular", group["min_ndim_triangular"], 1)
        if group["precond_init_scale"] is not None:
            check_range("precond_init_scale", group["precond_init_scale"], 0.0, low_open=True)
        check_range("lower_bound_beta", group["lower_bound_beta"], 0.0, 1.0, high_open=True)
        check_range("dampening", group["dampening"], 0.0)
        check_int("power_iterations", group["power_iterations"], 0)
        check_bool("momentum_into_precond_update", group["momentum_into_precond_update"])
        check_bool("clip_update", group["clip_update"])
        check_int("seed", group["seed"], 0, 2**31 - 1)

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        for param, grad in zip(params, maybe_negate(grads, group["maximize"])):
            self._step_one(group, param, grad)

    def _step_one(self, group: dict[str, Any], param: Tensor, grad: Tensor) -> None:
        state = self.param_state(param)
        compute = torch.promote_types(param.dtype, torch.float32)
        shape = preconditioned_shape(tuple(param.shape))
        g = grad.to(compute).reshape(shape)
        if "step" not in state:
            self._init_state(group, state, param, g, compute)
        state["step"] += 1
        step = int(state["step"].item())
        beta = group["beta"]
        exp_avg = state["exp_avg"]
        momentum = exp_avg.to(compute).reshape(shape)
        momentum.lerp_(g, (1 - beta) / (1 - beta**step))
        exp_avg.copy_(momentum.view(exp_avg.shape))
        factors = [state[key] for key in _FACTOR_KEYS[: len(shape)]]

        credit = state["refresh_credit"]
        before = credit.item()
        after = before + refresh_probability(step, group["precond_update_prob"])
        credit.fill_(after)
        if int(after) > int(before):
            fitted = momentum if group["momentum_into_precond_update"] else g
            self._refresh(group, state, factors, fitted, step)

        direction = momentum
        for mode, factor in enumerate(factors):
            direction = _precondition_on_mode(direction, factor, mode)
        if group["clip_update"]:
            direction = trust_region_clip(direction)
        lr = group["lr"]
        if group["weight_decay"] != 0:
            param.mul_(1 - lr * group["weight_decay"])
        param.add_(direction.reshape(param.shape).to(param.dtype), alpha=-lr)

    def _init_state(self, group: dict[str, Any], state: Any, param: Tensor, g: Tensor, compute: torch.dtype) -> None:
        scale = group["precond_init_scale"]
        if scale is None:
            scale = initial_scale(g)
        per_factor = scale ** (1 / g.ndim)
        state["step"] = torch.zeros((), dtype=scalar_dtype())
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        for key, size in zip(_FACTOR_KEYS, g.shape):
            if factor_is_dense(size, g.ndim, group):
                state[key] = torch.eye(size, dtype=compute, device=param.device).mul_(per_factor)
            else:
                state[key] = torch.full((size,), per_factor, dtype=compute, device=param.device)
        state["lower_bound"] = torch.zeros(g.ndim, dtype=torch.float64, device=param.device)
        state["refresh_credit"] = torch.zeros((), dtype=torch.float64)

    @staticmethod
    def _refresh(group: dict[str, Any], state: Any, factors: list[Tensor], fitted: Tensor, step: int) -> None:
        """One step of Li's factor fit on the pair (v, h) (see the class docstring)."""
        balance(factors)
        generator = torch.Generator(device=fitted.device).manual_seed(probe_seed(group["seed"], step))
        probe = torch.randn(fitted.shape, generator=generator, dtype=fitted.dtype, device=fitted.device)
        damping = group["dampening"] + torch.finfo(torch.float32).eps * fitted.abs()
        perturbed = fitted + damping * probe
        a = perturbed
        for mode, factor in enumerate(factors):
            a = _apply_on_mode(a, factor, mode)
        b = probe
        for mode, factor in enumerate(factors):
            if factor.ndim == 1:
                b = _apply_on_mode(b, factor.reciprocal(), mode)
        for mode, factor in enumerate(factors):
            if factor.ndim == 2:
                moved = b.movedim(mode, -1)
                solved = torch.linalg.solve_triangular(factor, moved.reshape(-1, factor.shape[0]), upper=True,
                                                       left=False)
                b = solved.reshape(moved.shape).movedim(-1, mode)
        lower_bound, beta, precond_lr = state["lower_bound"], group["lower_bound_beta"], group["precond_lr"]
        for mode, factor in enumerate(factors):
            gram_a, gram_b = _mode_gram(a, mode, factor.ndim == 2), _mode_gram(b, mode, factor.ndim == 2)
            total = gram_a + gram_b
            largest = max_eigenvalue(total, group["power_iterations"]) if factor.ndim == 2 else total.amax()
            largest = largest.double()
            bound = torch.maximum(largest, lower_bound[mode] + (largest - lower_bound[mode]) * (1 - beta))
            lower_bound[mode] = bound
            difference = gram_a - gram_b
            change = difference.triu() @ factor if factor.ndim == 2 else factor * difference
            factor.sub_(change / bound.to(factor.dtype) * precond_lr)


def initial_scale(g: Tensor) -> float:
    r"""HeavyBall's automatic initial scale of the preconditioner,
    :math:`s = \operatorname{mean}(\max(|g|, 10^{-12})^4)^{-1/16}` (so :math:`P = s^2 I` starts
    at the inverse square root of the gradient's fourth-moment root), computed in float64 in
    log space. One host read per tensor, on its first step."""
    logs = g.double().abs().clamp_min(1e-12).log().mul_(4).flatten()
    log_mean = torch.logsumexp(logs, 0) - math.log(g.numel())
    scale = math.exp(-log_mean.item() / 16)
    if not math.isfinite(scale) or scale > _MAX_INIT_SCALE:
        raise ValueError(
            f"precond_init_scale: the first gradient (shape {tuple(g.shape)}) is zero or vanishing, which gives "
            f"no initial scale (computed {scale:g}, allowed <= {_MAX_INIT_SCALE:g}); pass precond_init_scale > 0"
        )
    return scale


def balance(factors: list[Tensor]) -> None:
    """Rescale the factors in place so that each one's largest magnitude is the geometric mean
    of all of theirs (their Kronecker product is unchanged); this keeps them in float range."""
    if len(factors) < 2:
        return
    logs = [factor.abs().amax().log() for factor in factors]
    mean = sum(logs) / len(factors)
    for factor, log in zip(factors, logs):
        factor.mul_((mean - log).exp())


def max_eigenvalue(matrix: Tensor, iterations: int) -> Tensor:
    """The largest eigenvalue of a symmetric positive semi-definite ``matrix``, by ``iterations``
    power iterations on its square started from its largest row (HeavyBall's estimate)."""
    row_norms = torch.linalg.vector_norm(matrix, dim=-1)
    norm, index = row_norms.max(dim=-1)
    norm = norm.clamp(min=torch.finfo(torch.float32).tiny)
    scaled = matrix / norm
    x = matrix[index] / norm

    def square_times(v: Tensor) -> Tensor:
        return (v @ scaled.T) @ scaled.T

    for _ in range(iterations):
        x = torch.nn.functional.normalize(square_times(x), dim=-1)
    return (x * square_times(x)).sum().sqrt() * norm


def trust_region_clip(update: Tensor) -> Tensor:
    r""":math:`[1.5(0.9\tanh(u/1.5) + 0.1\operatorname{sign}(u)\log(1 + |u|/1.5))]_{-2}^{2}`:
    linear near zero, bounded by 2 (HeavyBall's ``trust_region_clip_``)."""
    x = update / 1.5
    tanh = x.tanh()
    mixed = x.abs().log1p().copysign(tanh) * 0.1 + tanh * 0.9
    return (mixed * 1.5).clamp(min=-2, max=2)


def _apply_on_mode(x: Tensor, factor: Tensor, mode: int) -> Tensor:
    """``x`` times ``factor`` on dimension ``mode``: the matrix product on that mode for a
    matrix factor, a scaling along it for a diagonal (a vector)."""
    if factor.ndim == 1:
        shape = [1] * x.ndim
        shape[mode] = -1
        return x * factor.view(shape)
    if x.ndim == 2:
        return factor @ x if mode == 0 else x @ factor.T
    return torch.tensordot(factor, x, dims=([1], [mode])).movedim(0, mode)


def _precondition_on_mode(x: Tensor, factor: Tensor, mode: int) -> Tensor:
    """``x`` times :math:`Q^\top Q` on dimension ``mode``, in the cheaper order: :math:`Q` then
    :math:`Q^\top` (:math:`2dN` multiply-adds for ``x`` of :math:`N` elements) when ``x`` has
    fewer elements than :math:`Q` (the embedding's narrow side, a vector), else :math:`Q^\top Q`
    formed first (:math:`d^3 + dN`)."""
    if factor.ndim == 1:
        return _apply_on_mode(x, factor * factor, mode)
    if x.numel() < factor.numel():
        return _apply_on_mode(_apply_on_mode(x, factor, mode), factor.T, mode)
    return _apply_on_mode(x, factor.T @ factor, mode)


def _mode_gram(x: Tensor, mode: int, dense: bool) -> Tensor:
    """:math:`X_{(i)} X_{(i)}^\\top` of the mode-``mode`` unfolding, or its diagonal."""
    if not dense:
        others = [d for d in range(x.ndim) if d != mode]
        return x.square().sum(dim=others) if others else x.square()
    unfolded = x.movedim(mode, 0).reshape(x.shape[mode], -1)
    return unfolded @ unfolded.T
