r"""State formats on sharded parameters (FSDP2's and tensor parallelism's DTensors): blocks inside a shard.

An element-wise optimizer (Adam, AdamW, Lion, SGD) updates each rank's local shard of a DTensor
parameter from the local shard of its gradient alone, so under a ``state_format`` each rank keeps
the moments of its own shard in the format, quantised in blocks that lie inside the shard (the
shard's values in row-major order, blocks of 256 for 8 bits): no scale spans two ranks, and the
step needs no communication. The state stays keyed by the DTensor parameter, as plain tensors of
the local shard's size: 1/N of the unsharded state, plus at most one partly filled block per
tensor and rank. An optimizer whose update needs whole matrices (Muon) is refused: its momentum is
whole, on the matrix's owner (:mod:`gradwise.optim.owner_computes`), which the sharded checkpoints
below, holding a moment as shards of its parameter, do not describe.

Checkpoints: a rank's codes and block scales have no meaning on another mesh (the blocks follow
the shards), so :func:`as_dtensor_moments` presents each formatted moment of a DTensor parameter in
``state_dict()`` as a DTensor of its decoded values (float32), placed like the parameter, which
``torch.distributed.checkpoint`` saves as one global tensor and loads into any world size; a signed
quantised moment also presents its scales, one per value (its block's, a parameter-shaped DTensor).
:func:`encode_dtensor_moments` quantises the loaded values back into the format, blocked by the new
shards. On the same mesh the round trip is exact: every block's per-value scales are its stored
scale, which the codes are recomputed against (each decoded value is its code times that scale);
an unsigned moment needs none, as its map holds 1 (a block's or row's largest value decodes to its
scale, which re-quantising finds again), while the signed 8-bit map's most negative value is
-0.993, so a block led by a negative value would come back with a smaller scale. On another mesh,
a block that spans values of two old blocks is quantised afresh (the values move by at most the
format's rounding). bf16 values are exact in float32.
"""

from __future__ import annotations

import sys
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any, TypeGuard, cast

import torch
from torch import Tensor

from gradwise.optim.state_formats import ABSMAX_SUFFIX, BLOCK, BLOCK_4BIT, FormattedState

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


def is_dtensor(tensor: Any) -> TypeGuard[DTensor]:
    """Whether ``tensor`` is a DTensor (a parameter sharded by FSDP2 or tensor parallelism).

    Looked up in ``sys.modules`` so that optimizers do not import ``torch.distributed.tensor``
    (0.7 s): no DTensor can exist before that module is loaded.
    """
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def local_gradient(param: DTensor, grad: Tensor) -> Tensor:
    """The local shard of ``grad``, placed as ``param`` is (a pending reduction is reduced first)."""
    sharded_grad = cast("DTensor", grad)
    if tuple(sharded_grad.placements) != tuple(param.placements):
        sharded_grad = sharded_grad.redistribute(param.device_mesh, param.placements)
    return cast(Tensor, sharded_grad.to_local())


def local_shards(params: list[Tensor], grads: list[Tensor],
                 owners: dict[Tensor, Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Each DTensor parameter replaced by its local shard (the tensor its storage is, under
    ``no_grad``) and its gradient by the gradient's local shard, placed as the parameter is; each
    shard's owner recorded in ``owners`` so that its state is the parameter's."""
    shards, shard_grads = [], []
    for param, grad in zip(params, grads, strict=True):
        if is_dtensor(param):
            local = param.to_local()
            owners[local] = param
            shards.append(local)
            shard_grads.append(local_gradient(param, grad))
        else:
            shards.append(param)
            shard_grads.append(grad)
    return shards, shard_grads


def _block(state_format: str) -> int:
    return BLOCK if state_format == "8bit" else BLOCK_4BIT


def _as_dtensor(local: Tensor, param: DTensor) -> DTensor:
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                              stride=param.stride())


def _presented(stored: MutableMapping, param: DTensor, state_format: str, signs: dict[str, bool],
               key: str) -> dict[str, DTensor]:
    """Moment ``key`` of ``param`` as a DTensor of its values and, for a signed quantised moment, its
    scales per value."""
    local = param.to_local()
    dtype = torch.promote_types(local.dtype, torch.float32)
    values = FormattedState(stored, state_format, signs, dtype, tuple(local.shape)).decode(key)
    presented = {key: _as_dtensor(values, param)}
    if signs[key] and state_format in ("8bit", "4bit"):
        per_value = stored[key + ABSMAX_SUFFIX].repeat_interleave(_block(state_format))[: local.numel()]
        presented[key + ABSMAX_SUFFIX] = _as_dtensor(per_value.view(local.shape), param)
    return presented


def as_dtensor_moments(state: dict[int, dict[str, Any]], groups: list[dict[str, Any]], params: list[Tensor],
                       signs: dict[str, bool]) -> None:
    """In ``state`` (a ``state_dict()``'s, indexed like ``params``, the flattened ``groups``), each
    formatted moment of a DTensor parameter presented as a DTensor of its values (and scales, see
    :func:`_presented`), its block scales dropped; the entries are new dicts (they are the
    optimizer's own state otherwise)."""
    index = 0
    for group in groups:
        state_format = group.get("state_format", "fp32")
        for _ in group["params"]:
            param, entry = params[index], state.get(index)
            if state_format != "fp32" and entry is not None and is_dtensor(param):
                moments: dict[str, Any] = {}
                for key in signs:
                    if key in entry:
                        moments |= _presented(entry, param, state_format, signs, key)
                state[index] = {key: value for key, value in entry.items()
                                if not key.endswith(ABSMAX_SUFFIX) and key not in moments} | moments
            index += 1


def _block_scales(per_value: Tensor, block: int) -> Tensor | None:
    """The scale of each block of ``block`` values if ``per_value`` is constant within every block
    (the mesh the scales were written on cut the same blocks), else ``None``."""
    flat = per_value.reshape(-1)
    scales = flat[::block]
    return scales if torch.equal(scales.repeat_interleave(block)[: flat.numel()], flat) else None


def encode_dtensor_moments(stored: MutableMapping, param: DTensor, state_format: str, signs: dict[str, bool]) -> None:
    """The moments of DTensor parameter ``param`` that a checkpoint loaded as DTensors (see
    :func:`as_dtensor_moments`) quantised back into ``state_format`` from their local shards, against
    their own block scales where the blocks are the ones they were written in."""
    local = param.to_local()
    view = FormattedState(stored, state_format, signs, local.dtype, tuple(local.shape))
    for key in signs:
        value, per_value = stored.get(key), stored.get(key + ABSMAX_SUFFIX)
        if not is_dtensor(value):
            continue
        del stored[key]
        block_scales = None
        if is_dtensor(per_value):
            del stored[key + ABSMAX_SUFFIX]
            block_scales = _block_scales(_local(per_value, param), _block(state_format))
        view.encode(key, _local(value, param), block_scales)


def _local(value: DTensor, param: DTensor) -> Tensor:
    return value.redistribute(param.device_mesh, param.placements).to_local()
