"""Shampoo: Kronecker-factored preconditioning with blocking and grafting."""

from __future__ import annotations

import math
from collections.abc import MutableMapping
from typing import Any

import torch
from torch import Tensor

from gradwise.optim.base import GradwiseOptimizer, ParamsT, maybe_negate, scalar_dtype
from gradwise.optim.description import Description, Preset, StateSize, numel
from gradwise.validation import check_choice, check_int, check_range

GRAFTS = (None, "sgd", "adagrad", "adam")
EIGH_DTYPES = (torch.float64, torch.float32)


def matrix_view_shape(param: Tensor) -> tuple[int, int]:
    """The 2-D shape a tensor is preconditioned as: ``(shape[0], rest)``; a vector is a
    row ``(1, n)`` and a scalar ``(1, 1)``."""
    return matrix_view(tuple(param.shape))


def matrix_view(shape: tuple[int, ...]) -> tuple[int, int]:
    """:func:`matrix_view_shape` of a tensor of ``shape``."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], numel(shape[1:])


def block_layout(size: int, block_size: int) -> tuple[int, int]:
    """``(blocks, block)``: a dimension cut into the fewest equal blocks of at most
    ``block_size`` (the last padded with zeros if ``size`` does not divide evenly)."""
    blocks = math.ceil(size / block_size)
    return blocks, math.ceil(size / blocks)


def to_blocks(matrix: Tensor, row_layout: tuple[int, int], col_layout: tuple[int, int]) -> Tensor:
    """``matrix`` (m x n) as a batch of blocks ``(row_blocks * col_blocks, bm, bn)``.

    Zero padding is exact for Shampoo: a zero row of every gradient block is a zero row and
    column of the factor, whose damped inverse root leaves it decoupled and zero.
    """
    (rb, bm), (cb, bn) = row_layout, col_layout
    rows, cols = matrix.shape
    if rb * bm != rows or cb * bn != cols:
        matrix = torch.nn.functional.pad(matrix, (0, cb * bn - cols, 0, rb * bm - rows))
    if rb == 1 and cb == 1:
        return matrix.unsqueeze(0)
    return matrix.reshape(rb, bm, cb, bn).transpose(1, 2).reshape(rb * cb, bm, bn)


def from_blocks(
    blocks: Tensor, row_layout: tuple[int, int], col_layout: tuple[int, int], rows: int, cols: int
) -> Tensor:
    """The inverse of :func:`to_blocks`: the ``rows x cols`` matrix."""
    (rb, bm), (cb, bn) = row_layout, col_layout
    matrix = blocks.reshape(rb, cb, bm, bn).transpose(1, 2).reshape(rb * bm, cb * bn)
    return matrix[:rows, :cols]


def statistics_dtype(param: Tensor) -> torch.dtype:
    """The dtype of a matrix optimizer's statistics for ``param``: float32 at least."""
    return torch.promote_types(param.dtype, torch.float32)


