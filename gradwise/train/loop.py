"""The training loop, top to bottom: accumulate, guard, clip, step, log, evaluate, checkpoint.

One optimizer update ("step") uses ``accumulate`` micro-batches of ``batch_size``
examples. Each micro-batch's mean loss is divided by ``accumulate`` before its backward
pass, so the summed gradients are the gradient of the mean loss over all
``accumulate * batch_size`` examples: the update equals the one of a k-times larger batch
(exactly so when the micro-batches are equal in size, as here).

Per step, in order: the gradients of the micro-batches (under autocast for bf16/fp16, the
loss scaled for fp16), the unscaled gradients' global norm ``||g|| = sqrt(sum_i ||g_i||^2)``
and which tensors are not finite, the divergence guard's verdict, clipping by value
(``g <- clamp(g, -v, v)``) and by global norm (``g <- g * min(1, c / (||g|| + 1e-6))``, as
``torch.nn.utils.clip_grad_norm_``), the optimizer step, QK-Clip's rescaling of the attention heads
whose logits exceeded ``qk_clip`` (when set), the schedule's step, a metrics record;
every ``track_sharpness`` steps (when set) the sharpness at the new weights in that record
(:mod:`gradwise.train.sharpness`), every ``eval_every`` steps an evaluation and every
``checkpoint_every`` steps a checkpoint.

On N processes (``torchrun``, or ``gradwise train --nproc N``) a strategy
(:mod:`gradwise.distributed.strategies.base`) says what changes: the module the forward runs on, the
optimizer, each rank's slice of the global batch, the gradient reduction (DDP skips it on all
but the last micro-batch), the global gradient norm, and how checkpoints are written. The
loss is the mean over ranks, bitwise identical on every rank (so is the gradient norm), so
every rank's divergence guard reaches the same verdict. Every rank evaluates; rank 0 alone
writes metrics, plots and the summary and shows the progress bar.

Exact resume: a checkpoint holds everything the future of the run depends on: model,
optimizer, scheduler, gradient scaler, the guard's counters, every RNG and the data
position. On CPU, a run killed at any moment and resumed from its newest valid checkpoint
produces bit for bit the losses and parameters of a run never interrupted (with the same
number of threads).

Resume honours only what it can: every checkpoint records the settings it was written
under (the resolved config and the world size), and one written under other settings is
skipped, as is one whose weights or optimizer state are not finite; ``resume=True`` with no
usable checkpoint is refused, never a silent fresh start over an existing run. Settings
named in ``allow_changes`` (:data:`gradwise.train.config.CHANGEABLE`) may differ on purpose.

Two points: an optimizer whose description has ``eval_switch`` (schedule-free) trains at one
point and evaluates at another (``optimizer.train()``/``optimizer.eval()``). The loop trains,
checkpoints and resumes at the training point, evaluates at the evaluation point (switching
back after a quick evaluation: the round trip rounds, identically in a resumed run), and ends
there: the final evaluation and ``model.pt`` are of the weights to deploy. Such an optimizer's
description also asks for ``constant_lr``: a decaying schedule is replaced by warmup then constant
(:func:`resolved_config`, with a warning).

Divergence: no checkpoint is written while the weights are unhealthy (an update was just
skipped for a non-finite loss or gradient, or a parameter or optimizer-state tensor holds
a NaN or an infinity), so a rollback returns to weights that trained; a run whose final
weights are not finite raises :class:`NonFiniteWeights` and writes no ``model.pt`` or
``summary.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from gradwise.checkpoints.atomic import Skipped, first_nonfinite, rng_state, set_rng_state, write_atomically
from gradwise.curvature import hutchinson_diagonal
from gradwise.distributed import DistContext, RankSlice, init_distributed, shutdown
from gradwise.distributed.strategies.base import Strategy
from gradwise.distributed.strategies.registry import make_strategy, tensor_parallel_degree
from gradwise.optim.description import HessianRefreshed, TrainEvalSwitched, description_of
from gradwise.optim.qk_clip import QKClip
from gradwise.problems.data import Batch
from gradwise.problems.workload import Target, Workload
from gradwise.problems.workloads import WORKLOADS, make_workload
from gradwise.schedules import ScheduleLR, make_schedule
from gradwise.train.closures import CLOSURE_DRIVES, ClosureFeed
from gradwise.train.config import TrainConfig, check_allowed_changes, required, settings_difference
from gradwise.train.guards import DivergenceGuard, NonFiniteWeights, TrainingDiverged
from gradwise.train.metrics import MetricsWriter, Throughput, read_records
from gradwise.train.optimizers import OPTIMIZERS, build_optimizer, check_optimizer_strategy, drive_of
from gradwise.train.plots import plot_training
from gradwise.train.precision import Precision
from gradwise.train.sharpness import COLUMNS as SHARPNESS_COLUMNS
from gradwise.train.sharpness import SharpnessTracker, fixed_sample, threshold_factor


@dataclass
class TrainResult:
    """What a finished run reports (also written to ``summary.json``)."""

    workload: str
    steps: int
    final_metrics: dict[str, float]
    target: Target
    target_reached: bool
    items_per_s: float
    unit: str
    wall_time_s: float
    skipped_steps: int
    rollbacks: list[dict[str, Any]]
    resumed_from_step: int | None
    skipped_checkpoints: list[Skipped] = field(default_factory=list)
    description: str = ""
    strategy: str = "single"
    processes: int = 1
    bytes_communicated: int = 0
    """This rank's payload bytes of gradient or parameter reduction over the run."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "workload": self.workload,
            "description": self.description,
            "steps": self.steps,
            "final_metrics": self.final_metrics,
            "target": {"metric": self.target.metric, "value": self.target.value, "baseline": self.target.baseline,
                       "baseline_name": self.target.baseline_name, "reached": self.target_reached},
            f"{self.unit}_per_s": self.items_per_s,
            "wall_time_s": self.wall_time_s,
            "skipped_steps": self.skipped_steps,
            "rollbacks": self.rollbacks,
            "resumed_from_step": self.resumed_from_step,
            "skipped_checkpoints": [
                {"path": str(item.path), "reason": item.reason} for item in self.skipped_checkpoints
            ],
            "strategy": self.strategy,
            "processes": self.processes,
            "bytes_communicated": self.bytes_communicated,
        }


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device; use 'cpu' or 'auto'")
    return torch.device(name)


