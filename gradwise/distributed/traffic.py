"""Bytes a process hands to ``torch.distributed`` collectives, counted as they run.

:class:`TrafficMeter` is a ``TorchDispatchMode``: every collective issued inside its
``with`` block, by Python code, by DDP's reducer, by FSDP2 or by DTensor, passes through
the dispatcher as a ``c10d`` or ``_c10d_functional`` operator and is recorded. For each call
it keeps the *payload*: the bytes this rank contributes (the tensor reduced or broadcast,
its shard for an all-gather, the whole input of a reduce-scatter, the message of a
send/recv); and the bytes a ring algorithm puts on this rank's link for it (Patarasuk &
Yuan 2009; Thakur et al. 2005), with N ranks in the group and payload S:

    all-reduce       2 (N - 1) / N * S
    all-gather       (N - 1) * S          (S: this rank's shard)
    reduce-scatter   (N - 1) / N * S      (S: the whole input)
    broadcast        S (sent by the root, received by the others)
    send / recv      S
    all-to-all       S                    (S: the whole input, what this rank sends to the others;
                                           gradwise's own all-to-alls send nothing to their sender)

The payload is what strategies are compared by ("DiLoCo communicates H times fewer bytes
than DDP"); the ring bytes are what a bandwidth model charges for.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field

import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from gradwise.distributed.state_bytes import tensor_bytes

ALL_REDUCE, ALL_GATHER, REDUCE_SCATTER, BROADCAST, POINT_TO_POINT, ALL_TO_ALL = (
    "all-reduce", "all-gather", "reduce-scatter", "broadcast", "send/recv", "all-to-all")

COLLECTIVES: dict[str, tuple[str, int]] = {
    # operator -> (kind, index of the argument holding this rank's payload)
    "c10d.allreduce_": (ALL_REDUCE, 0),
    "c10d.allreduce_coalesced_": (ALL_REDUCE, 0),
    "c10d.broadcast_": (BROADCAST, 0),
    "c10d._allgather_base_": (ALL_GATHER, 1),
    "c10d.allgather_": (ALL_GATHER, 1),
    "c10d.allgather_into_tensor_coalesced_": (ALL_GATHER, 1),
    "c10d._reduce_scatter_base_": (REDUCE_SCATTER, 1),
    "c10d.reduce_scatter_": (REDUCE_SCATTER, 1),
    "c10d.reduce_scatter_tensor_coalesced_": (REDUCE_SCATTER, 1),
    "c10d.send": (POINT_TO_POINT, 0),
    "c10d.alltoall_base_": (ALL_TO_ALL, 1),
    "c10d.recv_": (POINT_TO_POINT, 0),
    "_c10d_functional.all_reduce": (ALL_REDUCE, 0),
    "_c10d_functional.all_reduce_": (ALL_REDUCE, 0),
    "_c10d_functional.all_reduce_coalesced": (ALL_REDUCE, 0),
    "_c10d_functional.broadcast": (BROADCAST, 0),
    "_c10d_functional.all_gather_into_tensor": (ALL_GATHER, 0),
    "_c10d_functional.all_gather_into_tensor_coalesced": (ALL_GATHER, 0),
    "_c10d_functional.reduce_scatter_tensor": (REDUCE_SCATTER, 0),
    "_c10d_functional.reduce_scatter_tensor_coalesced": (REDUCE_SCATTER, 0),
}


NOT_COLLECTIVES = ("_c10d_functional.wait_tensor", "_c10d_functional._wrap_tensor_autograd", "c10d.barrier",
                   "c10d.monitored_barrier_")
"""``c10d`` operators that move no payload: waits, barriers, and the autograd wrapper of a functional
collective's result (the collective itself is counted)."""


def _has_dtensor(types) -> bool:
    """Whether a DTensor takes part in the operator (its module is loaded once any DTensor exists)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and any(issubclass(kind, module.DTensor) for kind in types)


def ring_bytes(kind: str, payload: int, ranks: int) -> float:
    """Bytes on this rank's link for one collective of ``payload`` bytes over ``ranks`` ranks (see the module)."""
    if ranks <= 1:
        return 0.0
    if kind == ALL_REDUCE:
        return 2 * (ranks - 1) / ranks * payload
    if kind == ALL_GATHER:
        return (ranks - 1) * payload
    if kind == REDUCE_SCATTER:
        return (ranks - 1) / ranks * payload
    return float(payload)


@dataclass
class TrafficMeter(TorchDispatchMode):
    """Counts the collectives run inside ``with TrafficMeter() as meter:`` (see the module docstring).

    ``ranks`` is the group size used for the ring model (default: the world size).
    Unknown ``c10d`` operators are counted in ``unknown`` by name, so nothing passes unseen.
    """

    ranks: int | None = None
    payload_bytes: int = 0
    ring_link_bytes: float = 0.0
    calls: Counter = field(default_factory=Counter)
    payload_by_kind: Counter = field(default_factory=Counter)
    unknown: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        super().__init__()

    def __enter__(self) -> TrafficMeter:
        if self.ranks is None:
            self.ranks = dist.get_world_size() if dist.is_initialized() else 1
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _has_dtensor(types):
            # let DTensor run first: it desugars the operator into the collectives it needs (the backward
            # all-reduces of tensor parallelism among them), which then come back through this mode
            return NotImplemented
        name = str(func.overloadpacket)
        if name in COLLECTIVES:
            kind, index = COLLECTIVES[name]
            payload = tensor_bytes(args[index])
            self.calls[kind] += 1
            self.payload_by_kind[kind] += payload
            self.payload_bytes += payload
            self.ring_link_bytes += ring_bytes(kind, payload, self.ranks)
        elif name.startswith(("c10d.", "_c10d_functional.")) and name not in NOT_COLLECTIVES:
            self.unknown[name] += 1
        return func(*args, **(kwargs or {}))

    def reset(self) -> None:
        self.payload_bytes, self.ring_link_bytes = 0, 0.0
        self.calls.clear()
        self.payload_by_kind.clear()
        self.unknown.clear()
