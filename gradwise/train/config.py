"""The settings of a training run: one dataclass, loadable from TOML, checked before anything runs.

Settings left at ``None`` take the workload's defaults (see
:data:`gradwise.problems.workloads.WORKLOADS`): ``steps``, ``batch_size``, ``lr``,
``precision`` and ``eval_every`` suit each workload. A TOML file holds the same names at
its top level, with ``workload_options`` and ``optimizer_options`` as tables::

    workload = "tiny-gpt"
    optimizer = "adamw"
    steps = 1200
    lr = 2e-3
    precision = "bf16"
    [workload_options]
    d_model = 128
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from gradwise.optim.description import description_of, presets
from gradwise.optim.param_rounding import PARAM_ROUNDINGS
from gradwise.optim.state_formats import STATE_FORMATS, check_state_format
from gradwise.schedules import SCHEDULES
from gradwise.train.optimizers import OPTIMIZERS, check_optimizer_options
from gradwise.train.precision import PRECISIONS
from gradwise.user_files import MAX_CONFIG_BYTES, check_user_file, read_user_text
from gradwise.validation import check_choice, check_int, check_range

LARGEST_SEED = 2**63 - 1
"""torch's generators take a signed or unsigned 64-bit seed; a run adds small offsets to it."""
LARGEST_CLIP_VALUE = float(torch.finfo(torch.float32).max)
"""Gradients are float32 (or narrower): clamping them to a larger bound overflows in torch."""
LARGEST_SHARPNESS_STEPS = 100
"""Lanczos keeps one vector of the model's size per step: a few warm-started steps suffice, 100 is plenty."""

DTENSOR_STRATEGIES = ("fsdp", "tp", "3d")
"""Strategies whose optimizer steps sharded (DTensor) parameters."""

BF16_PARAM_STRATEGIES = ("single", "ddp")
"""Strategies that step the model's own parameters (ZeRO, FSDP, TP and PP keep buffers or shards of their own)."""

QK_CLIP_STRATEGIES = ("single", "ddp", "zero1", "zero2")
"""Strategies under which every rank holds whole attention heads after the step, so QK-Clip's agreed
factors keep the replicas equal; FSDP, tensor and pipeline parallelism split them."""

SHARPNESS_STRATEGIES = ("single", "ddp", "zero1", "zero2")
"""Strategies that keep the whole model, the same on every rank, after each step: every rank measures the
sharpness of ``--track-sharpness`` alike, without communicating. FSDP, tensor and pipeline parallelism
split the model; local SGD and DiLoCo let the replicas drift apart between averages."""

T = TypeVar("T")


def required(value: T | None, name: str) -> T:
    """A setting that the workload's defaults fill in (``None`` only before :func:`resolved_config`)."""
    if value is None:
        raise RuntimeError(f"setting {name} is unset: resolve the config with the workload's defaults first")
    return value


def setting(default: Any = dataclasses.MISSING, *, help: str, metavar: str | None = None, flag: str | None = None,
            choices: Callable[[], Iterable[str]] | None = None, none_is_off: bool = False,
            default_factory: Any = dataclasses.MISSING) -> Any:
    """A :class:`TrainConfig` field that also says how ``gradwise train`` offers it.

    The command line builds one option per field from this: ``--NAME`` (``flag`` replaces the
    name), parsed by the field's type, with ``help``, ``metavar``, the names ``choices()``
    returns filled into ``{choices}`` in the help (a function, so that the registries load only
    when the help is built), and ``none_is_off``: ``none`` is accepted and means "off".
    """
    metadata = {"help": help, "metavar": metavar, "flag": flag, "choices": choices, "none_is_off": none_is_off}
    return field(default=default, default_factory=default_factory,
                 metadata={key: value for key, value in metadata.items() if value not in (None, False)})


def workload_names() -> dict[str, Any]:
    from gradwise.problems.workloads import WORKLOADS  # the registry imports the workloads' heavy modules

    return WORKLOADS


def strategy_names() -> dict[str, Any]:
    from gradwise.distributed.strategies.registry import STRATEGIES  # torch.distributed, only when asked for

    return STRATEGIES