CONSTANT_SCHEDULES = ("constant", "linear_warmup")
"""The schedules that do not decay: what an optimizer whose description has ``constant_lr`` runs with."""


def resolved_config(config: TrainConfig) -> TrainConfig:
    """``config`` checked, with the workload's defaults filled in. An optimizer whose description has
    ``constant_lr`` (schedule-free: its average does what a decay would) gets ``linear_warmup`` (the run's
    warmup, then constant) in place of a decaying schedule, with a one-line warning: the config it runs
    under, and records, is then the one it ran."""
    config.validate()
    if description_of(OPTIMIZERS[config.optimizer][0]).constant_lr and config.schedule not in CONSTANT_SCHEDULES:
        warnings.warn(f"optimizer {config.optimizer!r} averages its iterates in place of a decaying schedule: "
                      f"schedule {config.schedule!r} replaced by 'linear_warmup' (warmup, then constant)", stacklevel=2)
        config = dataclasses.replace(config, schedule="linear_warmup")
    return config.with_workload_defaults(WORKLOADS[config.workload].defaults)


def read_saved_config(out: Path) -> dict[str, Any] | None:
    """The settings in a run folder's ``config.json`` (``None`` if there is none); one-line ``ValueError``
    if unreadable."""
    saved = out / "config.json"
    if not saved.exists():
        return None
    try:
        values = json.loads(saved.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{str(saved)!r} is unreadable: {error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{str(saved)!r} does not hold a run's settings")
    return values


def check_run_folder(out: Path, config: TrainConfig, resume: bool, allow_changes: frozenset[str] = frozenset()) -> None:
    """Refuse to write over an existing run, to resume where there is no run, or to resume one with other
    settings than its own (except those in ``allow_changes``)."""
    if resume:
        checkpoints = out / "checkpoints"
        if not out.is_dir() or not any(out.iterdir()):
            what = "an empty folder" if out.is_dir() else "not a folder" if out.exists() else "no such folder"
            raise ValueError(f"--resume: {str(out)!r} holds no run to resume ({what})")
        if not checkpoints.is_dir():
            raise ValueError(f"--resume: {str(out)!r} holds no run to resume ({str(checkpoints)!r} "
                             f"{'is not a folder' if checkpoints.exists() else 'is missing'})")
        saved = read_saved_config(out)
        if saved is not None and (difference := settings_difference(saved, config.to_dict(), allow_changes)):
            raise ValueError(f"--resume: the run in {str(out)!r} was {difference}; resume with its own settings")
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"{str(out)!r} already holds files; pass --resume to continue that run or choose a new folder")


def holds_checkpoints(out: Path) -> bool:
    """Whether ``out/checkpoints`` holds any checkpoint (usable or not), single-file or sharded."""
    checkpoints = out / "checkpoints"
    return checkpoints.is_dir() and any(entry.name.startswith("step-") for entry in checkpoints.iterdir())


def join_job(config: TrainConfig) -> DistContext | None:
    """This process's place in a ``torch.distributed`` job, or ``None`` for a single-process run.

    A process is in a job when a group exists (``run_processes``), when ``torchrun`` set
    ``RANK``, or when a parallel strategy is named (then a missing endpoint is an error).
    """
    if dist.is_initialized() or "RANK" in os.environ or config.strategy not in (None, "single"):
        return init_distributed(config.device)
    return None


def accumulate_gradients(workload: Workload, model: nn.Module, strategy: Strategy, precision: Precision,
                         scaler: torch.amp.GradScaler, accumulate: int, device: torch.device,
                         before_backward: Callable[[Batch], None] | None = None) -> tuple[float, int]:
    """Backward passes over ``accumulate`` micro-batches; returns their mean loss and the target count.
    ``before_backward`` sees the step's first micro-batch before any backward pass (Sophia's refresh)."""
    total_loss = torch.zeros((), device=device)
    items = 0
    for index in range(accumulate):
        inputs, targets = (tensor.to(device, non_blocking=True) for tensor in workload.train_data.next_batch())
        if index == 0 and before_backward is not None:
            before_backward((inputs, targets))
        with strategy.micro_batch(last=index == accumulate - 1):
            loss = strategy.forward_backward(workload.loss, model, (inputs, targets), precision, scaler, accumulate)
        total_loss += loss.float()
        items += targets.numel()
    return total_loss.item(), items


@dataclass
class StepTaken:
    """What one pass of the loop did: the step's loss and gradient norm (as every rank agrees), the
    targets it trained on (this rank's) and its event: ``""`` (an update), ``"skip-nonfinite"``,
    ``"loss-scale-overflow"`` or ``"rollback"`` (nothing stepped; the run goes back to a checkpoint)."""

    loss: float
    grad_norm: float
    items: int
    event: str


class Trainer:
    """One run: the pieces built from a config, and ``run()``, the loop."""

    def __init__(self, config: TrainConfig, out: str | Path | None = None, *, resume: bool = False,
                 workload: Workload | None = None, progress: bool = False, allow_changes: Any = (),
                 restarted: bool = False, plot: bool = True) -> None:
        self.config = config = resolved_config(config)
        self.out = None if out is None else Path(out)
        self.plots = plot  # training.png in a run with a folder (a race run with --no-plots: none)
        self.allow_changes = check_allowed_changes(allow_changes)
        if restarted and self.out is not None and not holds_checkpoints(self.out):
            # torchrun restarted this job's workers before any checkpoint was written: the
            # folder is this job's own (its first attempt needed it empty or resumable), so
            # the run starts afresh there rather than refusing to resume.
            resume = False
        elif self.out is not None:
            check_run_folder(self.out, config, resume, self.allow_changes)
        self.resume = resume
        self.progress = progress
        self.owns_group = not dist.is_initialized()
        self.context = join_job(config)
        self.strategy = strategy = make_strategy(config.strategy, config.strategy_options, self.context)
        strategy.barrier()  # every rank has checked the run folder before rank 0 writes to it
        self.settings = {**config.to_dict(), "world_size": strategy.world_size}
        """What every checkpoint records and a resume compares: the resolved config and the world size."""
        processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(config.threads or max(1, (os.cpu_count() or 1) // processes_here))
        self.device = resolve_device(config.device) if self.context is None else self.context.device
        self.precision = Precision(required(config.precision, "precision"), self.device)
        if config.precision not in strategy.precisions:
            raise ValueError(f"strategy {strategy.name!r} runs in precision {' or '.join(strategy.precisions)}, "
                             f"got {config.precision!r}")
        # each data-parallel rank draws the global batch and keeps its rows; a workload passed in draws it too
        global_batch = required(config.batch_size, "batch_size") * strategy.dp_size
        self.workload = workload or make_workload(
            config.workload, global_batch, config.seed, config.data, **config.workload_options
        )
        # the sharpness's sample: the first global batch, from the stream before it is split over the ranks
        sample = None if config.track_sharpness is None else fixed_sample(self.workload.train_data)
        if strategy.dp_size > 1:
            self.workload.train_data = RankSlice(self.workload.train_data, strategy.dp_rank, strategy.dp_size)
        self.model = self.workload.model.to(self.device)
        if config.bf16_params is not None:  # pure bf16: no float32 master copy (gradwise.optim.param_rounding)
            self.model.to(torch.bfloat16)
        self.forward_model = strategy.wrap_model(self.model)
        self.trained = strategy.trained_module(self.model)
        self.named_parameters = [(name, p) for name, p in self.trained.named_parameters() if p.requires_grad]
        self.steps = required(config.steps, "steps")
        """The run's length (``config.steps``, as resolved)."""
        lr, warmup = required(config.lr, "lr"), required(config.warmup_steps, "warmup_steps")
        check_optimizer_strategy(config.optimizer, strategy.name)
        self.drive = drive_of(config.optimizer)
        """How the optimizer is driven (its description's): the loop feeds a ``"hessian_refresh"`` one and
        hands a closure-driven one the step's batch (:attr:`closures`)."""
        self.closures = ClosureFeed(self.drive, config, self.workload) \
            if self.drive in CLOSURE_DRIVES else None
        """What a closure-driven optimizer is fed (``None`` for the others); built before the optimizer,
        whose options (SAGA's slots) it may set."""
        self.closure_batch: Batch | None = None
        """The step's batch, which a closure-driven optimizer re-evaluates."""
        formatted = {"state_format": config.state_format} if config.state_format != "fp32" else {}
        if config.bf16_params is not None:
            formatted["param_rounding"] = config.bf16_params
        built = build_optimizer(config.optimizer, self.trained, lr, config.weight_decay,
                                {**config.optimizer_options, **formatted,
                                 **(self.closures.build_options if self.closures else {})})
        self.switches_weights = description_of(type(built), inherited=True).eval_switch
        """Whether the optimizer trains and evaluates at two points (see the module's docstring)."""
        self.optimizer = strategy.wrap_optimizer(built)
        self.qk_clip = None if config.qk_clip is None else QKClip(
            self.trained, config.qk_clip, dist.group.WORLD if strategy.world_size > 1 else None)
        """QK-Clip (``--qk-clip``): after every update, the heads whose logits exceeded the threshold in
        the step's forward passes (over all ranks) are rescaled (see :mod:`gradwise.optim.qk_clip`)."""
        self.sharpness = None if sample is None else SharpnessTracker(
            self.model, self.workload.loss, sample, every=required(config.track_sharpness, "track_sharpness"),
            steps=config.sharpness_steps, seed=config.seed, factor=threshold_factor(
                OPTIMIZERS[config.optimizer][0], {**OPTIMIZERS[config.optimizer][1], **config.optimizer_options}))
        """The sharpness tracker (``--track-sharpness``; ``None`` when off)."""
        schedule = make_schedule(config.schedule, self.steps, warmup, floor=config.lr_floor,
                                 T_0=max(1, (self.steps - warmup) // 3))
        self.scheduler = ScheduleLR(self.optimizer, schedule)
        self.scaler = self.precision.grad_scaler()
        self.guard = DivergenceGuard(config.spike_factor, config.spike_window, config.max_consecutive_skips,
                                     config.rollback_lr_factor, config.max_rollbacks)
        self.checkpoints = None if self.out is None else strategy.checkpoints(
            self.out / "checkpoints", config.keep_checkpoints, self.trained, self.optimizer)
        self.step = 0
        self.skipped_checkpoints: list[Skipped] = []
        """Checkpoints a resume passed over, and why."""
        self.metrics: MetricsWriter | None = None
        """The run folder's metrics (rank 0 of a run with a folder; opened by ``run``)."""
        self.bar: tqdm | None = None
        """The progress bar (opened by ``run``)."""
        self.started = 0.0

    # --- checkpoints -------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """The run's state besides the model and optimizer (which the checkpoints take from them)."""
        return {
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "guard": self.guard.state_dict(),
            "data": self.workload.train_data.state_dict(),
            "rng": rng_state(),
            "strategy": self.strategy.state_dict(),
            "settings": self.settings,
            **({} if self.sharpness is None else {"sharpness": self.sharpness.state_dict()}),
        }

    def accept(self, state: dict[str, Any]) -> str | None:
        """Why a checkpoint (its run state) cannot be resumed by this run: written under other settings, or
        (even where the strategy may change) with the qkv rows in another tensor-parallel order."""
        saved = state.get("settings")
        if isinstance(saved, dict) and tensor_parallel_degree(saved) != tensor_parallel_degree(self.settings):
            return (f"written with tensor-parallel degree {tensor_parallel_degree(saved)}, whose head-wise qkv "
                    f"order this run's degree {tensor_parallel_degree(self.settings)} does not read")
        return settings_difference(saved, self.settings, self.allow_changes)

    def nonfinite_weights(self) -> str | None:
        """A parameter or optimizer-state tensor holding a NaN or an infinity on any rank, or ``None``
        (a collective)."""
        found = first_nonfinite({"parameter": dict(self.named_parameters),
                                 "optimizer state": list(self.optimizer.state.values())})
        if self.strategy.world_size > 1 and self.strategy.agree([float(found is not None)])[0] > 0:
            found = found or "a tensor on another rank"
        return found

    def load_state(self, step: int, state: dict[str, Any], *, rollback: bool = False) -> None:
        """Restore the rest of a checkpoint whose model and optimizer are loaded; on a rollback keep the
        guard's counters and lower the lr to its scale."""
        # with "steps" allowed to change, the schedule is rebuilt over the new length: its lr here replaces the saved
        self.scheduler.load_state_dict(state["scheduler"], rescheduled="steps" in self.allow_changes)
        self.scaler.load_state_dict(state["scaler"])
        self.workload.train_data.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        self.strategy.load_state_dict(state["strategy"])
        if self.sharpness is not None:
            self.sharpness.load_state_dict(state.get("sharpness", {}))
        self.step = step
        if not rollback:
            self.guard.load_state_dict(state["guard"])
            return
        self.scheduler.rescale(self.guard.lr_scale / state["guard"]["lr_scale"])

    def save_checkpoint(self) -> str | None:
        """Checkpoint the run unless its weights are unhealthy; returns why it was not written, or ``None``."""
        if self.checkpoints is None:
            return None
        if self.guard.consecutive_skips:
            return f"the last {self.guard.consecutive_skips} updates were skipped for non-finite loss or gradients"
        if (found := self.nonfinite_weights()) is not None:
            return f"non-finite values in {found}"
        self.checkpoints.save(self.step, self.state())
        return None

    # --- the loop ----------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Train from the newest checkpoint (``resume``) or from the start to ``config.steps``, then finish."""
        self.started = time.perf_counter()
        resumed_from = self.resume_run() if self.resume and self.checkpoints is not None else None
        self.open_outputs(resumed_from)
        self.switch_weights(train=True)  # a checkpoint holds the training point; a fresh optimizer may not
        if resumed_from is None:
            self.save_checkpoint()  # step 0: a rollback always has somewhere to go
        throughput = Throughput()
        self.model.train()
        try:
            eval_every = required(self.config.eval_every, "eval_every")
            checkpoint_every = required(self.config.checkpoint_every, "checkpoint_every")
            while self.step < self.steps:
                lr = self.optimizer.param_groups[0]["lr"]
                throughput.start()
                step = self.train_step()
                if step.event == "rollback":
                    self.roll_back(lr)
                    continue
                rate = throughput.stop(step.items * self.strategy.dp_size)
                self.log_step(step, lr, rate, throughput.rate, self.measure_sharpness(lr))
                if self.step % eval_every == 0 and self.step < self.steps:
                    self.log_evaluation()
                if self.step % checkpoint_every == 0 or self.step == self.steps:
                    self.log_checkpoint()
        except TrainingDiverged as diverged:
            self.progress_bar.close()
            self.write_report(diverged)
            raise
        self.progress_bar.close()
        return self.finish(resumed_from, throughput.rate)

    def resume_run(self) -> int:
        """Load the newest usable checkpoint; returns its step. One-line ``ValueError`` when there is none."""
        if self.checkpoints is None or self.out is None:
            raise RuntimeError("resume_run needs a run folder with checkpoints")
        newest = self.checkpoints.load_newest(self.accept)
        self.skipped_checkpoints = self.checkpoints.skipped
        if newest is None:
            raise ValueError(nothing_to_resume(self.out / "checkpoints", self.skipped_checkpoints))
        if newest[0] > self.steps:
            raise ValueError(f"--resume: the newest usable checkpoint is of step {newest[0]}, past "
                             f"steps={self.steps}; give --steps {newest[0]} or more")
        self.load_state(*newest)
        return self.step

    @property
    def progress_bar(self) -> tqdm:
        if self.bar is None:
            raise RuntimeError("the progress bar opens when the run starts (Trainer.run)")
        return self.bar

    def open_outputs(self, resumed_from: int | None) -> None:
        """The run folder's config.json and metrics (rank 0 of a run with a folder) and the progress bar."""
        main = self.strategy.is_main
        if self.out is not None and main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_atomically(self.out / "config.json", json.dumps(self.config.to_dict(), indent=2).encode())
            columns = [*self.workload.eval_metrics, *(SHARPNESS_COLUMNS if self.sharpness is not None else ())]
            self.metrics = MetricsWriter(self.out, self.workload.unit, columns)
            self.metrics.start(resumed_from)
        self.bar = tqdm(total=self.steps, initial=self.step, unit="step",
                        disable=not (self.progress and main), dynamic_ncols=True)

    def train_step(self) -> StepTaken:
        """One step: the micro-batches' gradients, reduced and unscaled, then the guarded update and the
        schedule's step. On a rollback verdict nothing is updated or stepped (``event == "rollback"``)."""
        before_backward = self.refresh_hessian if self.drive == "hessian_refresh" else \
            self.keep_batch if self.closures is not None else None
        loss, items = accumulate_gradients(self.workload, self.forward_model, self.strategy, self.precision,
                                           self.scaler, self.config.accumulate, self.device, before_backward)
        self.strategy.reduce_gradients()
        self.scaler.unscale_(self.optimizer)
        grad_norm, nonfinite = self.strategy.grad_norm(self.named_parameters)
        if self.strategy.world_size > 1:
            loss, grad_norm = self.strategy.agree([loss, grad_norm])
        event = self.guarded_update(loss, grad_norm, nonfinite)
        if self.qk_clip is not None:
            if event == "":
                with self.strategy.counting():
                    self.qk_clip.clip()
            else:  # the weights did not move (or go back to a checkpoint): the logits may be non-finite
                self.qk_clip.forget()
        if event != "rollback":
            with warnings.catch_warnings():
                # A skipped update (non-finite gradient, fp16 overflow) steps the schedule but not the
                # optimizer, on purpose: the schedule is a function of the step, not of the updates.
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.strategy.after_step()
            self.step += 1
        return StepTaken(loss, grad_norm, items, event)

    def keep_batch(self, batch: Batch) -> None:
        """Keep the step's batch for a closure-driven optimizer to re-evaluate."""
        self.closure_batch = batch

    def refresh_hessian(self, batch: Batch) -> None:
        """Sophia-H: when the optimizer's estimate is due, a one-probe Hutchinson estimate of the
        Hessian's diagonal (:func:`gradwise.curvature.hutchinson_diagonal`) of the loss on ``batch``
        (the step's first micro-batch), under the run's precision. It needs the loss's graph
        before a backward pass, which the strategy's ``forward_backward`` does not keep, hence
        its own forward on the unwrapped model, with attention in its plain (math) form: the fused
        attention kernels have no second derivative. The probes come from torch's global
        generator, which checkpoints record, so a resumed run draws the same probes."""
        optimizer = cast(HessianRefreshed, self.optimizer)
        if not optimizer.hessian_update_due:
            return
        params = [param for _, param in self.named_parameters]
        with self.precision.autocast(), sdpa_kernel(SDPBackend.MATH):
            loss = self.workload.loss(self.model, batch)
        grads = torch.autograd.grad(loss.float(), params, create_graph=True)
        optimizer.update_hessian(dict(zip(params, hutchinson_diagonal(grads, params))))

    def guarded_update(self, loss: float, grad_norm: float, nonfinite: Any) -> str:
        """Update the weights unless the scaler or the guard says otherwise; returns the step's event:
        ``""`` (updated), ``"loss-scale-overflow"``, ``"skip-nonfinite"`` or ``"rollback"``."""
        scaler, optimizer = self.scaler, self.optimizer
        if scaler.is_enabled() and math.isfinite(loss) and not math.isfinite(grad_norm):
            scaler.step(optimizer)  # fp16 overflow: the scaler skips the step and halves the scale
            scaler.update()
            return "loss-scale-overflow"
        verdict = self.guard.check(self.step + 1, loss, grad_norm, nonfinite)  # 1-based, as logged
        if verdict != "update":
            scaler.update()  # fp16: closes this step's unscale_ (no-op for bf16/fp32)
            return "skip-nonfinite" if verdict == "skip" else "rollback"
        if self.closures is not None and self.closure_batch is not None:  # it evaluates (and clips) itself
            self.closures.step(optimizer, self.workload.loss, self.forward_model, self.closure_batch, self.step,
                               grad_norm, self.precision)
            return ""
        if self.config.clip_value is not None:
            torch.nn.utils.clip_grad_value_(self.trained.parameters(), self.config.clip_value)
        if self.config.clip is not None:
            self.strategy.clip_grad_norm_(list(self.trained.parameters()), self.config.clip)
        self.strategy.optimizer_step(scaler, optimizer)
        scaler.update()
        return ""

    def measure_sharpness(self, lr: float) -> dict[str, float]:
        """The sharpness at the weights of the step just taken when it is due (``--track-sharpness``), as
        entries of the step's record; ``{}`` otherwise. ``lr`` is the step's, for the threshold."""
        if self.sharpness is None or not self.sharpness.due(self.step):
            return {}
        measured = self.sharpness.measure(lr)
        if self.qk_clip is not None:
            self.qk_clip.forget()  # the sample's forward passes saw logits of no training step
        return measured

    def log_step(self, step: StepTaken, lr: float, rate: float, mean_rate: float,
                 measured: dict[str, float]) -> None:
        """The step's metrics record (rank 0), with the ``measured`` entries, and the progress bar."""
        unit = self.workload.unit
        record = {"kind": "train", "step": self.step, "loss": step.loss, "lr": lr, "grad_norm": step.grad_norm,
                  f"{unit}_per_s": rate, "elapsed_s": time.perf_counter() - self.started, "event": step.event,
                  **measured}
        if self.strategy.world_size > 1:
            record["bytes_communicated"] = self.strategy.bytes_communicated
        if self.metrics is not None:
            self.metrics.write(record)
        self.progress_bar.update(1)
        self.progress_bar.set_postfix(loss=f"{step.loss:.4f}", lr=f"{lr:.2e}", gnorm=f"{step.grad_norm:.3g}",
                             **{f"{unit[:3]}/s": f"{mean_rate:,.0f}"}, refresh=False)

    def log_evaluation(self) -> None:
        """The quick evaluation of ``eval_every``: a metrics record and a line under the bar."""
        self.switch_weights(train=False)
        try:
            evaluation = self.evaluate(full=False)
        finally:
            self.switch_weights(train=True)
        if self.metrics is not None:
            self.metrics.write({"kind": "eval", "step": self.step, **evaluation})
        if self.strategy.is_main and self.progress:  # a quiet run (a race's) prints nothing
            self.progress_bar.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in evaluation.items()))

    def log_checkpoint(self) -> None:
        """Checkpoint the run; a checkpoint not written (unhealthy weights) is a metrics record saying why."""
        not_written = self.save_checkpoint()
        if self.metrics is not None and not_written is not None:
            self.metrics.write({"kind": "checkpoint", "step": self.step, "event": "checkpoint-not-written",
                                "reason": not_written})

    def write_report(self, diverged: TrainingDiverged) -> None:
        """A diverged run's report.json and plot (rank 0 of a run with a folder)."""
        if self.out is not None and self.strategy.is_main:
            write_atomically(self.out / "report.json", json.dumps(diverged.report.to_dict(), indent=2).encode())
            if self.plots:
                self.plot(self.out)

    def finish(self, resumed_from: int | None, items_per_s: float) -> TrainResult:
        """Refuse non-finite final weights, evaluate in full, and write model.pt, summary.json and the plot."""
        if (found := self.nonfinite_weights()) is not None:
            raise NonFiniteWeights(f"the weights are not finite after step {self.step} (non-finite values in "
                                   f"{found}): the run failed, no model.pt or summary.json was written; its "
                                   "newest checkpoint holds the last finite weights")
        workload, strategy = self.workload, self.strategy
        self.switch_weights(train=False)  # the run is over: evaluate and save the weights to deploy
        final = self.evaluate(full=True)
        result = TrainResult(
            workload=workload.name, steps=self.step, final_metrics=final, target=workload.target,
            target_reached=workload.target.reached(final), items_per_s=items_per_s, unit=workload.unit,
            wall_time_s=time.perf_counter() - self.started, skipped_steps=self.guard.skipped_steps,
            rollbacks=list(self.guard.rollbacks), resumed_from_step=resumed_from,
            skipped_checkpoints=self.skipped_checkpoints, description=workload.description,
            strategy=strategy.name, processes=strategy.world_size, bytes_communicated=strategy.bytes_communicated,
        )
        model_state = strategy.full_model_state(self.model) if self.out is not None else None
        if self.out is not None and self.metrics is not None:  # the metrics are rank 0's, when the run has a folder
            self.metrics.write({"kind": "eval", "step": self.step, "full": True, **final})
            buffer = io.BytesIO()
            torch.save(model_state, buffer)
            write_atomically(self.out / "model.pt", buffer.getvalue())
            write_atomically(self.out / "summary.json", json.dumps(result.to_dict(), indent=2).encode())
            if self.plots:
                self.plot(self.out)
        return result

    def switch_weights(self, train: bool) -> None:
        """Put the parameters at the optimizer's training point (``train``) or at its evaluation point,
        for an optimizer whose description has ``eval_switch``; the others train and evaluate at one."""
        if self.switches_weights:
            optimizer = cast(TrainEvalSwitched, self.optimizer)
            if train:
                optimizer.train()
            else:
                optimizer.eval()

    def evaluate(self, full: bool) -> dict[str, float]:
        """The workload's validation metrics: the quick estimate under the run's precision, the full one in
        fp32 (under the run's precision too with bf16 parameters, whose inputs autocast casts)."""
        model = self.strategy.evaluation_model(self.model)
        in_fp32 = full and self.config.bf16_params is None
        with torch.no_grad(), contextlib.nullcontext() if in_fp32 else self.precision.autocast():
            return self.workload.evaluate(model, full)

    def roll_back(self, lr: float) -> None:
        """Go back to the newest valid checkpoint with a lower lr, or stop with the report."""
        newest = None
        if self.checkpoints is not None and self.guard.can_roll_back():
            self.optimizer.zero_grad(set_to_none=True)
            newest = self.checkpoints.load_newest(self.accept)
        if newest is None:
            why = (f"{len(self.guard.rollbacks)} rollbacks spent" if self.checkpoints is not None
                   and not self.guard.can_roll_back() else "no checkpoint to roll back to")
            raise TrainingDiverged(self.guard.report(self.step + 1, lr, f"{self.guard.reason}; {why}"))
        from_step = self.step + 1
        self.guard.record_rollback(from_step, newest[0])
        self.load_state(*newest, rollback=True)
        message = (f"step {from_step}: {self.guard.reason}; rolled back to step {self.step}, "
                   f"lr x{self.guard.lr_scale:g}")
        if self.strategy.is_main:
            self.progress_bar.write(message)
        self.progress_bar.n = self.step
        if self.metrics is not None:
            self.metrics.write({"kind": "rollback", "step": from_step, "event": "rollback", "to_step": self.step,
                           "lr_scale": self.guard.lr_scale, "reason": self.guard.reason})

    def close(self) -> None:
        """Leave the process group if this run joined it."""
        if self.owns_group:
            shutdown()

    def plot(self, out: Path) -> None:
        records = read_records(out / "metrics.jsonl")
        title = f"{self.workload.name}: {self.config.optimizer}, {self.config.schedule}, lr {self.config.lr:g}"
        metrics = self.workload.eval_metrics
        plot_training(records, out / "training.png", title, "val_loss" if "val_loss" in metrics else metrics[0])


def nothing_to_resume(folder: Path, skipped: list[Skipped]) -> str:
    """The one line that refuses a resume with no usable checkpoint, saying what was found."""
    if not skipped:
        return f"--resume: {str(folder)!r} holds no checkpoint"
    found = "; ".join(f"{item.path.name}: {item.reason}" for item in skipped[:3])
    more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    return f"--resume: no checkpoint in {str(folder)!r} can be resumed ({found}{more})"


def train(config: TrainConfig, out: str | Path | None = None, *, resume: bool = False,
          workload: Workload | None = None, progress: bool = False, allow_changes: Any = (),
          restarted: bool = False, plot: bool = True) -> TrainResult:
    """Train as ``config`` says; checkpoints, metrics and plots go to ``out`` (none when ``None``; no plot
    when ``plot`` is false).

    ``resume=True`` continues from the newest usable checkpoint in ``out`` (one that verifies,
    was written under the same settings, except those named in ``allow_changes``, and holds
    finite weights); with none, a ``ValueError`` says what was found. ``workload`` replaces
    the one ``config`` names (for tests and library use). Raises ``TrainingDiverged`` with a
    report when the guards give up, ``NonFiniteWeights`` when the run ends with non-finite
    weights, ``OSError`` when a file cannot be written (the checkpoints before it stay intact).
    ``restarted=True`` (a worker torchrun restarted) resumes like ``resume=True`` once the job
    has written a checkpoint, and starts afresh in the job's own folder before that.
    """
    trainer = Trainer(config, out, resume=resume, workload=workload, progress=progress, allow_changes=allow_changes,
                      restarted=restarted, plot=plot)
    try:
        return trainer.run()
    finally:
        trainer.close()
