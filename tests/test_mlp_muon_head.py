"""The mlp's model names its classifier head (issue 14), so Muon's param groups train the head with
AdamW and only the hidden matrices with Muon, as Muon's recipe says; slices of the stack name a
head only when they hold it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradwise.optim import muon_param_groups
from gradwise.problems.mlp import MLP, relu_mlp
from gradwise.problems.workloads import make_workload
from gradwise.train import build_optimizer


def ids(params) -> set[int]:
    return {id(p) for p in params}


def grouping(groups: list[dict]) -> dict[str, set[int]]:
    """The parameters of the Muon group, the decayed AdamW group and the undecayed AdamW group."""
    found = {"muon": set(), "adamw": set(), "undecayed": set()}
    for group in groups:
        kind = "muon" if group["use_muon"] else "undecayed" if group.get("weight_decay") == 0.0 else "adamw"
        found[kind] |= ids(group["params"])
    return found


def test_the_mlp_workload_sends_its_head_to_adamw_and_its_hidden_matrices_to_muon():
    model = make_workload("mlp", 32).model  # Linear, ReLU, Linear, ReLU, Linear (the head)
    assert isinstance(model, MLP) and model.get_output_embeddings() is model[4]
    groups = grouping(muon_param_groups(model, weight_decay=0.1))
    assert groups == {"muon": ids([model[0].weight, model[2].weight]), "adamw": ids([model[4].weight]),
                      "undecayed": ids([model[0].bias, model[2].bias, model[4].bias])}


def test_gradwise_train_builds_muon_for_the_mlp_with_the_head_in_adamw():
    model = make_workload("mlp", 32, depth=3).model
    optimizer = build_optimizer("muon", model, lr=0.02, weight_decay=0.1)
    groups = grouping(optimizer.param_groups)
    assert groups["muon"] == ids([model[0].weight, model[2].weight, model[4].weight])
    assert groups["adamw"] == ids([model[6].weight])
    # and it steps: the head takes AdamW's first step, decoupled decay then lr g / (|g| + eps)
    head_before = model[6].weight.detach().clone()
    inputs, labels = torch.randn(16, 8), torch.randint(0, 4, (16,))
    nn.functional.cross_entropy(model(inputs), labels).backward()
    optimizer.step()
    group = next(g for g in optimizer.param_groups if any(p is model[6].weight for p in g["params"]))
    grad, lr, eps = model[6].weight.grad, group["lr"], group["adamw_eps"]
    expected = head_before * (1 - lr * group["weight_decay"]) - lr * grad / (grad.abs() + eps)
    assert group["weight_decay"] == 0.1
    torch.testing.assert_close(model[6].weight.detach(), expected, rtol=1e-5, atol=1e-7)


def test_the_state_dict_keys_are_those_of_the_plain_stack():
    """Checkpoints of mlp runs written before the model named its head still load."""
    model = relu_mlp(8, 16, 2, 4)
    plain = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    assert list(model.state_dict()) == list(plain.state_dict())
    model.load_state_dict(plain.state_dict())
    x = torch.randn(3, 8)
    assert torch.equal(model(x), plain(x))


@pytest.mark.parametrize("cut", [1, 2, 3, 4])
def test_split_learning_slices_name_a_head_only_when_they_hold_it(cut):
    model = relu_mlp(8, 16, 2, 4)
    bottom, top = model[:cut], model[cut:]
    assert not isinstance(bottom, MLP) and not hasattr(bottom, "get_output_embeddings")
    assert isinstance(top, MLP) and top.get_output_embeddings() is model[4]
    assert [name for name, _ in bottom.named_children()] == [str(i) for i in range(cut)]
    bottom_groups = grouping(muon_param_groups(bottom))
    assert bottom_groups["adamw"] == set()  # a hidden matrix at the cut stays with Muon
    assert bottom_groups["muon"] == ids(m.weight for m in bottom if isinstance(m, nn.Linear))
    assert grouping(muon_param_groups(top))["adamw"] == ids([model[4].weight])
    assert model[4:4].__class__ is nn.Sequential and len(model[4:4]) == 0
    assert model[-1] is model[4]


def test_a_named_head_replaces_the_declared_one():
    model = relu_mlp(8, 16, 2, 4)
    groups = grouping(muon_param_groups(model, head="2"))
    assert groups["adamw"] == ids([model[2].weight])
    assert groups["muon"] == ids([model[0].weight, model[4].weight])


class DeclaresNoHead(nn.Sequential):
    def get_output_embeddings(self):
        return None


class DeclaresJunk(nn.Sequential):
    def get_output_embeddings(self):
        return 42


def test_a_model_that_declares_no_head_keeps_every_matrix_with_muon_and_junk_is_refused():
    model = DeclaresNoHead(nn.Linear(4, 4), nn.Linear(4, 2))
    assert grouping(muon_param_groups(model))["muon"] == ids([model[0].weight, model[1].weight])
    with pytest.raises(TypeError, match="head must be an nn.Module, its name or None, got a int"):
        muon_param_groups(DeclaresJunk(nn.Linear(4, 4)))


def test_the_npy_workload_builds_the_same_model(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.standard_normal((64, 5)).astype(np.float32))
    np.save(tmp_path / "y.npy", rng.integers(0, 3, 64))
    model = make_workload("npy", 8, data=[str(tmp_path / "x.npy"), str(tmp_path / "y.npy")]).model
    assert isinstance(model, MLP) and model.get_output_embeddings() is model[-1]
    assert grouping(muon_param_groups(model))["adamw"] == ids([model[-1].weight])
