r"""Schedule-free AdamW and SGD: iterate averaging in place of a learning-rate schedule.

Defazio, Yang, Mehta, Mishchenko, Khaled, Cutkosky 2024, "The Road Less Scheduled",
arXiv:2405.15682 (Algorithm 1), as the authors' package ``schedulefree`` 1.4
(``AdamWScheduleFree``, ``SGDScheduleFree``) implements it. Three sequences:

.. math::
    y_t = (1-\beta)\,z_t + \beta\,x_t, \qquad
    z_{t+1} = z_t - \gamma_t\,\hat g_t, \qquad
    x_{t+1} = (1-c_{t+1})\,x_t + c_{t+1}\,z_{t+1},

the gradient taken at :math:`y_t`. :math:`z` is the base (SGD or Adam-normalised) sequence,
:math:`x` a weighted average of the :math:`z`'s, the point to evaluate and deploy, and
:math:`y` the interpolation between them where gradients are taken, with :math:`\beta` the
momentum (``momentum`` for SGD, ``betas[0]`` for AdamW). The averaging weights

.. math::
    c_{t+1} = \frac{w_t}{\sum_{i \le t} w_i}, \qquad
    w_t = t^{\,r}\,\big(\max_{i \le t} \gamma_i\big)^{p}

(``r``, ``weight_lr_power`` = :math:`p`, 2 in the paper) give later iterates, and those of
larger learning rates, more weight; with ``r = 0`` and a constant :math:`\gamma` the average
is uniform. :math:`\gamma_t = \gamma \min(1, t / T_w)` with ``warmup_steps`` = :math:`T_w`
(warmup inside the optimizer, as the package's; a run may instead warm ``lr`` up from
outside with a constant schedule after it, the same steps). No decaying schedule: the
average does what a decay would, which is the point of the method.

The direction :math:`\hat g_t`, with weight decay :math:`\lambda` taken at :math:`y_t` (the
paper's choice, the package's too):

- SGD: :math:`\hat g_t = g_t + \lambda y_t` (coupled L2);
- AdamW: :math:`v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2` and
  :math:`\hat g_t = g_t / (\sqrt{v_t / (1-\beta_2^t)} + \epsilon) + \lambda y_t` (no first
  moment: the interpolation is the momentum; the decay decoupled from the normalisation, as
  AdamW's, and scaled by :math:`\gamma_t`).

Only :math:`y` (the parameters while training) and :math:`z` are stored:
:math:`y_{t+1} = (1-\beta)z_{t+1} + \beta x_{t+1}` updates in place as
:math:`y \leftarrow y + c_{t+1}(z_t - y) + \gamma_t(\beta(1-c_{t+1}) - 1)\,\hat g_t`, then
:math:`z \leftarrow z - \gamma_t \hat g_t`. ``eval()`` moves the parameters to
:math:`x = y + (1 - 1/\beta)(z - y)`, ``train()`` back to :math:`y = x + (1-\beta)(z - x)`
(the round trip is exact in real numbers, to rounding in floating point).

Differences from the package, none in the iterates: the optimizer starts in training mode
(before the first step :math:`x = y = z`, so both modes hold the same weights and a torch
training loop that never calls ``train()`` works); ``step()`` in evaluation mode raises a
``RuntimeError``; the gradients are not overwritten (the package divides ``p.grad`` in
place); ``maximize`` is offered. The state_dict has the package's keys (``z``,
``exp_avg_sq``; the group's ``k``, ``weight_sum``, ``lr_max``, ``train_mode``), so a
checkpoint of either continues in the other.

State: :math:`z` (SGD; 4 bytes per fp32 parameter, as SGD with momentum) or :math:`z` and
:math:`v` (AdamW; 8 bytes, as AdamW); the step count and weight sum are per param group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gradwise.optim.base import (
    GradwiseOptimizer,
    ParamsT,
    by_device_and_dtype,
    cache_blocks,
    lr_value,
    maybe_negate,
    zeros_like,
)
from gradwise.optim.description import Description, Preset, moments
from gradwise.validation import check_betas, check_bool, check_int, check_range

# What a group tracks besides its hyperparameters (the package's names): the step count, the
# sum of the averaging weights, the largest learning rate so far, and the mode.
_COUNTERS = {"k": 0, "weight_sum": 0.0, "lr_max": -1.0, "train_mode": True}


def _clone(param: Tensor) -> Tensor:
    return torch.clone(param, memory_format=torch.preserve_format).detach()


class _ScheduleFree(GradwiseOptimizer):
    """The schedule-free machinery shared by both classes: the averaging weights, the in-place
    :math:`y, z` updates and the ``train()``/``eval()`` switch; a subclass gives its momentum
    :math:`\\beta` and its direction :math:`\\hat g`."""

    def __init__(self, params: ParamsT, defaults: dict[str, Any]) -> None:
        super().__init__(params, {**defaults, **_COUNTERS})

    def _beta(self, group: dict[str, Any]) -> float:
        """The interpolation :math:`\\beta` between :math:`z` and :math:`x`."""
        raise NotImplementedError

    def _validate_schedule(self, group: dict[str, Any]) -> None:
        check_int("warmup_steps", group["warmup_steps"], 0)
        check_range("r", group["r"], 0.0)
        check_range("weight_lr_power", group["weight_lr_power"], 0.0)
        # the counters arrive from a state_dict too: a hostile one is refused, not stepped
        check_int("k", group["k"], 0)
        check_range("weight_sum", group["weight_sum"], 0.0)
        check_range("lr_max", group["lr_max"], -1.0)
        check_bool("train_mode", group["train_mode"])

    # The averaging weight is a Python number that changes every step (the package's group
    # counters, kept so that checkpoints interchange): a compiled step would specialise on it and
    # recompile at every step, so the step runs eagerly inside a compiled region (a graph break).
    # torch._disable_dynamo, as torch.optim uses it: torch.compiler.disable would import
    # torch._dynamo (1.3 s) when this module loads, in every CLI command.
    @torch._disable_dynamo
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        r"""One step from :math:`y_t`: advance each group's averaging weight, then update
        :math:`y` and :math:`z` (in training mode only)."""
        for group in self.param_groups:
            if not group["train_mode"]:
                raise RuntimeError(
                    f"{type(self).__name__}.step() in evaluation mode: the parameters hold x; "
                    "call optimizer.train() before training steps"
                )
        for group in self.param_groups:  # as the package: every group counts the step
            k = group["k"] + 1
            lr = lr_value(group) * self._warmup(group, k)
            group["lr_max"] = max(lr, group["lr_max"])
            group["weight_sum"] += k ** group["r"] * group["lr_max"] ** group["weight_lr_power"]
            group["k"] = k
        return super().step(closure)

    @staticmethod
    def _warmup(group: dict[str, Any], k: int) -> float:
        """:math:`\\min(1, k / T_w)` at step ``k`` (1-based)."""
        warmup = group["warmup_steps"]
        return k / warmup if k <= warmup else 1.0

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        k = group["k"]
        lr = group["lr"] * self._warmup(group, k)
        weight = k ** group["r"] * group["lr_max"] ** group["weight_lr_power"]
        average = weight / group["weight_sum"] if group["weight_sum"] > 0 else 0.0  # c_{t+1}
        beta = self._beta(group)
        zs = [self._state(p, "z", _clone) for p in params]
        grads = maybe_negate(grads, group["maximize"])
        for columns in by_device_and_dtype(params, grads, zs, *self._buffers(params)):
            # block by block on a CPU, so that the direction's temporaries stay in cache
            for ys, block_grads, z, *buffers in cache_blocks(*columns):
                directions = self._direction(group, ys, block_grads, *buffers)
                torch._foreach_lerp_(ys, z, average)
                torch._foreach_add_(ys, directions, alpha=lr * (beta * (1 - average) - 1))
                torch._foreach_add_(z, directions, alpha=-lr)

    def _buffers(self, params: list[Tensor]) -> list[list[Tensor]]:
        """The subclass's state besides :math:`z`, one list per kind, created on first use."""
        return []

    def _direction(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                   *buffers: list[Tensor]) -> list[Tensor]:
        """:math:`\\hat g` of each parameter, updating ``buffers``; the gradients are only read (the
        package overwrites them)."""
        raise NotImplementedError

    @torch.no_grad()
    def eval(self) -> None:
        """Move the parameters to :math:`x`, the averaged point to evaluate, save or deploy."""
        self._switch(train=False)

    @torch.no_grad()
    def train(self) -> None:
        """Move the parameters back to :math:`y`, where the next gradient is taken."""
        self._switch(train=True)

    def _switch(self, train: bool) -> None:
        for group in self.param_groups:
            if group["train_mode"] == train:
                continue
            beta = self._beta(group)
            params = [p for p in group["params"] if "z" in self.state[p]]
            if params:
                zs = [self.state[p]["z"].to(p.device) for p in params]
                for ps, z in by_device_and_dtype(params, zs):
                    torch._foreach_lerp_(ps, z, 1 - beta if train else 1 - 1 / beta)
            group["train_mode"] = train


