r"""Owner-computes: a whole-matrix optimizer's step on sharded (DTensor) parameters, each matrix on one rank.

Muon's orthogonalisation, Shampoo's, SOAP's, Adafactor's and PSGD-Kron's preconditioners (the param
groups whose update is per matrix, ``GradwiseOptimizer._updates_matrices``; Muon's AdamW groups and
Sophia, whose update is element-wise, are not) read every element of a matrix, so a matrix sharded by FSDP2 (rows,
``Shard(0)``) or by tensor parallelism (rows or columns) must be whole somewhere. Gathering every
matrix on every rank repeats the optimizer's whole compute and state on each of the :math:`N` ranks.
Owner-computes gives each matrix to one rank and runs the optimizer's own update there:

1. **owners**: the matrices are assigned to the ranks by their cost (:func:`matrix_cost`),
   longest first, each to the least loaded rank (Graham's LPT rule, within 4/3 of the best
   makespan; Graham 1969, "Bounds on multiprocessing timing anomalies");
2. **gather**: every rank sends its shard of each matrix and of its gradient to the owner;
3. **compute**: the owner runs the optimizer's update on the whole tensors; their state (Muon's
   momentum, Shampoo's factors, SOAP's bases) is kept whole, on the owner only;
4. **scatter**: the owner sends each rank its shard of the updated matrix.

Steps 2 and 4 are one ``all_to_all_single`` each for all the matrices of a param group (bytes, so
that every dtype shares it): each rank exchanges one message with each other rank per phase
whatever the number of matrices, where a gather and a scatter per matrix would pay the latency once
per matrix and rank. A rank's own shards do not go through the collective.

Cost per step, for matrices of :math:`S` bytes in all (parameters; gradients alike) spread evenly over
the owners: each rank sends :math:`2(N-1)S/N^2` (its shards of the others' matrices, parameter and
gradient) and :math:`(N-1)S/N^2` (its matrices' updated shards), :math:`3(N-1)S/N^2` in all, against
:math:`(N-1)S/N` for an all-gather of every matrix on every rank: less from 4 ranks on, the same at 3,
1.5 times as much at 2. The optimizer's compute and state per rank fall as :math:`1/N` (to the balance
the matrices' sizes allow). The update of each element is the same arithmetic as in one process on
the same whole tensors: equal bit for bit to the unsharded optimizer given the same gradients.

A DTensor on a mesh of more than one dimension (FSDP2 over tensor parallelism) is gathered whole on
every rank instead (``full_tensor``), and every rank computes every matrix and keeps its state; a
replicated DTensor's local tensor is already whole.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor

from gradwise.optim.sharded_formats import is_dtensor, local_gradient


def matrix_cost(shape: tuple[int, ...]) -> float:
    r"""The cost of a whole-matrix update of a parameter of ``shape``, seen as a ``rows x cols`` matrix
    (rows: the first dimension): :math:`r\,c\,\min(r, c)`, the multiply-adds of a product with its Gram
    matrix, which Newton-Schulz iterations and Shampoo's and SOAP's factors are made of."""
    if not shape:
        return 1.0
    rows = shape[0]
    cols = math.prod(shape[1:]) if len(shape) > 1 else 1
    return float(rows * cols * max(1, min(rows, cols)))


def assign_owners(costs: list[float], ranks: int) -> list[int]:
    """The rank that computes each item of ``costs``: longest first, each to the least loaded rank
    (ties: the lower index, the lower rank), so every rank computes the same assignment."""
    if ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    loads = [0.0] * ranks
    owners = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        owner = min(range(ranks), key=lambda rank: (loads[rank], rank))
        owners[index] = owner
        loads[owner] += costs[index]
    return owners


def chunk_bounds(size: int, parts: int) -> list[tuple[int, int]]:
    """Where each of ``parts`` ranks' shard of a dimension of ``size`` lies, as ``torch.chunk`` (and
    DTensor's ``Shard``) cut it: shards of ``ceil(size / parts)``, the last ones shorter or empty."""
    step = -(-size // parts) if size else 0
    return [(min(rank * step, size), min((rank + 1) * step, size)) for rank in range(parts)]


@dataclass
class _Sharded:
    """One DTensor parameter on a 1-D mesh, sharded along ``dim``, and its gradient's local shard."""

    param: Any
    grad: Tensor
    dim: int
    bounds: list[tuple[int, int]]
    owner: int = 0
    whole: Tensor | None = None  # the gathered whole tensor, on its owner

    def shard_shape(self, rank: int) -> tuple[int, ...]:
        shape = list(self.param.shape)
        start, stop = self.bounds[rank]
        shape[self.dim] = stop - start
        return tuple(shape)

    def shard_numel(self, rank: int) -> int:
        return math.prod(self.shard_shape(rank))


def _as_bytes(tensor: Tensor) -> Tensor:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def _from_bytes(data: Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
    return data.view(dtype).view(shape)


def _exchange(sends: list[list[Tensor]], receive_bytes: list[int], group: Any, rank: int) -> list[Tensor]:
    """One ``all_to_all_single`` of bytes: ``sends[q]`` (tensors) to rank ``q``, ``receive_bytes[k]`` from
    rank ``k``; returns what each rank sent, as bytes (nothing to or from this rank itself)."""
    parts = [[_as_bytes(t) for t in tensors] if q != rank else [] for q, tensors in enumerate(sends)]
    send_sizes = [sum(part.numel() for part in tensors) for tensors in parts]
    flat = [part for tensors in parts for part in tensors]
    send = torch.cat(flat) if flat else torch.empty(0, dtype=torch.uint8)
    receive_sizes = [size if k != rank else 0 for k, size in enumerate(receive_bytes)]
    received = torch.empty(sum(receive_sizes), dtype=torch.uint8)
    dist.all_to_all_single(received, send, receive_sizes, send_sizes, group=group)
    return list(received.split(receive_sizes))


class WholeTensors:
    """One param group's step on whole tensors (see the module): :meth:`enter` returns the tensors to
    update, plain and whole, that this rank computes; :meth:`leave` writes the results back into every
    rank's shards. ``owners`` maps each whole tensor to its DTensor parameter (whose state it uses).
    ``state`` is the optimizer's: a matrix another rank owns has an empty state here, which says that
    this rank steps it (a checkpoint's loader expects an entry for every parameter of every rank)."""

    def __init__(self, params: list[Tensor], grads: list[Tensor], owners: dict[Tensor, Tensor],
                 state: MutableMapping[Tensor, Any]) -> None:
        self.params, self.grads, self.owners, self.state = params, grads, owners, state
        self.sharded: dict[Any, list[_Sharded]] = {}  # mesh -> its 1-D sharded parameters
        self.gathered: list[tuple[Any, Tensor]] = []  # (DTensor, whole tensor) gathered on every rank

    def enter(self) -> tuple[list[Tensor], list[Tensor]]:
        plain_params: list[Tensor] = []
        plain_grads: list[Tensor] = []
        for param, grad in zip(self.params, self.grads):
            if not is_dtensor(param):
                plain_params.append(param)
                plain_grads.append(grad)
                continue
            mesh, placements = param.device_mesh, param.placements
            shard_dims = [cast(Any, p).dim for p in placements if p.is_shard()]
            if mesh.ndim == 1 and not shard_dims:  # replicated: the local tensor is the whole one
                self._add(plain_params, plain_grads, param, param.to_local(), local_gradient(param, grad))
            elif mesh.ndim == 1 and placements[0].is_shard():
                self.sharded.setdefault(mesh, []).append(
                    _Sharded(param, local_gradient(param, grad), shard_dims[0],
                             chunk_bounds(param.shape[shard_dims[0]], mesh.size())))
            else:  # a mesh of several dimensions: whole on every rank
                whole = param.full_tensor()
                self.gathered.append((param, whole))
                self._add(plain_params, plain_grads, param, whole, cast(Any, grad).full_tensor())
        for mesh, items in self.sharded.items():
            self._gather(mesh, items, plain_params, plain_grads)
        return plain_params, plain_grads

    def _add(self, params: list[Tensor], grads: list[Tensor], owner: Tensor, whole: Tensor, grad: Tensor) -> None:
        self.owners[whole] = owner
        params.append(whole)
        grads.append(grad)

    def _gather(self, mesh: Any, items: list[_Sharded], params: list[Tensor], grads: list[Tensor]) -> None:
        ranks, rank, group = mesh.size(), mesh.get_local_rank(), mesh.get_group()
        for item in items:
            local = item.param.to_local()
            if tuple(local.shape) != item.shard_shape(rank):
                raise RuntimeError(f"a parameter of shape {tuple(item.param.shape)} holds a shard of shape "
                                   f"{tuple(local.shape)} on rank {rank}, where torch.chunk's cut gives "
                                   f"{item.shard_shape(rank)}: owner-computes needs that cut")
        for item, owner in zip(items, assign_owners([matrix_cost(tuple(i.param.shape)) for i in items], ranks)):
            item.owner = owner
        mine = [item for item in items if item.owner == rank]
        for item in items:
            if item.owner != rank:
                self.state.setdefault(item.param, {})
        sends = [[t for item in items if item.owner == q for t in (item.param.to_local(), item.grad)]
                 for q in range(ranks)]
        receive = [sum(item.shard_numel(k) * (item.param.element_size() + item.grad.element_size()) for item in mine)
                   for k in range(ranks)]
        received = _exchange(sends, receive, group, rank)
        offsets = [0] * ranks
        for item in mine:
            pieces: dict[str, list[Tensor]] = {"param": [], "grad": []}
            for k in range(ranks):
                for name, dtype, local in (("param", item.param.dtype, item.param.to_local()),
                                           ("grad", item.grad.dtype, item.grad)):
                    if k == rank:
                        pieces[name].append(local)
                        continue
                    size = item.shard_numel(k) * dtype.itemsize
                    pieces[name].append(_from_bytes(received[k][offsets[k] : offsets[k] + size], dtype,
                                                    item.shard_shape(k)))
                    offsets[k] += size
            item.whole = torch.cat(pieces["param"], dim=item.dim)
            self._add(params, grads, item.param, item.whole, torch.cat(pieces["grad"], dim=item.dim))

    def leave(self) -> None:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        for param, whole in self.gathered:
            shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
            local = param.to_local()
            local.copy_(whole[tuple(slice(o, o + s) for o, s in zip(offset, shape))])
        for mesh, items in self.sharded.items():
            self._scatter(mesh, items)

    def _scatter(self, mesh: Any, items: list[_Sharded]) -> None:
        ranks, rank, group = mesh.size(), mesh.get_local_rank(), mesh.get_group()

        def shard(item: _Sharded, k: int) -> Tensor:
            start, stop = item.bounds[k]
            return cast(Tensor, item.whole).narrow(item.dim, start, stop - start)

        mine = [item for item in items if item.owner == rank]
        sends = [[shard(item, q) for item in mine] for q in range(ranks)]
        receive = [sum(item.shard_numel(rank) * item.param.element_size() for item in items if item.owner == k)
                   for k in range(ranks)]
        received = _exchange(sends, receive, group, rank)
        offsets = [0] * ranks
        for item in items:
            local = item.param.to_local()
            if item.owner == rank:
                local.copy_(shard(item, rank))
                continue
            size = local.numel() * local.element_size()
            k = item.owner
            local.copy_(_from_bytes(received[k][offsets[k] : offsets[k] + size], local.dtype, tuple(local.shape)))
            offsets[k] += size


@contextmanager
def whole_tensors(params: list[Tensor], grads: list[Tensor], owners: dict[Tensor, Tensor],
                  state: MutableMapping[Tensor, Any]) -> Iterator[tuple[list[Tensor], list[Tensor]]]:
    """The tensors of a whole-matrix update on ``params`` that may be DTensors (see the module): yields
    the plain, whole tensors this rank computes and their gradients (the others' computed elsewhere);
    on leaving, every rank's shards hold the updated values. A collective over each DTensor's mesh:
    every rank of it must step the same parameters. ``state``: the optimizer's (see :class:`WholeTensors`)."""
    step = WholeTensors(params, grads, owners, state)
    tensors = step.enter()
    try:
        yield tensors
    finally:  # an update that failed on one owner still takes part in the exchange the others wait in
        step.leave()

