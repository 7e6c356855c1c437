"""The classic comparison: stochastic vs batch methods on sparse logistic regression.

Runs SGD, SVRG, SAGA, L-BFGS, SQN and Newton-CG from ``w = 0`` on
:class:`gradwise.problems.logistic.SparseLogistic` and records the objective gap
``F(w) - F*`` against the number of examples accessed (each gradient or Hessian-vector
product on ``k`` examples costs ``k``; evaluating ``F`` for the record is free), which is
the axis of the survey's Fig. 3.1 (Bottou, Curtis & Nocedal 2018, SIAM Review 60): SGD makes
fast progress within the first epoch, then stalls at a level set by its step size and the
gradient noise, while the batch and variance-reduced methods keep converging linearly and
win when high accuracy is asked.

``F*`` comes from a long L-BFGS run to a gradient norm of 1e-11 (not plotted, not counted).
Step sizes are fixed, from the smoothness ``L = 1/4 + lambda`` of every ``f_i``:
SGD ``2/L`` (a large constant step, fast at first), SVRG and SAGA ``1/(2L)`` on mini-batches,
SQN ``1/(400 L)`` on 4x larger batches with curvature pairs every 20 steps on 10x larger
Hessian samples (larger constant steps diverge), L-BFGS
(history 10) and Newton-CG (Hessian on a 20% subsample, at most 10 CG steps) with their line
searches at unit step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TypedDict

import torch

from gradwise.optim import LBFGS, SAGA, SGD, SQN, SVRG, NewtonCG
from gradwise.problems.logistic import SparseLogistic
from gradwise.validation import check_choice, check_int, check_range

METHODS = ("sgd", "svrg", "saga", "lbfgs", "sqn", "newton_cg")
STOCHASTIC = ("sgd", "svrg", "saga", "sqn")
BATCH = ("lbfgs", "newton_cg")
class ProblemSize(TypedDict):
    num_examples: int
    num_features: int


DEFAULT_SIZE = ProblemSize(num_examples=5000, num_features=12_000)
FULL_SIZE = ProblemSize(num_examples=20_000, num_features=47_000)


@dataclass
class Curve:
    """One method's record: examples accessed and ``F(w) - F*`` after them."""

    method: str
    settings: str
    examples: list[int] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def gap_at(self, examples: float) -> float:
        """The gap reached with at most ``examples`` examples accessed (``inf`` before the first record)."""
        reached = [gap for count, gap in zip(self.examples, self.gaps) if count <= examples]
        return min(reached) if reached else math.inf


@dataclass
class LogisticRace:
    """The problem, its optimum, the budget and one :class:`Curve` per method."""

    problem: str
    num_examples: int
    optimum: float
    epochs: float
    batch_size: int
    curves: dict[str, Curve]


class _Recorder:
    """Counts examples accessed and records the gap at geometrically spaced counts."""

    def __init__(self, curve: Curve, problem: SparseLogistic, w: torch.Tensor, optimum: float, budget: int) -> None:
        self.curve, self.problem, self.w, self.optimum, self.budget = curve, problem, w, optimum, budget
        self.examples = 0
        self.next_mark = 0

    @property
    def done(self) -> bool:
        return self.examples >= self.budget

    def spend(self, examples: int) -> None:
        self.examples += examples
        if self.examples >= self.next_mark or self.done:
            self.record()

    def record(self, value: float | None = None) -> None:
        value = self.problem.objective(self.w.detach()) if value is None else value
        self.curve.examples.append(self.examples)
        self.curve.gaps.append(max(value - self.optimum, 0.0))
        self.next_mark = max(self.next_mark, int(self.examples * 1.08) + 1)


