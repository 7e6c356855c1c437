"""The base class of gradwise's first-order optimizers.

It keeps to the ``torch.optim.Optimizer`` contract and adds what every optimizer here
shares:

- every param group (the defaults included) is validated when it is added, so a bad
  hyperparameter is a ``ValueError`` naming it, whether given to the constructor or in a
  group of its own;
- ``step()`` collects the parameters that have a gradient (skipping ``None``, refusing
  sparse gradients) and hands lists of tensors to ``_update``, which subclasses implement
  with ``torch._foreach_*`` kernels (or torch's fused kernel for the same update);
- the step counter of each parameter lives where torch keeps it, so a ``state_dict`` from
  ``torch.optim`` loads here and vice versa: a float32 scalar on the CPU for the foreach
  path (reading it is not a device synchronisation), on the parameter's device for the
  fused kernels, which read it there.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]

_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class GradwiseOptimizer(Optimizer):
    """Base class: validated param groups and a ``step`` over lists of tensors."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._validate(self.param_groups[-1])

    def _validate(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError`` for any invalid hyperparameter of ``group``."""
        raise NotImplementedError

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        """Apply one update to ``params`` (all with gradients ``grads``) of ``group``."""
        raise NotImplementedError

    # Scalar state kept in its own dtype on the CPU. torch's load_state_dict casts every
    # state tensor but "step" to its parameter's dtype, which would round such a scalar
    # (for bf16 parameters) and change the arithmetic after a resume.
    _scalar_state_keys: tuple[str, ...] = ()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        scalars = {
            i: {key: state_dict["state"][i][key] for key in self._scalar_state_keys if key in state_dict["state"][i]}
            for i in saved_ids
            if i in state_dict["state"]
        }
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, param in zip(saved_ids, params):
            for key, value in scalars.get(saved_id, {}).items():
                self.state[param][key] = value.detach().clone()
        # A state_dict from another optimizer (say torch.optim's) may lack some options.
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; ``closure`` re-evaluates the loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if any(grad.is_sparse for grad in grads):
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            self._update(group, params, grads)
        return loss

    def _state(self, param: Tensor, key: str, make: Callable[[Tensor], Tensor]) -> Tensor:
        """The state tensor ``key`` of ``param``, created by ``make(param)`` on first use."""
        state = self.state[param]
        if key not in state:
            state[key] = make(param)
        return state[key]

    def _step_counters(self, params: list[Tensor], on_device: bool) -> list[Tensor]:
        """Each parameter's step counter (a scalar tensor), created at zero.

        ``on_device`` keeps it on the parameter's device as float32 (for fused kernels);
        otherwise it lives on the CPU with dtype :func:`scalar_dtype`, as in torch's
        foreach implementations.
        """
        counters = []
        for param in params:
            state = self.state[param]
            device = param.device if on_device else torch.device("cpu")
            step = state.get("step")
            if step is None:
                dtype = torch.float32 if on_device else scalar_dtype()
                step = state["step"] = torch.zeros((), dtype=dtype, device=device)
            elif step.device != device:
                step = state["step"] = step.to(device)
            counters.append(step)
        return counters


def scalar_dtype() -> torch.dtype:
    """The dtype of scalar state (step counters, running products): float64 when that is
    torch's default dtype, float32 otherwise, as torch.optim does."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a DTensor (a parameter sharded by FSDP2 or tensor parallelism).

    Looked up in ``sys.modules`` so that optimizers do not import ``torch.distributed.tensor``
    (0.7 s): no DTensor can exist before that module is loaded.
    """
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def zeros_like(param: Tensor) -> Tensor:
    """A zero state tensor shaped and placed like ``param``."""
    return torch.zeros_like(param, memory_format=torch.preserve_format)


def by_device_and_dtype(*tensor_lists: list[Tensor]) -> Iterator[tuple[list[Tensor], ...]]:
    """Split parallel tensor lists into sublists that share a device and a dtype.

    ``torch._foreach_*`` kernels and fused kernels need each call's tensors on one device
    with one dtype; the grouping key is the first list's tensors.
    """
    first = tensor_lists[0]
    if all(t.device == first[0].device and t.dtype == first[0].dtype for t in first):
        yield tensor_lists
        return
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for index, tensor in enumerate(first):
        groups.setdefault((tensor.device, tensor.dtype), []).append(index)
    for indices in groups.values():
        yield tuple([tensors[i] for i in indices] for tensors in tensor_lists)


def fused_kernel_applies(group: dict[str, Any], params: list[Tensor], optimizer: str, dtensors: bool = False) -> bool:
    """Whether ``group``'s ``fused`` option and ``params`` select torch's fused kernel.

    ``fused=None`` (the default) uses it when every parameter is a dense floating-point
    tensor on a CPU or CUDA device; ``fused=True`` demands it; ``fused=False`` never uses it.
    DTensors (FSDP2 shards) qualify only where ``dtensors`` says torch registers the kernel
    for them (Adam's and AdamW's); elsewhere they take the foreach path.
    """
    fused = group["fused"]
    if fused is False:
        return False
    supported = all(
        p.device.type in ("cpu", "cuda") and p.dtype in _FUSED_DTYPES and not torch.is_complex(p)
        and (dtensors or not is_dtensor(p))
        for p in params
    )
    if fused and not supported:
        raise RuntimeError(
            f"{optimizer}(fused=True) needs dense float16/bfloat16/float32/float64 parameters "
            "on a CPU or CUDA device (not DTensors); pass fused=None to fall back to the foreach path"
        )
    return supported


# Elements per cache block on the CPU: 2^18 fp32 values are 1 MiB per tensor, so the few
# tensors and temporaries of one block stay in the L2/L3 caches between foreach passes.
CPU_BLOCK_NUMEL = 2**18


def cache_blocks(*columns: list, block_numel: int = CPU_BLOCK_NUMEL) -> Iterator[tuple[list, ...]]:
    """Cut parallel per-parameter columns into blocks of about ``block_numel`` elements.

    A chain of ``torch._foreach_*`` passes over all parameters streams every tensor and
    temporary through main memory once per pass; on a CPU, running the chain block by block
    keeps them in cache (on a 2-core EPYC it halves RMSprop's step time). Large contiguous
    tensors are split into flat views (updates through the views land in the tensors);
    small ones are gathered until a block is full. Columns that are not tensors (per-parameter
    step sizes, say) are repeated for each piece of their parameter. On other devices the
    columns are yielded whole: a GPU foreach kernel already covers every tensor in one launch;
    so are DTensors, whose flat views would need communication.
    """
    if not columns[0] or columns[0][0].device.type != "cpu" or is_dtensor(columns[0][0]):
        yield columns
        return
    block: list[list] = [[] for _ in columns]
    filled = 0
    for row in zip(*columns):
        tensors = [x for x in row if isinstance(x, Tensor)]
        numel = row[0].numel()
        if numel > block_numel and all(t.is_contiguous() and t.numel() == numel for t in tensors):
            splits = [x.view(-1).split(block_numel) if isinstance(x, Tensor) else None for x in row]
            pieces = [[x] * len(splits[0]) if parts is None else parts for x, parts in zip(row, splits)]
        else:
            pieces = [[x] for x in row]
        for piece in zip(*pieces):
            for column, value in zip(block, piece):
                column.append(value)
            filled += piece[0].numel()
            if filled >= block_numel:
                yield tuple(block)
                block, filled = [[] for _ in columns], 0
    if block[0]:
        yield tuple(block)


def maybe_negate(grads: list[Tensor], maximize: bool) -> list[Tensor]:
    """``-grads`` (new tensors) when maximizing, else ``grads`` unchanged."""
    return list(torch._foreach_neg(grads)) if maximize else grads


def with_l2_penalty(grads: list[Tensor], params: list[Tensor], weight_decay: float) -> list[Tensor]:
    """``grads + weight_decay * params`` (classic L2 weight decay, coupled to the gradient)."""
    if weight_decay == 0:
        return grads
    return list(torch._foreach_add(grads, params, alpha=weight_decay))


def apply_weight_decay(
    params: list[Tensor], grads: list[Tensor], lr: float, weight_decay: float, decoupled: bool
) -> list[Tensor]:
    """Weight decay either way; returns the gradients to use.

    Decoupled (Loshchilov & Hutter 2019): shrink the parameters in place by
    ``1 - lr * weight_decay`` and keep the gradients. Coupled: add the L2 penalty's gradient.
    """
    if not decoupled:
        return with_l2_penalty(grads, params, weight_decay)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    return grads
