r"""Sharpness during training (``--track-sharpness EVERY``): the top Hessian eigenvalue of the training loss.

Every ``EVERY`` steps, after the step's update, the tracker measures the sharpness

.. math::
    S(\theta_t) = \lambda_{\max}\big(\nabla^2 L_B(\theta_t)\big),\qquad
    L_B(\theta) = \frac{1}{|B|}\sum_{(x, y)\in B} \ell(f_\theta(x), y),

on a fixed sample :math:`B`: the run's first global micro-batch (``batch_size`` rows per data-parallel
rank, over all ranks), drawn once from a copy of the training stream when the run is built, so it
depends only on the seed and the batch size, a resumed run measures on the same sample, and
training itself draws nothing more. :math:`L_B` is the workload's own loss in float32 without
autocast, at the float32 parameters (the master weights of a bf16 or fp16 run; pure-bf16 parameters
are cast up), with attention in its plain (math) form, which has second derivatives.

The estimate is the largest Ritz value :math:`\vartheta` of ``K`` Lanczos steps
(:func:`gradwise.curvature.top_eigenpair`, ``--sharpness-steps K``) on Hessian-vector products of
:math:`L_B` (:func:`gradwise.curvature.hessian_operator`), started from the previous measurement's
Ritz vector: successive Hessians are close, so the old top eigenvector is nearly the new one and
the Kaniel-Paige-Saad bound
:math:`\lambda_1 - \vartheta \le (\lambda_1 - \lambda_n)\,(\tan\phi_0 / T_{K-1}(1 + 2\gamma))^2`,
with :math:`\phi_0` the start's angle to the top eigenvector and
:math:`\gamma = (\lambda_1 - \lambda_2)/(\lambda_2 - \lambda_n)` (:math:`T_{K-1}` the Chebyshev polynomial
of degree :math:`K-1`), is small after few steps (Saad 2011,
Ch. 6). The first measurement starts from a Gaussian vector of a generator seeded by the run's seed.
The record carries ``sharpness`` (:math:`\vartheta`, a Rayleigh quotient, so never above
:math:`\lambda_{\max}`), ``sharpness_residual`` :math:`r = \lVert H y - \vartheta y\rVert`
(some eigenvalue lies within :math:`r` of :math:`\vartheta`: the top one unless the Krylov space missed
its direction, which a start nearly orthogonal to it can, when the weights moved far since the last
measurement; the next measurements then climb back), ``sharpness_products`` (``K + 1``
Hessian-vector products: each one a double backward, about two forward-backward passes on the
sample, plus one forward and backward to build the gradient's graph) and ``sharpness_sample_loss``
(:math:`L_B(\theta_t)`). The Ritz vector is the next warm start and travels in the checkpoints, so
a resumed run records the same values as a run never interrupted.

What the plot's lines mean. On a quadratic of curvature :math:`a`, gradient descent
:math:`\theta \leftarrow \theta - \eta a \theta` is stable iff :math:`a \le 2/\eta`; full-batch
gradient descent on a network sharpens until :math:`S` reaches :math:`2/\eta` and then hovers there,
at the edge of stability, while the loss keeps falling non-monotonically (Cohen et al. 2021,
arXiv:2103.00065). The plot always draws :math:`2/\eta` (the record's lr): **gradient descent's
threshold**. For SGD the record also carries ``stability_threshold`` :math:`c/\eta` of its update
(:func:`threshold_factor`): heavy-ball momentum :math:`\mu` with dampening :math:`\tau`,
:math:`\theta_{t+1} = \theta_t - \eta(1-\tau)\nabla L + \mu(\theta_t - \theta_{t-1})`, is stable iff
:math:`a \le (2 + 2\mu)/((1-\tau)\eta)`; Nesterov momentum iff :math:`a \le (2 + 2\mu)/((1 + 2\mu)\eta)`
(Cohen et al. 2021, App. B), and the plot draws that line too. SGD's ``weight_decay`` is an L2
penalty whose Hessian, :math:`\lambda I` on the decayed tensors, the tracked loss leaves out: the
optimizer's objective reaches its threshold when :math:`S` is up to ``weight_decay`` below the line.
For the adaptive methods (Adam, AdamW, RMSprop, ...) neither line is a threshold of :math:`S`: what
equilibrates is the preconditioned sharpness :math:`\lambda_{\max}(P^{-1}H)`, at
:math:`(2 + 2\beta_1)/((1-\beta_1)\eta)` = 38/lr for :math:`\beta_1 = 0.9` (Cohen et al. 2022,
arXiv:2207.14484), which this tracker does not measure; their records carry no ``stability_threshold``.

Strategies: those that keep the whole model, identical, on every rank after each step
(:data:`gradwise.train.config.SHARPNESS_STRATEGIES`); every rank measures the same sample at the same
weights, so the ranks agree without communicating, and rank 0 writes the record.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from gradwise.curvature import hessian_operator, top_eigenpair
from gradwise.optim.sgd import SGD
from gradwise.problems.data import Batch
from gradwise.problems.workload import DataStream

COLUMNS = ("sharpness", "sharpness_residual", "sharpness_products", "sharpness_sample_loss", "stability_threshold")
"""The keys a measurement adds to its step's metrics record (``stability_threshold`` only for SGD)."""


def fixed_sample(stream: DataStream) -> Batch:
    """The next batch of a copy of ``stream`` (the stream itself does not move): taken from a run's
    stream before its first step, the run's first batch."""
    return copy.deepcopy(stream).next_batch()


