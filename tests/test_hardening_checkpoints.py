"""No code runs from a checkpoint: hostile sharded metadata, hostile DCP values and hostile single-file
payloads are skipped with one clear reason, through the library and through ``gradwise train --resume``.

Each hostile file carries a payload that would create a marker file if it ran; a control shows the
same file does run code through torch's own DCP reader, so the tests can fail.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict

from gradwise.checkpoints.atomic import CheckpointManager, CorruptCheckpoint, decode, encode, load_refusal
from gradwise.checkpoints.sharded import (
    METADATA,
    ShardedCheckpoints,
    UnsafeMetadata,
    file_digest,
    read_metadata,
)
from gradwise.cli import main
from gradwise.optim import AdamW

REPO = Path(__file__).resolve().parents[1]


class Runs:
    """Pickles to ``callable(*arguments)``: with ``os.system`` it runs a shell command when unpickled."""

    def __init__(self, callable_, *arguments) -> None:
        self.callable, self.arguments = callable_, arguments

    def __reduce__(self):
        return self.callable, self.arguments


def touch(marker: Path) -> Runs:
    return Runs(os.system, f"touch {marker}")


def model_and_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    return model, AdamW(model.parameters(), lr=0.05)


def step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model(torch.randn(5, 4)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def two_checkpoints(folder: Path) -> tuple[ShardedCheckpoints, dict[str, torch.Tensor]]:
    """Sharded checkpoints of steps 1 and 2 (one process); the parameters at step 1."""
    checkpoints = ShardedCheckpoints(folder, keep=3)
    model, optimizer = model_and_optimizer()
    step(model, optimizer)
    checkpoints.save(1, model, optimizer, {"at": 1})
    at_one = {name: value.detach().clone() for name, value in model.state_dict().items()}
    step(model, optimizer)
    checkpoints.save(2, model, optimizer, {"at": 2})
    return checkpoints, at_one


def reseal(folder: Path) -> None:
    """Recompute the manifest's sizes and digests, as whoever writes the folder can: a checksum is no signature."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] = {path.name: file_digest(path) for path in sorted(folder.iterdir())
                         if path.is_file() and path.name != "manifest.json"}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def with_payload_inside(metadata_path: Path, payload: object) -> bytes:
    """The real metadata with ``payload`` hidden in one of its lists (a file that otherwise looks right)."""
    with open(metadata_path, "rb") as file:
        metadata = pickle.load(file)  # our own, just written: trusted
    metadata.storage_meta.modules = [payload]
    return pickle.dumps(metadata)


REFUSED = "which a checkpoint's metadata may not hold"
HOSTILE_METADATA = {
    "os.system as the whole file": (lambda marker, path: pickle.dumps(touch(marker)),
                                    f".metadata names posix.system, {REFUSED}"),
    "os.system inside valid metadata": (lambda marker, path: with_payload_inside(path, touch(marker)),
                                        f".metadata names posix.system, {REFUSED}"),
    "builtins.exec": (lambda marker, path: pickle.dumps(Runs(exec, f"open({str(marker)!r}, 'w')")),
                      f".metadata names builtins.exec, {REFUSED}"),
    "subprocess.call": (lambda marker, path: pickle.dumps(Runs(subprocess.call, ["touch", str(marker)])),
                        f".metadata names subprocess.call, {REFUSED}"),
    "torch.load of another file": (lambda marker, path: pickle.dumps(Runs(torch.load, str(marker))),
                                   f".metadata names torch.serialization.load, {REFUSED}"),
    "a persistent id": (lambda marker, path: b"\x80\x04P0\n.",
                        f".metadata holds a persistent reference, {REFUSED}"),
    "protocol-0 GLOBAL opcode": (lambda marker, path: f"cos\nsystem\n(Vtouch {marker}\ntR.".encode(),
                                 f".metadata names os.system, {REFUSED}"),
    "truncated": (lambda marker, path: path.read_bytes()[:40], "unreadable .metadata: "),
}


