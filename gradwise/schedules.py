"""Learning-rate schedules: pure functions ``step -> lr multiplier``, and an adaptor to torch.

A schedule is a callable that takes a training step ``s = 0, 1, 2, ...`` and returns the
multiplier of the peak learning rate to use for that step: the lr of step ``s`` is
``peak * schedule(s)``. Each factory below validates its arguments and returns such a
callable, in the style of optax; they compose with :func:`join_schedules`.

Conventions shared by every schedule here:

* **Warmup.** A warmup of ``W`` steps rises linearly from ``1/W`` to 1: step ``s < W`` has
  multiplier ``(s + 1) / W``, so the first step already learns and step ``W - 1`` is at the
  peak. ``W = 0`` means no warmup.
* **Decay.** After warmup, a decaying schedule of ``total_steps = T`` runs its shape over
  the ``T - W`` remaining steps with progress ``p = (s - W) / (T - W)``; it starts at the
  peak (``p = 0``) and reaches ``floor`` at ``s = T``. The last step of training,
  ``s = T - 1``, is one step short of the floor, as in torch's ``CosineAnnealingLR``.
* **After the end.** From step ``T`` on, the schedule holds its final value ``floor``.
* **Floor** is a fraction of the peak in ``[0, 1]``, not an absolute lr.

Typical use, with any ``torch.optim`` or ``gradwise.optim`` optimizer::

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    scheduler = ScheduleLR(optimizer, cosine(total_steps=1000, warmup_steps=100, floor=0.1))
    for batch in batches:
        loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
"""

from __future__ import annotations

import bisect
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from gradwise.validation import check_choice, check_int, check_range

Schedule = Callable[[int], float]
"""A learning-rate schedule: ``step -> multiplier of the peak lr``."""

WSD_TAILS = ("linear", "1-sqrt")


def _check_step(step: Any) -> int:
    return check_int("step", step, 0)


def _check_floor(floor: Any) -> float:
    return float(check_range("floor", floor, 0.0, 1.0))


def _check_steps(total_steps: Any, warmup_steps: Any) -> tuple[int, int]:
    total = check_int("total_steps", total_steps, 1)
    return total, check_int("warmup_steps", warmup_steps, 0, total)


def _progress(step: int, length: int) -> float:
    """Fraction ``step / length`` of a phase that is done, held at 1 after its end."""
    return 1.0 if step >= length else step / length


def _above_floor(floor: float, fraction: float) -> float:
    """``floor + (1 - floor) * fraction``: monotone in ``fraction``, exactly ``floor`` at 0 and 1 at 1."""
    return floor + (1.0 - floor) * fraction


def constant() -> Schedule:
    """The peak lr at every step: ``m(s) = 1``."""

    def schedule(step: int) -> float:
        _check_step(step)
        return 1.0

    return schedule


