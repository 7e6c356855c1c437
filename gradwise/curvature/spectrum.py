r"""Extreme eigenvalues of a symmetric operator from matrix-vector products only.

- :func:`power_iteration`: the eigenvalue of largest magnitude, :math:`v \leftarrow Av/\lVert Av\rVert`,
  converging at the rate :math:`|\lambda_2/\lambda_1|` per product (Golub & Van Loan 2013, Sec. 7.3).
- :func:`lanczos`: ``steps`` Lanczos iterations build an orthonormal Krylov basis :math:`Q`
  with :math:`Q^\top A Q = T` tridiagonal; the eigenvalues of :math:`T` (Ritz values)
  approximate both ends of the spectrum, the extreme ones first, after far fewer products
  than power iteration (Lanczos 1950; Golub & Van Loan 2013, Sec. 10.1). Full
  reorthogonalisation keeps :math:`Q` orthonormal in floating point (memory ``steps x dim``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

from gradwise.curvature.operator import MatVec
from gradwise.validation import check_int, check_range


@dataclass(frozen=True)
class PowerIterationResult:
    """The dominant eigenpair found by :func:`power_iteration`."""

    eigenvalue: float
    eigenvector: Tensor
    iterations: int
    converged: bool


def _start_vector(dim: int, dtype: torch.dtype, device, generator: torch.Generator | None) -> Tensor:
    vector = torch.randn(dim, dtype=dtype, device=device, generator=generator)
    return vector / torch.linalg.vector_norm(vector)


def power_iteration(
    matvec: MatVec,
    dim: int,
    *,
    iterations: int = 100,
    tol: float = 1e-6,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> PowerIterationResult:
    """The eigenvalue of largest magnitude of the symmetric operator ``matvec`` (signed, as
    the Rayleigh quotient), stopping when it changes by less than ``tol`` relative.

    Example::

        top = power_iteration(hessian_operator(loss_fn, params), dim=n).eigenvalue
    """
    check_int("dim", dim, 1)
    check_int("iterations", iterations, 1)
    check_range("tol", tol, 0.0)
    vector = _start_vector(dim, dtype, device, generator)
    eigenvalue = float("nan")
    for iteration in range(1, iterations + 1):
        product = matvec(vector)
        estimate = float(torch.dot(vector, product))
        size = torch.linalg.vector_norm(product)
        if float(size) == 0.0:
            return PowerIterationResult(0.0, vector, iteration, True)
        vector = product / size
        if abs(estimate - eigenvalue) <= tol * abs(estimate):
            return PowerIterationResult(estimate, vector, iteration, True)
        eigenvalue = estimate
    return PowerIterationResult(eigenvalue, vector, iterations, False)


def lanczos(
    matvec: MatVec,
    dim: int,
    *,
    steps: int = 30,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> np.ndarray:
    """Ritz values (ascending) after ``min(steps, dim)`` Lanczos steps with full
    reorthogonalisation; the first and last approximate the smallest and largest
    eigenvalues of the symmetric operator ``matvec``. Stops early when the Krylov space is
    invariant (then the Ritz values are exact eigenvalues).
    """
    check_int("dim", dim, 1)
    check_int("steps", steps, 1)
    steps = min(steps, dim)
    basis = torch.zeros(steps, dim, dtype=dtype, device=device)
    alphas: list[float] = []
    betas: list[float] = []
    vector = _start_vector(dim, dtype, device, generator)
    for k in range(steps):
        basis[k] = vector
        w = matvec(vector)
        alpha = float(torch.dot(w, vector))
        alphas.append(alpha)
        # Twice is enough (Giraud et al. 2005): classical Gram-Schmidt against all of Q.
        for _ in range(2):
            w = w - basis[: k + 1].T @ (basis[: k + 1] @ w)
        beta = float(torch.linalg.vector_norm(w))
        if k == steps - 1 or beta <= 1e-12 * max(1.0, abs(alpha)):
            break
        betas.append(beta)
        vector = w / beta
    return scipy.linalg.eigh_tridiagonal(np.array(alphas), np.array(betas), eigvals_only=True)


def extreme_eigenvalues(
    matvec: MatVec, dim: int, *, steps: int = 30, generator: torch.Generator | None = None, **kwargs
) -> tuple[float, float]:
    """``(smallest, largest)`` eigenvalue estimates of ``matvec`` by :func:`lanczos`."""
    ritz = lanczos(matvec, dim, steps=steps, generator=generator, **kwargs)
    return float(ritz[0]), float(ritz[-1])
