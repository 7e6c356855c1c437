"""Issue 12, items 9-13: bad input is one line on stderr, exit 2, and nothing written.

Each case of the issue is a test here, run in-process through ``gradwise.cli.main`` (a
subprocess where the case is about processes: the OOM, torchrun). "Nothing written" is
checked by listing the working folder before and after.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gradwise.cli import main
from gradwise.cli.launch import lost_peer

QUICK_TRAIN = ["train", "--workload", "mlp", "--steps", "2", "--no-progress", "--threads", "1",
               "--workload-options", "dim=4,hidden=8,train_examples=64,val_examples=16"]


def files_under(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*")}


def invoke(argv: list[str], capsys) -> tuple[int, str, str]:
    """``gradwise argv`` in-process: exit code, stdout, stderr (argparse's SystemExit is a code too)."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def refused(argv: list[str], capsys, folder: Path, message: str) -> str:
    """Run ``argv`` in ``folder``; assert exit 2, one line on stderr containing ``message``, nothing written."""
    before = files_under(folder)
    code, _, err = invoke(argv, capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert message in err, err
    assert files_under(folder) == before, sorted(files_under(folder) - before)
    return err


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("a file, not a folder")
    return tmp_path


# --- item 9: what is read from --config is bounded -------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("config, message", [
    ("/dev/zero", "'/dev/zero' is not a regular file"),
    (".", "'.' is a folder, not a file"),
    ("missing.toml", "'missing.toml' does not exist"),
])
def test_config_that_is_not_a_regular_file_is_refused_without_reading(config, message, workdir, capsys):
    refused([*QUICK_TRAIN, "--config", config, "--out", "run"], capsys, workdir, message)


@pytest.mark.timeout(30)
def test_config_fifo_is_refused_without_blocking(workdir, capsys):
    os.mkfifo(workdir / "pipe.toml")  # open() of a FIFO blocks until a writer comes: never reached
    refused([*QUICK_TRAIN, "--config", "pipe.toml", "--out", "run"], capsys, workdir, "not a regular file")


def test_config_larger_than_the_cap_and_deeply_nested_config_are_refused(workdir, capsys):
    (workdir / "big.toml").write_text("# padding\n" * 200_000)  # 2 MB of comments
    refused([*QUICK_TRAIN, "--config", "big.toml", "--out", "run"], capsys, workdir, "larger than the 1 MiB")
    (workdir / "deep.toml").write_text("workload_options = {a = " + "[" * 5000 + "]" * 5000 + "}\n")
    err = refused([*QUICK_TRAIN, "--config", "deep.toml", "--out", "run"], capsys, workdir, "config file")
    assert "deep.toml" in err
    (workdir / "binary.toml").write_bytes(b"\xff\xfe\x00garbage")
    refused([*QUICK_TRAIN, "--config", "binary.toml", "--out", "run"], capsys, workdir, "is not UTF-8 text")


# --- item 10: the listed tracebacks -----------------------------------------------------------


@pytest.mark.parametrize("command", [QUICK_TRAIN, ["schedule"], ["race", "--steps", "5"],
                                     ["plan", "stability"], ["distributed", "admm", "--nproc", "2"]])
@pytest.mark.parametrize("out, message", [
    ("afile", "'afile' exists and is not a folder"),
    ("afile/sub", "'afile/sub' is under 'afile', which is not a folder"),
    ("/dev/null", "'/dev/null' exists and is not a folder"),
    ("/proc/x", "cannot create '/proc/x'"),
])
def test_out_that_cannot_be_a_folder_is_refused_when_parsed(command, out, message, workdir, capsys):
    refused([*command, "--out", out], capsys, workdir, message)


def test_clip_value_beyond_float32_is_refused(workdir, capsys):
    refused([*QUICK_TRAIN, "--clip-value", "1e300", "--out", "run"], capsys, workdir,
            "clip_value must be in (0, 3.40282e+38], got 1e+300")


