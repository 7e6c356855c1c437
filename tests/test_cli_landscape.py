"""``gradwise landscape`` end to end on tiny ``gradwise train`` runs: the JSON, the PNGs, the parameters it
reads (the final weights, the initial ones rebuilt from the seed), and hostile input refused in one line."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradwise.checkpoints.atomic import read_checkpoint
from gradwise.cli import main

TINY = [
    "--workload",
    "mlp",
    "--workload-options",
    "hidden=16,train_examples=512,val_examples=256",
    "--steps",
    "30",
    "--eval-every",
    "10",
    "--checkpoint-every",
    "10",
    "--threads",
    "1",
    "--no-progress",
]
FAST = ["--points", "3", "--grid", "3", "--lanczos-steps", "4", "--probes", "3", "--threads", "1", "--no-progress"]


def exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs of the tiny mlp (seeds 0 and 1; the first keeps its step-0 checkpoint) and a logreg run."""
    folder = tmp_path_factory.mktemp("landscape")
    assert main(["train", *TINY, "--keep-checkpoints", "10", "--out", str(folder / "a")]) == 0
    assert main(["train", *TINY, "--seed", "1", "--out", str(folder / "b")]) == 0
    assert (
        main(
            [
                "train",
                "--workload",
                "logreg",
                "--workload-options",
                "dim=4,classes=3",
                "--steps",
                "10",
                "--threads",
                "1",
                "--no-progress",
                "--out",
                str(folder / "logreg"),
            ]
        )
        == 0
    )
    return folder


