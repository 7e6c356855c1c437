"""The parallel strategies by name: what ``gradwise train --strategy NAME`` runs.

``STRATEGIES[name]`` is a :class:`gradwise.distributed.strategies.base.Strategy` subclass: ``single``
(one process), ``ddp`` (:mod:`~gradwise.distributed.strategies.ddp`), ``zero1``, ``zero2``, ``fsdp``
(:mod:`~gradwise.distributed.strategies.zero`), ``tp``
(:mod:`~gradwise.distributed.strategies.tensor_parallel`), ``pp``
(:mod:`~gradwise.distributed.strategies.pipeline`), ``3d`` (:mod:`~gradwise.distributed.strategies.three_d`),
``localsgd``, ``diloco``
(:mod:`~gradwise.distributed.strategies.local_sgd`). With no
strategy named, one process runs ``single`` and N > 1 processes run ``ddp``.
:func:`check_strategy` validates a name, its options and a world size before any process
starts (the command line calls it before launching ``torchrun``); :func:`make_strategy`
builds one inside a running job.
"""

from __future__ import annotations

from typing import Any

from gradwise.distributed.context import DistContext
from gradwise.distributed.strategies.base import Strategy
from gradwise.distributed.strategies.ddp import DDPStrategy
from gradwise.distributed.strategies.local_sgd import DiLoCoStrategy, LocalSGDStrategy
from gradwise.distributed.strategies.pipeline import PipelineStrategy
from gradwise.distributed.strategies.tensor_parallel import TensorParallelStrategy
from gradwise.distributed.strategies.three_d import ThreeDStrategy
from gradwise.distributed.strategies.zero import FSDPStrategy, Zero2Strategy, ZeroStrategy
from gradwise.validation import check_choice, check_int

STRATEGIES: dict[str, type[Strategy]] = {
    strategy.name: strategy
    for strategy in (Strategy, DDPStrategy, ZeroStrategy, Zero2Strategy, FSDPStrategy, TensorParallelStrategy,
                     PipelineStrategy, ThreeDStrategy, LocalSGDStrategy, DiLoCoStrategy)
}


def default_strategy(world_size: int) -> str:
    """``single`` for one process, ``ddp`` for more."""
    return "single" if world_size == 1 else "ddp"


def check_strategy(name: str | None, options: dict[str, Any], world_size: int) -> str:
    """The strategy's name (the default resolved) after checking its options and ``world_size``."""
    check_int("world size", world_size, 1)
    name = default_strategy(world_size) if name is None else name
    strategy = STRATEGIES[check_choice("strategy", name, STRATEGIES)]
    strategy.check_world_size(world_size, strategy.check_options(options))
    return name


def make_strategy(name: str | None, options: dict[str, Any], context: DistContext | None) -> Strategy:
    """The strategy ``name`` (default by world size) for this process's place in the job."""
    world_size = 1 if context is None else context.world_size
    return STRATEGIES[check_strategy(name, options, world_size)](context, options)


def tensor_parallel_degree(settings: dict[str, Any]) -> int:
    """The tensor-parallel degree a run's settings (a resolved config with its ``world_size``) split tiny-gpt
    over: its checkpoints store each block's qkv rows in that degree's head-wise order
    (:func:`gradwise.problems.tiny_gpt_tensor_parallel.qkv_row_order`; degree 1: the plain order)."""
    options = settings.get("strategy_options") or {}
    if settings.get("strategy") == "tp":
        return int(options.get("tp") or settings.get("world_size") or 1)
    if settings.get("strategy") == "3d":
        return int(options.get("tp", 1))
    return 1
