"""The Rastrigin function: a bowl covered in a regular grid of local minima."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gradwise.problems.base import Problem


class Rastrigin(Problem):
    r"""Rastrigin's function in ``dim`` variables, with ``A = 10``:

    .. math::
        f(x) = A\,n + \sum_{i=1}^{n} \left[ x_i^2 - A \cos(2 \pi x_i) \right].

    Global minimiser the origin, minimum ``0``. Near every integer point there is a local
    minimiser (about ``11^n`` of them in the usual domain ``[-5.12, 5.12]^n``), so a local
    method stops in whichever basin it first settles in; the distance to the origin shows
    which.

    Start: every coordinate ``2.5``, halfway between the local minimisers near 2 and 3.
    The literature fixes no starting point (runs start uniformly at random in
    ``[-5.12, 5.12]^n``); a fixed one makes races reproducible.

    References:
        L. A. Rastrigin, "Systems of extremal control", Nauka, Moscow, 1974 (two variables).
        H. Mühlenbein, M. Schomisch, J. Born, "The parallel genetic algorithm as function
        optimizer", Parallel Computing 17(6-7):619-632, 1991 (``n`` variables).
        M. Jamil, X.-S. Yang, "A literature survey of benchmark functions for global
        optimization problems", arXiv:1308.4008, 2013.

    Args:
        dim: number of variables, at least 1.
        dtype: floating-point type (float64 by default).
    """

    name = "rastrigin"
    A = 10.0

    def __init__(self, dim: int = 2, dtype: torch.dtype = torch.float64) -> None:
        super().__init__(dim, dtype)

    def value(self, x: Tensor) -> Tensor:
        return self.A * self.dim + (x**2 - self.A * torch.cos(2.0 * math.pi * x)).sum(dim=-1)

    @property
    def minimiser(self) -> Tensor:
        return torch.zeros(self.dim, dtype=self.dtype)

    @property
    def initial_point(self) -> Tensor:
        return torch.full((self.dim,), 2.5, dtype=self.dtype)

    @property
    def bounds(self) -> tuple[tuple[float, float], ...]:
        return ((-5.12, 5.12),) * self.dim