@dataclass
class TrainConfig:
    """Everything that defines a run; ``validate`` checks every field. Each field's metadata is its
    ``gradwise train`` option (:func:`setting`)."""

    workload: str = setting("tiny-gpt", metavar="NAME", choices=workload_names,
                            help="one of {choices} (default: tiny-gpt)")
    workload_options: dict[str, Any] = setting(default_factory=dict, metavar="K=V,...",
                                               help="workload settings, e.g. d_model=64,n_layer=2 for tiny-gpt")
    data: list[str] = setting(default_factory=list, metavar="FILES",
                              help="your data: a text file for 'text', X.npy,y.npy for 'npy'")
    """User data files: one text file for ``text``, an inputs and a labels ``.npy`` for ``npy``."""
    optimizer: str = setting("adamw", metavar="NAME", choices=lambda: OPTIMIZERS,
                             help="one of {choices} (default: adamw)")
    optimizer_options: dict[str, Any] = setting(default_factory=dict, metavar="K=V,...",
                                                help="extra hyperparameters, e.g. momentum=0.8")
    lr: float | None = setting(None, help="peak learning rate (default: the workload's, scaled for the optimizer)")
    weight_decay: float = setting(0.1, help="decoupled weight decay of matrices (default: 0.1)")
    schedule: str = setting("cosine", metavar="NAME", choices=lambda: SCHEDULES,
                            help="one of {choices} (default: cosine)")
    warmup_steps: int | None = setting(None, flag="warmup", metavar="STEPS",
                                       help="warmup steps (default: 5% of --steps)")
    """Default: 5% of the steps."""
    lr_floor: float = setting(0.1, metavar="FRACTION", help="final lr as a fraction of the peak (default: 0.1)")
    """Final lr of a decaying schedule, as a fraction of the peak."""
    steps: int | None = setting(None, help="optimizer steps (default: the workload's)")
    batch_size: int | None = setting(None, help="micro-batch size (default: the workload's)")
    """Micro-batch size of each data-parallel rank; the update uses ``batch_size * accumulate`` examples
    per rank, ``N`` times that in all over ``N`` data-parallel ranks."""
    accumulate: int = setting(1, metavar="K", help="micro-batches per step (default: 1)")
    clip: float | None = setting(1.0, metavar="NORM", none_is_off=True,
                                 help="largest global gradient norm, or none (default: 1.0)")
    """Largest global gradient norm (None: no clipping by norm)."""
    clip_value: float | None = setting(None, metavar="V", none_is_off=True,
                                       help="largest gradient entry, or none (default: none)")
    """Largest absolute gradient entry (None: no clipping by value)."""
    qk_clip: float | None = setting(None, metavar="TAU", none_is_off=True,
                                    help="cap each attention head's largest logit at TAU by rescaling its query "
                                         "and key weights after every step (QK-Clip; Kimi K2 used 100), or none "
                                         "(default: none)")
    """QK-Clip's threshold (:class:`gradwise.optim.qk_clip.QKClip`), for a workload whose attention reports
    its logits; None: off. Strategies that keep the whole model on every rank only (:data:`QK_CLIP_STRATEGIES`)."""
    state_format: str = setting("fp32", metavar="FORMAT", choices=lambda: STATE_FORMATS,
                                help="the optimizer's moments: {choices} (default: fp32, torch's rule; "
                                     "adam, adamw, lion, sgd, muon and their variants)")
    """How the optimizer stores its moments (:mod:`gradwise.optim.state_formats`); refused by an optimizer
    that keeps its state as torch does, and under FSDP and tensor parallelism (sharded parameters)."""
    bf16_params: str | None = setting(None, metavar="ROUNDING", none_is_off=True, choices=lambda: PARAM_ROUNDINGS,
                                      help="train bf16 parameters, no float32 master copy, each step stored back by "
                                           "{choices} rounding, or none: float32 parameters (default: none)")
    """Pure-bf16 training: the model's parameters in bfloat16 and the optimizer's ``param_rounding``
    (:mod:`gradwise.optim.param_rounding`); None: float32 parameters. Needs precision bf16 (autocast
    casts the inputs), an optimizer that takes ``param_rounding`` and a strategy of
    :data:`BF16_PARAM_STRATEGIES`."""
    track_sharpness: int | None = setting(None, metavar="EVERY", none_is_off=True,
                                          help="every EVERY steps, record the top Hessian eigenvalue of the loss on "
                                               "the run's first batch (Lanczos, warm-started) and plot it against "
                                               "2/lr, gradient descent's edge of stability; each measurement costs "
                                               "K + 1 Hessian-vector products (K: --sharpness-steps), 2(K + 1) "
                                               "forward-backward passes on that batch or more (about 20 training "
                                               "steps on tiny-gpt at K = 5); or none (default: none)")
    """Steps between sharpness measurements (:mod:`gradwise.train.sharpness`); None: off. Strategies of
    :data:`SHARPNESS_STRATEGIES`."""
    sharpness_steps: int = setting(5, metavar="K", help="Lanczos steps of each --track-sharpness measurement, "
                                                        f"at most {LARGEST_SHARPNESS_STEPS} (default: 5)")
    """Lanczos steps per sharpness measurement; the basis holds ``K`` vectors of the model's size."""
    precision: str | None = setting(None, metavar="NAME", choices=lambda: PRECISIONS,
                                    help="one of {choices} (default: the workload's)")
    device: str = setting("cpu", metavar="NAME", help="cpu, cuda or auto (default: cpu)")
    threads: int | None = setting(None, help="CPU threads (default: every core)")
    """CPU threads for torch (default: every core)."""
    seed: int = setting(0, help="seed of the model and the batches (default: 0)")
    eval_every: int | None = setting(None, metavar="STEPS", help="steps between evaluations (default: the workload's)")
    checkpoint_every: int = setting(100, metavar="STEPS", help="steps between checkpoints (default: 100)")
    keep_checkpoints: int = setting(3, metavar="K", help="checkpoints kept (default: 3)")
    spike_factor: float = setting(4.0, help="a loss above this multiple of the recent median rolls back (default: 4)")
    """A loss above this multiple of the recent median is a spike."""
    spike_window: int = setting(50, metavar="STEPS", help="losses in the recent median (default: 50)")
    max_consecutive_skips: int = setting(5, metavar="K", help="non-finite steps in a row that roll back (default: 5)")
    rollback_lr_factor: float = setting(0.5, metavar="F", help="lr multiplier at each rollback (default: 0.5)")
    max_rollbacks: int = setting(3, metavar="K", help="rollbacks before the run stops (default: 3)")
    strategy: str | None = setting(None, metavar="NAME", choices=strategy_names,
                                   help="one of {choices} (default: single for 1 process, ddp for more)")
    """How N processes share the work (``gradwise.distributed.strategies.registry.STRATEGIES``); None:
    ``single`` for one process, ``ddp`` for more. Its options (and the world size) are checked
    when the job starts."""
    strategy_options: dict[str, Any] = setting(default_factory=dict, metavar="K=V,...",
                                               help="strategy settings, e.g. compression=powersgd,rank=2 for ddp")

    def validate(self) -> TrainConfig:
        """Check every setting; a ``ValueError`` names the first bad one. Returns ``self``."""
        check_choice("workload", self.workload, workload_names())
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        for name in ("workload_options", "optimizer_options", "strategy_options"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must be a table of settings, got {getattr(self, name)!r}")
        if not isinstance(self.data, list) or not all(isinstance(path, str) for path in self.data):
            raise ValueError(f"data must be a list of file paths, got {self.data!r}")
        for path in self.data:
            check_user_file(path, "data file")
        if self.lr is not None:
            check_range("lr", self.lr, 0.0, low_open=True)
        check_range("weight_decay", self.weight_decay, 0.0)
        if self.warmup_steps is not None:
            check_int("warmup_steps", self.warmup_steps, 0)
        check_range("lr_floor", self.lr_floor, 0.0, 1.0)
        if self.steps is not None:
            check_int("steps", self.steps, 1)
        if self.batch_size is not None:
            check_int("batch_size", self.batch_size, 1)
        check_int("accumulate", self.accumulate, 1)
        if self.clip is not None:
            check_range("clip", self.clip, 0.0, low_open=True)
        if self.clip_value is not None:
            check_range("clip_value", self.clip_value, 0.0, LARGEST_CLIP_VALUE, low_open=True)
        if self.qk_clip is not None:
            check_range("qk_clip", self.qk_clip, 0.0, low_open=True)
            if self.strategy is not None and self.strategy not in QK_CLIP_STRATEGIES:
                raise ValueError(f"qk_clip rescales whole attention heads on every rank: run it with strategy "
                                 f"{', '.join(QK_CLIP_STRATEGIES)}, not {self.strategy!r}")
        state_format = check_state_format(OPTIMIZERS[self.optimizer][0], self.effective_state_format())
        optimizer_class = OPTIMIZERS[self.optimizer][0]
        if (state_format != "fp32" and self.strategy in DTENSOR_STRATEGIES
                and description_of(optimizer_class, inherited=True).sharding != "element"):
            raise ValueError(f"state_format {state_format!r}: {optimizer_class.__name__} updates whole matrices, "
                             f"whose moments' blocks strategy {self.strategy!r} would split across ranks "
                             "(use ddp, zero1 or zero2, or state_format 'fp32')")
        if self.precision is not None:
            check_choice("precision", self.precision, PRECISIONS)
        if self.bf16_params is not None:
            self.check_bf16_params()
        check_int("sharpness_steps", self.sharpness_steps, 1, LARGEST_SHARPNESS_STEPS)
        if self.track_sharpness is not None:
            check_int("track_sharpness", self.track_sharpness, 1)
            if self.strategy is not None and self.strategy not in SHARPNESS_STRATEGIES:
                raise ValueError(f"track_sharpness measures the whole model on every rank: run it with strategy "
                                 f"{', '.join(SHARPNESS_STRATEGIES)}, not {self.strategy!r}")
        check_choice("device", self.device, ("cpu", "cuda", "auto"))
        if self.threads is not None:  # more threads than cores only slows torch; 1e5 exhausts OpenMP's memory
            check_int("threads", self.threads, 1, os.cpu_count() or 1)
        check_int("seed", self.seed, 0, LARGEST_SEED)
        if self.eval_every is not None:
            check_int("eval_every", self.eval_every, 1)
        check_int("checkpoint_every", self.checkpoint_every, 1)
        check_int("keep_checkpoints", self.keep_checkpoints, 1)
        check_range("spike_factor", self.spike_factor, 1.0, low_open=True)
        check_int("spike_window", self.spike_window, 2)
        check_int("max_consecutive_skips", self.max_consecutive_skips, 1)
        check_range("rollback_lr_factor", self.rollback_lr_factor, 0.0, 1.0, low_open=True, high_open=True)
        check_int("max_rollbacks", self.max_rollbacks, 0)
        check_optimizer_options(self.optimizer, self.optimizer_options)
        if self.strategy is not None:
            strategies = strategy_names()
            strategy = strategies[check_choice("strategy", self.strategy, strategies)]
            strategy.check_options(self.strategy_options)
            if strategy.workloads is not None and self.workload not in strategy.workloads:
                raise ValueError(f"strategy {self.strategy!r} splits the model of workload "
                                 f"{' or '.join(map(repr, strategy.workloads))}, got workload {self.workload!r}")
        if self.steps is not None and self.warmup_steps is not None and self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps must be <= steps ({self.steps}), got {self.warmup_steps}")
        return self

    def effective_state_format(self) -> str:
        """The format the run's optimizer keeps its moments in: ``state_format`` (``--state-format``) when
        set, else an ``optimizer_options`` entry or the preset's (``adamw-8bit``)."""
        if self.state_format != "fp32":
            return self.state_format
        return {**OPTIMIZERS[self.optimizer][1], **self.optimizer_options}.get("state_format", "fp32")

    def check_bf16_params(self) -> None:
        """Refuse (one-line ``ValueError``) what pure-bf16 training cannot run with."""
        check_choice("bf16_params", self.bf16_params, PARAM_ROUNDINGS)
        optimizer_class = OPTIMIZERS[self.optimizer][0]
        if "param_rounding" not in inspect.signature(optimizer_class).parameters:
            raise ValueError(f"bf16_params: optimizer {self.optimizer!r} has no param_rounding option "
                             "(adam, adamw, lion, sgd, muon and their variants have)")
        if self.precision is not None and self.precision != "bf16":
            raise ValueError(f"bf16_params needs precision 'bf16' (autocast casts the inputs), got {self.precision!r}")
        if self.strategy is not None and self.strategy not in BF16_PARAM_STRATEGIES:
            raise ValueError(f"bf16_params steps the model's own parameters: run it with strategy "
                             f"{' or '.join(BF16_PARAM_STRATEGIES)}, not {self.strategy!r}")

    def with_workload_defaults(self, defaults: dict[str, Any]) -> TrainConfig:
        """A copy with every ``None`` that ``defaults`` names filled in, and the warmup resolved.
        The workload's lr is AdamW's: another optimizer's default is that times its preset's
        ``lr_scale`` (:class:`gradwise.optim.description.Preset`)."""
        if self.bf16_params is not None:
            defaults = {**defaults, "precision": "bf16"}  # autocast casts the inputs to the bf16 weights
        filled = dataclasses.replace(self, **{
            name: value for name, value in defaults.items() if getattr(self, name) is None
        })
        if self.lr is None and "lr" in defaults:
            filled.lr = defaults["lr"] * presets()[self.optimizer][1].lr_scale
        if filled.warmup_steps is None:
            filled.warmup_steps = math.ceil(0.05 * required(filled.steps, "steps"))
        return filled.validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a mapping; an unknown key is an error that lists the known ones."""
        known = {item.name for item in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise ValueError(f"{source}: unknown setting {key!r}; known settings: {', '.join(sorted(known))}")
        return cls(**values)

    @classmethod
    def from_toml(cls, path: str | Path) -> TrainConfig:
        """Read a TOML file whose top-level keys are this class's fields."""
        import tomllib

        path = Path(path)
        text = read_user_text(path, "config file", MAX_CONFIG_BYTES)  # a regular file of bounded size
        try:
            values = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"config file {str(path)!r} is not valid TOML: {error}") from None
        except RecursionError:
            raise ValueError(f"config file {str(path)!r} nests arrays or tables too deeply") from None
        return cls.from_dict(values, source=str(path))