class ScheduleFreeAdamW(_ScheduleFree):
    r"""Schedule-free AdamW (Defazio et al. 2024, arXiv:2405.15682; the module docstring gives
    the math): Adam's normalisation on the base sequence :math:`z`, the momentum replaced by
    interpolating between :math:`z` and the average :math:`x`, no learning-rate schedule.

    Defaults from the ``schedulefree`` package: ``lr=0.0025``, ``betas=(0.9, 0.999)``,
    ``eps=1e-8``, ``weight_decay=0``, ``warmup_steps=0``, ``r=0``, ``weight_lr_power=2``.
    ``betas[0]`` must be > 0: :math:`x` is recovered from :math:`y` and :math:`z` by
    dividing by it.

    State: :math:`z` and :math:`v`, 8 bytes per fp32 parameter (AdamW's), plus the group's
    counters. Call ``optimizer.eval()`` before evaluating or saving the weights to deploy
    and ``optimizer.train()`` before training again (``gradwise train`` does both).

    Example::

        opt = gradwise.optim.ScheduleFreeAdamW(model.parameters(), lr=2.5e-3, warmup_steps=100)
        loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()
        opt.eval(); evaluate(model); opt.train()
    """

    description = Description(
        drive="step",
        sharding="element",
        state=moments(2),  # z and v; the counters are the group's
        # Not in the test-function race, which records the loss at the parameters (y here, not the
        # average x); the workload race runs gradwise train, which evaluates at x.
        presets={
            # GPT-style betas for training, as the adamw preset's. lr: twice AdamW's, measured (300 steps,
            # final validation loss; 2026-12-02): tiny-gpt 2 x 64 wide 2.447 / 2.378 / 2.528 at 1x / 2x / 4x
            # (AdamW with cosine at 1x: 2.479); mlp's best is higher still (accuracy 0.871 / 0.883 / 0.902)
            "schedule-free-adamw": Preset(
                "schedule-free AdamW (Defazio et al. 2024)", train={"betas": (0.9, 0.95)}, lr_scale=2.0
            ),
        },
        eval_switch=True,
        constant_lr=True,
    )

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, warmup_steps=warmup_steps, r=r,
                        weight_lr_power=weight_lr_power, maximize=maximize, foreach=foreach)
        super().__init__(params, defaults)

    def _validate(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        check_betas("betas", group["betas"])
        check_range("betas[0]", group["betas"][0], 0.0, 1.0, low_open=True, high_open=True)
        check_range("eps", group["eps"], 0.0)
        check_range("weight_decay", group["weight_decay"], 0.0)
        self._validate_schedule(group)

    def _beta(self, group: dict[str, Any]) -> float:
        return group["betas"][0]

    def _buffers(self, params: list[Tensor]) -> list[list[Tensor]]:
        return [[self._state(p, "exp_avg_sq", zeros_like) for p in params]]

    def _direction(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                   *buffers: list[Tensor]) -> list[Tensor]:
        beta2 = group["betas"][1]
        [exp_avg_sqs] = buffers
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        denominators = torch._foreach_div(exp_avg_sqs, 1 - beta2 ** group["k"])
        torch._foreach_sqrt_(denominators)
        torch._foreach_add_(denominators, group["eps"])
        directions = torch._foreach_div(grads, denominators)
        if group["weight_decay"] != 0:
            torch._foreach_add_(directions, params, alpha=group["weight_decay"])
        return list(directions)


class ScheduleFreeSGD(_ScheduleFree):
    r"""Schedule-free SGD (Defazio et al. 2024, arXiv:2405.15682; the module docstring gives
    the math): plain gradient steps on :math:`z`, the momentum replaced by interpolating
    between :math:`z` and the average :math:`x`, no learning-rate schedule.

    Defaults from the ``schedulefree`` package: ``lr=1.0``, ``momentum=0.9`` (in (0, 1): it
    interpolates, and :math:`x` is recovered by dividing by it), ``weight_decay=0`` (L2, at
    :math:`y`), ``warmup_steps=0``, ``r=0``, ``weight_lr_power=2``.

    State: :math:`z`, 4 bytes per fp32 parameter (SGD with momentum's), plus the group's
    counters. ``eval()``/``train()`` as :class:`ScheduleFreeAdamW`.

    Example::

        opt = gradwise.optim.ScheduleFreeSGD(model.parameters(), lr=0.5, warmup_steps=100)
        loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()
        opt.eval(); evaluate(model); opt.train()
    """

    description = Description(
        drive="step",
        sharding="element",
        state=moments(1),  # z; the counters are the group's
        presets={
            # lr: 100x AdamW's (SGD's steps scale with the gradient), measured (300 steps, 2026-12-02): best
            # near 0.3 on mlp (accuracy 0.68 / 0.71 / 0.71 at 0.1 / 0.3 / 1.0) and on tiny-gpt 2 x 64 wide
            # (validation loss 3.07 / 3.01 / 3.08)
            "schedule-free-sgd": Preset(
                "schedule-free SGD, momentum 0.9 (Defazio et al. 2024)", train={}, lr_scale=100.0
            ),
        },
        eval_switch=True,
        constant_lr=True,
    )

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, warmup_steps=warmup_steps, r=r,
                        weight_lr_power=weight_lr_power, maximize=maximize, foreach=foreach)
        super().__init__(params, defaults)

    def _validate(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        check_range("momentum", group["momentum"], 0.0, 1.0, low_open=True, high_open=True)
        check_range("weight_decay", group["weight_decay"], 0.0)
        self._validate_schedule(group)

    def _beta(self, group: dict[str, Any]) -> float:
        return group["momentum"]

    def _direction(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                   *buffers: list[Tensor]) -> list[Tensor]:
        if group["weight_decay"] == 0:
            return grads
        return list(torch._foreach_add(grads, params, alpha=group["weight_decay"]))

