"""Tests for gradwise.bench: the optimizer registry, the race engine, sweeps and reports."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from gradwise.bench.optimizers import DEFAULT_OPTIMIZERS, OPTIMIZERS, get_optimizer
from gradwise.bench.plots import plot_contours
from gradwise.bench.race import (
    Run,
    planned_runs,
    race,
    rank_key,
    run_optimizer,
    steps_to_tolerance,
    sweep,
)
from gradwise.bench.report import format_table, to_json
from gradwise.problems import Beale, Quadratic, Rosenbrock


def _run(losses, diverged=False, tol=1e-6, minimum=0.0, lr=0.1):
    return Run("sgd", "p", lr, np.asarray(losses, dtype=np.float64), None, 0.0, 0.0, diverged, minimum, tol)


def test_registry_names_and_builds():
    assert set(OPTIMIZERS) == {"sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw", "nadam", "lion",
                               "adafactor", "muon", "shampoo", "soap", "sophia",
                               "ademamix", "ademamix-cautious", "adamw-cautious", "mars-adamw", "lion-cautious",
                               "mars-lion", "momentum-cautious", "psgd-kron"}
    assert set(DEFAULT_OPTIMIZERS) == {"sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw", "lion"}
    x = torch.zeros(2, requires_grad=True)
    for name, spec in OPTIMIZERS.items():
        optimizer = spec.build([x], 0.01)
        assert isinstance(optimizer, torch.optim.Optimizer), name
        assert type(optimizer).__module__.startswith("gradwise.optim"), name
        assert optimizer.param_groups[0]["lr"] == 0.01
    momentum = get_optimizer("momentum").build([x], 0.1).param_groups[0]
    nesterov = get_optimizer("nesterov").build([x], 0.1).param_groups[0]
    assert (momentum["momentum"], momentum["nesterov"]) == (0.9, False)
    assert (nesterov["momentum"], nesterov["nesterov"]) == (0.9, True)
    with pytest.raises(ValueError, match="^optimizer must be one of"):
        get_optimizer("adadelta")


def test_lr_grids_have_the_same_resolution_for_everyone():
    widths = {name: math.log10(high / low) for name, (low, high) in ((n, s.lr_range) for n, s in OPTIMIZERS.items())}
    assert len({round(width, 9) for width in widths.values()}) == 1
    assert OPTIMIZERS["lion"].lr_range[1] < OPTIMIZERS["adam"].lr_range[1]
    grid = OPTIMIZERS["adam"].lr_grid(5)
    assert grid[0] == pytest.approx(1e-3) and grid[-1] == pytest.approx(10.0)
    np.testing.assert_allclose(np.diff(np.log10(grid)), 1.0)
    assert OPTIMIZERS["adam"].lr_grid(1) == [pytest.approx(0.1)]
    with pytest.raises(ValueError, match="^points must"):
        OPTIMIZERS["adam"].lr_grid(0)


def test_steps_to_tolerance_on_a_crafted_curve():
    losses = [5.0, 1.0, 1e-3, 1e-7, 1e-2, 1e-8]
    assert steps_to_tolerance(losses, 0.0, 1e-6) == 3
    assert steps_to_tolerance(losses, 0.0, 1e-3) == 2
    assert steps_to_tolerance(losses, 0.0, 1e-9) is None
    assert steps_to_tolerance([x + 2.0 for x in losses], 2.0, 1e-6) == 3
    assert steps_to_tolerance([5.0, 4.0], 4.0, 0.0) == 1


def test_rank_key_prefers_reaching_the_target_then_low_loss_then_finite():
    fast = _run([1.0, 1e-7, 1e-8])
    slow = _run([1.0, 1e-3, 1e-8])
    bounced = _run([1.0, 1e-9, 1e-3])  # touched the target, then left it
    stalled = _run([1.0, 1e-2, 1e-2])
    diverged = _run([1.0, 1e3], diverged=True)
    runs = [diverged, stalled, bounced, slow, fast]
    assert sorted(runs, key=rank_key) == [fast, slow, bounced, stalled, diverged]
    assert bounced.steps_to_tol == 1 and slow.steps_to_tol == 2
    assert diverged.final_loss == math.inf


def test_gradient_descent_on_the_quadratic_decreases_the_loss():
    problem = Quadratic(dim=2, kappa=10.0)
    run = run_optimizer(problem, OPTIMIZERS["sgd"], lr=1.0, steps=50, tol=1e-6)
    assert run.losses.shape == (51,) and run.steps_run == 50
    assert run.losses[0] == pytest.approx(problem(problem.initial_point).item())
    assert np.all(np.diff(run.losses) < 0)  # lr = 1/L: monotone descent
    assert run.final_loss < 1e-3 * run.losses[0]
    assert run.trajectory.shape == (51, 2)
    np.testing.assert_allclose(run.trajectory[0], problem.initial_point.numpy())
    assert run.distance == pytest.approx(np.linalg.norm(run.trajectory[-1] - problem.minimiser.numpy()))
    assert run.wall_time > 0 and not run.diverged


def test_trajectories_are_recorded_for_2d_problems_only():
    run = run_optimizer(Rosenbrock(dim=3), OPTIMIZERS["adam"], lr=0.01, steps=5, tol=1e-6)
    assert run.trajectory is None and len(run.losses) == 6


def test_a_huge_learning_rate_is_marked_diverged():
    run = run_optimizer(Rosenbrock(), OPTIMIZERS["sgd"], lr=10.0, steps=1000, tol=1e-6)
    assert run.diverged and run.steps_run < 1000
    assert np.all(np.isfinite(run.losses))
    assert run.final_loss == math.inf and run.distance == math.inf and run.steps_to_tol is None


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam", "lion", "rmsprop"])
def test_sweep_runs_are_independent(name):
    """Runs of a lockstep sweep (one diverging) equal separate runs."""
    problem, spec = Rosenbrock(), OPTIMIZERS[name]
    lrs = [1e-4, 1e-3, 10.0]
    runs = sweep(problem, spec, lrs, steps=60, tol=1e-6)
    assert [run.lr for run in runs] == lrs
    for run, lr in zip(runs, lrs):
        alone = run_optimizer(problem, spec, lr, steps=60, tol=1e-6)
        assert run.diverged == alone.diverged
        np.testing.assert_allclose(run.losses, alone.losses, rtol=1e-12)
        assert run.wall_time is None and run.trajectory is None
    if name in {"sgd", "momentum"}:
        assert runs[-1].diverged  # the diverging run left the batch without disturbing the others


def test_sweep_needs_learning_rates():
    with pytest.raises(ValueError, match="^lrs must hold at least one"):
        sweep(Beale(), OPTIMIZERS["adam"], [], steps=5, tol=1e-6)


def test_sweep_gives_every_optimizer_the_same_budget_and_keeps_the_best():
    names = ["sgd", "adam", "lion", "adagrad"]
    calls = []
    result = race([Beale()], [OPTIMIZERS[n] for n in names], steps=40, sweep_points=4, on_runs=calls.append)
    assert sum(calls) == planned_runs(1, [OPTIMIZERS[n] for n in names], 4, {}) == 4 * 5
    for entry in result.entries:
        assert len(entry.sweep) == 4 and entry.lr_source == "sweep"
        assert [run.lr for run in entry.sweep] == OPTIMIZERS[entry.optimizer].lr_grid(4)
        best = min(entry.sweep, key=rank_key)
        assert entry.run.lr == best.lr
        np.testing.assert_allclose(entry.run.losses, best.losses, rtol=1e-12)
        assert entry.run.wall_time > 0
    standings = result.standings(result.problems[0])
    assert [rank_key(e.run) for e in standings] == sorted(rank_key(e.run) for e in standings)


def test_given_learning_rates_skip_the_sweep():
    result = race([Beale()], [OPTIMIZERS["sgd"], OPTIMIZERS["adam"]], steps=10, sweep_points=3, lrs={"adam": 0.05})
    by_name = {entry.optimizer: entry for entry in result.entries}
    assert by_name["adam"].lr_source == "given" and by_name["adam"].sweep == []
    assert by_name["adam"].run.lr == 0.05
    assert len(by_name["sgd"].sweep) == 3
    with pytest.raises(ValueError, match="not racing: lion"):
        race([Beale()], [OPTIMIZERS["sgd"]], steps=10, lrs={"lion": 0.1})
    with pytest.raises(ValueError, match="^lr of sgd must be > 0"):
        race([Beale()], [OPTIMIZERS["sgd"]], steps=10, lrs={"sgd": 0.0})
    with pytest.raises(ValueError, match="^steps must"):
        race([Beale()], [OPTIMIZERS["sgd"]], steps=0)


def test_report_table_and_json():
    result = race([Beale()], [OPTIMIZERS["sgd"], OPTIMIZERS["adam"]], steps=30, sweep_points=3, lrs={"sgd": 100.0})
    table = format_table(result, result.problems[0])
    lines = table.splitlines()
    assert lines[0].startswith("beale: f* = 0 at (3, 0.5), start (1, 1), 30 steps, tol 1e-06")
    assert lines[1].split()[:3] == ["#", "optimizer", "lr"]
    assert lines[3].split()[:2] == ["1", "adam"]
    assert "100 (given)" in lines[4] and "diverged at step" in lines[4]
    assert len({line.index("  ") for line in lines[1:5]}) == 1  # the rank column is aligned

    document = json.loads(json.dumps(to_json(result), allow_nan=False))
    assert document["settings"] == {"steps": 30, "tol": 1e-6, "sweep_points": 3}
    assert {"torch", "python", "platform"} <= set(document["machine"])
    assert document["problems"][0]["minimiser"] == [3.0, 0.5]
    adam, sgd = document["results"]
    assert (adam["optimizer"], adam["rank"], adam["lr_source"], len(adam["sweep"])) == ("adam", 1, "sweep", 3)
    assert sgd["diverged"] and sgd["final_loss"] is None and sgd["distance"] is None and sgd["sweep"] == []


def test_edge_of_range_is_reported():
    spec = OPTIMIZERS["sgd"]
    result = race([Quadratic()], [spec], steps=30, sweep_points=2)  # grid: 3e-4 and 3.16 (diverges)
    entry = result.entries[0]
    assert entry.lr_on_edge and entry.run.lr == spec.lr_grid(2)[0]
    assert "note: sgd's best lr" in format_table(result, result.problems[0])


def test_contour_plot_needs_a_2d_problem(tmp_path):
    result = race([Rosenbrock(dim=3)], [OPTIMIZERS["adam"]], steps=5, lrs={"adam": 0.01})
    with pytest.raises(ValueError, match="2-D problem"):
        plot_contours(result, result.problems[0], tmp_path / "x.png")
