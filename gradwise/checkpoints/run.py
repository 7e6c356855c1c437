"""Where a training run's checkpoints go on N processes: replicated, consolidated, per rank, or sharded.

The loop saves ``(step, model, optimizer, extra)`` and resumes with ``load_newest() ->
(step, extra) | None``, which loads the model and optimizer in place (``extra`` is the rest
of the run's state: scheduler, guard, data position, generators). ``skipped`` lists the
checkpoints passed over, with the reason. Four layouts, by what the ranks hold:

* :class:`ReplicatedCheckpoints`: every rank holds the same parameters and optimizer state
  (one process, DDP, local SGD at its synchronisation points): rank 0 writes the usual
  checksummed file (:class:`gradwise.checkpoints.atomic.CheckpointManager`) and every rank
  reads it back.
* :class:`ConsolidatedCheckpoints`: the parameters are replicated but the optimizer state
  is split over the ranks (ZeRO stages 1 and 2): the ranks gather it into the unsharded
  optimizer's state_dict, rank 0 writes the same file as above, and every rank keeps its
  part on loading, so N processes write what M processes (or one, unsharded) load.
* :class:`PerRankCheckpoints`: each rank holds state of its own (pipeline stages, local
  SGD's replicas between synchronisations): every rank writes its own file in
  ``rank-00000/`` and the run resumes from the newest step that verifies on every rank
  (same world size).
* :class:`ShardedRunCheckpoints`: DTensor parameters (FSDP2, tensor parallel): one
  ``torch.distributed.checkpoint`` folder written by all ranks
  (:class:`gradwise.checkpoints.sharded.ShardedCheckpoints`), loadable with another
  world size.

Every layout loads the same way: newest first, a checkpoint is used only if it verifies,
the caller's ``accept(extra)`` has no objection (the training loop compares the settings
it was written under), its state fits the model and optimizer, and its weights and
optimizer state are finite; otherwise it is skipped with the reason and the next older
one is tried. A failed save (a full disk) raises one ``OSError`` on every rank.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, cast

import torch
import torch.distributed as dist
from torch import nn

from gradwise.checkpoints.atomic import (
    Accept,
    CheckpointManager,
    CorruptCheckpoint,
    Skipped,
    first_nonfinite,
    read_checkpoint,
)


def _usable(payload: dict[str, Any], accept: Accept | None) -> str | None:
    """Why a decoded single-file checkpoint cannot be used (before loading it), or ``None``."""
    reason = accept({key: value for key, value in payload.items() if key not in ("model", "optimizer")}) \
        if accept is not None else None
    if reason is None and (found := first_nonfinite({"model": payload.get("model"),
                                                    "optimizer": payload.get("optimizer")})) is not None:
        reason = f"non-finite values in {found}"
    return reason


class ReplicatedCheckpoints:
    """Rank 0 writes model, optimizer and ``extra`` in one file; every rank reads it."""

    def __init__(self, folder: str | Path, keep: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                 rank: int = 0, world_size: int = 1) -> None:
        self.manager = CheckpointManager(folder, keep)
        self.model, self.optimizer = model, optimizer
        self.rank, self.world_size = rank, world_size
        self.skipped: list[Skipped] = []

    def save(self, step: int, extra: dict[str, Any]) -> None:
        optimizer_state = self._optimizer_state()
        failure = None
        if self.rank == 0:
            try:
                self.manager.save(step, {"step": step, "model": self.model.state_dict(),
                                         "optimizer": optimizer_state, **extra})
            except OSError as error:
                failure = str(error)
        if self.world_size > 1:  # no rank reads (a rollback) before the file is on disk; all hear of a failure
            box = [failure]
            dist.broadcast_object_list(box, src=0)
            failure = box[0]
        if failure is not None:
            raise OSError(failure)

    def load_newest(self, accept: Accept | None = None) -> tuple[int, dict[str, Any]] | None:
        """The newest usable checkpoint loaded into the model and optimizer: ``(step, extra)``, or ``None``.

        Every rank reads the same file and so reaches the same verdicts.
        """
        self.skipped = []
        for _, path in self.manager.checkpoints():
            try:
                state = read_checkpoint(path)
                reason = _usable(state, accept) or self._load(state)
            except CorruptCheckpoint as error:
                reason = str(error)
            if reason is None:
                return state.pop("step"), state
            self.skipped.append(Skipped(path, reason))
        return None

    def _load(self, state: dict[str, Any]) -> str | None:
        """Load the model and optimizer from ``state`` (popping them); the reason it does not fit, or ``None``."""
        try:
            self.model.load_state_dict(state.pop("model"))
            self._load_optimizer(state.pop("optimizer"))
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as error:
            return f"does not fit this model and optimizer: {str(error).strip().splitlines()[0]}"
        return None

    def _optimizer_state(self) -> dict[str, Any] | None:
        """The optimizer's state_dict on rank 0 (the one that writes)."""
        return self.optimizer.state_dict() if self.rank == 0 else None

    def _load_optimizer(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)


