"""The race engine: run optimizers on problems, sweep learning rates fairly, rank the runs.

One *run* is one optimizer with one learning rate on one problem, for a fixed number of
steps from the problem's standard starting point. A *sweep* gives every optimizer the same
number of runs, on a log grid over its own learning-rate range (see
:mod:`gradwise.bench.optimizers`), and keeps the best one.

Ranking (the sweep's selection criterion and the order of the tables), best first:

1. runs whose final loss is within ``tol`` of the minimum, by the number of steps they
   needed to first get there (ties: lower final loss);
2. runs that end finite but above the tolerance, by final loss;
3. runs that diverged (the loss became inf or nan).

This rewards what a user wants from an optimizer on a problem with a known optimum: reach
the target soon and stay there. Ranking by final loss alone cannot separate runs that all
reach the floating-point floor; ranking by the smallest loss seen along the way would
reward runs that pass near the optimum and then oscillate away.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from gradwise.bench.optimizers import OptimizerSpec
from gradwise.problems import Problem
from gradwise.validation import check_int, check_range


@dataclass
class Run:
    """The record of one optimizer, with one learning rate, on one problem.

    Attributes:
        optimizer: registry name of the optimizer.
        problem: the problem's label.
        lr: learning rate.
        losses: ``f(x_t)`` for ``t = 0, 1, ...``: the start, then after every step. A run
            that diverges stops at the first non-finite loss, which is not recorded.
        trajectory: the points ``x_t`` (one row per entry of ``losses``) for 2-D problems,
            otherwise ``None``.
        distance: ``||x_last - x*||_2`` (inf if diverged).
        wall_time: seconds spent in the loop (evaluation, backward, optimizer step).
        diverged: whether the loss became inf or nan.
        minimum: the problem's minimum value.
        tol: the tolerance on ``f(x) - minimum`` for :attr:`steps_to_tol`.
    """

    optimizer: str
    problem: str
    lr: float
    losses: np.ndarray
    trajectory: np.ndarray | None
    distance: float
    wall_time: float
    diverged: bool
    minimum: float
    tol: float

    @property
    def final_loss(self) -> float:
        """``f`` at the last point, or inf if the run diverged."""
        return math.inf if self.diverged else float(self.losses[-1])

    @property
    def final_gap(self) -> float:
        """``f(x_last) - minimum`` (inf if diverged)."""
        return self.final_loss - self.minimum

    @property
    def steps_to_tol(self) -> int | None:
        """The first step ``t`` with ``f(x_t) - minimum <= tol``, or ``None``."""
        return steps_to_tolerance(self.losses, self.minimum, self.tol)

    @property
    def steps_run(self) -> int:
        """Optimizer steps taken (fewer than asked if the run diverged)."""
        return len(self.losses) - 1


def steps_to_tolerance(losses: Sequence[float], minimum: float, tol: float) -> int | None:
    """The first index ``t`` with ``losses[t] - minimum <= tol``, or ``None`` if none."""
    below = np.flatnonzero(np.asarray(losses, dtype=np.float64) - minimum <= tol)
    return int(below[0]) if below.size else None


def rank_key(run: Run) -> tuple[int, float, float]:
    """Sort key for runs on one problem, best first (see the module docstring)."""
    if run.diverged:
        return (2, 0.0, 0.0)
    if run.final_gap <= run.tol:
        return (0, float(run.steps_to_tol), run.final_gap)
    return (1, run.final_gap, 0.0)


def run_optimizer(problem: Problem, spec: OptimizerSpec, lr: float, steps: int, tol: float) -> Run:
    """Run ``spec``'s optimizer with ``lr`` on ``problem`` for ``steps`` steps.

    Starts at ``problem.initial_point``; records the loss before the first step and after
    every step, and the trajectory for 2-D problems. Stops early, marked diverged, at the
    first non-finite loss.
    """
    check_range("lr", lr, 0.0, low_open=True)
    check_int("steps", steps, 1)
    check_range("tol", tol, 0.0)
    x = problem.initial_point.requires_grad_()
    optimizer = spec.build([x], lr)
    record = problem.dim == 2
    losses: list[float] = []
    points: list[np.ndarray] = []
    diverged = False
    start = time.perf_counter()
    for step in range(steps + 1):
        optimizer.zero_grad()
        loss = problem(x)
        value = loss.item()
        if not math.isfinite(value):
            diverged = True
            break
        losses.append(value)
        if record:
            points.append(x.detach().numpy().copy())
        if step < steps:
            loss.backward()
            optimizer.step()
    wall_time = time.perf_counter() - start
    distance = math.inf if diverged else float((x.detach() - problem.minimiser).norm())
    return Run(
        optimizer=spec.name,
        problem=problem.label,
        lr=float(lr),
        losses=np.asarray(losses, dtype=np.float64),
        trajectory=np.stack(points) if points else None,
        distance=distance,
        wall_time=wall_time,
        diverged=diverged,
        minimum=problem.minimum,
        tol=float(tol),
    )


@dataclass
class Entry:
    """One optimizer on one problem: every run tried and the best of them.

    ``lr_source`` is ``"sweep"`` when the learning rate was chosen by a sweep, ``"given"``
    when the user fixed it (then ``runs`` holds that single run).
    """

    problem: Problem
    optimizer: str
    runs: list[Run]
    lr_source: str

    @property
    def best(self) -> Run:
        return min(self.runs, key=rank_key)


@dataclass
class RaceResult:
    """Every entry of a race, with the settings it ran under."""

    problems: list[Problem]
    entries: list[Entry]
    steps: int
    tol: float
    sweep_points: int

    def standings(self, problem: Problem) -> list[Entry]:
        """The entries on ``problem``, best first by :func:`rank_key` of their best run."""
        return sorted((e for e in self.entries if e.problem is problem), key=lambda e: rank_key(e.best))


def trial_lrs(spec: OptimizerSpec, sweep_points: int, given_lr: float | None = None) -> list[float]:
    """The learning rates a race tries for ``spec``: ``[given_lr]``, or the sweep grid."""
    if given_lr is not None:
        return [check_range(f"lr for {spec.name}", given_lr, 0.0, low_open=True)]
    return spec.lr_grid(sweep_points)


def race(
    problems: Sequence[Problem],
    optimizers: Sequence[OptimizerSpec],
    steps: int,
    *,
    tol: float = 1e-6,
    sweep_points: int = 7,
    lrs: dict[str, float] | None = None,
    on_run: Callable[[Run], None] | None = None,
) -> RaceResult:
    """Race ``optimizers`` on ``problems`` for ``steps`` steps each.

    Args:
        problems: the problems.
        optimizers: the optimizers' registry entries.
        steps: optimizer steps per run.
        tol: tolerance on ``f(x) - minimum`` for "steps to tolerance" and the ranking.
        sweep_points: runs per optimizer and problem in a learning-rate sweep (the same
            budget for every optimizer).
        lrs: fixed learning rates by optimizer name; those optimizers are not swept.
        on_run: called after every run (for progress bars).
    """
    check_int("steps", steps, 1)
    check_range("tol", tol, 0.0)
    check_int("sweep_points", sweep_points, 1)
    given = dict(lrs or {})
    unknown = sorted(set(given) - {spec.name for spec in optimizers})
    if unknown:
        raise ValueError(f"lrs names optimizers that are not racing: {', '.join(unknown)}")
    entries = []
    for problem in problems:
        for spec in optimizers:
            runs = []
            for lr in trial_lrs(spec, sweep_points, given.get(spec.name)):
                runs.append(run_optimizer(problem, spec, lr, steps, tol))
                if on_run is not None:
                    on_run(runs[-1])
            entries.append(Entry(problem, spec.name, runs, "given" if spec.name in given else "sweep"))
    return RaceResult(list(problems), entries, steps, float(tol), sweep_points)
