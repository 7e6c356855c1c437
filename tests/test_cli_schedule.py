"""The ``gradwise schedule`` command: output, files written, and bad arguments."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gradwise.cli import main
from gradwise.schedules import SCHEDULES


def run_schedule(tmp_path, *arguments):
    return main(["schedule", "--out", str(tmp_path / "out"), *arguments])


def test_default_run_prints_a_row_per_schedule_and_writes_a_png(tmp_path, capsys):
    assert run_schedule(tmp_path) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["schedule", "lr@0", "lr@50", "lr@100", "lr@500", "lr@999", "area"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2 : 2 + len(SCHEDULES)]}
    assert list(rows) == list(SCHEDULES)
    assert rows["constant"] == ["3.000e-04"] * 5 + ["0.3"]
    assert rows["cosine"][:3] == ["3.000e-06", "1.530e-04", "3.000e-04"]  # (s + 1) / 100 of the peak
    assert len({len(line) for line in lines[:2]}) == 1  # header and rule line up
    png = tmp_path / "out" / "schedules.png"
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and png.stat().st_size > 10_000
    assert not (tmp_path / "out" / "schedules.json").exists()


def test_json_holds_the_printed_table(tmp_path, capsys):
    code = run_schedule(
        tmp_path, "--json", "--schedules", "cosine,wsd,cosine_with_restarts", "--total", "200", "--warmup", "20",
        "--peak", "0.1", "--floor", "0.1", "--decay-fraction", "0.25", "--tail", "1-sqrt", "--t0", "30",
        "--t-mult", "1", "--at", "110,0,150,199",
    )
    assert code == 0
    table = json.loads((tmp_path / "out" / "schedules.json").read_text())
    assert set(table) == {"total_steps", "warmup_steps", "peak", "options", "steps", "schedules"}
    assert (table["total_steps"], table["warmup_steps"], table["peak"]) == (200, 20, 0.1)
    assert table["options"] == {"floor": 0.1, "decay_fraction": 0.25, "tail": "1-sqrt", "T_0": 30, "T_mult": 1}
    assert table["steps"] == [0, 110, 150, 199]
    rows = {row["schedule"]: row for row in table["schedules"]}
    assert list(rows) == ["cosine", "wsd", "cosine_with_restarts"]
    assert rows["cosine"]["lr_at"]["0"] == pytest.approx(0.1 / 20)
    assert rows["cosine"]["lr_at"]["110"] == pytest.approx(0.1 * 0.55)  # midpoint: (1 + floor) / 2
    assert rows["wsd"]["lr_at"]["110"] == pytest.approx(0.1)  # plateau
    assert rows["wsd"]["lr_at"]["150"] == pytest.approx(0.1)  # the tail starts at 200 - 50 with progress 0
    assert rows["wsd"]["lr_at"]["199"] == pytest.approx(0.1 * (0.1 + 0.9 * (1 - (49 / 50) ** 0.5)))
    assert rows["cosine_with_restarts"]["lr_at"]["110"] == pytest.approx(0.1)  # restart at 20 + 3 * 30
    assert rows["cosine_with_restarts"]["area"] > rows["cosine"]["area"] > 0
    assert "wrote" in capsys.readouterr().out


def test_warmup_defaults_to_a_tenth_of_the_total(tmp_path, capsys):
    assert run_schedule(tmp_path, "--total", "300", "--json") == 0
    table = json.loads((tmp_path / "out" / "schedules.json").read_text())
    assert table["warmup_steps"] == 30
    assert table["steps"] == [0, 15, 30, 150, 299]
    assert table["options"]["T_0"] == 39  # three cycles, 39 * (1 + 2 + 4) >= 270 steps after warmup


def test_at_steps_outside_the_run_are_refused_before_writing(tmp_path, capsys):
    assert run_schedule(tmp_path, "--total", "100", "--at", "0,100") == 2
    assert "step 100 is outside the run" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_help_in_process(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["schedule", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in ["--schedules", "--total", "--warmup", "--peak", "--floor", "--decay-fraction", "--tail",
                   "--t0", "--t-mult", "--at", "--out", "--json"]:
        assert option in help_text


def test_help_from_the_command_line():
    result = subprocess.run(
        [sys.executable, "-m", "gradwise", "schedule", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "usage: gradwise schedule" in result.stdout


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--schedules", "cosine,cosin"], "schedule must be one of"),
        (["--schedules", ","], "give at least one schedule"),
        (["--warmup", "-5"], "warmup_steps must be an integer in [0, 1000], got -5"),
        (["--total", "100", "--warmup", "200"], "warmup_steps must be an integer in [0, 100], got 200"),
        (["--total", "0"], "total_steps must be an integer >= 1"),
        (["--peak=-1e-3"], "peak must be >= 0"),
        (["--floor", "1.5"], "floor must be in [0, 1]"),
        (["--decay-fraction", "0.95"], "decay_fraction must be in [0, 0.9]"),
        (["--t0", "0"], "T_0 must be an integer >= 1"),
        (["--at", "5,x"], "--at: 'x' is not an integer step"),
    ],
)
def test_bad_values_are_one_line_and_exit_code_2(tmp_path, capsys, arguments, message):
    assert run_schedule(tmp_path, *arguments) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("gradwise schedule: error: ")
    assert message in captured.err
    assert captured.out == ""
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "arguments",
    [["--total", "abc"], ["--peak", "fast"], ["--tail", "sqrt"], ["--t-mult", "1.5"], ["--no-such-option"]],
)
def test_unparseable_arguments_exit_2_with_one_line(tmp_path, capsys, arguments):
    with pytest.raises(SystemExit) as exit_info:
        run_schedule(tmp_path, *arguments)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert error.startswith("gradwise") and ": error: " in error


def test_out_that_is_a_file_is_a_usage_error(tmp_path, capsys):
    blocker = tmp_path / "out"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:  # refused by the --out type, when the options are parsed
        run_schedule(tmp_path)
    assert exit_info.value.code == 2
    assert "--out: " in (err := capsys.readouterr().err) and "exists and is not a folder" in err
