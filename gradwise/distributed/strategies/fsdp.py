r"""ZeRO stage 3 through FSDP2: parameters, gradients and optimizer state all sharded.

Rajbhandari et al. 2020 (arXiv:1910.02054), :math:`P_{os+g+p}`; Zhao et al. 2023, "PyTorch
FSDP: Experiences on Scaling Fully Sharded Data Parallel" (arXiv:2304.11277).
``torch.distributed.fsdp.fully_shard`` turns every parameter into a DTensor sharded along
dim 0 over the ranks (``Shard(0)``): rank :math:`r` stores rows
:math:`[r\lceil d_0/N\rceil, (r+1)\lceil d_0/N\rceil)`. Before a module's forward (and
backward) its parameters are all-gathered; after backward its gradients are
reduce-scattered, averaged, so each rank holds the gradient of its shard only, as a DTensor
like the parameter. An optimizer built afterwards on ``model.parameters()`` therefore keeps
state shaped like the shards: :math:`1/N` of the unsharded state.

``reshard_after_forward=True`` frees the gathered parameters after each forward and
gathers them again for backward (ZeRO-3: parameters sharded between uses);
``False`` keeps them until after backward (ZeRO-2's memory for parameters, one all-gather
fewer per step).

gradwise's element-wise optimizers run on DTensor parameters through DTensor's
element-wise rules (each rank updates its shard); the whole-matrix ones (Muon, Shampoo,
SOAP, Adafactor, PSGD-Kron) compute each matrix on one owner rank, which keeps its state
(:mod:`gradwise.optim.owner_computes`).

Example (every rank runs this)::

    model = shard_model(TinyGPT(...), reshard_after_forward=True)
    opt = gradwise.optim.AdamW(model.parameters(), lr=3e-4)
    next_byte_loss(model, batch).backward(); opt.step(); opt.zero_grad()
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard


def shard_model(model: nn.Module, *, reshard_after_forward: bool = True, mesh: Any = None) -> nn.Module:
    """Shard ``model`` in place with FSDP2 and return it.

    Each child of every ``nn.ModuleList`` (a transformer's blocks) becomes its own FSDP unit,
    so only one block's parameters are gathered at a time; the root takes the rest
    (embeddings, final norm, a tied output head). ``mesh`` is a 1-D ``DeviceMesh`` over the
    ranks that share the model (default: all ranks, on the device type of the model's
    parameters).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if mesh is None:
        mesh = init_device_mesh(next(model.parameters()).device.type, (dist.get_world_size(),))
    blocks = [block for module in model.modules() if isinstance(module, nn.ModuleList) for block in module]
    for block in reversed(blocks):  # innermost first: FSDP2 shards children before their parents
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model
