"""The race engine: run optimizers on problems, sweep learning rates fairly, rank the runs.

One *run* is one optimizer with one learning rate on one problem, for a fixed number of
steps from the problem's standard starting point. For every optimizer whose learning rate
is not given, a *sweep* first tries the same number of learning rates, on a log grid over
the optimizer's own range (see :mod:`gradwise.bench.optimizers`), so every optimizer gets
the same budget. The race then runs each optimizer alone at its chosen learning rate, timed;
that run is the one reported.

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
from dataclasses import dataclass, field

import numpy as np
import torch

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
        trajectory: the points ``x_t`` (one row per entry of ``losses``) of a timed run on
            a 2-D problem, otherwise ``None``.
        distance: ``||x_last - x*||_2`` (inf if diverged).
        wall_time: seconds spent in the loop (evaluation, backward, optimizer step) of a
            timed run; ``None`` for the runs of a sweep, which share their evaluations.
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
    wall_time: float | None
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


def steps_to_tolerance(losses: Sequence[float] | np.ndarray, minimum: float, tol: float) -> int | None:
    """The first index ``t`` with ``losses[t] - minimum <= tol``, or ``None`` if none."""
    below = np.flatnonzero(np.asarray(losses, dtype=np.float64) - minimum <= tol)
    return int(below[0]) if below.size else None


def rank_key(run: Run) -> tuple[int, float, float]:
    """Sort key for runs on one problem, best first (see the module docstring)."""
    if run.diverged:
        return (2, 0.0, 0.0)
    steps = run.steps_to_tol
    if run.final_gap <= run.tol and steps is not None:  # the final loss within tol has a first step within it
        return (0, float(steps), run.final_gap)
    return (1, run.final_gap, 0.0)


def _check_budget(steps: int, tol: float) -> None:
    check_int("steps", steps, 1)
    check_range("tol", tol, 0.0)


def run_optimizer(problem: Problem, spec: OptimizerSpec, lr: float, steps: int, tol: float) -> Run:
    """Run ``spec``'s optimizer with ``lr`` alone on ``problem`` for ``steps`` steps, timed.

    Starts at ``problem.initial_point``; records the loss before the first step and after
    every step, and the trajectory for 2-D problems. Stops early, marked diverged, at the
    first non-finite loss.
    """
    check_range("lr", lr, 0.0, low_open=True)
    _check_budget(steps, tol)
    # One throwaway step first, so that one-time costs (lazy imports on an optimizer's
    # first step, kernel selection) do not land in the timing.
    scratch = problem.initial_point.requires_grad_()
    scratch_optimizer = spec.build([scratch], lr)
    loss = problem(scratch)
    if spec.before_backward is not None:
        spec.before_backward(scratch_optimizer, loss, [scratch])
    loss.backward()
    scratch_optimizer.step()
    x = problem.initial_point.requires_grad_()
    optimizer = spec.build([x], lr)
    record = problem.dim == 2
    losses: list[float] = []
    points: list[np.ndarray] = []
    diverged = False
    start = time.perf_counter()
    for step in range(steps + 1):
        x.grad = None
        loss = problem(x)
        value = loss.item()
        if not math.isfinite(value):
            diverged = True
            break
        losses.append(value)
        if record:
            points.append(x.detach().numpy().copy())
        if step < steps:
            if spec.before_backward is not None:
                spec.before_backward(optimizer, loss, [x])
            loss.backward()
            optimizer.step()
    wall_time = time.perf_counter() - start
    return Run(
        optimizer=spec.name,
        problem=problem.label,
        lr=float(lr),
        losses=np.asarray(losses, dtype=np.float64),
        trajectory=np.stack(points) if points else None,
        distance=math.inf if diverged else float((x.detach() - problem.minimiser).norm()),
        wall_time=wall_time,
        diverged=diverged,
        minimum=problem.minimum,
        tol=float(tol),
    )


def sweep(problem: Problem, spec: OptimizerSpec, lrs: Sequence[float], steps: int, tol: float) -> list[Run]:
    """One run per learning rate in ``lrs``, all advanced in lockstep.

    Each run has its own parameter tensor, in its own param group (with its own ``lr``) of
    one optimizer. Param groups are updated independently (the ``torch.optim`` contract)
    and state is per parameter, so the runs are exactly as independent as separate calls of
    :func:`run_optimizer`: they only share one batched evaluation of the problem per step
    (a problem maps ``(runs, dim) -> (runs,)``) and one ``step()`` call, which makes a sweep
    several times cheaper. A run whose loss becomes non-finite leaves the batch, marked
    diverged; its parameter then has no gradient, so the optimizer skips it. Sweep runs are
    not timed and record no trajectory.
    """
    if not lrs:
        raise ValueError("lrs must hold at least one learning rate, got none")
    for lr in lrs:
        check_range("lr", lr, 0.0, low_open=True)
    _check_budget(steps, tol)
    points = [problem.initial_point.requires_grad_() for _ in lrs]
    optimizer = spec.build([{"params": [point], "lr": lr} for point, lr in zip(points, lrs)], lrs[0])
    losses: list[list[float]] = [[] for _ in lrs]
    diverged = [False] * len(lrs)
    active = list(range(len(lrs)))
    for step in range(steps + 1):
        for index in active:
            points[index].grad = None
        values = problem(torch.stack([points[index] for index in active]))
        still_active = []
        for index, value in zip(active, values.tolist()):
            if math.isfinite(value):
                losses[index].append(value)
                still_active.append(index)
            else:
                diverged[index] = True
        if step == steps or not still_active:
            break
        total = values.sum()
        if spec.before_backward is not None:
            spec.before_backward(optimizer, total, [points[index] for index in active])
        total.backward()
        for index in set(active) - set(still_active):
            points[index].grad = None
        optimizer.step()
        active = still_active
    minimiser = problem.minimiser
    return [
        Run(
            optimizer=spec.name,
            problem=problem.label,
            lr=float(lr),
            losses=np.asarray(curve, dtype=np.float64),
            trajectory=None,
            distance=math.inf if gone else float((point.detach() - minimiser).norm()),
            wall_time=None,
            diverged=gone,
            minimum=problem.minimum,
            tol=float(tol),
        )
        for lr, curve, gone, point in zip(lrs, losses, diverged, points)
    ]


@dataclass
class Entry:
    """One optimizer on one problem.

    Attributes:
        problem: the problem.
        optimizer: registry name of the optimizer.
        run: the timed run at the chosen (or given) learning rate; the one reported.
        sweep: the sweep's runs, one per learning rate of the grid; empty when the
            learning rate was given.
    """

    problem: Problem
    optimizer: str
    run: Run
    sweep: list[Run] = field(default_factory=list)

    @property
    def lr_source(self) -> str:
        """``"sweep"`` or ``"given"``."""
        return "sweep" if self.sweep else "given"

    @property
    def lr_on_edge(self) -> bool:
        """Whether a sweep of two or more rates chose the lowest or the highest one, a sign
        that the best rate may lie outside the optimizer's range."""
        return len(self.sweep) > 1 and self.run.lr in (self.sweep[0].lr, self.sweep[-1].lr)


