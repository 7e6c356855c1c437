r"""ZeRO stages 1 and 2 for gradwise's optimizers: each of N ranks keeps 1/N of the optimizer
state (stage 1) and of the gradients (stage 2), and updates only its part of the parameters.

Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter
Models", arXiv:1910.02054, section 5 (:math:`P_{os}` is stage 1, :math:`P_{os+g}` stage 2).
Data parallelism keeps a full copy of the optimizer state on every rank, although each
rank computes the same update from the same averaged gradient. ZeRO partitions it as the
optimizer class's description says (:attr:`gradwise.optim.description.Description.sharding`):

- **element-wise optimizers** (``"element"``: SGD, Adagrad, RMSprop, Adam/AdamW, NAdam,
  Lion), whose update of a coordinate needs only that coordinate, shard flat buffers: the
  parameters of each param group (per dtype and device) are laid end to end in one buffer
  of :math:`P` elements, padded to a multiple of :math:`N`, and rank :math:`r` owns the
  contiguous slice :math:`[rP'/N, (r+1)P'/N)` of it, :math:`P' = N\lceil P/N\rceil`. An
  optimizer of the same class and hyperparameters steps that slice (one flat tensor), so
  its state is :math:`1/N` of the unsharded state, exactly up to the padding;
- **matrix and other non-element-wise optimizers** (``"tensor"``: Muon with its AdamW-routed
  tensors, Shampoo, SOAP, Adafactor, Sophia; ``"layer"``: K-FAC) need whole tensors
  (Newton-Schulz, Kronecker factors, row and column statistics), so whole tensors are assigned to ranks, balanced by
  size (:func:`assign_whole_tensors`), and each matrix is preconditioned on its owner only;
  the state per rank is then :math:`1/N` of the total within one tensor's state. With
  ``"layer"`` sharding a layer's weight and bias stay together (K-FAC: one Kronecker block); an
  optimizer bound to a model (drive ``"model"``) restricts itself to the owned layers
  (``restricted_to``), and the layer's statistics of the step, recorded by its hooks on every
  rank from its own rows, are averaged onto the owner, so they are those of the global batch.
  Optimizers without a sharding (closure-driven, flat-vector methods) are refused.

Per step, with no DDP wrapper around the model: after the backward passes
:meth:`ZeroOptimizer.reduce_gradients` averages the gradients over the ranks, as DDP does.
Stage 1 all-reduces them, every rank keeping the full average; stage 2 reduce-scatters them
(reduces each whole tensor to its owner), each rank keeping only the gradient of what it
owns and freeing the rest. :meth:`ZeroOptimizer.step` then updates the owned part and
all-gathers (broadcasts from the owners) the updated parameters, so every rank ends with
the same parameters as an unsharded optimizer stepping on the averaged gradient.
The reduction runs once, after backward, with no hooks overlapping it with the backward
pass: stage 2 frees the full gradients right after the reduce-scatter, so their memory is
still needed at its peak, during backward (DeepSpeed reduces buckets during backward).
Communication per step: stage 1 all-reduce :math:`2\Psi` + all-gather :math:`\Psi`, stage 2
reduce-scatter :math:`\Psi` + all-gather :math:`\Psi` (:math:`\Psi` the parameter bytes,
ring algorithms).

Checkpoints: :meth:`ZeroOptimizer.state_dict` is this rank's shard (same world size to
load); :meth:`ZeroOptimizer.consolidated_state_dict` gathers the shards into the state_dict
of the unsharded optimizer (flat shards cut back into per-parameter tensors at their
offsets, whole tensors from their owners), which
:meth:`ZeroOptimizer.load_consolidated_state_dict` loads on any number of ranks, and a
plain optimizer of the same class loads as well.

Example (every rank runs this; each feeds its own rows of the global batch)::

    opt = ZeroOptimizer(gradwise.optim.AdamW(model.parameters(), lr=3e-4), stage=2)
    scheduler = gradwise.schedules.ScheduleLR(opt, ...)      # writes opt.param_groups
    loss_fn(model(x), y).backward()
    opt.reduce_gradients(); opt.clip_grad_norm_(1.0); opt.step(); opt.zero_grad()
    scheduler.step()
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor

from gradwise.distributed.state_bytes import optimizer_state_bytes
from gradwise.optim.description import ModelBound, TrainEvalSwitched, description_of
from gradwise.optim.owner_computes import assign_owners
from gradwise.validation import check_choice, check_int, check_range


def sharding_of(optimizer: torch.optim.Optimizer) -> str | None:
    """How the optimizer's state is divided, from its class's description
    (:attr:`gradwise.optim.description.Description.sharding`; a subclass inherits it):
    ``"element"`` (flat slices), ``"tensor"`` (whole tensors), ``"layer"`` (whole layers), or
    ``None`` for an optimizer that ZeRO cannot shard (or one without a description). An
    element-wise optimizer whose options read whole-tensor statistics (cautious updates, MARS:
    ``needs_whole_tensors()``) is sharded by whole tensors."""
    try:
        sharding = description_of(type(optimizer), inherited=True).sharding
    except KeyError:
        return None
    if sharding == "element" and getattr(optimizer, "needs_whole_tensors", lambda: False)():
        return "tensor"
    return sharding


def assign_whole_tensors(sizes: Sequence[int], world_size: int) -> list[int]:
    """The owning rank of each tensor: greedy largest-first onto the least-loaded rank.

    Tensors are taken by decreasing size (ties by position) and each goes to the rank with
    the smallest total so far (ties to the lower rank), Graham's LPT rule: the largest load
    exceeds the mean by at most the largest tensor. A rank may own nothing when there are
    fewer tensors than ranks.
    """
    check_int("world_size", world_size, 1)
    for index, size in enumerate(sizes):
        check_int(f"sizes[{index}]", size, 0)
    return assign_owners([float(size) for size in sizes], world_size)


def _hyperparameters(group: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in group.items() if key != "params"}


def _unique_params(groups: list[dict[str, Any]]) -> list[list[Tensor]]:
    seen: set[int] = set()
    result = []
    for group in groups:
        params = [p for p in group["params"] if id(p) not in seen]
        seen.update(id(p) for p in params)
        result.append(params)
    return result


def _by_dtype_and_device(params: list[Tensor]) -> list[list[Tensor]]:
    buckets: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for param in params:
        buckets.setdefault((param.dtype, param.device), []).append(param)
    return list(buckets.values())


def _units(optimizer: torch.optim.Optimizer, params: list[Tensor]) -> list[list[Tensor]]:
    """The groups of parameters that must share an owner: with ``"layer"`` sharding a layer's
    weight and bias (``optimizer.layers``; K-FAC: one Kronecker-factored block), every other
    parameter on its own."""
    if sharding_of(optimizer) != "layer":
        return [[p] for p in params]
    ours = {id(p) for p in params}
    modules = cast(ModelBound, optimizer).layers
    layers = [[p for p in (layer.weight, layer.bias) if p is not None and id(p) in ours] for layer in modules]
    layers = [unit for unit in layers if unit]
    in_layers = {id(p) for unit in layers for p in unit}
    return layers + [[p] for p in params if id(p) not in in_layers]


def _flat_gradients(params: list[Tensor], numel: int) -> Tensor:
    """The gradients of ``params`` end to end in a buffer of ``numel`` elements (zeros where a
    gradient is missing and in the padding)."""
    flat = params[0].new_zeros(numel)
    offset = 0
    for param in params:
        if param.grad is not None:
            flat[offset : offset + param.numel()].copy_(param.grad.reshape(-1))
        offset += param.numel()
    return flat


def _point_gradients_into(params: list[Tensor], flat: Tensor) -> None:
    """Make each parameter's gradient a view of its part of ``flat``."""
    offset = 0
    for param in params:
        param.grad = flat[offset : offset + param.numel()].view_as(param)
        offset += param.numel()


