"""A race's results as text tables for the terminal and as JSON-serialisable rows."""

from __future__ import annotations

import math
from typing import Any

import torch

from gradwise.bench.machine import describe_machine
from gradwise.bench.race import Entry, RaceResult
from gradwise.problems import Problem

COLUMNS = ("#", "optimizer", "lr", "final loss", "distance", "steps to tol", "wall time (s)")
LEFT_ALIGNED = {"optimizer"}


def _point(values: torch.Tensor) -> str:
    numbers = values.tolist()
    shown = ", ".join(f"{v:.4g}" for v in numbers[:4])
    return f"({shown}{', ...' if len(numbers) > 4 else ''})"


def describe_problem(problem: Problem, result: RaceResult) -> str:
    """One line: the problem, its optimum, the start and the race's budget."""
    return (
        f"{problem.label}: f* = {problem.minimum:g} at {_point(problem.minimiser)}, "
        f"start {_point(problem.initial_point)}, {result.steps} steps, tol {result.tol:g}"
    )


def _cells(rank: int, entry: Entry) -> list[str]:
    run = entry.run
    lr = f"{run.lr:.3g}" + (" (given)" if entry.lr_source == "given" else "")
    steps = run.steps_to_tol
    return [
        str(rank),
        entry.optimizer,
        lr,
        f"diverged at step {run.steps_run + 1}" if run.diverged else f"{run.final_loss:.3e}",
        "-" if run.diverged else f"{run.distance:.3e}",
        "-" if steps is None else str(steps),
        f"{run.wall_time:.3f}",
    ]


def format_table(result: RaceResult, problem: Problem) -> str:
    """The standings on ``problem`` as an aligned text table, best first, with a title line
    and notes on learning rates chosen at the edge of their sweep range."""
    entries = result.standings(problem)
    rows = [list(COLUMNS)] + [_cells(rank, entry) for rank, entry in enumerate(entries, start=1)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]

    def line(row: list[str]) -> str:
        cells = (
            cell.ljust(width) if name in LEFT_ALIGNED else cell.rjust(width)
            for cell, width, name in zip(row, widths, COLUMNS)
        )
        return "  ".join(cells).rstrip()

    lines = [describe_problem(problem, result), line(rows[0]), "  ".join("-" * w for w in widths)]
    lines += [line(row) for row in rows[1:]]
    for entry in entries:
        if entry.lr_on_edge:
            low, high = entry.sweep[0].lr, entry.sweep[-1].lr
            lines.append(
                f"note: {entry.optimizer}'s best lr {entry.run.lr:.3g} is at the edge of its sweep range "
                f"[{low:.3g}, {high:.3g}]; the best rate may lie outside it"
            )
    return "\n".join(lines)


def _number(value: float) -> float | None:
    """JSON has no inf or nan: they become ``null``."""
    return value if math.isfinite(value) else None


def result_rows(result: RaceResult) -> list[dict[str, Any]]:
    """One JSON-serialisable dict per (problem, optimizer), in the tables' order, with the
    sweep's runs (learning rate, final loss, steps to tolerance, diverged)."""
    rows = []
    for problem in result.problems:
        for rank, entry in enumerate(result.standings(problem), start=1):
            run = entry.run
            rows.append(
                {
                    "problem": problem.label,
                    "rank": rank,
                    "optimizer": entry.optimizer,
                    "lr": run.lr,
                    "lr_source": entry.lr_source,
                    "final_loss": _number(run.final_loss),
                    "distance": _number(run.distance),
                    "steps_to_tol": run.steps_to_tol,
                    "wall_time_s": run.wall_time,
                    "diverged": run.diverged,
                    "steps_run": run.steps_run,
                    "sweep": [
                        {
                            "lr": trial.lr,
                            "final_loss": _number(trial.final_loss),
                            "steps_to_tol": trial.steps_to_tol,
                            "diverged": trial.diverged,
                        }
                        for trial in entry.sweep
                    ],
                }
            )
    return rows


def to_json(result: RaceResult) -> dict[str, Any]:
    """The whole race as a JSON-serialisable dict: settings, machine, problems and rows."""
    return {
        "settings": {"steps": result.steps, "tol": result.tol, "sweep_points": result.sweep_points},
        "machine": describe_machine(),
        "problems": [
            {
                "problem": problem.label,
                "dim": problem.dim,
                "minimum": problem.minimum,
                "minimiser": problem.minimiser.tolist(),
                "initial_point": problem.initial_point.tolist(),
            }
            for problem in result.problems
        ],
        "results": result_rows(result),
    }