def threshold_factor(optimizer_class: type[torch.optim.Optimizer], options: dict[str, Any]) -> float | None:
    """``c`` of the stability threshold ``c / lr`` of the sharpness for an optimizer of ``optimizer_class``
    built with ``options``: 2 for gradient descent, ``(2 + 2 mu) / (1 - dampening)`` for heavy-ball momentum
    ``mu``, ``(2 + 2 mu) / (1 + 2 mu)`` for Nesterov momentum; ``None`` for any other optimizer (see the
    module's docstring), a cautious SGD (its mask changes the update) or one that maximizes."""
    if optimizer_class is not SGD or options.get("cautious", False) or options.get("maximize", False):
        return None
    momentum = float(options.get("momentum", 0.0))
    if momentum == 0.0:
        return 2.0
    if options.get("nesterov", False):
        return (2.0 + 2.0 * momentum) / (1.0 + 2.0 * momentum)
    return (2.0 + 2.0 * momentum) / (1.0 - float(options.get("dampening", 0.0)))


def _float32(tensor: Tensor) -> Tensor:
    """``tensor`` detached, with a floating type narrower than float32 cast up (a copy then)."""
    tensor = tensor.detach()
    return tensor.float() if tensor.is_floating_point() and tensor.element_size() < 4 else tensor


class _LossAt(nn.Module):
    """The workload's loss of ``model`` on ``batch`` as a module, so that ``functional_call`` can evaluate it
    at other parameters: the model is its submodule ``model``."""

    def __init__(self, model: nn.Module, loss: Callable[[nn.Module, Batch], Tensor], batch: Batch) -> None:
        super().__init__()
        self.model = model
        self.loss = loss
        self.batch = batch

    def forward(self) -> Tensor:
        return self.loss(self.model, self.batch).float()


class SharpnessTracker:
    """Measures the sharpness of ``loss`` on ``sample`` at ``model``'s current parameters, warm-started (see the
    module's docstring). ``every``: steps between measurements; ``steps``: Lanczos steps each; ``seed``: the
    first start vector's; ``factor``: :func:`threshold_factor` of the run's optimizer."""

    def __init__(
        self,
        model: nn.Module,
        loss: Callable[[nn.Module, Batch], Tensor],
        sample: Batch,
        *,
        every: int,
        steps: int,
        seed: int,
        factor: float | None,
    ) -> None:
        self.model = model
        self.loss = loss
        self.every = every
        self.steps = steps
        self.seed = seed
        self.factor = factor
        device = next(model.parameters()).device
        self.sample: Batch = (sample[0].to(device), sample[1].to(device))
        self.names = [name for name, param in model.named_parameters() if param.requires_grad]
        self.dim = sum(param.numel() for _, param in model.named_parameters() if param.requires_grad)
        self.vector: Tensor | None = None
        """The last measurement's Ritz vector (float32, on the model's device): the next start; ``None``
        before the first."""

    def due(self, step: int) -> bool:
        """Whether the run measures after ``step`` (1-based, as logged)."""
        return step % self.every == 0

    def cold_start(self) -> Tensor:
        """The first start vector: Gaussian, from a generator of its own seeded by the run's seed (the
        global generators, which the run's other draws use, do not move)."""
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randn(self.dim, generator=generator)

    def measure(self, lr: float) -> dict[str, float]:
        """Measure at the model's current parameters; returns the record's entries (:data:`COLUMNS`).
        A non-finite loss on the sample is recorded as NaN, and the warm start kept for the next."""
        wrapper = _LossAt(self.model, self.loss, self.sample)
        buffers = {f"model.{name}": _float32(buffer) for name, buffer in self.model.named_buffers()}
        params = [_float32(param) for _, param in self.model.named_parameters() if param.requires_grad]
        sample_loss: list[Tensor] = []

        def loss_fn(values: Sequence[Tensor]) -> Tensor:
            named = {f"model.{name}": value for name, value in zip(self.names, values)}
            value = torch.func.functional_call(wrapper, {**buffers, **named}, ())
            sample_loss.append(value.detach())
            return value

        with sdpa_kernel(SDPBackend.MATH):
            matvec = hessian_operator(loss_fn, params)
            record: dict[str, float] = {"sharpness_sample_loss": float(sample_loss[0])}
            if not math.isfinite(record["sharpness_sample_loss"]):
                nan = float("nan")
                return {**record, "sharpness": nan, "sharpness_residual": nan, "sharpness_products": 0}
            start = self.vector if self.vector is not None else self.cold_start().to(params[0].device)
            top = top_eigenpair(
                matvec, self.dim, steps=self.steps, start=start, dtype=torch.float32, device=params[0].device
            )
        if math.isfinite(top.eigenvalue) and bool(torch.isfinite(top.eigenvector).all()):
            self.vector = top.eigenvector
        record.update(sharpness=top.eigenvalue, sharpness_residual=top.residual, sharpness_products=top.products)
        if self.factor is not None:
            record["stability_threshold"] = self.factor / lr
        return record

    def state_dict(self) -> dict[str, Any]:
        """The warm start, for a checkpoint (tensors only: checkpoints load with ``weights_only=True``)."""
        return {} if self.vector is None else {"vector": self.vector.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a checkpoint without a vector (none measured yet, or written without
        tracking) leaves the next measurement to start cold."""
        vector = state.get("vector")
        if vector is None:
            self.vector = None
            return
        if not isinstance(vector, Tensor) or vector.shape != (self.dim,) or not bool(torch.isfinite(vector).all()):
            raise ValueError(f"the checkpoint's sharpness warm start is not a finite vector of {self.dim} entries")
        self.vector = vector.to(device=self.sample[0].device, dtype=torch.float32)