def symmetric_eigh(matrices: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` of a batch of symmetric matrices, computed in ``dtype``.

    A non-finite statistic (from a NaN or infinite gradient) has no eigendecomposition;
    rather than a linear-algebra error, its eigenvalues and eigenvectors are NaN, so the
    matrices it preconditions turn NaN as their gradient did (a deliberate choice: the
    training loop's guard is what skips non-finite steps). One host read per refresh.
    """
    matrices = matrices.to(dtype)
    if not bool(torch.isfinite(matrices).all()):
        nan = torch.full_like(matrices, torch.nan)
        return nan[..., 0], nan
    return torch.linalg.eigh(matrices)


def inverse_root(factors: Tensor, exponent: float, eps: float, dtype: torch.dtype) -> Tensor:
    r""":math:`(F + \epsilon I)^{-1/p}` for each symmetric PSD matrix of the batch ``factors``,
    with ``exponent`` :math:`= 1/p`, by an eigendecomposition in ``dtype``. Eigenvalues that
    rounding made negative are taken as zero before :math:`\epsilon` is added."""
    eigenvalues, eigenvectors = symmetric_eigh(factors, dtype)
    scale = eigenvalues.clamp_(min=0).add_(eps).pow_(-exponent)
    return ((eigenvectors * scale.unsqueeze(-2)) @ eigenvectors.mT).to(factors.dtype)


def accumulate_factor(factor: Tensor, blocks: Tensor, beta2: float, left: bool) -> None:
    r"""``factor`` :math:`\leftarrow \beta_2 F + (1-\beta_2) B B^\top` (left) or
    :math:`B^\top B` (right), batched; with :math:`\beta_2 = 1` the plain sum :math:`F + BB^\top`."""
    first, second = (blocks, blocks.mT) if left else (blocks.mT, blocks)
    alpha = 1.0 if beta2 == 1 else 1 - beta2
    torch.baddbmm(factor, first, second, beta=beta2, alpha=alpha, out=factor)


def _shampoo_state(shape, options) -> StateSize:
    """Gupta, Koren & Singer 2018 (arXiv:1802.09568), blocked as in Anil et al. 2020
    (arXiv:2002.09018): the tensor's matrix view is cut into blocks of at most
    ``block_size``; per block, a left statistic L (bm x bm) and a right one R (bn x bn) with
    their inverse roots (a side of size 1 has none); an Adagrad or Adam grafting accumulator;
    a momentum buffer when ``momentum > 0``; a step counter."""
    rows, cols = matrix_view(shape)
    block = options.get("block_size", 1024)
    (row_blocks, bm), (col_blocks, bn) = block_layout(rows, block), block_layout(cols, block)
    factors = sum(2 * size * size for size in (bm, bn) if size > 1) * row_blocks * col_blocks
    graft = numel(shape) if options.get("graft", "adagrad") in ("adagrad", "adam") else 0
    momentum = numel(shape) if options.get("momentum", 0.0) != 0 else 0
    return StateSize(factors + graft + momentum, scalars=1)


class Shampoo(GradwiseOptimizer):
    r"""Shampoo (Gupta, Koren & Singer 2018, "Shampoo: Preconditioned Stochastic Tensor
    Optimization", arXiv:1802.09568), with the blocking, start step and grafting of
    Distributed Shampoo (Anil et al. 2020, arXiv:2002.09018; Shi et al. 2023,
    arXiv:2309.06497).

    Each parameter is seen as a matrix (:func:`matrix_view_shape`) and cut into blocks of
    at most ``block_size`` per side (:func:`to_blocks`). For each block gradient :math:`G`:

    .. math::
        L_t = \beta_2 L_{t-1} + (1-\beta_2) G G^\top,\qquad
        R_t = \beta_2 R_{t-1} + (1-\beta_2) G^\top G\quad(\beta_2 = 1:\ \text{sums}),\\
        P_t = (L + \epsilon I)^{-1/(2k)}\, G\, (R + \epsilon I)^{-1/(2k)},

    where :math:`k` is the number of sides longer than 1 (2 for a matrix: the paper's
    :math:`L^{-1/4} G R^{-1/4}`; 1 for a vector, whose side of length 1 is skipped). The
    inverse roots are recomputed every ``precondition_every`` steps from step
    ``start_preconditioning_step`` on (:func:`inverse_root`, eigendecomposition in
    ``eigh_dtype``); before that the step is the grafted direction alone.

    Grafting (Agarwal et al. 2020, arXiv:2002.11803) takes the direction from Shampoo and the
    size from a simpler optimizer, block by block: :math:`P \leftarrow P\,\|D\|_F / \|P\|_F`
    with :math:`D` the direction of ``graft``: ``"sgd"`` :math:`G`, ``"adagrad"``
    :math:`G / (\sqrt{\sum G^2} + \epsilon_g)`, ``"adam"``
    :math:`G / (\sqrt{v_t / (1-\beta_g^t)} + \epsilon_g)` with
    :math:`v_t = \beta_g v_{t-1} + (1-\beta_g) G^2` (Adam without first moment: momentum
    comes after grafting), or ``None`` (no grafting; before the start step the direction is
    :math:`G`). Then heavy-ball momentum :math:`B = \mu B + P` (Nesterov: :math:`P + \mu B`)
    and :math:`\theta \leftarrow (1-\eta\lambda)\theta - \eta B`.

    Defaults follow Distributed Shampoo (``beta2=1``, ``eps=1e-12``, ``block_size=1024``,
    Adagrad grafting with ``graft_eps=1e-10``, eigendecompositions in float32), with roots
    refreshed every 10 steps from step 10. ``eigh_dtype=torch.float64`` resolves the small
    eigenvalues of ill-conditioned factors (at 2-3x the refresh time on a CPU).

    State per :math:`m \times n` block: :math:`L, R` and their roots, :math:`2(m^2 + n^2)`
    values (for a 1024 x 512 fp32 block 5 values, 20 bytes, per parameter), plus the graft
    accumulator (4 bytes per parameter for Adagrad/Adam) and the momentum buffer (4 bytes
    per parameter when ``momentum > 0``).

    Example::

        opt = gradwise.optim.Shampoo(model.parameters(), lr=1e-3, momentum=0.9, graft="adam")
        loss_fn(model(x), y).backward()
        opt.step(); opt.zero_grad()
    """

    _per_matrix = True

    description = Description(
        drive="step",
        sharding="tensor",  # the factors and their roots need the whole matrix
        state=_shampoo_state,
        lr_range=(10**-2.5, 10**1.5),  # Adagrad grafting: Adagrad's range
        presets={
            # training: the docstring's example, momentum 0.9 and Adam grafting (the stronger
            # setting on tiny-gpt in issue 14's sweep); the race keeps the class defaults
            "shampoo": Preset(
                "Shampoo (roots every 10 steps; training: momentum 0.9, Adam grafting; race: Adagrad grafting)",
                train={"momentum": 0.9, "graft": "adam"},
                race={},
                lr_scale=0.15,
            ),
            "shampoo-momentum": Preset("Shampoo with momentum 0.9", {"momentum": 0.9}),
        },
    )

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        *,
        nesterov: bool = False,
        beta2: float = 1.0,
        eps: float = 1e-12,
        block_size: int = 1024,
        precondition_every: int = 10,
        start_preconditioning_step: int = 10,
        graft: str | None = "adagrad",
        graft_beta2: float = 0.999,
        graft_eps: float = 1e-10,
        eigh_dtype: torch.dtype = torch.float32,
        maximize: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            nesterov=nesterov,
            beta2=beta2,
            eps=eps,
            block_size=block_size,
            precondition_every=precondition_every,
            start_preconditioning_step=start_preconditioning_step,
            graft=graft,
            graft_beta2=graft_beta2,
            graft_eps=graft_eps,
            eigh_dtype=eigh_dtype,
            maximize=maximize,
        )
        super().__init__(params, defaults)

    def _validate(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        check_range("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        check_range("weight_decay", group["weight_decay"], 0.0)
        if group["nesterov"] and group["momentum"] == 0:
            raise ValueError("nesterov=True needs momentum > 0, got momentum=0")
        check_range("beta2", group["beta2"], 0.0, 1.0, low_open=True)
        check_range("eps", group["eps"], 0.0, low_open=True)
        check_int("block_size", group["block_size"], 1)
        check_int("precondition_every", group["precondition_every"], 1)
        check_int("start_preconditioning_step", group["start_preconditioning_step"], 1)
        check_choice("graft", group["graft"], GRAFTS)
        check_range("graft_beta2", group["graft_beta2"], 0.0, 1.0, high_open=True)
        check_range("graft_eps", group["graft_eps"], 0.0)
        check_choice("eigh_dtype", group["eigh_dtype"], EIGH_DTYPES)

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        grads = maybe_negate(grads, group["maximize"])
        directions = [self._direction(group, param, grad) for param, grad in zip(params, grads)]
        if weight_decay != 0:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        self._momentum_step(params, directions, lr, momentum, group["nesterov"])

    # bf16/fp16 statistics lose the preconditioner (G G^T overflows fp16; bf16 rounds a sum of
    # squares to 3 digits): the statistics, roots and grafting accumulator are float32 there.
    _float32_state_keys = ("left", "right", "left_root", "right_root", "graft_accumulator")

    def _direction(self, group: dict[str, Any], param: Tensor, grad: Tensor) -> Tensor:
        """Update the statistics of ``param`` with ``grad``; return its step direction."""
        state = self.param_state(param)
        if "step" not in state:
            self._init_state(group, param)
        grad = grad.to(statistics_dtype(param))
        state["step"] += 1
        step = int(state["step"].item())
        rows, cols = matrix_view_shape(param)
        row_layout, col_layout = state["layout"]
        blocks = to_blocks(grad.reshape(rows, cols), row_layout, col_layout)
        sides = [side for side in ("left", "right") if side in state]
        for side in sides:
            accumulate_factor(state[side], blocks, group["beta2"], side == "left")
        graft = self._graft_direction(group, state, grad, step)
        start = group["start_preconditioning_step"]
        if step < start or not sides:
            return graft.to(param.dtype)
        if (step - start) % group["precondition_every"] == 0:
            for side in sides:
                root = inverse_root(state[side], 1 / (2 * len(sides)), group["eps"], group["eigh_dtype"])
                state[f"{side}_root"].copy_(root)
        preconditioned = blocks
        if "left" in state:
            preconditioned = torch.bmm(state["left_root"], preconditioned)
        if "right" in state:
            preconditioned = torch.bmm(preconditioned, state["right_root"])
        if group["graft"] is not None:
            graft_blocks = to_blocks(graft.reshape(rows, cols), row_layout, col_layout)
            graft_norms = torch.linalg.vector_norm(graft_blocks, dim=(-2, -1), keepdim=True)
            norms = torch.linalg.vector_norm(preconditioned, dim=(-2, -1), keepdim=True)
            preconditioned = preconditioned * (graft_norms / norms.clamp_(min=torch.finfo(norms.dtype).tiny))
        return from_blocks(preconditioned, row_layout, col_layout, rows, cols).reshape(param.shape).to(param.dtype)

    @staticmethod
    def _graft_direction(group: dict[str, Any], state: MutableMapping[str, Any], grad: Tensor, step: int) -> Tensor:
        graft = group["graft"]
        if graft in (None, "sgd"):
            return grad
        accumulator = state["graft_accumulator"]
        if graft == "adagrad":
            accumulator.addcmul_(grad, grad)
            denominator = accumulator.sqrt()
        else:
            beta2 = group["graft_beta2"]
            accumulator.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denominator = accumulator.div(1 - beta2**step).sqrt_()
        return grad / denominator.add_(group["graft_eps"])

    def _init_state(self, group: dict[str, Any], param: Tensor) -> None:
        state = self.param_state(param)
        state["step"] = torch.zeros((), dtype=scalar_dtype())
        rows, cols = matrix_view_shape(param)
        row_layout = block_layout(rows, group["block_size"])
        col_layout = block_layout(cols, group["block_size"])
        state["layout"] = (row_layout, col_layout)
        count = row_layout[0] * col_layout[0]
        dtype = statistics_dtype(param)
        for side, size in (("left", row_layout[1]), ("right", col_layout[1])):
            if size > 1:
                state[side] = param.new_zeros(count, size, size, dtype=dtype)
                state[f"{side}_root"] = param.new_zeros(count, size, size, dtype=dtype)
        if group["graft"] in ("adagrad", "adam"):
            state["graft_accumulator"] = torch.zeros_like(param, dtype=dtype)
