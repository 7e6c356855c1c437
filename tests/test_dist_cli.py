"""``gradwise distributed``: the parameter server through ``--nproc`` (torchrun), FedAvg directly
under torchrun, and bad input refused in one line with exit code 2 before any process starts."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gradwise.cli import main
from gradwise.distributed.algorithms.federated_logistic import FederatedLogistic

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]

RUN_TIMEOUT_S = 180  # importing torch in every process is slow on a busy 2-core machine
UPDATES, ROUNDS = 40, 25
LOGREG_PARAMETERS = 32 * 4 + 4  # nn.Linear(32, 4), float32


def gradwise_command(*argv: str, torchrun: int | None = None) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(torchrun)] if torchrun else []
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run([sys.executable, *launcher, "-m", "gradwise", "distributed", *argv], env=environment,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)


def test_parameter_server_through_nproc_records_every_update_and_learns(tmp_path: Path):
    """Round-robin with 2 workers: each worker pulls right after its own push and pushes again
    after the other's, so the staleness is 0 for the first update and exactly 1 after."""
    out = tmp_path / "ps"
    done = gradwise_command("parameter-server", "--nproc", "3", "--workload", "logreg", "--updates", str(UPDATES),
                            "--order", "round-robin", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["parameters"] == LOGREG_PARAMETERS
    assert summary["staleness"] == [0] + [1] * (UPDATES - 1)
    assert summary["worker_of_update"] == [1 + k % 2 for k in range(UPDATES)]
    assert len(summary["loss_of_update"]) == UPDATES
    assert summary["dropped"] == 0 and summary["discarded"] == 1
    pushes = UPDATES + summary["discarded"]
    assert summary["bytes_received"] == pushes * (8 + 4 * (1 + LOGREG_PARAMETERS))
    assert summary["bytes_sent"] == (2 + pushes) * (16 + 4 * LOGREG_PARAMETERS)
    assert summary["end"]["val_loss"] < 0.8 * summary["start"]["val_loss"]
    assert (out / "staleness.png").stat().st_size > 0
    assert done.stdout.count("parameter server: 2 workers") == 1  # rank 0 alone reports
    assert f"staleness: mean {(UPDATES - 1) / UPDATES:.2f}, max 1" in done.stdout


def test_fedavg_directly_under_torchrun_is_gradient_descent_with_full_participation(tmp_path: Path):
    """All clients, one local step on their whole data: each round is one gradient step on F
    (McMahan et al. 2017), so the objective after every round equals a single-process replay."""
    out = tmp_path / "fedavg"
    done = gradwise_command("fedavg", "--rounds", str(ROUNDS), "--fraction", "1", "--local-steps", "1", "--lr", "1.0",
                            "--lr-decay-rounds", "10", "--examples-per-client", "50", "--features", "4",
                            "--out", str(out), torchrun=2)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    problem = FederatedLogistic(num_clients=2, examples_per_client=50, num_features=4, label_skew=0.5, l2=5e-2)
    w = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    objective = [float(problem.loss(w.detach()))]
    for t in range(ROUNDS):
        (gradient,) = torch.autograd.grad(problem.loss(w), w)
        with torch.no_grad():
            w -= 1.0 / (1 + t / 10) * gradient
        objective.append(float(problem.loss(w.detach())))
    assert summary["objective"] == pytest.approx(objective, rel=1e-12)
    assert summary["bytes_per_client"] == 4 * 8 + ROUNDS * (4 + 1) * 8  # w_0 broadcast, then [n w, n] per round
    gaps = summary["gap"]
    assert all(later < earlier for earlier, later in itertools.pairwise(gaps)) and 0 < gaps[-1] < 0.01 * gaps[0]
    assert (out / "fedavg.png").stat().st_size > 0


@pytest.mark.parametrize(("argv", "message"), [
    (["parameter-server", "--nproc", "1"], "nproc must be an integer >= 2, got 1"),
    (["split", "--nproc", "3"], r"nproc must be an integer in \[2, 2\], got 3"),
    (["parameter-server", "--nproc", "3", "--updates", "0"], "updates must be an integer >= 1, got 0"),
    (["parameter-server", "--nproc", "3", "--max-staleness", "-1"], "max_staleness must be an integer >= 0, got -1"),
    (["parameter-server", "--nproc", "3", "--lr", "-0.1"], "lr must be > 0, got -0.1"),
    (["fedavg", "--nproc", "2", "--fraction", "0"], r"fraction must be in \(0, 1\], got 0.0"),
    (["fedavg", "--nproc", "2", "--batch-size", "500"], r"batch_size must be an integer in \[1, 200\], got 500"),
    (["admm", "--nproc", "2", "--rho", "0"], "rho must be > 0, got 0.0"),
    (["split", "--nproc", "2", "--cut", "5"], r"cut must be an integer in \[1, 4\], got 5"),
    (["admm"], "admm runs on several processes: give --nproc N, or launch with torchrun"),
])
def test_bad_input_is_one_line_and_exit_code_2(argv, message, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert main(["distributed", *argv]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("gradwise distributed: error: ")
    assert re.search(message, error)


@pytest.mark.parametrize(("environment", "argv", "message"), [
    ({"RANK": "0", "WORLD_SIZE": "1"}, ["parameter-server"], "world_size must be an integer >= 2, got 1"),
    ({"RANK": "0", "WORLD_SIZE": "3"}, ["split"], r"world_size must be an integer in \[2, 2\], got 3"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, ["fedavg"], "no rendezvous endpoint: MASTER_ADDR, MASTER_PORT not set"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, ["fedavg", "--nproc", "2"], "under torchrun leave it out"),
])
def test_bad_launch_under_torchrun_is_refused_before_joining(environment, argv, message, capsys, monkeypatch):
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert main(["distributed", *argv]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_unknown_workload_or_method_is_an_argparse_error(capsys):
    for argv in (["parameter-server", "--workload", "tiny-gpt"], ["gossip"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["distributed", *argv])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("under_torchrun", [True, False])
def test_a_torchrun_rank_leaves_without_the_interpreters_teardown_and_loses_no_output(under_torchrun):
    """``python -m gradwise`` as a torchrun rank that succeeded exits by ``os._exit`` after flushing (gloo's
    objects destroyed in the teardown abort a finished rank now and then): no atexit handler runs and the
    whole output arrives; a refused input exits 2 as before; outside torchrun the interpreter ends as usual."""
    run_gradwise = ("import atexit, runpy, sys; atexit.register(print, 'teardown ran'); "
                    "sys.argv = ['gradwise', *sys.argv[1:]]; runpy.run_module('gradwise', run_name='__main__')")
    environment = {key: value for key, value in os.environ.items() if key != "TORCHELASTIC_RUN_ID"}
    if under_torchrun:
        environment["TORCHELASTIC_RUN_ID"] = "test"
    done = subprocess.run([sys.executable, "-c", run_gradwise, "plan", "memory", "--params", "1e9", "--json",
                           "--no-plot"], env=environment, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    payload, _, rest = done.stdout.partition("\n}\n")
    assert json.loads(payload + "\n}")["params"] == 1e9
    assert ("teardown ran" in rest) != under_torchrun
    refused = subprocess.run([sys.executable, "-c", run_gradwise, "plan", "memory", "--devices", "0", "--params",
                              "1e9"], env=environment, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert refused.returncode == 2 and "devices" in refused.stderr
