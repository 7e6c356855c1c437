"""Mixed precision: fp32, bf16 autocast, or fp16 autocast with dynamic loss scaling.

The parameters and the optimizer state stay in fp32 (the "master weights" of Micikevicius
et al. 2018, arXiv:1710.03740); autocast runs the matrix products of the forward pass in the
low precision and the backward pass follows. fp16's narrow exponent range needs the loss
scaled up before the backward pass and the gradients scaled back before the update; a
``torch.amp.GradScaler`` picks the scale dynamically, halving it and skipping the step when
a gradient overflows and doubling it after 2000 clean steps. bf16 has fp32's exponent range
and needs no scaling.

Supported: fp32 everywhere; bf16 on CPU and on GPUs that support it; fp16 on CUDA only.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from gradwise.validation import check_choice

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Precision:
    """A precision setting bound to a device; ``autocast()`` wraps the forward pass."""

    name: str
    device: torch.device

    def __post_init__(self) -> None:
        check_choice("precision", self.name, PRECISIONS)
        if self.name == "fp16" and self.device.type != "cuda":
            raise ValueError(
                f"precision 'fp16' needs a CUDA device (dynamic loss scaling on GPU), this run is on "
                f"{self.device.type}; use 'bf16' or 'fp32'"
            )
        if self.name == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(
                f"precision 'bf16' is not supported by {torch.cuda.get_device_name(self.device)}; use 'fp16' or 'fp32'"
            )

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.name]

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context for the forward pass and the loss."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A loss scaler: dynamic for fp16, a pass-through (``enabled=False``) otherwise."""
        return torch.amp.GradScaler(self.device.type, enabled=self.name == "fp16")
