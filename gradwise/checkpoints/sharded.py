"""Sharded checkpoints on ``torch.distributed.checkpoint``: atomic, verified, loadable with another world size.

``ShardedCheckpoints(folder, keep)`` keeps the checkpoints of one distributed run in
``folder/step-00000100/``. ``save`` is a collective: every rank writes its part of the
model and optimizer state with ``torch.distributed.checkpoint`` (DCP), whose state dicts
come from ``torch.distributed.checkpoint.state_dict.get_state_dict``. Those state dicts
are keyed by parameter name (the fully qualified name, without DDP's ``module.`` prefix)
and hold plain tensors for a replicated model (DDP; DCP writes each replicated tensor
once) and ``DTensor`` shards for an FSDP2 model (``fully_shard``). DCP records where
every shard sits in the global tensor, so a checkpoint written by N processes loads into
M processes with any sharding: each rank reads the byte ranges its own shards need
(the DCP documentation; Liang et al. 2024, "TorchTitan", arXiv:2410.06511, on its use for
pre-training at scale). The folder must be one file system that every rank sees, as DCP's
file-system writer assumes.

Next to the DCP files every rank writes ``rank-00000.ckpt``: the run's ``extra`` state as
that rank sees it (scheduler, guard, data position, ...) and its random number generators,
in the checksummed format of :mod:`gradwise.checkpoints.atomic`. Loading into the same world
size gives every rank its own ``extra`` and generators back, so the resumed run is bit for
bit the uninterrupted one; loading into another world size gives every rank rank 0's
``extra`` and leaves the generators as they are (there is no rank to map them to).

Atomicity: a checkpoint is written into ``.step-00000100.tmp/``; after a barrier the
ranks hash the written files (round robin), rank 0 writes ``manifest.json`` (step, world
size, every file's size and SHA-256) and renames the folder to ``step-00000100``. A crash
at any moment leaves the older checkpoints and at most a temporary folder; a folder that
loses or changes a file later fails the manifest check. ``load_newest`` takes the newest
checkpoint that verifies and lists those it passed over, with the reason, in ``skipped``.

An optimizer that has taken no step yet (empty state) is saved as its hyperparameters
only: ``get_state_dict`` would otherwise create its state with a zero-lr step, which
changes the run (Adam's step count, for one). Loading such a checkpoint empties the
optimizer's state, so a rollback to step 0 is exact too.

Safe loading: nothing read from a checkpoint runs code, as for the single-file checkpoints
(``weights_only=True``). DCP's own reader unpickles ``.metadata`` with ``pickle.load`` and its
default planner loads the non-tensor values (the optimizer's hyperparameters) with
``torch.load(weights_only=False)``: either runs whatever a planted file asks for, and the
manifest's SHA-256 is no defence against whoever writes the folder (they recompute it).
Here ``.metadata`` is read by :class:`MetadataUnpickler`, which admits only the classes DCP
writes there (found by writing real checkpoints, one- and two-process, replicated and
FSDP2, and listing the globals their pickles name), and every storage entry must point
at a file the manifest lists, with no stream transforms; the values are loaded with
``weights_only=True`` (:class:`SafeLoadPlanner`); the tensors DCP already loads with
``weights_only=True``. A checkpoint that fails any of this is skipped with the reason.

Loading goes newest first through the checkpoints that verify; one whose ``accept``
check fails (the caller's: another run's settings), whose state does not fit the model
and optimizer, or whose weights or optimizer state hold a NaN or an infinity is skipped
too, and the next older one is tried. Every rank reaches the same verdict (the reasons
are gathered) so the ranks never part ways. A save that fails on any rank (a full disk)
removes the temporary folder and raises one ``OSError`` on every rank.

Without a process group (one process, no ``torchrun``) the same calls work on one rank.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path, PosixPath
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.filesystem as dcp_filesystem
import torch.distributed.checkpoint.metadata as dcp_metadata
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from gradwise.checkpoints.atomic import (
    Accept,
    CorruptCheckpoint,
    Skipped,
    decode,
    encode,
    first_nonfinite,
    load_refusal,
    read_checkpoint,
    rng_state,
    set_rng_state,
    write_atomically,
)
from gradwise.validation import check_int

FORMAT = "gradwise-sharded-checkpoint/1"
MANIFEST = "manifest.json"
NAME = re.compile(r"^step-(\d{8,})$")
TEMPORARY = re.compile(r"^\.step-(\d{8,})\.tmp$")
HASH_CHUNK = 1 << 22
METADATA = ".metadata"

METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name): getattr(dcp_metadata, name)
    for name in ("Metadata", "TensorStorageMetadata", "ChunkStorageMetadata", "BytesStorageMetadata",
                 "MetadataIndex", "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): dcp_filesystem._StorageInfo,
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,  # a name -> torch.strided, ...
    ("pathlib", "PosixPath"): PosixPath,  # StorageMeta.checkpoint_id
} | {
    ("torch", name): value for name, value in vars(torch).items() if isinstance(value, torch.dtype)
}
"""Every global a DCP ``.metadata`` pickle names (torch 2.13), and nothing else: its dataclasses, an
enum, ``torch.Size``, dtypes, the layout lookup and a path. None of them runs code when built."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextmanager
def _quiet_single_process():
    """DCP warns that it assumes one process when there is no process group; here that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not _distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(value: Any) -> list[Any]:
    """Every rank's ``value``, on every rank, by rank."""
    if not _distributed():
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _fsync_folder(folder: Path) -> None:
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def file_digest(path: Path) -> dict[str, Any]:
    """A file's size in bytes and SHA-256, as the manifest records them."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(HASH_CHUNK):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.ckpt"


def read_manifest(folder: Path, step: int) -> dict[str, Any]:
    """The manifest of the checkpoint in ``folder``; ``ValueError`` says what is wrong with it."""
    path = folder / MANIFEST
    if not path.is_file():
        raise ValueError(f"incomplete: no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"corrupt {MANIFEST}: {error}") from None
    well_formed = isinstance(manifest, dict) and isinstance(manifest.get("files"), dict)
    if not well_formed or manifest.get("format") != FORMAT:
        raise ValueError(f"corrupt {MANIFEST}: not a {FORMAT} manifest")
    if manifest.get("step") != step:
        raise ValueError(f"corrupt {MANIFEST}: it names step {manifest.get('step')}, the folder step {step}")
    return manifest


def check_files(folder: Path, names: list[str], manifest: dict[str, Any]) -> str | None:
    """What is wrong with the first of ``names`` that does not match the manifest, or ``None``."""
    for name in names:
        path, expected = folder / name, manifest["files"][name]
        if not path.is_file():
            return f"incomplete: {name} is missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"truncated: {name} has {size} of {expected['bytes']} bytes"
        if file_digest(path)["sha256"] != expected["sha256"]:
            return f"checksum mismatch in {name} (the file was modified)"
    return None


class UnsafeMetadata(ValueError):
    """A ``.metadata`` that names a class DCP does not write, or points outside its checkpoint."""


class MetadataUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that builds only :data:`METADATA_CLASSES` (the "restricting globals" recipe of
    the ``pickle`` documentation); anything else, ``os.system`` first of all, is refused unbuilt."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return METADATA_CLASSES[module, name]
        except KeyError:
            raise UnsafeMetadata(f"{METADATA} names {module}.{name}, which a checkpoint's metadata "
                                 "may not hold") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeMetadata(f"{METADATA} holds a persistent reference, which a checkpoint's metadata may not hold")


def read_metadata(folder: Path, files: list[str] | None = None) -> dcp_metadata.Metadata:
    """The DCP metadata of the checkpoint in ``folder``, read without running code.

    ``files``: the names its storage entries may point at (the manifest's); ``UnsafeMetadata``
    (a ``ValueError``) says what is wrong.
    """
    try:
        with open(folder / METADATA, "rb") as file:
            metadata = MetadataUnpickler(file).load()
    except UnsafeMetadata:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            OSError) as error:
        raise UnsafeMetadata(f"unreadable {METADATA}: {error}") from None
    if not isinstance(metadata, dcp_metadata.Metadata) or not isinstance(metadata.storage_data, dict):
        raise UnsafeMetadata(f"{METADATA} does not hold DCP metadata")
    for info in metadata.storage_data.values():
        if not isinstance(info, dcp_filesystem._StorageInfo) or (files is not None and info.relative_path not in files):
            raise UnsafeMetadata(f"{METADATA} points at {getattr(info, 'relative_path', info)!r}, "
                                 "not a file of this checkpoint")
        if info.transform_descriptors:
            raise UnsafeMetadata(f"{METADATA} asks for stream transforms {info.transform_descriptors!r}, "
                                 "which gradwise never writes")
    return metadata


class SafeReader(FileSystemReader):
    """DCP's file-system reader with :func:`read_metadata` in place of its ``pickle.load``."""

    def __init__(self, path: Path, files: list[str]) -> None:
        super().__init__(path)
        self.files = files

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        if kwargs.get("rank") is not None:
            raise UnsafeMetadata("per-rank metadata files are not part of a gradwise checkpoint")
        metadata = read_metadata(Path(self.path), self.files)
        if metadata.storage_meta is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, except that non-tensor values load with ``weights_only=True``
    (the default planner uses ``weights_only=False``), and a tensor saved in another dtype than the
    one it loads into is refused (DCP would cast it: 8-bit codes read as the values of a float moment)."""

    def create_local_plan(self) -> Any:
        for fqn, value in self.state_dict.items():
            saved = self.metadata.state_dict_metadata.get(fqn) if self.metadata is not None else None
            if isinstance(value, torch.Tensor) and isinstance(saved, dcp_metadata.TensorStorageMetadata):
                if saved.properties.dtype != value.dtype:
                    raise ValueError(f"{fqn} was saved as {saved.properties.dtype}, this run keeps {value.dtype}")
        return super().create_local_plan()

    def load_bytes(self, read_item: Any, value: Any) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
            raise UnsafeMetadata(f"the value of {read_item.dest_index.fqn} was refused by the safe loader: "
                                 f"{load_refusal(error)}") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def _agreed(reason: str | None) -> str | None:
    """The first rank's reason, if any rank has one: every rank takes the same branch."""
    return next((found for found in _gather(reason) if found), None)


def _first_failure(error: BaseException) -> BaseException:
    """The first rank's error inside a DCP ``CheckpointException`` (which lists every rank's traceback)."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        return first[0] if isinstance(first, tuple) else first
    return error


def _short(error: BaseException) -> str:
    """One line for an error, DCP's included."""
    error = _first_failure(error)
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


class ShardedCheckpoints:
    """The sharded checkpoints of one run in ``folder``: ``step-00000100/``, the newest ``keep`` of them.

    Example::

        checkpoints = ShardedCheckpoints("run/checkpoints", keep=3)
        resumed = checkpoints.load_newest(model, optimizer)   # collective
        step, extra = resumed if resumed is not None else (0, {})
        ...
        checkpoints.save(step, model, optimizer, {"scheduler": scheduler.state_dict()})  # collective
    """

    def __init__(self, folder: str | Path, keep: int = 3, *, stages: bool = False) -> None:
        self.folder = Path(folder)
        self.keep = check_int("keep", keep, 1)
        self.options = StateDictOptions(flatten_optimizer_state_dict=stages)
        """``stages``: the ranks hold different parameters (pipeline stages). The optimizer's state dict is
        then flattened to one entry per parameter name, its group's hyperparameters included; nested, a
        param group is one list entry per rank that the save keeps once, from one stage, and the other
        stages would load its parameter names and fall back to the optimizer's defaults."""
        self.skipped: list[Skipped] = []
        """The checkpoints the last ``load_newest`` passed over, newest first, with the reason."""

    def path(self, step: int) -> Path:
        return self.folder / f"step-{step:08d}"

    def checkpoints(self) -> list[tuple[int, Path]]:
        """``(step, folder)`` of every committed checkpoint, newest first (verified or not)."""
        return self._matching(NAME)

    def _matching(self, pattern: re.Pattern[str]) -> list[tuple[int, Path]]:
        if not self.folder.is_dir():
            return []
        found = [(int(match.group(1)), path) for path in self.folder.iterdir() if (match := pattern.match(path.name))]
        return sorted(found, reverse=True)

    # --- saving ------------------------------------------------------------------------

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]) -> Path:
        """Write the checkpoint of ``step`` on every rank (a collective) and keep the newest ``keep``.

        ``extra`` is this rank's picklable run state (tensors, numbers, strings, lists,
        tuples and dicts of them); the random number generators are saved per rank without
        being asked. Returns the checkpoint's folder once it is committed on every rank.
        """
        check_int("step", step, 0)
        rank, world_size = _rank_and_world()
        fresh = all(_gather(not optimizer.state))
        payload: dict[str, Any] = {"extra": extra, "rng": rng_state()}
        if fresh:
            payload["param_groups"] = [{k: v for k, v in group.items() if k != "params"}
                                       for group in optimizer.param_groups]
        try:  # refuse now, before writing anything, what could not be loaded back with weights_only=True
            encoded = encode(payload)
            decode(encoded)
        except (pickle.PickleError, CorruptCheckpoint) as error:
            found = re.search(r"(Unsupported global: \S+ \S+|Can't pickle [^:]+)", str(error))
            raise ValueError("extra must hold only tensors, numbers, strings, lists, tuples and dicts, got "
                             f"{found.group(1) if found else type(error).__name__}") from None
        final = self.path(step)
        temporary = self.folder / f".{final.name}.tmp"
        if rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            for _, stale in self._matching(TEMPORARY):  # left by a save that crashed
                shutil.rmtree(stale)
            temporary.mkdir()
        _barrier()

        state: dict[str, Any]
        if fresh:
            state = {"model": get_model_state_dict(model)}
        else:
            model_state, optimizer_state = get_state_dict(model, optimizer, options=self.options)
            state = {"model": model_state, "optimizer": optimizer_state}
        failure = None
        try:
            with _quiet_single_process():
                dcp.save(state, checkpoint_id=temporary, no_dist=not _distributed())
            write_atomically(temporary / rank_file(rank), encoded)
        except (OSError, dcp.CheckpointException) as error:
            failure = _short(error)
        self._give_up_if_any(failure, temporary, step)  # a collective: every rank's files are written
        names = sorted(path.name for path in temporary.iterdir() if path.is_file())
        mine = {name: file_digest(temporary / name) for name in names[rank::world_size]}
        files = {name: entry for part in _gather(mine) for name, entry in part.items()}
        if rank == 0:
            manifest = {"format": FORMAT, "step": step, "world_size": world_size, "optimizer_state": not fresh,
                        "files": files}
            try:
                write_atomically(temporary / MANIFEST, json.dumps(manifest, indent=1).encode())
                if final.exists():  # the same step saved again, e.g. by a run restarted before it
                    shutil.rmtree(final)
                os.replace(temporary, final)
                _fsync_folder(self.folder)
                for _, old in self.checkpoints()[self.keep :]:
                    shutil.rmtree(old)
            except OSError as error:
                failure = _short(error)
        self._give_up_if_any(failure, temporary, step)
        return final

    def _give_up_if_any(self, failure: str | None, temporary: Path, step: int) -> None:
        """If any rank's part of a save failed: rank 0 removes the temporary folder, every rank raises."""
        failure = _agreed(failure)
        if failure is None:
            return
        if _rank_and_world()[0] == 0:
            shutil.rmtree(temporary, ignore_errors=True)
        _barrier()
        raise OSError(f"could not write the checkpoint of step {step} in {self.folder}: {failure}")

    # --- loading -----------------------------------------------------------------------

    def verified(self):
        """``(step, manifest)`` of each checkpoint that verifies, newest first (a collective generator).

        Rank 0 reads the manifests; the ranks check the files' sizes and digests round robin.
        Sets ``skipped`` to the checkpoints passed over on the way, newest first.
        """
        rank, world_size = _rank_and_world()
        committed, skipped = [], []
        if rank == 0:
            committed = self.checkpoints()
            newest_committed = committed[0][0] if committed else -1
            skipped = [Skipped(path, "incomplete: the save did not finish (temporary folder)")
                       for step, path in self._matching(TEMPORARY) if step > newest_committed]
        committed, self.skipped = _broadcast((committed, skipped))
        for step, path in committed:
            manifest, reason = None, None
            if rank == 0:
                try:
                    manifest = read_manifest(path, step)
                except ValueError as error:
                    reason = str(error)
            manifest, reason = _broadcast((manifest, reason))
            if manifest is not None:
                names = sorted(manifest["files"])
                reason = _agreed(check_files(path, names[rank::world_size], manifest))
            if reason is None:
                yield step, manifest
            else:
                self.skipped.append(Skipped(path, reason))

    def load_newest(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                    accept: Accept | None = None) -> tuple[int, dict[str, Any]] | None:
        """Load the newest usable checkpoint into ``model`` and ``optimizer`` (a collective).

        Usable: it verifies against its manifest, its metadata and values load safely,
        ``accept(extra)`` (if given) has no objection, its state fits the model and optimizer,
        and its weights and optimizer state are finite. Returns ``(step, extra)``, or ``None``
        when no checkpoint is usable (``skipped`` says why each one present was passed over).
        The model and optimizer are built as for a fresh run (wrapped in DDP, sharded with
        ``fully_shard``, ... for this world size) and have no gradients.
        """
        rank, world_size = _rank_and_world()
        for step, manifest in self.verified():
            folder = self.path(step)
            same_world = manifest["world_size"] == world_size
            payload, reason = None, None
            try:
                payload = read_checkpoint(folder / rank_file(rank if same_world else 0))
                reason = accept(payload["extra"]) if accept is not None else None
                if reason is None:
                    read_metadata(folder, list(manifest["files"]))
            except (CorruptCheckpoint, UnsafeMetadata) as error:
                reason = str(error)
            reason = _agreed(reason)
            if reason is None:
                assert payload is not None  # the ranks agree to go on only when every rank read its payload
                reason = _agreed(self._load_state(folder, manifest, payload, model, optimizer))
            if reason is None:
                found = first_nonfinite(get_state_dict(model, optimizer, options=self.options)
                                        if manifest["optimizer_state"]
                                        else get_model_state_dict(model))
                reason = _agreed(None if found is None else f"non-finite values in {found}")
            if reason is None:
                assert payload is not None  # as above
                if same_world:
                    set_rng_state(payload["rng"])
                return step, payload["extra"]
            self.skipped.append(Skipped(folder, reason))
        return None

    def _load_state(self, folder: Path, manifest: dict[str, Any], payload: dict[str, Any], model: nn.Module,
                    optimizer: torch.optim.Optimizer) -> str | None:
        """Load the model and optimizer state of the checkpoint in ``folder``; the reason it does not fit,
        or ``None``."""
        reader = SafeReader(folder, list(manifest["files"]))
        state: dict[str, Any]
        try:
            if manifest["optimizer_state"]:
                model_state, optimizer_state = get_state_dict(model, optimizer, options=self.options)
                state = {"model": model_state, "optimizer": optimizer_state}
                with _quiet_single_process():
                    dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=not _distributed())
                set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                               options=self.options)
            else:
                state = {"model": get_model_state_dict(model)}
                with _quiet_single_process():
                    dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=not _distributed())
                set_model_state_dict(model, state["model"])
                optimizer.state.clear()
                for group, saved in zip(optimizer.param_groups, payload["param_groups"], strict=True):
                    group.update(saved)
        except (Exception, dcp.CheckpointException) as error:  # whatever does not fit is a reason to skip
            if isinstance(_first_failure(error), UnsafeMetadata):
                return _short(error)
            return f"does not fit this model and optimizer: {_short(error)}"
        return None