@pytest.mark.parametrize("name", HOSTILE_METADATA)
def test_a_hostile_metadata_is_skipped_and_never_runs(tmp_path, name):
    checkpoints, at_one = two_checkpoints(tmp_path / "run")
    marker = tmp_path / "marker"
    newest = checkpoints.path(2)
    make, reason = HOSTILE_METADATA[name]
    (newest / METADATA).write_bytes(make(marker, newest / METADATA))
    reseal(newest)  # the manifest verifies: only the loader can refuse it
    with pytest.raises(UnsafeMetadata):
        read_metadata(newest)
    model, optimizer = model_and_optimizer()
    assert checkpoints.load_newest(model, optimizer) == (1, {"at": 1})
    assert not marker.exists()
    assert all(torch.equal(value, at_one[key]) for key, value in model.state_dict().items())
    [skipped] = checkpoints.skipped
    assert skipped.path == newest and skipped.reason.startswith(reason) and "\n" not in skipped.reason


def test_the_same_hostile_metadata_runs_code_through_torchs_own_reader(tmp_path):
    """The control: torch's FileSystemReader unpickles ``.metadata``, so the attack above is real."""
    checkpoints, _ = two_checkpoints(tmp_path / "run")
    marker = tmp_path / "marker"
    (checkpoints.path(2) / METADATA).write_bytes(pickle.dumps(touch(marker)))
    model, _ = model_and_optimizer()
    with pytest.raises((Exception, dcp.CheckpointException)):  # the payload ran, then DCP fails on its result
        dcp.load({"model": model.state_dict()}, checkpoint_id=checkpoints.path(2), no_dist=True)
    assert marker.exists()


@pytest.mark.parametrize("entry, reason", [
    ({"relative_path": "../../outside.distcp"}, "points at '../../outside.distcp', not a file of this checkpoint"),
    ({"transform_descriptors": ["zstd/1"]}, "asks for stream transforms ['zstd/1'], which gradwise never writes"),
])
def test_metadata_of_allowed_classes_that_points_outside_the_checkpoint_is_refused(tmp_path, entry, reason):
    checkpoints, _ = two_checkpoints(tmp_path / "run")
    newest = checkpoints.path(2)
    with open(newest / METADATA, "rb") as file:
        metadata = pickle.load(file)
    info = next(iter(metadata.storage_data.values()))
    for key, value in entry.items():
        setattr(info, key, value)
    (newest / METADATA).write_bytes(pickle.dumps(metadata))
    reseal(newest)
    model, optimizer = model_and_optimizer()
    assert checkpoints.load_newest(model, optimizer)[0] == 1
    assert checkpoints.skipped[0].reason == f"{METADATA} {reason}"


def test_a_hostile_value_in_a_shard_file_is_refused_although_torchs_planner_would_run_it(tmp_path):
    """DCP stores non-tensor values (the optimizer's hyperparameters) as ``torch.save`` bytes and its default
    planner loads them with ``weights_only=False``: a shard whose ``lr`` entry is a pickled ``os.system``."""
    checkpoints, _ = two_checkpoints(tmp_path / "run")
    newest, marker = checkpoints.path(2), tmp_path / "marker"
    buffer = io.BytesIO()
    torch.save(touch(marker), buffer)
    (newest / "__9_0.distcp").write_bytes(buffer.getvalue())
    with open(newest / METADATA, "rb") as file:
        metadata = pickle.load(file)
    [key] = [key for key in metadata.storage_data if key.fqn == "optimizer.param_groups.0.lr"]
    info = metadata.storage_data[key]
    info.relative_path, info.offset, info.length = "__9_0.distcp", 0, len(buffer.getvalue())
    (newest / METADATA).write_bytes(pickle.dumps(metadata))  # only classes DCP writes: it passes the unpickler
    reseal(newest)

    model, optimizer = model_and_optimizer()
    assert checkpoints.load_newest(model, optimizer)[0] == 1
    assert not marker.exists()
    assert checkpoints.skipped[0].reason == ("the value of optimizer.param_groups.0.lr was refused by the safe "
                                             "loader: unsupported GLOBAL posix.system")
    # the control: torch's default planner runs it
    model, optimizer = model_and_optimizer()
    step(model, optimizer)
    state = dict(zip(("model", "optimizer"), get_state_dict(model, optimizer), strict=True))
    dcp.load(state, checkpoint_id=newest, no_dist=True)
    assert marker.exists() and state["optimizer"]["param_groups"][0]["lr"] == 0  # os.system's exit status


