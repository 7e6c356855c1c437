"""Device meshes and gradient averaging over a mesh dimension: the model-agnostic half of 2-D parallelism.

A ``(dp, tp)`` mesh (:func:`data_tensor_mesh`) crosses data parallelism with a model-parallel
plan such as :func:`gradwise.problems.tiny_gpt_tensor_parallel.parallelize_tiny_gpt`: each row
of the mesh is one model replica fed its slice of the global batch
(:class:`~gradwise.distributed.data.RankSlice` with the dp rank), and
:func:`average_gradients` averages the gradients' local shards over the dp group before the
optimizer step, which then equals the step of one process on the global batch. Nothing here
knows the model, so these helpers live with the distributed infrastructure rather than
beside a model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from gradwise.validation import check_int


def data_tensor_mesh(dp: int, tp: int, device_type: str = "cpu") -> DeviceMesh:
    """The ``(dp, tp)`` mesh with dimensions named ``"dp"`` and ``"tp"``: ranks ``r tp .. r tp + tp - 1``
    form tensor-parallel group ``r``. The world size must be ``dp * tp``."""
    check_int("dp", dp, 1)
    check_int("tp", tp, 1)
    world_size = dist.get_world_size()
    if dp * tp != world_size:
        raise ValueError(f"dp x tp must equal the world size, got dp={dp}, tp={tp} for world size {world_size}")
    return init_device_mesh(device_type, (dp, tp), mesh_dim_names=("dp", "tp"))


def pipeline_data_tensor_mesh(pp: int, dp: int, tp: int, device_type: str = "cpu") -> DeviceMesh:
    """The ``(pp, dp, tp)`` mesh with dimensions named ``"pp"``, ``"dp"`` and ``"tp"`` (Narayanan et al.
    2021's layout, arXiv:2104.04473): tensor-parallel groups are consecutive ranks (the fastest links on
    a real machine), rank ``r`` is stage ``r // (dp tp)``, replica ``(r // tp) % dp``, shard ``r % tp``.
    The world size must be ``pp * dp * tp``."""
    for name, size in (("pp", pp), ("dp", dp), ("tp", tp)):
        check_int(name, size, 1)
    world_size = dist.get_world_size()
    if pp * dp * tp != world_size:
        raise ValueError(f"pp x dp x tp must equal the world size, got pp={pp}, dp={dp}, tp={tp} for world size "
                         f"{world_size}")
    return init_device_mesh(device_type, (pp, dp, tp), mesh_dim_names=("pp", "dp", "tp"))


@torch.no_grad()
def average_gradients(model: nn.Module, dp_mesh: DeviceMesh) -> None:
    """Average every gradient over the data-parallel ``dp_mesh`` (one-dimensional), in place.

    A ``DTensor`` gradient's local shard is averaged with the shards of the same
    coordinate in the other replicas; all gradients travel in one flat all-reduce per dtype.
    """
    if dp_mesh.ndim != 1:
        raise ValueError(f"dp_mesh must be one-dimensional, got a mesh of shape {tuple(dp_mesh.shape)}")
    locals_by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for param in model.parameters():
        if param.grad is not None:
            grad = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
            locals_by_dtype.setdefault(grad.dtype, []).append(grad)
    for grads in locals_by_dtype.values():
        flat = torch.cat([grad.reshape(-1) for grad in grads])
        dist.all_reduce(flat, group=dp_mesh.get_group())
        flat /= dp_mesh.size()
        for grad, average in zip(grads, flat.split([grad.numel() for grad in grads])):
            grad.copy_(average.view_as(grad))
