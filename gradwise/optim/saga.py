r"""SAGA: variance reduction with a table of past gradients."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from gradwise.optim.base import GradwiseOptimizer, ParamsT, lr_value
from gradwise.optim.description import Description, Preset, StateSize, numel
from gradwise.optim.svrg import gradients_of
from gradwise.validation import check_int, check_range


def _zero_table(param: torch.Tensor, slots: int) -> torch.Tensor:
    """A table of ``slots`` zero gradients shaped like ``param``."""
    return param.new_zeros((slots, *param.shape))


def _saga_state(shape, options) -> StateSize:
    """Defazio et al. 2014 (arXiv:1407.0202): a gradient per slot and their mean."""
    return StateSize((options.get("num_slots", 1) + 1) * numel(shape))


class SAGA(GradwiseOptimizer):
    r"""SAGA (Defazio, Bach & Lacoste-Julien 2014, NeurIPS, arXiv:1407.0202).

    For :math:`F(x) = \frac1n\sum_{j=1}^n f_j(x)` the optimizer keeps a table of the last
    gradient :math:`\phi_j` seen for every slot :math:`j` and their mean
    :math:`\bar\phi`. A step on slot :math:`j` with fresh gradient :math:`g = \nabla f_j(x)`:

    .. math::
        x \leftarrow x - \eta\,(g - \phi_j + \bar\phi),\qquad
        \bar\phi \leftarrow \bar\phi + (g - \phi_j)/n,\qquad \phi_j \leftarrow g,

    an unbiased estimate (for :math:`j` uniform) whose variance vanishes at the optimum, so a
    constant step (:math:`\eta = 1/(3L)` in the analysis) converges linearly on strongly
    convex sums. The table starts at zero (the first visit to each slot then acts as a
    plain, down-weighted gradient step), as in scikit-learn's SAG/SAGA solvers.

    A *slot* is whatever unit the caller fixes: one example (classic SAGA), or one block of
    a fixed partition of the data into mini-batches (mini-batch SAGA; fewer slots, less
    memory). ``step(slot, closure)``: ``closure`` computes the loss of that slot (mean over
    its examples) and calls ``backward()``; one gradient evaluation per step.

    Memory: the table holds ``num_slots`` copies of the parameters, ``num_slots * numel *
    bytes_per_element`` (e.g. 1000 slots of a 47,000-parameter fp64 model: 376 MB), plus one
    for the mean. For linear models the table could store one scalar per example instead;
    this general form does not assume a linear model.

    Example::

        opt = gradwise.optim.SAGA([w], lr=0.1, num_slots=len(batches))
        for _ in range(epochs * len(batches)):
            j = int(torch.randint(len(batches), ()))
            opt.step(j, lambda: batch_loss(w, batches[j]))
    """

    description = Description(
        drive="sample_index",
        sharding=None,
        state=_saga_state,
        presets={"saga": Preset("SAGA (a stored gradient per sample)", train={}, lr_scale=30.0)},
    )

    def __init__(self, params: ParamsT, lr: float = 0.01, num_slots: int = 1) -> None:
        super().__init__(params, dict(lr=lr, num_slots=num_slots))

    def _validate(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        check_int("num_slots", group["num_slots"], 1)

    @torch.no_grad()
    def step(self, slot: int | None = None, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One SAGA step on ``slot`` with the gradient from ``closure``."""
        if closure is None or slot is None:
            raise RuntimeError("SAGA.step needs a slot index and a closure that computes its loss and calls backward()")
        for group in self.param_groups:
            check_int("slot", slot, 0, group["num_slots"] - 1)
        params = [p for group in self.param_groups for p in group["params"]]
        loss, grads = gradients_of(closure, params)
        by_param = {id(p): g for p, g in zip(params, grads)}
        for group in self.param_groups:
            group_params = group["params"]
            fresh = [by_param[id(p)] for p in group_params]
            tables = [
                self._state(p, "gradient_table", partial(_zero_table, slots=group["num_slots"]))
                for p in group_params
            ]
            means = [self._state(p, "gradient_mean", torch.zeros_like) for p in group_params]
            old = [table[slot] for table in tables]
            change = torch._foreach_sub(fresh, old)
            estimate = torch._foreach_add(change, means)
            torch._foreach_add_(group_params, estimate, alpha=-lr_value(group))
            torch._foreach_add_(means, change, alpha=1.0 / group["num_slots"])
            torch._foreach_copy_(old, fresh)
            for p, v in zip(group_params, estimate):
                p.grad = v
        return loss