def test_out_of_memory_is_one_line_and_leaves_no_run_folder(tmp_path):
    """The issue's case: ``--batch-size 100000000`` on mlp asks torch for 51 GB at the first step."""
    command = [sys.executable, "-m", "gradwise", "train", "--workload", "mlp", "--steps", "2", "--no-progress",
               "--batch-size", "100000000", "--out", "run"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "gradwise train: error: out of memory: tried to allocate 51.2 GB; "
        "ask for less (a smaller batch, model or problem)"
    ]
    assert not (tmp_path / "run").exists()


def test_out_of_memory_while_building_the_model_is_one_line(workdir, capsys):
    refused([*QUICK_TRAIN[:-1], "dim=4,hidden=100000000000", "--out", "run"], capsys, workdir, "out of memory")


# --- item 11: --data validated once, at load ---------------------------------------------------


def _rows(count: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(count, 3)), rng.integers(0, 3, count)


def _data_case(folder: Path, case: str) -> list[str]:
    """Write the files of ``case``; return the --data value's parts."""
    inputs, labels = _rows()
    if case == "nan":
        inputs[7, 1] = np.nan
    elif case == "inf":
        inputs[9, 0] = -np.inf
    elif case == "label 1e7":
        labels[4] = 10**7
    elif case == "label 1e9":
        labels[4] = 10**9
    elif case == "negative label":
        labels[5] = -1
    elif case == "complex":
        inputs = inputs + 1j
    elif case == "beyond float32":
        inputs[2, 2] = 1e300
    elif case == "empty":
        inputs, labels = inputs[:0], labels[:0]
    elif case == "one row":
        inputs, labels = inputs[:1], labels[:1]
    elif case == "float labels":
        labels = labels.astype(np.float64)
    if case == "npz":
        np.savez(folder / "X.npz", X=inputs)
        np.save(folder / "y.npy", labels)
        return ["X.npz", "y.npy"]
    np.save(folder / "X.npy", inputs)
    np.save(folder / "y.npy", labels)
    return ["X.npy", "y.npy"]


@pytest.mark.parametrize("case, message", [
    ("nan", "'X.npy' row 7: nan is not a finite number"),
    ("inf", "'X.npy' row 9: -inf is not a finite number"),
    ("beyond float32", "'X.npy' row 2: 1e+300 is beyond float32's range"),
    ("label 1e7", "'y.npy' row 4: label 10000000 is not a class index 0..9999 (gradwise classifies at most 10000"),
    ("label 1e9", "'y.npy' row 4: label 1000000000 is not a class index"),
    ("negative label", "'y.npy' row 5: label -1 is negative"),
    ("complex", "'X.npy': inputs are complex (complex128)"),
    ("empty", "'X.npy': inputs are empty (shape (0, 3))"),
    ("one row", "'X.npy' has 1 row: at least 3 are needed"),
    ("npz", "'X.npz' is an .npz archive"),
    ("float labels", "'y.npy': labels must be a vector of integers"),
])
def test_bad_npy_data_is_refused_at_load_naming_file_and_row(case, message, workdir, capsys):
    data = ",".join(_data_case(workdir, case))
    refused(["train", "--workload", "npy", "--data", data, "--steps", "2", "--no-progress", "--out", "run"],
            capsys, workdir, message)


def test_good_npy_data_still_trains(workdir, capsys):
    data = ",".join(_data_case(workdir, "good"))
    code, out, err = invoke(["train", "--workload", "npy", "--data", data, "--steps", "2", "--no-progress",
                             "--threads", "1", "--out", "run"], capsys)
    assert code == 0, err
    assert "(3 classes)" in out


@pytest.mark.parametrize("content, message", [(b"", "data file 'corpus.txt' is empty"),
                                              (b"abc", "'corpus.txt' has 3 bytes")])
