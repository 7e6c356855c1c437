r"""Newton's method: exact (dense Hessian, Cholesky) and Hessian-free (Newton-CG).

Both take a closure that *returns the loss without calling* ``backward()``: the optimizer
differentiates it itself, twice. Both run one Newton iteration per ``step(closure)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gradwise.optim.base import GradwiseOptimizer, ParamsT, lr_value
from gradwise.optim.description import Description, Preset, StateSize
from gradwise.optim.flat_params import FlatParams, SingleParamGroup, single_group_params
from gradwise.optim.line_search import backtracking_search
from gradwise.validation import check_int, check_range

Closure = Callable[[], Tensor]


def _require_closure(closure: Closure | None, name: str) -> Closure:
    if closure is None:
        raise RuntimeError(f"{name}.step needs a closure that returns the loss (without calling backward())")
    return closure


def loss_and_gradient(closure: Closure, flat: FlatParams, name: str, create_graph: bool) -> tuple[Tensor, Tensor]:
    """Evaluate ``closure`` and differentiate it; the gradient (flat) keeps its graph with
    ``create_graph``. Also stores the gradient in each parameter's ``.grad``."""
    with torch.enable_grad():
        loss = closure()
        if not isinstance(loss, Tensor) or loss.ndim != 0 or loss.grad_fn is None:
            raise RuntimeError(f"{name}'s closure must return a scalar loss tensor that depends on the parameters")
        try:
            grads = torch.autograd.grad(loss, flat.params, create_graph=create_graph, materialize_grads=True)
        except RuntimeError as error:
            raise RuntimeError(
                f"{name} differentiates the closure's loss itself: the closure must not call backward() ({error})"
            ) from error
        flat_grad = torch.cat([g.reshape(-1) for g in grads])
    for p, g in zip(flat.params, grads):
        p.grad = g.detach().clone()
    return loss, flat_grad


def _armijo(closure: Closure, flat: FlatParams, start: Tensor, direction: Tensor, loss: float, slope: float, lr: float):
    """Backtracking on ``closure`` along ``direction`` from ``start``; leaves the parameters at the accepted point."""

    def phi(t: float) -> tuple[float, float, None]:
        flat.assign(start + t * direction)
        with torch.no_grad():
            return float(closure()), math.nan, None

    rounding = 16 * torch.finfo(start.dtype).eps * abs(loss)
    result = backtracking_search(phi, loss, slope, lr, value_tolerance=rounding)
    flat.assign(start + result.step * direction)
    return result


def _no_tensor_state(shape, options) -> StateSize:
    """Newton and Newton-CG keep only counters (Python numbers) between steps; the dense
    Hessian (Newton: numel^2 values) or the CG vectors live within a step."""
    return StateSize(0)


class Newton(SingleParamGroup, GradwiseOptimizer):
    r"""Newton's method with the dense Hessian and a Cholesky solve, for small problems.

    .. math:: (\nabla^2 f(x_k) + \tau_k I)\, d_k = -\nabla f(x_k),\qquad x_{k+1} = x_k + t_k d_k,

    with :math:`\tau_k` the smallest of ``damping``, then ``max(2 tau, 1e-3 max|H_ii|)``,
    doubling, that makes the matrix positive definite (Cholesky with added multiple of the
    identity, Nocedal & Wright 2006, Alg. 3.3), and :math:`t_k` from Armijo backtracking
    starting at ``lr`` (``line_search=False``: :math:`t_k` = ``lr``). Near a strongly convex
    minimiser :math:`\tau = 0` and :math:`t = 1`, and convergence is quadratic.

    Cost per step: the Hessian by ``n`` Hessian-vector products (batched) and an
    :math:`O(n^3)` factorisation, :math:`n` the number of parameters; memory :math:`n^2`.
    State: ``func_evals``, ``n_iter`` and the last shift ``tau``.

    Example::

        opt = gradwise.optim.Newton([x])
        for _ in range(20):
            opt.step(lambda: f(x))      # the closure returns the loss; no backward()
    """

    description = Description(drive="loss_closure", sharding=None, state=_no_tensor_state, flat_state=True)

    def __init__(self, params: ParamsT, lr: float = 1.0, damping: float = 0.0, line_search: bool = True) -> None:
        super().__init__(params, dict(lr=lr, damping=damping, line_search=line_search))

    def _validate(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0, low_open=True)
        check_range("damping", group["damping"], 0.0)

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Tensor:  # type: ignore[override]  # a required closure and a tensor loss, as torch's own LBFGS.step
        """One Newton iteration; returns the loss at the starting point."""
        closure = _require_closure(closure, "Newton")
        group = self.param_groups[0]
        flat = single_group_params(self, complex_params=False)
        state = self.state[flat.params[0]]
        loss, grad = loss_and_gradient(closure, flat, "Newton", create_graph=True)
        with torch.enable_grad():
            identity = torch.eye(flat.numel, dtype=grad.dtype, device=grad.device)
            rows = torch.autograd.grad(grad, flat.params, identity, is_grads_batched=True, allow_unused=True)
        # A parameter the gradient does not depend on has zero Hessian rows (torch's
        # materialize_grads drops the batch dimension there, so they are built here).
        blocks = [
            grad.new_zeros(flat.numel, p.numel()) if row is None else row.reshape(flat.numel, -1)
            for row, p in zip(rows, flat.params)
        ]
        hessian = torch.cat(blocks, dim=1)
        hessian = (hessian + hessian.T) / 2
        grad = grad.detach()
        shift = group["damping"]
        while True:
            factor, info = torch.linalg.cholesky_ex(hessian + shift * identity)
            if int(info) == 0:
                break
            shift = max(2.0 * shift, 1e-3 * float(hessian.diagonal().abs().max()), 1e-12)
        direction = torch.cholesky_solve(-grad.unsqueeze(1), factor).squeeze(1)
        start = flat.values()
        evals = 1
        if group["line_search"]:
            search = _armijo(closure, flat, start, direction, float(loss), float(grad @ direction), lr_value(group))
            evals += search.evaluations
        else:
            flat.assign(start + lr_value(group) * direction)
        state["func_evals"] = state.get("func_evals", 0) + evals
        state["n_iter"] = state.get("n_iter", 0) + 1
        state["shift"] = shift
        return loss.detach()


