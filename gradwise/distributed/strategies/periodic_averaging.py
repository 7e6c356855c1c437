r"""Local SGD and DiLoCo: H local steps per replica, then one all-reduce of the parameter change.

Every rank trains its own replica with any inner optimizer on its own data. Every
``sync_every`` (:math:`H`) inner steps the ranks average their *pseudo-gradient*, the change
since the last synchronisation point :math:`\theta_s`,

.. math:: \Delta = \frac1N \sum_{r=1}^N \big(\theta_s - \theta_r\big),

in one all-reduce, and every replica restarts from the same new point:

- **local SGD** (Stich 2019, "Local SGD converges fast and communicates little",
  arXiv:1805.09767; Lin et al. 2020, "Don't use large mini-batches, use local SGD",
  arXiv:1808.07217): plain averaging, :math:`\theta_s \leftarrow \theta_s - \Delta`
  (the mean of the replicas). With :math:`H = 1` and inner SGD this is synchronous
  data-parallel SGD.
- **DiLoCo** (Douillard et al. 2023, "DiLoCo: Distributed low-communication training of
  language models", arXiv:2311.08105, Algorithm 1): an outer SGD with Nesterov momentum
  that treats :math:`\Delta` as a gradient, in torch's form
  :math:`b \leftarrow \mu b + \Delta`, :math:`\theta_s \leftarrow \theta_s - \eta_{out}(\Delta + \mu b)`,
  with the paper's :math:`\eta_{out} = 0.7`, :math:`\mu = 0.9`. With :math:`\eta_{out} = 1`,
  :math:`\mu = 0` it is local SGD.

Communication: one all-reduce of the trainable parameters' size every :math:`H` steps, so
:math:`H` times fewer bytes than data-parallel training's per-step gradient all-reduce.
``bytes_communicated`` counts this rank's all-reduce payload exactly (elements times element
size); the one-off broadcast of rank 0's parameters at construction, which DDP does too,
is not part of it. Inner optimizer states stay local (as in the paper); buffers (e.g.
normalisation statistics) are not averaged.

Between synchronisations the replicas differ. A checkpoint that stores one copy of the
model (``torch.distributed.checkpoint`` treats plain tensors as replicated) belongs right
after a synchronisation (``steps % sync_every == 0``), where the replicas agree; a
per-rank checkpoint (model, inner optimizer and :meth:`LocalSGD.state_dict`) resumes
exactly at any step.

Memory: one copy of the trainable parameters (:math:`\theta_s`), plus the outer momentum
for DiLoCo.

Example::

    opt = gradwise.optim.AdamW(model.parameters(), lr=1e-3)
    diloco = DiLoCo(model, sync_every=32)
    for batch in batches:
        loss_fn(model, batch).backward()
        opt.step(); opt.zero_grad()
        diloco.after_step()
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradwise.optim import SGD
from gradwise.validation import check_int, check_range


class LocalSGD:
    """Average the replicas' parameters every ``sync_every`` inner steps (one all-reduce)."""

    def __init__(self, model: nn.Module, sync_every: int) -> None:
        self.sync_every = check_int("sync_every", sync_every, 1)
        if not dist.is_initialized():
            raise RuntimeError("local SGD needs a torch.distributed process group; launch with torchrun")
        self.world_size = dist.get_world_size()
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters to average")
        groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for param in params:
            groups.setdefault((param.device, param.dtype), []).append(param)
        self.groups = list(groups.values())
        with torch.no_grad():
            for param in params:
                dist.broadcast(param, src=0)
        self.anchors = [self._flat(group).clone() for group in self.groups]
        self.steps = 0
        self.bytes_communicated = 0

    @staticmethod
    def _flat(group: list[Tensor]) -> Tensor:
        return torch.cat([param.detach().reshape(-1) for param in group])

    def after_step(self) -> bool:
        """Count one inner step; on every ``sync_every``-th, synchronise. Returns whether it did."""
        self.steps += 1
        if self.steps % self.sync_every:
            return False
        with torch.no_grad():
            for index, (group, anchor) in enumerate(zip(self.groups, self.anchors)):
                delta = anchor - self._flat(group)
                dist.all_reduce(delta)
                delta.div_(self.world_size)
                self.bytes_communicated += delta.numel() * delta.element_size()
                self._outer_step(index, delta)
                pieces = anchor.split([param.numel() for param in group])
                torch._foreach_copy_(group, [piece.view_as(param) for piece, param in zip(pieces, group)])
        return True

    def _outer_step(self, index: int, delta: Tensor) -> None:
        self.anchors[index].sub_(delta)

    def state_dict(self) -> dict[str, Any]:
        """The synchronisation point, the inner-step count and the bytes sent so far."""
        return {"steps": self.steps, "bytes_communicated": self.bytes_communicated,
                "anchors": [anchor.clone() for anchor in self.anchors]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        anchors = state["anchors"]
        if [a.shape for a in anchors] != [a.shape for a in self.anchors]:
            raise ValueError(f"the checkpoint's synchronisation point has shapes {[tuple(a.shape) for a in anchors]}, "
                             f"this model's {[tuple(a.shape) for a in self.anchors]}")
        for mine, saved in zip(self.anchors, anchors):
            mine.copy_(saved)
        self.steps = check_int("steps", state["steps"], 0)
        self.bytes_communicated = check_int("bytes_communicated", state["bytes_communicated"], 0)


class DiLoCo(LocalSGD):
    """Local SGD whose averaged change drives an outer Nesterov SGD (Douillard et al. 2023)."""

    def __init__(self, model: nn.Module, sync_every: int, outer_lr: float = 0.7, outer_momentum: float = 0.9) -> None:
        check_range("outer_lr", outer_lr, 0.0, low_open=True)
        check_range("outer_momentum", outer_momentum, 0.0, 1.0, high_open=True)
        super().__init__(model, sync_every)
        self.outer = SGD(self.anchors, lr=outer_lr, momentum=outer_momentum, nesterov=outer_momentum > 0)

    def _outer_step(self, index: int, delta: Tensor) -> None:
        anchor = self.anchors[index]
        anchor.grad = delta
        self.outer.step()
        anchor.grad = None

    def state_dict(self) -> dict[str, Any]:
        """Local SGD's state plus the outer optimizer's (its momentum)."""
        return {**super().state_dict(), "outer": copy.deepcopy(self.outer.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.outer.load_state_dict(state["outer"])
