"""Beale's function: a two-variable least-squares problem with sharp, flat ridges."""

from __future__ import annotations

import torch
from torch import Tensor

from gradwise.problems.base import Problem


class Beale(Problem):
    r"""Beale's function of two variables:

    .. math::
        f(x, y) = (1.5 - x + xy)^2 + (2.25 - x + xy^2)^2 + (2.625 - x + xy^3)^2.

    Minimiser ``(3, 0.5)``, minimum ``0``. The terms in ``y^2`` and ``y^3`` make the
    landscape flat near ``x = 0`` and very steep for ``|y| > 1``: step sizes that suit
    one region overshoot in the other.

    Start: ``(1, 1)``, as in Moré, Garbow & Hillstrom (1981), problem 5. The usual search
    domain is ``[-4.5, 4.5]^2`` (Jamil & Yang 2013); plots show the part around the start
    and the minimiser.

    References:
        E. M. L. Beale, "On an iterative method for finding a local minimum of a function
        of more than one variable", Technical Report 25, Statistical Techniques Research
        Group, Princeton University, 1958.
        J. J. Moré, B. S. Garbow, K. E. Hillstrom, "Testing unconstrained optimization
        software", ACM Transactions on Mathematical Software 7(1):17-41, 1981.
        M. Jamil, X.-S. Yang, "A literature survey of benchmark functions for global
        optimization problems", arXiv:1308.4008, 2013.

    Args:
        dtype: floating-point type (float64 by default).
    """

    name = "beale"

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__(2, dtype)

    def value(self, x: Tensor) -> Tensor:
        u, v = x[..., 0], x[..., 1]
        return (1.5 - u + u * v) ** 2 + (2.25 - u + u * v**2) ** 2 + (2.625 - u + u * v**3) ** 2

    @property
    def minimiser(self) -> Tensor:
        return self._tensor([3.0, 0.5])

    @property
    def initial_point(self) -> Tensor:
        return self._tensor([1.0, 1.0])

    @property
    def bounds(self) -> tuple[tuple[float, float], ...]:
        return ((-0.5, 4.5), (-1.0, 2.0))

    @property
    def label(self) -> str:
        return self.name