def test_every_class_a_real_checkpoint_writes_is_admitted(tmp_path):
    """The allow-list is not too tight: a real checkpoint (AdamW state, hyperparameters, a fresh optimizer's
    hyperparameters-only checkpoint) reads back, and names exactly these globals."""
    checkpoints, _ = two_checkpoints(tmp_path / "run")
    metadata = read_metadata(checkpoints.path(2))
    model, optimizer = model_and_optimizer()
    group_entries = len(optimizer.param_groups[0])  # lr, betas, ..., params: each a pickled value
    assert len(metadata.state_dict_metadata) == 4 + 3 * 4 + group_entries  # parameters, AdamW state, the group
    checkpoints.save(3, model, optimizer, {})  # before the first step: the model only
    assert checkpoints.load_newest(model, optimizer) == (3, {})


def hostile_single_file(marker: Path) -> bytes:
    """A gradwise checkpoint with a valid header and checksum whose payload unpickles ``os.system``."""
    return encode({"step": 12, "model": touch(marker)})


def test_a_hostile_single_file_checkpoint_is_refused_without_torchs_weights_only_false_advice(tmp_path):
    marker = tmp_path / "marker"
    with pytest.raises(CorruptCheckpoint) as refused:
        decode(hostile_single_file(marker))
    assert str(refused.value) == ("refused by the safe loader: unsupported GLOBAL posix.system "
                                  "(a checkpoint may hold only tensors and plain values)")
    assert not marker.exists()
    for raw, expected in ((pickle.dumps({"a": Runs(eval, "1")}), "Unsupported operand 149"),):
        buffer = io.BytesIO(raw)
        with pytest.raises(pickle.UnpicklingError) as error:
            torch.load(buffer, weights_only=True)
        assert load_refusal(error.value) == expected and "weights_only" in str(error.value)


FAST = ["--workload", "mlp", "--steps", "12", "--eval-every", "100", "--checkpoint-every", "4", "--threads", "1",
        "--no-progress"]


def test_resume_skips_a_hostile_checkpoint_in_one_line_and_goes_on_from_the_older_one(tmp_path, capsys):
    out, marker = tmp_path / "run", tmp_path / "marker"
    assert main(["train", *FAST, "--out", str(out)]) == 0
    newest = CheckpointManager(out / "checkpoints").path(12)
    newest.write_bytes(hostile_single_file(marker))
    capsys.readouterr()
    assert main(["train", *FAST, "--out", str(out), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert not marker.exists()
    assert (f"skipped checkpoint {newest}: refused by the safe loader: unsupported GLOBAL posix.system "
            "(a checkpoint may hold only tensors and plain values)\n") in printed
    assert "resumed from the checkpoint of step 8" in printed and "weights_only" not in printed


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_gradwise_train_fsdp_resume_skips_a_planted_metadata_and_never_runs_it(tmp_path):
    """``gradwise train --nproc 2 --strategy fsdp --resume`` with a resealed hostile ``.metadata`` in the
    newest checkpoint: the marker never appears, the run resumes from the older checkpoint, and says so once."""
    out, marker = tmp_path / "run", tmp_path / "marker"
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    command = [sys.executable, "-m", "gradwise", "train", "--nproc", "2", "--strategy", "fsdp", "--workload", "mlp",
               "--workload-options", "dim=8,hidden=16,train_examples=256,val_examples=64", "--batch-size", "8",
               "--steps", "10", "--checkpoint-every", "5", "--eval-every", "1000", "--no-progress",
               "--out", str(out)]
    first = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=240)
    assert first.returncode == 0, first.stderr[-3000:]
    newest = out / "checkpoints" / "step-00000010"
    (newest / METADATA).write_bytes(with_payload_inside(newest / METADATA, touch(marker)))
    reseal(newest)
    resumed = subprocess.run([*command, "--resume"], cwd=REPO, env=environment, capture_output=True, text=True,
                             timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not marker.exists()
    assert (f"skipped checkpoint {newest}: .metadata names posix.system, which a checkpoint's metadata may not "
            "hold\n") in resumed.stdout
    assert "resumed from the checkpoint of step 5" in resumed.stdout
    assert "Traceback" not in resumed.stderr
