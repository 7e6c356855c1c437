r"""Extreme eigenvalues of a symmetric operator from matrix-vector products only.

- :func:`power_iteration`: the eigenvalue of largest magnitude, :math:`v \leftarrow Av/\lVert Av\rVert`,
  converging at the rate :math:`|\lambda_2/\lambda_1|` per product (Golub & Van Loan 2013, Sec. 7.3).
- :func:`lanczos`: ``steps`` Lanczos iterations build an orthonormal Krylov basis :math:`Q`
  with :math:`Q^\top A Q = T` tridiagonal; the eigenvalues of :math:`T` (Ritz values)
  approximate both ends of the spectrum, the extreme ones first, after far fewer products
  than power iteration (Lanczos 1950; Golub & Van Loan 2013, Sec. 10.1). Full
  reorthogonalisation keeps :math:`Q` orthonormal in floating point (memory ``steps x dim``).
- :func:`top_eigenpair`: the largest Ritz pair :math:`(\theta, y)` of the same iteration, started from a
  given vector (warm start: the previous step's eigenvector during training), with its residual
  :math:`r = \lVert Ay - \theta y\rVert`: for a symmetric operator some eigenvalue lies in
  :math:`[\theta - r, \theta + r]` (Parlett 1998, Thm. 4.5.1), the error reported with the estimate.
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


@dataclass(frozen=True)
class TopEigenpair:
    """The largest Ritz pair found by :func:`top_eigenpair`; ``residual`` bounds the eigenvalue's error."""

    eigenvalue: float
    eigenvector: Tensor
    residual: float
    products: int


def _lanczos_basis(matvec: MatVec, start: Tensor, steps: int) -> tuple[Tensor, np.ndarray, np.ndarray]:
    """The orthonormal Krylov basis (rows) and the tridiagonal's diagonal and off-diagonal after at most
    ``steps`` products, stopping early when the Krylov space is invariant."""
    dim = start.numel()
    basis = torch.zeros(steps, dim, dtype=start.dtype, device=start.device)
    alphas: list[float] = []
    betas: list[float] = []
    vector = start / torch.linalg.vector_norm(start)
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
    return basis[: len(alphas)], np.array(alphas), np.array(betas)


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
    _, alphas, betas = _lanczos_basis(matvec, _start_vector(dim, dtype, device, generator), min(steps, dim))
    return scipy.linalg.eigh_tridiagonal(alphas, betas, eigvals_only=True)


def top_eigenpair(
    matvec: MatVec,
    dim: int,
    *,
    steps: int = 20,
    start: Tensor | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> TopEigenpair:
    """The largest (algebraic) eigenvalue of the symmetric operator ``matvec``, its Ritz vector and the
    residual bound, after at most ``min(steps, dim)`` Lanczos products started from ``start`` (a random
    vector when ``None``). ``steps + 1`` products in all: the last checks the residual.

    Example::

        top = top_eigenpair(hessian_operator(loss_fn, params), dim=n, steps=10)
        later = top_eigenpair(matvec_later, dim=n, steps=3, start=top.eigenvector)  # warm start
    """
    check_int("dim", dim, 1)
    check_int("steps", steps, 1)
    if start is None:
        start = _start_vector(dim, dtype, device, generator)
    elif start.shape != (dim,) or not bool(torch.isfinite(start).all()) or float(start.norm()) == 0.0:
        raise ValueError(f"start must be a finite nonzero vector of {dim} entries, got shape {tuple(start.shape)}")
    basis, alphas, betas = _lanczos_basis(matvec, start.to(dtype=dtype, device=device), min(steps, dim))
    values, vectors = scipy.linalg.eigh_tridiagonal(alphas, betas)
    weights = torch.as_tensor(vectors[:, -1], dtype=basis.dtype, device=basis.device)
    ritz_vector = basis.T @ weights
    ritz_vector = ritz_vector / torch.linalg.vector_norm(ritz_vector)
    theta = float(values[-1])
    residual = float(torch.linalg.vector_norm(matvec(ritz_vector) - theta * ritz_vector))
    return TopEigenpair(theta, ritz_vector, residual, len(alphas) + 1)


def extreme_eigenvalues(
    matvec: MatVec, dim: int, *, steps: int = 30, generator: torch.Generator | None = None, **kwargs
) -> tuple[float, float]:
    """``(smallest, largest)`` eigenvalue estimates of ``matvec`` by :func:`lanczos`."""
    ritz = lanczos(matvec, dim, steps=steps, generator=generator, **kwargs)
    return float(ritz[0]), float(ritz[-1])