def test_empty_or_short_text_file_is_refused(content, message, workdir, capsys):
    (workdir / "corpus.txt").write_bytes(content)
    refused(["train", "--workload", "text", "--data", "corpus.txt", "--steps", "2", "--out", "run"],
            capsys, workdir, message)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("path, message", [("/dev/zero", "is not a regular file"), (".", "is a folder")])
def test_data_that_is_not_a_regular_file_is_refused(path, message, workdir, capsys):
    refused(["train", "--workload", "text", "--data", path, "--steps", "2", "--out", "run"], capsys, workdir, message)


# --- item 12: every option validated, used or not ---------------------------------------------


@pytest.mark.parametrize("options, message", [
    ("weight_decay=inf", "weight_decay is its own setting (--weight-decay)"),
    ("eps=inf", "eps must be >= 0, got inf"),
    ("betas=0.9", "betas must be a tuple of 2 numbers"),
    ("bogus=1", "adamw option must be one of"),
])
def test_optimizer_options_are_checked_by_the_optimizer_before_anything_runs(options, message, workdir, capsys):
    refused([*QUICK_TRAIN, "--optimizer", "adamw", "--optimizer-options", options, "--out", "run"],
            capsys, workdir, message)


def test_sgd_option_out_of_range_is_refused(workdir, capsys):
    refused([*QUICK_TRAIN, "--optimizer", "sgd", "--optimizer-options", "momentum=-1", "--out", "run"],
            capsys, workdir, "momentum must be >= 0, got -1")


def test_accepted_optimizer_option_is_used_and_recorded(workdir, capsys):
    code, _, err = invoke([*QUICK_TRAIN, "--optimizer", "sgd", "--optimizer-options", "momentum=0.5", "--out", "run"],
                          capsys)
    assert code == 0, err
    assert json.loads((workdir / "run" / "config.json").read_text())["optimizer_options"] == {"momentum": 0.5}


@pytest.mark.parametrize("csv_text, arguments, message", [
    ("from,to,latency,bandwidth\n", [], "topology: net.csv has no links"),
    ("from,to,latency,bandwidth\na,b,1,1\nc,d,1,1\n", ["--source", "a", "--sinks", "d"],
     "sink 'd' cannot be reached from source 'a'"),
    ("from,to,latency,bandwidth\na,b,1,1\n", ["--source", "a", "--sinks", "zz"], "--sinks: 'zz' is not a node"),
    ("from,to,latency\na,b,1\n", ["--sinks", "zz"], "--sinks: 'zz' is not a node"),
    ("from,to,latency\na,b,1\n", ["--source", "q"], "--source: 'q' is not a node"),
])
def test_plan_network_refuses_what_answers_nothing(csv_text, arguments, message, workdir, capsys):
    (workdir / "net.csv").write_text(csv_text)
    refused(["plan", "network", "net.csv", *arguments], capsys, workdir, message)


def test_plan_network_json_source_and_sinks_must_be_ends_of_links(workdir, capsys):
    topology = {"links": [{"from": "s", "to": "w", "bandwidth": 1.0}], "source": "s", "sinks": ["ghost"]}
    (workdir / "net.json").write_text(json.dumps(topology))
    refused(["plan", "network", "net.json"], capsys, workdir, "topology.sinks: 'ghost' is not the end of any link")


@pytest.mark.parametrize("option, value", [("--layers", "-1"), ("--heads", "0"), ("--vocab", "0"),
                                           ("--micro-batch", "0"), ("--width", "0"), ("--seq-len", "0")])
def test_plan_memory_checks_options_that_the_estimate_does_not_use(option, value, workdir, capsys):
    refused(["plan", "memory", "--params", "1e9", option, value, "--no-plot"], capsys, workdir,
            f"{option[2:]} must be an integer >= 1, got {value}")


