r"""Memory per device: parameters, gradients, master weights, optimizer state, activations.

The model counts bytes, tensor by tensor, for a number format and a ZeRO stage
(Rajbhandari et al. 2019, "ZeRO: Memory Optimizations Toward Training Trillion Parameter
Models", arXiv:1910.02054). With :math:`\Psi` parameters on :math:`N` devices, :math:`w, g`
the bytes of a weight and a gradient and :math:`K` the bytes of master weights plus
optimizer state per parameter:

.. math::
    \text{DP: } (w + g + K)\Psi,\quad
    \text{stage 1: } (w + g)\Psi + K\Psi/N,\quad
    \text{stage 2: } w\Psi + (g + K)\Psi/N,\quad
    \text{stage 3: } (w + g + K)\Psi/N.

Mixed-precision Adam (``precision="mixed"``) has :math:`w = g = 2` and :math:`K = 4 + 4 + 4`
(fp32 master weights, first and second moments): 16 bytes per parameter, so 7.5B parameters
on 64 devices need 120 GB with plain data parallelism, 31.4 GB at stage 1, 16.6 GB at
stage 2 and 1.9 GB at stage 3, the figures of the ZeRO paper.

The "7B AdamW in bf16 with fp32 states, about 84 GB" example is ``precision="bf16"``: bf16
weights (2 bytes) and gradients (2 bytes), fp32 first and second moments (4 + 4 bytes) and
no separate master copy: :math:`7\times10^9 \times 12 = 84.0\times10^9` bytes = 84.0 GB
(78.2 GiB), before activations. Keeping an fp32 master copy as well (``"mixed"``) makes it
112 GB. Sizes here are bytes; 1 GB = 10^9 bytes.

Optimizer state is counted per tensor by the rule in each optimizer class's description
(:attr:`gradwise.optim.description.Description.state`):
the number of state values, which are stored in the state's number format, and the number
of scalar state tensors (step counters, running products: 4 bytes each). Element-wise
optimizers keep a multiple of the parameter count; Adafactor, Shampoo and SOAP keep
statistics whose size depends on each tensor's shape. The rules reproduce the bytes of
gradwise's own optimizers exactly (checked in the tests against the tensors in
``optimizer.state`` after a step).

Activations of a transformer layer follow Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models", arXiv:2205.05198, section 4: with sequence length
:math:`s`, micro-batch :math:`b`, width :math:`h`, :math:`a` heads and 16-bit activations,
:math:`sbh(34 + 5as/h)` bytes per layer. That is :math:`16\,sbh + 2as^2b` stored values
plus :math:`2\,sbh + as^2b` one-byte dropout masks, which is how other formats are counted.
Under :math:`t`-way tensor parallelism (Megatron's layout) the attention and MLP interiors
split over the ranks but the inputs of the two LayerNorms, of the QKV and of the first MLP
projection (:math:`4\,sbh` values) and the two dropout masks after the row-wise layers
(:math:`2\,sbh`) stay whole on every rank: :math:`sbh(10 + 24/t + 5as/(ht))` bytes. With
sequence parallelism those are split along the sequence too: :math:`sbh(34 + 5as/h)/t`
(the paper's Table 2). With full activation checkpointing only each layer's input
(:math:`sbh` values, :math:`sbh/t` with sequence parallelism) is kept, plus one layer's
activations while it is recomputed in the backward pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from gradwise.optim.description import StateSize, description_of, numel, presets
from gradwise.optim.param_rounding import compensation_bytes, state_element_size
from gradwise.optim.sharded_formats import is_dtensor
from gradwise.optim.state_formats import check_state_format
from gradwise.validation import check_choice, check_int, check_range

ZERO_STAGES = (0, 1, 2, 3)


@dataclass(frozen=True)
class Precision:
    """Bytes per value of each kind of tensor under a number format recipe."""

    name: str
    weight_bytes: int
    grad_bytes: int
    master_bytes: int  # an extra full-precision copy of the weights (0: none)
    state_bytes: int  # optimizer state values
    activation_bytes: int
    description: str


PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision("fp32", 4, 4, 0, 4, 4, "fp32 weights, gradients, states and activations"),
        Precision("bf16", 2, 2, 0, 4, 2,
                  "bf16 weights, gradients and activations; fp32 optimizer states, no master copy"),
        Precision("bf16-kahan", 2, 2, 2, 4, 2,
                  "bf16 weights, gradients and activations; fp32 optimizer states; a bf16 Kahan compensation "
                  "in place of a master copy (gradwise train --bf16-params kahan)"),
        Precision("mixed", 2, 2, 4, 4, 2,
                  "bf16/fp16 weights, gradients and activations; fp32 master weights and states (ZeRO's)"),
        Precision("fp8", 1, 1, 4, 4, 1,
                  "fp8 weights, gradients and activations for the matmuls; fp32 master weights and states"),
    )
}


@dataclass(frozen=True)
class OptimizerPreset:
    """An optimizer by the name the planner uses: its class and the hyperparameters that
    change its state (a preset of the class's description)."""

    name: str
    optimizer: type[torch.optim.Optimizer]
    options: Mapping[str, Any] = field(default_factory=dict)


OPTIMIZERS: dict[str, OptimizerPreset] = {
    name: OptimizerPreset(name, optimizer_class, dict(preset.options))
    for name, (optimizer_class, preset) in presets().items()
}
"""Every preset of every optimizer's description (the planner offers them all)."""


def state_size(
    optimizer_class: type[torch.optim.Optimizer], shape: tuple[int, ...], options: Mapping[str, Any]
) -> StateSize:
    """The optimizer state that ``optimizer_class`` keeps for one tensor of ``shape`` (for a
    description with ``flat_state``: for a param group of ``shape == (numel,)``)."""
    return description_of(optimizer_class).state(tuple(shape), options)


def group_state_size(
    optimizer_class: type[torch.optim.Optimizer], shapes: Shapes, options: Mapping[str, Any]
) -> StateSize:
    """The optimizer state that ``optimizer_class`` keeps for a param group of ``shapes``."""
    return description_of(optimizer_class).state_of(shapes, options)


# ---- parameter shapes -------------------------------------------------------------------

Shapes = list[tuple[tuple[int, ...], int]]
"""Parameter tensors as (shape, how many tensors have it)."""


def shapes_of(params: Iterable[torch.Tensor]) -> Shapes:
    """The shapes of real tensors, each counted once."""
    counts: dict[tuple[int, ...], int] = {}
    for param in params:
        counts[tuple(param.shape)] = counts.get(tuple(param.shape), 0) + 1
    return list(counts.items())


def transformer_shapes(layers: int, width: int, vocab: int, positions: int = 0) -> Shapes:
    """A GPT-2-style decoder: token embedding (tied with the output), learned position
    embeddings of ``positions`` rows (0: none, as with rotary positions), per layer two
    LayerNorms, QKV and output projections and a 4x MLP with biases, and a final LayerNorm:
    about 12 layers width^2 + vocab width parameters."""
    check_int("layers", layers, 1)
    check_int("width", width, 1)
    check_int("vocab", vocab, 1)
    check_int("positions", positions, 0)
    per_layer: Shapes = [
        ((width,), 6),  # 2 LayerNorms (gain and bias each) and the two output-projection biases
        ((3 * width, width), 1), ((3 * width,), 1), ((width, width), 1),
        ((4 * width, width), 1), ((4 * width,), 1), ((width, 4 * width), 1),
    ]
    shapes: Shapes = [((vocab, width), 1), ((width,), 2)] + ([((positions, width), 1)] if positions else [])
    shapes += [(shape, count * layers) for shape, count in per_layer]
    return merge_shapes(shapes)


def square_matrix_shapes(params: float, width: int) -> Shapes:
    """``params`` parameters as ``width x width`` matrices plus one vector of the rest:
    the planner's stand-in for a model known only by its size."""
    check_range("params", params, 0.0, low_open=True)
    check_int("width", width, 1)
    total = int(round(params))
    matrices, rest = divmod(total, width * width)
    shapes: Shapes = [((width, width), matrices)] if matrices else []
    return shapes + ([((rest,), 1)] if rest else [])


def default_width(params: float) -> int:
    """Width of a GPT-like model of ``params`` parameters with the usual aspect ratio
    width = 128 x layers (GPT-3 6.7B and LLaMA 7B: 32 layers of 4096), from
    params = 12 layers width^2, rounded to a multiple of 64."""
    layers = (params / (12 * 128**2)) ** (1 / 3)
    return max(64, int(round(128 * layers / 64)) * 64)


def merge_shapes(shapes: Iterable[tuple[tuple[int, ...], int]]) -> Shapes:
    counts: dict[tuple[int, ...], int] = {}
    for shape, count in shapes:
        counts[shape] = counts.get(shape, 0) + count
    return list(counts.items())


def parameter_count(shapes: Shapes) -> int:
    return sum(numel(shape) * count for shape, count in shapes)


# ---- the model ----------------------------------------------------------------------------


def layer_activation_bytes(
    width: int,
    heads: int,
    seq_len: int,
    micro_batch: int,
    activation_bytes: int = 2,
    tensor_parallel: int = 1,
    sequence_parallel: bool = False,
) -> int:
    """Activation bytes one transformer layer keeps for the backward pass on one device
    (Korthikanti et al. 2022, arXiv:2205.05198, section 4 and Table 2).

    Values of ``activation_bytes`` each and one-byte dropout masks. Whole on every rank of a
    ``tensor_parallel`` group: the inputs of the two LayerNorms, of the QKV projection and of
    the first MLP projection (``4 sbh`` values) and the dropout masks after the attention and
    MLP outputs (``2 sbh``); split over the group: Q, K, V, the output projection's and the
    second MLP projection's inputs, the GeLU's input (``12 sbh`` values), the softmax output
    and its dropout (``2 a s^2 b`` values) and that dropout's mask (``a s^2 b``). In 16 bits:
    ``sbh (34 + 5 a s / h)`` bytes without parallelism, ``sbh (10 + 24 / t + 5 a s / (h t))``
    with tensor parallelism, ``sbh (34 + 5 a s / h) / t`` with sequence parallelism as well.
    """
    for name, value in (("width", width), ("heads", heads), ("seq_len", seq_len), ("micro_batch", micro_batch),
                        ("activation_bytes", activation_bytes), ("tensor_parallel", tensor_parallel)):
        check_int(name, value, 1)
    t = tensor_parallel
    if heads % t or width % t:
        raise ValueError(f"heads and width must be multiples of tensor_parallel, got heads={heads}, width={width}, "
                         f"tensor_parallel={t}")
    sbh = seq_len * micro_batch * width
    scores = heads * seq_len * seq_len * micro_batch
    whole = 4 * sbh * activation_bytes + 2 * sbh
    split = (12 * sbh + 2 * scores) * activation_bytes + scores
    if sequence_parallel:
        return (whole + split) // t
    return whole + split // t


def transformer_activation_bytes(
    layers: int,
    width: int,
    heads: int,
    seq_len: int,
    micro_batch: int,
    activation_bytes: int = 2,
    checkpointing: bool = False,
    tensor_parallel: int = 1,
    sequence_parallel: bool = False,
) -> int:
    """Activation bytes kept for the backward pass of ``layers`` transformer layers on one
    device: ``layers`` times :func:`layer_activation_bytes`. With checkpointing: every
    layer's input (split over the ``tensor_parallel`` group only with sequence parallelism)
    plus one layer's activations, recomputed in backward.
    """
    check_int("layers", layers, 1)
    per_layer = layer_activation_bytes(width, heads, seq_len, micro_batch, activation_bytes, tensor_parallel,
                                       sequence_parallel)
    if checkpointing:
        layer_input = seq_len * micro_batch * width * activation_bytes
        return layers * (layer_input // tensor_parallel if sequence_parallel else layer_input) + per_layer
    return layers * per_layer


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device by kind, under one precision, optimizer and ZeRO stage."""

    parameters: float
    gradients: float
    master_weights: float
    optimizer_state: float
    activations: float

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.master_weights + self.optimizer_state + self.activations

    def as_dict(self) -> dict[str, float]:
        return {
            "parameters": self.parameters,
            "gradients": self.gradients,
            "master_weights": self.master_weights,
            "optimizer_state": self.optimizer_state,
            "activations": self.activations,
            "total": self.total,
        }


def optimizer_state_bytes(shapes: Shapes, optimizer: str, state_bytes: int, state_format: str = "fp32") -> int:
    """Bytes of optimizer state for parameters of ``shapes`` with the optimizer preset
    ``optimizer`` (a name in :data:`OPTIMIZERS`), state values of ``state_bytes`` each, its
    moments in ``state_format`` (:mod:`gradwise.optim.state_formats`)."""
    preset = OPTIMIZERS[check_choice("optimizer", optimizer, OPTIMIZERS)]
    named = preset.options.get("state_format", "fp32")  # a preset may name one (adamw-8bit)
    if state_format != "fp32" and named not in ("fp32", state_format):
        raise ValueError(f"state_format: optimizer {optimizer!r} keeps its moments in {named!r}, got {state_format!r}")
    state_format = check_state_format(preset.optimizer, named if state_format == "fp32" else state_format)
    return group_state_size(preset.optimizer, shapes, preset.options).bytes(state_bytes, state_format)


def estimate_memory(
    shapes: Shapes,
    optimizer: str = "adamw",
    precision: str = "bf16",
    zero_stage: int = 0,
    devices: int = 1,
    activations: int = 0,
    state_format: str = "fp32",
) -> MemoryEstimate:
    """Bytes per device for parameters of ``shapes`` trained with ``optimizer`` in
    ``precision`` under ZeRO ``zero_stage`` (0: plain data parallelism) over ``devices``;
    ``activations`` (bytes per device, see :func:`transformer_activation_bytes`) are added
    as they are: ZeRO does not shard them."""
    fmt = PRECISIONS[check_choice("precision", precision, PRECISIONS)]
    check_choice("zero_stage", zero_stage, ZERO_STAGES)
    check_int("devices", devices, 1)
    check_range("activations", activations, 0.0)
    count = parameter_count(shapes)
    if count <= 0:
        raise ValueError(f"params must be > 0, got {count}")
    state = optimizer_state_bytes(shapes, optimizer, fmt.state_bytes, state_format)
    master = count * fmt.master_bytes
    return MemoryEstimate(
        parameters=count * fmt.weight_bytes / (devices if zero_stage >= 3 else 1),
        gradients=count * fmt.grad_bytes / (devices if zero_stage >= 2 else 1),
        master_weights=master / (devices if zero_stage >= 1 else 1),
        optimizer_state=state / (devices if zero_stage >= 1 else 1),
        activations=float(activations),
    )


# ---- the measurement: bytes of the real tensors ----------------------------------------------


def _storages(objects: Iterable[Any]) -> dict[int, int]:
    """Distinct tensor storages (by address) and their bytes, found in nested containers."""
    found: dict[int, int] = {}
    stack = list(objects)
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            found[storage.data_ptr()] = storage.nbytes()
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return found


def measured_bytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of the real tensors behind ``optimizer``: its parameters, their gradients and
    its state (every distinct storage counted once)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {
        "parameters": sum(_storages(params).values()),
        "gradients": sum(_storages(p.grad for p in params if p.grad is not None).values()),
        "optimizer_state": sum(_storages(optimizer.state.values()).values()),
    }


def predicted_bytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """The model's bytes for the same: parameters and gradients in the parameters' formats,
    state by the class's rule with each param group's hyperparameters, state values in the
    parameters' format (float32 where ``param_rounding`` steps bf16 parameters in float32, with
    Kahan's compensation), the moments in each group's ``state_format``. A sharded (DTensor)
    parameter counts its local shard: the bytes of this rank, the formats' blocks inside the shard."""
    description = description_of(type(optimizer))
    totals = {"parameters": 0, "gradients": 0, "optimizer_state": 0}
    for group in optimizer.param_groups:
        params = [param.to_local() if is_dtensor(param) else param for param in group["params"]]
        for param in params:
            totals["parameters"] += param.numel() * param.element_size()
            totals["gradients"] += param.numel() * param.element_size()
        if not params:
            continue
        state_format = group.get("state_format", "fp32")
        totals["optimizer_state"] += sum(compensation_bytes(group, param) for param in params)
        if description.flat_state:
            size = description.state_of(shapes_of(params), group)
            totals["optimizer_state"] += size.bytes(state_element_size(group, params[0]), state_format)
            continue
        for param in params:
            totals["optimizer_state"] += description.state(tuple(param.shape), group).bytes(
                state_element_size(group, param), state_format)
    return totals
