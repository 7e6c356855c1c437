"""Time to target on a training workload: equal tuning budgets, several seeds, step times side by side.

For each optimizer (a ``gradwise train`` name), the race

1. **tunes**: ``trials`` full runs on seed 0, each with the whole schedule decayed to its end
   (a run cut short would favour fast starters), at the points of a Halton sequence over the
   optimizer's own learning-rate range and over weight decay. The range spans
   :data:`LR_SPAN_DECADES` decades centred on the workload's lr (AdamW's) times the preset's
   ``lr_scale`` (:class:`gradwise.optim.description.Preset`), so every optimizer gets the same
   resolution; weight decay is uniform on ``[0, WEIGHT_DECAY_HIGH)``. Optimizers without weight
   decay spend every trial on the lr. Point 1 is the range's centre.
2. **repeats** the best trial (lowest final validation loss) on seeds ``1 .. seeds - 1``;
   seed 0 is the tuning run itself.
3. **times** a step of each optimizer at its centre point side by side: blocks of
   :data:`TIMING_BLOCK_STEPS` steps, one optimizer after another, round after round; the time of
   a step is the median over rounds of a block's mean. A block covers the "every 10 steps" work of
   Shampoo, SOAP, K-FAC and Sophia, so the figure is amortised; interleaving puts the shared
   machine's drift on all optimizers alike. This runs first: its figures also estimate the
   race's duration before it starts.

Time to a target is ``steps to target x seconds per step``: the steps are the first evaluation at
or below the target (every 1/:data:`EVALUATIONS` of the run, then the final full evaluation), so
evaluation time is not counted. The default target is the tuned AdamW's mean final loss (the
first optimizer's, without AdamW), and a looser one :data:`LOOSE_TARGET_FACTOR` times it.

Every run is a ``gradwise train`` run folder, ``DIR/runs/<optimizer>/trial<i>-seed<s>``; its
outcome is recorded in ``trial.json`` there once it ends. An interrupted race resumes: ended runs
are read back, a run with a checkpoint continues from it (bit-exact on CPU), others start afresh.
"""

from __future__ import annotations

import inspect
import json
import math
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from gradwise.checkpoints.atomic import write_atomically
from gradwise.optim.description import presets
from gradwise.plan.memory import measured_bytes
from gradwise.problems.workloads import WORKLOADS
from gradwise.train.config import TrainConfig
from gradwise.train.guards import NonFiniteWeights, TrainingDiverged
from gradwise.train.loop import Trainer, train
from gradwise.train.metrics import read_records
from gradwise.train.optimizers import OPTIMIZERS

LR_SPAN_DECADES = 1.5
"""Width of every optimizer's lr range, in decades (a factor of about 32)."""
WEIGHT_DECAY_HIGH = 0.3
EVALUATIONS = 20
"""Quick evaluations per run (the resolution of "steps to target")."""
LOOSE_TARGET_FACTOR = 1.05
TIMING_BLOCK_STEPS = 10
METRIC = "val_loss"
"""What the race ranks by and the targets are values of (lower is better)."""


