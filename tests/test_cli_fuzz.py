"""Property: any argument list given to any ``gradwise`` subcommand ends within a time bound with
exit code 0, 1 or 2, never a traceback, a usage error as exactly one line, and writes nothing
outside its ``--out`` folder.

Argument lists are drawn by hypothesis from each subcommand's own options with values from a
pool of hostile strings (empty, NaN, infinities, 1e300, negative, words, ``K=V`` lists, device
files, a file where a folder is expected) and a few good ones. A base of cheap settings comes
first and the drawn options after it (argparse keeps the last), so a valid draw finishes in
a second: values that are valid but ask for long work (a billion steps) are not drawn. Each
example runs in-process (``gradwise.cli.main``) in a fresh folder holding the files the pool
names; a few run as real subprocesses. "Nothing outside --out" is checked over that folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradwise.cli import main

TIME_BOUND_S = 30.0
HOSTILE = ["", " ", "0", "-1", "1", "2", "3.5", "-5", "nan", "inf", "-inf", "1e300", "1e-300", "abc", "é",
           "a=1", "a=b,c", "=", ",", "fp8=2", "x" * 300, "/dev/null", "/dev/zero", ".", "afile", "afile/sub",
           "missing.csv", "True"]
FLAGS = {"--json", "--no-plot", "--no-plots", "--no-progress", "--resume", "--checkpointing", "--no-overlap",
         "--no-simulation", "--staleness-aware", "--compare-unsplit", "--full-size", "-h"}

TRAIN_BASE = ["--workload", "mlp", "--steps", "2", "--no-progress", "--threads", "1", "--eval-every", "1",
              "--workload-options", "dim=4,hidden=8,train_examples=64,val_examples=16", "--out", "run"]
COMMANDS = {
    "race": (["race"], ["--problems", "beale", "--optimizers", "sgd", "--steps", "3", "--sweep-points", "1",
                        "--no-plots", "--epochs", "0.01"],
             {"--optimizers": ["adam", "bogus"], "--problems": ["rosenbrock", "quadratic"], "--dim": [],
              "--kappa": [], "--seed": [], "--steps": [], "--lr": ["sgd=0.1"], "--sweep-points": [], "--tol": [],
              "--out": ["out"], "--json": [], "--no-plots": [], "--epochs": [], "--batch-size": [],
              "--methods": ["sgd"], "-h": []}),
    "schedule": (["schedule"], ["--total", "20"],
                 {"--schedules": ["wsd", "cosine,constant"], "--total": [], "--warmup": [], "--peak": [],
                  "--floor": ["0.5"], "--decay-fraction": ["0.5"], "--tail": ["1-sqrt"], "--t0": [], "--t-mult": [],
                  "--at": ["0,1", "5"], "--out": ["out"], "--json": []}),
    "plan memory": (["plan", "memory"], ["--params", "1e6", "--no-plot"],
                    {"--params": [], "--optimizer": ["sgd", "adafactor"], "--precision": ["fp32", "fp8"],
                     "--zero": [], "--devices": [], "--layers": [], "--width": ["64"], "--heads": [],
                     "--vocab": [], "--seq-len": ["16"], "--micro-batch": [], "--checkpointing": [],
                     "--out": ["out"], "--no-plot": [], "--json": []}),
    "plan step": (["plan", "step"], ["--params", "1e6", "--devices", "4", "--no-plot"],
                  {"--params": [], "--devices": [], "--bandwidth": [], "--latency": [], "--tokens": [],
                   "--throughput": [], "--speedup": ["fp32=0.5"], "--precisions": ["bf16", "fp32,fp8"],
                   "--steps": [], "--step-factor": ["fp8=1.1"], "--zero": [], "--bucket-mb": [],
                   "--no-overlap": [], "--out": ["out"], "--no-plot": [], "--json": []}),
    "plan batch": (["plan", "batch"], ["--examples", "16", "--samples", "5"],
                   {"--workload": ["logreg"], "--eps": [], "--delta": ["0.5"], "--examples": [], "--samples": [],
                    "--base-lr": [], "--base-batch": [], "--seed": [], "--json": []}),
    "plan stability": (["plan", "stability"], ["--no-plot", "--no-simulation"],
                       {"--tau": [], "--max-tau": [], "--curvature": [], "--kappa": [], "--no-simulation": [],
                        "--out": ["out"], "--no-plot": [], "--json": []}),
    "plan network": (["plan", "network"], ["net.csv"],
                     {"--source": ["a"], "--sinks": ["b", "d"], "--json": []}),
    "plan failures": (["plan", "failures"], ["jobs.csv"], {"--alpha": ["0.5"], "--json": []}),
    "train": (["train"], TRAIN_BASE,
              {"--config": ["good.toml", "bad.toml"], "--workload": ["logreg", "npy", "text", "bogus"],
               "--data": ["X.npy,y.npy", "Xnan.npy,y.npy", "X.npz,y.npy", "corpus.txt"],
               "--workload-options": ["hidden=4"], "--optimizer": ["sgd", "lion", "bogus"],
               "--optimizer-options": ["momentum=0.5", "weight_decay=inf", "eps=-1"], "--lr": [],
               "--weight-decay": [], "--schedule": ["wsd", "constant"], "--warmup": [], "--lr-floor": [],
               "--steps": [], "--batch-size": [], "--accumulate": [], "--clip": ["none"], "--clip-value": ["none"],
               "--precision": ["fp32", "bf16"], "--device": ["cuda", "auto"], "--threads": [], "--seed": [],
               "--eval-every": [], "--checkpoint-every": [], "--keep-checkpoints": [], "--spike-factor": [],
               "--spike-window": [], "--max-consecutive-skips": [], "--rollback-lr-factor": [],
               "--max-rollbacks": [], "--nproc": [], "--strategy": ["single", "ddp"],
               "--strategy-options": ["compression=fp16"], "--max-restarts": [], "--out": ["run2"],
               "--resume": [], "--allow-change": ["steps"]}),
}
for _method, _options in {
    "parameter-server": ["--workload", "--updates", "--optimizer", "--lr", "--batch-size", "--max-staleness",
                         "--staleness-aware", "--order"],
    "fedavg": ["--rounds", "--lr", "--lr-decay-rounds", "--fraction", "--local-steps", "--batch-size",
               "--examples-per-client", "--features", "--label-skew", "--l2"],
    "admm": ["--rho", "--max-iterations", "--local-solver", "--local-iterations", "--abs-tol", "--rel-tol",
             "--features", "--l2"],
    "split": ["--steps", "--batch-size", "--optimizer", "--lr", "--cut", "--compare-unsplit"],
}.items():
    COMMANDS[f"distributed {_method}"] = (["distributed", _method], [],
                                          {name: [] for name in [*_options, "--nproc", "--seed", "--out"]})
NPROC_VALUES = ["0", "-1", "1", "x", ""]  # 2 or more would start torchrun: the subprocess tests do that
DEFAULT_OUT = {"race": "race-results", "schedule": "schedule-results", "plan": "plan-results", "train": "runs",
               "distributed": "runs"}


def write_fixtures(folder: Path) -> None:
    """The files the pools name, in ``folder``."""
    (folder / "afile").write_text("a file where a folder is expected")
    rng = np.random.default_rng(0)
    inputs, labels = rng.normal(size=(30, 3)), rng.integers(0, 3, 30)
    np.save(folder / "X.npy", inputs)
    np.save(folder / "y.npy", labels)
    inputs[3, 1] = np.nan
    np.save(folder / "Xnan.npy", inputs)
    np.savez(folder / "X.npz", X=inputs)
    (folder / "corpus.txt").write_text("")
    (folder / "good.toml").write_text('workload = "mlp"\nsteps = 2\n')
    (folder / "bad.toml").write_text("steps = [[[\n")
    (folder / "net.csv").write_text("from,to,latency,bandwidth\na,b,1,5\nb,c,2,3\nc,d,1,\n")
    (folder / "jobs.csv").write_text("hardware,outcome\n" + "a100,ok\n" * 8 + "h100,oom\n" * 8 + "a100,oom\nh100,ok\n")


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(path.relative_to(folder)): (path.stat().st_mtime_ns, path.stat().st_size)
            for path in folder.rglob("*") if path.is_file()}


def allowed_out(argv: list[str]) -> str:
    """The folder ``argv`` may write: its last ``--out``, else the subcommand's default."""
    values = [argv[index + 1] for index, item in enumerate(argv[:-1]) if item == "--out"]
    return values[-1] if values else DEFAULT_OUT[argv[0]]


