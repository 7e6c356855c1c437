"""Training the closure-driven optimizers: L-BFGS, Newton-CG, SQN, SVRG and SAGA.

These optimizers evaluate the loss themselves, through closures (a line search several
times a step; SVRG at the iterate and at its snapshot; Newton-CG twice-differentiated), so the
loop hands them a function of the step's batch and the shared driver
(:func:`gradwise.optim.driving.drive_step`) calls them as their description says. The loop
first evaluates the batch's loss and gradient as for any optimizer, so the divergence guard
judges them and the metrics log them before anything is updated; the optimizer's own first
evaluation repeats that one (one extra forward and backward pass a step).

Clipping by norm is a scale of the step's objective: with ``c = min(1, clip / (||g|| + 1e-6))``
from the gradient at the step's start, every closure evaluates ``c * loss``. Its gradient
there is exactly the clipped gradient, and the objective stays one function within the step,
which a line search needs (clipping each evaluation's gradient separately would not be the
gradient of anything). Clipping by value has no such form and is refused.

What cannot be honoured is refused in one line: the closures re-evaluate one batch on one
process (strategy ``single``, ``accumulate`` 1, no fp16 loss scaling), and the variance-reduced
methods need a finite training set (a workload whose data is a fixed set of examples: ``mlp``,
``logreg``, a user's own table):

- SVRG (drive ``"snapshot_closure"``) takes its snapshot of the full training loss at the
  start of every epoch of the data (every ``ceil(examples / batch_size)`` steps);
- SAGA (drive ``"sample_index"``) keeps a gradient per slot: the training set cut into fixed
  blocks of ``batch_size`` examples (mini-batch SAGA), each step training on a block drawn
  uniformly (:class:`SampledBlocks`), the slot being the block's index.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim import Optimizer

from gradwise.optim.description import Drive
from gradwise.optim.driving import drive_step
from gradwise.problems.data import Batch, ShuffledEpochs, _generator
from gradwise.problems.workload import Workload
from gradwise.train.precision import Precision
from gradwise.validation import check_int

if TYPE_CHECKING:  # the config imports the optimizer registry, which imports this module
    from gradwise.train.config import TrainConfig

CLOSURE_DRIVES: tuple[Drive, ...] = ("closure", "loss_closure", "hessian_closure", "snapshot_closure",
                                     "sample_index")
"""The drives whose optimizers evaluate the loss themselves, through closures."""

FINITE_SUM_DRIVES: tuple[Drive, ...] = ("snapshot_closure", "sample_index")
"""The drives of the variance-reduced methods, which need a finite training set."""


class SampledBlocks:
    """A finite training set cut into fixed blocks of ``batch_size`` rows (the last may be shorter),
    one block drawn uniformly per batch: mini-batch SAGA's slots.

    Block ``n`` comes from a generator seeded by ``(seed, n)``, so the stream's state is the number
    of batches handed out, as :class:`gradwise.problems.data.ShuffledEpochs`'s, and a resumed run
    draws the same blocks. :attr:`block` is the index of the last batch's block.
    """

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int, seed: int = 0) -> None:
        self.inputs, self.targets = inputs, targets
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.seed = check_int("seed", seed, 0)
        self.blocks = math.ceil(inputs.shape[0] / batch_size)
        self.position = 0
        self.block = 0

    def next_batch(self) -> Batch:
        self.block = int(torch.randint(self.blocks, (), generator=_generator(self.seed, self.position)))
        self.position += 1
        rows = slice(self.block * self.batch_size, (self.block + 1) * self.batch_size)
        return self.inputs[rows], self.targets[rows]

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"the checkpoint's data seed is {state['seed']}, this stream's is {self.seed}")
        self.position = check_int("position", state["position"], 0)


class ClosureFeed:
    """What the loop hands a closure-driven optimizer each step, and the run's refusals of settings
    it cannot honour (one-line ``ValueError`` naming the setting and what is allowed).

    Built before the optimizer: for SAGA it replaces the workload's training stream with
    :class:`SampledBlocks` and says the optimizer's ``num_slots`` (:attr:`build_options`).
    """

    def __init__(self, drive: Drive, config: TrainConfig, workload: Workload) -> None:
        name = config.optimizer
        if config.accumulate != 1:
            raise ValueError(f"accumulate: optimizer {name!r} evaluates its closures on one batch; give accumulate 1, "
                             f"got {config.accumulate}")
        if config.precision == "fp16":
            raise ValueError(f"precision: optimizer {name!r} evaluates its own losses, which fp16 loss scaling "
                             "cannot follow; use fp32 or bf16, not 'fp16'")
        if config.clip_value is not None:
            raise ValueError(f"clip_value: optimizer {name!r} evaluates its own gradients; clip by norm (clip) "
                             f"instead, or give clip_value none, got {config.clip_value}")
        self.drive, self.clip = drive, config.clip
        self.build_options: dict[str, Any] = {}
        """Options the run sets on the optimizer (SAGA: ``num_slots``, the training set's blocks)."""
        self.full_batch: Batch | None = None
        self.epoch_steps = 0
        self.blocks: SampledBlocks | None = None
        if drive not in FINITE_SUM_DRIVES:
            return
        data = workload.train_data
        if not isinstance(data, ShuffledEpochs):
            raise ValueError(f"workload: optimizer {name!r} is variance-reduced over a finite training set; "
                             f"use a workload whose data is a fixed set of examples (mlp, logreg), "
                             f"not {config.workload!r}")
        self.full_batch = (data.inputs, data.targets)
        self.epoch_steps = math.ceil(data.inputs.shape[0] / data.batch_size)
        if drive == "sample_index":
            blocks = SampledBlocks(data.inputs, data.targets, data.batch_size, data.seed)
            workload.train_data = blocks
            self.blocks = blocks
            given = config.optimizer_options.get("num_slots", blocks.blocks)
            if given != blocks.blocks:
                raise ValueError(f"optimizer_options: num_slots of {name!r} is the training set's number of "
                                 f"blocks of batch_size, {blocks.blocks}, set by the run; got {given!r}")
            self.build_options = {"num_slots": blocks.blocks}

    def step(self, optimizer: Optimizer, loss: Callable[[nn.Module, Batch], torch.Tensor], model: nn.Module,
             batch: Batch, step: int, grad_norm: float, precision: Precision) -> None:
        """Step ``optimizer`` on ``batch`` (the batch whose gradient norm the guard saw), the run's
        ``step``-th update (0-based): SVRG's snapshot at each epoch's start, SAGA's block index."""
        scale = 1.0 if self.clip is None else min(1.0, self.clip / (grad_norm + 1e-6))

        def evaluate(on: Batch) -> Callable[[], torch.Tensor]:
            def value() -> torch.Tensor:
                with precision.autocast():
                    return scale * loss(model, on)
            return value

        full = self.full_batch
        drive_step(
            optimizer,
            evaluate(batch),
            full_loss=evaluate(full) if full is not None and step % self.epoch_steps == 0 else None,
            slot=None if self.blocks is None else self.blocks.block,
        )
