"""The ``Problem`` base class: a test function with a known minimiser and minimum value."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from gradwise.validation import check_choice, check_int

DTYPES = (torch.float64, torch.float32)


class Problem(ABC):
    """A differentiable test function ``f: R^dim -> R`` whose global minimum is known.

    Calling the problem evaluates ``f`` with ordinary torch operations, so autograd gives
    the gradient. It accepts a point of shape ``(dim,)`` and returns a scalar, or a batch of
    shape ``(..., dim)`` and returns shape ``(...)`` (handy for contour plots).

    Subclasses set ``name`` (the registry name), implement :meth:`value`, and provide
    :attr:`minimiser`, :attr:`minimum`, :attr:`initial_point` and :attr:`bounds`.

    Args:
        dim: number of variables.
        dtype: floating-point type of the points; float64 by default, so that runs can
            reach suboptimalities far below float32's resolution.
    """

    name: str

    def __init__(self, dim: int, dtype: torch.dtype = torch.float64) -> None:
        self.dim = check_int("dim", dim, 1)
        self.dtype = check_choice("dtype", dtype, DTYPES)

    @abstractmethod
    def value(self, x: Tensor) -> Tensor:
        """``f`` over the last dimension of ``x`` (shape ``(..., dim)`` -> ``(...)``)."""

    def __call__(self, x: Tensor) -> Tensor:
        if x.ndim == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (..., {self.dim}) for {self.label}, got {tuple(x.shape)}")
        return self.value(x)

    @property
    @abstractmethod
    def minimiser(self) -> Tensor:
        """A global minimiser ``x*`` (shape ``(dim,)``)."""

    @property
    def minimum(self) -> float:
        """The global minimum value ``f(x*)``; 0 for every problem shipped here."""
        return 0.0

    @property
    @abstractmethod
    def initial_point(self) -> Tensor:
        """The standard starting point ``x_0`` (a fresh tensor on every access)."""

    @property
    @abstractmethod
    def bounds(self) -> tuple[tuple[float, float], ...]:
        """A box ``((low_1, high_1), ..., (low_dim, high_dim))`` for plots of the landscape."""

    @property
    def label(self) -> str:
        """A short, file-name-safe description, e.g. ``rosenbrock-2d``."""
        return f"{self.name}-{self.dim}d"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, dtype={self.dtype})"

    def _tensor(self, values) -> Tensor:
        return torch.as_tensor(values, dtype=self.dtype)