@pytest.mark.parametrize("arguments, message", [
    (["--speedup", "bogus=2"], "--speedup format must be one of"),
    (["--speedup", "fp8=0"], "--speedup of fp8 must be > 0"),
    (["--step-factor", "fp16=2"], "--step-factor format must be one of"),
    (["--precisions", "fp32", "--speedup", "fp8=-1"], "--speedup of fp8 must be > 0"),
    (["--steps", "0"], "steps must be >= 1"),
    (["--bandwidth", "0"], "bandwidth must be > 0"),
])
def test_plan_step_checks_every_format_option(arguments, message, workdir, capsys):
    refused(["plan", "step", "--params", "1e9", *arguments, "--no-plot"], capsys, workdir, message)


@pytest.mark.parametrize("arguments, message", [
    (["--schedules", "constant", "--t-mult", "-5"], "T_mult must be an integer >= 1"),
    (["--schedules", "constant", "--decay-fraction", "7"], "decay_fraction must be in [0, 1]"),
    (["--schedules", "linear_warmup", "--floor", "2"], "floor must be in [0, 1]"),
])
def test_schedule_options_are_checked_even_for_schedules_not_shown(arguments, message, workdir, capsys):
    refused(["schedule", *arguments], capsys, workdir, message)


@pytest.mark.parametrize("arguments, message", [
    (["--problems", "beale", "--dim", "-3"], "dim must be an integer >= 2"),
    (["--problems", "rosenbrock", "--kappa", "0"], "kappa must be >= 1"),
    (["--problems", "beale", "--methods", "bogus"], "method must be one of"),
    (["--problems", "beale", "--epochs", "-1"], "epochs must be > 0"),
    (["--problems", "logistic", "--optimizers", "bogus"], "optimizer must be one of"),
    (["--problems", "logistic", "--sweep-points", "0"], "sweep-points must be an integer >= 1"),
])
def test_race_checks_the_options_of_the_race_it_does_not_run(arguments, message, workdir, capsys):
    refused(["race", *arguments], capsys, workdir, message)


@pytest.mark.parametrize("arguments, message", [
    (["--base-batch", "0"], "base-batch must be an integer >= 1"),
    (["--base-lr", "-1"], "base-lr must be > 0"),
])
def test_plan_batch_checks_its_linear_scaling_options(arguments, message, workdir, capsys):
    refused(["plan", "batch", *arguments], capsys, workdir, message)


@pytest.mark.parametrize("arguments, message", [
    (["--nproc", "1", "--max-restarts", "2"], "--max-restarts needs --nproc N with N > 1"),
    (["--max-restarts", "-1"], "max_restarts must be an integer >= 0"),
    (["--seed", str(2**70)], "seed must be an integer in [0, "),
    (["--threads", "100000"], "threads must be an integer in [1, "),
])
def test_train_launch_and_range_options(arguments, message, workdir, capsys):
    refused([*QUICK_TRAIN, *arguments, "--out", "run"], capsys, workdir, message)


# --- item 13: a killed worker: a few lines on stderr, the full reports in RUN/logs --------------


def test_lost_peer_is_one_line_and_keeps_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "2")
    try:
        raise RuntimeError("[third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:1: "
                           "Connection reset by peer. This is typically caused by a remote worker hanging")
    except RuntimeError as error:
        line = lost_peer(error, tmp_path)
    kept = tmp_path / "logs" / "rank-1-attempt-0.log"
    assert line == (f"rank 1 lost contact with the other processes (Connection reset by peer); torchrun restarts "
                    f"the job from the newest checkpoint (restart 1 of 2); traceback in {kept}")
    assert "Traceback (most recent call last)" in kept.read_text() and "pair.cc:537" in kept.read_text()
    assert lost_peer(RuntimeError("shape mismatch"), tmp_path) is None  # a bug stays a traceback
    monkeypatch.delenv("RANK")
    assert lost_peer(RuntimeError("Connection reset by peer"), tmp_path) is None  # not under torchrun


