r"""Binary logistic regression with L2 regularisation on a sparse synthetic set shaped like RCV1.

.. math::
    F(w) = \frac1n \sum_{i=1}^n \log\big(1 + e^{-y_i x_i^\top w}\big) + \frac\lambda2 \lVert w\rVert^2,
    \qquad y_i \in \{-1, +1\},

a smooth, :math:`\lambda`-strongly convex finite sum: the classic testbed of the large-scale
optimization survey (Bottou, Curtis & Nocedal 2018, SIAM Review 60, Sec. 3.3), which uses
RCV1 (Lewis et al. 2004, JMLR 5: 20,242 documents, 47,236 tf-idf features, 0.16% non-zeros,
rows of unit norm). Nothing is downloaded: :func:`make_sparse_classification` generates a
matrix of that shape from a fixed seed, with Zipf-distributed feature popularity (few
frequent words, many rare ones), log-normal tf-idf-like values, unit-norm rows, and labels
from a planted sparse linear model with 5% label noise.

The data live in a torch sparse CSR matrix. :class:`SparseLogistic` gives the objective, the
gradient, per-example gradients and Hessian-vector products in closed form, and a
differentiable :meth:`SparseLogistic.loss` (twice differentiable with autograd, so that
``NewtonCG`` and ``gradwise.curvature`` can be used on it) on the full set or any rows.

The per-example gradient is :math:`-y_i\sigma(-y_i z_i)\, x_i + \lambda w`, with
:math:`z_i = x_i^\top w`, and the Hessian :math:`\frac1n X^\top D X + \lambda I`,
:math:`D = \operatorname{diag}(\sigma(z_i)(1-\sigma(z_i)))`. Each :math:`f_i` is
:math:`L`-smooth with :math:`L = \lVert x_i\rVert^2/4 + \lambda = 1/4 + \lambda`.

Not registered in :data:`gradwise.problems.PROBLEMS`: it has no closed-form minimiser and is
not a point-function of the race's ``Problem`` protocol.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from gradwise.validation import check_int, check_range

RCV1_SHAPE = (20_000, 47_000)
RCV1_DENSITY = 0.002


@dataclass(frozen=True)
class SparseRows:
    """Rows of a sparse matrix in CSR form with matrix-vector products both ways."""

    matrix: Tensor  # torch.sparse_csr, shape (rows, cols)
    row_of_entry: Tensor  # the row of each stored entry (for the transposed product)
    transpose: SparseRows | None = None  # X^T in CSR form, kept for the full data set

    @classmethod
    def from_csr(cls, crow: np.ndarray, col: np.ndarray, values: np.ndarray, cols: int, dtype) -> SparseRows:
        rows = len(crow) - 1
        matrix = torch.sparse_csr_tensor(
            torch.from_numpy(crow.astype(np.int64)),
            torch.from_numpy(col.astype(np.int64)),
            torch.from_numpy(values).to(dtype),
            size=(rows, cols),
            check_invariants=False,
        )
        row_of_entry = torch.from_numpy(np.repeat(np.arange(rows), np.diff(crow)).astype(np.int64))
        return cls(matrix, row_of_entry)

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.matrix.shape
        return rows, cols

    def matvec(self, w: Tensor) -> Tensor:
        """``X w`` as a segmented sum over the rows' entries (torch's CSR matrix-vector
        kernel costs time in proportion to the number of columns, which dominates on a
        mini-batch)."""
        products = self.matrix.values() * w[self.matrix.col_indices()]
        return torch.segment_reduce(products, "sum", offsets=self.matrix.crow_indices())

    def rmatvec(self, r: Tensor) -> Tensor:
        """``X^T r``: with the transpose, its ``matvec``; otherwise a scatter of each
        stored entry's contribution into its column (cheap for a mini-batch)."""
        if self.transpose is not None:
            return self.transpose.matvec(r)
        contributions = self.matrix.values() * r[self.row_of_entry]
        return torch.zeros(self.shape[1], dtype=r.dtype).index_add_(0, self.matrix.col_indices(), contributions)

    def with_transpose(self) -> SparseRows:
        """The same rows, with ``X^T`` stored for fast full products."""
        col = self.matrix.col_indices().numpy()
        order = np.argsort(col, kind="stable")
        crow_t = np.concatenate([[0], np.cumsum(np.bincount(col, minlength=self.shape[1]))])
        transpose = SparseRows.from_csr(
            crow_t,
            self.row_of_entry.numpy()[order],
            self.matrix.values().numpy()[order],
            self.shape[0],
            self.matrix.dtype,
        )
        return SparseRows(self.matrix, self.row_of_entry, transpose)

    def select(self, rows: Tensor) -> SparseRows:
        """The sub-matrix of the given rows (in that order)."""
        crow = self.matrix.crow_indices().numpy()
        index = rows.numpy()
        starts, lengths = crow[index], crow[index + 1] - crow[index]
        new_crow = np.concatenate([[0], np.cumsum(lengths)])
        positions = np.repeat(starts - new_crow[:-1], lengths) + np.arange(new_crow[-1])
        return SparseRows.from_csr(
            new_crow,
            self.matrix.col_indices().numpy()[positions],
            self.matrix.values().numpy()[positions],
            self.shape[1],
            self.matrix.dtype,
        )