def linear_warmup(warmup_steps: int) -> Schedule:
    """A linear warmup to the peak, then the peak for ever.

    ``m(s) = (s + 1) / W`` for ``s < W``, and ``m(s) = 1`` for ``s >= W``. The rise starts at
    ``1/W`` rather than 0 so that no step is spent with a zero lr. This is the warmup piece
    that every other schedule here starts with (see :func:`join_schedules`); on its own it
    is "constant with warmup". Warmup for large-batch SGD: Goyal et al. 2017,
    arXiv:1706.02677.
    """
    warmup = check_int("warmup_steps", warmup_steps, 0)

    def schedule(step: int) -> float:
        step = _check_step(step)
        return (step + 1) / warmup if step < warmup else 1.0

    return schedule


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Run ``schedules[i]`` from ``boundaries[i - 1]`` to ``boundaries[i]``, each on its own clock.

    With boundaries ``b_1 <= ... <= b_k`` (and ``b_0 = 0``), step ``s`` with
    ``b_i <= s < b_{i+1}`` gets ``schedules[i](s - b_i)``: every piece sees its first step
    as step 0. The last piece runs for ever. Like ``optax.join_schedules``.
    """
    if len(schedules) != len(boundaries) + 1:
        raise ValueError(
            f"join_schedules needs one more schedule than boundaries, "
            f"got {len(schedules)} schedules and {len(boundaries)} boundaries"
        )
    starts = [0]
    for index, boundary in enumerate(boundaries):
        starts.append(check_int(f"boundaries[{index}]", boundary, starts[-1]))
    pieces = list(schedules)

    def schedule(step: int) -> float:
        step = _check_step(step)
        index = bisect.bisect_right(starts, step) - 1
        return pieces[index](step - starts[index])

    return schedule


def _after_warmup(warmup_steps: int, decay: Schedule) -> Schedule:
    return join_schedules([linear_warmup(warmup_steps), decay], [warmup_steps])


def _cosine_decay(length: int, floor: float) -> Schedule:
    return lambda step: _above_floor(floor, 0.5 * (1.0 + math.cos(math.pi * _progress(step, length))))


def _linear_decay(length: int, floor: float) -> Schedule:
    return lambda step: _above_floor(floor, 1.0 - _progress(step, length))


def _sqrt_decay(length: int, floor: float) -> Schedule:
    return lambda step: _above_floor(floor, 1.0 - math.sqrt(_progress(step, length)))


def cosine(total_steps: int, warmup_steps: int = 0, floor: float = 0.0) -> Schedule:
    """Linear warmup, then a half cosine from the peak down to ``floor`` at ``total_steps``.

    ``m(s) = floor + (1 - floor) * (1 + cos(pi * p)) / 2`` with ``p = (s - W) / (T - W)``,
    after the warmup of the module conventions; ``floor`` from step ``T`` on. Halfway
    through the decay the multiplier is ``(1 + floor) / 2``.
    Reference: Loshchilov & Hutter 2017, "SGDR: Stochastic Gradient Descent with Warm
    Restarts", arXiv:1608.03983 (one cycle, no restart).
    """
    total, warmup = _check_steps(total_steps, warmup_steps)
    return _after_warmup(warmup, _cosine_decay(total - warmup, _check_floor(floor)))


def linear_decay(total_steps: int, warmup_steps: int = 0, floor: float = 0.0) -> Schedule:
    """Linear warmup, then a straight line from the peak down to ``floor`` at ``total_steps``.

    ``m(s) = floor + (1 - floor) * (1 - p)`` with ``p = (s - W) / (T - W)``, after the warmup
    of the module conventions; ``floor`` from step ``T`` on. The decay of BERT (Devlin et al.
    2018, arXiv:1810.04805); Defazio et al. 2023, arXiv:2310.07831, argue it is the best
    default.
    """
    total, warmup = _check_steps(total_steps, warmup_steps)
    return _after_warmup(warmup, _linear_decay(total - warmup, _check_floor(floor)))


def wsd(
    total_steps: int,
    warmup_steps: int = 0,
    decay_fraction: float = 0.2,
    tail: str = "linear",
    floor: float = 0.0,
) -> Schedule:
    """Warmup-stable-decay: warmup, the peak for most of training, then a short decay tail.

    The tail lasts ``D = round(decay_fraction * T)`` steps, a fraction of all training
    steps (warmup included), and ends at ``T``. With ``p = (s - (T - D)) / D``::

        m(s) = (s + 1) / W                        for s < W          (warmup)
        m(s) = 1                                  for W <= s < T - D  (stable)
        m(s) = floor + (1 - floor) * (1 - p)      for T - D <= s      (tail="linear")
        m(s) = floor + (1 - floor) * (1 - sqrt p) for T - D <= s      (tail="1-sqrt")

    and ``floor`` from step ``T`` on. The tail must fit after the warmup, so
    ``decay_fraction <= (T - W) / T``; with ``decay_fraction = 0`` the lr drops to ``floor``
    at ``T`` itself. References: Hu et al. 2024, "MiniCPM", arXiv:2404.06395 (WSD);
    Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training
    Durations", arXiv:2405.18392 (the 1-sqrt tail and a 20% decay fraction).
    """
    total, warmup = _check_steps(total_steps, warmup_steps)
    check_range("decay_fraction", decay_fraction, 0.0, 1.0)
    check_range("decay_fraction", decay_fraction, 0.0, (total - warmup) / total)  # the tail fits after warmup
    check_choice("tail", tail, WSD_TAILS)
    floor = _check_floor(floor)
    decay = round(decay_fraction * total)
    shape = _linear_decay if tail == "linear" else _sqrt_decay
    return join_schedules([linear_warmup(warmup), constant(), shape(decay, floor)], [warmup, total - decay])


def cosine_with_restarts(T_0: int, T_mult: int = 1, floor: float = 0.0, warmup_steps: int = 0) -> Schedule:
    """Linear warmup, then cosine cycles that restart at the peak (SGDR).

    Cycle ``i`` lasts ``T_i = T_0 * T_mult**i`` steps; within it, at ``t`` steps since its
    start, ``m = floor + (1 - floor) * (1 + cos(pi * t / T_i)) / 2``. Restarts happen
    ``T_0, T_0 (1 + T_mult), T_0 (1 + T_mult + T_mult**2), ...`` steps after the warmup
    (for ``T_0 = 10, T_mult = 2``: at 10, 30, 70). The cycles go on for ever: this schedule
    has no end and no final value. Names as in torch's ``CosineAnnealingWarmRestarts``.
    Reference: Loshchilov & Hutter 2017, "SGDR: Stochastic Gradient Descent with Warm
    Restarts", arXiv:1608.03983.
    """
    first = check_int("T_0", T_0, 1)
    growth = check_int("T_mult", T_mult, 1)
    floor = _check_floor(floor)
    warmup = check_int("warmup_steps", warmup_steps, 0)

    def cycles(step: int) -> float:
        length = first
        if growth == 1:
            step %= length
        while step >= length:
            step -= length
            length *= growth
        return _above_floor(floor, 0.5 * (1.0 + math.cos(math.pi * step / length)))

    return _after_warmup(warmup, cycles)


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "constant": constant,
    "linear_warmup": linear_warmup,
    "cosine": cosine,
    "linear_decay": linear_decay,
    "wsd": wsd,
    "cosine_with_restarts": cosine_with_restarts,
}
"""Every schedule by name, for configuration files and the command line."""

_RUN_SETTINGS = ("total_steps", "warmup_steps")


def _parameters(factory: Callable[..., Schedule]) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(factory).parameters)


SCHEDULE_OPTIONS: tuple[str, ...] = tuple(
    sorted({name for factory in SCHEDULES.values() for name in _parameters(factory)} - set(_RUN_SETTINGS))
)
"""The options some schedule takes beyond the run's length and warmup."""


