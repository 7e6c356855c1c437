"""Shared validators: every hyperparameter and argument is checked with these.

Each raises a ``ValueError`` that names the parameter, the value given and the allowed
range, e.g. ``lr must be >= 0, got -0.1``. Nothing is clamped silently.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import torch


def _as_real(name: str, value: Any) -> float:
    """Return ``value`` as a float, or raise if it is not a real number (bools excluded)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    return float(value)


def _describe(low: float, high: float, low_open: bool, high_open: bool) -> str:
    if high == math.inf:
        return f"{'>' if low_open else '>='} {low:g}"
    if low == -math.inf:
        return f"{'<' if high_open else '<='} {high:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def check_range(
    name: str,
    value: Any,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Check that ``value`` is a finite real number between ``low`` and ``high``.

    ``low_open``/``high_open`` exclude the end points. Returns the value as given, so it
    can be used inline: ``self.lr = check_range("lr", lr, 0.0)``.
    """
    number = _as_real(name, value)
    allowed = _describe(low, high, low_open, high_open)
    too_low = number <= low if low_open else number < low
    too_high = number >= high if high_open else number > high
    if not math.isfinite(number) or too_low or too_high:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """Check that ``value`` is an integer (not a bool) within ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    number = int(value)  # any Integral (a numpy integer too) as a plain int, to compare and return
    if (low is not None and number < low) or (high is not None and number > high):
        lo = -math.inf if low is None else low
        hi = math.inf if high is None else high
        raise ValueError(f"{name} must be an integer {_describe(lo, hi, False, False)}, got {value!r}")
    return number


def check_betas(name: str, betas: Any, count: int = 2) -> tuple[float, ...]:
    """Check a tuple of ``count`` decay rates, each in [0, 1)."""
    if not isinstance(betas, Sequence) or isinstance(betas, str) or len(betas) != count:
        raise ValueError(f"{name} must be a tuple of {count} numbers in [0, 1), got {betas!r}")
    for index, beta in enumerate(betas):
        check_range(f"{name}[{index}]", beta, 0.0, 1.0, high_open=True)
    return tuple(betas)


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Check that ``value`` is one of ``choices``."""
    options = list(choices)
    if value not in options:
        allowed = ", ".join(repr(option) for option in options)
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """Check that ``value`` is a bool (a string such as ``"False"`` would count as true)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_optional_bool(name: str, value: Any) -> bool | None:
    """Check that ``value`` is None (let the library choose) or a bool."""
    return None if value is None else check_bool(name, value)