class _MatVec(torch.autograd.Function):
    """``X w`` whose backward is ``X^T g`` (itself differentiable, so double backward works)."""

    @staticmethod
    def forward(ctx, w: Tensor, data: SparseRows) -> Tensor:
        ctx.data = data
        return data.matvec(w)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _RMatVec.apply(grad, ctx.data), None


class _RMatVec(torch.autograd.Function):
    """``X^T r`` whose backward is ``X g``."""

    @staticmethod
    def forward(ctx, r: Tensor, data: SparseRows) -> Tensor:
        ctx.data = data
        return data.rmatvec(r)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _MatVec.apply(grad, ctx.data), None


def make_sparse_classification(
    num_examples: int = RCV1_SHAPE[0],
    num_features: int = RCV1_SHAPE[1],
    density: float = RCV1_DENSITY,
    seed: int = 0,
    label_noise: float = 0.05,
    dtype: torch.dtype = torch.float64,
) -> tuple[SparseRows, Tensor]:
    """A sparse design matrix (unit-norm rows) and +-1 labels, reproducible from ``seed``."""
    check_int("num_examples", num_examples, 1)
    check_int("num_features", num_features, 2)
    check_range("density", density, 0.0, 1.0, low_open=True)
    check_range("label_noise", label_noise, 0.0, 0.5)
    rng = np.random.default_rng(seed)
    mean_nnz = max(1.0, density * num_features)
    counts = np.clip(rng.lognormal(np.log(mean_nnz) - 0.125, 0.5, num_examples).round(), 1, num_features)
    popularity = 1.0 / np.arange(1, num_features + 1) ** 0.9
    popularity = rng.permutation(popularity / popularity.sum())
    # Draw every row's words at once; a word drawn twice in a row is kept once.
    rows = np.repeat(np.arange(num_examples), counts.astype(np.int64))
    words = rng.choice(num_features, size=rows.size, p=popularity)
    keys = np.unique(rows * num_features + words)
    rows, columns = keys // num_features, keys % num_features
    values = rng.lognormal(0.0, 0.6, keys.size) * np.log(1.0 / popularity[columns])
    row_norms = np.sqrt(np.bincount(rows, weights=values**2, minlength=num_examples))
    values /= row_norms[rows]
    crow = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=num_examples))])
    data = SparseRows.from_csr(crow, columns, values, num_features, dtype).with_transpose()
    planted = torch.from_numpy(rng.standard_normal(num_features) * (rng.random(num_features) < 0.2)).to(dtype)
    margins = data.matvec(planted)
    labels = torch.where(margins >= margins.median(), 1.0, -1.0).to(dtype)
    flips = torch.from_numpy(rng.random(num_examples) < label_noise)
    labels[flips] = -labels[flips]
    return data, labels


