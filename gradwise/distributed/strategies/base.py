"""How the training loop runs on N processes: the contract every parallel strategy fills in.

The loop (:mod:`gradwise.train.loop`) is written once and asks its :class:`Strategy`, at
each point where running on many processes changes something:

* ``wrap_model(model)``: the module the forward pass runs on (DDP wraps it, FSDP shards it);
  ``trained_module(model)`` the one whose parameters the optimizer updates (a pipeline
  stage); ``evaluation_model(model)`` the whole model evaluation runs on (on every rank, so
  collectives inside it match).
* ``forward_backward(...)``: one micro-batch's loss and backward pass (a pipeline runs its
  schedule instead).
* ``wrap_optimizer(optimizer)``: the optimizer the loop steps (ZeRO shards its state).
* ``dp_rank``/``dp_size``: the data split. Each data-parallel rank draws the same global
  batch of ``dp_size * batch_size`` rows and keeps its own rows
  (:class:`gradwise.distributed.RankSlice`), so N ranks with batch b see what one process
  with batch N b sees.
* ``micro_batch(last)``: a context for each micro-batch's forward and backward; DDP skips
  the all-reduce on all but the last (``no_sync``).
* ``reduce_gradients()`` after the backward passes, ``grad_norm`` (global over every rank's
  gradient) and ``clip_grad_norm_``, ``optimizer_step(scaler, optimizer)``, ``after_step()``
  after each step (local SGD averages the models there).
* ``agree(values)``: the mean over ranks of per-rank numbers (the loss, the gradient norm),
  bitwise identical on every rank, so that the divergence guard takes the same decision
  everywhere.
* ``bytes_communicated``: this rank's payload bytes of gradient/parameter reduction so far
  (strategies without a counter of their own measure it with
  :class:`gradwise.distributed.traffic.TrafficMeter` around the steps that communicate).
* ``full_model_state(model)``: the whole model's state dict for ``model.pt`` (a collective
  for sharded parameters).
* ``checkpoints(folder, keep, model, optimizer)``: where checkpoints go
  (:mod:`gradwise.checkpoints.run`): rank 0 writes one file when the state is
  replicated (the default), every rank its own file or its DCP shards otherwise.

This base class is the single-process strategy (``single``): every hook is the identity,
and the loop does exactly what it did before strategies existed.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from gradwise.checkpoints.run import ReplicatedCheckpoints
from gradwise.distributed.context import DistContext
from gradwise.optim.base import is_dtensor
from gradwise.problems.data import Batch
from gradwise.validation import check_choice


class Autocast(Protocol):
    """What a strategy needs of the run's number format: the context for the forward pass.

    :class:`gradwise.train.precision.Precision` is one; it is named here structurally because
    the training layer sits above this one and imports it, never the other way round.
    """

    def autocast(self) -> contextlib.AbstractContextManager: ...


def local_grad_norm(named_parameters: list[tuple[str, nn.Parameter]]) -> tuple[float, list[str]]:
    """``sqrt(sum_i ||g_i||^2)`` over this process's gradients, and the names of the non-finite ones."""
    named = [(name, p.grad) for name, p in named_parameters if p.grad is not None]
    if not named:
        return 0.0, []
    norms = torch._foreach_norm([grad for _, grad in named])
    total = torch.linalg.vector_norm(torch.stack(norms)).item()
    if math.isfinite(total):
        return total, []
    return total, [name for (name, _), norm in zip(named, norms, strict=True) if not torch.isfinite(norm)]


def sharded_grad_norm(named_parameters: list[tuple[str, nn.Parameter]]) -> tuple[float, list[str]]:
    """:func:`local_grad_norm` over gradients some of which are ``DTensor`` shards (FSDP, tensor parallel).

    A DTensor's squared norm is reduced over its mesh (``full_tensor``); a plain tensor's is
    the same on every rank that holds it (replicated), so it counts once.
    """
    named = [(name, p.grad) for name, p in named_parameters if p.grad is not None]
    if not named:
        return 0.0, []
    squares = []
    for _, grad in named:
        square = grad.detach().float().square().sum()
        squares.append(square.full_tensor() if is_dtensor(square) else square)
    total = torch.stack(squares).sum().sqrt().item()
    if math.isfinite(total):
        return total, []
    return total, [name for (name, _), square in zip(named, squares, strict=True) if not torch.isfinite(square)]


def clip_by_norm_(parameters: list[nn.Parameter], norm: float, max_norm: float) -> None:
    """``g <- g * min(1, max_norm / (norm + 1e-6))``, as ``torch.nn.utils.clip_grad_norm_``, given the norm."""
    factor = max_norm / (norm + 1e-6)
    if factor < 1:
        for param in parameters:
            if param.grad is not None:
                param.grad.mul_(factor)


