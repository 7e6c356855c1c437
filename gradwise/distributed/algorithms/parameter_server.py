r"""Asynchronous SGD with a parameter server, on ``torch.distributed`` point-to-point messages.

Rank 0 is the server: it holds the parameters and a gradwise (or torch) optimizer. Ranks
1..W are workers, each looping: pull the parameters with their version number, compute a
gradient on its own batch, push it. The server applies every push as it arrives, without
waiting for the other workers (Dean et al. 2012, "Large scale distributed deep networks",
Downpour SGD; Recht et al. 2011, Hogwild!), and answers each push with the current
parameters: the next pull. With :math:`k` the server's version (updates applied so far),
the update is

.. math:: \theta_{k+1} = \theta_k - \eta_k\, g\big(\theta_{k - s_k}\big),

where the *staleness* :math:`s_k` is the number of updates applied between the worker's
pull and its push. The server records :math:`s_k` for every update.

Options:

- ``max_staleness``: a push staler than this is not applied; the worker gets the current
  parameters (it re-pulls) and the push is counted in ``dropped``.
- ``staleness_aware``: the step :math:`\eta_k = \eta / (1 + s_k)` (Zhang et al. 2016,
  "Staleness-aware async-SGD for distributed deep learning", arXiv:1511.05950), applied by
  scaling every param group's ``lr`` for that one step.
- ``order="round-robin"``: the server takes pushes from workers 1, 2, ..., W, 1, 2, ... in
  turn instead of by arrival. Every worker then pulls right after its own push and pushes
  again after the other :math:`W - 1` have pushed: the staleness is exactly :math:`W - 1`
  once the pipeline is full (the first round, all pulled at version 0, has
  :math:`0, 1, \dots, W - 1`). That is gradient descent with the fixed delay
  :math:`\tau = W - 1` from a constant history, the recursion whose stability
  :mod:`gradwise.plan.stability` predicts.

Shutdown: after ``updates`` applied updates the server answers every further push with
*stop* (those pushes are counted in ``discarded``), so each worker ends after exactly one
more push; a peer that dies makes the others fail at the process group's timeout rather
than hang.

Messages are one CPU byte tensor each way (a gloo message costs about a millisecond of CPU
on a busy machine, so header and payload travel together): a pull is the int64 header
``[version, stop]`` then the flat parameters; a push is the int64 header
``[version pulled]`` then ``[loss, flat gradient]`` in the parameters' dtype. Per update:
one gradient (and the loss) up, one parameter vector down. Receiving "from whoever pushes
first" needs any-source receive, which gloo provides, so the process group's backend must
include gloo (``gloo``, or ``cpu:gloo,cuda:nccl`` for a model on a GPU).

Example (every rank)::

    if dist.get_rank() == 0:
        log = ParameterServer(model, gradwise.optim.SGD(model.parameters(), lr=0.1), updates=1000).run()
    else:
        ParameterWorker(model, lambda m: loss_fn(m, stream.next_batch())).run()
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradwise.validation import check_choice, check_int

SERVER = 0
PULL_TAG, PUSH_TAG = 1, 2
PULL_HEADER, PUSH_HEADER = 2, 1
"""int64 header entries of each message."""
ORDERS = ("arrival", "round-robin")


@dataclass
class ServerLog:
    """What the server saw: one entry per applied update in ``staleness``, ``workers``, ``losses``."""

    staleness: list[int] = field(default_factory=list)
    workers: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    """The pushing worker's loss at the parameters it had pulled."""
    dropped: int = 0
    """Pushes staler than ``max_staleness``, not applied (the worker re-pulled)."""
    discarded: int = 0
    """Pushes that arrived after the last update, answered with stop."""
    bytes_received: int = 0
    """Bytes of every push received (headers included)."""
    bytes_sent: int = 0
    """Bytes of every parameter message sent (headers included)."""


def _trainable(model: nn.Module) -> list[Tensor]:
    params: list[Tensor] = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    dtypes = {p.dtype for p in params}
    if len(dtypes) > 1:
        raise ValueError(f"the parameter server sends one flat vector; the parameters have several dtypes {dtypes}")
    return params


def _pack(header: list[int], payload: Tensor) -> Tensor:
    return torch.cat([torch.tensor(header, dtype=torch.int64).view(torch.uint8), payload.view(torch.uint8)])


def _unpack(message: Tensor, entries: int, dtype: torch.dtype) -> tuple[list[int], Tensor]:
    split = 8 * entries
    return message[:split].view(torch.int64).tolist(), message[split:].view(dtype)


def _buffer(entries: int, elements: int, dtype: torch.dtype) -> Tensor:
    return torch.empty(8 * entries + elements * dtype.itemsize, dtype=torch.uint8)