def inside(relative: str, out: str) -> bool:
    out_path = os.path.normpath(out)
    return out_path == "." or relative == out_path or relative.startswith(out_path.rstrip("/") + "/")


@st.composite
def argument_lists(draw, name: str) -> list[str]:
    command, base, options = COMMANDS[name]
    argv = [*command, *base]
    for option in draw(st.lists(st.sampled_from(sorted(options)), max_size=4)):
        if option in FLAGS:
            argv.append(option)
            continue
        # the good values weigh as much as the hostile ones together: valid runs are explored as well
        pool = NPROC_VALUES if option == "--nproc" else HOSTILE + options[option] * (len(HOSTILE) // 2)
        argv += [option, draw(st.sampled_from(pool))]
    if draw(st.integers(0, 9)) == 0:  # now and then a stray word or an unknown option
        argv.append(draw(st.sampled_from(["extra", "--bogus", "--", "-x"])))
    return argv


def run_in_fresh_folder(argv: list[str]) -> tuple[int, str, float, set[str], set[str]]:
    """Exit code, stderr, seconds, and the files created or changed inside and outside the allowed --out."""
    previous = os.getcwd()
    with tempfile.TemporaryDirectory() as directory:
        folder = Path(directory)
        write_fixtures(folder)
        before = snapshot(folder)
        os.chdir(folder)
        stdout, stderr = StringIO(), StringIO()
        started = time.monotonic()
        try:
            with redirect_stdout(stdout), redirect_stderr(stderr):
                try:
                    code = main(list(argv))
                except SystemExit as exit_:
                    code = exit_.code
        finally:
            os.chdir(previous)
        elapsed = time.monotonic() - started
        after = snapshot(folder)
        changed = {path for path, stamp in after.items() if before.get(path) != stamp}
        out = allowed_out(argv)
        return code, stderr.getvalue(), elapsed, {p for p in changed if not inside(p, out)}, changed


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_any_argument_list_ends_in_time_with_0_1_or_2_and_writes_only_under_out(name):
    examples = 80 if name == "train" else 30

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(argument_lists(name))
    def property_holds(argv):
        code, err, elapsed, outside, _ = run_in_fresh_folder(argv)
        assert code in (0, 1, 2), (argv, code, err[-2000:])
        assert "Traceback" not in err, (argv, err[-2000:])
        if code == 2:
            assert len(err.strip().splitlines()) == 1, (argv, err[-2000:])
        assert elapsed < TIME_BOUND_S, (argv, elapsed)
        assert not outside, (argv, sorted(outside))

    property_holds()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("argv, message", [
    (["train", "--config", "/dev/zero"], "is not a regular file"),
    (["distributed", "admm", "--nproc", "2", "--out", "afile"], "exists and is not a folder"),
    (["plan", "network", "net.csv", "--source", "a", "--sinks", "zz"], "'zz' is not a node"),
])
def test_hostile_commands_in_a_real_process_are_one_line_and_exit_2(argv, message, tmp_path):
    write_fixtures(tmp_path)
    before = snapshot(tmp_path)
    result = subprocess.run([sys.executable, "-m", "gradwise", *argv], cwd=tmp_path, capture_output=True, text=True,
                            timeout=100)
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr[-2000:]
    assert snapshot(tmp_path) == before
