"""The contract table: one entry per optimizer that ``gradwise.optim`` exports.

As torch's ``OptimizerInfo`` database (``torch.testing._internal.common_optimizers``) does
for torch.optim, each entry says how its optimizer is driven, which torch.optim class has
the same algorithm (its *twin*), and which inputs it supports; ``tests/test_contract.py``
runs one set of contract checks over every entry. What an entry does not claim is either
refused with a clear error (checked) or not part of its contract, and ``notes`` says why.

Each entry is driven as its optimizer's description says (``Entry.drive``, one of
:data:`gradwise.optim.description.Drive`), by the shared driver
:func:`gradwise.optim.driving.drive_step`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import gradwise.optim as gw
from gradwise.optim.description import Drive, description_of

# Inputs an entry may claim (see test_contract.py for the check behind each).
SUPPORTS = frozenset({
    "complex",         # a complex parameter is optimized as its view_as_real
    "sparse",          # sparse gradients, as torch's SGD and Adagrad take them
    "strided",         # non-contiguous parameters, equal to the same values stored contiguously
    "foreach",         # foreach=False / True: torch's single-tensor and multi-tensor paths
    "fused",           # fused=True: a fused kernel for the same update
    "differentiable",  # differentiable=True: gradients flow through step()
    "capturable",      # capturable=True behaves as torch's on the CPU
    "bfloat16",
    "float16",
    "compile",         # torch.compile of the step
    "maximize",
    "param_groups",    # more than one param group (else add_param_group must refuse)
})


_WIRTINGER = (
    "differentiating the gradient again through autograd gives complex (Wirtinger) derivatives, not the "
    "curvature of the real view: refused"
)
_TENSOR_HYPERPARAMETERS_ON_FOREACH = (
    "gradwise's foreach path reads a tensor lr or betas as numbers each step (test_tensor_lr checks the steps "
    "equal the float run); torch's foreach path cannot take them"
)

@dataclass(frozen=True)
class Entry:
    name: str
    optimizer: type[torch.optim.Optimizer]
    # Constructor options of the contract checks: chosen so that a few steps of a tiny model
    # exercise the whole algorithm (preconditioners refreshed, curvature pairs formed).
    kwargs: dict[str, Any]
    supports: frozenset[str]
    torch_twin: type[torch.optim.Optimizer] | None = None
    # Random valid hyperparameters (for the randomised parity run against the twin).
    sample: Callable[[np.random.Generator], dict[str, Any]] | None = None
    # (keyword, invalid value) pairs, each of which must raise a ValueError naming it.
    invalid: list[tuple[str, Any]] = field(default_factory=list)
    # Implementation paths to test, as constructor options: {} is the default path.
    paths: tuple[dict[str, Any], ...] = ({},)
    # Options torch.optim reads from its constructor only (it ignores a per-group value).
    constructor_only: tuple[str, ...] = ()
    # Which of the model's parameters the twin accepts: "all", or "matrices" (torch's Muon).
    twin_params: str = "all"
    # Vectors go in a param group of their own (Muon's internal AdamW, use_muon=False).
    vectors_apart: bool = False
    # Relative tolerance between a compiled and an eager step (float32 step counters in
    # the graph: 1e-6 for torch's own Adam; bf16 Newton-Schulz: 3e-3 for torch's own Muon).
    compile_tolerance: float = 1e-4
    # torch's optim_db hyperparameter sets (by desc) and error inputs (by desc) that do not
    # apply to gradwise's class, each with the reason.
    skip_torch_inputs: dict[str, str] = field(default_factory=dict)
    skip_error_inputs: dict[str, str] = field(default_factory=dict)
    # Learning rate for the convergence check on a quadratic (None: converged elsewhere).
    converge_lr: float | None = None
    # Why an input is not claimed, by SUPPORTS key.
    notes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        assert self.supports <= SUPPORTS, self.supports - SUPPORTS

    def __str__(self) -> str:
        return self.name

    @property
    def drive(self) -> Drive:
        """How the optimizer is driven: its description's (one vocabulary, :data:`gradwise.optim.description.Drive`)."""
        return description_of(self.optimizer).drive


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _maybe_decay(rng: np.random.Generator, low: float = 1e-5, high: float = 1e-1) -> float:
    return float(rng.choice([0.0, _log_uniform(rng, low, high)]))


