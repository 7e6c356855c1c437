"""``gradwise train --nproc N`` and ``torchrun -m gradwise train``: real jobs, and bad input refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gradwise.cli import main
from gradwise.train import TrainConfig, train

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[1]
MLP = ["--workload", "mlp", "--workload-options", "dim=8,hidden=16,train_examples=512,val_examples=128",
       "--lr", "0.01", "--threads", "1", "--eval-every", "1000", "--no-progress"]
PARAMETER_BYTES = 4 * 484
"""fp32 gradient of that mlp, sent once per step."""


def launch(*arguments: str) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run([sys.executable, *arguments], cwd=REPO, env=environment, capture_output=True, text=True,
                          timeout=240)


def train_records(folder: Path) -> list[dict]:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [record for record in records if record["kind"] == "train"]


def test_nproc_2_trains_with_ddp_like_one_process_with_twice_the_batch(tmp_path):
    """--nproc runs ``python -m torch.distributed.run ... -m gradwise train``: this is the torchrun path too."""
    out = tmp_path / "ddp"
    done = launch("-m", "gradwise", "train", "--nproc", "2", *MLP, "--steps", "20", "--batch-size", "8",
                  "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1 and "strategy ddp on 2 processes" in done.stdout  # rank 0 reports
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["strategy"] == "ddp"
    assert summary["bytes_communicated"] == 20 * PARAMETER_BYTES
    assert [record["step"] for record in train_records(out)] == list(range(1, 21))  # written once, by rank 0

    reference = tmp_path / "single"
    train(TrainConfig(workload="mlp", workload_options=dict(dim=8, hidden=16, train_examples=512, val_examples=128),
                      lr=0.01, threads=1, eval_every=1000, steps=20, batch_size=16), reference)
    ours = torch.load(out / "model.pt", weights_only=True)
    theirs = torch.load(reference / "model.pt", weights_only=True)
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-5, atol=1e-6)
    losses = [r["loss"] for r in train_records(out)]
    reference_losses = [r["loss"] for r in train_records(reference)]
    assert losses == pytest.approx(reference_losses, rel=1e-5)  # the logged loss is the global mean


@pytest.mark.parametrize("arguments, environment, message", [
    (["--strategy", "nope"], {}, "strategy must be one of"),
    (["--nproc", "0"], {}, "nproc must be an integer >= 1, got 0"),
    (["--nproc", "1", "--strategy", "ddp"], {}, "strategy 'ddp' needs at least 2 processes, got 1"),
    (["--nproc", "2", "--strategy", "single"], {}, "strategy 'single' runs at most 1 process(es), got 2"),
    (["--nproc", "2", "--strategy-options", "compression=zip"], {}, "compression must be one of"),
    (["--nproc", "3", "--strategy", "tp", "--strategy-options", "tp=2", "--workload", "tiny-gpt"], {},
     "world size 3 is not a multiple of the tensor-parallel degree tp=2"),
    (["--nproc", "2", "--strategy", "pp"], {}, "strategy 'pp' splits the model of workload 'tiny-gpt' or 'text', got "
                                                "workload 'mlp'"),
    (["--max-restarts", "2"], {}, "--max-restarts needs --nproc N"),
    ([], {"RANK": "0", "WORLD_SIZE": "2"}, "no rendezvous endpoint: MASTER_ADDR, MASTER_PORT not set"),
    (["--strategy", "ddp"], {}, "no rendezvous endpoint: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT not set"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, monkeypatch, arguments, environment, message):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    code = main(["train", *MLP, "--steps", "2", "--out", str(tmp_path / "run"), *arguments])
    error = capsys.readouterr().err
    assert code == 2
    assert error.count("\n") == 1 and message in error, error


def test_an_error_the_workers_find_is_one_line_not_torchruns_failure_report(tmp_path):
    """bf16 compression is only refused inside the job (it depends on the backend): rank 0 says so
    once, and the launcher returns the workers' exit code without torchrun's table and logs."""
    result = launch("-m", "gradwise", "train", *MLP, "--steps", "2", "--out", str(tmp_path / "run"),
                    "--nproc", "2", "--strategy-options", "compression=bf16")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "gradwise train: error: compression 'bf16' needs the nccl backend (CUDA); this job runs on gloo; "
        "use compression=fp16 or powersgd"], result.stderr