class SparseLogistic:
    r"""L2-regularised logistic regression on :func:`make_sparse_classification` data.

    Args:
        num_examples, num_features, density, seed: the data set (default: RCV1's shape).
        l2: :math:`\lambda`; default ``1 / num_examples`` (the usual choice of the survey's
            experiments, giving condition numbers of order ``n / 4``).

    Example::

        problem = SparseLogistic(num_examples=2000, num_features=5000)
        w = problem.initial_point().requires_grad_()
        problem.loss(w, rows=torch.arange(32)).backward()
    """

    def __init__(
        self,
        num_examples: int = RCV1_SHAPE[0],
        num_features: int = RCV1_SHAPE[1],
        density: float = RCV1_DENSITY,
        l2: float | None = None,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.data, self.labels = make_sparse_classification(num_examples, num_features, density, seed, dtype=dtype)
        self.l2 = 1.0 / num_examples if l2 is None else check_range("l2", l2, 0.0, low_open=True)
        self.num_examples, self.num_features = num_examples, num_features
        self.dtype = dtype

    def __repr__(self) -> str:
        return (
            f"SparseLogistic(n={self.num_examples}, d={self.num_features}, "
            f"nnz={self.data.matrix.values().numel()}, l2={self.l2:.3g})"
        )

    @property
    def smoothness(self) -> float:
        """``L`` of every ``f_i``: ``max ||x_i||^2 / 4 + l2``."""
        return 0.25 + self.l2

    def initial_point(self) -> Tensor:
        """``w = 0`` (a fresh tensor)."""
        return torch.zeros(self.num_features, dtype=self.dtype)

    def rows(self, rows: Tensor | None) -> tuple[SparseRows, Tensor]:
        """The design rows and labels of ``rows`` (``None``: all)."""
        if rows is None:
            return self.data, self.labels
        return self.data.select(rows), self.labels[rows]

    def loss(self, w: Tensor, rows: Tensor | None = None) -> Tensor:
        """Differentiable (twice) mean logistic loss over ``rows`` plus the L2 term."""
        data, labels = self.rows(rows)
        margins = labels * _MatVec.apply(w, data)
        return torch.nn.functional.softplus(-margins).mean() + 0.5 * self.l2 * (w * w).sum()

    @torch.no_grad()
    def objective(self, w: Tensor, rows: Tensor | None = None) -> float:
        """``F(w)`` (or the mean over ``rows``) in closed form."""
        data, labels = self.rows(rows)
        margins = labels * data.matvec(w)
        return float(torch.nn.functional.softplus(-margins).mean() + 0.5 * self.l2 * w.dot(w))

    @torch.no_grad()
    def gradient(self, w: Tensor, rows: Tensor | None = None) -> Tensor:
        """``grad F(w)`` (or of the mean over ``rows``) in closed form."""
        data, labels = self.rows(rows)
        coefficients = -labels * torch.sigmoid(-labels * data.matvec(w))
        return data.rmatvec(coefficients) / labels.numel() + self.l2 * w

    @torch.no_grad()
    def per_example_gradients(self, w: Tensor, rows: Tensor) -> Tensor:
        """Dense ``(len(rows), d)`` matrix of the gradients of each ``f_i`` (L2 included)."""
        data, labels = self.rows(rows)
        coefficients = -labels * torch.sigmoid(-labels * data.matvec(w))
        return (data.matrix.to_dense() * coefficients[:, None]) + self.l2 * w

    @torch.no_grad()
    def hvp(self, w: Tensor, v: Tensor, rows: Tensor | None = None) -> Tensor:
        """``(1/|rows|) X^T D X v + l2 v`` in closed form."""
        data, labels = self.rows(rows)
        p = torch.sigmoid(data.matvec(w))
        return data.rmatvec(p * (1 - p) * data.matvec(v)) / labels.numel() + self.l2 * v
