"""Test functions with a known minimiser and minimum value.

Every problem is a :class:`Problem`: call it on a point (or a batch of points) to get a
differentiable loss; it knows its ``minimiser``, ``minimum``, standard ``initial_point`` and a
plotting box ``bounds``. Build one by name with :func:`make_problem`::

    problem = make_problem("rosenbrock", dim=10)
    x = problem.initial_point.requires_grad_()
    problem(x).backward()
"""

from __future__ import annotations

from collections.abc import Callable

from gradwise.problems.base import Problem
from gradwise.problems.beale import Beale
from gradwise.problems.quadratic import Quadratic
from gradwise.problems.rastrigin import Rastrigin
from gradwise.problems.rosenbrock import Rosenbrock
from gradwise.validation import check_choice

PROBLEMS: dict[str, Callable[..., Problem]] = {
    "rosenbrock": Rosenbrock,
    "beale": Beale,
    "rastrigin": Rastrigin,
    "quadratic": Quadratic,
}


def make_problem(name: str, **kwargs) -> Problem:
    """Build the problem registered as ``name`` with keyword arguments for its constructor."""
    return PROBLEMS[check_choice("problem", name, PROBLEMS)](**kwargs)


__all__ = ["PROBLEMS", "Beale", "Problem", "Quadratic", "Rastrigin", "Rosenbrock", "make_problem"]
