"""Tests for ``gradwise race``: exit codes, output, files written, bad arguments."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gradwise.cli import main

FAST = ["--steps", "20", "--sweep-points", "2"]


def invoke(argv, capsys):
    """Run ``gradwise ARGV`` in-process; return (exit code, stdout, stderr)."""
    try:
        code = main(argv)
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_race_prints_tables_and_writes_plots_and_json(tmp_path, capsys):
    out = tmp_path / "results"
    argv = ["race", "--optimizers", "sgd,adam", "--problems", "beale,quadratic", *FAST, "--out", str(out), "--json"]
    code, stdout, stderr = invoke(argv, capsys)
    assert code == 0, stderr
    assert stderr == ""
    assert "beale: f* = 0" in stdout and "quadratic-2d-kappa100: f* = 0" in stdout
    for header in ("optimizer", "final loss", "distance", "steps to tol", "wall time (s)"):
        assert header in stdout
    assert sorted(path.name for path in out.iterdir()) == [
        "beale-contour.png",
        "beale-loss.png",
        "quadratic-2d-kappa100-contour.png",
        "quadratic-2d-kappa100-loss.png",
        "race.json",
    ]
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote 5 files to {out}/" in stdout

    document = json.loads((out / "race.json").read_text())
    assert set(document) == {"settings", "machine", "problems", "results"}
    assert document["settings"]["steps"] == 20
    assert len(document["results"]) == 4
    row = document["results"][0]
    assert set(row) == {
        "problem", "rank", "optimizer", "lr", "lr_source", "final_loss", "distance",
        "steps_to_tol", "wall_time_s", "diverged", "steps_run", "sweep",
    }  # fmt: skip
    assert {r["problem"] for r in document["results"]} == {"beale", "quadratic-2d-kappa100"}
    assert all(len(r["sweep"]) == 2 for r in document["results"])


def test_options_reach_the_problems_and_given_lrs_skip_the_sweep(tmp_path, capsys):
    out = tmp_path / "r"
    argv = [
        "race", "--optimizers", "adam,lion", "--problems", "rosenbrock,quadratic", "--dim", "3",
        "--kappa", "1000", "--seed", "4", "--lr", "adam=0.05", "--tol", "1e-3", *FAST,
        "--out", str(out), "--json",
    ]  # fmt: skip
    code, stdout, stderr = invoke(argv, capsys)
    assert code == 0, stderr
    assert "rosenbrock-3d: f* = 0 at (1, 1, 1), start (-1.2, 1, -1.2)" in stdout
    assert "quadratic-3d-kappa1000" in stdout and "tol 0.001" in stdout
    # 3-D problems have loss curves but no contour plot
    pngs = sorted(path.name for path in out.glob("*.png"))
    assert pngs == ["quadratic-3d-kappa1000-loss.png", "rosenbrock-3d-loss.png"]
    rows = json.loads((out / "race.json").read_text())["results"]
    adam = [row for row in rows if row["optimizer"] == "adam"]
    assert all(row["lr"] == 0.05 and row["lr_source"] == "given" and row["sweep"] == [] for row in adam)


def test_no_plots_and_no_json_writes_nothing(tmp_path, capsys):
    out = tmp_path / "nothing"
    argv = ["race", "--optimizers", "sgd", "--problems", "beale", *FAST, "--out", str(out), "--no-plots"]
    code, stdout, _ = invoke(argv, capsys)
    assert code == 0
    assert "sgd" in stdout and "wrote" not in stdout
    assert not out.exists()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--optimizers", "adadelta"], "optimizer must be one of"),
        (["--optimizers", "adam,adam"], "--optimizers lists adam more than once"),
        (["--optimizers", ","], "--optimizers needs at least one name"),
        (["--problems", "himmelblau"], "problem must be one of"),
        (["--steps", "0"], "steps must be an integer >= 1, got 0"),
        (["--steps", "ten"], "argument --steps: invalid int value"),
        (["--sweep-points", "0"], "sweep-points must be an integer >= 1"),
        (["--tol", "-1"], "tol must be >= 0"),
        (["--lr", "adam"], "--lr expects NAME=VALUE pairs"),
        (["--lr", "adam=fast"], "--lr: 'fast' is not a number"),
        (["--lr", "nadam=0.1"], "--lr sets 'nadam', which is not in --optimizers"),
        (["--lr", "adam=-0.1"], "lr of adam must be > 0"),
        (["--lr", "adam=nan"], "lr of adam must be > 0"),
        (["--dim", "1"], "dim must be an integer >= 2, got 1"),
        (["--kappa", "0.5"], "kappa must be >= 1"),
        (["--seed", "-3"], "seed must be an integer in [0, "),
        (["--colour"], "unrecognized arguments: --colour"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(arguments, message, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, stderr = invoke(["race", *arguments, "--out", str(out)], capsys)
    assert code == 2
    assert stdout == ""
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert message in stderr
    assert not out.exists()


def test_out_must_not_be_a_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("")
    code, _, stderr = invoke(["race", "--out", str(target)], capsys)
    assert code == 2 and "is not a folder" in stderr and len(stderr.splitlines()) == 1


def test_help(capsys):
    code, stdout, _ = invoke(["race", "--help"], capsys)
    assert code == 0
    assert stdout.startswith("usage: gradwise race")
    for option in ("--optimizers", "--problems", "--steps", "--lr", "--sweep-points", "--tol", "--out", "--json"):
        assert option in stdout
    assert "lion      3.16e-05 .. 0.316" in stdout  # the optimizers and their lr ranges are listed
    code, stdout, _ = invoke(["--help"], capsys)
    assert code == 0 and "race" in stdout


def test_console_entry_point_reports_bad_input():
    completed = subprocess.run(
        [sys.executable, "-m", "gradwise", "race", "--steps", "-5"], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 2
    assert completed.stderr.strip() == "gradwise race: error: steps must be an integer >= 1, got -5"