def _sgd(rng: np.random.Generator) -> dict[str, Any]:
    momentum = float(rng.choice([0.0, rng.uniform(0.1, 0.99)]))
    nesterov = bool(momentum > 0 and rng.random() < 0.5)
    return dict(
        lr=_log_uniform(rng, 1e-4, 1e-1),
        momentum=momentum,
        dampening=0.0 if nesterov else float(rng.choice([0.0, rng.uniform(0, 0.9)])),
        nesterov=nesterov,
        weight_decay=_maybe_decay(rng),
        maximize=bool(rng.random() < 0.2),
    )


def _adagrad(rng: np.random.Generator) -> dict[str, Any]:
    return dict(
        lr=_log_uniform(rng, 1e-3, 1e-1),
        lr_decay=_maybe_decay(rng, 1e-4, 1e-1),
        weight_decay=_maybe_decay(rng),
        initial_accumulator_value=float(rng.choice([0.0, rng.uniform(0, 1)])),
        eps=_log_uniform(rng, 1e-10, 1e-6),
        maximize=bool(rng.random() < 0.2),
    )


def _rmsprop(rng: np.random.Generator) -> dict[str, Any]:
    return dict(
        lr=_log_uniform(rng, 1e-4, 1e-2),
        alpha=rng.uniform(0.8, 0.999),
        eps=_log_uniform(rng, 1e-8, 1e-4),
        weight_decay=_maybe_decay(rng),
        momentum=float(rng.choice([0.0, rng.uniform(0.1, 0.95)])),
        centered=bool(rng.random() < 0.5),
        maximize=bool(rng.random() < 0.2),
    )


def _betas(rng: np.random.Generator) -> tuple[float, float]:
    return (float(rng.uniform(0.5, 0.99)), float(rng.uniform(0.9, 0.9999)))


def _adam(rng: np.random.Generator) -> dict[str, Any]:
    return dict(
        lr=_log_uniform(rng, 1e-4, 1e-1),
        betas=_betas(rng),
        eps=_log_uniform(rng, 1e-10, 1e-6),
        weight_decay=_maybe_decay(rng),
        amsgrad=bool(rng.random() < 0.5),
        maximize=bool(rng.random() < 0.2),
    )


def _nadam(rng: np.random.Generator) -> dict[str, Any]:
    return dict(
        lr=_log_uniform(rng, 1e-4, 1e-1),
        betas=_betas(rng),
        eps=_log_uniform(rng, 1e-10, 1e-6),
        weight_decay=_maybe_decay(rng),
        momentum_decay=_log_uniform(rng, 1e-4, 1e-2),
        decoupled_weight_decay=bool(rng.random() < 0.5),
        maximize=bool(rng.random() < 0.2),
    )


def _lion(rng: np.random.Generator) -> dict[str, Any]:
    return dict(
        lr=_log_uniform(rng, 1e-5, 1e-2),
        betas=_betas(rng),
        weight_decay=_maybe_decay(rng, 1e-3, 1.0),
        maximize=bool(rng.random() < 0.2),
    )


def _ademamix(rng: np.random.Generator) -> dict[str, Any]:
    beta1, beta2 = _betas(rng)
    return dict(
        lr=_log_uniform(rng, 1e-4, 1e-1),
        betas=(beta1, beta2, float(1 - _log_uniform(rng, 1e-4, 1 - beta1))),
        alpha=float(rng.uniform(0.0, 10.0)),
        t_alpha_beta3=None if rng.random() < 0.3 else int(rng.integers(1, 200)),
        eps=_log_uniform(rng, 1e-10, 1e-6),
        weight_decay=_maybe_decay(rng),
        maximize=bool(rng.random() < 0.2),
    )


_LR_INVALID = [("lr", -0.1), ("lr", float("nan")), ("lr", float("inf")), ("lr", "fast")]
_BETAS_INVALID = [("betas", (1.0, 0.999)), ("betas", (0.9, -0.1)), ("betas", (0.9,)), ("eps", -1e-8)]
_BOOL_INVALID = [("maximize", "False")]  # a string is truthy: a bool option must be a bool

