r"""The loss along a line and on a plane in parameter space, and what computing them costs.

- :func:`interpolate`: the loss along the straight line between two parameter sets,
  :math:`\theta(\alpha) = (1 - \alpha)\,\theta_0 + \alpha\,\theta_1`, on a grid of :math:`\alpha`
  that may extend past :math:`[0, 1]` (Goodfellow, Vinyals & Saxe 2015, arXiv:1412.6544). A
  monotone decrease from the initial to the final point says no barrier was crossed on the way;
  a bump between two solutions says they lie in different basins.
- :func:`plane`: the loss :math:`f(\theta^* + a\,\delta + b\,\eta)` on an ``N x N`` grid of
  :math:`(a, b) \in [-s, s]^2` around a solution, for two random directions made comparable
  across layers by *filter-wise normalisation* (Li, Xu, Taylor, Studer & Goldstein 2018,
  "Visualizing the Loss Landscape of Neural Nets", arXiv:1712.09913, Sec. 4):
  :func:`filter_normalized` rescales each filter :math:`d_{i,j}` (row :math:`j` of parameter
  :math:`i`: a unit's incoming weights, an embedding's row, a convolution's output channel) to
  the norm of the parameter's filter, :math:`d_{i,j} \leftarrow d_{i,j}\,\lVert\theta_{i,j}\rVert
  / \lVert d_{i,j}\rVert`, so that a step of 1 along the direction moves every filter by its own
  size and the picture does not depend on each layer's scale (which ReLU and normalisation
  layers leave free). One-dimensional parameters (biases, normalisation gains) are *zeroed* in
  the direction by default, as Li et al.'s plots do (their code's ``ignore='biasbn'``; its other
  choice sets the direction to the parameter itself); ``one_dim="filter"`` keeps a random
  direction for such a tensor, rescaled as one filter to the tensor's norm.

Both evaluate the loss functions they are given at each grid point without gradients: a
function ``params -> loss`` on a fixed sample, so that the grid shows the landscape, not
sampling noise. Their cost, stated before they start, is one forward pass per function per
point (:func:`line_cost`, :func:`plane_cost`); the grid is bounded (:data:`MAX_POINTS`,
:data:`MAX_GRID`) and a progress bar counts the points. :class:`Cost` also counts the
gradient and Hessian-vector passes of :mod:`gradwise.curvature.sharpness`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from gradwise.curvature.vectors import check_like
from gradwise.validation import check_choice, check_int, check_range

PointLoss = Callable[[Sequence[Tensor]], "Tensor | float"]
"""A loss at given parameter values (a list of tensors shaped like the model's parameters), on a fixed sample."""

MAX_POINTS = 1001
"""The most points of a line (:func:`alpha_grid`)."""
MAX_GRID = 201
"""The most points per side of a plane (:func:`plane_coordinates`): ``201 x 201 = 40,401`` evaluations per loss."""
ONE_DIM = ("zero", "filter")
"""What :func:`filter_normalized` does to one-dimensional parameters: zero them (Li et al.) or rescale the
whole tensor as one filter."""


@dataclass(frozen=True)
class Cost:
    """The passes a computation will take, counted before it starts.

    ``forward``: forward passes (a loss evaluated on its sample, without gradients);
    ``forward_backward``: forward passes with a backward pass (a gradient, or the gradient graph that
    Hessian-vector products differentiate again); ``hessian_vector``: Hessian-vector products, each a
    backward pass through that gradient graph (Pearlmutter 1994: a small constant times a gradient's cost).
    """

    forward: int = 0
    forward_backward: int = 0
    hessian_vector: int = 0

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            self.forward + other.forward,
            self.forward_backward + other.forward_backward,
            self.hessian_vector + other.hessian_vector,
        )

    def describe(self) -> str:
        """One line, e.g. ``"1 forward+backward pass, 42 Hessian-vector products"``."""
        parts = [
            (self.forward, "forward pass", "forward passes"),
            (self.forward_backward, "forward+backward pass", "forward+backward passes"),
            (self.hessian_vector, "Hessian-vector product", "Hessian-vector products"),
        ]
        said = [f"{count:,} {one if count == 1 else many}" for count, one, many in parts if count]
        return ", ".join(said) if said else "nothing"

    def to_dict(self) -> dict[str, int]:
        return {
            "forward": self.forward,
            "forward_backward": self.forward_backward,
            "hessian_vector": self.hessian_vector,
        }


