"""Checkpoints: atomic, checksummed, corrupt ones skipped; kill -9 at random steps and resume bit for bit."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from gradwise.checkpoints.atomic import CheckpointManager, CorruptCheckpoint, decode, encode, rng_state, set_rng_state


def payload(step: int) -> dict:
    return {"step": step, "weights": torch.arange(1000, dtype=torch.float32) * step, "note": "x"}


def test_encode_decode_round_trip_and_corruption_is_detected():
    data = encode(payload(3))
    decoded = decode(data)
    assert decoded["step"] == 3 and torch.equal(decoded["weights"], payload(3)["weights"])
    with pytest.raises(CorruptCheckpoint, match="truncated"):
        decode(data[:-10])
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0x10
    with pytest.raises(CorruptCheckpoint, match="checksum mismatch"):
        decode(bytes(flipped))
    with pytest.raises(CorruptCheckpoint, match="bad header"):
        decode(b"not a checkpoint")


def test_manager_keeps_the_last_k_and_resumes_from_the_newest_that_verifies(tmp_path):
    manager = CheckpointManager(tmp_path / "ckpt", keep=3)
    for step in (10, 20, 30, 40):
        manager.save(step, payload(step))
    assert [step for step, _ in manager.checkpoints()] == [40, 30, 20]
    assert not list((tmp_path / "ckpt").glob(".*.tmp"))  # no temporary file left behind
    newest = manager.path(40)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated
    middle = manager.path(30)
    data = bytearray(middle.read_bytes())
    data[-5] ^= 0x01  # one bit flipped
    middle.write_bytes(bytes(data))
    state, path, skipped = manager.load_newest()
    assert state["step"] == 20 and path == manager.path(20)
    assert [(item.path, item.reason.split(":")[0].split(" (")[0]) for item in skipped] == [
        (manager.path(40), "truncated"), (manager.path(30), "checksum mismatch")
    ]


def test_rng_state_round_trip_restores_every_generator():
    state = rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(decode(encode({"rng": state}))["rng"])
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == second[0] and first[1] == second[1] and torch.equal(first[2], second[2])


STEPS = 40
TRAIN = [
    sys.executable, "-m", "gradwise", "train", "--workload", "tiny-gpt",
    "--workload-options", "seq_len=32,d_model=32,n_layer=2,n_head=2,eval_windows=8,final_eval_windows=8",
    "--steps", str(STEPS), "--batch-size", "4", "--accumulate", "2", "--checkpoint-every", "3", "--eval-every", "20",
    "--keep-checkpoints", "2", "--threads", "1", "--no-progress",
]


def train_losses(folder) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]


def last_logged_step(folder) -> int:
    try:
        lines = (folder / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError):
            continue
    return 0


def kill_at_step(folder, step: int) -> None:
    process = subprocess.Popen([*TRAIN, "--out", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while last_logged_step(folder) < step and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()
    assert not (folder / "summary.json").exists()  # it really was interrupted


def test_a_run_killed_at_random_steps_resumes_to_identical_losses_and_parameters(tmp_path):
    reference = tmp_path / "reference"
    subprocess.run([*TRAIN, "--out", str(reference)], check=True, capture_output=True, timeout=300)
    expected_losses = train_losses(reference)
    assert [step for step, _ in expected_losses] == list(range(1, STEPS + 1))
    expected_parameters = torch.load(reference / "model.pt", weights_only=True)

    chooser = random.Random(os.getpid())
    damages = ["none", "truncate", "bit-flip"]
    for trial, damage in enumerate(damages):
        folder = tmp_path / f"trial{trial}"
        kill_at_step(folder, chooser.randint(4, STEPS - 6))
        newest = CheckpointManager(folder / "checkpoints").checkpoints()[0][1]
        if damage == "truncate":
            newest.write_bytes(newest.read_bytes()[:-100])
        elif damage == "bit-flip":
            data = bytearray(newest.read_bytes())
            data[len(data) // 3] ^= 0x04
            newest.write_bytes(bytes(data))
        resumed = subprocess.run([*TRAIN, "--out", str(folder), "--resume"], capture_output=True, text=True,
                                 timeout=300)
        assert resumed.returncode == 0, resumed.stderr
        assert "resumed from the checkpoint of step" in resumed.stdout
        if damage != "none":
            reason = "truncated" if damage == "truncate" else "checksum mismatch"
            assert f"skipped checkpoint {newest}: {reason}" in resumed.stdout
        assert train_losses(folder) == expected_losses  # bit for bit: floats compared exactly
        parameters = torch.load(folder / "model.pt", weights_only=True)
        assert all(torch.equal(parameters[name], expected_parameters[name]) for name in expected_parameters)