class Consolidating(Protocol):
    """What :class:`ConsolidatedCheckpoints` needs of its optimizer (a ``ZeroOptimizer``, which this
    layer may not import): its sharded state gathered whole, and loaded back from the whole."""

    def consolidated_state_dict(self) -> dict[str, Any]: ...

    def load_consolidated_state_dict(self, state: dict[str, Any]) -> None: ...


class ConsolidatedCheckpoints(ReplicatedCheckpoints):
    """A :class:`gradwise.distributed.strategies.zero_optimizer.ZeroOptimizer`'s shards gathered into the unsharded
    state_dict (a collective on every save), written by rank 0; each rank keeps its part on load."""

    def _optimizer_state(self) -> dict[str, Any]:
        return cast(Consolidating, self.optimizer).consolidated_state_dict()  # the ZeRO strategy's ZeroOptimizer

    def _load_optimizer(self, state: dict[str, Any]) -> None:
        cast(Consolidating, self.optimizer).load_consolidated_state_dict(state)  # as above


class PerRankCheckpoints(ReplicatedCheckpoints):
    """Every rank writes its own file (``folder/rank-00003/step-00000100.ckpt``); resume needs the same world size."""

    def __init__(self, folder: str | Path, keep: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                 rank: int, world_size: int) -> None:
        super().__init__(Path(folder) / f"rank-{rank:05d}", keep, model, optimizer, rank, world_size)

    def save(self, step: int, extra: dict[str, Any]) -> None:
        failure = None
        try:
            self.manager.save(step, {"step": step, "model": self.model.state_dict(),
                                     "optimizer": self.optimizer.state_dict(), **extra})
        except OSError as error:
            failure = str(error)
        failures = [None] * self.world_size
        dist.all_gather_object(failures, failure)
        if (first := next((found for found in failures if found), None)) is not None:
            raise OSError(first)

    def load_newest(self, accept: Accept | None = None) -> tuple[int, dict[str, Any]] | None:
        """The newest step usable on every rank, loaded; ``None`` if there is none."""
        valid: dict[int, dict[str, Any]] = {}
        self.skipped = []
        for step, path in self.manager.checkpoints():
            try:
                state = read_checkpoint(path)
                reason = _usable(state, accept)
            except CorruptCheckpoint as error:
                reason = str(error)
            if reason is None:
                valid[step] = state
            else:
                self.skipped.append(Skipped(path, reason))
        everyone: list[list[int]] = [[] for _ in range(self.world_size)]
        dist.all_gather_object(everyone, sorted(valid))
        common = set.intersection(*(set(steps) for steps in everyone))
        for step in sorted(set(valid) - common, reverse=True):
            self.skipped.append(Skipped(self.manager.path(step), "not valid on every rank"))
        for step in sorted(common, reverse=True):
            state = valid[step]
            reasons: list[str | None] = [None] * self.world_size
            dist.all_gather_object(reasons, self._load(state))
            if (reason := next((found for found in reasons if found), None)) is None:
                return state.pop("step"), state
            self.skipped.append(Skipped(self.manager.path(step), reason))
        return None


class ShardedRunCheckpoints:
    """``ShardedCheckpoints`` bound to the run's model and optimizer (every call is a collective)."""

    def __init__(self, folder: str | Path, keep: int, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 stages: bool = False) -> None:
        # imported when a sharded run builds it: the other layouts need not load torch.distributed.checkpoint
        from gradwise.checkpoints.sharded import ShardedCheckpoints

        self.checkpoints = ShardedCheckpoints(folder, keep, stages=stages)
        self.model, self.optimizer = model, optimizer

    @property
    def skipped(self) -> list[Skipped]:
        return self.checkpoints.skipped

    def save(self, step: int, extra: dict[str, Any]) -> None:
        self.checkpoints.save(step, self.model, self.optimizer, extra)

    def load_newest(self, accept: Accept | None = None) -> tuple[int, dict[str, Any]] | None:
        return self.checkpoints.load_newest(self.model, self.optimizer, accept)