def alpha_grid(low: float, high: float, points: int) -> np.ndarray:
    """``points`` evenly spaced :math:`\\alpha` from ``low`` to ``high`` (both included; ``low < high``)."""
    check_range("low", low)
    check_range("high", high, low, low_open=True)
    check_int("points", points, 2, MAX_POINTS)
    return np.linspace(low, high, points)


def plane_coordinates(span: float, grid: int) -> np.ndarray:
    """``grid`` evenly spaced coordinates from ``-span`` to ``span`` (both included), the same on both axes."""
    check_range("span", span, 0.0, low_open=True)
    check_int("grid", grid, 2, MAX_GRID)
    return np.linspace(-span, span, grid)


def line_cost(points: int, losses: int = 1) -> Cost:
    """The cost of :func:`interpolate`: one forward pass per loss per point."""
    return Cost(forward=check_int("points", points, 1) * check_int("losses", losses, 1))


def plane_cost(grid: int, losses: int = 1) -> Cost:
    """The cost of :func:`plane`: one forward pass per loss per point of the ``grid x grid`` plane."""
    return Cost(forward=check_int("grid", grid, 1) ** 2 * check_int("losses", losses, 1))


def _json(values: np.ndarray) -> list:
    """``values`` as (nested) lists with ``None`` for a non-finite entry."""
    as_objects = values.astype(object)
    as_objects[~np.isfinite(values)] = None
    return as_objects.tolist()


@dataclass(frozen=True)
class LineLandscape:
    """Losses along :math:`\\theta(\\alpha) = (1 - \\alpha)\\theta_0 + \\alpha\\theta_1`: ``losses[name][k]``
    at ``alphas[k]``."""

    alphas: np.ndarray
    losses: dict[str, np.ndarray]

    def to_dict(self) -> dict[str, list]:
        """JSON-ready: a non-finite loss (the model overflowed there) is ``None``."""
        return {"alphas": self.alphas.tolist(), **{name: _json(values) for name, values in self.losses.items()}}


@dataclass(frozen=True)
class PlaneLandscape:
    """Losses on the plane :math:`\\theta^* + a\\,\\delta + b\\,\\eta`: ``losses[name][i, j]`` at
    ``a = coordinates[i]`` (first direction) and ``b = coordinates[j]`` (second direction)."""

    coordinates: np.ndarray
    losses: dict[str, np.ndarray]

    def to_dict(self) -> dict[str, list]:
        """JSON-ready: a non-finite loss (the model overflowed there) is ``None``."""
        return {
            "coordinates": self.coordinates.tolist(),
            **{name: _json(values) for name, values in self.losses.items()},
        }


def _evaluate(losses: Mapping[str, PointLoss], point: Sequence[Tensor]) -> dict[str, float]:
    with torch.no_grad():
        return {name: float(loss(point)) for name, loss in losses.items()}


def interpolate(
    losses: Mapping[str, PointLoss],
    start: Sequence[Tensor],
    end: Sequence[Tensor],
    alphas: Sequence[float] | np.ndarray,
    *,
    progress: bool = False,
) -> LineLandscape:
    """Each of ``losses`` at :math:`(1 - \\alpha)\\,` ``start`` :math:`+ \\alpha\\,` ``end`` for every
    :math:`\\alpha` in ``alphas`` (costs :func:`line_cost`).

    Example::

        line = interpolate({"train": train_loss, "val": val_loss}, initial, final, alpha_grid(-0.5, 1.5, 41))
        print(line.losses["train"].max())  # the barrier, if any
    """
    if not losses:
        raise ValueError("losses must name at least one loss function, got none")
    start = [t.detach() for t in start]
    end = [t.detach() for t in check_like("end", end, start)]
    grid = np.asarray(alphas, dtype=float)
    values: dict[str, list[float]] = {name: [] for name in losses}
    for alpha in tqdm(grid, desc="line", unit="point", disable=not progress, dynamic_ncols=True):
        point = [torch.lerp(a, b, float(alpha)) for a, b in zip(start, end)]
        for name, value in _evaluate(losses, point).items():
            values[name].append(value)
    return LineLandscape(grid, {name: np.array(found) for name, found in values.items()})


