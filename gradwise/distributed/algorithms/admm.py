r"""Consensus ADMM (Douglas-Rachford splitting on the consensus constraint) over the ranks.

Boyd, Parikh, Chu, Peleato & Eckstein 2011, "Distributed optimization and statistical
learning via the alternating direction method of multipliers", Sec. 7.1. Rank :math:`i` of
:math:`N` holds its own :math:`f_i`; together they solve

.. math::
    \min_{x_1, \dots, x_N, z} \sum_{i=1}^N f_i(x_i) \quad \text{s.t.}\quad x_i = z,

whose solution is :math:`z = \arg\min \sum_i f_i`. In scaled form, with penalty :math:`\rho`:

.. math::
    x_i^{k+1} &= \arg\min_x\ f_i(x) + \tfrac\rho2 \lVert x - z^k + u_i^k\rVert^2
        \quad\text{(local solve, no communication)}\\
    z^{k+1} &= \tfrac1N \sum_i \big(x_i^{k+1} + u_i^k\big) \quad\text{(one all-reduce)}\\
    u_i^{k+1} &= u_i^k + x_i^{k+1} - z^{k+1}.

For a weighted sum such as :math:`F = \sum_i \frac{n_i}{n} F_i` give rank :math:`i` the weighted
:math:`f_i = \frac{n_i}{n} F_i`. For closed proper convex :math:`f_i` the iterates converge to the
solution for every :math:`\rho > 0` (Boyd et al., Sec. 3.2), linearly when the :math:`f_i` are
strongly convex and smooth. The local solve runs a few iterations of Newton's method
(:class:`gradwise.optim.Newton`, dense Hessian; small models) or L-BFGS
(:class:`gradwise.optim.LBFGS`), warm-started at the previous :math:`x_i`.

Stopping (Boyd et al., Sec. 3.3.1, and their consensus residuals, Sec. 7.1): the primal and
dual residuals

.. math::
    \lVert r^k\rVert = \Big(\sum_i \lVert x_i^k - z^k\rVert^2\Big)^{1/2},\qquad
    \lVert s^k\rVert = \rho \sqrt N\, \lVert z^k - z^{k-1}\rVert,

fall below :math:`\epsilon^{\text{pri}} = \sqrt{N d}\,\epsilon^{\text{abs}} + \epsilon^{\text{rel}}
\max\big((\sum_i\lVert x_i\rVert^2)^{1/2}, \sqrt N \lVert z\rVert\big)` and
:math:`\epsilon^{\text{dual}} = \sqrt{N d}\,\epsilon^{\text{abs}} + \epsilon^{\text{rel}}\,\rho
(\sum_i \lVert u_i\rVert^2)^{1/2}`. The three sums travel in a second, 3-number all-reduce,
so every rank stops at the same iteration. Bytes per iteration and rank: (d + 3) x element size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from gradwise.optim.lbfgs import LBFGS
from gradwise.optim.newton import Newton
from gradwise.validation import check_choice, check_int, check_range

LOCAL_SOLVERS = ("newton", "lbfgs")


@dataclass
class ADMMResult:
    """The consensus :math:`z`, how the run ended, and the residuals of every iteration."""

    z: Tensor
    iterations: int
    converged: bool
    primal_residuals: list[float] = field(default_factory=list)
    dual_residuals: list[float] = field(default_factory=list)
    bytes_communicated: int = 0


def _local_solve(objective: Callable[[Tensor], Tensor], start: Tensor, target: Tensor, rho: float,
                 solver: str, iterations: int) -> Tensor:
    """A few iterations on :math:`f_i(x) + \\frac\\rho2\\lVert x - v\\rVert^2`, :math:`v = z - u_i`, from ``start``."""
    x = start.clone().requires_grad_(True)

    def augmented() -> Tensor:
        return objective(x) + 0.5 * rho * (x - target).square().sum()

    if solver == "newton":
        newton = Newton([x])
        for _ in range(iterations):
            newton.step(augmented)
    else:
        lbfgs = LBFGS([x], max_iter=iterations, tolerance_grad=0.0, tolerance_change=0.0, line_search_fn="more_thuente")

        def closure() -> Tensor:
            lbfgs.zero_grad()
            loss = augmented()
            loss.backward()
            return loss

        lbfgs.step(closure)
    return x.detach()


def consensus_admm(
    local_objective: Callable[[Tensor], Tensor],
    x0: Tensor,
    *,
    rho: float = 1.0,
    max_iterations: int = 500,
    abs_tol: float = 1e-10,
    rel_tol: float = 1e-8,
    local_solver: str = "newton",
    local_iterations: int = 3,
    process_group: dist.ProcessGroup | None = None,
) -> ADMMResult:
    """Minimise :math:`\\sum_i f_i` over the ranks by consensus ADMM (collective: every rank calls it).

    Args:
        local_objective: :math:`f_i`, this rank's term: flat tensor -> scalar loss tensor,
            twice differentiable for ``local_solver="newton"``.
        x0: the starting point (flat, the same on every rank); :math:`z^0 = x_i^0 = x_0`, :math:`u^0 = 0`.
        rho: the penalty :math:`\\rho > 0`.
        max_iterations: the most ADMM iterations.
        abs_tol, rel_tol: :math:`\\epsilon^{\\text{abs}}, \\epsilon^{\\text{rel}} \\geq 0` of the stopping rule.
        local_solver: ``"newton"`` or ``"lbfgs"``.
        local_iterations: iterations of the local solver per ADMM iteration.
        process_group: the ranks taking part (default: the whole world).

    Example::

        result = consensus_admm(lambda x: weight * my_loss(x), torch.zeros(d, dtype=torch.float64), rho=0.05)
        result.z        # the minimiser of the sum, on every rank
    """
    check_range("rho", rho, 0.0, low_open=True)
    check_int("max_iterations", max_iterations, 1)
    check_range("abs_tol", abs_tol, 0.0)
    check_range("rel_tol", rel_tol, 0.0)
    check_choice("local_solver", local_solver, LOCAL_SOLVERS)
    check_int("local_iterations", local_iterations, 1)
    if x0.ndim != 1 or not x0.is_floating_point():
        raise ValueError(f"x0 must be a flat floating-point tensor, got shape {tuple(x0.shape)} of {x0.dtype}")
    ranks = dist.get_world_size(process_group)
    scale = (ranks * x0.numel()) ** 0.5
    z, x, u = x0.detach().clone(), x0.detach().clone(), torch.zeros_like(x0)
    result = ADMMResult(z=z, iterations=0, converged=False)
    for iteration in range(1, max_iterations + 1):
        x = _local_solve(local_objective, x, z - u, rho, local_solver, local_iterations)
        total = x + u
        dist.all_reduce(total, group=process_group)
        z_previous, z = z, total / ranks
        u = u + x - z
        sums = torch.stack([(x - z).square().sum(), x.square().sum(), u.square().sum()])
        dist.all_reduce(sums, group=process_group)
        result.bytes_communicated += (total.numel() + sums.numel()) * total.element_size()
        primal_sq, x_sq, u_sq = sums.tolist()
        primal = primal_sq**0.5
        dual = rho * ranks**0.5 * float((z - z_previous).norm())
        result.primal_residuals.append(primal)
        result.dual_residuals.append(dual)
        eps_primal = scale * abs_tol + rel_tol * max(x_sq**0.5, ranks**0.5 * float(z.norm()))
        eps_dual = scale * abs_tol + rel_tol * rho * u_sq**0.5
        result.z, result.iterations = z, iteration
        if primal <= eps_primal and dual <= eps_dual:
            result.converged = True
            break
    return result
