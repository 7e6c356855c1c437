"""The memory model: the ZeRO paper's figures, the 7B AdamW example, activations, and the
check that predicted bytes equal the real tensors' bytes for every gradwise optimizer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradwise.optim
from gradwise.optim.description import SCALAR_STATE_BYTES, Description
from gradwise.optim.driving import drive_step
from gradwise.plan import memory

GB = 1e9


def exported_optimizers() -> list[type]:
    """Every optimizer class that ``gradwise.optim`` exports (the base class excluded)."""
    classes = []
    for name in gradwise.optim.__all__:
        obj = getattr(gradwise.optim, name)
        is_optimizer = isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer)
        if is_optimizer and obj is not gradwise.optim.GradwiseOptimizer:
            classes.append(obj)
    return classes


def configurations(cls: type) -> list[dict]:
    """The class's defaults and every planner preset built on it."""
    presets = [dict(preset.options) for preset in cls.description.presets.values()]
    extra = {gradwise.optim.LBFGS: [{"history_size": 3}], gradwise.optim.SQN: [{"history_size": 2, "update_every": 2}],
             gradwise.optim.SAGA: [{"num_slots": 3}], gradwise.optim.KFAC: [{"momentum": 0.9}]}.get(cls, [])
    configs = [options for options in presets + extra if options]
    # history-based methods are checked at small histories, which they fill in a few steps
    return configs if hasattr(cls, "history_full") else [{}] + configs


