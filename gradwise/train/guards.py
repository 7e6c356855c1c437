"""Divergence guards: never a silent NaN run.

Every step the loop hands the guard the loss, the global gradient norm and the names of
the parameters whose gradient is not finite. The guard answers with what to do:

* ``update``: all is well, apply the step.
* ``skip``: the loss or a gradient is NaN or infinite; drop this update (counted).
* ``rollback``: the loss spiked above ``spike_factor`` times the median of the last
  ``spike_window`` losses, or ``max_consecutive_skips`` updates in a row were skipped;
  go back to the last good checkpoint and multiply the learning rate by
  ``rollback_lr_factor``.
* ``stop``: a rollback was needed but ``max_rollbacks`` were already spent (or there is
  no checkpoint to go back to); the run ends with a :class:`DivergenceReport`.

The median makes the spike test robust to the single outliers it is looking for; the
test starts once ``spike_window // 2`` losses are in the window.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

from gradwise.validation import check_int, check_range

GRAD_NORM_HISTORY = 20
"""Gradient norms kept for the report."""


@dataclass
class DivergenceReport:
    """What happened when a run could not recover."""

    step: int
    reason: str
    lr: float
    grad_norm_history: list[tuple[int, float]]
    loss_history: list[tuple[int, float]]
    nonfinite_tensors: list[str]
    skipped_steps: int
    rollbacks: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        norms = ", ".join(f"{step}: {norm:.4g}" for step, norm in self.grad_norm_history) or "none"
        losses = ", ".join(f"{step}: {loss:.4g}" for step, loss in self.loss_history) or "none"
        rollbacks = "; ".join(
            f"at step {item['step']} ({item['reason']}) back to step {item['to_step']}, lr x{item['lr_scale']:g}"
            for item in self.rollbacks
        ) or "none"
        return "\n".join([
            f"training stopped at step {self.step}: {self.reason}",
            f"  learning rate: {self.lr:.4g}",
            f"  non-finite gradients in: {', '.join(self.nonfinite_tensors) or 'none'}",
            f"  skipped updates: {self.skipped_steps}",
            f"  rollbacks: {rollbacks}",
            f"  recent gradient norms (step: norm): {norms}",
            f"  recent losses (step: loss): {losses}",
        ])


class TrainingDiverged(RuntimeError):
    """Raised by the loop when the guard says stop; carries the report."""

    def __init__(self, report: DivergenceReport) -> None:
        super().__init__(str(report))
        self.report = report


class NonFiniteWeights(RuntimeError):
    """Raised by the loop when a run ends with a NaN or an infinity in its weights or optimizer state:
    such a run is a failure whatever its guards saw (a few skipped steps need not add up to a rollback)."""


@dataclass
class DivergenceGuard:
    """Tracks loss and gradient norm every step and decides update, skip, rollback or stop."""

    spike_factor: float = 4.0
    spike_window: int = 50
    max_consecutive_skips: int = 5
    rollback_lr_factor: float = 0.5
    max_rollbacks: int = 3
    lr_scale: float = 1.0
    skipped_steps: int = 0
    consecutive_skips: int = 0
    rollbacks: list[dict[str, Any]] = field(default_factory=list)
    losses: deque = field(default_factory=deque)
    grad_norms: deque = field(default_factory=lambda: deque(maxlen=GRAD_NORM_HISTORY))
    last_losses: deque = field(default_factory=lambda: deque(maxlen=GRAD_NORM_HISTORY))
    nonfinite_tensors: list[str] = field(default_factory=list)
    reason: str = ""

    def __post_init__(self) -> None:
        check_range("spike_factor", self.spike_factor, 1.0, low_open=True)
        check_int("spike_window", self.spike_window, 2)
        check_int("max_consecutive_skips", self.max_consecutive_skips, 1)
        check_range("rollback_lr_factor", self.rollback_lr_factor, 0.0, 1.0, low_open=True, high_open=True)
        check_int("max_rollbacks", self.max_rollbacks, 0)
        self.losses = deque(self.losses, maxlen=self.spike_window)

    def check(self, step: int, loss: float, grad_norm: float, nonfinite_tensors: list[str]) -> str:
        """The verdict for ``step``: ``"update"``, ``"skip"`` or ``"rollback"`` (see the module docstring)."""
        self.grad_norms.append((step, grad_norm))
        self.last_losses.append((step, loss))
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            self.skipped_steps += 1
            self.consecutive_skips += 1
            self.nonfinite_tensors = nonfinite_tensors if math.isfinite(loss) else ["loss", *nonfinite_tensors]
            if self.consecutive_skips >= self.max_consecutive_skips:
                self.reason = f"{self.consecutive_skips} updates in a row skipped for non-finite loss or gradients"
                return "rollback"
            return "skip"
        self.consecutive_skips = 0
        if len(self.losses) >= self.spike_window // 2:
            median = statistics.median(self.losses)
            if loss > self.spike_factor * median:
                self.reason = f"loss spike: {loss:.4g} > {self.spike_factor:g} x recent median {median:.4g}"
                return "rollback"
        self.losses.append(loss)
        return "update"

    def can_roll_back(self) -> bool:
        return len(self.rollbacks) < self.max_rollbacks

    def record_rollback(self, step: int, to_step: int) -> float:
        """Note a rollback from ``step`` to the checkpoint of ``to_step``; returns the new lr scale."""
        self.lr_scale *= self.rollback_lr_factor
        self.rollbacks.append({"step": step, "to_step": to_step, "reason": self.reason, "lr_scale": self.lr_scale})
        self.consecutive_skips = 0
        self.losses.clear()
        return self.lr_scale

    def report(self, step: int, lr: float, reason: str) -> DivergenceReport:
        return DivergenceReport(
            step=step,
            reason=reason,
            lr=lr,
            grad_norm_history=list(self.grad_norms),
            loss_history=list(self.last_losses),
            nonfinite_tensors=list(self.nonfinite_tensors),
            skipped_steps=self.skipped_steps,
            rollbacks=list(self.rollbacks),
        )

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the counters and the loss window (for exact resume)."""
        return {
            "lr_scale": self.lr_scale,
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
            "rollbacks": list(self.rollbacks),
            "losses": list(self.losses),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lr_scale = state["lr_scale"]
        self.skipped_steps = state["skipped_steps"]
        self.consecutive_skips = state["consecutive_skips"]
        self.rollbacks = list(state["rollbacks"])
        self.losses = deque(state["losses"], maxlen=self.spike_window)
