"""SOAP: Adam run in the eigenbasis of Shampoo's preconditioner."""

from __future__ import annotations

import math
from collections.abc import MutableMapping
from typing import Any

import torch
from torch import Tensor

from gradwise.optim.base import GradwiseOptimizer, ParamsT, maybe_negate, scalar_dtype
from gradwise.optim.description import Description, Preset, StateSize, numel
from gradwise.optim.shampoo import EIGH_DTYPES, matrix_view, matrix_view_shape, symmetric_eigh
from gradwise.validation import check_betas, check_choice, check_int, check_range


def _soap_state(shape, options) -> StateSize:
    """Vyas et al. 2024 (arXiv:2409.11321): Adam's two moments in the eigenbasis of Shampoo's
    factors; per side of the matrix view (of size 2 to ``max_precond_dim``) a statistic and its
    eigenvectors (vectors and scalars only with ``precondition_1d``); a step counter."""
    rows, cols = matrix_view(shape)
    limit = options.get("max_precond_dim", 10000)
    rotated = len(shape) >= 2 or options.get("precondition_1d", True)
    factors = sum(2 * size * size for size in (rows, cols) if rotated and 1 < size <= limit)
    return StateSize(2 * numel(shape) + factors, scalars=1)


class SOAP(GradwiseOptimizer):
    r"""SOAP, ShampoO with Adam in the Preconditioner's eigenbasis (Vyas et al. 2024,
    "SOAP: Improving and Stabilizing Shampoo using Adam", arXiv:2409.11321, Algorithm 3).

    Each parameter is seen as a matrix (:func:`~gradwise.optim.shampoo.matrix_view_shape`).
    With Shampoo's factors :math:`L = \beta_s L + (1-\beta_s) GG^\top`,
    :math:`R = \beta_s R + (1-\beta_s) G^\top G` and their eigenvectors :math:`Q_L, Q_R`:

    .. math::
        G' = Q_L^\top G Q_R,\qquad
        M' = \beta_1 M' + (1-\beta_1) G',\qquad
        V' = \beta_2 V' + (1-\beta_2) G'^{\,2},\\
        \theta \leftarrow (1-\eta\lambda)\,\theta - \eta\,
            \frac{\sqrt{1-\beta_2^k}}{1-\beta_1^k}\;
            Q_L \frac{M'}{\sqrt{V'} + \epsilon} Q_R^\top,

    :math:`k` counting the Adam steps. The first step only initialises the factors and the
    basis (by an eigendecomposition in ``eigh_dtype``), as in the paper. Every
    ``precondition_every`` steps the basis is refreshed by one step of power iteration
    with a QR decomposition, :math:`Q \leftarrow \operatorname{QR}(F Q)`, its columns ordered
    by the estimated eigenvalues :math:`\operatorname{diag}(Q^\top F Q)` (descending), and
    :math:`V'` permuted the same way; :math:`M'`, kept in the rotated frame, is rotated from
    the old basis to the new one. A side longer than ``max_precond_dim`` or of length 1 is
    not rotated (identity). With ``precondition_1d=True`` (this class's default) a vector is
    a ``1 x n`` row, rotated on its right side; with ``precondition_1d=False`` (the default of
    the paper's code) vectors and scalars get plain Adam, which saves an :math:`n \times n`
    factor and its refresh per bias and gain.

    Defaults are the paper's (``lr=3e-3``, ``betas=(0.95, 0.95)``, ``shampoo_beta`` equal to
    ``betas[1]``, ``eps=1e-8``, ``weight_decay=0.01``, ``precondition_every=10``,
    ``max_precond_dim=10000``), except ``precondition_1d=True`` (the paper's code: ``False``).

    State: :math:`M', V'` (8 bytes per fp32 parameter, Adam's) plus, per :math:`m \times n`
    matrix view, :math:`L, R, Q_L, Q_R` for each rotated side: up to :math:`2(m^2 + n^2)`
    values.

    Example::

        opt = gradwise.optim.SOAP(model.parameters(), lr=3e-3, precondition_every=10)
        loss_fn(model(x), y).backward()
        opt.step(); opt.zero_grad()
    """

    _per_matrix = True

    description = Description(
        drive="step",
        sharding="tensor",  # the eigenbases need the whole matrix
        state=_soap_state,
        lr_range=(1e-3, 10.0),  # Adam in a rotated basis: Adam's range
        presets={
            # the race's test functions have nothing to regularise
            "soap": Preset("SOAP (Adam in Shampoo's eigenbasis)", train={}, race={"weight_decay": 0.0}, lr_scale=5.0),
            "soap-no-1d": Preset("SOAP without rotating vectors", {"precondition_1d": False}),
        },
    )

    def __init__(
        self,
        params: ParamsT,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        *,
        precondition_every: int = 10,
        max_precond_dim: int = 10000,
        precondition_1d: bool = True,
        eigh_dtype: torch.dtype = torch.float32,
        maximize: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            shampoo_beta=shampoo_beta,
            eps=eps,
            weight_decay=weight_decay,
            precondition_every=precondition_every,
            max_precond_dim=max_precond_dim,
            precondition_1d=precondition_1d,
            eigh_dtype=eigh_dtype,
            maximize=maximize,
        )
        super().__init__(params, defaults)

    def _validate(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        check_betas("betas", group["betas"])
        if group["shampoo_beta"] is not None:
            check_range("shampoo_beta", group["shampoo_beta"], 0.0, 1.0, high_open=True)
        check_range("eps", group["eps"], 0.0)
        check_range("weight_decay", group["weight_decay"], 0.0)
        check_int("precondition_every", group["precondition_every"], 1)
        check_int("max_precond_dim", group["max_precond_dim"], 1)
        check_choice("eigh_dtype", group["eigh_dtype"], EIGH_DTYPES)

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        for param, grad in zip(params, maybe_negate(grads, group["maximize"])):
            self._step_one(group, param, grad)

    def _step_one(self, group: dict[str, Any], param: Tensor, grad: Tensor) -> None:
        state = self.param_state(param)
        beta1, beta2 = group["betas"]
        shampoo_beta = beta2 if group["shampoo_beta"] is None else group["shampoo_beta"]
        rows, cols = matrix_view_shape(param)
        matrix = grad.reshape(rows, cols)
        if "step" not in state:
            self._init_state(group, param, matrix, shampoo_beta)
            return
        state["step"] += 1
        step = int(state["step"].item())
        left, right = state.get("left_basis"), state.get("right_basis")
        rotated = _rotate(matrix, left, right)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(rotated, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(rotated, rotated, value=1 - beta2)
        normalised = exp_avg / exp_avg_sq.sqrt().add_(group["eps"])
        direction = _rotate_back(normalised, left, right)
        lr = group["lr"]
        step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
        if group["weight_decay"] != 0:
            param.mul_(1 - lr * group["weight_decay"])
        param.add_(direction.view(param.shape), alpha=-step_size)
        _accumulate(state, matrix, shampoo_beta)
        if step % group["precondition_every"] == 0:
            self._refresh_basis(state)

    def _init_state(self, group: dict[str, Any], param: Tensor, matrix: Tensor, shampoo_beta: float) -> None:
        state = self.param_state(param)
        state["step"] = torch.zeros((), dtype=scalar_dtype())
        rows, cols = matrix.shape
        state["exp_avg"] = matrix.new_zeros(rows, cols)
        state["exp_avg_sq"] = matrix.new_zeros(rows, cols)
        rotated = param.ndim >= 2 or group["precondition_1d"]
        for side, size in (("left", rows), ("right", cols)):
            if rotated and 1 < size <= group["max_precond_dim"]:
                state[side] = matrix.new_zeros(size, size)
        _accumulate(state, matrix, shampoo_beta)
        for side in ("left", "right"):
            if side in state:
                _, eigenvectors = symmetric_eigh(state[side], group["eigh_dtype"])
                state[f"{side}_basis"] = eigenvectors.flip(-1).to(matrix.dtype)  # descending eigenvalues

    @staticmethod
    def _refresh_basis(state: MutableMapping[str, Any]) -> None:
        """One power-iteration step with QR per side; re-express ``M'`` and ``V'``."""
        exp_avg = _rotate_back(state["exp_avg"], state.get("left_basis"), state.get("right_basis"))
        for dim, side in ((0, "left"), (1, "right")):
            if side not in state:
                continue
            factor, basis = state[side], state[f"{side}_basis"]
            product = factor @ basis
            estimates = (basis * product).sum(0)  # diag(Q^T F Q)
            order = torch.argsort(estimates, descending=True)
            state["exp_avg_sq"] = state["exp_avg_sq"].index_select(dim, order)
            # torch has no half-precision QR: bf16/fp16 bases are orthogonalised in float32.
            basis, _ = torch.linalg.qr(product[:, order].to(torch.promote_types(product.dtype, torch.float32)))
            state[f"{side}_basis"] = basis.to(product.dtype)
        state["exp_avg"] = _rotate(exp_avg, state.get("left_basis"), state.get("right_basis"))


def _accumulate(state: MutableMapping[str, Any], matrix: Tensor, shampoo_beta: float) -> None:
    if "left" in state:
        state["left"].mul_(shampoo_beta).addmm_(matrix, matrix.T, alpha=1 - shampoo_beta)
    if "right" in state:
        state["right"].mul_(shampoo_beta).addmm_(matrix.T, matrix, alpha=1 - shampoo_beta)


def _rotate(matrix: Tensor, left: Tensor | None, right: Tensor | None) -> Tensor:
    """:math:`Q_L^\\top X Q_R` (an identity side skipped)."""
    if left is not None:
        matrix = left.T @ matrix
    if right is not None:
        matrix = matrix @ right
    return matrix


def _rotate_back(matrix: Tensor, left: Tensor | None, right: Tensor | None) -> Tensor:
    """:math:`Q_L X Q_R^\\top` (an identity side skipped)."""
    if left is not None:
        matrix = left @ matrix
    if right is not None:
        matrix = matrix @ right.T
    return matrix