def solve_to_optimum(problem: SparseLogistic) -> tuple[float, torch.Tensor]:
    """``(F*, w*)`` by L-BFGS (history 30) to a gradient inf-norm of 1e-11 (or until rounding stops it)."""
    w = problem.initial_point().requires_grad_()
    optimizer = LBFGS(
        [w], history_size=30, max_iter=5000, max_eval=20000, tolerance_grad=1e-11, tolerance_change=0.0,
        line_search_fn="more_thuente",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = problem.loss(w)
        loss.backward()
        return loss

    optimizer.step(closure)
    return problem.objective(w.detach()), w.detach()


def _batches(generator: torch.Generator, n: int, batch_size: int):
    """Endless random mini-batches: a fresh permutation every epoch."""
    while True:
        yield from torch.randperm(n, generator=generator).split(batch_size)


def _run_sgd(problem, w, record: _Recorder, batch_size: int, generator) -> str:
    lr = 2.0 / problem.smoothness
    optimizer = SGD([w], lr=lr)
    for rows in _batches(generator, problem.num_examples, batch_size):
        optimizer.zero_grad()
        problem.loss(w, rows).backward()
        optimizer.step()
        record.spend(rows.numel())
        if record.done:
            break
    return f"lr {lr:.3g}, batch {batch_size}"


def _run_svrg(problem, w, record: _Recorder, batch_size: int, generator) -> str:
    lr = 0.5 / problem.smoothness
    optimizer = SVRG([w], lr=lr)
    n = problem.num_examples

    def full_closure() -> torch.Tensor:
        loss = problem.loss(w)
        loss.backward()
        return loss

    while not record.done:
        optimizer.update_snapshot(full_closure)
        record.spend(n)
        for rows in torch.randperm(n, generator=generator).split(batch_size):
            if record.done:
                break

            def closure(rows=rows) -> torch.Tensor:
                loss = problem.loss(w, rows)
                loss.backward()
                return loss

            optimizer.step(closure)
            record.spend(2 * rows.numel())
    return f"lr {lr:.3g}, batch {batch_size}, snapshot every epoch"


def _run_saga(problem, w, record: _Recorder, batch_size: int, generator) -> str:
    lr = 0.5 / problem.smoothness
    partition = torch.randperm(problem.num_examples, generator=generator).split(batch_size)
    batches = [problem.rows(rows) for rows in partition]  # fixed mini-batches: the table's slots
    optimizer = SAGA([w], lr=lr, num_slots=len(partition))
    while not record.done:
        slot = int(torch.randint(len(partition), (), generator=generator))

        def closure(slot=slot) -> torch.Tensor:
            loss = problem.loss(w, partition[slot])
            loss.backward()
            return loss

        optimizer.step(slot, closure)
        record.spend(partition[slot].numel())
    del batches
    return f"lr {lr:.3g}, {len(partition)} fixed batches of {batch_size}"


def _run_sqn(problem, w, record: _Recorder, batch_size: int, generator) -> str:
    # Constant steps must be small: the L-BFGS matrix scales steps by up to 1/lambda along
    # directions of rare features, where the gradient noise lives (the paper uses beta/k).
    lr = 0.0025 / problem.smoothness
    batch_size, interval = 4 * batch_size, 20
    hessian_batch = 10 * batch_size
    optimizer = SQN([w], lr=lr, history_size=10, update_every=interval)
    for rows in _batches(generator, problem.num_examples, batch_size):
        optimizer.zero_grad()
        problem.loss(w, rows).backward()
        hessian_rows = None
        if optimizer.needs_hessian_closure:
            hessian_rows = torch.randint(problem.num_examples, (hessian_batch,), generator=generator)
        optimizer.step(hessian_closure=None if hessian_rows is None else partial(problem.loss, w, hessian_rows))
        record.spend(rows.numel() + (0 if hessian_rows is None else hessian_batch))
        if record.done:
            break
    return f"lr {lr:.3g}, batch {batch_size}, Hessian batch {hessian_batch} every {interval} steps"


def _run_lbfgs(problem, w, record: _Recorder, batch_size: int, generator) -> str:
    optimizer = LBFGS(
        [w], history_size=10, max_iter=100_000, max_eval=100_000, tolerance_grad=0.0, tolerance_change=0.0,
        line_search_fn="more_thuente",
    )
    best = math.inf

    class Budget(Exception):
        pass

    def closure() -> torch.Tensor:
        nonlocal best
        if record.done:
            raise Budget
        optimizer.zero_grad()
        loss = problem.loss(w)
        loss.backward()
        best = min(best, float(loss.detach()))
        record.examples += problem.num_examples
        record.record(best)
        return loss

    try:
        optimizer.step(closure)
    except Budget:
        pass
    return "history 10, strong Wolfe, full batch"


def _run_newton_cg(problem, w, record: _Recorder, batch_size: int, generator) -> str:
    hessian_batch = max(1, problem.num_examples // 5)
    optimizer = NewtonCG([w], cg_max_iter=10)
    state = optimizer.state[w]
    while not record.done:
        rows = torch.randint(problem.num_examples, (hessian_batch,), generator=generator)
        before = (state.get("func_evals", 0), state.get("hvp_evals", 0))
        optimizer.step(lambda: problem.loss(w), hessian_closure=partial(problem.loss, w, rows))
        evaluations = state["func_evals"] - before[0]
        products = state["hvp_evals"] - before[1]
        record.spend(evaluations * problem.num_examples + (products + 1) * hessian_batch)
        if not math.isfinite(problem.objective(w.detach())) or float(w.grad.abs().max()) < 1e-13:
            break
    return f"Hessian subsample {hessian_batch}, <= 10 CG steps, Armijo"


RUNNERS: dict[str, Callable[..., str]] = {
    "sgd": _run_sgd,
    "svrg": _run_svrg,
    "saga": _run_saga,
    "lbfgs": _run_lbfgs,
    "sqn": _run_sqn,
    "newton_cg": _run_newton_cg,
}


def logistic_race(
    problem: SparseLogistic,
    methods: tuple[str, ...] = METHODS,
    *,
    epochs: float = 20.0,
    batch_size: int = 16,
    seed: int = 0,
    optimum: float | None = None,
    on_method: Callable[[str], None] | None = None,
) -> LogisticRace:
    """Run ``methods`` on ``problem`` for ``epochs`` passes' worth of examples each.

    Example::

        result = logistic_race(SparseLogistic(5000, 12000), epochs=10)
        print(format_logistic_table(result))
    """
    for method in methods:
        check_choice("method", method, METHODS)
    check_range("epochs", epochs, 0.0, low_open=True)
    check_int("batch_size", batch_size, 1, problem.num_examples)
    optimum = solve_to_optimum(problem)[0] if optimum is None else optimum
    budget = int(epochs * problem.num_examples)
    curves = {}
    for method in methods:
        generator = torch.Generator().manual_seed(seed)
        w = problem.initial_point().requires_grad_()
        curve = Curve(method, "")
        record = _Recorder(curve, problem, w, optimum, budget)
        record.record()
        start = time.perf_counter()
        curve.settings = RUNNERS[method](problem, w, record, batch_size, generator)
        curve.seconds = time.perf_counter() - start
        curves[method] = curve
        if on_method is not None:
            on_method(method)
    return LogisticRace(repr(problem), problem.num_examples, optimum, epochs, batch_size, curves)


def checkpoints(result: LogisticRace) -> list[float]:
    """The budgets (in epochs) the table reports: 0.1, 1, then every decade, and the end."""
    marks = [0.1, 1.0]
    mark = 10.0
    while mark < result.epochs:
        marks.append(mark)
        mark *= 10
    return [m for m in marks if m < result.epochs] + [result.epochs]


def format_logistic_table(result: LogisticRace) -> str:
    """A table of ``F - F*`` per method after each checkpoint budget; the best of each column marked ``*``."""
    marks = checkpoints(result)
    headers = ["method"] + [f"{m:g} ep" for m in marks] + ["time (s)", "settings"]
    columns = {m: [curve.gap_at(m * result.num_examples) for curve in result.curves.values()] for m in marks}
    rows = []
    for index, (name, curve) in enumerate(result.curves.items()):
        cells = [name]
        for m in marks:
            gap = columns[m][index]
            star = "*" if gap == min(columns[m]) else " "
            cells.append(f"{gap:.2e}{star}" if math.isfinite(gap) else "-")
        rows.append(cells + [f"{curve.seconds:.1f}", curve.settings])
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]
    lines = [
        f"{result.problem}: F* = {result.optimum:.10f}; F(w) - F* after a budget of examples accessed "
        f"(epochs of {result.num_examples}); * = best",
        "  ".join(
            h.ljust(w) if i in (0, len(headers) - 1) else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths))
        ),
    ]
    for row in rows:
        lines.append(
            "  ".join(c.ljust(w) if i in (0, len(row) - 1) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        )
    return "\n".join(lines)


def to_json(result: LogisticRace) -> dict:
    """The race as plain data."""
    return {
        "problem": result.problem,
        "num_examples": result.num_examples,
        "optimum": result.optimum,
        "epochs": result.epochs,
        "batch_size": result.batch_size,
        "curves": {
            name: {
                "settings": c.settings,
                "seconds": c.seconds,
                "examples": c.examples,
                "gaps": c.gaps,
                "gap_at": {f"{m:g}": c.gap_at(m * result.num_examples) for m in checkpoints(result)},
            }
            for name, c in result.curves.items()
        },
    }


def plot_logistic_race(result: LogisticRace, path: str | Path) -> Path:
    """``F(w) - F*`` (log scale) against epochs of examples accessed, one curve per method."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from matplotlib.figure import Figure  # here: the race's --help and tables need no matplotlib

    figure = Figure(figsize=(7.5, 4.8), dpi=130)
    axes = figure.subplots()
    floor = 1e-16
    for name, curve in result.curves.items():
        style = "--" if name in BATCH else "-"
        epochs = [count / result.num_examples for count in curve.examples]
        axes.plot(epochs, [max(gap, floor) for gap in curve.gaps], style, label=name, linewidth=1.6)
    axes.set_yscale("log")
    axes.set_xlabel(f"examples accessed (epochs of {result.num_examples})")
    axes.set_ylabel("F(w) - F*")
    axes.set_title("Logistic regression (sparse, RCV1-shaped): stochastic vs batch", fontsize=10)
    axes.axvline(1.0, color="grey", linewidth=0.8, linestyle=":")
    axes.set_xlim(0, result.epochs)
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return path