def make_schedule(name: str, total_steps: int, warmup_steps: int = 0, **options: Any) -> Schedule:
    """Build the schedule ``name`` for a run of ``total_steps`` with ``warmup_steps`` of warmup.

    One set of settings builds every schedule: each factory gets the settings and options
    it takes and ignores the rest (``constant`` has no warmup and no floor,
    ``cosine_with_restarts`` no length, only ``wsd`` a ``tail``). ``total_steps`` and
    ``warmup_steps`` are checked for every schedule; an option that no schedule takes, or
    a missing one that the schedule needs (``T_0``), is an error. Example::

        make_schedule("wsd", 1000, 100, decay_fraction=0.1, tail="1-sqrt", T_0=50)
    """
    check_choice("schedule", name, SCHEDULES)
    _check_steps(total_steps, warmup_steps)
    for option in options:
        check_choice("schedule option", option, SCHEDULE_OPTIONS)
    settings = {"total_steps": total_steps, "warmup_steps": warmup_steps, **options}
    arguments = {}
    for parameter in _parameters(SCHEDULES[name]).values():
        if parameter.name in settings:
            arguments[parameter.name] = settings[parameter.name]
        elif parameter.default is inspect.Parameter.empty:
            raise ValueError(f"schedule {name!r} needs the option {parameter.name}")
    return SCHEDULES[name](**arguments)


