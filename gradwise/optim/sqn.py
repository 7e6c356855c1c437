r"""Stochastic quasi-Newton (SQN): L-BFGS steps on stochastic gradients with curvature pairs
from subsampled Hessian-vector products."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gradwise.optim.base import GradwiseOptimizer, ParamsT, lr_value
from gradwise.optim.description import Description, Preset
from gradwise.optim.flat_params import SingleParamGroup, single_group_params
from gradwise.optim.quasi_newton import CurvaturePairs, history_state
from gradwise.validation import check_int, check_range


class SQN(SingleParamGroup, GradwiseOptimizer):
    r"""The stochastic quasi-Newton method of Byrd, Hansen, Nocedal & Singer (2016, SIAM J.
    Optim. 26, arXiv:1401.7020).

    Steps use the mini-batch gradient :math:`g_k` (the parameters' ``.grad``):

    .. math:: x_{k+1} = x_k - \alpha\, H_t\, g_k \quad(\text{plain SGD until the first pair}),

    with :math:`H_t` the L-BFGS matrix of the last ``history_size`` pairs. Every
    ``update_every`` (:math:`L`) steps the average of the last :math:`L` iterates
    :math:`\bar x_t` gives a pair

    .. math:: s_t = \bar x_t - \bar x_{t-1},\qquad y_t = \nabla^2 F_{S_H}(\bar x_t)\, s_t,

    the Hessian-vector product on a separate sample :math:`S_H` (``hessian_closure``).
    Unlike gradient differences on a mini-batch (oLBFGS, Schraudolph, Yu & Günter 2007),
    :math:`y_t` carries no gradient noise, and averaging iterates over :math:`L` steps makes
    :math:`s_t` long enough to measure curvature. Pairs with :math:`s^\top y \le 10^{-10}` are
    skipped. A pair costs one Hessian-vector product every :math:`L` steps.

    ``step(closure=None, hessian_closure=None)``: ``closure`` (optional, torch style) computes
    the mini-batch loss and calls ``backward()``; ``hessian_closure`` returns the loss on the
    Hessian sample *without* calling ``backward()``, and is needed at every ``L``-th step
    (``needs_hessian_closure`` says whether the next step will call it); it is evaluated at
    :math:`\bar x_t`, the parameters being restored afterwards.

    State: ``2 * history_size + 2`` vectors of the parameters' size.

    Example::

        opt = gradwise.optim.SQN(model.parameters(), lr=0.1, update_every=10)
        loss_fn(model(xb), yb).backward()
        opt.step(hessian_closure=lambda: loss_fn(model(xh), yh)); opt.zero_grad()
    """

    description = Description(
        drive="hessian_closure",
        sharding=None,
        state=history_state,
        flat_state=True,
        presets={"sqn": Preset("stochastic quasi-Newton (Byrd et al. 2016)", train={}, lr_scale=30.0)},
    )

    def __init__(self, params: ParamsT, lr: float = 0.1, history_size: int = 10, update_every: int = 10) -> None:
        super().__init__(params, dict(lr=lr, history_size=history_size, update_every=update_every))

    def _validate(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        check_int("history_size", group["history_size"], 1)
        check_int("update_every", group["update_every"], 1)

    @property
    def history_full(self) -> bool:
        """Whether the history holds ``history_size`` curvature pairs: from then on the state is
        as large as it gets (what the memory rule counts)."""
        group = self.param_groups[0]
        return len(self.state[group["params"][0]].get("s_history", [])) == group["history_size"]

    @property
    def needs_hessian_closure(self) -> bool:
        """Whether the next ``step()`` forms a curvature pair (and so calls ``hessian_closure``)."""
        group = self.param_groups[0]
        state = self.state[group["params"][0]]
        step = state.get("step", 0) + 1
        return step % group["update_every"] == 0 and "previous_average" in state

    @torch.no_grad()
    def step(
        self, closure: Callable[[], Any] | None = None, hessian_closure: Callable[[], Tensor] | None = None
    ) -> Any:
        """One SQN step with the parameters' current gradients."""
        if self.needs_hessian_closure and hessian_closure is None:
            raise RuntimeError("SQN.step needs hessian_closure at this step (a curvature pair is due)")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        flat = single_group_params(self, complex_params=False)
        state = self.state[flat.params[0]]
        state["step"] = state.get("step", 0) + 1
        s_history, y_history = state.setdefault("s_history", []), state.setdefault("y_history", [])
        pairs = CurvaturePairs(s_history, y_history, group["history_size"])
        grad = flat.grads()
        if pairs.s_history:
            direction = pairs.direction(grad, state["gamma"])
        else:
            direction = grad.neg()
        flat.add_(direction, alpha=lr_value(group))

        iterate_sum = state.setdefault("iterate_sum", torch.zeros_like(grad))
        iterate_sum.add_(flat.values())
        if state["step"] % group["update_every"] == 0:
            average = iterate_sum / group["update_every"]
            iterate_sum.zero_()
            if "previous_average" in state:
                s = average - state["previous_average"]
                y = self._hessian_vector_product(flat, hessian_closure, average, s)
                sy = pairs.push(s, y)
                if sy is not None:
                    state["gamma"] = float(sy) / float(y @ y)
            state["previous_average"] = average
        return loss

    @staticmethod
    def _hessian_vector_product(flat, hessian_closure, point: Tensor, vector: Tensor) -> Tensor:
        current = flat.values()
        flat.assign(point)
        try:
            with torch.enable_grad():
                loss = hessian_closure()
                if not isinstance(loss, Tensor) or loss.grad_fn is None:
                    raise RuntimeError("SQN's hessian_closure must return a loss that depends on the parameters")
                grads = torch.autograd.grad(loss, flat.params, create_graph=True, materialize_grads=True)
                product = torch.autograd.grad(grads, flat.params, flat.pieces(vector), materialize_grads=True)
        finally:
            flat.assign(current)
        return torch.cat([p.reshape(-1) for p in product]).detach()
