"""Every optimizer in ``gradwise train`` (issue 14): Muon with its groups built from the model,
K-FAC bound to the run's model (fp32 statistics under bf16, decoupled weight decay), Sophia
with the loop's Hessian refresh; each trains the mlp and tiny-gpt from the command line."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from gradwise.cli import main
from gradwise.optim import KFAC, Muon, Sophia, muon_param_groups, weight_decay_groups
from gradwise.optim.kfac import input_output_factors
from gradwise.problems.tiny_gpt import TinyGPT
from gradwise.train.optimizers import OPTIMIZERS, build_optimizer, check_optimizer_options

SMALL_GPT = ["--workload", "tiny-gpt", "--workload-options",
             "n_layer=2,d_model=32,n_head=2,seq_len=32,eval_windows=4,final_eval_windows=8", "--batch-size", "4"]
MLP = ["--workload", "mlp", "--batch-size", "32"]
QUICK = ["--steps", "4", "--eval-every", "2", "--checkpoint-every", "2", "--threads", "1", "--no-progress"]


def group_of(groups: list[dict], param: torch.Tensor) -> dict:
    [group] = [g for g in groups if any(p is param for p in g["params"])]
    return group


# --- Muon's groups -----------------------------------------------------------------------


def test_muon_groups_of_tiny_gpt_keep_the_last_hidden_matrix_and_send_the_tied_embedding_to_adamw():
    model = TinyGPT(seq_len=16, d_model=32, n_layer=2, n_head=2)
    groups = muon_param_groups(model, weight_decay=0.1)
    last_hidden = model.blocks[-1].mlp[2].weight  # the "last nn.Linear" the old guess sent to AdamW
    assert group_of(groups, last_hidden)["use_muon"] is True
    embedding = group_of(groups, model.token_embedding.weight)  # also the tied output layer
    assert embedding["use_muon"] is False and embedding["weight_decay"] == 0.1
    for name, param in model.named_parameters():
        group = group_of(groups, param)
        if param.ndim < 2:  # biases and LayerNorm gains
            assert (group["use_muon"], group["weight_decay"]) == (False, 0.0), name
        elif "embedding" not in name:
            assert (group["use_muon"], group["weight_decay"]) == (True, 0.1), name
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


class UntiedModel(nn.Module):
    def __init__(self, tie: bool = False) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 8)
        self.hidden = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 10, bias=False)
        if tie:
            self.head.weight = self.embedding.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(torch.relu(self.hidden(self.embedding(tokens)))))


def test_muon_groups_take_a_named_head_and_find_a_tied_one_without_guessing():
    model = UntiedModel()
    named = muon_param_groups(model, head="head")
    assert group_of(named, model.head.weight)["use_muon"] is False
    assert group_of(named, model.hidden.weight)["use_muon"] is True
    assert "weight_decay" not in group_of(named, model.hidden.weight)  # the optimizer's own default
    assert group_of(named, model.norm.weight)["weight_decay"] == 0.0
    by_module = muon_param_groups(model, head=model.head)
    assert [[id(p) for p in g["params"]] for g in by_module] == [[id(p) for p in g["params"]] for g in named]
    # an untied head not named is a hidden matrix: no layer is taken for the head by its position
    assert group_of(muon_param_groups(model), model.head.weight)["use_muon"] is True
    tied = UntiedModel(tie=True)
    assert group_of(muon_param_groups(tied), tied.head.weight)["use_muon"] is False  # shared with the embedding
    with pytest.raises(ValueError, match="head: model has no module named 'lm_head'"):
        muon_param_groups(model, head="lm_head")


def test_muon_groups_step_the_no_decay_group_without_decay():
    model = UntiedModel()
    opt = Muon(muon_param_groups(model, head="head", weight_decay=0.5, adamw_lr=0.1), lr=0.02)
    gain_before = model.norm.weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    # zero gradient: Adam moves nothing, so only decay could change a parameter
    assert torch.equal(model.norm.weight, gain_before)
    assert group_of(opt.param_groups, model.head.weight)["lr"] == 0.1


def test_a_trained_muons_adamw_groups_step_at_the_runs_lr_over_its_lr_scale():
    model = TinyGPT(seq_len=16, d_model=32, n_layer=2, n_head=2)
    opt = build_optimizer("muon", model, lr=0.03, weight_decay=0.1)  # Muon's lr_scale is 15
    assert group_of(opt.param_groups, model.token_embedding.weight)["lr"] == pytest.approx(0.002)
    assert group_of(opt.param_groups, model.blocks[0].mlp[0].weight)["lr"] == 0.03
    opt = build_optimizer("muon", model, lr=0.03, weight_decay=0.1, options={"adamw_lr": 1e-3})
    assert group_of(opt.param_groups, model.token_embedding.weight)["lr"] == 1e-3


# --- K-FAC ---------------------------------------------------------------------------------


def test_kfac_factors_are_float32_under_a_bf16_forward():
    layer = nn.Linear(4, 3)
    inputs = torch.randn(5, 4, dtype=torch.bfloat16)
    grads = torch.randn(5, 3, dtype=torch.bfloat16)
    A, G = input_output_factors(layer, inputs, grads)
    assert A.dtype == G.dtype == torch.float32
    a = torch.cat([inputs.float(), torch.ones(5, 1)], dim=1)
    torch.testing.assert_close(A, a.T @ a / 5)
    torch.testing.assert_close(G, grads.float().T @ grads.float() * 5)


def test_kfac_weight_decay_is_decoupled():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = KFAC(model, lr=0.1, weight_decay=0.5)
    before = [p.detach().clone() for p in model.parameters()]
    (model(torch.randn(8, 4)).sum() * 0).backward()  # statistics recorded, gradient zero
    opt.step()
    # coupled L2 would move theta by lr * precond(wd * theta); decoupled scales it by 1 - lr * wd
    for param, old in zip(model.parameters(), before):
        torch.testing.assert_close(param.detach(), old * (1 - 0.1 * 0.5), rtol=0, atol=1e-7)


def test_train_builds_kfac_bound_to_the_model_with_stats_every():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    opt = build_optimizer("kfac", model, 0.01, 0.1, {"stats_every": 3})
    assert isinstance(opt, KFAC) and opt.model is model and opt.stats_every == 3
    assert group_of(opt.param_groups, model[1].weight)["weight_decay"] == 0.0
    assert group_of(opt.param_groups, model[0].weight)["weight_decay"] == 0.1
    with pytest.raises(ValueError, match="stats_every"):
        check_optimizer_options("kfac", {"stats_every": 0})
    # the model is the builder's to pass, never an option a user names
    with pytest.raises(ValueError, match="kfac option must be one of .*got 'model'"):
        check_optimizer_options("kfac", {"model": 1})


# --- Sophia --------------------------------------------------------------------------------


def test_sophia_pairs_estimates_with_parameters_by_identity_under_two_groups():
    model = UntiedModel()
    opt = Sophia(weight_decay_groups(model, 0.1), betas=(0.9, 0.5))
    params = list(model.parameters())  # model order, not the groups' order
    assert [id(p) for g in opt.param_groups for p in g["params"]] != [id(p) for p in params]
    estimates = [torch.full_like(p, float(i + 1)) for i, p in enumerate(params)]
    opt.update_hessian(dict(zip(params, estimates)))  # a mapping: no params to pass
    for param, estimate in zip(params, estimates):
        torch.testing.assert_close(opt.state[param]["hessian"], 0.5 * estimate)
    opt.update_hessian(estimates, params)
    for param, estimate in zip(params, estimates):
        torch.testing.assert_close(opt.state[param]["hessian"], 0.75 * estimate)
    with pytest.raises(ValueError, match="not a parameter of this optimizer"):
        opt.update_hessian({torch.zeros(2): torch.zeros(2)})


# --- from the command line -----------------------------------------------------------------


def trained(out) -> dict:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("optimizer, options", [
    ("muon", ["--lr", "0.02"]),
    ("kfac", ["--optimizer-options", "stats_every=2,momentum=0.9"]),
    ("sophia", ["--lr", "1e-3", "--optimizer-options", "hessian_every=2"]),
])
@pytest.mark.parametrize("workload", ["mlp", "tiny-gpt"])
def test_every_optimizer_trains_from_the_command_line(tmp_path, optimizer, options, workload):
    argv = MLP if workload == "mlp" else [*SMALL_GPT, "--precision", "bf16"]
    out = tmp_path / "run"
    assert main(["train", *argv, *QUICK, "--optimizer", optimizer, *options, "--out", str(out)]) == 0
    summary = trained(out)
    assert summary["steps"] == 4
    metric = "val_loss"
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert summary["final_metrics"][metric] < first["loss"] + 0.5  # trained, not diverged


def test_the_loop_refreshes_sophias_hessian_and_resumes_exactly(tmp_path):
    argv = ["train", *MLP, *QUICK, "--optimizer", "sophia", "--optimizer-options", "hessian_every=3"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main([*argv, "--out", str(full)]) == 0
    assert main([*argv, "--out", str(cut)]) == 0
    (cut / "checkpoints" / "step-00000004.ckpt").unlink()  # as if killed after the checkpoint of step 2
    for name in ("summary.json", "model.pt"):
        (cut / name).unlink()
    assert main([*argv, "--out", str(cut), "--resume"]) == 0
    resumed = json.loads((cut / "summary.json").read_text())
    assert resumed["resumed_from_step"] == 2
    assert resumed["final_metrics"] == json.loads((full / "summary.json").read_text())["final_metrics"]
    full_model = torch.load(full / "model.pt", weights_only=True)
    cut_model = torch.load(cut / "model.pt", weights_only=True)
    assert all(torch.equal(full_model[k], cut_model[k]) for k in full_model)


def test_sophias_estimate_comes_from_the_loop(tmp_path):
    from gradwise.train.config import TrainConfig
    from gradwise.train.loop import Trainer

    trainer = Trainer(TrainConfig(workload="mlp", optimizer="sophia", steps=1, batch_size=16, threads=1))
    trainer.run()
    for param in trainer.model.parameters():
        hessian = trainer.optimizer.state[param]["hessian"]
        assert hessian.abs().sum() > 0  # a Hutchinson estimate was folded in before the first step


def test_train_offers_every_stepped_and_model_bound_optimizer():
    assert {"muon", "kfac", "sophia", "shampoo", "soap"} <= set(OPTIMIZERS)


def test_train_builds_shampoo_as_its_docstring_example_and_soap_documents_its_default():
    import inspect

    from gradwise.optim import SOAP, Shampoo

    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    opt = build_optimizer("shampoo", model, 1e-3, 0.0)
    assert isinstance(opt, Shampoo)
    assert (opt.param_groups[0]["momentum"], opt.param_groups[0]["graft"]) == (0.9, "adam")
    assert 'momentum=0.9, graft="adam"' in Shampoo.__doc__
    default = inspect.signature(SOAP).parameters["precondition_1d"].default
    assert default is True and f"``precondition_1d={default}`` (this class's default)" in SOAP.__doc__


def test_a_hessian_refresh_under_a_sharded_strategy_is_refused_in_one_line(tmp_path) -> None:
    """Sophia's estimate covers the whole model: ZeRO would hand it to a rank's shard only."""
    import subprocess
    import sys

    out = tmp_path / "run"
    command = [sys.executable, "-m", "gradwise", "train", "--workload", "mlp", "--optimizer", "sophia", "--steps", "2",
               "--strategy", "zero1", "--nproc", "2", "--out", str(out), "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "strategy single or ddp" in done.stderr


def test_a_dtype_option_is_given_by_its_name_as_on_the_command_line():
    model = TinyGPT(seq_len=8, d_model=16, n_layer=1, n_head=2)
    optimizer = build_optimizer("muon", model, 0.02, 0.0, {"ns_dtype": "float32"})
    assert {group["ns_dtype"] for group in optimizer.param_groups if group["use_muon"] is not False} == {torch.float32}
    for bad in ("int8", "float33"):  # a dtype Muon does not offer; no dtype at all
        with pytest.raises(ValueError, match="ns_dtype must be one of torch.bfloat16, torch.float16"):
            check_optimizer_options("muon", {"ns_dtype": bad})
