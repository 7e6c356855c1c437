"""Splitting the data by rank: each rank takes its slice of the global batch.

``RankSlice(stream, rank, world_size)`` wraps a stream that draws *global* batches of
``world_size * b`` examples and hands rank ``r`` the rows ``[r b, (r + 1) b)``. Every rank
draws the same global batch (the streams are seeded identically) and keeps its own rows,
so N ranks with per-rank batch b see exactly the examples one process with batch N b
sees: data parallel training equals single-process training on the large batch, and the
stream's position (its checkpoint state) is the same on every rank.
"""

from __future__ import annotations

from typing import Any

from gradwise.problems.data import Batch
from gradwise.problems.workload import DataStream
from gradwise.validation import check_int


class RankSlice:
    """Rank ``rank``'s rows of each global batch drawn from ``stream``."""

    def __init__(self, stream: DataStream, rank: int, world_size: int) -> None:
        self.world_size = check_int("world_size", world_size, 1)
        self.rank = check_int("rank", rank, 0, world_size - 1)
        self.stream = stream

    def next_batch(self) -> Batch:
        inputs, targets = self.stream.next_batch()
        rows = inputs.shape[0]
        if rows % self.world_size:
            raise ValueError(f"the global batch of {rows} rows does not split evenly over {self.world_size} ranks")
        per_rank = rows // self.world_size
        start = self.rank * per_rank
        return inputs[start : start + per_rank], targets[start : start + per_rank]

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)
