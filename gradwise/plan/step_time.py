r"""Step time of data-parallel training and time to solution, by number format.

Compute: a dense transformer spends about :math:`6\Psi` FLOPs per token in the forward and
backward pass (2 forward, 4 backward; Kaplan et al. 2020, arXiv:2001.08361), so a step over
:math:`T` tokens split among :math:`p` devices of throughput :math:`R` FLOP/s takes
:math:`t_c = 6\Psi T / (pR)`, a third of it forward, two thirds backward.

Communication: the gradients (:math:`\Psi g` bytes in a format of :math:`g` bytes) are
all-reduced in buckets of :math:`B` bytes (PyTorch DDP's default is 25 MiB; Li et al. 2020,
"PyTorch Distributed", arXiv:2006.15704); every bucket pays the collective's latency term,
so :math:`t_m = \lceil \Psi g / B \rceil\, m\alpha + V\beta` with the :mod:`communication`
model's messages :math:`m` and volume :math:`V`. ZeRO stage 3 replaces the all-reduce by a
reduce-scatter of the gradients and two all-gathers of the weights (forward and backward):
1.5x the volume (Rajbhandari et al. 2019, arXiv:1910.02054).

Without overlap the step takes :math:`t_c + t_m`. With overlap, buckets are reduced while
the backward pass goes on, and only the last bucket waits for its end:
:math:`t_f + \max(t_b + t_{\text{last}}, t_m)`.

A faster number format shrinks :math:`g` and raises :math:`R`; it may need more steps to
reach the same loss. Time to solution is steps x step time. When the latency term dominates
(many devices, a model that fits in a bucket or two), neither fewer bytes nor faster math
shortens the step: that is where a faster format stops helping.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from gradwise.plan.communication import AlphaBeta, collective_time, terms
from gradwise.plan.memory import PRECISIONS
from gradwise.validation import check_choice, check_int, check_range

DDP_BUCKET_BYTES = 25 * 2**20
FLOPS_PER_PARAM_TOKEN = 6


@dataclass(frozen=True)
class StepTime:
    """Seconds of one data-parallel step, by part."""

    compute: float
    communication: float
    latency: float  # the latency part of ``communication``
    total: float
    overlap: bool

    @property
    def latency_share(self) -> float:
        return self.latency / self.total if self.total > 0 else 0.0


def compute_time(flops: float, throughput: float) -> float:
    """Seconds for ``flops`` floating-point operations at ``throughput`` FLOP/s."""
    check_range("flops", flops, 0.0)
    check_range("throughput", throughput, 0.0, low_open=True)
    return flops / throughput


def gradient_sync_time(
    link: AlphaBeta,
    gradient_bytes: float,
    devices: int,
    bucket_bytes: float = DDP_BUCKET_BYTES,
    zero_stage: int = 0,
) -> tuple[float, float, float]:
    """(total, latency part, last bucket) seconds to synchronise ``gradient_bytes`` over ``devices``."""
    check_range("gradient_bytes", gradient_bytes, 0.0)
    check_range("bucket_bytes", bucket_bytes, 0.0, low_open=True)
    check_choice("zero_stage", zero_stage, (0, 1, 2, 3))
    buckets = max(1, math.ceil(gradient_bytes / bucket_bytes))
    bucket = gradient_bytes / buckets
    collectives = (["ring_all_reduce"] if zero_stage < 3
                   else ["ring_reduce_scatter", "ring_all_gather", "ring_all_gather"])
    latency = per_bucket = 0.0
    for algorithm in collectives:
        messages, _ = terms(algorithm, bucket, devices)
        latency += buckets * messages * link.alpha
        per_bucket += collective_time(link, algorithm, bucket, devices)
    return buckets * per_bucket, latency, per_bucket


def data_parallel_step_time(
    params: float,
    tokens_per_step: float,
    devices: int,
    throughput: float,
    link: AlphaBeta,
    gradient_bytes_per_param: float,
    overlap: bool = True,
    bucket_bytes: float = DDP_BUCKET_BYTES,
    zero_stage: int = 0,
) -> StepTime:
    """Seconds per step of data-parallel training of a ``params``-parameter model on
    ``tokens_per_step`` tokens (the global batch) over ``devices`` devices."""
    check_range("params", params, 0.0, low_open=True)
    check_range("tokens_per_step", tokens_per_step, 0.0, low_open=True)
    check_int("devices", devices, 1)
    compute = compute_time(FLOPS_PER_PARAM_TOKEN * params * tokens_per_step / devices, throughput)
    sync, latency, last = gradient_sync_time(
        link, params * gradient_bytes_per_param, devices, bucket_bytes, zero_stage
    )
    if overlap:
        forward, backward = compute / 3, 2 * compute / 3
        total = forward + max(backward + last, sync)
    else:
        total = compute + sync
    return StepTime(compute, sync, latency, total, overlap)


@dataclass(frozen=True)
class FormatPlan:
    """Step time and time to solution of one number format."""

    precision: str
    throughput: float
    step: StepTime
    steps_to_solution: float
    time_to_solution: float


def compare_formats(
    params: float,
    tokens_per_step: float,
    devices: int,
    link: AlphaBeta,
    throughputs: dict[str, float],
    steps: float = 1.0,
    step_factors: dict[str, float] | None = None,
    overlap: bool = True,
    bucket_bytes: float = DDP_BUCKET_BYTES,
    zero_stage: int = 0,
) -> list[FormatPlan]:
    """Step time and time to solution per number format: ``throughputs`` maps a precision
    (see :data:`gradwise.plan.memory.PRECISIONS`) to its FLOP/s per device, ``steps`` is the
    number of steps to the target in the reference format and ``step_factors`` the extra
    steps a format needs (1.1: ten percent more)."""
    check_range("steps", steps, 0.0, low_open=True)
    factors = step_factors or {}
    plans = []
    for name, throughput in throughputs.items():
        fmt = PRECISIONS[check_choice("precision", name, PRECISIONS)]
        factor = check_range(f"step factor of {name}", factors.get(name, 1.0), 0.0, low_open=True)
        step = data_parallel_step_time(
            params, tokens_per_step, devices, throughput, link, fmt.grad_bytes, overlap, bucket_bytes, zero_stage
        )
        plans.append(FormatPlan(name, throughput, step, steps * factor, steps * factor * step.total))
    return plans


def measure_matmul_throughput(dtype: torch.dtype = torch.float32, size: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a ``size x size`` matrix product on this machine's CPU (the median of
    ``repeats`` timings, each ``2 size^3`` FLOPs)."""
    check_int("size", size, 1)
    check_int("repeats", repeats, 1)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    torch.mm(a, b)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    times.sort()
    return 2.0 * size**3 / times[len(times) // 2]
