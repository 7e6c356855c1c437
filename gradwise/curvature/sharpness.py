r"""Sharpness at a solution and curvature per layer, with the error of every estimate.

A minimum is *sharp* when the loss rises fast around it: large Hessian eigenvalues. Keskar et
al. (2017, arXiv:1609.04836) found large-batch training converging to sharper minima that
generalise worse, measured by the largest loss rise in a small box around the minimum (which, for a
small box, the largest Hessian eigenvalues govern); Cohen et al. (2021, arXiv:2103.00065) found full-batch gradient
descent driving the top eigenvalue to :math:`2/\eta` ("edge of stability"). Two summaries,
both from Hessian-vector products (:mod:`.operator`), never from the Hessian itself:

- :func:`sharpness`: the top eigenvalue :math:`\lambda_{\max}` by Lanczos
  (:func:`.spectrum.top_eigenpair`), reported with its residual :math:`r = \lVert Hy -
  \theta y\rVert`: some eigenvalue lies in :math:`[\theta - r, \theta + r]` (Parlett 1998,
  Thm. 4.5.1); and the trace :math:`\operatorname{tr} H` by Hutchinson's estimator, the mean of
  :math:`u_k^\top H u_k` over :math:`P` Rademacher probes (:mod:`.hutchinson`), reported with its
  standard error :math:`s/\sqrt{P}`, :math:`s` the probes' sample standard deviation. Both share
  one gradient graph. For a problem small enough (:data:`DENSE_LIMIT`), the Hessian is also
  formed column by column and its exact extreme eigenvalues and trace reported beside the
  estimates.
- :func:`layer_curvature`: for each parameter tensor :math:`\theta_i`, the extreme eigenvalues of
  its diagonal block :math:`H_{ii} = \partial^2 f / \partial\theta_i^2` (the curvature the
  tensor sees with the others held fixed; the product :math:`H_{ii} v = \nabla_{\theta_i}(g_i^\top
  v)` differentiates the tensor's own gradient only): :math:`\lambda_{\max}` by Lanczos on
  :math:`H_{ii}` and :math:`\lambda_{\min}` by Lanczos on :math:`-H_{ii}`, each with its residual,
  and the condition estimate :math:`\kappa = \lambda_{\max}/\lambda_{\min}`.

How :math:`\kappa` treats the smallest eigenvalue: it is :math:`\lambda_{\max}/\lambda_{\min}` when
the bottom Ritz value :math:`\lambda_{\min}` is positive, and infinite when it is not. Ritz values lie
inside the spectrum (:math:`\lambda_{\min}(H_{ii}) \le \lambda_{\min} \le \lambda_{\max} \le
\lambda_{\max}(H_{ii})`, Golub & Van Loan 2013, Sec. 10.1), so both verdicts hold whatever the number
of steps: a Ritz value :math:`\le 0` proves an eigenvalue :math:`\le 0` (a saddle or flat direction:
no finite condition number), and a finite :math:`\kappa` is a *lower bound* on the block's condition
number, exact once Lanczos has as many steps as the block has entries. :math:`\lambda_{\min}` is
reported signed beside it, with its residual, so that a slowly converging bottom end shows. A
:math:`\kappa` near :math:`1/\epsilon` (:math:`\epsilon` the machine epsilon of the products, 1.2e-7
in float32) means a block singular to working precision.

Cost, stated before any product (:func:`sharpness_cost`, :func:`layer_curvature_cost`): one
forward+backward pass builds the gradient graph, then one Hessian-vector product per Lanczos
step, residual check and probe (per block, twice: both ends).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from gradwise.curvature.condition import ConditionEstimate
from gradwise.curvature.hutchinson import rademacher_like
from gradwise.curvature.hvp import gradient_graph
from gradwise.curvature.landscape import Cost
from gradwise.curvature.operator import MatVec, hessian_operator
from gradwise.curvature.spectrum import top_eigenpair
from gradwise.curvature.vectors import LossFn, flatten
from gradwise.validation import check_int

DENSE_LIMIT = 2**24
"""The most Hessian entries (``dim**2``) ever formed densely: ``4096 x 4096``, 64 MiB in float32, built from
``dim`` Hessian-vector products. Larger problems get the Lanczos and Hutchinson estimates only."""


@dataclass(frozen=True)
class DenseSpectrum:
    """Exact values from the dense Hessian (small problems only, :data:`DENSE_LIMIT`)."""

    top_eigenvalue: float
    bottom_eigenvalue: float
    trace: float

    def to_dict(self) -> dict[str, float]:
        return {"top_eigenvalue": self.top_eigenvalue, "bottom_eigenvalue": self.bottom_eigenvalue, "trace": self.trace}


@dataclass(frozen=True)
class Sharpness:
    """The top Hessian eigenvalue and the trace at a point, with their errors.

    ``top_eigenvalue_error`` is the Lanczos residual (an eigenvalue lies within it of ``top_eigenvalue``);
    ``trace_standard_error`` is Hutchinson's standard error over ``probes`` probes; ``exact`` holds the dense
    Hessian's values when it was formed.
    """

    top_eigenvalue: float
    top_eigenvalue_error: float
    trace: float
    trace_standard_error: float
    probes: int
    lanczos_steps: int
    dimension: int
    exact: DenseSpectrum | None

    def to_dict(self) -> dict[str, object]:
        return {
            "top_eigenvalue": self.top_eigenvalue,
            "top_eigenvalue_error": self.top_eigenvalue_error,
            "trace": self.trace,
            "trace_standard_error": self.trace_standard_error,
            "probes": self.probes,
            "lanczos_steps": self.lanczos_steps,
            "dimension": self.dimension,
            "exact": None if self.exact is None else self.exact.to_dict(),
        }


@dataclass(frozen=True)
class LayerCurvature:
    """The extreme eigenvalues of one parameter tensor's diagonal Hessian block, each with its Lanczos
    residual, and the condition estimate (see the module's docstring for how ``lambda_min <= 0`` is treated:
    an infinite condition)."""

    name: str
    size: int
    lambda_max: float
    lambda_max_error: float
    lambda_min: float
    lambda_min_error: float

    @property
    def condition(self) -> float:
        """:math:`\\lambda_{\\max}/\\lambda_{\\min}` (a lower bound on the block's condition number) when
        :math:`\\lambda_{\\min} > 0`, else ``inf``."""
        return ConditionEstimate(self.lambda_min, self.lambda_max).condition_number

    def to_dict(self) -> dict[str, object]:
        """JSON-ready: an infinite condition is ``None`` (JSON has no infinity)."""
        condition = self.condition
        return {
            "name": self.name,
            "size": self.size,
            "lambda_max": self.lambda_max,
            "lambda_max_error": self.lambda_max_error,
            "lambda_min": self.lambda_min,
            "lambda_min_error": self.lambda_min_error,
            "condition": None if math.isinf(condition) else condition,
        }


def _dimension(params: Sequence[Tensor]) -> int:
    if not params:
        raise ValueError("params must hold at least one tensor, got none")
    return sum(p.numel() for p in params)


def _dense_wanted(dense: bool | None, dim: int) -> bool:
    """Whether to form the Hessian: ``None`` means when it fits :data:`DENSE_LIMIT`; ``True`` is refused above."""
    if dense is None:
        return dim * dim <= DENSE_LIMIT
    if dense and dim * dim > DENSE_LIMIT:
        raise ValueError(
            f"dense must be False for {dim:,} parameters: the Hessian would have {dim * dim:,} entries, "
            f"over DENSE_LIMIT={DENSE_LIMIT:,}"
        )
    return bool(dense)


def sharpness_cost(dim: int, *, steps: int = 20, probes: int = 20, dense: bool | None = None) -> Cost:
    """The most passes :func:`sharpness` takes on ``dim`` parameters: the gradient graph, ``min(steps, dim)``
    Lanczos products and one residual check, ``probes`` Hutchinson products, and ``dim`` more to form the
    Hessian when ``dense`` (``None``: when it fits :data:`DENSE_LIMIT`). Lanczos stops early on an invariant
    subspace, so the count is an upper bound."""
    check_int("dim", dim, 1)
    check_int("steps", steps, 1)
    check_int("probes", probes, 2)
    return Cost(
        forward_backward=1, hessian_vector=min(steps, dim) + 1 + probes + (dim if _dense_wanted(dense, dim) else 0)
    )


def _in_dtype(matvec: MatVec, dtype: torch.dtype) -> MatVec:
    """``matvec`` (products in the parameters' ``dtype``) on vectors of another dtype (Lanczos keeps its basis
    in float64, where its orthogonalisation loses least)."""
    return lambda vector: matvec(vector.to(dtype)).to(vector.dtype)


def _negated(matvec: MatVec) -> MatVec:
    """``v -> -A v``: Lanczos on it finds the bottom of ``A``'s spectrum."""
    return lambda vector: -matvec(vector)


def _hutchinson(
    matvec: MatVec, params: Sequence[Tensor], probes: int, generator: torch.Generator | None
) -> tuple[float, float]:
    """The mean of :math:`u^\\top H u` over ``probes`` Rademacher probes and its standard error."""
    values = []
    for _ in range(probes):
        probe = flatten(rademacher_like(params, generator))
        values.append(float(torch.dot(probe.double(), matvec(probe).double())))
    samples = np.array(values)
    return float(samples.mean()), float(samples.std(ddof=1) / math.sqrt(probes))


def dense_hessian(
    matvec: MatVec, dim: int, *, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
) -> Tensor:
    """The ``dim x dim`` Hessian from ``dim`` products with the unit vectors, symmetrised; refused above
    :data:`DENSE_LIMIT` entries."""
    _dense_wanted(True, check_int("dim", dim, 1))
    columns = [matvec(column) for column in torch.eye(dim, dtype=dtype, device=device)]
    hessian = torch.stack(columns, dim=1)
    return (hessian + hessian.T) / 2


def sharpness(
    loss_fn: LossFn,
    params: Sequence[Tensor],
    *,
    steps: int = 20,
    probes: int = 20,
    dense: bool | None = None,
    generator: torch.Generator | None = None,
) -> Sharpness:
    """The top Hessian eigenvalue (``steps`` Lanczos steps) and trace (``probes`` Rademacher probes) of
    ``loss_fn`` at ``params``, with their errors; the exact values too when ``dense`` (see
    :func:`sharpness_cost` for what it costs). ``generator`` (CPU) draws the Lanczos start and the probes.

    Example::

        loss_fn, params = module_loss(model, F.cross_entropy, x, y)
        found = sharpness(loss_fn, params, steps=20, probes=30, generator=torch.Generator().manual_seed(0))
        print(f"{found.top_eigenvalue:.3g} +- {found.top_eigenvalue_error:.1g}, "
              f"trace {found.trace:.3g} +- {found.trace_standard_error:.1g}")
    """
    dim = _dimension(params)
    sharpness_cost(dim, steps=steps, probes=probes, dense=dense)  # checks the arguments
    dtype, device = params[0].dtype, params[0].device
    matvec = hessian_operator(loss_fn, params)
    start = torch.randn(dim, generator=generator, dtype=torch.float64).to(device)
    top = top_eigenpair(_in_dtype(matvec, dtype), dim, steps=steps, start=start, device=device)
    trace, error = _hutchinson(matvec, params, probes, generator)
    exact = None
    if _dense_wanted(dense, dim):
        eigenvalues = torch.linalg.eigvalsh(dense_hessian(_in_dtype(matvec, dtype), dim, device=device))
        hessian_trace = float(eigenvalues.sum())
        exact = DenseSpectrum(float(eigenvalues[-1]), float(eigenvalues[0]), hessian_trace)
    return Sharpness(top.eigenvalue, top.residual, trace, error, probes, min(steps, dim), dim, exact)


def block_hessian_operators(loss_fn: LossFn, params: Sequence[Tensor]) -> list[MatVec]:
    """``v -> H_ii v`` (flat vectors of ``params[i].numel()`` entries) for each parameter's diagonal block,
    all from one gradient graph: :math:`H_{ii} v = \\nabla_{\\theta_i}(g_i^\\top v)`. A tensor whose gradient
    does not depend on it has a zero block."""
    leaves, grads = gradient_graph(loss_fn, params)

    def block(index: int) -> MatVec:
        leaf, grad = leaves[index], grads[index]

        def matvec(vector: Tensor) -> Tensor:
            if not grad.requires_grad:
                return torch.zeros_like(vector)
            with torch.enable_grad():
                (product,) = torch.autograd.grad(
                    grad, leaf, vector.view_as(leaf), retain_graph=True, allow_unused=True, materialize_grads=True
                )
            return product.detach().reshape(-1)

        return matvec

    return [block(index) for index in range(len(leaves))]


def layer_curvature_cost(sizes: Sequence[int], *, steps: int = 20) -> Cost:
    """The most passes :func:`layer_curvature` takes on tensors of ``sizes`` entries: the gradient graph, then
    per tensor two Lanczos runs (top and bottom) of ``min(steps, size)`` products and a residual check each."""
    check_int("steps", steps, 1)
    return Cost(
        forward_backward=1, hessian_vector=sum(2 * (min(steps, check_int("size", size, 1)) + 1) for size in sizes)
    )


def layer_curvature(
    loss_fn: LossFn,
    params: Sequence[Tensor],
    names: Sequence[str],
    *,
    steps: int = 20,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> list[LayerCurvature]:
    """Each parameter tensor's block curvature (see the module's docstring), in the order of ``params``
    (``names`` name them; :func:`layer_curvature_cost` says what it costs). ``generator`` (CPU) draws the
    Lanczos starts.

    Example::

        rows = layer_curvature(loss_fn, params, [name for name, _ in model.named_parameters()], steps=30)
        for row in rows:
            print(row.name, row.lambda_max, row.lambda_min, row.condition)
    """
    _dimension(params)
    if len(names) != len(params):
        raise ValueError(f"names must name each of the {len(params)} parameters, got {len(names)} names")
    layer_curvature_cost([p.numel() for p in params], steps=steps)  # checks the arguments
    rows = []
    operators = block_hessian_operators(loss_fn, params)
    for name, param, matvec in tqdm(
        list(zip(names, params, operators)), desc="layers", unit="tensor", disable=not progress, dynamic_ncols=True
    ):
        size, dtype, device = param.numel(), param.dtype, param.device
        in_dtype = _in_dtype(matvec, dtype)
        top = top_eigenpair(
            in_dtype,
            size,
            steps=steps,
            device=device,
            start=torch.randn(size, generator=generator, dtype=torch.float64).to(device),
        )
        bottom = top_eigenpair(
            _negated(in_dtype),
            size,
            steps=steps,
            device=device,
            start=torch.randn(size, generator=generator, dtype=torch.float64).to(device),
        )
        rows.append(LayerCurvature(name, size, top.eigenvalue, top.residual, -bottom.eigenvalue, bottom.residual))
    return rows
