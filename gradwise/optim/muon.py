"""Muon: momentum orthogonalised by a Newton-Schulz iteration, with AdamW for the rest."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from gradwise.optim.adam import adam_update
from gradwise.optim.base import GradwiseOptimizer, ParamsT, maybe_negate, zeros_like
from gradwise.optim.description import Description, Preset, StateSize, moment_buffers
from gradwise.optim.param_groups import NORMALIZATION_LAYERS
from gradwise.optim.state_formats import MOMENTUM_STATE_FORMATS
from gradwise.validation import check_betas, check_choice, check_int, check_range

# Keller Jordan's quintic coefficients, chosen to maximise the slope at zero.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")
ORTHOGONALIZATIONS = ("newton_schulz", "polar_express")

# Polar Express (Amsel, Persson, Musco and Gower 2025, arXiv:2505.16932, Algorithm 1; also
# https://github.com/NoahAmsel/PolarExpress): the degree-5 polynomial p_t(x) = a x + b x^3 + c x^5 of
# each iteration, optimal in the sup norm for the singular values left by the previous ones, from
# a lower bound of 1e-3 on the normalised spectrum. Iterations past the last row repeat it (the
# table converges to (15/8, -10/8, 3/8), the Newton-Schulz quintic that fixes 1).
_POLAR_EXPRESS_TABLE = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
POLAR_EXPRESS_SAFETY = 1.01
"""Algorithm 1's safety factor for half precision: the input is divided by 1.01 times its
Frobenius norm, and every polynomial but the last is rescaled to p(x / 1.01), so a singular
value that rounding pushed slightly above the interval the polynomials were fitted on is not
blown up."""
POLAR_EXPRESS_COEFFICIENTS = tuple(
    (a / POLAR_EXPRESS_SAFETY, b / POLAR_EXPRESS_SAFETY**3, c / POLAR_EXPRESS_SAFETY**5)
    for a, b, c in _POLAR_EXPRESS_TABLE[:-1]
) + (_POLAR_EXPRESS_TABLE[-1],)
NORMUON_EPS = 1e-10
"""Added to the root of NorMuon's row second moment (the reference implementation's value)."""


def newton_schulz(
    matrices: Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    r"""Approximately orthogonalise each matrix of ``matrices`` (shape ``(..., m, n)``).

    With :math:`X_0 = G / \|G\|_F` (so every singular value is at most 1) and
    :math:`X \leftarrow aX + (bA + cA^2)X`, :math:`A = XX^\top`, each step maps every singular
    value :math:`s` to :math:`p(s) = as + bs^3 + cs^5`. The default coefficients push small
    singular values up fast rather than converging exactly, so after 5 steps the result is
    :math:`U S' V^\top` with :math:`S'` between about 0.7 and 1.2 instead of :math:`UV^\top`
    (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/). The iteration runs on
    the wide orientation (:math:`m \le n`) so that :math:`A` is the smaller Gram matrix, in
    ``dtype`` (bf16 by default: on the CPUs and GPUs measured it is several times faster than
    fp32 and the iteration tolerates its rounding). A batch of matrices runs as batched
    matrix products (``torch.baddbmm``), a single one as 2-D products (``torch.addmm``).
    Each step costs three matrix products. Returns a new tensor of ``dtype``.
    """
    return odd_polynomial_iteration(matrices, (coefficients,) * steps, 1.0, eps, dtype)


def polar_express(
    matrices: Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16
) -> Tensor:
    r"""Approximate the polar factor :math:`UV^\top` of each matrix of ``matrices`` by Polar
    Express (Amsel et al. 2025, arXiv:2505.16932, Algorithm 1).

    The same odd quintic iteration as :func:`newton_schulz`, at the same cost (three matrix
    products a step), but with a different polynomial at each step
    (:data:`POLAR_EXPRESS_COEFFICIENTS`): step :math:`t` applies the degree-5 odd polynomial
    that best approximates :math:`\operatorname{sign}` in the sup norm on the interval where
    the previous steps left the singular values, so the composition is the optimal one of its
    degree (the paper's Theorem 4.1). Early polynomials grow small singular values fast, later
    ones converge to 1, where Jordan's fixed quintic stalls at a 0.7-1.2 band. The input is
    normalised by :data:`POLAR_EXPRESS_SAFETY` times its Frobenius norm. Returns a new tensor of
    ``dtype``.
    """
    last = len(POLAR_EXPRESS_COEFFICIENTS) - 1
    schedule = tuple(POLAR_EXPRESS_COEFFICIENTS[min(step, last)] for step in range(steps))
    return odd_polynomial_iteration(matrices, schedule, POLAR_EXPRESS_SAFETY, eps, dtype)


def odd_polynomial_iteration(
    matrices: Tensor,
    schedule: tuple[tuple[float, float, float], ...],
    norm_scale: float,
    eps: float,
    dtype: torch.dtype,
) -> Tensor:
    r"""The shared engine of :func:`newton_schulz` and :func:`polar_express`: from
    :math:`X_0 = G / \max(s\|G\|_F, \epsilon)` (``s = norm_scale``), one step
    :math:`X \leftarrow aX + (bA + cA^2)X`, :math:`A = XX^\top`, per ``(a, b, c)`` of
    ``schedule``, on the wide orientation of each matrix, in ``dtype``."""
    shape = matrices.shape
    x = matrices.reshape(-1, *shape[-2:]).to(dtype, copy=True)
    tall = shape[-2] > shape[-1]
    if tall:
        x = x.mT
    norm = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)
    if norm_scale != 1.0:
        norm.mul_(norm_scale)
    x.div_(norm.clamp_(min=eps))
    if x.shape[0] == 1:  # one matrix: 2-D products (a batch of one ran 1.5x slower on a CPU)
        x = x[0]
        for a, b, c in schedule:
            gram = x @ x.T
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        x = x.unsqueeze(0)
    else:
        for a, b, c in schedule:
            gram = torch.bmm(x, x.mT)
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    if tall:
        x = x.mT
    return x.reshape(shape)


def matrix_shape(param: Tensor) -> tuple[int, int, int]:
    """How Muon sees ``param``: ``(batch, m, n)``.

    A matrix is one matrix; a 3-D weight a batch of matrices (one per head or expert); a
    4-D (or higher) convolution weight one matrix of shape ``(out_channels, in_channels *
    kernel elements)``; a vector (only when routed to Muon explicitly) one row, whose
    orthogonalisation is the normalised vector.
    """
    if param.ndim < 2:
        return 1, 1, param.numel()
    if param.ndim == 2:
        return 1, param.shape[0], param.shape[1]
    if param.ndim == 3:
        return param.shape[0], param.shape[1], param.shape[2]
    return 1, param.shape[0], param[0].numel()


def adjusted_lr(lr: float, adjust_lr_fn: str | None, rows: int, cols: int) -> float:
    """Shape-aware scaling of the step of an ``rows x cols`` matrix.

    ``"original"`` (or ``None``, Jordan et al.): :math:`\\sqrt{\\max(1, m/n)}`, so that the
    update's RMS norm does not shrink for tall matrices; ``"match_rms_adamw"`` (Liu et al.
    2025, "Muon is Scalable for LLM Training", arXiv:2502.16982): :math:`0.2\\sqrt{\\max(m,
    n)}`, which matches the RMS of an AdamW update so AdamW's lr and weight decay carry over.
    """
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr * math.sqrt(max(1.0, rows / cols))


def _muon_state(shape, options) -> StateSize:
    """Jordan et al. 2024: a momentum buffer for the matrices Muon orthogonalises, plus with
    NorMuon (``normuon_beta2``) one second-moment value per row of each matrix; the tensors
    it routes to its internal AdamW (by default those of fewer than two dimensions, or a
    group's ``use_muon``) keep AdamW's two moments and step."""
    use_muon = options.get("use_muon")
    if use_muon is None:
        use_muon = len(shape) >= 2
    if not use_muon:
        return moment_buffers(shape, signed=1, unsigned=1, scalars=1)
    if options.get("normuon_beta2") is None:
        return moment_buffers(shape, signed=1)
    batch, rows, _ = matrix_shape(torch.empty(shape, device="meta"))
    return moment_buffers(shape, signed=1, others=batch * rows)


def _model_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """How a training run groups a model's parameters for Muon (see :attr:`Description.groups`)."""
    return muon_param_groups(model, weight_decay=weight_decay)


class Muon(GradwiseOptimizer):
    r"""Muon, MomentUm Orthogonalized by Newton-Schulz (Jordan et al. 2024,
    https://kellerjordan.github.io/posts/muon/; Liu et al. 2025, arXiv:2502.16982), for
    every parameter of a model.

    For each matrix (see :func:`matrix_shape` for 3-D and 4-D weights):

    .. math::
        B_t = \mu B_{t-1} + (1-\mu) G_t,\qquad
        \tilde B_t = (1-\mu) G_t + \mu B_t \ \text{(Nesterov) or } B_t,\\
        \theta_t = (1 - \eta\lambda)\,\theta_{t-1} - \eta\,s(m, n)\,
            \operatorname{NS}_k(\tilde B_t),

    with :func:`newton_schulz` for :math:`\operatorname{NS}_k` (or :func:`polar_express`:
    ``orthogonalization="polar_express"``) and the shape scaling :math:`s` of
    :func:`adjusted_lr`. Same arguments, defaults, update, state and
    ``state_dict`` as ``torch.optim.Muon`` (whose state_dicts load here and the other way),
    which it extends:

    - a 3-D weight is a batch of matrices, each orthogonalised on its own (per head, per
      expert); a 4-D convolution weight is flattened to ``(out, in * kh * kw)``;
    - matrices of one shape go through Newton-Schulz together, as one batched product;
    - a matrix sharded as a DTensor (FSDP2, :func:`gradwise.distributed.strategies.fsdp.shard_model`;
      tensor parallelism) is orthogonalised whole on one rank, its owner, which keeps its
      momentum (:mod:`gradwise.optim.owner_computes`);
    - ``maximize=True`` ascends (the gradient is negated), as torch's other optimizers;
    - **routing**: parameters that should not be orthogonalised (embeddings, the output
      head, biases and gains) can be stepped by an internal AdamW, so one ``Muon`` takes all
      of a model's parameters; :func:`muon_param_groups` builds the groups. A param group
      chooses with ``use_muon``: ``None`` (the default) is torch's Muon, which refuses a
      parameter with fewer than 2 dimensions (a ``ValueError``, as torch); ``True`` is Muon
      too, and counts a vector as a ``1 x n`` matrix (Muon then steps along its normalised
      momentum); ``False`` is AdamW, with the group's ``lr`` (``adamw_lr`` if the group has
      none), ``adamw_betas``, ``adamw_eps``, ``weight_decay`` and ``maximize``, through
      :func:`~gradwise.optim.adam.adam_update`, Adam's own update.

    AdamW's betas are named ``adamw_betas``, not ``betas``, so that a torch scheduler that
    cycles momentum (``OneCycleLR(cycle_momentum=True)`` looks for ``betas`` first, then
    ``momentum``) cycles Muon's ``momentum``; AdamW groups keep their ``adamw_betas``.

    Refinements (each an option, off by default, so the defaults stay torch's Muon):

    - ``orthogonalization="polar_express"``: Polar Express's per-step optimal polynomials
      (:func:`polar_express`) instead of Jordan's fixed quintic, at the same number of matrix
      products; ``ns_steps`` counts its steps and ``ns_coefficients`` must stay the default.
      At Muon's 5 steps (and 6) it lands closer to the polar factor :math:`UV^\top` than the
      quintic on all 13 matrices measured, fp32 and bf16; at 7-10 steps in fp32 the quintic is
      closer on 6 to 8 of them, the ill-conditioned real gradients whose smallest singular
      values lie below the range the table was fitted for
      (``benchmarks/muon_orthogonalization.py`` measures both against the SVD).
    - ``normuon_beta2`` (NorMuon, Li et al. 2025, arXiv:2510.05491; ``None``: off, 0.95 in
      the paper): with :math:`O_t` the orthogonalised update of an :math:`m \times n` matrix,
      :math:`v_t = \beta_2 v_{t-1} + (1-\beta_2)\operatorname{mean}_j O_{t,ij}^2` per row
      (neuron) :math:`i`, :math:`\hat O_t = O_t / (\sqrt{v_t} + 10^{-10})` row by row, then
      :math:`\hat O_t` is rescaled to the Frobenius norm of :math:`O_t`, so the shape rule
      :math:`s` keeps its meaning. Rows that move a lot are damped relative to the rest, the
      per-neuron balance Adam has and Muon lacks. This is the reference implementation's
      scaling (https://github.com/zichongli5/NorMuon); the paper's Algorithm 1 instead sets
      the update RMS to 0.2 (:math:`0.2\sqrt{mn}/\|\hat O_t\|_F`), which
      ``adjust_lr_fn="match_rms_adamw"`` here reproduces exactly when :math:`O_t` is exactly
      semi-orthogonal (:math:`\|O_t\|_F = \sqrt{\min(m, n)}`) and within the
      orthogonalisation's error otherwise. State: one value per row (``normuon_second_moment``,
      shape ``(rows,)``, ``(heads, rows)`` for a 3-D weight).
    - ``adjust_lr_fn="match_rms_adamw"`` (Liu et al. 2025, arXiv:2502.16982): scale the step
      by :math:`0.2\sqrt{\max(m, n)}` so its RMS is about 0.2 lr, an AdamW update's; then
      AdamW's tuned lr and weight decay carry over to the matrices (Moonlight's recipe). The
      default (``None``/``"original"``, Jordan's :math:`\sqrt{\max(1, m/n)}`) keeps the update's
      spectral norm near lr: Muon's own lr (about 0.02) is then the one to use.
    - QK-Clip (MuonClip, Kimi K2) rescales attention weights after the step and needs the
      model's attention logits: it is :class:`gradwise.optim.qk_clip.QKClip`, attached to
      the optimizer with a step hook.

    Deliberate choices: complex parameters are refused at ``step()`` (a ``RuntimeError``, as
    torch: a real view would add a fake axis to the matrix); zero-size parameters are
    skipped; bf16/fp16 parameters are updated in their dtype from the ``ns_dtype``
    orthogonalisation. A non-finite gradient element makes its whole matrix's update
    non-finite, as in torch (Newton-Schulz mixes every element, and checking would cost a
    host synchronisation per step): guard the step (``gradwise.train`` skips non-finite
    gradients) or clip.

    State: the momentum buffer (4 bytes per fp32 parameter) for Muon parameters; AdamW's
    two moments and step (8 bytes) for the others, with AdamW's layout.
    ``state_format`` stores the moments in fewer bits (``"bf16"``, ``"bf16-sr"``, ``"8bit"``;
    default ``"fp32"``, torch's rule; see :mod:`gradwise.optim.state_formats`): the momentum of
    the matrices and AdamW's moments; NorMuon's row moment stays as it is.
    ``param_rounding`` (``"stochastic"`` or ``"kahan"``; default ``"nearest"``, torch's rule) steps
    bf16 parameters in float32 and stores them back by stochastic rounding or with a bf16 Kahan
    compensation (:mod:`gradwise.optim.param_rounding`), for pure-bf16 training.

    Example::

        opt = gradwise.optim.Muon(gradwise.optim.muon_param_groups(model), lr=0.02, adamw_lr=3e-4)
        loss_fn(model(x), y).backward()
        opt.step(); opt.zero_grad()
    """

    _per_matrix = True

    def _updates_matrices(self, group: dict[str, Any]) -> bool:
        # The AdamW groups are element-wise: complex parameters there go as real views.
        return group["use_muon"] is not False

    # the momentum of the matrices, and the moments of the tensors routed to AdamW
    _formatted_state = {"momentum_buffer": True, "exp_avg": True, "exp_avg_sq": False}
    _state_formats = MOMENTUM_STATE_FORMATS

    description = Description(
        drive="step",
        sharding="tensor",  # the orthogonalisation needs the whole matrix
        state=_muon_state,
        lr_range=(1e-3, 10.0),
        presets={
            # the race's points are vectors: Muon sees each as a 1 x n matrix (use_muon), and
            # there is nothing to regularise
            # training: the groups of muon_param_groups (description.groups); the class defaults
            "muon": Preset(
                "Muon on the point as a 1 x n matrix: normalised Nesterov momentum",
                train={},
                race={"use_muon": True, "weight_decay": 0.0},
                lr_scale=15.0,
            ),
            "muon-8bit": Preset(
                "Muon with an 8-bit block-wise momentum (and its AdamW's moments)", {"state_format": "8bit"},
                train={}, lr_scale=15.0,
            ),
            # the modded-nanogpt speedrun's Muon since its 2025 records: Polar Express orthogonalisation and
            # NorMuon's per-row normalisation (norm-preserving, so Muon's lr carries over)
            "normuon": Preset(
                "NorMuon: Muon with Polar Express and a per-row second moment",
                {"orthogonalization": "polar_express", "normuon_beta2": 0.95},
                train={},
                lr_scale=15.0,
            ),
        },
        groups=_model_groups,
    )

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        *,
        maximize: bool = False,
        ns_dtype: torch.dtype = torch.bfloat16,
        adamw_lr: float = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        use_muon: bool | None = None,
        orthogonalization: str = "newton_schulz",
        normuon_beta2: float | None = None,
        state_format: str = "fp32",
        param_rounding: str = "nearest",
    ) -> None:
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=ns_coefficients,
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
            maximize=maximize,
            ns_dtype=ns_dtype,
            adamw_lr=adamw_lr,
            adamw_betas=adamw_betas,
            adamw_eps=adamw_eps,
            use_muon=use_muon,
            orthogonalization=orthogonalization,
            normuon_beta2=normuon_beta2,
            state_format=state_format,
            param_rounding=param_rounding,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # An AdamW group without an lr of its own steps with adamw_lr, not Muon's lr.
        if param_group.get("use_muon", self.defaults["use_muon"]) is False and "lr" not in param_group:
            param_group = {**param_group, "lr": param_group.get("adamw_lr", self.defaults["adamw_lr"])}
        super().add_param_group(param_group)

    def _validate(self, group: dict[str, Any]) -> None:
        check_range("adamw_lr", group["adamw_lr"], 0.0)
        check_range("lr", group["lr"], 0.0)
        check_range("weight_decay", group["weight_decay"], 0.0)
        check_range("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        coefficients = group["ns_coefficients"]
        if not isinstance(coefficients, (tuple, list)) or len(coefficients) != 3:
            raise ValueError(f"ns_coefficients must be a tuple of 3 numbers, got {coefficients!r}")
        for index, value in enumerate(coefficients):
            check_range(f"ns_coefficients[{index}]", value)
        check_range("eps", group["eps"], 0.0, low_open=True)
        check_int("ns_steps", group["ns_steps"], 1, 99)
        if group["adjust_lr_fn"] not in ADJUST_LR_FNS:  # torch's message, which torch's tests match
            raise ValueError(
                f"Adjust learning rate function {group['adjust_lr_fn']} is not supported: adjust_lr_fn must be "
                f"one of {', '.join(map(repr, ADJUST_LR_FNS))}"
            )
        check_choice("ns_dtype", group["ns_dtype"], NS_DTYPES)
        check_betas("adamw_betas", group["adamw_betas"])
        check_range("adamw_eps", group["adamw_eps"], 0.0)
        check_choice("use_muon", group["use_muon"], (None, True, False))
        check_choice("orthogonalization", group["orthogonalization"], ORTHOGONALIZATIONS)
        if group["orthogonalization"] == "polar_express" and tuple(coefficients) != NS_COEFFICIENTS:
            raise ValueError(
                f"ns_coefficients must stay the default {NS_COEFFICIENTS} with orthogonalization='polar_express' "
                f"(it has a coefficient table of its own), got {tuple(coefficients)!r}"
            )
        if group["normuon_beta2"] is not None:
            check_range("normuon_beta2", group["normuon_beta2"], 0.0, 1.0, high_open=True)
        if group["use_muon"] is None:
            for param in group.get("params", ()):
                if param.ndim < 2:
                    raise ValueError(
                        f"Muon only supports 2D parameters (and 3-D/4-D weights as matrices) whereas we found a "
                        f"parameter with size: {tuple(param.shape)}; route vectors to the internal AdamW with "
                        "muon_param_groups(model) or a group with use_muon=False"
                    )

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        if group["use_muon"] is False:
            self._adamw_update(group, params, grads)
        else:
            self._muon_update(group, params, maybe_negate(grads, group["maximize"]))

    def _muon_update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        normuon_beta2 = group["normuon_beta2"]
        buffers = [self._state(p, "momentum_buffer", zeros_like) for p in params]
        torch._foreach_lerp_(buffers, grads, 1 - momentum)
        updates = torch._foreach_lerp(grads, buffers, momentum) if group["nesterov"] else buffers
        if weight_decay != 0:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        # Matrices of one shape, dtype and device share one batched orthogonalisation call.
        batches: dict[tuple, list[int]] = {}
        for index, param in enumerate(params):
            _, rows, cols = matrix_shape(param)
            batches.setdefault((rows, cols, param.dtype, param.device), []).append(index)
        for (rows, cols, _, _), indices in batches.items():
            stacked = torch.cat([updates[i].reshape(-1, rows, cols) for i in indices]) if len(indices) > 1 else (
                updates[indices[0]].reshape(-1, rows, cols)
            )
            if group["orthogonalization"] == "polar_express":
                orthogonal = polar_express(stacked, group["ns_steps"], group["eps"], group["ns_dtype"])
            else:
                orthogonal = newton_schulz(
                    stacked, group["ns_steps"], group["ns_coefficients"], group["eps"], group["ns_dtype"]
                )
            if normuon_beta2 is not None:
                moments = [self._state(params[i], "normuon_second_moment", row_moment_like) for i in indices]
                orthogonal = normalize_rows(orthogonal, moments, normuon_beta2)
            step = -adjusted_lr(lr, group["adjust_lr_fn"], rows, cols)
            start = 0
            for i in indices:
                count = params[i].numel() // (rows * cols)
                update = orthogonal[start : start + count].view(params[i].shape)
                params[i].add_(update, alpha=step)
                start += count

    def _adamw_update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        adamw = {
            "lr": group["lr"],
            "betas": group["adamw_betas"],
            "eps": group["adamw_eps"],
            "weight_decay": group["weight_decay"],
            "amsgrad": False,
            "maximize": group["maximize"],
            "decoupled_weight_decay": True,
            "foreach": None,
            "fused": None,
            "capturable": False,
            "differentiable": False,
        }
        adam_update(self, adamw, params, grads)


def row_moment_like(param: Tensor) -> Tensor:
    """NorMuon's state for ``param``: one zero per row of each of its matrices (see
    :func:`matrix_shape`), shape ``(rows,)`` or ``(batch, rows)`` for a 3-D weight."""
    batch, rows, _ = matrix_shape(param)
    shape = (batch, rows) if param.ndim == 3 else (batch * rows,)
    return torch.zeros(shape, dtype=param.dtype, device=param.device)


def normalize_rows(orthogonal: Tensor, moments: list[Tensor], beta2: float) -> Tensor:
    r"""NorMuon's neuron-wise normalisation of a stack of orthogonalised updates (shape
    ``(matrices, rows, cols)``; ``moments`` the row second moments of its tensors, in order,
    updated in place): :math:`v \leftarrow \beta_2 v + (1-\beta_2)\operatorname{mean}_j O_{ij}^2`,
    :math:`\hat O = O / (\sqrt v + 10^{-10})` row by row, rescaled to the Frobenius norm of
    :math:`O`, matrix by matrix. Computed in float32 (the orthogonalisation may be bf16);
    returns the float32 update."""
    update = orthogonal.float()
    norms = torch.linalg.vector_norm(update, dim=(-2, -1), keepdim=True)
    rows = update.shape[-2]
    stacked = torch.cat([moment.reshape(-1, rows, 1) for moment in moments]).float()
    stacked.lerp_(update.square().mean(dim=-1, keepdim=True), 1 - beta2)
    start = 0
    for moment in moments:
        count = moment.numel() // rows
        moment.copy_(stacked[start : start + count].view(moment.shape))
        start += count
    update.div_(stacked.sqrt_().add_(NORMUON_EPS))
    return update.mul_(norms / torch.linalg.vector_norm(update, dim=(-2, -1), keepdim=True).add_(NORMUON_EPS))


def muon_param_groups(
    model: nn.Module,
    *,
    use_muon: Callable[[str, Tensor], bool] | None = None,
    head: nn.Module | str | None = None,
    adamw_lr: float | None = None,
    weight_decay: float | None = None,
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Param groups for :class:`Muon`: hidden matrices (``use_muon=True``), the embeddings and
    output head (AdamW, decayed), and biases and gains (AdamW, no weight decay).

    Newton-Schulz orthogonalisation suits the matrices that map hidden states to hidden
    states; an embedding is a lookup table (each row sees its own token's gradient only) and
    the output head maps to logits, so both go to the internal AdamW, as in Jordan et al.
    A parameter is an embedding when an ``nn.Embedding`` owns it; the head is ``head`` (the
    module, or its name in ``model.named_modules()``), by default the module that the model
    itself declares with ``get_output_embeddings()`` (Hugging Face's convention, which the
    mlp workload's model follows), and any parameter that a module other than an embedding
    shares with an embedding (a tied output layer registered as such). A head tied by reuse
    in ``forward`` (``x @ embedding.weight.T``, as tiny-gpt) is the embedding itself, so it is
    found without a guess; an untied head must be named or declared. No layer is taken for
    the head by its position: a wrong guess would silently move a hidden matrix to AdamW.

    Biases, gains and normalisation layers' parameters (the rule of
    :func:`~gradwise.optim.weight_decay_groups`: fewer than two dimensions, or owned by a
    normalisation layer) go to a third group, AdamW with ``weight_decay=0``. ``weight_decay``
    (default: the optimizer's) goes to the other two. The AdamW groups step with
    ``adamw_lr`` (default: Muon's ``adamw_lr``). ``use_muon(name, param)`` replaces the
    Muon-or-AdamW rule (the decay rule stays). Shared parameters count once. Extra keyword
    options go into every group; empty groups are left out.

    Example::

        opt = gradwise.optim.Muon(muon_param_groups(model, adamw_lr=3e-4, weight_decay=0.1), lr=0.02)
    """
    declared = getattr(model, "get_output_embeddings", None)
    if head is None and callable(declared):
        head = declared()  # the model's own word for its head; None when it has none
    if head is not None and not isinstance(head, (nn.Module, str)):
        raise TypeError(f"head must be an nn.Module, its name or None, got a {type(head).__name__}")
    if isinstance(head, str):
        modules = dict(model.named_modules())
        if head not in modules:
            raise ValueError(f"head: model has no module named {head!r}")
    head_module = modules[head] if isinstance(head, str) else head
    adamw_only = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    if head_module is not None:
        adamw_only |= {id(p) for p in head_module.parameters()}
    exempt: set[int] = set()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if param.ndim < 2 or isinstance(module, NORMALIZATION_LAYERS):
                exempt.add(id(param))
    decay_options = {} if weight_decay is None else {"weight_decay": check_range("weight_decay", weight_decay, 0.0)}
    adamw_options = {} if adamw_lr is None else {"lr": check_range("adamw_lr", adamw_lr, 0.0)}
    muon: list[nn.Parameter] = []
    adamw: list[nn.Parameter] = []
    undecayed: list[nn.Parameter] = []
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if id(param) in exempt:  # a bias or gain, the head's too
            chosen = use_muon(name, param) if use_muon is not None else False
            (muon if chosen else undecayed).append(param)
            continue
        chosen = use_muon(name, param) if use_muon is not None else param.ndim >= 2 and id(param) not in adamw_only
        (muon if chosen else adamw).append(param)
    groups = [
        {"params": muon, "use_muon": True, **group_options, **decay_options},
        {"params": adamw, "use_muon": False, **group_options, **adamw_options, **decay_options},
        {"params": undecayed, "use_muon": False, **group_options, **adamw_options, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]

