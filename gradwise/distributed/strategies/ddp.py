"""Data parallel training with ``DistributedDataParallel``, optional gradient compression, bytes counted.

Every rank holds the whole model and computes the gradient of its slice of the global
batch; DDP all-reduces the gradients in buckets while the backward pass runs, so after it
every rank holds ``g = (1/N) sum_r g_r``, the gradient of the global batch's mean loss
(Li et al. 2020, "PyTorch Distributed", arXiv:2006.15704). With gradient accumulation the
all-reduce runs once per step: the non-final micro-batches run under ``no_sync()``, which
lets the gradients accumulate locally.

Compression, through DDP communication hooks (``strategy_options compression=...``):

* ``fp16``/``bf16``: each bucket is cast to 16 bits, all-reduced and cast back (half the
  bytes). bf16 needs NCCL; gloo refuses it.
* ``powersgd``: rank-``rank`` approximation ``M ~ P Q^T`` of each gradient matrix by one
  power iteration with error feedback (Vogels et al. 2019, arXiv:1905.13727); an
  ``n x m`` matrix sends ``(n + m) * rank`` numbers instead of ``n m``; vectors (biases) and
  matrices not worth compressing (``(n + m) rank * 2 >= n m``) are sent whole. The first
  ``start_iter`` steps send everything, uncompressed (the hook's warm-up).

Every bucket goes through a hook that counts its payload before calling the reducing hook
(plain ``allreduce_hook`` when uncompressed), so ``bytes_communicated`` is exact: what this
rank hands to the all-reduce.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel

from gradwise.distributed.context import DistContext
from gradwise.distributed.strategies.base import Strategy
from gradwise.validation import check_choice, check_int

COMPRESSIONS = ("none", "fp16", "bf16", "powersgd")


def powersgd_payload(state: powerSGD_hook.PowerSGDState, bucket: dist.GradBucket) -> int:
    """Bytes the PowerSGD hook all-reduces for ``bucket`` at the state's current iteration.

    Mirrors the hook's own choice (its ``_should_compress`` on each tensor viewed as an
    ``n x m`` matrix, a vector as ``n x 1``): before ``start_powerSGD_iter`` the whole bucket;
    then ``(n + m) r`` numbers (P and Q) per compressed matrix and every number of the
    tensors sent whole.
    """
    buffer = bucket.buffer()
    if state.iter < state.start_powerSGD_iter:
        return buffer.numel() * buffer.element_size()
    count = 0
    for tensor in bucket.gradients():
        rows, columns = tensor.view(tensor.shape[0], -1).shape
        rank = min(rows, columns, state.matrix_approximation_rank)
        compress, whole, compressed = powerSGD_hook._should_compress(rows, columns, rank, state.min_compression_rate)
        count += compressed if compress else whole
    return count * buffer.element_size()


class DDPStrategy(Strategy):
    """``DistributedDataParallel`` over the whole group; the data split by rank."""

    name = "ddp"
    min_world_size = 2
    max_world_size = None
    options = {"compression": "none", "rank": 1, "start_iter": 2, "bucket_mb": 25}
    """``compression`` (none, fp16, bf16, powersgd); PowerSGD's approximation ``rank`` and warm-up steps
    ``start_iter`` (at least 2, the hook's minimum with error feedback); DDP's bucket size in MB."""

    def __init__(self, context: DistContext | None, options: dict[str, Any] | None = None) -> None:
        super().__init__(context, options)
        self.module: DistributedDataParallel | None = None

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        settings = super().check_options(options)
        check_choice("compression", settings["compression"], COMPRESSIONS)
        check_int("rank", settings["rank"], 1)
        check_int("start_iter", settings["start_iter"], 2)
        check_int("bucket_mb", settings["bucket_mb"], 1)
        return settings

    def wrap_model(self, model: nn.Module) -> nn.Module:
        context = self.joined
        if self.settings["compression"] == "bf16" and context.backend != "nccl":
            raise ValueError(f"compression 'bf16' needs the nccl backend (CUDA); this job runs on "
                             f"{context.backend}; use compression=fp16 or powersgd")
        device_ids = [context.device.index] if context.device.type == "cuda" else None
        self.module = DistributedDataParallel(model, device_ids=device_ids, bucket_cap_mb=self.settings["bucket_mb"])
        hook, state, payload = self.communication_hook()
        self.module.register_comm_hook(state, self.counted(hook, payload))
        return self.module

    def communication_hook(self) -> tuple[Callable, Any, Callable[[Any, dist.GradBucket], int]]:
        """The reducing hook, its state and the bytes it sends for a bucket."""
        compression = self.settings["compression"]

        def whole(state: Any, bucket: dist.GradBucket) -> int:
            buffer = bucket.buffer()
            return buffer.numel() * buffer.element_size()

        def half(state: Any, bucket: dist.GradBucket) -> int:
            return bucket.buffer().numel() * 2

        if compression == "none":
            return default_hooks.allreduce_hook, None, whole
        if compression == "fp16":
            return default_hooks.fp16_compress_hook, None, half
        if compression == "bf16":
            return default_hooks.bf16_compress_hook, None, half
        state = powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=self.settings["rank"],
            start_powerSGD_iter=self.settings["start_iter"], random_seed=0,
        )
        return powerSGD_hook.powerSGD_hook, state, powersgd_payload

    def counted(self, hook: Callable, payload: Callable[[Any, dist.GradBucket], int]) -> Callable:
        def counting_hook(state, bucket):  # unannotated: DDP checks annotations against the real classes
            self.bytes_communicated += payload(state, bucket)
            return hook(state, bucket)

        return counting_hook

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        if last:
            yield
        else:
            if self.module is None:
                raise RuntimeError("micro_batch before wrap_model: there is no DistributedDataParallel yet")
            with self.module.no_sync():
                yield