class Strategy:
    """One process, no communication; the base of every parallel strategy."""

    name: ClassVar[str] = "single"
    min_world_size: ClassVar[int] = 1
    max_world_size: ClassVar[int | None] = 1
    options: ClassVar[dict[str, Any]] = {}
    """Accepted ``strategy_options`` and their defaults."""
    workloads: ClassVar[tuple[str, ...] | None] = None
    """The workloads whose model it knows how to split (None: any)."""
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "bf16", "fp16")
    """What it runs in; fp16 loss scaling needs every rank to see the same non-finite gradients (replicated)."""

    def __init__(self, context: DistContext | None = None, options: dict[str, Any] | None = None) -> None:
        self.context = context
        self.settings = self.check_options(options or {})
        self.check_world_size(self.world_size, self.settings)
        self.bytes_communicated = 0
        self.bytes_by_kind: Counter[str] = Counter()
        """``bytes_communicated`` by kind of collective (all-reduce, all-gather, ..., send/recv)."""

    # --- who and where ----------------------------------------------------------------

    @property
    def rank(self) -> int:
        return 0 if self.context is None else self.context.rank

    @property
    def world_size(self) -> int:
        return 1 if self.context is None else self.context.world_size

    @property
    def joined(self) -> DistContext:
        """The process group of a strategy that communicates (refused when it runs without one)."""
        if self.context is None:
            raise RuntimeError(f"strategy {type(self).__name__} communicates and needs a DistContext, got None")
        return self.context

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        return self.rank

    @property
    def dp_size(self) -> int:
        return self.world_size

    # --- validation, before any process starts ----------------------------------------

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """The options with defaults filled in; an unknown name is a ``ValueError`` listing the known ones."""
        for key in options:
            if not cls.options:
                raise ValueError(f"strategy {cls.name!r} takes no strategy_options, got {key!r}")
            check_choice(f"strategy {cls.name!r} option", key, cls.options)
        return {**cls.options, **options}

    @classmethod
    def check_world_size(cls, world_size: int, settings: dict[str, Any]) -> None:
        """Refuse a number of processes this strategy cannot run on."""
        if world_size < cls.min_world_size:
            raise ValueError(f"strategy {cls.name!r} needs at least {cls.min_world_size} processes, got {world_size}")
        if cls.max_world_size is not None and world_size > cls.max_world_size:
            raise ValueError(f"strategy {cls.name!r} runs at most {cls.max_world_size} process(es), got "
                             f"{world_size}; choose a parallel strategy")

    # --- the loop's hooks ---------------------------------------------------------------

    def wrap_model(self, model: nn.Module) -> nn.Module:
        return model

    def trained_module(self, model: nn.Module) -> nn.Module:
        return model

    def evaluation_model(self, model: nn.Module) -> nn.Module:
        return model

    def forward_backward(self, loss: Callable[[nn.Module, Batch], torch.Tensor], model: nn.Module, batch: Batch,
                         precision: Autocast, scaler: torch.amp.GradScaler, accumulate: int) -> torch.Tensor:
        """Backward of ``loss / accumulate`` on one micro-batch; returns that loss, detached."""
        with precision.autocast():
            value = loss(model, batch) / accumulate
        scaler.scale(value).backward()
        return value.detach()

    def wrap_optimizer(self, optimizer: Optimizer) -> Optimizer:
        return optimizer

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        yield

    def reduce_gradients(self) -> None:
        """Called after the backward passes of a step, before the gradient norm is read."""

    def grad_norm(self, named_parameters: list[tuple[str, nn.Parameter]]) -> tuple[float, list[str]]:
        return local_grad_norm(named_parameters)

    def clip_grad_norm_(self, parameters: list[nn.Parameter], max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(parameters, max_norm, foreach=True)

    def optimizer_step(self, scaler: torch.amp.GradScaler, optimizer: Optimizer) -> None:
        scaler.step(optimizer)

    def after_step(self) -> None:
        """Called after every step (the update applied or skipped)."""

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        """Add the payload of the collectives run inside to ``bytes_communicated``."""
        from gradwise.distributed.traffic import TrafficMeter

        with TrafficMeter() as meter:
            yield
        self.bytes_communicated += meter.payload_bytes
        self.bytes_by_kind.update(meter.payload_by_kind)

    def full_model_state(self, model: nn.Module) -> dict[str, Any]:
        """The whole model's state dict, on rank 0 (called on every rank)."""
        return model.state_dict()

    def agree(self, values: list[float]) -> list[float]:
        """The mean over ranks of each value, bitwise the same on every rank."""
        if self.world_size == 1:
            return list(values)
        local = torch.tensor(values, dtype=torch.float64, device=self.joined.device)
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(gathered, local)
        # every rank sums the same tensors in the same order: identical results, hence identical verdicts
        total = gathered[0].clone()
        for part in gathered[1:]:
            total += part
        return (total / self.world_size).tolist()

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def checkpoints(self, folder: Path, keep: int, model: nn.Module, optimizer: Optimizer) -> Any:
        """The run's checkpoints: one file written by rank 0, as the state is the same on every rank."""

        return ReplicatedCheckpoints(folder, keep, model, optimizer, self.rank, self.world_size)

    def state_dict(self) -> dict[str, Any]:
        """Strategy state a checkpoint keeps (local SGD's anchor and outer momentum, ...)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