# Every element-wise optimizer with a torch twin: all of torch's keywords and inputs.
_TORCH_ELEMENTWISE = frozenset({
    "complex", "strided", "foreach", "differentiable", "capturable", "bfloat16", "float16",
    "compile", "maximize", "param_groups",
})
_LOW_PRECISION = frozenset({"bfloat16", "float16"})
# What an optimizer without a torch twin claims on its foreach path (AdEMAMix; the cautious and
# MARS variants, whose masks and corrections torch's classes do not have).
_FOREACH_ONLY = frozenset({
    "complex", "strided", "foreach", "bfloat16", "float16", "compile", "maximize", "param_groups",
})
_NO_TWIN = {
    "differentiable": "no torch twin: torch's keywords are promised for the algorithms torch has",
    "capturable": "no torch twin (see differentiable)",
}
_OPTION_INVALID = [("cautious", "yes"), ("mars_gamma", -0.1), ("mars_gamma", 1.5)]
_MARS_FLOAT16 = (
    "MARS clips the gradient to norm 1: squares of its small entries underflow float16 (below 6e-8), where "
    "eps = 1e-8 is 0 too, and a masked 0/0 is NaN; use bfloat16"
)
# A state format (the moments' codes are real and rounded) and bf16 parameter rounding: torch's
# inputs on the foreach path, less what each refuses or does not claim.
_FORMATTED = _FOREACH_ONLY - {"complex", "compile"}
_FORMAT_INVALID = [("state_format", "int8"), ("state_format", 8)]
_FORMAT_NOTES = {
    **_NO_TWIN,
    "complex": "the codes are real: complex parameters are refused at step() (checked)",
    "differentiable": "the moments are rounded, which autograd cannot differentiate: refused",
    "compile": "the codecs run eagerly (a generator per write, bucketize on the host's map): not claimed",
}
_ROUNDED = _FOREACH_ONLY - {"compile"}
_ROUNDING_INVALID = [("param_rounding", "kahn"), ("param_rounding", None)]
_ROUNDING_NOTES = {
    **_NO_TWIN,
    "differentiable": "the parameters are rounded, which autograd cannot differentiate: refused",
    "compile": "the step swaps each bf16 parameter's storage for a float32 copy: eager only",
}
_FLAT_NOTE = (
    "works on the flat parameter vector in the parameters' dtype: Cholesky, CG and line "
    "searches in bf16/fp16 are not meaningful; use float32 or float64"
)
_PER_MATRIX_COMPLEX = (
    "preconditions each parameter as a matrix: the real view of a complex matrix would add a "
    "fake axis, so complex parameters are refused at step() (as torch's Muon and Adafactor do)"
)
_SINGLE_GROUP = "one param group: the method treats all parameters as one vector"
_NOT_COMPILED = "step() runs closures, line searches or host-side control flow; compile the model, not the step"

# Schedule-free AdamW and SGD (gradwise.optim.schedule_free): torch's inputs on the foreach path.
_SCHEDULE_FREE = frozenset({"complex", "strided", "foreach", "bfloat16", "float16", "maximize", "param_groups"})
_SCHEDULE_FREE_INVALID = [("warmup_steps", -1), ("warmup_steps", 2.5), ("r", -1.0), ("weight_lr_power", -1.0)]
_SCHEDULE_FREE_NOTES = {
    "differentiable": "no torch twin: torch's keywords are promised for the algorithms torch has",
    "capturable": "no torch twin (see differentiable)",
    "fused": "no fused kernel",
    "compile": "the averaging weight is a number that changes every step: step() runs eagerly (a graph break); "
    "compile the model",
    "sparse": "the interpolation between z and the average is dense: refused",
}

