"""Resume refuses what it cannot honour, a full disk loses nothing, and a non-finite run never succeeds.

Every refusal is one line on stderr, exit 2 (bad input) or 1 (a runtime failure), and leaves the run
folder exactly as it was.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from gradwise.checkpoints.atomic import CheckpointManager, decode, encode, write_atomically
from gradwise.checkpoints.sharded import ShardedCheckpoints
from gradwise.cli import main
from gradwise.train.config import settings_difference

FAST = ["--workload", "mlp", "--steps", "12", "--eval-every", "100", "--checkpoint-every", "4", "--threads", "1",
        "--no-progress"]


def snapshot(folder: Path) -> dict:
    return {path.relative_to(folder): (path.stat().st_mtime_ns, path.read_bytes())
            for path in sorted(folder.rglob("*")) if path.is_file()}


def one_line(capsys) -> str:
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error, error
    return error.strip()


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 12-step mlp run with checkpoints at steps 4, 8 and 12."""
    out = tmp_path_factory.mktemp("resume") / "run"
    assert main(["train", *FAST, "--out", str(out)]) == 0
    return out


@pytest.fixture
def run(finished, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


def checkpoint(out: Path, step: int) -> Path:
    return CheckpointManager(out / "checkpoints").path(step)


# --- item 3: --resume where there is no run ---------------------------------------------------

def truncate_all(out: Path) -> None:
    for path in (out / "checkpoints").iterdir():
        path.write_bytes(path.read_bytes()[:100])


NO_RUN = {
    "no such folder": (lambda out: shutil.rmtree(out), "holds no run to resume (no such folder)"),
    "an empty folder": (lambda out: [shutil.rmtree(out), out.mkdir()], "holds no run to resume (an empty folder)"),
    "checkpoints gone": (lambda out: shutil.rmtree(out / "checkpoints"), "checkpoints' is missing)"),
    "checkpoints a file": (lambda out: [shutil.rmtree(out / "checkpoints"), (out / "checkpoints").write_text("x")],
                           "checkpoints' is not a folder)"),
    "no checkpoint in it": (lambda out: [shutil.rmtree(out / "checkpoints"), (out / "checkpoints").mkdir()],
                            "checkpoints' holds no checkpoint"),
    "all corrupt": (truncate_all, "can be resumed (step-00000012.ckpt: truncated: 52 of "),
}


@pytest.mark.parametrize("case", NO_RUN)
def test_resume_without_a_usable_run_is_refused_in_one_line_and_writes_nothing(run, capsys, case):
    damage, message = NO_RUN[case]
    damage(run)
    before = snapshot(run) if run.is_dir() else run.exists()
    assert main(["train", *FAST, "--out", str(run), "--resume"]) == 2
    error = one_line(capsys)
    assert error.startswith("gradwise train: error: --resume: ") and message in error, error
    assert (snapshot(run) if run.is_dir() else run.exists()) == before


# --- item 4: a full disk ----------------------------------------------------------------------

def fail_fsync_of(pattern: str, monkeypatch) -> None:
    """``os.fsync`` of a file whose path contains ``pattern`` fails with ENOSPC (the data reached the page
    cache but not the disk, as on a full file system); other files sync normally."""
    real = os.fsync

    def fsync(descriptor: int) -> None:
        if pattern in os.readlink(f"/proc/self/fd/{descriptor}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)


def temporaries(out: Path) -> list[Path]:
    return [path for path in out.rglob("*") if path.name.endswith(".tmp")]


def test_a_full_disk_stops_in_one_line_keeps_the_last_checkpoint_and_resume_then_finishes_bit_for_bit(
        finished, tmp_path, capsys, monkeypatch):
    out = tmp_path / "full"
    with monkeypatch.context() as patch:
        fail_fsync_of(".step-00000008.ckpt.tmp", patch)
        assert main(["train", *FAST, "--out", str(out)]) == 1
    error = one_line(capsys)
    assert error == (f"gradwise train: error: [Errno 28] could not write {checkpoint(out, 8)}: "
                     "No space left on device"), error
    assert temporaries(out) == []
    assert [path.name for path in sorted((out / "checkpoints").iterdir())] == ["step-00000000.ckpt",
                                                                              "step-00000004.ckpt"]
    assert decode(checkpoint(out, 4).read_bytes())["step"] == 4  # intact
    assert not (out / "model.pt").exists() and not (out / "summary.json").exists()

    assert main(["train", *FAST, "--out", str(out), "--resume"]) == 0
    assert "resumed from the checkpoint of step 4" in capsys.readouterr().out
    resumed = torch.load(out / "model.pt", weights_only=True)
    uninterrupted = torch.load(finished / "model.pt", weights_only=True)
    assert all(torch.equal(resumed[name], value) for name, value in uninterrupted.items())


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    write_atomically(path, b"old")
    fail_fsync_of(".config.json.tmp", monkeypatch)
    with pytest.raises(OSError, match=r"^\[Errno 28\] could not write .*config.json: No space left on device$"):
        write_atomically(path, b"new")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["config.json"]


def test_a_stale_temporary_file_from_a_crash_is_removed_by_the_next_save(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    (tmp_path / ".step-00000005.ckpt.tmp").write_bytes(b"half a checkpoint")
    manager.save(6, {"step": 6})
    assert os.listdir(tmp_path) == ["step-00000006.ckpt"]


def test_a_sharded_save_that_fails_removes_its_folder_and_the_older_checkpoint_loads(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    checkpoints = ShardedCheckpoints(tmp_path, keep=3)
    checkpoints.save(1, model, optimizer, {"at": 1})
    with monkeypatch.context() as patch:
        fail_fsync_of("rank-00000.ckpt", patch)
        with pytest.raises(OSError, match=r"^could not write the checkpoint of step 2 in .*: \[Errno 28\] could not "
                                          r"write .*rank-00000.ckpt: No space left on device$"):
            checkpoints.save(2, model, optimizer, {"at": 2})
    assert sorted(os.listdir(tmp_path)) == ["step-00000001"]
    assert checkpoints.load_newest(model, optimizer) == (1, {"at": 1}) and checkpoints.skipped == []


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="mounting a small tmpfs needs root")
def test_a_real_full_tmpfs(finished, tmp_path, capsys):
    """The same on a real 4 MB tmpfs, filled up to 100 kB (a checkpoint is about 240 kB)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mount refused")
    try:
        out = disk / "run"
        shutil.copytree(finished, out)
        shutil.rmtree(out / "checkpoints")
        (out / "checkpoints").mkdir()
        shutil.copy(checkpoint(finished, 12), out / "checkpoints")
        free = shutil.disk_usage(disk).free
        (disk / "filler").write_bytes(b"\0" * (free - 100_000))
        argv = ["train", *FAST, "--steps", "20", "--allow-change", "steps", "--out", str(out), "--resume"]
        assert main(argv) == 1
        error = one_line(capsys)
        assert "No space left on device" in error and "step-00000016.ckpt" in error, error
        assert temporaries(out) == [] and os.listdir(out / "checkpoints") == ["step-00000012.ckpt"]
        (disk / "filler").unlink()
        assert main(argv) == 0
        assert "resumed from the checkpoint of step 12" in capsys.readouterr().out
        assert json.loads((out / "summary.json").read_text())["steps"] == 20
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# --- items 5 and 6: settings recorded in every checkpoint, foreign checkpoints skipped ----------

def test_with_config_json_deleted_other_flags_are_refused_against_the_checkpoints_own_settings(run, capsys):
    (run / "config.json").unlink()
    before = snapshot(run)
    assert main(["train", *FAST, "--out", str(run), "--resume", "--optimizer", "sgd", "--lr", "0.5",
                 "--batch-size", "32"]) == 2
    error = one_line(capsys)
    assert "no checkpoint in" in error and "step-00000012.ckpt: written with optimizer='adamw', not 'sgd'" in error
    assert snapshot(run) == before  # config.json not rewritten to claim the new settings
    assert main(["train", *FAST, "--out", str(run), "--resume"]) == 0  # its own settings: resumes
    assert json.loads((run / "config.json").read_text())["optimizer"] == "adamw"


@pytest.mark.parametrize("edit, found", [
    ({"optimizer": "sgd"}, "written with optimizer='adamw', not 'sgd'"),
    ({"lr": 0.5}, "written with lr=0.003, not 0.5"),
    ({"batch_size": 32}, "written with batch_size=64, not 32"),
    ({"schedule": "constant"}, "written with schedule='cosine', not 'constant'"),
])
def test_an_edited_config_json_is_refused_against_every_checkpoint(run, capsys, edit, found):
    saved = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**saved, **edit}))
    before = snapshot(run)
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 2
    error = one_line(capsys)
    assert f"step-00000012.ckpt: {found}" in error, error
    assert snapshot(run) == before


@pytest.mark.parametrize("flags, message", [
    (["--lr", "0.5"], "was written with lr=0.003, not 0.5; resume with its own settings"),
    (["--steps", "16"], "was written with steps=12, not 16 (--allow-change steps to continue with 16)"),
    (["--allow-change", "lr", "--lr", "0.5"], "'lr' cannot change on resume; changeable: steps, world_size"),
    (["--allow-change", "steps", "--steps", "4"], "the newest usable checkpoint is of step 12, past steps=4"),
])
def test_a_flag_that_differs_from_the_run_is_refused_unless_allowed(run, capsys, flags, message):
    before = snapshot(run)
    assert main(["train", *FAST, "--out", str(run), "--resume", *flags]) == 2
    assert message in one_line(capsys)
    assert snapshot(run) == before


def test_more_steps_when_allowed_go_on_from_the_checkpoint_on_the_rebuilt_schedule(run, capsys):
    assert main(["train", *FAST, "--out", str(run), "--resume", "--steps", "16", "--allow-change", "steps"]) == 0
    assert "resumed from the checkpoint of step 12" in capsys.readouterr().out
    assert json.loads((run / "config.json").read_text())["steps"] == 16  # true now: the run has 16 steps
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, 17))
    assert decode(checkpoint(run, 16).read_bytes())["settings"]["steps"] == 16


def foreign_checkpoint(tmp_path: Path, *flags: str) -> dict:
    """The payload of the last checkpoint of a 4-step run with ``flags``."""
    out = tmp_path / "foreign"
    assert main(["train", "--steps", "4", "--checkpoint-every", "4", "--threads", "1", "--no-progress",
                 "--eval-every", "100", *flags, "--out", str(out)]) == 0
    return decode(checkpoint(out, 4).read_bytes())


@pytest.mark.parametrize("flags, forge, reason", [
    (["--workload", "logreg"], False, "written with workload='logreg', not 'mlp'"),
    (["--workload", "mlp", "--optimizer", "sgd"], False, "written with optimizer='sgd', not 'adamw'"),
    (["--workload", "logreg"], True, "does not fit this model and optimizer: Error(s) in loading state_dict"),
    (["--workload", "mlp"], "drop", "it records no settings"),
    (["--workload", "mlp"], "nan", "non-finite values in model.0.weight"),
])
def test_a_foreign_or_broken_newest_checkpoint_is_skipped_for_the_older_valid_one(run, tmp_path, capsys, flags,
                                                                                  forge, reason):
    payload = foreign_checkpoint(tmp_path, *flags)
    if forge is True:  # another workload's state under this run's settings
        payload["settings"] = decode(checkpoint(run, 12).read_bytes())["settings"]
    elif forge == "drop":
        del payload["settings"]
    elif forge == "nan":
        payload = decode(checkpoint(run, 12).read_bytes())
        payload["model"]["0.weight"][0, 0] = float("nan")
    checkpoint(run, 99).write_bytes(encode(payload))
    capsys.readouterr()
    assert main(["train", *FAST, "--out", str(run), "--resume", "--steps", "14", "--allow-change", "steps"]) == 0
    printed = capsys.readouterr().out
    assert f"skipped checkpoint {checkpoint(run, 99)}: {reason}" in printed, printed
    assert "resumed from the checkpoint of step 12" in printed


def test_settings_are_compared_as_json_values():
    assert settings_difference({"betas": [0.9, 0.99]}, {"betas": (0.9, 0.99)}) is None
    assert settings_difference({"steps": 3}, {"steps": 4}, allowed={"steps"}) is None
    assert settings_difference(None, {"steps": 4}) == "it records no settings"


# --- items 7 and 8: divergence ----------------------------------------------------------------

def test_a_run_that_ends_with_non_finite_weights_exits_1_in_one_line_and_writes_no_result(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--workload", "mlp", "--steps", "3", "--lr", "1e300", "--threads", "1", "--no-progress",
                 "--out", str(out)]) == 1
    error = one_line(capsys)
    assert error.startswith("gradwise train: error: the weights are not finite after step 3 (non-finite values "
                            "in parameter."), error
    assert not (out / "model.pt").exists() and not (out / "summary.json").exists()
    assert [path.name for path in (out / "checkpoints").iterdir()] == ["step-00000000.ckpt"]


def test_no_checkpoint_is_written_during_skipped_steps_so_every_rollback_returns_to_finite_weights(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--workload", "mlp", "--steps", "30", "--lr", "1e30", "--checkpoint-every", "5",
                 "--threads", "1", "--no-progress", "--out", str(out)]) == 1
    assert "3 rollbacks spent" in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert [rollback["to_step"] for rollback in report["rollbacks"]] == [0, 0, 0]
    assert [path.name for path in (out / "checkpoints").iterdir()] == ["step-00000000.ckpt"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    refused = [record for record in records if record["kind"] == "checkpoint"]
    assert len(refused) == 4 and {record["step"] for record in refused} == {5}
    assert all(record["reason"].endswith("updates were skipped for non-finite loss or gradients")
               for record in refused)


# --- a worker torchrun restarted ----------------------------------------------------------------

def test_a_restart_before_the_first_checkpoint_starts_afresh_in_the_jobs_folder(run, monkeypatch, capsys) -> None:
    """torchrun's restart resumes; when the failed attempt died before any checkpoint (only its
    config.json and logs exist), the restarted workers start the run afresh instead of refusing."""
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").mkdir()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert main(["train", *FAST, "--out", str(run)]) == 0
    assert "resumed" not in capsys.readouterr().out
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == checkpoint(run, 12).name


def test_a_restart_after_a_checkpoint_resumes_from_it(run, monkeypatch, capsys) -> None:
    checkpoint(run, 12).unlink()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert main(["train", *FAST, "--out", str(run)]) == 0
    assert "resumed from the checkpoint of step 8" in capsys.readouterr().out


def test_a_restart_whose_checkpoints_are_all_corrupt_is_refused(run, monkeypatch, capsys) -> None:
    truncate_all(run)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert main(["train", *FAST, "--out", str(run)]) == 2
    assert "can be resumed" in one_line(capsys)