@dataclass(frozen=True)
class RaceSettings:
    """What defines a race; a resumed race must have the same (``race-plan.json``)."""

    workload: str
    optimizers: list[str]
    trials: int
    seeds: int
    steps: int | None = None
    """``None``: the workload's."""
    workload_options: dict[str, Any] = field(default_factory=dict)
    data: list[str] = field(default_factory=list)
    batch_size: int | None = None
    precision: str | None = None
    weight_decay: float | None = None
    """Fixed weight decay for every trial; ``None``: searched."""
    target: float | None = None
    """Fixed target loss; ``None``: the tuned baseline's mean final loss."""
    timing_rounds: int = 5

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def train_config(self, optimizer: str, lr: float | None, weight_decay: float, seed: int) -> TrainConfig:
        """The ``gradwise train`` settings of one run (resolved with the workload's defaults)."""
        defaults = WORKLOADS[self.workload].defaults
        steps = self.steps or defaults["steps"]
        config = TrainConfig(
            workload=self.workload, workload_options=dict(self.workload_options), data=list(self.data),
            optimizer=optimizer, lr=lr, weight_decay=weight_decay, steps=steps, batch_size=self.batch_size,
            precision=self.precision, seed=seed, eval_every=max(1, steps // EVALUATIONS),
            checkpoint_every=max(1, steps // 4), keep_checkpoints=1,
        )
        return config.with_workload_defaults(defaults)

    @property
    def baseline(self) -> str:
        """The optimizer whose tuned final loss is the default target (AdamW if raced)."""
        return "adamw" if "adamw" in self.optimizers else self.optimizers[0]


def halton(index: int, base: int) -> float:
    """The ``index``-th (from 1) point of the van der Corput sequence in ``base``: 1/2, 1/4, 3/4, ... in base 2."""
    point, scale = 0.0, 1.0
    while index > 0:
        scale /= base
        point += scale * (index % base)
        index //= base
    return point


def searches_weight_decay(optimizer: str) -> bool:
    """Whether the optimizer has a weight decay to tune."""
    return "weight_decay" in inspect.signature(OPTIMIZERS[optimizer][0]).parameters


def centre_lr(settings: RaceSettings, optimizer: str) -> float:
    """The centre of the optimizer's lr range: the workload's lr times the preset's ``lr_scale``."""
    return WORKLOADS[settings.workload].defaults["lr"] * presets()[optimizer][1].lr_scale


@dataclass(frozen=True)
class Trial:
    """One run of the race: an optimizer at search point ``index`` (from 1) with ``seed``."""

    optimizer: str
    index: int
    seed: int
    lr: float
    weight_decay: float

    def folder(self, root: Path) -> Path:
        return root / "runs" / self.optimizer / f"trial{self.index}-seed{self.seed}"


def search_point(settings: RaceSettings, optimizer: str, index: int, seed: int = 0) -> Trial:
    """Search point ``index`` (from 1) of ``optimizer``: lr from base 2, weight decay from base 3."""
    lr = centre_lr(settings, optimizer) * 10 ** (LR_SPAN_DECADES * (halton(index, 2) - 0.5))
    if not searches_weight_decay(optimizer):
        weight_decay = 0.0
    elif settings.weight_decay is not None:
        weight_decay = settings.weight_decay
    else:
        weight_decay = WEIGHT_DECAY_HIGH * halton(index, 3)
    return Trial(optimizer, index, seed, float(f"{lr:.4g}"), float(f"{weight_decay:.4g}"))


@dataclass
class TrialResult:
    """How one run ended: its final full validation loss (``None``: it diverged) and its curve of
    ``(step, loss)`` evaluations (the last one the final full evaluation)."""

    trial: Trial
    final_loss: float | None
    curve: list[tuple[int, float]]
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"trial": asdict(self.trial), "final_loss": self.final_loss, "curve": self.curve,
                "reason": self.reason}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrialResult:
        return cls(Trial(**values["trial"]), values["final_loss"], [tuple(point) for point in values["curve"]],
                   values["reason"])


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object the race wrote; a one-line ``ValueError`` if it does not read back."""
    try:
        values = json.loads(path.read_text())
        if not isinstance(values, dict):
            raise ValueError("not a JSON object")
        return values
    except (OSError, ValueError) as error:
        raise ValueError(f"{str(path)!r} is unreadable ({error}): delete it to redo that part of the race") from None


def evaluation_curve(folder: Path) -> list[tuple[int, float]]:
    """The ``(step, val_loss)`` evaluations a run folder's metrics record."""
    return [(record["step"], float(record[METRIC])) for record in read_records(folder / "metrics.jsonl")
            if record.get("kind") == "eval" and METRIC in record]


def run_trial(settings: RaceSettings, trial: Trial, root: Path, plot: bool = True) -> TrialResult:
    """Run ``trial`` to its end (or read back how it ended), recording the outcome in ``trial.json``; ``plot``:
    the run's training.png."""
    folder = trial.folder(root)
    record = folder / "trial.json"
    if record.exists():
        return TrialResult.from_dict(read_json(record))
    config = settings.train_config(trial.optimizer, trial.lr, trial.weight_decay, trial.seed)
    try:
        # the race owns the folder: continue from a checkpoint if there is one, else start afresh
        outcome = train(config, folder, resume=True, restarted=True, plot=plot)
        result = TrialResult(trial, outcome.final_metrics[METRIC], evaluation_curve(folder))
    except (TrainingDiverged, NonFiniteWeights) as failure:
        result = TrialResult(trial, None, evaluation_curve(folder), str(failure).splitlines()[0])
    if result.final_loss is not None and not math.isfinite(result.final_loss):
        result = TrialResult(trial, None, result.curve, f"final {METRIC} is {result.final_loss}")
    write_atomically(record, json.dumps(result.to_dict(), indent=2).encode())
    return result


@dataclass
class StepCost:
    """One optimizer's cost of a step on the workload, measured side by side with the others."""

    seconds_per_step: float
    items_per_step: int
    state_bytes: int
    block_seconds: list[float]
    """Mean seconds per step of each timed block."""


@dataclass
class Timing:
    """The step costs, and what the duration estimate needs besides them."""

    costs: dict[str, StepCost]
    setup_seconds: float
    """Building a run (workload, model, optimizer), the slowest seen."""
    quick_eval_seconds: float
    full_eval_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Timing:
        costs = {name: StepCost(**cost) for name, cost in values["costs"].items()}
        return cls(costs, values["setup_seconds"], values["quick_eval_seconds"], values["full_eval_seconds"])

    def run_seconds(self, settings: RaceSettings, optimizer: str) -> float:
        """Estimated wall time of one run of ``optimizer``."""
        steps = settings.train_config(optimizer, None, 0.0, 0).steps or 0
        return (self.setup_seconds + steps * self.costs[optimizer].seconds_per_step
                + EVALUATIONS * self.quick_eval_seconds + self.full_eval_seconds)

    def race_seconds(self, settings: RaceSettings) -> float:
        """Estimated wall time of the race's runs (the timing itself excluded)."""
        runs = settings.trials + settings.seeds - 1
        return sum(runs * self.run_seconds(settings, name) for name in settings.optimizers)


def measure_step_costs(settings: RaceSettings, on_round: Callable[[], None] | None = None) -> Timing:
    """Step time of every optimizer at its centre point, interleaved (see the module's docstring)."""
    trainers: dict[str, Trainer] = {}
    setup = 0.0
    for name in settings.optimizers:
        trial = search_point(settings, name, 1)
        started = time.perf_counter()
        trainers[name] = trainer = Trainer(settings.train_config(name, trial.lr, trial.weight_decay, 0))
        setup = max(setup, time.perf_counter() - started)
        trainer.model.train()
    blocks: dict[str, list[float]] = {name: [] for name in trainers}
    items: dict[str, int] = {}
    for round_index in range(settings.timing_rounds + 1):  # round 0 warms up (allocations, first-step state)
        for name, trainer in trainers.items():
            started = time.perf_counter()
            for _ in range(TIMING_BLOCK_STEPS):
                items[name] = trainer.train_step().items
            if round_index > 0:
                blocks[name].append((time.perf_counter() - started) / TIMING_BLOCK_STEPS)
        if on_round is not None:
            on_round()
    first = next(iter(trainers.values()))
    started = time.perf_counter()
    first.evaluate(full=False)
    quick = time.perf_counter() - started
    started = time.perf_counter()
    first.evaluate(full=True)
    full = time.perf_counter() - started
    costs = {
        name: StepCost(statistics.median(blocks[name]), items[name],
                       measured_bytes(trainer.optimizer)["optimizer_state"], blocks[name])
        for name, trainer in trainers.items()
    }
    for trainer in trainers.values():
        trainer.close()
    return Timing(costs, setup, quick, full)


def fit_to_budget(settings: RaceSettings, timing: Timing, minutes: float) -> RaceSettings:
    """``settings`` with fewer seeds and trials until the estimate fits in ``minutes``: seeds down to
    2, then trials down to 2, then one seed, then one trial. A ``ValueError`` if one run of each
    optimizer does not fit."""
    fitted = settings
    while timing.race_seconds(fitted) > 60 * minutes:
        if fitted.seeds > 2:
            fitted = _replace(fitted, seeds=fitted.seeds - 1)
        elif fitted.trials > 2:
            fitted = _replace(fitted, trials=fitted.trials - 1)
        elif fitted.seeds > 1:
            fitted = _replace(fitted, seeds=1)
        elif fitted.trials > 1:
            fitted = _replace(fitted, trials=1)
        else:
            raise ValueError(f"budget_minutes: one run of each optimizer takes about "
                             f"{timing.race_seconds(fitted) / 60:.1f} minutes, more than {minutes:g}; "
                             "give more minutes, fewer steps or fewer optimizers")
    return fitted


def _replace(settings: RaceSettings, **changes: Any) -> RaceSettings:
    return RaceSettings(**{**settings.to_dict(), **changes})


def tuning_trials(settings: RaceSettings) -> list[Trial]:
    """The search runs, point by point across the optimizers (an interrupted race stays balanced)."""
    return [search_point(settings, name, index) for index in range(1, settings.trials + 1)
            for name in settings.optimizers]


def best_trial(results: Iterable[TrialResult]) -> TrialResult | None:
    """The finished run with the lowest final loss (``None`` if every run diverged)."""
    finished = [result for result in results if result.final_loss is not None]
    return min(finished, key=lambda result: (result.final_loss, result.trial.index), default=None)


def seed_trials(settings: RaceSettings, best: dict[str, TrialResult | None]) -> list[Trial]:
    """The repeats of each optimizer's best point on seeds 1 .. seeds - 1 (none for one that always diverged)."""
    return [search_point(settings, name, result.trial.index, seed) for seed in range(1, settings.seeds)
            for name, result in best.items() if result is not None]


@dataclass
class RaceRuns:
    """Every run of a race, by optimizer: the tuning runs and the best point's runs over the seeds."""

    tuning: dict[str, list[TrialResult]]
    best: dict[str, TrialResult | None]
    seeds: dict[str, list[TrialResult]]


def run_race(settings: RaceSettings, root: Path, on_run: Callable[[Trial], None] | None = None,
             plots: bool = True) -> RaceRuns:
    """Tune, then repeat the best over the seeds; ``on_run(trial)`` after each run ends (or is read back);
    ``plots``: each run's training.png."""

    def run(trial: Trial) -> TrialResult:
        result = run_trial(settings, trial, root, plots)
        if on_run is not None:
            on_run(trial)
        return result

    tuning: dict[str, list[TrialResult]] = {name: [] for name in settings.optimizers}
    for trial in tuning_trials(settings):
        tuning[trial.optimizer].append(run(trial))
    best = {name: best_trial(results) for name, results in tuning.items()}
    seeds = {name: [] if result is None else [result] for name, result in best.items()}
    for trial in seed_trials(settings, best):
        seeds[trial.optimizer].append(run(trial))
    return RaceRuns(tuning, best, seeds)


def planned_run_count(settings: RaceSettings) -> int:
    return len(settings.optimizers) * (settings.trials + settings.seeds - 1)


def describe_plan(settings: RaceSettings, timing: Timing) -> str:
    """The plan, one line per optimizer with its lr range and estimated time, and the total."""
    config = settings.train_config(settings.baseline, None, 0.0, 0)
    lines = [f"race on {settings.workload}: {config.steps} steps of batch {config.batch_size} "
             f"({config.precision}, {config.schedule}), {settings.trials} trial(s) per optimizer over lr"
             f"{'' if settings.weight_decay is not None else ' and weight decay'}, the best on "
             f"{settings.seeds} seed(s)"]
    for name in settings.optimizers:
        low = centre_lr(settings, name) * 10 ** (-LR_SPAN_DECADES / 2)
        high = centre_lr(settings, name) * 10 ** (LR_SPAN_DECADES / 2)
        cost = timing.costs[name]
        lines.append(f"  {name:<10} lr {low:.3g} .. {high:.3g}  {cost.seconds_per_step * 1e3:7.1f} ms/step  "
                     f"~{timing.run_seconds(settings, name) / 60:.1f} min/run")
    lines.append(f"{planned_run_count(settings)} runs, about {timing.race_seconds(settings) / 60:.0f} minutes "
                 f"on this machine ({torch.get_num_threads()} threads)")
    return "\n".join(lines)
