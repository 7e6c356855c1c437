"""One description per optimizer class, read by every registry: training, the race, the memory
planner and ZeRO derive their tables from it, so a class with a description but no rule, or a
name claimed twice, fails here rather than silently elsewhere."""

from __future__ import annotations

import pytest
import torch

import gradwise.optim
from gradwise.bench import optimizers as race_registry
from gradwise.distributed.strategies.zero_optimizer import ZeroOptimizer, sharding_of
from gradwise.optim.description import (
    Description,
    Preset,
    StateSize,
    described_optimizers,
    description_of,
    moments,
    presets,
)
from gradwise.plan import memory
from gradwise.train import optimizers as train_registry

CLASSES = list(described_optimizers())


def test_every_exported_optimizer_class_is_walked():
    exported = {getattr(gradwise.optim, name) for name in gradwise.optim.__all__}
    optimizers = {obj for obj in exported if isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer)}
    assert set(CLASSES) == optimizers - {gradwise.optim.GradwiseOptimizer}
    assert len(CLASSES) == 23


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_every_optimizer_describes_itself(cls):
    description = cls.__dict__.get("description")  # its own, not inherited (AdamW is not Adam)
    assert isinstance(description, Description)
    size = description.state_of([((4, 3), 2), ((5,), 1)], {})
    assert isinstance(size, StateSize) and size.values >= 0 and size.scalars >= 0


def test_the_registries_are_derived_from_the_descriptions():
    table = presets()
    assert set(memory.OPTIMIZERS) == set(table)
    assert set(train_registry.OPTIMIZERS) == {name for name, (_, p) in table.items() if p.train is not None}
    assert set(race_registry.OPTIMIZERS) == {name for name, (_, p) in table.items() if p.race is not None}
    for name, (cls, preset) in table.items():
        assert memory.OPTIMIZERS[name].optimizer is cls
        assert memory.OPTIMIZERS[name].options == dict(preset.options)
        if preset.train is not None:
            assert train_registry.OPTIMIZERS[name] == (cls, {**preset.options, **preset.train})
            assert cls.description.drive in train_registry.TRAINED_DRIVES, f"{name}: training cannot drive it"
        if preset.race is not None:
            spec = race_registry.OPTIMIZERS[name]
            assert (spec.optimizer, spec.lr_range, spec.description) == (cls, cls.description.lr_range, preset.summary)
            assert (spec.before_backward is not None) == (cls.description.drive == "hessian_refresh")


def test_names_of_today_keep_their_behaviour():
    assert set(train_registry.OPTIMIZERS) == {"sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw",
                                              "nadam", "lion", "adafactor", "shampoo", "soap", "muon", "kfac",
                                              "sophia", "lbfgs", "newton-cg", "sqn", "svrg", "saga",
                                              "schedule-free-adamw", "schedule-free-sgd",
                                              "ademamix", "ademamix-cautious", "adamw-cautious", "mars-adamw",
                                              "lion-cautious", "mars-lion", "momentum-cautious",
                                              "psgd-kron", "normuon", "adamw-8bit", "adamw-bf16-sr", "adamw-4bit",
                                              "lion-8bit", "muon-8bit"}
    closure_methods = {"lbfgs", "newton-cg", "sqn", "svrg", "saga"}  # the race evaluates each loss once a step
    averaged = {"schedule-free-adamw", "schedule-free-sgd"}  # the test-function race records the loss at y, not x
    # training presets only: state formats and NorMuon's row statistics mean nothing on the race's 2-D points
    training_only = {"normuon", "adamw-8bit", "adamw-bf16-sr", "adamw-4bit", "lion-8bit", "muon-8bit"}
    assert set(race_registry.OPTIMIZERS) == (set(train_registry.OPTIMIZERS) - {"kfac"} - closure_methods - averaged
                                             - training_only)
    # training follows GPT-style betas; the race keeps the papers' defaults and no weight decay
    assert train_registry.OPTIMIZERS["adamw"] == (gradwise.optim.AdamW, {"betas": (0.9, 0.95)})
    assert race_registry.OPTIMIZERS["adamw"].options == {}
    assert train_registry.OPTIMIZERS["nesterov"] == (gradwise.optim.SGD, {"momentum": 0.9, "nesterov": True})
    assert race_registry.OPTIMIZERS["soap"].options == {"weight_decay": 0.0}
    assert memory.OPTIMIZERS["lbfgs"].options == {"history_size": 10}


def test_a_new_optimizer_reaches_every_registry_from_its_description(monkeypatch):
    class Mine(gradwise.optim.SGD):
        description = Description(drive="step", sharding="element", state=moments(1), lr_range=(1e-3, 1.0),
                                  presets={"mine": Preset("mine", train={}, race={})})

    monkeypatch.setattr(gradwise.optim, "Mine", Mine, raising=False)
    monkeypatch.setattr(gradwise.optim, "__all__", [*gradwise.optim.__all__, "Mine"])
    assert presets()["mine"][0] is Mine
    assert description_of(Mine).state((3, 2), {}) == StateSize(6)


def test_two_classes_claiming_one_name_or_a_class_without_description_are_refused(monkeypatch):
    class Twin(gradwise.optim.SGD):
        description = Description(drive="step", sharding="element", state=moments(1),
                                  presets={"sgd": Preset("another sgd")})

    monkeypatch.setattr(gradwise.optim, "Twin", Twin, raising=False)
    monkeypatch.setattr(gradwise.optim, "__all__", [*gradwise.optim.__all__, "Twin"])
    with pytest.raises(ValueError, match="preset 'sgd' is claimed by"):
        presets()

    class Bare(gradwise.optim.SGD):
        pass

    monkeypatch.setattr(gradwise.optim, "Twin", Bare)
    with pytest.raises(ValueError, match="Bare has no description"):
        presets()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"drive": "backward"}, "drive must be one of"),
        ({"sharding": "row"}, "sharding must be one of"),
        ({"lr_range": (1.0, 0.1)}, "lr_range must be"),
        ({"lr_range": None, "presets": {"x": Preset("x", race={})}}, "needs the class's lr_range"),
    ],
)
def test_a_malformed_description_is_refused(kwargs, message):
    arguments = {"drive": "step", "sharding": "element", "state": moments(1), "lr_range": (1e-3, 1.0), **kwargs}
    with pytest.raises(ValueError, match=message):
        Description(**arguments)


def test_a_preset_outside_a_registry_says_so():
    preset = Preset("only planned", {"momentum": 0.9})
    with pytest.raises(ValueError, match="not offered by gradwise train"):
        preset.train_options()
    with pytest.raises(ValueError, match="not offered by the race"):
        preset.race_options()


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_zero_reads_the_sharding_from_the_description(cls):
    model = torch.nn.Linear(3, 2)
    optimizer = cls(model) if cls.description.drive == "model" else cls([model.weight])
    assert sharding_of(optimizer) == cls.description.sharding
    if cls.description.sharding is None:  # refused before any process group is needed
        with pytest.raises(ValueError, match=f"sharding .*got {cls.__name__}"):
            ZeroOptimizer(optimizer)


def test_kfac_restricted_to_a_layer_takes_over_the_hooks():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    full = gradwise.optim.KFAC(model, lr=0.1, stats_every=2)
    part = full.restricted_to([{"params": list(model[1].parameters()), "lr": 0.1}])
    assert [p for g in part.param_groups for p in g["params"]] == list(model[1].parameters())
    assert part.stats_every == 2 and part.model is model
    model(torch.randn(5, 3)).sum().backward()
    assert set(part.pending_factors()) == {model[0], model[1]} and not full.pending_factors()
