r"""The curvature-pair history and the limited-memory BFGS direction (two-loop recursion)
shared by ``LBFGS`` and ``SQN``.

With curvature pairs :math:`(s_i, y_i)`, :math:`\rho_i = 1/(y_i^\top s_i)`, the L-BFGS
inverse-Hessian approximation applied to :math:`q = g` is (Nocedal 1980, Math. Comp. 35;
Nocedal & Wright 2006, Alg. 7.4)::

    for i = newest .. oldest:  a_i = rho_i s_i^T q;  q -= a_i y_i
    r = gamma q,  gamma = s^T y / y^T y of the newest pair
    for i = oldest .. newest:  b = rho_i y_i^T r;  r += (a_i - b) s_i

and the search direction is :math:`-r`. The memory is ``2 m`` vectors of the parameters' size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from gradwise.optim.description import StateSize


def lbfgs_direction(
    grad: Tensor, s_history: Sequence[Tensor], y_history: Sequence[Tensor], gamma: float | Tensor
) -> Tensor:
    """``-H grad`` for the L-BFGS matrix of the pairs (oldest first) with initial scaling ``gamma``.

    The scalars stay 0-d tensors of the vectors' dtype, as in torch.optim.LBFGS, so the
    rounding (in float32, say) is torch's and :class:`~gradwise.optim.LBFGS` keeps torch's
    iterates."""
    rhos = [1.0 / torch.vdot(y, s) for s, y in zip(s_history, y_history)]
    alphas: list[Tensor] = [grad.new_zeros(())] * len(rhos)
    q = grad.neg()
    for i in range(len(rhos) - 1, -1, -1):
        alphas[i] = torch.vdot(s_history[i], q) * rhos[i]
        q.add_(y_history[i], alpha=-alphas[i])  # type: ignore[arg-type]  # torch takes a 0-d tensor alpha
    r = q.mul_(gamma)
    for i in range(len(rhos)):
        beta = torch.vdot(y_history[i], r) * rhos[i]
        r.add_(s_history[i], alpha=alphas[i] - beta)  # type: ignore[arg-type]  # as above
    return r


CURVATURE_THRESHOLD = 1e-10
"""A pair is kept only when :math:`y^\top s` exceeds this: the BFGS update needs positive
curvature to stay positive definite (torch.optim.LBFGS's threshold)."""


class CurvaturePairs:
    """The last ``history_size`` curvature pairs :math:`(s, y)`, oldest first, held in lists
    that live in the optimizer's state (so each optimizer keeps its own state keys: torch's
    ``old_stps``/``old_dirs``/``ro`` for LBFGS, ``s_history``/``y_history`` for SQN)."""

    def __init__(self, s_history: list[Tensor], y_history: list[Tensor], history_size: int,
                 rho: list[Tensor] | None = None) -> None:
        self.s_history, self.y_history, self.history_size, self.rho = s_history, y_history, history_size, rho

    def push(self, s: Tensor, y: Tensor) -> Tensor | None:
        """Keep the pair if its curvature :math:`y^\top s` exceeds :data:`CURVATURE_THRESHOLD`,
        forgetting the oldest pair of a full history; the curvature (0-d), or ``None`` when the
        pair is dropped."""
        ys = y.dot(s)
        if not ys > CURVATURE_THRESHOLD:
            return None
        if len(self.s_history) == self.history_size:
            del self.s_history[0], self.y_history[0]
            if self.rho is not None:
                del self.rho[0]
        self.s_history.append(s)
        self.y_history.append(y)
        if self.rho is not None:
            self.rho.append(1.0 / ys)
        return ys

    def direction(self, grad: Tensor, gamma: float | Tensor) -> Tensor:
        """``-H grad`` for the L-BFGS matrix of the pairs with initial scaling ``gamma``."""
        return lbfgs_direction(grad, self.s_history, self.y_history, gamma)


def history_state(shape: tuple[int, ...], options: Mapping[str, Any]) -> StateSize:
    """State of L-BFGS (Nocedal 1980; Liu & Nocedal 1989) and stochastic quasi-Newton (Byrd et
    al. 2016, arXiv:1401.7020) over a flat param group of ``shape == (numel,)``:
    ``history_size`` pairs (s, y) and two more vectors (L-BFGS: the last gradient and
    direction; SQN: the running sum of iterates and the last average), at a full history."""
    return StateSize((2 * options.get("history_size", 100) + 2) * shape[0])
