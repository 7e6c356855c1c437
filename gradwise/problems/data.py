"""Resumable mini-batch streams: the data position is part of a checkpoint.

A stream hands out one micro-batch per call to :meth:`next_batch` and can say exactly where
it is (``state_dict``) and go back there (``load_state_dict``), so that a resumed run sees
the same batches, in the same order, as a run never interrupted. Each stream's randomness
comes from its own ``torch.Generator`` derived from ``(seed, position)``, never from the
global RNG, so the model's own random draws (dropout) cannot shift the data.
"""

from __future__ import annotations

from typing import Any

import torch

from gradwise.validation import check_int

Batch = tuple[torch.Tensor, torch.Tensor]
"""Inputs and targets."""


def _generator(seed: int, position: int) -> torch.Generator:
    # One generator per (seed, position): the batch at a position does not depend on history.
    return torch.Generator().manual_seed(seed * 1_000_003 + position)


class RandomWindows:
    """Language-model batches: ``batch_size`` windows of ``seq_len + 1`` bytes at random offsets.

    Inputs are the first ``seq_len`` bytes of each window and targets the last ``seq_len``
    (next-byte prediction). The offsets of batch ``n`` are drawn from a generator seeded by
    ``(seed, n)``; the state is the number of batches handed out.
    """

    def __init__(self, tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int = 0) -> None:
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.seq_len = check_int("seq_len", seq_len, 1)
        self.seed = check_int("seed", seed, 0)
        if tokens.numel() < seq_len + 2:
            raise ValueError(f"the text has {tokens.numel()} bytes, fewer than seq_len + 2 = {seq_len + 2}")
        self.tokens = tokens
        self.position = 0

    def next_batch(self) -> Batch:
        high = self.tokens.numel() - self.seq_len - 1
        starts = torch.randint(0, high, (self.batch_size,), generator=_generator(self.seed, self.position))
        self.position += 1
        windows = torch.stack([self.tokens[start : start + self.seq_len + 1] for start in starts.tolist()]).long()
        return windows[:, :-1], windows[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"the checkpoint's data seed is {state['seed']}, this stream's is {self.seed}")
        self.position = check_int("position", state["position"], 0)


class ShuffledEpochs:
    """Classification batches: the examples in a fresh random order each epoch, ``batch_size`` at a time.

    Epoch ``e`` uses the permutation drawn from a generator seeded by ``(seed, e)``; the
    state is the number of examples handed out. A batch that would cross the end of an epoch
    takes the rest of the epoch and continues in the next one, so consecutive batches of
    size ``b`` concatenate to exactly the batch of size ``k b`` (the basis of exact gradient
    accumulation).
    """

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int, seed: int = 0) -> None:
        if inputs.shape[0] != targets.shape[0] or inputs.shape[0] == 0:
            raise ValueError(
                "inputs and targets need the same, non-zero number of rows, "
                f"got {inputs.shape[0]} and {targets.shape[0]}"
            )
        self.inputs, self.targets = inputs, targets
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.seed = check_int("seed", seed, 0)
        self.position = 0

    def _indices(self, start: int, count: int) -> torch.Tensor:
        size = self.inputs.shape[0]
        pieces = []
        while count > 0:
            epoch, offset = divmod(start, size)
            take = min(count, size - offset)
            permutation = torch.randperm(size, generator=_generator(self.seed, epoch))
            pieces.append(permutation[offset : offset + take])
            start, count = start + take, count - take
        return torch.cat(pieces)

    def next_batch(self) -> Batch:
        indices = self._indices(self.position, self.batch_size)
        self.position += self.batch_size
        return self.inputs[indices], self.targets[indices]

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"the checkpoint's data seed is {state['seed']}, this stream's is {self.seed}")
        self.position = check_int("position", state["position"], 0)
