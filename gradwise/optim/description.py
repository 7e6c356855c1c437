"""What an optimizer is, said once, by the optimizer class itself.

Every optimizer class in :mod:`gradwise.optim` carries a ``description`` class attribute
(a :class:`Description`). The layers above read it instead of keeping their own lists:

- the training loop and the race read :attr:`Description.drive` (how a step is driven) and
  :attr:`Description.presets` (the names a run can ask for, with their hyperparameters);
- the race reads :attr:`Description.lr_range` (where a fair sweep looks);
- the memory planner reads :attr:`Description.state` (bytes of state per tensor);
- ZeRO reads :attr:`Description.sharding` (how the state can be divided among ranks).

Adding an optimizer is then one file: the class and its description. :func:`described_optimizers`
walks :data:`gradwise.optim.__all__`, so a new export is seen by every registry at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, Protocol

from gradwise.optim.state_formats import buffer_bytes

Drive = Literal[
    "step", "closure", "loss_closure", "hessian_closure", "snapshot_closure", "sample_index", "model",
    "hessian_refresh",
]
"""How a step is called (:func:`gradwise.optim.driving.drive_step` calls each one so):

- ``"step"``: ``loss.backward()``, then ``step()``, as torch's first-order optimizers;
- ``"closure"``: ``step(closure)``, the closure zeroing the gradients, evaluating the loss and
  calling ``backward()`` (L-BFGS: its line search evaluates it several times per step);
- ``"loss_closure"``: ``step(loss_fn)``, ``loss_fn`` returning the loss *without* ``backward()``:
  the optimizer differentiates it itself, twice (Newton, Newton-CG);
- ``"hessian_closure"``: ``loss.backward()``, then ``step(hessian_closure=loss_fn)``, ``loss_fn``
  returning a loss without ``backward()`` that the optimizer differentiates twice when a
  curvature pair is due (SQN);
- ``"snapshot_closure"``: ``update_snapshot(full_closure)`` when a snapshot is due (each epoch
  of a finite sum), the closure computing the full objective and calling ``backward()``; then
  ``step(closure)`` on the batch (SVRG);
- ``"sample_index"``: ``step(slot, closure)``, ``slot`` the index of the sample (or fixed block of
  samples) whose loss the closure evaluates and differentiates (SAGA);
- ``"model"``: bound to a model whose layers' hooks feed it statistics (K-FAC), then as
  ``"step"``. It cannot be rebuilt from param groups alone, so it offers
  ``restricted_to(params)`` (the same optimizer over a subset, taking over the hooks), and
  ``pending_factors()`` (the statistics of the last backward pass, by layer in ``layers``)
  for data parallelism to average;
- ``"hessian_refresh"``: as ``"step"``, and before the backward pass, when
  ``optimizer.hessian_update_due``, ``optimizer.update_hessian(estimate, params)`` (Sophia).
"""

DRIVES: tuple[Drive, ...] = (
    "step", "closure", "loss_closure", "hessian_closure", "snapshot_closure", "sample_index", "model",
    "hessian_refresh",
)

Sharding = Literal["element", "tensor", "layer"]
"""How ZeRO divides the state among ranks:

- ``"element"``: the update is element-wise, so the flat parameter buffer is cut into equal
  slices;
- ``"tensor"``: the update needs a whole tensor (a matrix root, an orthogonalisation, a row
  and column statistic), so whole tensors are balanced by size;
- ``"layer"``: the update needs a whole layer (K-FAC: a weight and its bias share the factors);
  the optimizer lists its layers (modules with ``weight`` and ``bias``) in ``layers``.

