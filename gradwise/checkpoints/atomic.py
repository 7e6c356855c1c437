"""Checkpoints written atomically with a checksum; resume from the newest one that verifies.

A checkpoint file is ``MAGIC``, the SHA-256 digest of the payload (32 bytes), the payload's
length (8 bytes, big-endian) and the payload: a ``torch.save`` of a dict of tensors and
plain values, loaded back with ``weights_only=True``. It is written to a temporary file in
the same folder, flushed and fsynced, renamed over the final name (atomic on POSIX) and
the folder fsynced, so a crash at any moment leaves either the old set of checkpoints or
the new one, never a half-written file under a checkpoint's name. A file that was
truncated or corrupted afterwards fails the length or digest check and is skipped, with
the reason reported.

Nothing in a checkpoint runs code: the payload is loaded with ``weights_only=True`` (torch's
restricted unpickler: tensors, numbers, strings and containers only); a payload that holds
anything else is skipped with what it held. The SHA-256 guards against damage, not against
a hostile writer (who can recompute it), which is why the loader must be safe on its own.
A write that fails (a full disk) removes its temporary file and raises one ``OSError``
naming the file, so the checkpoints written before stay as they were.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from gradwise.validation import check_int

MAGIC = b"GWCKPT1\n"
HEADER_SIZE = len(MAGIC) + 32 + 8
NAME = re.compile(r"^step-(\d{8,})\.ckpt$")
TEMPORARY = re.compile(r"^\.step-(\d{8,})\.ckpt\.tmp$")
REFUSED = re.compile(r"(Unsupported global: GLOBAL \S+|unsupported GLOBAL \S+|Unsupported operand \S+)")
"""What torch's ``weights_only`` loader names when it refuses a pickle."""
TORCH_ADVICE = re.compile(r"weights_only|Weights only|documentation|file an issue|trust")
"""Lines of torch's refusal that advise retrying with ``weights_only=False``: wrong advice for a hostile file."""


Accept = Callable[[dict[str, Any]], "str | None"]
"""A caller's check of a checkpoint's run state before it is loaded: the reason to skip it, or ``None``."""


class CorruptCheckpoint(ValueError):
    """A checkpoint file that fails verification."""


def encode(payload: dict[str, Any]) -> bytes:
    """The bytes of a checkpoint file holding ``payload``."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    body = buffer.getvalue()
    return MAGIC + hashlib.sha256(body).digest() + len(body).to_bytes(8, "big") + body


def decode(data: bytes) -> dict[str, Any]:
    """The payload of a checkpoint file's bytes; ``CorruptCheckpoint`` says what is wrong."""
    if len(data) < HEADER_SIZE or not data.startswith(MAGIC):
        raise CorruptCheckpoint("not a gradwise checkpoint (bad header)")
    digest = data[len(MAGIC) : len(MAGIC) + 32]
    length = int.from_bytes(data[len(MAGIC) + 32 : HEADER_SIZE], "big")
    body = data[HEADER_SIZE:]
    if len(body) != length:
        raise CorruptCheckpoint(f"truncated: {len(body)} of {length} payload bytes")
    if hashlib.sha256(body).digest() != digest:
        raise CorruptCheckpoint("checksum mismatch (the payload was modified)")
    try:
        return torch.load(io.BytesIO(body), weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise CorruptCheckpoint(f"refused by the safe loader: {load_refusal(error)} "
                                "(a checkpoint may hold only tensors and plain values)") from None


def load_refusal(error: Exception) -> str:
    """What torch's ``weights_only`` loader refused, without its advice to retry with ``weights_only=False``."""
    if (named := REFUSED.search(str(error))) is not None:
        return named.group(1).rstrip(".")
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    found = [line.rstrip(".") for line in lines if not TORCH_ADVICE.search(line)]
    return found[0] if found else type(error).__name__


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a fsynced temporary file and a rename.

    On failure (a full disk, a read-only folder) the temporary file is removed and one
    ``OSError`` says which file could not be written; ``path`` is left as it was.
    """
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise OSError(error.errno, f"could not write {path}: {error.strerror or error}") from None
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def rng_state() -> dict[str, Any]:
    """Every random number generator the run may draw from: Python's, NumPy's, torch's CPU and CUDA."""
    # legacy=True always gives the tuple form (the stubs also allow the dict that legacy=False may give)
    numpy_state = cast(tuple[Any, ...], np.random.get_state(legacy=True))
    state = {
        "python": random.getstate(),
        "numpy": (numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators saved by :func:`rng_state`."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass(frozen=True)
class Skipped:
    """A checkpoint passed over on resume, and why."""

    path: Path
    reason: str


class CheckpointManager:
    """The checkpoints of one run in ``folder``: ``step-00000100.ckpt``, the last ``keep`` of them."""

    def __init__(self, folder: str | Path, keep: int = 3) -> None:
        self.folder = Path(folder)
        self.keep = check_int("keep", keep, 1)

    def path(self, step: int) -> Path:
        return self.folder / f"step-{step:08d}.ckpt"

    def checkpoints(self) -> list[tuple[int, Path]]:
        """``(step, path)`` of every checkpoint file, newest first (verified or not)."""
        if not self.folder.is_dir():
            return []
        found = [(int(match.group(1)), path) for path in self.folder.iterdir() if (match := NAME.match(path.name))]
        return sorted(found, reverse=True)

    def save(self, step: int, payload: dict[str, Any]) -> Path:
        """Write the checkpoint of ``step`` and delete all but the newest ``keep`` (and temporary files
        left by a save that crashed)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.iterdir():
            if TEMPORARY.match(stale.name):
                stale.unlink(missing_ok=True)
        path = self.path(step)
        write_atomically(path, encode(payload))
        for _, old in self.checkpoints()[self.keep :]:
            old.unlink(missing_ok=True)
        return path

    def load_newest(self) -> tuple[dict[str, Any] | None, Path | None, list[Skipped]]:
        """The payload of the newest checkpoint that verifies, its path, and those skipped on the way."""
        skipped: list[Skipped] = []
        for _, path in self.checkpoints():
            try:
                return read_checkpoint(path), path, skipped
            except CorruptCheckpoint as error:
                skipped.append(Skipped(path, str(error)))
        return None, None, skipped


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The payload of the checkpoint file ``path``; ``CorruptCheckpoint`` says why it cannot be used."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CorruptCheckpoint(f"unreadable: {error.strerror or error}") from None
    return decode(data)


def first_nonfinite(tree: Any, name: str = "") -> str | None:
    """The name of the first floating tensor in ``tree`` (dicts, lists, tuples) holding a NaN or an infinity.

    A ``DTensor`` is checked by its local shard (each rank checks its own).
    """
    if isinstance(tree, torch.Tensor):
        local = tree.to_local() if hasattr(tree, "to_local") else tree
        if (local.is_floating_point() or local.is_complex()) and not bool(torch.isfinite(local).all()):
            return name or "tensor"
        return None
    items: Iterable[tuple[Any, Any]]
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return None
    for key, value in items:
        if (found := first_nonfinite(value, f"{name}.{key}" if name else str(key))) is not None:
            return found
    return None