def landscape_json(argv: list[str], capsys) -> tuple[dict, str]:
    assert main(["landscape", *FAST, *argv, "--json"]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


def test_all_four_analyses_print_their_cost_first_and_write_json_and_pngs(runs, capsys, tmp_path):
    report, err = landscape_json([str(runs / "a"), "--out", str(tmp_path)], capsys)
    assert set(report) >= {
        "workload",
        "workload_options",
        "final",
        "initial",
        "parameters",
        "sample",
        "line",
        "plane",
        "sharpness",
        "layers",
        "files",
    }
    # the costs, stated before each analysis ran (stderr under --json), are what each report records
    costs = [line for line in err.splitlines() if "; cost " in line]
    assert [line.split(":")[0] for line in costs] == ["line", "plane", "sharpness", "layers"]
    assert "cost 6 forward passes" in costs[0] and "cost 9 forward passes" in costs[1]
    assert report["line"]["cost"] == {"forward": 6, "forward_backward": 0, "hessian_vector": 0}
    sizes = [row["size"] for row in report["layers"]["rows"]]
    assert sizes == [8 * 16, 16, 16 * 16, 16, 16 * 4, 4]
    # 484 parameters: the dense Hessian (484 products) beside 4 Lanczos steps, the residual check and 3 probes
    assert report["sharpness"]["cost"] == {"forward": 0, "forward_backward": 1, "hessian_vector": 4 + 1 + 3 + 484}
    assert report["sharpness"]["exact"]["top_eigenvalue"] >= report["sharpness"]["top_eigenvalue"] - 1e-4
    assert report["parameters"] == sum(sizes) == report["sharpness"]["dimension"]
    assert report["layers"]["cost"]["hessian_vector"] == sum(2 * (min(4, size) + 1) for size in sizes)
    assert len(report["line"]["alphas"]) == len(report["line"]["train_loss"]) == len(report["line"]["val_loss"]) == 3
    assert len(report["plane"]["train_loss"]) == 3 and all(len(row) == 3 for row in report["plane"]["train_loss"])
    for row in report["layers"]["rows"]:
        assert set(row) == {
            "name",
            "size",
            "lambda_max",
            "lambda_max_error",
            "lambda_min",
            "lambda_min_error",
            "condition",
        }
    names = ["line.png", "plane_contour.png", "plane_surface.png", "layers.png"]
    assert report["files"] == [str(tmp_path / name) for name in [*names, "landscape.json"]]
    for name in names:
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
    assert json.loads((tmp_path / "landscape.json").read_text()) == report


def test_the_line_ends_at_the_runs_parameters(runs, capsys, tmp_path):
    report, _ = landscape_json([str(runs / "a"), "--line", "--alpha-range", "0", "1", "--out", str(tmp_path)], capsys)
    line = report["line"]
    summary = json.loads((runs / "a" / "summary.json").read_text())
    # alpha = 1 is model.pt: its validation loss is the one the run reported (mlp evaluates the whole split)
    assert line["val_loss"][-1] == pytest.approx(summary["final_metrics"]["val_loss"], rel=1e-5)
    assert report["initial"].startswith("checkpoint ") and report["initial"].endswith("step-00000000.ckpt")
    assert line["train_loss"][0] > line["train_loss"][-1]  # training lowered the loss on the sample
    plane_report, _ = landscape_json([str(runs / "a"), "--plane", "--no-plot"], capsys)
    assert plane_report["plane"]["train_loss"][1][1] == pytest.approx(line["train_loss"][-1], rel=1e-6)


def test_the_initial_parameters_rebuilt_from_the_seed_are_those_training_started_from(runs):
    from gradwise.cli.landscape import Source, initial_parameters, read_model_file, read_run_config
    from gradwise.problems.workloads import make_workload

    config = read_run_config(runs / "a")
    model = make_workload(config.workload, 5, config.seed, config.data, **config.workload_options).model
    source = Source(config, read_model_file(runs / "a" / "model.pt"), "model.pt", None)  # no folder: rebuild
    rebuilt, said = initial_parameters(source, model)
    assert said.startswith("rebuilt from seed 0")
    started = read_checkpoint(runs / "a" / "checkpoints" / "step-00000000.ckpt")["model"]
    assert len(rebuilt) == len(started)
    for value, (name, saved) in zip(rebuilt, started.items()):
        assert torch.equal(value, saved), name


def test_a_run_without_its_step_0_checkpoint_gets_the_rebuilt_initial_point(runs, capsys):
    assert not (runs / "b" / "checkpoints" / "step-00000000.ckpt").exists()  # keep=3 dropped it
    report, _ = landscape_json([str(runs / "b"), "--line", "--no-plot"], capsys)
    assert report["initial"].startswith("rebuilt from seed 1")


def test_the_line_between_two_runs_ends_at_each_runs_final_parameters(runs, capsys):
    report, err = landscape_json(
        [str(runs / "a"), "--line", "--other", str(runs / "b"), "--alpha-range", "0", "1", "--no-plot"], capsys
    )
    assert f"final -> {runs / 'b'} final" in err
    for alpha_index, run in ((0, "a"), (-1, "b")):
        summary = json.loads((runs / run / "summary.json").read_text())
        assert report["line"]["val_loss"][alpha_index] == pytest.approx(summary["final_metrics"]["val_loss"], rel=1e-5)


def test_a_small_problem_gets_the_exact_dense_values_beside_the_estimates(runs, capsys):
    report, err = landscape_json(
        [str(runs / "logreg"), "--sharpness", "--lanczos-steps", "30", "--probes", "50", "--no-plot"], capsys
    )
    found = report["sharpness"]
    assert found["dimension"] == 4 * 3 + 3 and "the dense Hessian" in err
    assert found["cost"]["hessian_vector"] == 15 + 1 + 50 + 15
    assert found["top_eigenvalue"] == pytest.approx(found["exact"]["top_eigenvalue"], rel=1e-5)
    assert abs(found["trace"] - found["exact"]["trace"]) <= 4 * found["trace_standard_error"]


def test_a_checkpoint_named_with_its_workload_is_read_with_the_settings_it_was_written_under(runs, capsys):
    checkpoint = runs / "a" / "checkpoints" / "step-00000030.ckpt"
    report, _ = landscape_json(["--workload", "mlp", "--checkpoint", str(checkpoint), "--sharpness"], capsys)
    assert report["workload_options"]["hidden"] == 16 and report["final"] == str(checkpoint)
    from_run, _ = landscape_json([str(runs / "a"), "--sharpness", "--no-plot"], capsys)
    assert report["sharpness"]["top_eigenvalue"] == pytest.approx(from_run["sharpness"]["top_eigenvalue"], rel=1e-5)


def test_the_text_output_has_the_tables(runs, capsys):
    assert main(["landscape", str(runs / "a"), *FAST, "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert out.index("line: initial -> final") < out.index("alpha   train_loss")
    assert "0.weight" in out and "lambda_max" in out and "sharpness: top eigenvalue" in out
    assert f"wrote {runs / 'a' / 'landscape' / 'landscape.json'}" in out


def corrupt(path):
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


class Hostile:
    def __reduce__(self):
        return (shutil.rmtree, ("/nonexistent-landscape-test",))


@pytest.mark.parametrize(
    "prepare, argv, message",
    [
        (None, ["{tmp}/missing"], "RUN_DIR '{tmp}/missing' does not exist"),
        ("empty", ["{tmp}/empty"], "is not a gradwise run folder (it has no config.json)"),
        ("file", ["{tmp}/file"], "is not a folder"),
        ("bad-config", ["{tmp}/copy"], "is unreadable"),
        ("unknown-setting", ["{tmp}/copy"], "unknown setting 'bogus'"),
        ("no-model", ["{tmp}/copy"], "holds no model.pt (the run did not finish)"),
        ("hostile-model", ["{tmp}/copy"], "was refused by the safe loader"),
        ("wrong-shapes", ["{tmp}/copy"],
         "does not fit the model its settings build: it has other shapes: 0.weight saved (3, 3), model (16, "),
        ("unknown-key", ["{tmp}/copy"], "does not fit the model its settings build: it has unknown extra.weight"),
        ("nan-model", ["{tmp}/copy"], "holds non-finite values in"),
        (
            "corrupt-checkpoint",
            ["{tmp}/copy", "--checkpoint", "{tmp}/copy/checkpoints/step-00000030.ckpt"],
            "checksum mismatch",
        ),
        (None, ["--workload", "mlp", "--checkpoint", "{tmp}/none.ckpt"], "checkpoint '{tmp}/none.ckpt' does not exist"),
        (
            None,
            ["--workload", "logreg", "--checkpoint", "{a}/checkpoints/step-00000030.ckpt"],
            "was written by a 'mlp' run, not 'logreg'",
        ),
        (None, ["{a}", "--grid", "1"], "grid must be an integer in [2, 201], got 1"),
        (None, ["{a}", "--grid", "1000"], "grid must be an integer in [2, 201], got 1000"),
        (None, ["{a}", "--span", "-1"], "span must be > 0, got -1.0"),
        (None, ["{a}", "--points", "1"], "points must be an integer in [2, 1001], got 1"),
        (None, ["{a}", "--alpha-range", "1", "0"], "high must be > 1, got 0.0"),
        (None, ["{a}", "--alpha-range", "0", "nan"], "high must be > 0, got nan"),
        (None, ["{a}", "--samples", "0"], "samples must be an integer >= 1, got 0"),
        (None, ["{a}", "--samples", "513"], "samples must be an integer in [1, 512] (the run's training examples)"),
        (None, ["{a}", "--probes", "1"], "probes must be an integer >= 2, got 1"),
        (None, ["{a}", "--lanczos-steps", "0"], "lanczos_steps must be an integer >= 1, got 0"),
        (None, ["{a}", "--one-dim", "keep"], "one_dim must be one of 'zero', 'filter', got 'keep'"),
        (None, ["{a}", "--threads", "100000"], "threads must be an integer in"),
        (None, ["{a}", "--grid", "many"], "invalid int value: 'many'"),
        (None, [], "give a RUN_DIR, or --workload NAME --checkpoint FILE"),
        (None, ["{a}", "--workload", "mlp"], "--workload goes with --checkpoint and no RUN_DIR"),
        (None, ["--workload", "mlp"], "--workload needs --checkpoint FILE"),
        (None, ["{a}", "--plane", "--other", "{b}"], "--other applies to --line"),
        (None, ["{a}", "--line", "--other", "{logreg}"], "trained 'logreg' with options"),
        (None, ["{a}", "--out", "{a}/summary.json"], "exists and is not a folder"),
    ],
)
def test_hostile_input_is_one_line_exit_2_and_writes_nothing(runs, tmp_path, capsys, prepare, argv, message):
    copy = tmp_path / "copy"
    if prepare == "empty":
        (tmp_path / "empty").mkdir()
    elif prepare == "file":
        (tmp_path / "file").write_text("not a run")
    elif prepare is not None:
        shutil.copytree(runs / "a", copy, ignore=shutil.ignore_patterns("landscape"))
        state = torch.load(copy / "model.pt", weights_only=True)
        if prepare == "bad-config":
            (copy / "config.json").write_text("{not json")
        elif prepare == "unknown-setting":
            (copy / "config.json").write_text(
                json.dumps({**json.loads((copy / "config.json").read_text()), "bogus": 1})
            )
        elif prepare == "no-model":
            (copy / "model.pt").unlink()
        elif prepare == "hostile-model":
            (copy / "model.pt").write_bytes(pickle.dumps(Hostile()))
        elif prepare == "wrong-shapes":
            torch.save({**state, "0.weight": torch.zeros(3, 3)}, copy / "model.pt")
        elif prepare == "unknown-key":
            torch.save({**state, "extra.weight": torch.zeros(2)}, copy / "model.pt")
        elif prepare == "nan-model":
            torch.save({**state, "0.bias": torch.full((16,), float("nan"))}, copy / "model.pt")
        elif prepare == "corrupt-checkpoint":
            corrupt(copy / "checkpoints" / "step-00000030.ckpt")
    names = {"tmp": tmp_path, "a": runs / "a", "b": runs / "b", "logreg": runs / "logreg"}
    before = sorted(path for path in runs.rglob("*"))
    code = exit_code(["landscape", *FAST, *(item.format(**names) for item in argv)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert message.format(**names) in err and len(err.splitlines()) == 1, err
    assert sorted(path for path in runs.rglob("*")) == before
    assert not (copy / "landscape").exists()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    option=st.sampled_from(
        [
            "--grid",
            "--span",
            "--points",
            "--samples",
            "--probes",
            "--lanczos-steps",
            "--seed",
            "--one-dim",
            "--threads",
            "--alpha-range",
        ]
    ),
    value=st.sampled_from(["", "0", "-1", "1", "2.5", "nan", "inf", "-inf", "1e300", "abc", "x" * 200]),
)
def test_any_bad_value_of_any_option_is_one_line_and_exit_2_before_any_work(runs, option, value):
    from contextlib import redirect_stderr, redirect_stdout
    from io import StringIO

    values = [value, "1"] if option == "--alpha-range" else [value]
    stdout, stderr = StringIO(), StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        code = exit_code(["landscape", str(runs / "logreg"), "--sharpness", *FAST, option, *values, "--no-plot"])
    err = stderr.getvalue().strip()
    assert code in (0, 2) and "Traceback" not in err
    if code == 2:
        assert len(err.splitlines()) == 1 and "cost" not in stdout.getvalue()
    else:  # a value that is valid (seed 0, 1, 2.5 for a span, ...) runs
        assert "sharpness: top eigenvalue" in stdout.getvalue()
