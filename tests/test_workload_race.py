"""The workload race: its search design, budget, statistics, the command line, hostile input and a
resume after SIGKILL that ends with the results of an uninterrupted race."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gradwise.bench.workload_race import (
    LR_SPAN_DECADES,
    WEIGHT_DECAY_HIGH,
    RaceRuns,
    RaceSettings,
    StepCost,
    Timing,
    Trial,
    TrialResult,
    best_trial,
    centre_lr,
    fit_to_budget,
    halton,
    search_point,
)
from gradwise.bench.workload_report import bootstrap_ratio, format_race_table, steps_to, summarize, targets

RACE = [sys.executable, "-m", "gradwise", "race"]
SMALL = ["--workload", "mlp", "--optimizers", "adamw,lion", "--steps", "12", "--trials", "2", "--seeds", "2",
         "--no-plots"]


def settings(**changes) -> RaceSettings:
    values = dict(workload="mlp", optimizers=["adamw", "lion"], trials=3, seeds=3, steps=20)
    return RaceSettings(**{**values, **changes})


def test_halton_is_van_der_corput():
    assert [halton(i, 2) for i in range(1, 6)] == [0.5, 0.25, 0.75, 0.125, 0.625]
    assert [halton(i, 3) for i in range(1, 5)] == pytest.approx([1 / 3, 2 / 3, 1 / 9, 4 / 9])


def test_search_points_span_each_optimizers_own_range():
    race = settings()
    for name in ("adamw", "lion", "muon"):
        centre = centre_lr(race, name)
        points = [search_point(race, name, index) for index in range(1, 17)]
        assert points[0].lr == pytest.approx(centre, rel=1e-3)  # point 1: the centre
        for point in points:
            assert centre * 10 ** (-LR_SPAN_DECADES / 2) <= point.lr <= centre * 10 ** (LR_SPAN_DECADES / 2) * 1.001
            assert 0 <= point.weight_decay < WEIGHT_DECAY_HIGH
        assert len({point.lr for point in points}) == 16  # no point repeats
    # Muon's lr is its own, far above AdamW's (the preset's lr_scale)
    assert centre_lr(race, "muon") > 5 * centre_lr(race, "adamw") > 5 * centre_lr(race, "lion")


def test_a_fixed_weight_decay_is_used_by_every_trial():
    race = settings(weight_decay=0.05)
    assert {search_point(race, "adamw", index).weight_decay for index in range(1, 6)} == {0.05}


def timing(seconds: dict[str, float]) -> Timing:
    return Timing({name: StepCost(value, 64, 100, [value]) for name, value in seconds.items()}, 1.0, 0.1, 1.0)


def test_the_budget_takes_seeds_then_trials_and_refuses_what_cannot_fit():
    race = settings(trials=4, seeds=3)
    clock = timing({"adamw": 0.1, "lion": 0.1})
    run = clock.run_seconds(race, "adamw")
    assert run == pytest.approx(1.0 + 20 * 0.1 + 20 * 0.1 + 1.0)
    assert clock.race_seconds(race) == pytest.approx(2 * 6 * run)
    fitted = fit_to_budget(race, clock, 2 * 5 * run / 60)  # room for 5 runs each: one seed less
    assert (fitted.trials, fitted.seeds) == (4, 2)
    fitted = fit_to_budget(race, clock, 2 * 3.5 * run / 60)
    assert (fitted.trials, fitted.seeds) == (2, 2)
    fitted = fit_to_budget(race, clock, 2 * 1.5 * run / 60)
    assert (fitted.trials, fitted.seeds) == (1, 1)
    with pytest.raises(ValueError, match="budget_minutes: one run of each optimizer takes about"):
        fit_to_budget(race, clock, 0.5 * run / 60)


def result(optimizer: str, seed: int, curve: list[tuple[int, float]], index: int = 1) -> TrialResult:
    return TrialResult(Trial(optimizer, index, seed, 1e-3, 0.0), curve[-1][1] if curve else None, curve)


def test_steps_to_a_target_and_the_best_trial():
    run = result("adamw", 0, [(5, 2.0), (10, 1.5), (15, 1.2), (20, 1.1)])
    assert steps_to(run, 1.5) == 10 and steps_to(run, 1.15) == 20 and steps_to(run, 1.0) == math.inf
    diverged = TrialResult(Trial("adamw", 3, 0, 1.0, 0.0), None, [(5, 2.0)], "diverged")
    assert best_trial([diverged, run, result("adamw", 0, [(20, 1.3)], index=2)]) is run
    assert best_trial([diverged]) is None


def test_bootstrap_interval_of_a_ratio():
    low, high = bootstrap_ratio([10.0, 10.0, 10.0], [5.0, 5.0, 5.0])
    assert low == high == 2.0
    low, high = bootstrap_ratio([10.0, 12.0, 8.0], [5.0, 6.0, 4.0])
    assert 1.3 < low < 2.0 < high < 3.0
    low, high = bootstrap_ratio([10.0, 10.0], [math.inf, math.inf])  # never reached: infinitely slower
    assert low == high == 0.0


def test_summary_against_the_tuned_baseline():
    race = settings(trials=1, seeds=2)
    fast = [result("lion", 0, [(10, 1.4), (20, 1.0)]), result("lion", 1, [(10, 1.45), (20, 1.1)])]
    slow = [result("adamw", 0, [(10, 1.6), (20, 1.2)]), result("adamw", 1, [(10, 1.5), (20, 1.4)])]
    runs = RaceRuns(tuning={"adamw": slow[:1], "lion": fast[:1]}, best={"adamw": slow[0], "lion": fast[0]},
                    seeds={"adamw": slow, "lion": fast})
    clock = timing({"adamw": 0.1, "lion": 0.2})
    goals, summaries = summarize(race, runs, clock)
    assert goals == pytest.approx({"target": 1.3, "loose": 1.3 * 1.05})
    adamw, lion = summaries
    assert adamw.to_target["target"]["reached"] == 1 and adamw.to_target["target"]["steps"] == 20
    assert lion.to_target["target"]["steps"] == 20  # first at or below 1.3: step 20 on both seeds
    assert lion.to_target["loose"]["steps"] == 20 and adamw.to_target["loose"]["steps"] == 20
    # time = steps x seconds per step: Lion's steps cost twice as much
    assert lion.to_target["target"]["seconds"] == pytest.approx(4.0)
    assert lion.to_target["target"]["speedup"] == pytest.approx(2.0 / 4.0)
    assert lion.step_time_ratio == pytest.approx(2.0)
    assert lion.loss_p_value is not None and 0 < lion.loss_p_value < 1
    assert targets(RaceSettings(**{**race.to_dict(), "target": 1.25}), runs)["target"] == 1.25
    # one AdamW seed of two never reached 1.3: a resample of that seed alone makes Lion infinitely faster
    assert math.isinf(lion.to_target["target"]["speedup_interval"][1])
    table = format_race_table(race, goals, summaries)
    assert "[low, never]: in some bootstrap resamples no adamw seed reached" in table


def race(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(RACE + args, capture_output=True, text=True, timeout=600, **kwargs)


def test_race_on_a_workload_from_the_command_line(tmp_path):
    out = tmp_path / "race"
    done = race([*SMALL, "--out", str(out)])
    assert done.returncode == 0, done.stderr
    assert "race on mlp: 12 steps" in done.stdout and "faster than adamw" in done.stdout
    report = json.loads((out / "race.json").read_text())
    assert report["settings"]["trials"] == 2 and report["baseline"] == "adamw"
    for entry in report["optimizers"]:
        runs = report["runs"][entry["name"]]
        tuned = [run["final_loss"] for run in runs["tuning"]]
        assert len(tuned) == 2 and len(runs["seeds"]) == 2
        best = min(range(2), key=lambda i: tuned[i])
        assert entry["best"]["trial"] == best + 1  # the best tuning run is the one repeated
        assert runs["seeds"][0]["final_loss"] == tuned[best]
        assert {run["trial"]["seed"] for run in runs["seeds"]} == {0, 1}
        assert entry["state_bytes"] > 0 and entry["seconds_per_step"] > 0
    adamw_finals = [run["final_loss"] for run in report["runs"]["adamw"]["seeds"]]
    assert report["targets"]["target"] == pytest.approx(sum(adamw_finals) / 2)
    assert len(list((out / "runs").glob("*/trial*-seed*/trial.json"))) == 6
    # every run is a gradwise train run folder
    assert all((folder / "summary.json").exists() for folder in (out / "runs").glob("*/trial*"))
    assert not list(out.rglob("*.png"))  # --no-plots: not the race's, nor a run's training.png
    # a race grows on resume: one more seed runs one more run per optimizer, the others are read back
    before = {path: path.stat().st_mtime_ns for path in out.glob("runs/*/*/trial.json")}
    done = race([*SMALL, "--seeds", "3", "--out", str(out), "--resume"])
    assert done.returncode == 0, done.stderr
    grown = json.loads((out / "race.json").read_text())
    assert all(len(grown["runs"][name]["seeds"]) == 3 for name in ("adamw", "lion"))
    assert {path: path.stat().st_mtime_ns for path in out.glob("runs/*/*/trial.json") if path in before} == before
    assert len(list(out.glob("runs/*/*/trial.json"))) == 8


@pytest.mark.parametrize(("args", "message"), [
    (["--workload", "mlp", "--trials", "0"], "trials"),
    (["--workload", "mlp", "--optimizers", "adamw,nosuch"], "nosuch"),
    (["--workload", "mlp", "--optimizers", "adamw,adamw"], "more than once"),
    (["--workload", "nosuch"], "nosuch"),
    (["--workload", "mlp", "--dim", "3"], "--dim does not apply"),
    (["--workload", "mlp", "--sweep-points", "3"], "--sweep-points does not apply"),
    (["--trials", "3"], "--trials applies to a race with --workload"),
    (["--workload", "mlp", "--budget-minutes", "-1"], "budget-minutes"),
    (["--workload", "mlp", "--target", "nan"], "target"),
    (["--workload", "mlp", "--workload-options", "hidden=-3"], "hidden"),
])
def test_bad_race_options_are_one_line_and_exit_2(tmp_path, args, message):
    done = race([*args, "--out", str(tmp_path / "race")])
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "race").exists() or not any((tmp_path / "race").iterdir())


def test_a_race_folder_is_never_raced_over_nor_resumed_with_other_settings(tmp_path):
    out = tmp_path / "race"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    done = race([*SMALL, "--out", str(out)])
    assert done.returncode == 2 and "already holds files" in done.stderr
    assert race([*SMALL, "--out", str(tmp_path / "none"), "--resume"]).returncode == 2
    fresh = tmp_path / "fresh"
    (fresh / "runs").mkdir(parents=True)
    (fresh / "race-plan.json").write_text(json.dumps({"requested": {**settings().to_dict(), "steps": 99}}))
    done = race([*SMALL, "--out", str(fresh), "--resume"])
    assert done.returncode == 2 and "was run with" in done.stderr, done.stderr
    (fresh / "race-plan.json").write_text("{not json")
    done = race([*SMALL, "--out", str(fresh), "--resume"])
    assert done.returncode == 2 and "unreadable" in done.stderr, done.stderr


def test_an_impossible_budget_is_refused_after_timing(tmp_path):
    done = race([*SMALL, "--budget-minutes", "0.001", "--out", str(tmp_path / "race")])
    assert done.returncode == 2 and "one run of each optimizer takes about" in done.stderr, done.stderr


def final_losses(out: Path) -> dict:
    report = json.loads((out / "race.json").read_text())
    return {name: [(run["trial"], run["final_loss"], run["curve"]) for kind in ("tuning", "seeds")
                   for run in runs[kind]] for name, runs in report["runs"].items()}


def test_a_race_killed_at_a_random_moment_resumes_to_the_uninterrupted_results(tmp_path):
    whole = tmp_path / "whole"
    assert race([*SMALL, "--out", str(whole)]).returncode == 0
    killed = tmp_path / "killed"
    process = subprocess.Popen(RACE + [*SMALL, "--out", str(killed)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list(killed.glob("runs/*/*/checkpoints")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 3.0))  # somewhere inside the runs
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done = race([*SMALL, "--out", str(killed), "--resume"])
    assert done.returncode == 0, done.stderr
    assert final_losses(killed) == final_losses(whole)  # bit for bit: every run resumed exactly


def workload_arguments(name: str, folder: Path) -> list[str]:
    """The smallest settings of each workload: the race's mechanics, not its findings."""
    if name == "tiny-gpt":
        return ["--workload-options", "n_layer=1,d_model=32,n_head=2,seq_len=32,eval_windows=4,final_eval_windows=8",
                "--batch-size", "4"]
    if name == "text":
        text = folder / "corpus.txt"
        text.write_text(Path(json.__file__).read_text() * 4)  # text that ships with Python
        return ["--data", str(text), "--workload-options",
                "n_layer=1,d_model=32,n_head=2,seq_len=32,eval_windows=4,final_eval_windows=8", "--batch-size", "4"]
    if name == "npy":
        import numpy as np

        rng = np.random.default_rng(0)
        inputs = rng.standard_normal((256, 6)).astype(np.float32)
        np.save(folder / "X.npy", inputs)
        np.save(folder / "y.npy", (inputs[:, 0] > 0).astype(np.int64))
        return ["--data", f"{folder / 'X.npy'},{folder / 'y.npy'}", "--workload-options", "hidden=16"]
    return []


@pytest.mark.parametrize("workload", ["tiny-gpt", "mlp", "logreg", "text", "npy"])
def test_the_race_runs_on_every_workload(tmp_path, workload):
    out = tmp_path / "race"
    done = race(["--workload", workload, *workload_arguments(workload, tmp_path), "--optimizers", "adamw,muon",
                 "--steps", "4", "--trials", "1", "--seeds", "1", "--out", str(out)])
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "race.json").read_text())
    assert [entry["name"] for entry in report["optimizers"]] == ["adamw", "muon"]
    assert all(math.isfinite(run["final_loss"]) for runs in report["runs"].values() for run in runs["seeds"])
    assert (out / "loss-vs-step.png").stat().st_size > 0 and (out / "loss-vs-time.png").stat().st_size > 0
    assert len(list(out.glob("runs/*/*/training.png"))) == 2  # with plots, each run's own too