@dataclass
class RaceResult:
    """Every entry of a race, with the settings it ran under."""

    problems: list[Problem]
    entries: list[Entry]
    steps: int
    tol: float
    sweep_points: int

    def standings(self, problem: Problem) -> list[Entry]:
        """The entries on ``problem``, best first by :func:`rank_key` of their runs."""
        return sorted((e for e in self.entries if e.problem is problem), key=lambda e: rank_key(e.run))


def planned_runs(problems: int, optimizers: Sequence[OptimizerSpec], sweep_points: int, lrs: dict[str, float]) -> int:
    """How many runs :func:`race` makes: a sweep plus the timed run, or just the timed run."""
    return problems * sum(1 if spec.name in lrs else sweep_points + 1 for spec in optimizers)


def race(
    problems: Sequence[Problem],
    optimizers: Sequence[OptimizerSpec],
    steps: int,
    *,
    tol: float = 1e-6,
    sweep_points: int = 9,
    lrs: dict[str, float] | None = None,
    on_runs: Callable[[int], None] | None = None,
) -> RaceResult:
    """Race ``optimizers`` on ``problems`` for ``steps`` steps each.

    Args:
        problems: the problems.
        optimizers: the optimizers' registry entries.
        steps: optimizer steps per run.
        tol: tolerance on ``f(x) - minimum`` for "steps to tolerance" and the ranking.
        sweep_points: learning rates a sweep tries per optimizer and problem (the same
            budget for every optimizer).
        lrs: fixed learning rates by optimizer name; those optimizers are not swept.
        on_runs: called with the number of runs just finished (for progress bars; the
            total is :func:`planned_runs`).
    """
    _check_budget(steps, tol)
    check_int("sweep_points", sweep_points, 1)
    given = dict(lrs or {})
    unknown = sorted(set(given) - {spec.name for spec in optimizers})
    if unknown:
        raise ValueError(f"lrs names optimizers that are not racing: {', '.join(unknown)}")
    for name, lr in given.items():
        check_range(f"lr of {name}", lr, 0.0, low_open=True)
    report = on_runs or (lambda count: None)
    entries = []
    for problem in problems:
        for spec in optimizers:
            trials = []
            if spec.name in given:
                lr = given[spec.name]
            else:
                trials = sweep(problem, spec, spec.lr_grid(sweep_points), steps, tol)
                report(len(trials))
                lr = min(trials, key=rank_key).lr
            entries.append(Entry(problem, spec.name, run_optimizer(problem, spec, lr, steps, tol), trials))
            report(1)
    return RaceResult(list(problems), entries, steps, float(tol), sweep_points)