def filter_normalized(direction: Sequence[Tensor], params: Sequence[Tensor], *, one_dim: str = "zero") -> list[Tensor]:
    """``direction`` with each filter rescaled to the norm of the parameter's filter (Li et al. 2018).

    A filter is a slice along the first dimension of a parameter with two or more dimensions (a row of a
    linear layer's weight or of an embedding, an output channel of a convolution): afterwards
    ``direction[i][j].norm() == params[i][j].norm()``. A direction filter of norm zero stays zero (there is
    no way to point it). One-dimensional (and zero-dimensional) parameters are zeroed with
    ``one_dim="zero"`` (Li et al.'s plots) or rescaled as a whole to the parameter's norm with
    ``one_dim="filter"``.
    """
    check_choice("one_dim", one_dim, ONE_DIM)
    direction = check_like("direction", direction, params)
    normalized = []
    for d, p in zip(direction, params):
        d, p = d.detach(), p.detach()
        if p.ndim <= 1 and one_dim == "zero":
            normalized.append(torch.zeros_like(d))
            continue
        rows = 1 if p.ndim <= 1 else p.shape[0]
        d_rows, p_rows = d.reshape(rows, -1), p.reshape(rows, -1)
        d_norms = torch.linalg.vector_norm(d_rows, dim=1, keepdim=True)
        p_norms = torch.linalg.vector_norm(p_rows, dim=1, keepdim=True)
        scale = torch.where(d_norms > 0, p_norms / torch.where(d_norms > 0, d_norms, 1.0), 0.0)
        normalized.append((d_rows * scale).reshape(d.shape))
    return normalized


def random_direction(
    params: Sequence[Tensor], generator: torch.Generator | None = None, *, one_dim: str = "zero"
) -> list[Tensor]:
    """A Gaussian direction shaped like ``params``, filter-normalised (:func:`filter_normalized`).

    ``generator`` is a CPU generator (the draws are made on the CPU and moved to each parameter's device),
    so the same seed gives the same direction on any device.
    """
    gaussian = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]
    return filter_normalized(gaussian, params, one_dim=one_dim)


def plane(
    losses: Mapping[str, PointLoss],
    center: Sequence[Tensor],
    directions: tuple[Sequence[Tensor], Sequence[Tensor]],
    coordinates: Sequence[float] | np.ndarray,
    *,
    progress: bool = False,
) -> PlaneLandscape:
    """Each of ``losses`` at ``center + a * directions[0] + b * directions[1]`` for every ``a`` and ``b`` in
    ``coordinates`` (costs :func:`plane_cost`).

    Example::

        g = torch.Generator().manual_seed(0)
        directions = (random_direction(params, g), random_direction(params, g))
        surface = plane({"train": train_loss}, params, directions, plane_coordinates(1.0, 21))
    """
    if not losses:
        raise ValueError("losses must name at least one loss function, got none")
    center = [t.detach() for t in center]
    first = check_like("directions[0]", directions[0], center)
    second = check_like("directions[1]", directions[1], center)
    grid = np.asarray(coordinates, dtype=float)
    values = {name: np.empty((grid.size, grid.size)) for name in losses}
    with tqdm(total=grid.size**2, desc="plane", unit="point", disable=not progress, dynamic_ncols=True) as bar:
        for i, a in enumerate(grid):
            for j, b in enumerate(grid):
                point = [c + float(a) * d + float(b) * e for c, d, e in zip(center, first, second)]
                for name, value in _evaluate(losses, point).items():
                    values[name][i, j] = value
                bar.update(1)
    return PlaneLandscape(grid, values)