CHANGEABLE = {
    "steps": "the schedule is rebuilt over the new length; the run goes on from its step",
    "world_size": "the checkpoint is resharded (or its optimizer state re-split) over the new processes",
    "strategy": "sharded checkpoints reshard; a replicated or ZeRO checkpoint loads into any data-parallel strategy",
    "strategy_options": "how the processes communicate, not what they compute",
    "batch_size": "per process: with another world_size, keep batch_size x world_size to keep the run's batch",
    "threads": "CPU threads (the last bits of a sum may differ)",
    "eval_every": "when the run evaluates",
    "checkpoint_every": "when the run checkpoints",
    "keep_checkpoints": "how many checkpoints are kept",
    "track_sharpness": "what the run measures, not what it trains (a measurement with no warm start starts cold)",
    "sharpness_steps": "what the run measures, not what it trains",
}
"""The settings a resumed run may change, each only when named (``--allow-change``), and why it can be honoured.
Every other setting (workload, data, optimizer and its options, lr, schedule, precision, seed, guards, ...)
must be the one the checkpoint was written under: its state means nothing under another."""


def check_allowed_changes(names: Iterable[str]) -> frozenset[str]:
    """``names`` as a set, each one a key of :data:`CHANGEABLE`."""
    names = frozenset(names)
    for name in sorted(names):
        if name not in CHANGEABLE:
            raise ValueError(f"allow_change: {name!r} cannot change on resume; changeable: {', '.join(CHANGEABLE)}")
    return names


def settings_difference(saved: Any, current: dict[str, Any], allowed: Iterable[str] = ()) -> str | None:
    """The first setting of ``current`` that ``saved`` (a run's recorded settings) has otherwise, as one
    phrase, or ``None``. Compared as JSON values (a tuple equals a list); ``allowed`` names are not compared.
    A setting that ``saved`` lacks (added to gradwise after the run was written) counts as its default,
    which a new setting keeps at the behaviour from before it existed."""
    if not isinstance(saved, dict):
        return "it records no settings"
    defaults = {item.name: item.default for item in dataclasses.fields(TrainConfig)
                if item.default is not dataclasses.MISSING}
    normal = json.loads(json.dumps({**defaults, **saved}, default=str))
    for name, value in json.loads(json.dumps(current, default=str)).items():
        if name not in allowed and normal.get(name, "(none)") != value:
            hint = f" (--allow-change {name} to continue with {value!r})" if name in CHANGEABLE else ""
            return f"written with {name}={normal.get(name, '(none)')!r}, not {value!r}{hint}"
    return None