def _check_group() -> int:
    if not dist.is_initialized():
        raise RuntimeError("the parameter server needs a torch.distributed process group; launch with torchrun")
    backend = str(dist.get_backend())
    if "gloo" not in backend:
        raise ValueError(f"the parameter server needs gloo's any-source receive; the backend is {backend!r}")
    world_size = dist.get_world_size()
    if world_size < 2:
        raise ValueError(f"the parameter server needs at least one worker besides rank 0, got world_size {world_size}")
    return world_size


class ParameterServer:
    """Rank 0: apply the workers' gradients to ``model`` with ``optimizer`` as they arrive."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, updates: int, *,
                 max_staleness: int | None = None, staleness_aware: bool = False, order: str = "arrival") -> None:
        self.updates = check_int("updates", updates, 1)
        self.max_staleness = None if max_staleness is None else check_int("max_staleness", max_staleness, 0)
        self.staleness_aware = bool(staleness_aware)
        self.order = check_choice("order", order, ORDERS)
        world_size = _check_group()
        if dist.get_rank() != SERVER:
            raise ValueError(f"the server is rank {SERVER}; this is rank {dist.get_rank()}")
        self.workers = list(range(1, world_size))
        self.params = _trainable(model)
        self.size = sum(p.numel() for p in self.params)
        self.dtype = self.params[0].dtype
        self.push_bytes = 8 * PUSH_HEADER + (1 + self.size) * self.dtype.itemsize
        self.optimizer = optimizer
        self.version = 0

    def run(self) -> ServerLog:
        """Serve until ``updates`` updates are applied and every worker has been told to stop."""
        log = ServerLog()
        self.version = 0
        for worker in self.workers:
            log.bytes_sent += self._send_parameters(worker)
        turns = deque(self.workers)
        while turns:
            worker, pulled, loss = self._receive_push(turns[0] if self.order == "round-robin" else None)
            log.bytes_received += self.push_bytes
            turns.remove(worker)
            staleness = self.version - pulled
            if len(log.staleness) == self.updates:
                log.discarded += 1
            elif self.max_staleness is not None and staleness > self.max_staleness:
                log.dropped += 1
            else:
                self._apply(staleness)
                log.staleness.append(staleness)
                log.workers.append(worker)
                log.losses.append(loss)
            stop = len(log.staleness) == self.updates
            log.bytes_sent += self._send_parameters(worker, stop)
            if not stop:
                turns.append(worker)
        return log

    def _receive_push(self, source: int | None) -> tuple[int, int, float]:
        message = _buffer(PUSH_HEADER, 1 + self.size, self.dtype)
        worker = dist.recv(message, src=source, tag=PUSH_TAG)
        (pulled,), values = _unpack(message, PUSH_HEADER, self.dtype)
        offset = 1
        for param in self.params:
            param.grad = values[offset : offset + param.numel()].view_as(param).to(param.device)
            offset += param.numel()
        return worker, pulled, float(values[0])

    def _apply(self, staleness: int) -> None:
        scale = 1.0 / (1 + staleness) if self.staleness_aware else 1.0
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["lr"] = group["lr"] * scale
        self.optimizer.step()
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self.version += 1

    def _send_parameters(self, worker: int, stop: bool = False) -> int:
        """Send the current parameters (or stop) to ``worker``; returns the message's bytes."""
        flat = torch.cat([p.detach().reshape(-1).cpu() for p in self.params])
        message = _pack([self.version, int(stop)], flat)
        dist.send(message, dst=worker, tag=PULL_TAG)
        return message.numel()


class ParameterWorker:
    """Ranks 1..W: pull ``model``'s parameters, push the gradient of ``compute_loss(model)``.

    ``compute_loss`` draws the worker's own batch and returns the loss tensor to differentiate.
    """

    def __init__(self, model: nn.Module, compute_loss: Callable[[nn.Module], Tensor]) -> None:
        _check_group()
        if dist.get_rank() == SERVER:
            raise ValueError(f"rank {SERVER} is the server, not a worker")
        self.model = model
        self.params = _trainable(model)
        self.size = sum(p.numel() for p in self.params)
        self.dtype = self.params[0].dtype
        self.compute_loss = compute_loss

    def run(self) -> int:
        """Work until the server says stop; return the number of pushes sent."""
        pushes = 0
        while True:
            message = _buffer(PULL_HEADER, self.size, self.dtype)
            dist.recv(message, src=SERVER, tag=PULL_TAG)
            (version, stop), flat = _unpack(message, PULL_HEADER, self.dtype)
            if stop:
                return pushes
            with torch.no_grad():
                offset = 0
                for param in self.params:
                    param.copy_(flat[offset : offset + param.numel()].view_as(param))
                    offset += param.numel()
            self.model.zero_grad(set_to_none=True)
            loss = self.compute_loss(self.model)
            loss.backward()
            grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in self.params]
            values = torch.cat([loss.detach().reshape(1).to(self.dtype).cpu()] + [g.reshape(-1).cpu() for g in grads])
            dist.send(_pack([version], values), dst=SERVER, tag=PUSH_TAG)
            pushes += 1
