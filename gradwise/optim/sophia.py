"""Sophia: a clipped diagonal Newton step with a Hessian estimate refreshed every k steps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from gradwise.optim.base import GradwiseOptimizer, ParamsT, maybe_negate, zeros_like
from gradwise.optim.description import Description, Preset, moments
from gradwise.validation import check_betas, check_int, check_range


class Sophia(GradwiseOptimizer):
    r"""Sophia, Second-order Clipped Stochastic Optimization (Liu et al. 2023, "Sophia: A
    Scalable Stochastic Second-order Optimizer for Language Model Pre-training",
    arXiv:2305.14342, Algorithm 3).

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\qquad
        h_t = \beta_2 h_{t-k} + (1-\beta_2)\hat h_t \ \text{every } k \text{ steps},\\
        \theta_t = (1-\eta\lambda)\,\theta_{t-1}
            - \eta\,\operatorname{clip}\!\Big(\frac{m_t}{\max(\rho\, h_t, \epsilon)},\, 1\Big),

    with :math:`\operatorname{clip}(z, 1) = \max(\min(z, 1), -1)` per coordinate: every
    coordinate moves by at most ``lr`` (plus decay), a Newton step where the curvature is
    large and a sign step where it is small, negative or not yet estimated.

    The diagonal estimate :math:`\hat h_t` comes from outside, through a two-call API, so
    that any estimator works: :attr:`hessian_update_due` says whether this step is one of
    every ``hessian_every`` (the first step is), and
    :meth:`update_hessian` folds an estimate in. The paper's two estimators live in
    :mod:`gradwise.curvature`: Hutchinson's (``hutchinson_diagonal``, Sophia-H) and
    Gauss-Newton-Bartlett (``gauss_newton_bartlett``, labels sampled from the model's own
    softmax, Sophia-G)::

        params = list(model.parameters())
        opt = gradwise.optim.Sophia(gradwise.optim.weight_decay_groups(model, 0.1), lr=1e-4, rho=0.04)
        logits = model(x)
        if opt.hessian_update_due:
            opt.update_hessian(gauss_newton_bartlett(logits, params), params)
        F.cross_entropy(logits, y).backward()
        opt.step(); opt.zero_grad()

    Defaults are those of the paper's code for GPT-2 (``betas=(0.965, 0.99)``,
    ``rho=0.04``, ``weight_decay=0.1``, ``k=10``); there :math:`\rho` also absorbs the batch
    size of the GNB estimator.

    State: :math:`m` and :math:`h` (8 bytes per fp32 parameter, Adam's) and a step counter.
    """

    description = Description(
        drive="hessian_refresh",
        sharding="tensor",  # update_hessian is handed whole parameters
        state=moments(2, scalars=1),  # momentum, Hessian diagonal estimate; step
        lr_range=(1e-4, 1.0),
        presets={
            # rho 1: the test functions' curvature is of order one; nothing to regularise
            # training: the paper's GPT-2 defaults; the loop hands it a Hutchinson estimate when due
            "sophia": Preset(
                "Sophia-H (Hutchinson diagonal every 10 steps, rho 1)",
                train={},
                race={"rho": 1.0, "weight_decay": 0.0},
                lr_scale=0.5,
            ),
        },
    )

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        eps: float = 1e-15,
        weight_decay: float = 0.1,
        *,
        hessian_every: int = 10,
        maximize: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            rho=rho,
            eps=eps,
            weight_decay=weight_decay,
            hessian_every=hessian_every,
            maximize=maximize,
        )
        super().__init__(params, defaults)

    def _validate(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        check_betas("betas", group["betas"])
        check_range("rho", group["rho"], 0.0, low_open=True)
        check_range("eps", group["eps"], 0.0, low_open=True)
        check_range("weight_decay", group["weight_decay"], 0.0)
        check_int("hessian_every", group["hessian_every"], 1)

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @property
    def hessian_update_due(self) -> bool:
        """Whether the coming step should bring a new Hessian estimate: steps 1, k + 1, 2k + 1,
        ... of each param group's interval ``k`` (by the steps its first parameter took)."""
        for group in self.param_groups:
            if not group["params"]:
                continue
            step = self.state[group["params"][0]].get("step")
            if step is None or int(step.item()) % group["hessian_every"] == 0:
                return True
        return False

    @torch.no_grad()
    def update_hessian(
        self, estimates: Mapping[Tensor, Tensor] | Sequence[Tensor], params: Sequence[Tensor] | None = None
    ) -> None:
        r"""Fold the diagonal estimates :math:`\hat h` (one tensor per parameter) into
        :math:`h \leftarrow \beta_2 h + (1-\beta_2)\hat h`.

        Each estimate is paired with its parameter by identity, never by the position of a
        param group: ``estimates`` is a mapping parameter -> estimate, or a sequence paired
        with ``params`` (the tensors the estimates were taken for, in their order, e.g. an
        estimator's own input). A sequence without ``params`` is paired with all parameters
        of all param groups in group order, which is the model's order only with a single
        group (weight-decay groups reorder it). Parameters without an estimate keep theirs.
        With ``maximize`` the estimate is of the objective being maximised, whose curvature
        is the negated one.
        """
        if isinstance(estimates, Mapping):
            params, estimates = list(estimates.keys()), list(estimates.values())
        else:
            params = self._params() if params is None else list(params)
            estimates = list(estimates)
        if len(estimates) != len(params):
            raise ValueError(f"expected one estimate per parameter ({len(params)}), got {len(estimates)}")
        group_of = {id(p): group for group in self.param_groups for p in group["params"]}
        for param, estimate in zip(params, estimates):
            group = group_of.get(id(param))
            if group is None:
                raise ValueError("update_hessian got a tensor that is not a parameter of this optimizer")
            if estimate.shape != param.shape:
                raise ValueError(
                    f"estimate of shape {tuple(estimate.shape)} for a parameter of shape {tuple(param.shape)}"
                )
            hessian = self._state(param, "hessian", zeros_like)
            hessian.lerp_(-estimate if group["maximize"] else estimate, 1 - group["betas"][1])

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        lr, (beta1, _) = group["lr"], group["betas"]
        grads = maybe_negate(grads, group["maximize"])
        torch._foreach_add_(self._step_counters(params, on_device=False), 1)
        exp_avgs = [self._state(p, "exp_avg", zeros_like) for p in params]
        hessians = [self._state(p, "hessian", zeros_like) for p in params]
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        if group["weight_decay"] != 0:
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        denominators = torch._foreach_mul(hessians, group["rho"])
        torch._foreach_clamp_min_(denominators, group["eps"])
        ratios = torch._foreach_div(exp_avgs, denominators)
        torch._foreach_clamp_min_(ratios, -1.0)
        torch._foreach_clamp_max_(ratios, 1.0)
        torch._foreach_add_(params, ratios, alpha=-lr)
