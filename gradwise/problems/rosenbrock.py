"""The Rosenbrock function ("banana valley"), in two or more dimensions."""

from __future__ import annotations

import torch
from torch import Tensor

from gradwise.problems.base import Problem
from gradwise.validation import check_int


class Rosenbrock(Problem):
    r"""Rosenbrock's curved valley, chained to ``dim`` variables:

    .. math::
        f(x) = \sum_{i=1}^{n-1} \left[ 100\,(x_{i+1} - x_i^2)^2 + (1 - x_i)^2 \right].

    Minimiser ``x* = (1, ..., 1)``, minimum ``f(x*) = 0``. The valley floor
    ``x_{i+1} = x_i^2`` is flat along the valley and steep across it (the Hessian at ``x*``
    has condition number about 2,500 in 2-D), which makes plain gradient descent crawl.
    For ``4 <= n <= 7`` there is one more local minimiser near ``(-1, 1, ..., 1)``
    (Shang & Qiu 2006).

    Start: ``(-1.2, 1)`` from Rosenbrock (1960), continued as ``(-1.2, 1, -1.2, 1, ...)``
    in ``n`` dimensions, the starting point of the extended Rosenbrock function in
    Moré, Garbow & Hillstrom (1981).

    References:
        H. H. Rosenbrock, "An automatic method for finding the greatest or least value of
        a function", The Computer Journal 3(3):175-184, 1960.
        J. J. Moré, B. S. Garbow, K. E. Hillstrom, "Testing unconstrained optimization
        software", ACM Transactions on Mathematical Software 7(1):17-41, 1981.
        Y.-W. Shang, Y.-H. Qiu, "A note on the extended Rosenbrock function",
        Evolutionary Computation 14(1):119-126, 2006.

    Args:
        dim: number of variables, at least 2.
        dtype: floating-point type (float64 by default).
    """

    name = "rosenbrock"

    def __init__(self, dim: int = 2, dtype: torch.dtype = torch.float64) -> None:
        super().__init__(check_int("dim", dim, 2), dtype)

    def value(self, x: Tensor) -> Tensor:
        head, tail = x[..., :-1], x[..., 1:]
        return (100.0 * (tail - head**2) ** 2 + (1.0 - head) ** 2).sum(dim=-1)

    @property
    def minimiser(self) -> Tensor:
        return torch.ones(self.dim, dtype=self.dtype)

    @property
    def initial_point(self) -> Tensor:
        return self._tensor([-1.2 if i % 2 == 0 else 1.0 for i in range(self.dim)])

    @property
    def bounds(self) -> tuple[tuple[float, float], ...]:
        return tuple((-2.0, 2.0) if i % 2 == 0 else (-1.0, 3.0) for i in range(self.dim))