class SmallNet(nn.Module):
    """Vectors, matrices and a 4-D convolution kernel: every shape rule gets exercised."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, kernel_size=3)
        self.norm = nn.LayerNorm(12)
        self.hidden = nn.Linear(12, 20)
        self.out = nn.Linear(20, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.conv(x).flatten(1)  # 3 channels x 2 x 2 = 12
        return self.out(torch.tanh(self.hidden(self.norm(features))))


class FlatLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(32 * 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weights.view(32, 5)


def squared_gradients(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """A Hessian-diagonal estimate (Gauss-Newton-like, deterministic) for a Hessian-refreshed optimizer."""
    return [g * g for g in torch.autograd.grad(loss, params, retain_graph=True, materialize_grads=True)]


def trained_optimizer(cls: type, options: dict, dtype: torch.dtype = torch.float32, steps: int = 2):
    """``cls`` built on a small model and stepped by its description's drive (the shared driver);
    an optimizer with a curvature history (``history_full``) is stepped until the history is full
    (the state the rule counts)."""
    torch.manual_seed(0)
    description = cls.description
    # a flat-state method (quasi-Newton, Newton) sees the group as one vector: a linear classifier
    # on one flat parameter keeps Newton's dense Hessian small
    model = FlatLinear().to(dtype) if description.flat_state else SmallNet().to(dtype)
    x = torch.randn(8, 2, 4, 4, dtype=dtype)
    y = torch.randint(5, (8,))
    params = model.parameters() if description.groups is None else description.groups(model, 0.0)
    optimizer = cls(model, **options) if description.drive == "model" else cls(params, **options)

    def loss():
        return nn.functional.cross_entropy(model(x), y)

    def step(index: int) -> None:
        slots = optimizer.param_groups[0].get("num_slots", 1)
        drive_step(optimizer, loss, full_loss=loss if index == 0 else None, slot=index % slots,
                   hessian_estimate=squared_gradients)

    if hasattr(optimizer, "history_full"):
        for index in range(50):
            step(index)
            if optimizer.history_full:
                return optimizer
        raise AssertionError(f"{cls.__name__}'s history did not fill in 50 steps")
    for index in range(steps):
        step(index)
    return optimizer


EXPORTED = exported_optimizers()


def test_gradwise_exports_optimizers_to_check():
    assert {"SGD", "Adam", "AdamW", "Lion"} <= {cls.__name__ for cls in EXPORTED}


@pytest.mark.parametrize("cls", EXPORTED, ids=lambda cls: cls.__name__)
def test_every_exported_optimizer_has_a_state_rule(cls):
    assert isinstance(cls.__dict__.get("description"), Description), f"{cls.__name__} has no description"
    assert memory.group_state_size(cls, [((3, 4), 1)], {}).values >= 0


@pytest.mark.parametrize(
    ("cls", "options"),
    [(cls, options) for cls in EXPORTED for options in configurations(cls)],
    ids=lambda value: value.__name__ if isinstance(value, type) else ",".join(f"{k}={v}" for k, v in value.items()),
)
def test_predicted_bytes_equal_the_real_tensors_after_a_step(cls, options):
    optimizer = trained_optimizer(cls, options)
    measured = memory.measured_bytes(optimizer)
    assert measured["optimizer_state"] > 0 or memory.predicted_bytes(optimizer)["optimizer_state"] == 0
    assert memory.predicted_bytes(optimizer) == measured


@pytest.mark.parametrize("cls_name", ["Adam", "RMSprop", "SGD"])
def test_state_values_take_the_parameters_format(cls_name):
    cls = getattr(gradwise.optim, cls_name)
    options = {"momentum": 0.9} if cls_name == "SGD" else {}
    optimizer = trained_optimizer(cls, options, dtype=torch.float64)
    assert memory.predicted_bytes(optimizer) == memory.measured_bytes(optimizer)


def test_adam_state_bytes_by_hand():
    optimizer = trained_optimizer(gradwise.optim.Adam, {})
    params = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    tensors = sum(len(group["params"]) for group in optimizer.param_groups)
    # two fp32 moments per value and one float32 step counter per tensor
    assert memory.measured_bytes(optimizer)["optimizer_state"] == 8 * params + 4 * tensors


def test_an_optimizer_without_a_rule_fails_loudly():
    class Mystery(gradwise.optim.Adam):  # inherits Adam's description, but not its state rule
        pass

    with pytest.raises(KeyError, match="no memory rule for optimizer class 'Mystery'"):
        memory.state_size(Mystery, (3, 4), {})
    with pytest.raises(KeyError, match="Mystery"):
        memory.predicted_bytes(Mystery([torch.zeros(2, requires_grad=True)]))


@pytest.mark.parametrize(
    ("stage", "gigabytes"), [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)]
)
def test_zero_paper_figures_for_7_5b_parameters_on_64_devices(stage, gigabytes):
    shapes = memory.square_matrix_shapes(7.5e9, 4096)
    estimate = memory.estimate_memory(shapes, "adam", "mixed", zero_stage=stage, devices=64)
    assert round(estimate.total / GB, 1) == gigabytes


def test_mixed_precision_adam_keeps_16_bytes_per_parameter_and_stage_3_divides_it():
    shapes = [((1000, 1000), 10)]
    full = memory.estimate_memory(shapes, "adam", "mixed")
    sharded = memory.estimate_memory(shapes, "adam", "mixed", zero_stage=3, devices=8)
    scalars = 10 * SCALAR_STATE_BYTES
    assert full.total == 16 * 10**7 + scalars
    assert (full.parameters, full.gradients, full.master_weights) == (2e7, 2e7, 4e7)
    assert sharded.total == pytest.approx((2 + 2 + 12) * 10**7 / 8 + scalars / 8)


def test_7b_adamw_in_bf16_with_fp32_states_is_84_gb_before_activations():
    estimate = memory.estimate_memory(memory.square_matrix_shapes(7e9, 4096), "adamw", "bf16")
    # 7e9 x (2 bf16 weights + 2 bf16 gradients + 4 + 4 fp32 moments), no master copy
    assert estimate.total / GB == pytest.approx(84.0, abs=1e-5)
    assert (estimate.parameters, estimate.gradients, estimate.master_weights) == (14e9, 14e9, 0)
    with_master = memory.estimate_memory(memory.square_matrix_shapes(7e9, 4096), "adamw", "mixed")
    assert with_master.total / GB == pytest.approx(112.0, abs=1e-5)
    # pure bf16 with Kahan compensation (param_rounding='kahan'): 2 bytes per parameter more, state that ZeRO-1 shards
    kahan = memory.estimate_memory(memory.square_matrix_shapes(7e9, 4096), "adamw", "bf16-kahan")
    assert kahan.total / GB == pytest.approx(98.0, abs=1e-5) and kahan.master_weights == 14e9
    sharded = memory.estimate_memory(memory.square_matrix_shapes(7e9, 4096), "adamw", "bf16-kahan", 1, devices=7)
    assert sharded.master_weights == 2e9


def test_optimizer_state_per_parameter_by_optimizer():
    shapes = [((1024, 1024), 4)]
    params = 4 * 1024 * 1024

    def per_param(name):
        return (memory.optimizer_state_bytes(shapes, name, 4) - 4 * 4 * memory.state_size(
            memory.OPTIMIZERS[name].optimizer, (1024, 1024), memory.OPTIMIZERS[name].options).scalars) / params

    assert per_param("sgd") == 0
    assert per_param("momentum") == per_param("lion") == per_param("muon") == 4
    assert per_param("adamw") == per_param("nadam") == 8
    assert per_param("adam-amsgrad") == per_param("rmsprop-momentum") == 12
    assert per_param("adafactor") == pytest.approx(4 * 2048 / 1024**2)  # a row and a column
    # Shampoo: L, R and their inverse roots (4 x 1024^2 per matrix) and the Adagrad graft
    assert per_param("shampoo") == 4 * 5
    assert per_param("shampoo-momentum") == 4 * 6
    assert per_param("soap") == 4 * 6  # two moments; L, R and their eigenbases


def test_shampoo_blocks_large_dimensions():
    size = memory.state_size(gradwise.optim.Shampoo, (2048, 512), {"block_size": 1024})
    # two 1024 x 512 blocks: per block 1024^2 + 512^2 statistics, doubled for the inverse
    # roots, and the Adagrad graft
    assert size.values == 2 * 2 * (1024**2 + 512**2) + 2048 * 512
    # a vector is a 1 x n row: no left factor; 3000 -> 3 equal blocks of 1000
    vector = memory.state_size(gradwise.optim.Shampoo, (3000,), {"block_size": 1024, "graft": None})
    assert vector.values == 3 * 2 * 1000**2


def test_transformer_shapes_count_gpt2_small_without_position_embeddings():
    shapes = memory.transformer_shapes(layers=12, width=768, vocab=50257)
    assert memory.parameter_count(shapes) == 124_439_808 - 1024 * 768


def test_activation_bytes_follow_korthikanti_et_al():
    s, b, h, a = 2048, 1, 4096, 32
    per_layer = s * b * h * (34 + 5 * a * s / h)
    assert memory.transformer_activation_bytes(1, h, a, s, b, 2) == per_layer
    assert memory.transformer_activation_bytes(32, h, a, s, b, 2) == 32 * per_layer
    checkpointed = memory.transformer_activation_bytes(32, h, a, s, b, 2, checkpointing=True)
    assert checkpointed == 32 * 2 * s * b * h + per_layer
    # fp32 activations double the stored values but not the one-byte dropout masks
    fp32 = memory.transformer_activation_bytes(1, h, a, s, b, 4)
    assert fp32 == 2 * per_layer - (2 * s * b * h + a * s * s * b)


def test_activations_are_not_sharded_by_zero():
    shapes = [((100, 100), 1)]
    for stage in memory.ZERO_STAGES:
        assert memory.estimate_memory(shapes, "sgd", "fp32", stage, devices=4, activations=1000).activations == 1000


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"precision": "fp4"}, "precision must be one of"),
        ({"optimizer": "adamx"}, "optimizer must be one of"),
        ({"zero_stage": 4}, "zero_stage must be one of"),
        ({"devices": 0}, "devices must be an integer >= 1"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        memory.estimate_memory([((4, 4), 1)], **kwargs)
    with pytest.raises(ValueError, match="params must be > 0"):
        memory.square_matrix_shapes(-5, 64)