ENTRIES: list[Entry] = [
    Entry(
        "SGD", gw.SGD, {"lr": 0.1, "momentum": 0.9},
        _TORCH_ELEMENTWISE | {"sparse", "fused"},
        torch_twin=torch.optim.SGD, sample=_sgd,
        invalid=_LR_INVALID + _BOOL_INVALID
        + [("momentum", -0.5), ("dampening", 1.5), ("weight_decay", -1e-4), ("nesterov", True)],
        paths=({}, {"fused": False}, {"foreach": False}),
        converge_lr=0.1,
    ),
    Entry(
        "Adagrad", gw.Adagrad, {"lr": 0.1},
        _TORCH_ELEMENTWISE | {"sparse", "fused"},
        torch_twin=torch.optim.Adagrad, sample=_adagrad,
        invalid=_LR_INVALID + _BOOL_INVALID
        + [("lr_decay", -1.0), ("weight_decay", -1.0), ("initial_accumulator_value", -1.0), ("eps", -1.0)],
        paths=({}, {"fused": False}, {"foreach": False}),
        constructor_only=("initial_accumulator_value",),
        converge_lr=0.5,
    ),
    Entry(
        "RMSprop", gw.RMSprop, {"lr": 0.01, "momentum": 0.5},
        _TORCH_ELEMENTWISE,
        torch_twin=torch.optim.RMSprop, sample=_rmsprop,
        invalid=_LR_INVALID + _BOOL_INVALID
        + [("alpha", 1.5), ("alpha", -0.1), ("eps", -1.0), ("momentum", -0.9), ("weight_decay", -1.0)],
        paths=({}, {"foreach": False}),
        converge_lr=0.01,
        notes={"fused": "torch has no fused RMSprop", "sparse": "torch's RMSprop refuses sparse gradients"},
    ),
    Entry(
        "Adam", gw.Adam, {"lr": 0.05},
        _TORCH_ELEMENTWISE | {"fused"},
        torch_twin=torch.optim.Adam, sample=_adam,
        invalid=_LR_INVALID + _BETAS_INVALID + _BOOL_INVALID + [("weight_decay", -1.0)],
        paths=({}, {"fused": False}, {"foreach": False}),
        converge_lr=0.05,
        skip_error_inputs={
            "lr as Tensor doesn't work with foreach & not capturable": _TENSOR_HYPERPARAMETERS_ON_FOREACH,
            "betas\\[0\\] as a Tensor is not supported for capturable=False and foreach=True":
                _TENSOR_HYPERPARAMETERS_ON_FOREACH,
        },
        notes={"sparse": "torch's Adam refuses sparse gradients (SparseAdam is another algorithm)"},
    ),
    Entry(
        "AdamW", gw.AdamW, {"lr": 0.05, "weight_decay": 0.1},
        _TORCH_ELEMENTWISE | {"fused"},
        torch_twin=torch.optim.AdamW, sample=_adam,
        invalid=_LR_INVALID + _BETAS_INVALID + _BOOL_INVALID + [("weight_decay", -1.0)],
        paths=({}, {"fused": False}, {"foreach": False}),
        converge_lr=0.05,
        skip_error_inputs={
            "lr as Tensor doesn't work with foreach & not capturable": _TENSOR_HYPERPARAMETERS_ON_FOREACH,
            "betas\\[0\\] as a Tensor is not supported for capturable=False and foreach=True":
                _TENSOR_HYPERPARAMETERS_ON_FOREACH,
        },
        notes={"sparse": "torch's AdamW refuses sparse gradients"},
    ),
    Entry(
        "NAdam", gw.NAdam, {"lr": 0.05},
        _TORCH_ELEMENTWISE,
        torch_twin=torch.optim.NAdam, sample=_nadam,
        invalid=_LR_INVALID + _BETAS_INVALID + _BOOL_INVALID + [("weight_decay", -1.0), ("momentum_decay", -1e-3)],
        paths=({}, {"foreach": False}),
        converge_lr=0.05,
        notes={"fused": "torch has no fused NAdam", "sparse": "torch's NAdam refuses sparse gradients"},
    ),
    Entry(
        "Lion", gw.Lion, {"lr": 0.01},
        frozenset({"complex", "strided", "fused", "bfloat16", "float16", "compile", "maximize", "param_groups"}),
        sample=_lion,
        invalid=_LR_INVALID + _BOOL_INVALID + [("betas", (0.9, 1.0)), ("betas", (-0.1, 0.99)), ("weight_decay", -1.0)],
        paths=({}, {"fused": True}),
        converge_lr=0.01,
        notes={
            "foreach": "no torch twin: torch's keywords are promised for the optimizers torch has",
            "differentiable": "no torch twin (see foreach)",
            "capturable": "no torch twin (see foreach)",
        },
    ),
    Entry(
        "AdEMAMix", gw.AdEMAMix, {"lr": 0.05, "t_alpha_beta3": 3, "weight_decay": 0.01},
        _FOREACH_ONLY, sample=_ademamix,
        invalid=_LR_INVALID + _BOOL_INVALID + _OPTION_INVALID
        + [("betas", (0.9, 0.999)), ("betas", (0.9, 0.999, 1.0)), ("betas", (-0.1, 0.999, 0.9999)), ("eps", -1e-8),
           ("alpha", -1.0), ("t_alpha_beta3", 0), ("t_alpha_beta3", 2.5), ("weight_decay", -1.0)],
        paths=({}, {"foreach": False}),
        # the check runs the class defaults: beta3 = 0.9999 remembers the first steps' gradients for
        # 10^4 steps; tests/test_ademamix.py converges with a slow EMA sized to its run
        notes={**_NO_TWIN, "fused": "no fused kernel", "sparse": "as Adam, refuses sparse gradients"},
    ),
    # The shared options, each on every class that takes it (gradwise.optim.base: cautious_updates,
    # _mars_gradients).
    Entry(
        "AdamW[cautious]", gw.AdamW, {"lr": 0.05, "weight_decay": 0.1, "cautious": True},
        _FOREACH_ONLY,
        invalid=_LR_INVALID + _OPTION_INVALID,
        paths=({}, {"foreach": False}),
        converge_lr=0.05,
        notes={**_NO_TWIN, "fused": "the mask needs the update, which the fused kernel keeps inside: refused"},
    ),
    Entry(
        "AdamW[mars]", gw.AdamW, {"lr": 0.05, "weight_decay": 0.1, "mars_gamma": 0.025, "betas": (0.95, 0.99)},
        _FOREACH_ONLY | {"fused"},
        invalid=_LR_INVALID + _OPTION_INVALID,
        paths=({}, {"fused": False}, {"foreach": False}),
        converge_lr=0.05,
        notes=_NO_TWIN,
    ),
    Entry(
        "Adam[cautious,mars]", gw.Adam, {"lr": 0.05, "cautious": True, "mars_gamma": 0.5, "amsgrad": True},
        _FOREACH_ONLY - {"float16"},
        invalid=_LR_INVALID + _OPTION_INVALID,
        paths=({}, {"foreach": False}),
        converge_lr=0.05,
        notes={**_NO_TWIN, "float16": _MARS_FLOAT16},
    ),
    Entry(
        "Lion[cautious]", gw.Lion, {"lr": 0.01, "cautious": True},
        _FOREACH_ONLY - {"foreach"},
        invalid=_LR_INVALID + _OPTION_INVALID,
        converge_lr=0.01,
        notes={**_NO_TWIN, "foreach": "as Lion", "fused": "the mask needs the signs, which Lion's kernel keeps inside"},
    ),
    Entry(
        "Lion[mars]", gw.Lion, {"lr": 0.01, "mars_gamma": 0.025},
        (_FOREACH_ONLY - {"foreach"}) | {"fused"},
        invalid=_LR_INVALID + _OPTION_INVALID,
        paths=({}, {"fused": True}),
        converge_lr=0.01,
        notes={**_NO_TWIN, "foreach": "as Lion"},
    ),
    Entry(
        # lr 0.02: a sign that bf16 rounds the other way moves its coordinate by a whole masked step
        "SGD[cautious]", gw.SGD, {"lr": 0.02, "momentum": 0.9, "cautious": True},
        _FOREACH_ONLY,
        invalid=_LR_INVALID + [("cautious", "yes")],
        paths=({}, {"foreach": False}),
        converge_lr=0.1,
        notes={**_NO_TWIN, "fused": "the mask needs the step, which the fused kernel keeps inside: refused",
               "sparse": "the mask is dense: refused"},
    ),
    Entry(
        "AdEMAMix[cautious,mars]", gw.AdEMAMix,
        {"lr": 0.05, "t_alpha_beta3": 3, "weight_decay": 0.01, "cautious": True, "mars_gamma": 0.1},
        _FOREACH_ONLY - {"float16"},
        invalid=_LR_INVALID + _OPTION_INVALID,
        paths=({}, {"foreach": False}),
        notes={**_NO_TWIN, "fused": "no fused kernel", "sparse": "as Adam", "float16": _MARS_FLOAT16},
    ),
    # State formats and bf16 parameter rounding, shared options too (gradwise.optim.state_formats,
    # gradwise.optim.param_rounding): each codec on a class that offers it.
    Entry(
        "AdamW[8bit]", gw.AdamW, {"lr": 0.05, "weight_decay": 0.1, "state_format": "8bit"},
        _FORMATTED | {"fused"},
        invalid=_LR_INVALID + _FORMAT_INVALID,
        paths=({}, {"fused": False}, {"foreach": False}),
        converge_lr=0.05,
        notes=_FORMAT_NOTES,
    ),
    Entry(
        "Adam[4bit]", gw.Adam, {"lr": 0.05, "amsgrad": True, "state_format": "4bit"},
        _FORMATTED | {"fused"},
        invalid=_LR_INVALID + _FORMAT_INVALID,
        paths=({}, {"fused": True}, {"foreach": False}),
        converge_lr=0.05,
        notes=_FORMAT_NOTES,
    ),
    # the fused 4-bit and bf16-sr kernels (Adam[4bit]'s amsgrad takes the generic path)
    Entry(
        "AdamW[4bit]", gw.AdamW, {"lr": 0.05, "weight_decay": 0.1, "state_format": "4bit"},
        _FORMATTED | {"fused"},
        invalid=_LR_INVALID + _FORMAT_INVALID,
        paths=({}, {"fused": False}, {"foreach": False}),
        converge_lr=0.05,
        notes=_FORMAT_NOTES,
    ),
    Entry(
        "AdamW[bf16-sr]", gw.AdamW, {"lr": 0.05, "weight_decay": 0.1, "state_format": "bf16-sr"},
        _FORMATTED | {"fused"},
        invalid=_LR_INVALID + _FORMAT_INVALID,
        paths=({}, {"fused": False}, {"foreach": False}),
        converge_lr=0.05,
        notes=_FORMAT_NOTES,
    ),
    Entry(
        "Lion[bf16-sr]", gw.Lion, {"lr": 0.01, "state_format": "bf16-sr"},
        (_FORMATTED - {"foreach"}) | {"fused"},
        invalid=_LR_INVALID + _FORMAT_INVALID,
        paths=({}, {"fused": True}),
        converge_lr=0.01,
        notes={**_FORMAT_NOTES, "foreach": "as Lion"},
    ),
    Entry(
        "SGD[bf16]", gw.SGD, {"lr": 0.02, "momentum": 0.9, "state_format": "bf16"},
        _FORMATTED | {"fused"},
        invalid=_LR_INVALID + _FORMAT_INVALID,
        paths=({}, {"fused": True}, {"foreach": False}),
        converge_lr=0.1,
        notes={**_FORMAT_NOTES, "sparse": "sparse gradients step the state as torch does: refused"},
    ),
    Entry(
        "Muon[8bit]", gw.Muon, {"lr": 0.02, "state_format": "8bit"},
        frozenset({"strided", "bfloat16", "float16", "maximize", "param_groups"}),
        vectors_apart=True,
        invalid=_LR_INVALID + _FORMAT_INVALID,
        notes={**_FORMAT_NOTES, "foreach": "as Muon"},
    ),
    Entry(
        "AdamW[kahan]", gw.AdamW, {"lr": 0.05, "weight_decay": 0.1, "param_rounding": "kahan"},
        _ROUNDED | {"fused"},
        invalid=_LR_INVALID + _ROUNDING_INVALID,
        paths=({}, {"fused": False}, {"foreach": False}),
        converge_lr=0.05,
        notes=_ROUNDING_NOTES,
    ),
    Entry(
        "SGD[stochastic]", gw.SGD, {"lr": 0.02, "momentum": 0.9, "param_rounding": "stochastic"},
        _ROUNDED | {"fused"},
        invalid=_LR_INVALID + _ROUNDING_INVALID,
        paths=({}, {"fused": True}, {"foreach": False}),
        converge_lr=0.1,
        notes={**_ROUNDING_NOTES, "sparse": "sparse gradients step the parameters as torch does: refused"},
    ),
    Entry(
        "Adafactor", gw.Adafactor, {"lr": 0.01},
        frozenset({"strided", "foreach", "bfloat16", "float16", "compile", "maximize", "param_groups"}),
        torch_twin=torch.optim.Adafactor,
        invalid=_LR_INVALID + _BOOL_INVALID
        + [("beta2_decay", 0.8), ("beta2_decay", 0.5), ("d", 0.5), ("weight_decay", -1.0), ("eps", (-1e-30, 1e-3)),
           ("eps", (None, -1.0)), ("beta1", 1.0), ("relative_step", "no")],
        notes={
            "complex": "torch's Adafactor refuses complex parameters (its error input is checked)",
            "differentiable": "torch's Adafactor has no differentiable path",
            "capturable": "torch's Adafactor has no capturable path",
        },
    ),
    Entry(
        "Muon", gw.Muon, {"lr": 0.02},
        frozenset({"strided", "bfloat16", "float16", "compile", "maximize", "param_groups"}),
        torch_twin=torch.optim.Muon, twin_params="matrices", vectors_apart=True, compile_tolerance=2**-7,
        invalid=_LR_INVALID + [("momentum", 1.0), ("weight_decay", -0.1), ("ns_steps", 0), ("eps", 0.0),
                               ("adjust_lr_fn", "arbitrary"), ("adamw_lr", -1.0), ("ns_coefficients", (1.0, 2.0)),
                               ("ns_dtype", torch.int32), ("adamw_betas", (0.9, 1.0))],
        skip_error_inputs={
            "only support 2D parameters": "gradwise's Muon orthogonalises a 3-D weight per matrix and a 4-D "
            "convolution weight flattened (documented extension of torch's 2-D Muon)",
        },
        notes={
            "complex": "torch's Muon refuses complex parameters (its error input is checked)",
            "foreach": "torch's Muon has no foreach/differentiable/capturable keywords",
        },
    ),
    Entry(
        "Shampoo", gw.Shampoo,
        {"lr": 0.01, "momentum": 0.5, "start_preconditioning_step": 1, "precondition_every": 2},
        frozenset({"strided", "bfloat16", "float16", "compile", "maximize", "param_groups"}),
        invalid=_LR_INVALID + [("momentum", 1.0), ("beta2", 0.0), ("eps", 0.0), ("block_size", 0),
                               ("graft", "adamw"), ("precondition_every", 0), ("start_preconditioning_step", 0),
                               ("eigh_dtype", torch.float16), ("momentum", -0.1)],
        notes={"complex": _PER_MATRIX_COMPLEX},
    ),
    Entry(
        "SOAP", gw.SOAP, {"lr": 0.01, "precondition_every": 2},
        frozenset({"strided", "bfloat16", "float16", "compile", "maximize", "param_groups"}),
        invalid=_LR_INVALID + _BETAS_INVALID + [("weight_decay", -1.0), ("precondition_every", 0),
                                                ("max_precond_dim", 0), ("shampoo_beta", 1.0), ("betas", (0.95, 1.5)),
                                                ("precondition_1d", 0)],
        notes={"complex": _PER_MATRIX_COMPLEX},
    ),
    Entry(
        "PSGDKron", gw.PSGDKron, {"lr": 0.01, "weight_decay": 0.01},
        frozenset({"strided", "bfloat16", "float16", "compile", "maximize", "param_groups"}),
        invalid=_LR_INVALID + _BOOL_INVALID
        + [("beta", 1.0), ("weight_decay", -1.0), ("precond_lr", 0.0), ("precond_update_prob", 0.0),
           ("precond_update_prob", 1.5), ("max_size_triangular", 0), ("min_ndim_triangular", 0),
           ("precond_init_scale", -1.0), ("lower_bound_beta", 1.0), ("dampening", -1e-9), ("power_iterations", -1),
           ("clip_update", "yes"), ("momentum_into_precond_update", 1), ("seed", -1), ("seed", 2**31)],
        notes={"complex": _PER_MATRIX_COMPLEX, "foreach": "per-tensor factors: one path"},
    ),
    Entry(
        "KFAC", gw.KFAC, {"lr": 0.05, "momentum": 0.5, "inverse_every": 1},
        frozenset({"strided", "param_groups"}),
        invalid=_LR_INVALID + [("damping", 0.0), ("momentum", 1.0), ("stat_decay", 1.0), ("inverse_every", 0),
                               ("stats_every", 0), ("stats_every", 2.5)],
        notes={
            "complex": "Kronecker factors of complex layers are not the view_as_real problem: refused",
            "bfloat16": "the damped inverses need float32 or float64 factors",
            "float16": "the damped inverses need float32 or float64 factors",
            "compile": "statistics come from module hooks: compile the model, not the step",
            "maximize": "the Fisher preconditioner assumes a loss being minimised",
        },
    ),
    Entry(
        "Sophia", gw.Sophia, {"lr": 0.01, "hessian_every": 2},
        frozenset({"complex", "strided", "bfloat16", "float16", "compile", "maximize", "param_groups"}),
        invalid=_LR_INVALID + _BOOL_INVALID + [("betas", (1.0, 0.99)), ("rho", 0.0), ("eps", 0.0),
                                               ("weight_decay", -1.0), ("hessian_every", 0), ("eps", -1.0)],
    ),
    Entry(
        "LBFGS", gw.LBFGS, {"lr": 0.5, "max_iter": 4},
        frozenset({"complex", "strided", "sparse"}),
        torch_twin=torch.optim.LBFGS,
        invalid=_LR_INVALID + [("max_iter", 0), ("history_size", 0), ("tolerance_change", -1.0),
                               ("line_search_fn", "armijo")],
        notes={
            "param_groups": _SINGLE_GROUP + " (as torch's LBFGS)",
            "bfloat16": _FLAT_NOTE, "float16": _FLAT_NOTE, "compile": _NOT_COMPILED,
            "maximize": "torch's LBFGS has no maximize",
        },
    ),
    Entry(
        "Newton", gw.Newton, {},
        frozenset({"strided"}),
        invalid=_LR_INVALID + [("damping", -1.0), ("line_search", "yes")],
        notes={"param_groups": _SINGLE_GROUP, "bfloat16": _FLAT_NOTE, "float16": _FLAT_NOTE, "complex": _WIRTINGER,
               "compile": _NOT_COMPILED, "maximize": "Newton's step goes to a stationary point either way"},
    ),
    Entry(
        "NewtonCG", gw.NewtonCG, {"cg_max_iter": 10},
        frozenset({"strided"}),
        invalid=_LR_INVALID + [("damping", 0.0), ("damping_increase", 1.0), ("damping_decrease", 1.0),
                               ("cg_max_iter", 0), ("cg_tol", 1.5), ("line_search", "yes")],
        notes={"param_groups": _SINGLE_GROUP, "bfloat16": _FLAT_NOTE, "float16": _FLAT_NOTE,
               "complex": _WIRTINGER, "compile": _NOT_COMPILED, "maximize": "minimises its closure's loss"},
    ),
    Entry(
        "SQN", gw.SQN, {"lr": 0.1, "update_every": 2},
        frozenset({"strided", "sparse"}),
        invalid=_LR_INVALID + [("history_size", 0), ("update_every", 0)],
        notes={"param_groups": _SINGLE_GROUP, "bfloat16": _FLAT_NOTE, "float16": _FLAT_NOTE,
               "complex": _WIRTINGER, "compile": _NOT_COMPILED, "maximize": "minimises its loss"},
    ),
    Entry(
        "SVRG", gw.SVRG, {"lr": 0.1},
        frozenset({"complex", "strided", "param_groups"}),
        invalid=_LR_INVALID,
        notes={"compile": _NOT_COMPILED, "bfloat16": "variance reduction cancels gradient differences "
               "that bf16/fp16 rounding swamps", "float16": "see bfloat16", "maximize": "minimises its loss"},
    ),
    Entry(
        "SAGA", gw.SAGA, {"lr": 0.1, "num_slots": 4},
        frozenset({"complex", "strided", "param_groups"}),
        invalid=_LR_INVALID + [("num_slots", 0)],
        notes={"compile": _NOT_COMPILED, "bfloat16": "variance reduction cancels gradient differences "
               "that bf16/fp16 rounding swamps", "float16": "see bfloat16", "maximize": "minimises its loss"},
    ),
    # Schedule-free: no torch twin; the `schedulefree` package is the reference (tests/test_schedule_free.py).
    Entry(
        "ScheduleFreeAdamW", gw.ScheduleFreeAdamW, {"lr": 0.05, "weight_decay": 0.01, "warmup_steps": 2},
        _SCHEDULE_FREE,
        invalid=_LR_INVALID + _BETAS_INVALID + _BOOL_INVALID + _SCHEDULE_FREE_INVALID
        + [("betas", (0.0, 0.999)), ("weight_decay", -1.0)],
        paths=({}, {"foreach": False}),
        converge_lr=0.05,
        notes=_SCHEDULE_FREE_NOTES,
    ),
    Entry(
        "ScheduleFreeSGD", gw.ScheduleFreeSGD, {"lr": 0.1, "weight_decay": 0.01, "warmup_steps": 2},
        _SCHEDULE_FREE,
        invalid=_LR_INVALID + _BOOL_INVALID + _SCHEDULE_FREE_INVALID
        + [("momentum", 0.0), ("momentum", 1.0), ("weight_decay", -1.0)],
        paths=({}, {"foreach": False}),
        converge_lr=0.5,  # 0.1: 3e-3 from the minimiser after 2000 cosine steps
        notes=_SCHEDULE_FREE_NOTES,
    ),
]

BY_NAME = {entry.name: entry for entry in ENTRIES}


def exported_optimizers() -> dict[str, type]:
    """Every class in ``gradwise.optim.__all__`` that is an optimizer (the base class aside)."""
    exported = {name: getattr(gw, name) for name in gw.__all__}
    return {
        name: value for name, value in exported.items()
        if isinstance(value, type) and issubclass(value, torch.optim.Optimizer) and value is not gw.GradwiseOptimizer
    }


def entries_with(*supports: str) -> list[Entry]:
    return [entry for entry in ENTRIES if set(supports) <= entry.supports]


def entries_without(support: str) -> list[Entry]:
    return [entry for entry in ENTRIES if support not in entry.supports]


def twins() -> list[Entry]:
    return [entry for entry in ENTRIES if entry.torch_twin is not None]