``None`` in a description: the optimizer treats the param group as one flat vector or needs
closures, and is not sharded.
"""

SHARDINGS: tuple[Sharding, ...] = ("element", "tensor", "layer")


@dataclass(frozen=True)
class StateSize:
    """Optimizer state of one parameter tensor: ``values`` stored in the state's number format
    and ``scalars`` scalar tensors (step counters, running products) of 4 bytes each.

    Of ``values``, the moment buffers that a ``state_format`` stores
    (:mod:`gradwise.optim.state_formats`) are listed in ``moments`` as ``(shape, signed, count)``:
    ``count`` buffers of ``shape`` whose values are signed (a first moment) or not (a second
    moment); the quantised formats scale the two differently."""

    values: int
    scalars: int = 0
    moments: tuple[tuple[tuple[int, ...], bool, int], ...] = ()

    def __add__(self, other: StateSize) -> StateSize:
        return StateSize(self.values + other.values, self.scalars + other.scalars, self.moments + other.moments)

    def __mul__(self, count: int) -> StateSize:
        return StateSize(self.values * count, self.scalars * count,
                         tuple((shape, signed, buffers * count) for shape, signed, buffers in self.moments))

    def bytes(self, element_size: int, state_format: str = "fp32") -> int:
        """Bytes of this state with values of ``element_size`` bytes and the moments in
        ``state_format``."""
        moment_values = sum(buffers * numel(shape) for shape, _, buffers in self.moments)
        return ((self.values - moment_values) * element_size + self.scalars * SCALAR_STATE_BYTES
                + sum(buffers * buffer_bytes(state_format, shape, signed, element_size)
                      for shape, signed, buffers in self.moments))


SCALAR_STATE_BYTES = 4
"""A scalar state tensor (a step counter) is a float32 or int32 tensor."""


def moment_buffers(shape: tuple[int, ...], signed: int = 0, unsigned: int = 0, others: int = 0,
                   scalars: int = 0) -> StateSize:
    """``signed`` first-moment and ``unsigned`` second-moment buffers the size of a tensor of
    ``shape`` (a ``state_format`` applies to them), plus ``others`` values and ``scalars`` scalars
    it does not apply to."""
    moments = tuple((shape, sign, count) for sign, count in ((True, signed), (False, unsigned)) if count)
    return StateSize((signed + unsigned) * numel(shape) + others, scalars, moments)


StateRule = Callable[[tuple[int, ...], Mapping[str, Any]], StateSize]
"""``rule(shape, options) -> StateSize``: the state kept for one tensor of ``shape`` under the
hyperparameters ``options`` (a param group). For a description with ``flat_state`` the shape
is ``(numel,)``, the param group seen as one flat vector."""


def numel(shape: tuple[int, ...]) -> int:
    """Elements of a tensor of ``shape``."""
    return math.prod(shape)


def moments(count: int, scalars: int = 0) -> StateRule:
    """The rule of an element-wise optimizer that keeps ``count`` buffers the size of the
    parameter and ``scalars`` scalar tensors, whatever its hyperparameters."""

    def rule(shape: tuple[int, ...], options: Mapping[str, Any]) -> StateSize:
        return StateSize(count * numel(shape), scalars)

    rule.__doc__ = f"{count} buffer(s) the size of the parameter and {scalars} scalar tensor(s)."
    return rule


@dataclass(frozen=True)
class Preset:
    """A name a run can ask for: an optimizer class with some hyperparameters.

    Attributes:
        summary: one line for ``--help`` and reports.
        options: hyperparameters that differ from the class defaults, for every reader
            (the memory planner reads only these: they are the ones that change the state).
        train: ``None`` when ``gradwise train`` does not offer the name; otherwise the
            hyperparameters training adds to ``options``.
        race: ``None`` when the race does not offer the name; otherwise the hyperparameters
            the race adds to ``options``.
        race_default: the race runs it when no optimizers are named.
        lr_scale: the training learning rate as a multiple of the workload's (each workload's
            default lr is the one tuned for AdamW): ``gradwise train`` uses ``lr * lr_scale``
            when no lr is given, and the workload race centres its search there. The
            scales are set from measurement (tiny-gpt, ``benchmarks/results/race_tiny_gpt*``)
            and the literature: Muon's orthogonalised updates have unit spectral norm, so its
            lr is 10-20x AdamW's; Lion's sign updates are larger per coordinate than Adam's,
            so its lr is a fifth (Chen et al. 2023 recommend 3-10x smaller).

    Training and the race differ where their problems differ: training follows the usual
    settings of language-model training (GPT-style betas), the race runs deterministic test
    functions of a few variables (no weight decay: there is nothing to regularise).
    """

    summary: str
    options: Mapping[str, Any] = field(default_factory=dict)
    train: Mapping[str, Any] | None = None
    race: Mapping[str, Any] | None = None
    race_default: bool = False
    lr_scale: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr_scale) and self.lr_scale > 0):
            raise ValueError(f"lr_scale must be a finite number > 0, got {self.lr_scale!r}")

    def train_options(self) -> dict[str, Any]:
        """The hyperparameters of a training run (a ``ValueError`` if training lacks it)."""
        if self.train is None:
            raise ValueError(f"{self.summary}: not offered by gradwise train")
        return {**self.options, **self.train}

    def race_options(self) -> dict[str, Any]:
        """The hyperparameters of a race entry (a ``ValueError`` if the race lacks it)."""
        if self.race is None:
            raise ValueError(f"{self.summary}: not offered by the race")
        return {**self.options, **self.race}


@dataclass(frozen=True)
class Description:
    """What an optimizer class is, for every layer that drives, shards, plans or races it.

    Attributes:
        drive: how a step is driven (see :data:`Drive`).
        sharding: how ZeRO divides the state (see :data:`Sharding`); ``None``: not sharded.
        state: the state-memory rule (see :data:`StateRule`).
        flat_state: the state is kept per param group seen as one flat vector (quasi-Newton,
            Newton), so ``state`` is called once per group with the shape ``(numel,)``.
        lr_range: ``(low, high)`` of a fair learning-rate sweep, inclusive; ``None`` for an
            optimizer the race does not run.
        presets: registry name -> :class:`Preset`. Names are unique across all classes.
        groups: ``groups(model, weight_decay) -> param groups``: how a training run groups a
            model's parameters for this optimizer (Muon: hidden matrices, embeddings and
            head, biases and gains); ``None``: the usual
            :func:`~gradwise.optim.weight_decay_groups`.
        eval_switch: the parameters hold a training point while it trains and another point to
            evaluate and deploy (schedule-free: :math:`y` and the average :math:`x`); the
            optimizer offers :class:`TrainEvalSwitched` (``eval()`` moves the parameters to the
            evaluation point, ``train()`` back), which a caller that evaluates, checkpoints or
            exports weights calls.
        constant_lr: the optimizer replaces the decay of a schedule (schedule-free averages its
            iterates instead): a run gives it a constant lr after warmup.
    """

    drive: Drive
    sharding: Sharding | None
    state: StateRule
    flat_state: bool = False
    lr_range: tuple[float, float] | None = None
    presets: Mapping[str, Preset] = field(default_factory=dict)
    groups: Callable[[Any, float], list[dict[str, Any]]] | None = None
    eval_switch: bool = False
    constant_lr: bool = False

    def __post_init__(self) -> None:
        if self.drive not in DRIVES:
            raise ValueError(f"drive must be one of {', '.join(DRIVES)}, got {self.drive!r}")
        if self.sharding is not None and self.sharding not in SHARDINGS:
            raise ValueError(f"sharding must be one of {', '.join(SHARDINGS)} or None, got {self.sharding!r}")
        if self.lr_range is not None and not 0 < self.lr_range[0] < self.lr_range[1]:
            raise ValueError(f"lr_range must be (low, high) with 0 < low < high, got {self.lr_range}")
        if self.lr_range is None and any(p.race is not None for p in self.presets.values()):
            raise ValueError("a preset the race offers needs the class's lr_range")
        object.__setattr__(self, "presets", MappingProxyType(dict(self.presets)))

    def state_of(self, shapes: list[tuple[tuple[int, ...], int]], options: Mapping[str, Any]) -> StateSize:
        """The state kept for a param group of ``shapes`` ((shape, how many tensors)) under
        ``options``: one call on the flat group for ``flat_state``, else the sum per tensor."""
        if self.flat_state:
            return self.state((sum(numel(shape) * count for shape, count in shapes),), options)
        return sum((self.state(tuple(shape), options) * count for shape, count in shapes), StateSize(0))


def description_of(optimizer_class: type, inherited: bool = False) -> Description:
    """The description of ``optimizer_class``: its own (the default: a subclass may change the
    algorithm, so its parent's state rule is not taken on trust), or with ``inherited`` the
    nearest in its classes (ZeRO shards a subclass of AdamW as AdamW). A ``KeyError`` names a
    class without one."""
    description = getattr(optimizer_class, "description", None) if inherited else optimizer_class.__dict__.get(
        "description"
    )
    if not isinstance(description, Description):
        raise KeyError(
            f"no memory rule for optimizer class {optimizer_class.__name__!r}: give it a "
            "`description = Description(...)` (gradwise.optim.description) with its state rule"
        )
    return description


class ModelBound(Protocol):
    """What an optimizer driven by ``"model"`` offers (K-FAC): see :data:`Drive`."""

    layers: list[Any]

    def restricted_to(self, params: Any) -> Any: ...

    def pending_factors(self) -> dict[Any, tuple[Any, Any]]: ...


class HessianRefreshed(Protocol):
    """What an optimizer driven by ``"hessian_refresh"`` offers (Sophia): see :data:`Drive`."""

    @property
    def hessian_update_due(self) -> bool: ...

    def update_hessian(self, estimates: Any, params: Any = None) -> None: ...


class TrainEvalSwitched(Protocol):
    """What an optimizer whose description has ``eval_switch`` offers (schedule-free): the
    names of ``torch.nn.Module``'s modes and of the ``schedulefree`` package's."""

    def train(self) -> None: ...

    def eval(self) -> None: ...


def described_optimizers() -> Iterator[type]:
    """Every optimizer class that :mod:`gradwise.optim` exports, in the order of their files
    (the base class, which describes no algorithm, excluded)."""
    import torch

    import gradwise.optim as optim  # here, not at the top: the optimizer files import this module

    classes = []
    for name in optim.__all__:
        obj = getattr(optim, name)
        if isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer) and obj is not optim.GradwiseOptimizer:
            classes.append(obj)
    yield from sorted(classes, key=lambda cls: (cls.__module__, cls.__name__))


def presets() -> dict[str, tuple[type, Preset]]:
    """Every preset name -> (its optimizer class, the :class:`Preset`).

    A ``ValueError`` if two classes claim the same name or an exported optimizer has no
    description (every registry reads this one table, so a gap would be silent elsewhere).
    """
    table: dict[str, tuple[type, Preset]] = {}
    for cls in described_optimizers():
        try:
            description = description_of(cls)
        except KeyError:
            raise ValueError(
                f"{cls.__name__} has no description: give the class a `description = Description(...)`"
            ) from None
        for name, preset in description.presets.items():
            if name in table:
                raise ValueError(f"preset {name!r} is claimed by {table[name][0].__name__} and {cls.__name__}")
            table[name] = (cls, preset)
    return table