class NewtonCG(SingleParamGroup, GradwiseOptimizer):
    r"""Hessian-free inexact Newton: conjugate gradient on the damped Newton system with
    Hessian-vector products, Levenberg-Marquardt damping that adapts, and a line search
    (Nocedal & Wright 2006, Alg. 7.1; Martens 2010, ICML, "Deep learning via Hessian-free
    optimization"; Byrd, Chin, Neveitt & Nocedal 2011, SIAM J. Optim. 21, for the
    subsampled Hessian).

    Each step solves :math:`(H_k + \mu_k I)\, d = -g_k` by CG from :math:`d = 0`, with

    - damping :math:`\mu_k = \lambda_k \lVert g_k\rVert`: scaling by the gradient norm makes
      it vanish at a minimiser, which keeps the local convergence quadratic (Fan & Yuan 2005,
      Computing 74), and :math:`\lambda_k` adapts by the reduction ratio
      :math:`\rho = (f(x_k + t d) - f(x_k)) / (t g^\top d + \tfrac{t^2}{2} d^\top H d)`:
      :math:`\lambda \leftarrow` ``damping_increase`` :math:`\lambda` if :math:`\rho < 1/4`,
      ``damping_decrease`` :math:`\lambda` if :math:`\rho > 3/4` (Martens 2010, Sec. 4.1);
    - truncation when the relative residual :math:`\lVert r\rVert / \lVert g\rVert` falls
      below the forcing term :math:`\eta_k = \min(1/2, \lVert g_k\rVert)` (``cg_tol=None``;
      quadratic convergence, Nocedal & Wright Thm. 7.2) or a fixed ``cg_tol``, after
      ``cg_max_iter`` iterations, or at negative curvature :math:`p^\top (H+\mu I) p \le 0`
      (then the current iterate, or :math:`-g` on the first CG iteration, is used);
    - Armijo backtracking from ``lr`` on the closure (``line_search=False``: the step ``lr``).

    ``step(closure, hessian_closure=None)``: ``closure`` returns the loss on the gradient's
    sample (the full batch, or a mini-batch); ``hessian_closure``, if given, returns the loss on
    a (smaller) sample used only for the Hessian-vector products (subsampled Newton). Neither
    calls ``backward()``.

    State: ``func_evals``, ``hvp_evals``, ``cg_iters`` (totals), ``n_iter``, the damping
    ``lambda``; CG needs 4 vectors of the parameters' size during a step.

    Example::

        opt = gradwise.optim.NewtonCG(model.parameters())
        opt.step(lambda: loss_fn(model(x), y), hessian_closure=lambda: loss_fn(model(x[:64]), y[:64]))
    """

    description = Description(
        drive="loss_closure",  # the optional hessian_closure is a subsample: plain step(loss_fn) is Newton-CG
        sharding=None,
        state=_no_tensor_state,
        flat_state=True,
        # training: on a mini-batch, a stronger damping and a short CG keep it from fitting the batch alone
        presets={"newton-cg": Preset("Newton-CG (truncated conjugate gradient)",
                                     train={"cg_max_iter": 5, "damping": 0.1}, lr_scale=30.0)},
    )

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1.0,
        damping: float = 1e-3,
        damping_increase: float = 1.5,
        damping_decrease: float = 2.0 / 3.0,
        cg_max_iter: int = 100,
        cg_tol: float | None = None,
        line_search: bool = True,
    ) -> None:
        defaults = dict(
            lr=lr,
            damping=damping,
            damping_increase=damping_increase,
            damping_decrease=damping_decrease,
            cg_max_iter=cg_max_iter,
            cg_tol=cg_tol,
            line_search=line_search,
        )
        super().__init__(params, defaults)

    def _validate(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0, low_open=True)
        check_range("damping", group["damping"], 0.0, low_open=True)
        check_range("damping_increase", group["damping_increase"], 1.0, low_open=True)
        check_range("damping_decrease", group["damping_decrease"], 0.0, 1.0, low_open=True, high_open=True)
        check_int("cg_max_iter", group["cg_max_iter"], 1)
        if group["cg_tol"] is not None:
            check_range("cg_tol", group["cg_tol"], 0.0, 1.0, low_open=True, high_open=True)

    @torch.no_grad()
    def step(self, closure: Closure | None = None, hessian_closure: Closure | None = None) -> Tensor:  # type: ignore[override]  # as Newton.step
        """One inexact Newton iteration; returns the loss at the starting point."""
        closure = _require_closure(closure, "NewtonCG")
        group = self.param_groups[0]
        flat = single_group_params(self, complex_params=False)
        state = self.state[flat.params[0]]
        lam = state.setdefault("lambda", float(group["damping"]))
        loss, grad_graph = loss_and_gradient(closure, flat, "NewtonCG", create_graph=hessian_closure is None)
        if hessian_closure is not None:
            _, hessian_grad = loss_and_gradient(hessian_closure, flat, "NewtonCG", create_graph=True)
            for p, g in zip(flat.params, flat.pieces(grad_graph)):
                p.grad = g.detach().clone()
        else:
            hessian_grad = grad_graph
        grad = grad_graph.detach()
        grad_norm = float(grad.norm())
        mu = lam * grad_norm
        hvp_count = 0

        def hessian_times(vector: Tensor) -> Tensor:
            nonlocal hvp_count
            hvp_count += 1
            with torch.enable_grad():
                # hessian_grad is the flat gradient, so the vector it is contracted with is flat too.
                product = torch.autograd.grad(
                    hessian_grad, flat.params, vector, retain_graph=True, materialize_grads=True
                )
            return torch.cat([p.reshape(-1) for p in product])

        tolerance = (min(0.5, grad_norm) if group["cg_tol"] is None else group["cg_tol"]) * grad_norm
        direction, curvature = self._conjugate_gradient(hessian_times, grad, mu, tolerance, group["cg_max_iter"])
        state["cg_iters"] = state.get("cg_iters", 0) + hvp_count
        state["hvp_evals"] = state.get("hvp_evals", 0) + hvp_count

        slope = float(grad @ direction)
        start = flat.values()
        evals = 1
        if group["line_search"] and slope < 0:
            result = _armijo(closure, flat, start, direction, float(loss), slope, lr_value(group))
            t, new_value = result.step, result.value
            evals += result.evaluations
        else:
            t = lr_value(group)
            flat.assign(start + t * direction)
            with torch.no_grad():
                new_value = float(closure())
            evals += 1
        predicted = t * slope + 0.5 * t * t * curvature
        ratio = (new_value - float(loss)) / predicted if predicted < 0 else -math.inf
        if ratio < 0.25:
            lam *= group["damping_increase"]
        elif ratio > 0.75:
            lam *= group["damping_decrease"]
        state["lambda"] = lam
        state["func_evals"] = state.get("func_evals", 0) + evals
        state["n_iter"] = state.get("n_iter", 0) + 1
        return loss.detach()

    @staticmethod
    def _conjugate_gradient(
        hessian_times: Callable[[Tensor], Tensor], grad: Tensor, mu: float, tolerance: float, max_iter: int
    ) -> tuple[Tensor, float]:
        """CG on ``(H + mu I) d = -grad``; returns ``d`` and ``d^T H d`` (undamped)."""
        direction = torch.zeros_like(grad)
        residual = grad.neg()
        search = residual.clone()
        rr = float(residual @ residual)
        for iteration in range(max_iter):
            product = hessian_times(search) + mu * search
            curvature = float(search @ product)
            if curvature <= 0:
                if iteration == 0:
                    return search, curvature - mu * rr
                break
            alpha = rr / curvature
            direction.add_(search, alpha=alpha)
            residual.sub_(product, alpha=alpha)
            rr_new = float(residual @ residual)
            if math.sqrt(rr_new) <= tolerance:
                break
            search.mul_(rr_new / rr).add_(residual)
            rr = rr_new
        # (H + mu I) d = -g - r, so d^T H d = -d^T g - d^T r - mu |d|^2.
        damped = -float(direction @ grad) - float(direction @ residual)
        return direction, damped - mu * float(direction @ direction)
