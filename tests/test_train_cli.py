"""``gradwise train``: outputs, TOML configs, resume checks, and bad input (exit 2, nothing overwritten)."""

from __future__ import annotations

import csv
import json

import pytest

from gradwise.cli import main

FAST = ["--workload", "mlp", "--steps", "12", "--eval-every", "5", "--checkpoint-every", "4", "--threads", "1",
        "--no-progress"]


def exit_code(argv: list[str]) -> int:
    """``main``'s return value, or the code of the ``SystemExit`` that argparse raises."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def snapshot(folder):
    return {path.relative_to(folder): (path.stat().st_mtime_ns, path.read_bytes())
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *FAST, "--out", str(out)]) == 0
    return out


def test_a_run_writes_metrics_csv_jsonl_plot_summary_and_checkpoints(finished_run, capsys):
    records = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 13))
    assert [r["step"] for r in records if r["kind"] == "eval"] == [5, 10, 12]
    with (finished_run / "metrics.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == len(records) and float(rows[0]["loss"]) == records[0]["loss"]
    assert set(rows[0]) >= {"loss", "lr", "grad_norm", "examples_per_s", "val_accuracy"}
    assert (finished_run / "training.png").read_bytes().startswith(b"\x89PNG")
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["steps"] == 12 and 0 <= summary["final_metrics"]["val_accuracy"] <= 1
    assert sorted(path.name for path in (finished_run / "checkpoints").iterdir()) == [
        "step-00000004.ckpt", "step-00000008.ckpt", "step-00000012.ckpt"]


@pytest.mark.parametrize("arguments, message", [
    (["--optimizer", "adamz"], "optimizer must be one of"),
    (["--workload", "gpt5"], "workload must be one of"),
    (["--steps", "-5"], "steps must be an integer >= 1, got -5"),
    (["--batch-size", "0"], "batch_size must be an integer >= 1, got 0"),
    (["--accumulate", "0"], "accumulate must be an integer >= 1, got 0"),
    (["--workload", "text", "--data", "missing.txt"], "data file 'missing.txt' does not exist"),
    (["--precision", "fp16"], "needs a CUDA device"),
    (["--lr", "-1"], "lr must be > 0"),
    (["--steps", "many"], "invalid int value"),
])
def test_bad_configuration_is_one_line_exit_2_and_writes_nothing(tmp_path, finished_run, capsys, arguments, message):
    fresh = tmp_path / "fresh"
    assert exit_code(["train", *FAST, *arguments, "--out", str(fresh)]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1
    assert not fresh.exists()
    before = snapshot(finished_run)
    for extra in ([], ["--resume"]):
        assert exit_code(["train", *FAST, *arguments, "--out", str(finished_run), *extra]) == 2
    assert snapshot(finished_run) == before


def test_an_existing_run_is_not_overwritten_and_resume_refuses_other_settings(finished_run, capsys):
    before = snapshot(finished_run)
    assert main(["train", *FAST, "--out", str(finished_run)]) == 2
    assert "already holds files; pass --resume" in capsys.readouterr().err
    assert main(["train", *FAST, "--lr", "0.5", "--out", str(finished_run), "--resume"]) == 2
    assert "resume with its own settings" in capsys.readouterr().err
    assert snapshot(finished_run) == before


def test_a_finished_run_resumed_does_no_more_steps(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *FAST, "--out", str(out)]) == 0
    records = (out / "metrics.jsonl").read_text().splitlines()
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert "resumed from the checkpoint of step 12" in capsys.readouterr().out
    again = (out / "metrics.jsonl").read_text().splitlines()
    assert again == records  # the train records kept, the final evaluation redone once, to the same values


def test_settings_come_from_a_toml_file_and_options_override_it(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(
        'workload = "logreg"\noptimizer = "momentum"\nlr = 0.05\nsteps = 10\nbatch_size = 32\n'
        'schedule = "wsd"\nclip = 2.0\n[workload_options]\ndim = 8\n[optimizer_options]\nmomentum = 0.8\n'
    )
    out = tmp_path / "run"
    argv = ["train", "--config", str(config), "--steps", "6", "--threads", "1", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    saved = json.loads((out / "config.json").read_text())
    assert (saved["workload"], saved["optimizer"], saved["lr"], saved["steps"], saved["batch_size"]) == (
        "logreg", "momentum", 0.05, 6, 32)
    assert saved["workload_options"] == {"dim": 8} and saved["optimizer_options"] == {"momentum": 0.8}
    assert saved["schedule"] == "wsd" and saved["clip"] == 2.0
    bad = tmp_path / "bad.toml"
    bad.write_text("stepz = 3\n")
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "bad")]) == 2
    assert "unknown setting 'stepz'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