def _descendants(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if parent == pid:
                found += [int(entry.name), *_descendants(int(entry.name))]
    return found


@pytest.mark.timeout(300)
def test_killed_worker_without_restarts_is_a_few_lines_and_the_reports_are_kept(tmp_path):
    """zero2 on 2 processes, ``--max-restarts 0``, SIGKILL to rank 1: torchrun's 48-line report and the
    surviving rank's gloo traceback go to RUN/logs; stderr says what happened in at most three lines."""
    out = tmp_path / "run"
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    command = [sys.executable, "-m", "gradwise", "train", "--strategy", "zero2", "--workload", "mlp",
               "--workload-options", "dim=8,hidden=16,train_examples=256,val_examples=64", "--threads", "1",
               "--batch-size", "8", "--eval-every", "100000", "--no-progress", "--steps", "100000",
               "--checkpoint-every", "20", "--nproc", "2", "--max-restarts", "0", "--out", str(out)]
    with open(tmp_path / "stderr.txt", "w") as stderr:
        launcher = subprocess.Popen(command, env=environment, start_new_session=True, stdout=subprocess.DEVNULL,
                                    stderr=stderr)
    killed = None
    try:
        deadline = time.monotonic() + 240
        while killed is None and launcher.poll() is None and time.monotonic() < deadline:
            if any((out / "checkpoints").rglob("step-*")) if (out / "checkpoints").exists() else False:
                for pid in _descendants(launcher.pid):
                    try:
                        if b"RANK=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                            os.kill(pid, signal.SIGKILL)
                            killed = pid
                            break
                    except OSError:
                        continue
            time.sleep(0.05)
        launcher.wait(timeout=max(5.0, deadline - time.monotonic()))
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    lines = (tmp_path / "stderr.txt").read_text().strip().splitlines()
    assert killed is not None and launcher.returncode == 1, lines
    assert "Traceback" not in "\n".join(lines) and 1 <= len(lines) <= 3, lines
    assert f"rank 1 (pid {killed}) was killed by SIGKILL; the job stopped with --max-restarts 0" in lines[-2]
    report = out / "logs" / "torchrun-failure.log"
    assert lines[-1] == f"gradwise: torchrun's report in {report}"
    assert "Root Cause" in report.read_text() and "SIGKILL" in report.read_text()
    survivor = [line for line in lines if line.startswith("gradwise train: error: rank 0 lost contact")]
    if survivor:  # rank 0 may be stopped by torchrun before its collective fails: then it says nothing
        assert "no restarts left" in survivor[0]
        assert "Traceback" in (out / "logs" / "rank-0-attempt-0.log").read_text()


@pytest.mark.parametrize("abort_first", [True, False])
def test_a_worker_that_explained_itself_sets_the_exit_code_whatever_died_first(monkeypatch, tmp_path, capsys,
                                                                                  abort_first):
    """Rank 0 refuses a setting (exit 2, its one line already printed) and rank 1's gloo aborts
    (SIGABRT) because its peer left mid-collective: the job exits 2 and says nothing more, whether
    torchrun saw the abort first or not (it did in a CI run, which then exited 1 with two extra lines)."""
    import torch.distributed.run as torch_run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from gradwise.cli.launch import run_under_torchrun

    refused = ProcessFailure(local_rank=0, pid=101, exitcode=2, error_file=str(tmp_path / "none-0"))
    aborted = ProcessFailure(local_rank=1, pid=102, exitcode=-6, error_file=str(tmp_path / "none-1"))
    refused.timestamp, aborted.timestamp = (20, 10) if abort_first else (10, 20)

    def run(arguments):
        raise ChildFailedError("gradwise", {0: refused, 1: aborted})

    monkeypatch.setattr(torch_run, "run", run)
    assert run_under_torchrun(2, ["train", "--nproc", "2"], folder=tmp_path) == 2
    assert capsys.readouterr().err == ""
