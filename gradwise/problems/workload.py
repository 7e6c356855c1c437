"""What the training loop trains: a model, its data, its loss, its evaluation and its target."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from gradwise.problems.data import Batch


class DataStream(Protocol):
    """A resumable source of micro-batches (see :mod:`gradwise.problems.data`)."""

    def next_batch(self) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class Target:
    """The metric a workload is judged by and the value to reach.

    ``higher_is_better`` says the direction; ``baseline`` is a reference value of the same
    metric (the unigram model's loss for a language model, the majority class's accuracy
    for a classifier), with ``baseline_name`` saying what it is.
    """

    metric: str
    value: float
    higher_is_better: bool
    baseline: float
    baseline_name: str

    def reached(self, metrics: dict[str, float]) -> bool:
        measured = metrics[self.metric]
        return measured >= self.value if self.higher_is_better else measured <= self.value


@dataclass
class Workload:
    """A training problem, ready to run.

    Attributes:
        name: registry name.
        model: the model (fp32 parameters).
        train_data: micro-batches of the training split.
        loss: ``(model, batch) -> mean loss`` over the batch (a scalar tensor).
        evaluate: ``(model, full) -> metrics`` on the validation split; ``full=False`` is the
            quick estimate for evaluations during training, ``full=True`` the whole split.
        target: the metric to reach.
        unit: what a row of targets counts, for the throughput ("tokens", "examples").
        description: one line on the data and the model.
        eval_metrics: the names of the metrics ``evaluate`` returns.
        options: the workload's settings, as built.
    """

    name: str
    model: nn.Module
    train_data: DataStream
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    evaluate: Callable[[nn.Module, bool], dict[str, float]]
    target: Target
    unit: str
    description: str
    eval_metrics: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)
