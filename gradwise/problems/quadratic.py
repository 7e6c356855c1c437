"""A convex quadratic with a chosen dimension and condition number."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gradwise.problems.base import Problem
from gradwise.validation import check_int, check_range


def random_rotation(dim: int, generator: torch.Generator) -> Tensor:
    """A Haar-distributed random orthogonal matrix (float64).

    QR of a standard Gaussian matrix, with the signs of ``R``'s diagonal moved into ``Q``
    so that the distribution is uniform (Mezzadri, "How to generate random matrices from
    the classical compact groups", Notices of the AMS 54(5):592-604, 2007).
    """
    gaussian = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return q * torch.sign(torch.diagonal(r))


class Quadratic(Problem):
    r"""A rotated, ill-conditioned convex quadratic:

    .. math::
        f(x) = \tfrac12 (x - x^*)^\top A\, (x - x^*), \qquad
        A = Q \,\mathrm{diag}(\lambda_1, \dots, \lambda_n)\, Q^\top,

    with eigenvalues log-spaced from ``1/kappa`` to ``1``,
    ``lambda_i = kappa^{-(n-i)/(n-1)}``, so the smoothness constant is ``L = 1``, the
    strong-convexity constant is ``mu = 1/kappa`` and the condition number of ``A`` is
    exactly ``kappa``. ``Q`` is a random rotation drawn from a generator seeded with
    ``seed``, so the ill-conditioning is not aligned with the coordinate axes (a diagonal
    preconditioner such as Adam's cannot simply undo it); the same seed gives the same
    problem. Gradient descent with step ``1/L`` contracts the error along the flattest
    direction by ``1 - 1/kappa`` per step; heavy-ball momentum with tuned step and momentum
    contracts it by ``(sqrt(kappa) - 1) / (sqrt(kappa) + 1)`` (Polyak 1964; Nesterov 2004,
    section 2.1).

    Minimiser ``x* = Q 1`` (the rotated all-ones vector), minimum ``0``, start the origin:
    the initial error ``x_0 - x* = -Q 1`` has size 1 along every eigenvector of ``A``, so
    every curvature scale, the flattest included, has to be resolved.

    References:
        B. T. Polyak, "Some methods of speeding up the convergence of iteration methods",
        USSR Computational Mathematics and Mathematical Physics 4(5):1-17, 1964.
        Y. Nesterov, "Introductory Lectures on Convex Optimization", Kluwer, 2004.

    Args:
        dim: number of variables, at least 2.
        kappa: condition number of ``A``, at least 1.
        seed: seed of the rotation ``Q``.
        dtype: floating-point type (float64 by default).
    """

    name = "quadratic"

    def __init__(
        self, dim: int = 2, kappa: float = 100.0, seed: int = 0, dtype: torch.dtype = torch.float64
    ) -> None:
        super().__init__(check_int("dim", dim, 2), dtype)
        self.kappa = float(check_range("kappa", kappa, 1.0))
        self.seed = check_int("seed", seed, 0)
        generator = torch.Generator().manual_seed(self.seed)
        rotation = random_rotation(self.dim, generator)
        eigenvalues = torch.logspace(-math.log10(self.kappa), 0.0, self.dim, dtype=torch.float64)
        hessian = rotation @ torch.diag(eigenvalues) @ rotation.T
        self.hessian = ((hessian + hessian.T) / 2).to(self.dtype)
        self.eigenvalues = eigenvalues.to(self.dtype)
        self._minimiser = (rotation @ torch.ones(self.dim, dtype=torch.float64)).to(self.dtype)

    def value(self, x: Tensor) -> Tensor:
        error = x - self._minimiser
        return 0.5 * ((error @ self.hessian) * error).sum(dim=-1)

    @property
    def minimiser(self) -> Tensor:
        return self._minimiser.clone()

    @property
    def initial_point(self) -> Tensor:
        return torch.zeros(self.dim, dtype=self.dtype)

    @property
    def bounds(self) -> tuple[tuple[float, float], ...]:
        """The box spanned by the start and the minimiser, padded by half its largest side."""
        low = torch.minimum(self.initial_point, self._minimiser)
        high = torch.maximum(self.initial_point, self._minimiser)
        pad = 0.5 * float((high - low).max())
        return tuple((lo - pad, hi + pad) for lo, hi in zip(low.tolist(), high.tolist()))

    @property
    def label(self) -> str:
        return f"{self.name}-{self.dim}d-kappa{self.kappa:g}"

    def __repr__(self) -> str:
        return f"Quadratic(dim={self.dim}, kappa={self.kappa:g}, seed={self.seed}, dtype={self.dtype})"
