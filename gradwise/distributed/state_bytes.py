"""How many bytes of optimizer state this process holds.

ZeRO and FSDP exist to divide this number by the number of ranks, so it is counted
exactly, from the state tensors themselves: every tensor in ``optimizer.state`` (moments,
momentum buffers, preconditioner factors and their roots, step counters), looking into
lists, tuples and dicts. A DTensor (an FSDP2-sharded parameter's state) counts only its
local shard, the part that occupies this process's memory.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gradwise.optim.sharded_formats import is_dtensor


def tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in ``value`` (a tensor, or lists/tuples/dicts of them); a DTensor
    counts its local shard. Anything else (ints, floats, strings) counts zero."""
    if isinstance(value, Tensor):
        if is_dtensor(value):
            value = value.to_local()
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(item) for item in value)
    return 0


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` held by this process (see the module doc)."""
    return sum(tensor_bytes(state) for state in optimizer.state.values())