def _copy_into_params(params: list[Tensor], flat: Tensor) -> None:
    offset = 0
    for param in params:
        param.copy_(flat[offset : offset + param.numel()].view_as(param))
        offset += param.numel()


def _on_cpu(entry: dict[str, Any]) -> dict[str, Any]:
    return {key: value.detach().cpu() if isinstance(value, Tensor) else value for key, value in entry.items()}


def _copied(entry: dict[str, Any]) -> dict[str, Any]:
    """Own copies of the tensors: the local optimizer steps its state in place, which must not
    reach the caller's state_dict."""
    return {key: value.detach().clone() if isinstance(value, Tensor) else value for key, value in entry.items()}


def _same_kind(optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """An optimizer of ``optimizer``'s class over ``groups`` (each carrying its hyperparameters)."""
    make: Callable[..., torch.optim.Optimizer] = type(optimizer)  # a subclass takes its defaults as keywords
    return make(groups)

class _Piece:
    """Elements ``[start, start + len(values))`` of one state tensor of a parameter, flattened."""

    def __init__(self, start: int, values: Tensor) -> None:
        self.start, self.values = start, values


def _elementwise(key: str, value: Any, shared: frozenset[str]) -> bool:
    """Whether state ``key`` holds one value per parameter element (the step counters and
    other scalar state in ``shared`` are one value per parameter)."""
    return isinstance(value, Tensor) and key not in shared


class _FlatShard:
    """Rank ``rank``'s contiguous slice of the flat, padded buffer of ``params`` (one dtype and
    device): the tensor the local optimizer steps."""

    def __init__(self, params: list[Tensor], rank: int, world_size: int) -> None:
        self.params = params
        total = sum(p.numel() for p in params)
        self.padded = -(-total // world_size) * world_size
        self.numel = self.padded // world_size
        self.start = rank * self.numel
        self.shard = params[0].new_zeros(self.numel)
        self.load_from_params()

    def load_from_params(self) -> None:
        """Copy this rank's slice of the parameters into the shard (the parameters are the
        master copy: they may be changed between steps, by loading a checkpoint say)."""
        end = self.start + self.numel
        offset = 0
        for param in self.params:
            low, high = max(offset, self.start), min(offset + param.numel(), end)
            if low < high:
                piece = param.detach().reshape(-1)[low - offset : high - offset]
                self.shard[low - self.start : high - self.start].copy_(piece)
            offset += param.numel()


class _ElementwiseLayout:
    """Every param group's parameters as flat shards, one per dtype and device."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, stage: int, process_group: Any, rank: int, world_size: int
    ) -> None:
        self.stage, self.group, self.world_size = stage, process_group, world_size
        self.shards: list[_FlatShard] = []
        inner_groups = []
        for hyper, params in zip(optimizer.param_groups, _unique_params(optimizer.param_groups)):
            shards = [_FlatShard(bucket, rank, world_size) for bucket in _by_dtype_and_device(params)]
            self.shards.extend(shards)
            inner_groups.append({**_hyperparameters(hyper), "params": [s.shard for s in shards]})
        self.local_optimizer = _same_kind(optimizer, inner_groups)
        self._grad_buffers: list[Tensor] = []

    def reduce_gradients(self) -> None:
        self._grad_buffers = []
        for shard in self.shards:
            flat = _flat_gradients(shard.params, shard.padded)
            if self.stage == 1:
                dist.all_reduce(flat, group=self.group)
                flat.div_(self.world_size)
                _point_gradients_into(shard.params, flat)
                shard.shard.grad = flat[shard.start : shard.start + shard.numel]
            else:
                local = flat.new_empty(shard.numel)
                dist.reduce_scatter_single(local, flat, group=self.group)
                local.div_(self.world_size)
                for param in shard.params:
                    param.grad = None
                shard.shard.grad = local
            self._grad_buffers.append(flat if self.stage == 1 else shard.shard.grad)

    def owned_gradients(self) -> list[Tensor]:
        return [s.shard.grad for s in self.shards if s.shard.grad is not None]

    def scale_gradients(self, factor: float) -> None:
        for buffer in self._grad_buffers:
            buffer.mul_(factor)

    def before_step(self) -> None:
        for shard in self.shards:
            shard.load_from_params()

    def after_step(self) -> None:
        for shard in self.shards:
            gathered = shard.shard.new_empty(shard.padded)
            dist.all_gather_single(gathered, shard.shard, group=self.group)
            _copy_into_params(shard.params, gathered)

    def zero_grad(self) -> None:
        for shard in self.shards:
            shard.shard.grad = None
        self._grad_buffers = []

    def state_pieces(self, local: dict[int, dict[str, Any]], index: dict[int, int],
                     shared: frozenset[str]) -> dict[int, dict[str, Any]]:
        """This rank's part of each parameter's state, by global index: element-wise state as
        :class:`_Piece` (the slice of the shard that falls in the parameter), the rest whole."""
        pieces: dict[int, dict[str, Any]] = {}
        for position, shard in enumerate(self.shards):
            if position not in local:
                continue
            end, offset = shard.start + shard.numel, 0
            for param in shard.params:
                low, high = max(offset, shard.start), min(offset + param.numel(), end)
                if low < high:
                    pieces[index[id(param)]] = {
                        key: _Piece(low - offset, value[low - shard.start : high - shard.start].detach().cpu())
                        if _elementwise(key, value, shared) else _on_cpu({key: value})[key]
                        for key, value in local[position].items()
                    }
                offset += param.numel()
        return pieces

    def local_state(self, saved: dict[int, dict[str, Any]], index: dict[int, int],
                    shared: frozenset[str]) -> dict[int, dict[str, Any]]:
        """The local optimizer's state (by its own index) cut from the unsharded ``saved``:
        element-wise state laid end to end as in the flat buffer, zero-padded, and sliced."""
        local: dict[int, dict[str, Any]] = {}
        for position, shard in enumerate(self.shards):
            entries = [saved.get(index[id(param)], {}) for param in shard.params]
            keys = {key: value for entry in entries for key, value in entry.items()}
            if not keys:
                continue
            local[position] = {}
            for key, value in keys.items():
                if not _elementwise(key, value, shared):
                    local[position][key] = _copied({key: value})[key]
                    continue
                flat, offset = shard.shard.new_zeros(shard.padded), 0
                for param, entry in zip(shard.params, entries):
                    if key in entry:
                        flat[offset : offset + param.numel()].copy_(entry[key].reshape(-1))
                    offset += param.numel()
                local[position][key] = flat[shard.start : shard.start + shard.numel].clone()
        return local


class _WholeTensorLayout:
    """Whole tensors assigned to ranks; the local optimizer steps the owned parameters themselves."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, stage: int, process_group: Any, rank: int, world_size: int
    ) -> None:
        self.stage, self.group, self.rank = stage, process_group, rank
        self.world_size = world_size
        per_group = _unique_params(optimizer.param_groups)
        self.params = [p for params in per_group for p in params]
        units = _units(optimizer, self.params)
        owners = assign_whole_tensors([sum(p.numel() for p in unit) for unit in units], world_size)
        self.owner = {id(p): owner for unit, owner in zip(units, owners) for p in unit}
        inner_groups = [
            {**_hyperparameters(hyper), "params": [p for p in params if self.owner[id(p)] == rank]}
            for hyper, params in zip(optimizer.param_groups, per_group)
        ]
        # an optimizer bound to a model is rebuilt by itself (K-FAC hands its layers' hooks over);
        # any other from its param groups
        self.model_bound = description_of(type(optimizer), inherited=True).drive == "model"
        if self.model_bound:
            self.local_optimizer = cast(ModelBound, optimizer).restricted_to(inner_groups)
        else:
            self.local_optimizer = _same_kind(optimizer, inner_groups)
        # Per dtype and device, per owning rank: the tensors that travel together.
        self.buckets = [
            [[p for p in bucket if self.owner[id(p)] == r] for r in range(world_size)]
            for bucket in _by_dtype_and_device(self.params)
        ]

    def reduce_gradients(self) -> None:
        if self.model_bound:
            self._average_model_statistics()
        for by_owner in self.buckets:
            if self.stage == 1:
                params = [p for owned in by_owner for p in owned]
                flat = _flat_gradients(params, sum(p.numel() for p in params))
                dist.all_reduce(flat, group=self.group)
                _point_gradients_into(params, flat.div_(self.world_size))
                continue
            for owner, owned in enumerate(by_owner):
                if not owned:
                    continue
                flat = _flat_gradients(owned, sum(p.numel() for p in owned))
                dist.reduce(flat, group=self.group, group_dst=owner)
                if owner == self.rank:
                    _point_gradients_into(owned, flat.div_(self.world_size))
                else:
                    for param in owned:
                        param.grad = None

    def _average_model_statistics(self) -> None:
        """Each layer's statistics of this step (K-FAC: its factors, ``pending_factors()``), averaged
        over the ranks onto the layer's owner: the factors of the global batch (KAISA, Pauloski et al.
        2021, arXiv:2107.01739, likewise assigns each layer's preconditioner to one worker)."""
        local = cast(ModelBound, self.local_optimizer)
        pending = local.pending_factors()
        for layer in local.layers:
            if layer not in pending or id(layer.weight) not in self.owner:
                continue
            owner = self.owner[id(layer.weight)]
            a, g = pending[layer]
            flat = torch.cat([a.reshape(-1), g.reshape(-1)])
            dist.reduce(flat, group=self.group, group_dst=owner)
            if owner == self.rank:
                a.copy_(flat[: a.numel()].view_as(a)).div_(self.world_size)
                g.copy_(flat[a.numel() :].view_as(g)).div_(self.world_size)

    def owned_gradients(self) -> list[Tensor]:
        return [p.grad for p in self.params if self.owner[id(p)] == self.rank and p.grad is not None]

    def scale_gradients(self, factor: float) -> None:
        for param in self.params:
            if param.grad is not None:
                param.grad.mul_(factor)

    def before_step(self) -> None:
        pass

    def after_step(self) -> None:
        for by_owner in self.buckets:
            for owner, owned in enumerate(by_owner):
                if not owned:
                    continue
                flat = torch.cat([p.detach().reshape(-1) for p in owned])
                dist.broadcast(flat, group=self.group, group_src=owner)
                if owner != self.rank:
                    _copy_into_params(owned, flat)

    def zero_grad(self) -> None:
        pass

    def _local_params(self) -> list[Tensor]:
        return [p for group in self.local_optimizer.param_groups for p in group["params"]]

    def state_pieces(self, local: dict[int, dict[str, Any]], index: dict[int, int],
                     shared: frozenset[str]) -> dict[int, dict[str, Any]]:
        """The state of the tensors this rank owns, whole, by global index."""
        params = self._local_params()
        return {index[id(params[position])]: _on_cpu(entry) for position, entry in local.items()}

    def local_state(self, saved: dict[int, dict[str, Any]], index: dict[int, int],
                    shared: frozenset[str]) -> dict[int, dict[str, Any]]:
        """The state of the tensors this rank owns, by the local optimizer's index."""
        return {position: _copied(saved[index[id(param)]]) for position, param in enumerate(self._local_params())
                if index[id(param)] in saved}


class ZeroOptimizer(torch.optim.Optimizer):
    """ZeRO stage 1 or 2 around a gradwise optimizer (see the module doc for the method).

    ``optimizer`` is built as usual on all of the model's parameters (and must not have
    stepped yet); it is not stepped itself: its ``param_groups`` are this wrapper's, so an
    LR scheduler writing into them reaches the local optimizer, which steps this rank's
    shard (same class, same hyperparameters, copied from the groups before every step).
    ``process_group`` (default: the whole job) holds the ranks that share the state.

    Call :meth:`reduce_gradients` once after the backward passes of a step (``step()``
    calls it itself otherwise); :meth:`grad_norm` and :meth:`clip_grad_norm_` then see the
    averaged gradient. ``local_optimizer`` is the optimizer of this rank's part: feed a
    Sophia's the Hessian estimates of the parameters it owns; a K-FAC's replaces the wrapped
    one's model hooks (use its ``capture_fisher()`` for the true Fisher).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, stage: int = 1, process_group: Any = None) -> None:
        check_choice("stage", stage, (1, 2))
        if sharding_of(optimizer) is None:
            raise ValueError(
                f"optimizer must be one whose description has a sharding (element, tensor or layer), "
                f"got {type(optimizer).__name__}"
            )
        if optimizer.state:
            raise ValueError("optimizer already has state: wrap it in ZeroOptimizer before its first step")
        if not dist.is_initialized():
            raise RuntimeError("ZeroOptimizer needs a torch.distributed process group; launch with torchrun")
        self.stage = stage
        self.process_group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        layout = _ElementwiseLayout if sharding_of(optimizer) == "element" else _WholeTensorLayout
        self._layout = layout(optimizer, stage, process_group, self.rank, self.world_size)
        self.local_optimizer = self._layout.local_optimizer
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.param_groups = optimizer.param_groups
        self.state = self.local_optimizer.state
        self._reduced = False

    def reduce_gradients(self) -> None:
        """Average the gradients over the ranks: stage 1 all-reduces them, stage 2 leaves each
        rank only the gradient of what it owns (reduce-scatter). Collective."""
        self._layout.reduce_gradients()
        self._reduced = True

    def grad_norm(self) -> float:
        """The Euclidean norm of the whole averaged gradient (each rank sums the squares of
        what it owns, then one all-reduce). Collective; reduces the gradients first if needed."""
        if not self._reduced:
            self.reduce_gradients()
        owned = self._layout.owned_gradients()
        device = owned[0].device if owned else self.param_groups[0]["params"][0].device
        total = torch.zeros((), dtype=torch.float64, device=device)
        for grad in owned:
            total += grad.double().square().sum()
        dist.all_reduce(total, group=self.process_group)
        return total.sqrt().item()

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Scale the gradients so that their global norm is at most ``max_norm``, as
        ``torch.nn.utils.clip_grad_norm_`` does; returns the norm before clipping."""
        check_range("max_norm", max_norm, 0.0, low_open=True)
        norm = self.grad_norm()
        factor = max_norm / (norm + 1e-6)
        if factor < 1:
            self._layout.scale_gradients(factor)
        return norm

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update this rank's part with the local optimizer, then all-gather the parameters."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            self._reduced = False
        if not self._reduced:
            self.reduce_gradients()
        for outer, inner in zip(self.param_groups, self.local_optimizer.param_groups, strict=True):
            inner.update(_hyperparameters(outer))
        self._layout.before_step()
        self.local_optimizer.step()
        for outer, inner in zip(self.param_groups, self.local_optimizer.param_groups, strict=True):
            outer.update(_hyperparameters(inner))  # what a step writes to its groups (schedule-free's counters)
        self._layout.after_step()
        self._reduced = False
        return loss

    def train(self) -> None:
        """The parameters to the local optimizer's training point (schedule-free's y), on every rank:
        see :class:`gradwise.optim.description.TrainEvalSwitched`."""
        self._switch(train=True)

    def eval(self) -> None:
        """The parameters to the local optimizer's evaluation point (schedule-free's average x)."""
        self._switch(train=False)

    @torch.no_grad()
    def _switch(self, train: bool) -> None:
        """Each rank moves its part, as a step does, and the parts are gathered."""
        if not description_of(type(self.local_optimizer), inherited=True).eval_switch:
            raise TypeError(f"{type(self.local_optimizer).__name__} trains and evaluates at the same weights: "
                            "it has no train()/eval()")
        self._layout.before_step()
        local = cast(TrainEvalSwitched, self.local_optimizer)
        if train:
            local.train()
        else:
            local.eval()
        for outer, inner in zip(self.param_groups, self.local_optimizer.param_groups, strict=True):
            outer.update(_hyperparameters(inner))  # the mode, which the next step copies inward
        self._layout.after_step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._layout.zero_grad()
        self._reduced = False

    def state_bytes(self) -> int:
        """Bytes of optimizer state on this rank (see :mod:`gradwise.distributed.state_bytes`)."""
        return optimizer_state_bytes(self.local_optimizer)

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard of the optimizer state, with the layout it belongs to."""
        return {
            "stage": self.stage,
            "rank": self.rank,
            "world_size": self.world_size,
            "local": self.local_optimizer.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load this rank's shard saved by :meth:`state_dict` under the same layout; the
        hyperparameters (a scheduled learning rate, say) return to ``param_groups`` too."""
        for key in ("stage", "rank", "world_size"):
            if state_dict[key] != getattr(self, key):
                raise ValueError(
                    f"state_dict {key} must be {getattr(self, key)} (this optimizer's), got {state_dict[key]}"
                )
        self.local_optimizer.load_state_dict(state_dict["local"])
        self.state = self.local_optimizer.state  # load_state_dict replaced the local optimizer's
        for outer, inner in zip(self.param_groups, self.local_optimizer.param_groups, strict=True):
            outer.update(_hyperparameters(inner))

    def _index(self) -> dict[int, int]:
        """Each parameter's index in the unsharded optimizer's state_dict (numbered as torch does)."""
        index: dict[int, int] = {}
        start = 0
        for group in self.param_groups:
            for position, param in enumerate(group["params"], start):
                index.setdefault(id(param), position)
            start += len(group["params"])
        return index

    def _shared_keys(self) -> frozenset[str]:
        return frozenset(("step", *getattr(self.local_optimizer, "_scalar_state_keys", ())))

    def consolidated_state_dict(self) -> dict[str, Any]:
        """The state_dict the unsharded optimizer would have, on every rank (tensors on the CPU).

        Collective: every rank's shard is gathered (``all_gather_object``), so each rank
        briefly holds the whole state. Element-wise state is reassembled from the ranks'
        slices of the flat buffers (the padding dropped), whole-tensor state comes from the
        owners; the param groups carry the current hyperparameters. In the unsharded layout
        a parameter that never had a gradient has no state; here it has the state of a zero
        gradient, as the flat shard stepped it.
        """
        index, shared = self._index(), self._shared_keys()
        pieces = self._layout.state_pieces(self.local_optimizer.state_dict()["state"], index, shared)
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, pieces, group=self.process_group)
        params = {index[id(param)]: param for group in self.param_groups for param in group["params"]}
        state: dict[int, dict[str, Any]] = {}
        for rank_pieces in gathered:
            for position, entry in rank_pieces.items():
                merged = state.setdefault(position, {})
                for key, value in entry.items():
                    if isinstance(value, _Piece):
                        param = params[position]
                        flat = merged.setdefault(key, value.values.new_zeros(param.shape))
                        flat.view(-1)[value.start : value.start + value.values.numel()] = value.values
                    else:
                        merged.setdefault(key, value)
        param_groups = [{**_hyperparameters(group), "params": [index[id(p)] for p in group["params"]]}
                        for group in self.param_groups]
        return {"state": dict(sorted(state.items())), "param_groups": param_groups}

    def load_consolidated_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep this rank's part of an unsharded optimizer's ``state_dict`` (from
        :meth:`consolidated_state_dict` on any number of ranks, or from a plain optimizer of
        the same class), and its hyperparameters. Parameters are matched by position in the
        param groups, as ``torch.optim.Optimizer.load_state_dict`` does. Not collective."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict param_groups must number {len(self.param_groups)} (this optimizer's), "
                             f"got {len(groups)}")
        for number, (saved, ours) in enumerate(zip(groups, self.param_groups)):
            if len(saved["params"]) != len(ours["params"]):
                raise ValueError(f"state_dict param_groups[{number}] must hold {len(ours['params'])} parameters "
                                 f"(this optimizer's), got {len(saved['params'])}")
        index = self._index()
        saved_state = {
            index[id(param)]: state_dict["state"][saved_id]
            for saved_group, group in zip(groups, self.param_groups)
            for saved_id, param in zip(saved_group["params"], group["params"])
            if saved_id in state_dict["state"]
        }
        local = self._layout.local_state(saved_state, index, self._shared_keys())
        local_groups = self.local_optimizer.state_dict()["param_groups"]
        self.local_optimizer.load_state_dict({
            "state": local,
            "param_groups": [{**_hyperparameters(saved), "params": inner["params"]}
                             for saved, inner in zip(groups, local_groups, strict=True)],
        })
        self.state = self.local_optimizer.state  # load_state_dict replaced the local optimizer's
        for outer, saved in zip(self.param_groups, groups):
            outer.update(_hyperparameters(saved))