def area_under(schedule: Schedule, total_steps: int, peak: float) -> float:
    """The total learning-rate budget of a run: ``sum_{s=0}^{T-1} peak * schedule(s)``.

    This is the sum of the per-step lrs over the ``T`` steps of training (a Riemann sum
    with unit width, not an integral), summed with ``math.fsum``: the quantity to hold
    fixed when comparing schedules at an equal lr budget.
    """
    total = check_int("total_steps", total_steps, 1)
    peak = float(check_range("peak", peak, 0.0))
    return peak * math.fsum(schedule(step) for step in range(total))


class ScheduleLR(LRScheduler):
    """Drive any optimizer's learning rates by a schedule, through torch's ``LRScheduler``.

    The lr of each param group at step ``s`` is ``group["initial_lr"] * schedule(s)``, so
    groups keep their ratios (as with ``LambdaLR``); ``initial_lr`` is the group's ``lr``
    when the scheduler is created. Works with every ``torch.optim.Optimizer`` subclass,
    torch's and gradwise's, and with tensor lrs.

    Resuming: ``state_dict()`` holds the step counter and the base lrs, never the schedule,
    so it is saved by ``torch.save`` and loaded by ``torch.load`` with ``weights_only=True``.
    Build the resumed scheduler with the same schedule; ``load_state_dict`` checks it
    against the lrs the checkpoint recorded, raises ``ValueError`` on a mismatch, and sets
    the optimizer's lrs to the checkpoint's step, so the lr sequence continues exactly
    whether or not the optimizer's own state is loaded too. Example::

        scheduler = ScheduleLR(optimizer, wsd(total_steps=10_000, warmup_steps=500))
        torch.save({"scheduler": scheduler.state_dict(), ...}, path)
        ...
        scheduler = ScheduleLR(optimizer, wsd(total_steps=10_000, warmup_steps=500))
        scheduler.load_state_dict(torch.load(path, weights_only=True)["scheduler"])
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: Schedule, last_epoch: int = -1) -> None:
        if not callable(schedule):
            raise TypeError(f"schedule must be a callable step -> multiplier, got {schedule!r}")
        self.schedule = schedule
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float | torch.Tensor]:
        """The lr of each param group at step ``last_epoch``."""
        multiplier = self.schedule(self.last_epoch)
        return [base_lr * multiplier for base_lr in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state: every attribute except the optimizer and the schedule."""
        return {key: value for key, value in self.__dict__.items() if key not in ("optimizer", "schedule")}

    def load_state_dict(self, state_dict: dict[str, Any], *, rescheduled: bool = False) -> None:
        """Resume from :meth:`state_dict`, checking that this scheduler's schedule matches it.

        ``rescheduled=True`` is for a run whose schedule changed on purpose (a resumed run of
        another length): the step and the base lrs are the checkpoint's, the lrs this
        scheduler's schedule gives at that step, and nothing is compared.
        """
        step = state_dict["last_epoch"]
        multiplier = self.schedule(step)
        lrs = [base_lr * multiplier for base_lr in state_dict["base_lrs"]]
        if rescheduled:
            state_dict = {**state_dict, "_last_lr": lrs}
        for index, (lr, recorded) in enumerate(zip(lrs, state_dict["_last_lr"], strict=True)):
            if not math.isclose(float(lr), float(recorded), rel_tol=1e-9, abs_tol=1e-15):
                raise ValueError(
                    f"the schedule gives param group {index} lr {float(lr):g} at step {step}, but the "
                    f"checkpoint recorded {float(recorded):g}: build the scheduler with the schedule "
                    f"it was saved with"
                )
        self.__dict__.update(state_dict)
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(float(lr))
            else:
                group["lr"] = lr

    def rescale(self, factor: float) -> None:
        """Multiply every learning rate of the run by ``factor`` from now on: the base lrs, the last
        lrs and each param group's ``initial_lr`` and ``lr`` (a tensor lr in place).

        The schedule's shape and step are kept, so the lr of every later step is ``factor`` times
        what it would have been; this is how a divergence guard lowers the lr after a rollback.
        """
        check_range("factor", factor, 0.0, low_open=True)
        self.base_lrs = [base * factor for base in self.base_lrs]
        self._last_lr = [lr * factor for lr in self._last_lr]
        for group in self.optimizer.param_groups:
            group["initial_lr"] *= factor
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].mul_(factor)
            else:
                group["lr"] *= factor
