"""Muon's refinements (issue 15, item 1): Polar Express orthogonalisation, NorMuon's row
normalisation, the AdamW-matching update scale, and QK-Clip (MuonClip).

References: the exact polar factor from torch.linalg.svd; pytorch_optimizer's NorMuon (the
reference implementation's norm-preserving scaling); the formulas of the papers pinned where
the packages differ (NorMuon's Algorithm 1 update RMS 0.2, Kimi K2's per-head clip)."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pytorch_optimizer.optimizer.muon.normuon import NorMuon

import gradwise.optim as gw
from gradwise.cli import main
from gradwise.optim.muon import (
    POLAR_EXPRESS_COEFFICIENTS,
    POLAR_EXPRESS_SAFETY,
    matrix_shape,
    newton_schulz,
    polar_express,
)
from gradwise.optim.qk_clip import QKClip
from gradwise.plan.memory import measured_bytes, predicted_bytes
from gradwise.problems.tiny_gpt import TinyGPT


def polar_factor(matrices: torch.Tensor) -> torch.Tensor:
    """U V^T of each matrix, from the SVD in float64."""
    u, _, vh = torch.linalg.svd(matrices.double(), full_matrices=False)
    return u @ vh


def relative_error(approximation: torch.Tensor, exact: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(approximation.double() - exact) / torch.linalg.vector_norm(exact))


# ---- Polar Express ---------------------------------------------------------------------------


def test_polar_express_table_is_the_papers_with_its_safety_factor() -> None:
    """Algorithm 1: every polynomial but the last is p(x / 1.01); the last fixes 1 (and is the
    Newton-Schulz quintic (15x - 10x^3 + 3x^5) / 8); the first grows small values ~8x."""
    assert POLAR_EXPRESS_SAFETY == 1.01
    a, b, c = POLAR_EXPRESS_COEFFICIENTS[0]
    assert (a, b, c) == pytest.approx((8.28721201814563 / 1.01, -23.595886519098837 / 1.01**3,
                                       17.300387312530933 / 1.01**5), rel=1e-15)
    assert POLAR_EXPRESS_COEFFICIENTS[-1] == (15 / 8, -10 / 8, 3 / 8)
    assert len(POLAR_EXPRESS_COEFFICIENTS) == 8


@settings(max_examples=12, deadline=None)
@given(rows=st.integers(4, 48), cols=st.integers(4, 48), steps=st.integers(5, 8), seed=st.integers(0, 2**16),
       decades=st.floats(2.0, 3.0))
def test_polar_express_is_closer_to_the_polar_factor_than_newton_schulz(rows, cols, steps, seed, decades) -> None:
    """At equal iterations (equal matrix products: three a step for both), on matrices whose
    singular values spread over 2-3 decades (as gradients' do; the range Amsel et al. optimise the
    coefficients for)."""
    generator = torch.Generator().manual_seed(seed)
    rank = min(rows, cols)
    left = torch.linalg.qr(torch.randn(rows, rank, generator=generator, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(cols, rank, generator=generator, dtype=torch.float64))[0]
    matrix = left @ torch.diag(torch.logspace(0, -decades, rank, dtype=torch.float64)) @ right.T
    exact = polar_factor(matrix)
    express = relative_error(polar_express(matrix, steps, dtype=torch.float64), exact)
    jordan = relative_error(newton_schulz(matrix, steps, dtype=torch.float64), exact)
    assert express < jordan
    assert express < 0.15  # Jordan's quintic plateaus near 0.2-0.3 whatever the steps


@settings(max_examples=12, deadline=None)
@given(rows=st.integers(4, 48), cols=st.integers(4, 48), steps=st.integers(5, 8), seed=st.integers(0, 2**16))
def test_polar_express_stays_near_the_polar_factor_on_gaussian_matrices(rows, cols, steps, seed) -> None:
    """On a well-conditioned matrix Newton-Schulz is sometimes the closer of the two (15 x 4, seed 0,
    5 steps: 0.078 against 0.095): Polar Express's coefficients minimise the worst case over
    singular values down to 1e-3, not every case; its error stays small all the same."""
    matrix = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assert relative_error(polar_express(matrix, steps, dtype=torch.float64), polar_factor(matrix)) < 0.15


def test_polar_express_converges_where_newton_schulz_plateaus() -> None:
    matrices = torch.randn(3, 40, 24, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = polar_factor(matrices)
    assert relative_error(polar_express(matrices, 10, dtype=torch.float64), exact) < 1e-6
    assert relative_error(newton_schulz(matrices, 10, dtype=torch.float64), exact) > 0.1


def test_polar_express_bf16_stays_finite_and_bounded() -> None:
    """bf16 (the default path): Gaussian, rank-one, zero and badly scaled matrices."""
    generator = torch.Generator().manual_seed(1)
    cases = [
        torch.randn(64, 32, generator=generator),
        torch.outer(torch.randn(32, generator=generator), torch.randn(16, generator=generator)),
        torch.zeros(16, 24),
        1e-20 * torch.randn(20, 20, generator=generator),
        1e20 * torch.randn(20, 20, generator=generator),
    ]
    for matrix in cases:
        result = polar_express(matrix, 5)
        assert result.dtype == torch.bfloat16
        assert torch.isfinite(result).all()
        assert torch.linalg.matrix_norm(result.float(), ord=2) < 1.5
    assert not polar_express(torch.zeros(16, 24)).any()
    gaussian = cases[0]
    assert relative_error(polar_express(gaussian, 5).float(), polar_factor(gaussian)) < 0.15


def test_muon_polar_express_first_step_is_the_exact_polar_factor() -> None:
    """With 10 float64 steps Polar Express is the polar factor to 1e-6: Muon's first step is then
    W(1 - lr wd) - lr sqrt(max(1, m/n)) U V^T of the gradient (the momentum buffer is a multiple of it)."""
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(12, 7, generator=generator, dtype=torch.float64)
    grad = torch.randn(12, 7, generator=generator, dtype=torch.float64)
    param = weight.clone().requires_grad_()
    param.grad = grad.clone()
    lr, wd = 0.05, 0.1
    gw.Muon([param], lr=lr, weight_decay=wd, orthogonalization="polar_express", ns_steps=10,
            ns_dtype=torch.float64).step()
    expected = weight * (1 - lr * wd) - lr * math.sqrt(12 / 7) * polar_factor(grad)
    torch.testing.assert_close(param.detach(), expected, atol=1e-7, rtol=0)


# ---- NorMuon ---------------------------------------------------------------------------------


def loss_of(params: list[torch.Tensor], step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 + step)
    total = torch.zeros(())
    for p in params:
        target = torch.randn(p.shape, generator=generator)
        total = total + ((p - target) ** 2).sum() + 0.1 * torch.sin(3 * p).sum()
    return total


def run(optimizer, params, steps) -> None:
    for step in steps:
        optimizer.zero_grad()
        loss_of(params, step).backward()
        optimizer.step()


SHAPES = [(16, 12), (12, 16), (16, 12), (8, 8), (32, 5)]


def fresh(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).requires_grad_() for shape in SHAPES]


@pytest.mark.parametrize("nesterov, weight_decay, beta2", [(True, 0.1, 0.95), (False, 0.0, 0.9), (True, 0.02, 0.5)])
def test_normuon_equals_pytorch_optimizers_normuon(nesterov, weight_decay, beta2) -> None:
    """150 steps, bf16 Newton-Schulz, Jordan's shape rule, norm-preserving scaling."""
    ours, theirs = fresh(), fresh()
    mine = gw.Muon(ours, lr=0.02, momentum=0.95, nesterov=nesterov, weight_decay=weight_decay, normuon_beta2=beta2)
    reference = NorMuon([{"params": theirs, "use_muon": True}], lr=0.02, momentum=0.95, nesterov=nesterov,
                        weight_decay=weight_decay, beta2=beta2)
    run(mine, ours, range(150))
    run(reference, theirs, range(150))
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine.state[a]["normuon_second_moment"],
                                   reference.state[b]["second_momentum_buffer"].squeeze(1))


def test_normuon_changes_the_update_and_balances_the_rows() -> None:
    """A tall matrix whose gradient has one loud row: Muon's orthogonalised update moves its rows
    by different amounts (a wide matrix's U V^T has orthonormal rows, a tall one's does not);
    NorMuon's row normalisation evens them out."""
    generator = torch.Generator().manual_seed(3)
    grad = torch.randn(32, 8, generator=generator) * 0.01
    grad[0] = torch.randn(8, generator=generator) * 10
    spreads = {}
    for beta2 in (None, 0.95):
        param = torch.zeros(32, 8, requires_grad=True)
        optimizer = gw.Muon([param], lr=1.0, weight_decay=0.0, normuon_beta2=beta2, ns_dtype=torch.float32)
        for _ in range(3):
            param.grad = grad.clone()
            optimizer.step()
        row_norms = param.detach().norm(dim=1)
        spreads[beta2] = float(row_norms.max() / row_norms.min())
    assert spreads[None] > 2.0
    assert spreads[0.95] < 1.01


def test_normuon_with_match_rms_adamw_is_the_papers_rms_when_orthogonal() -> None:
    """NorMuon's Algorithm 1 scales the normalised update to RMS 0.2: with an exact polar factor
    (10 float64 Polar Express steps), adjust_lr_fn='match_rms_adamw' gives exactly that."""
    for shape in [(16, 12), (6, 40), (3, 10, 7)]:
        param = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
        optimizer = gw.Muon([param], lr=1.0, weight_decay=0.0, normuon_beta2=0.9, adjust_lr_fn="match_rms_adamw",
                            orthogonalization="polar_express", ns_steps=10, ns_dtype=torch.float64)
        for step in range(3):
            before = param.detach().clone()
            param.grad = torch.randn(shape, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
            optimizer.step()
            for delta in (param.detach() - before).reshape(-1, *shape[-2:]):
                assert float(delta.square().mean().sqrt()) == pytest.approx(0.2, rel=1e-6)


@pytest.mark.parametrize("shape", [(12, 8), (4, 6, 10), (6, 2, 3, 3)])
def test_match_rms_adamw_scale_without_normuon(shape) -> None:
    """Liu et al.: 0.2 sqrt(max(m, n)) U V^T has RMS 0.2 (AdamW's typical update RMS)."""
    param = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    param.grad = torch.randn(shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    gw.Muon([param], lr=1.0, weight_decay=0.0, adjust_lr_fn="match_rms_adamw", orthogonalization="polar_express",
            ns_steps=10, ns_dtype=torch.float64).step()
    batch, rows, cols = matrix_shape(param)
    for matrix in param.detach().reshape(batch, rows, cols):
        assert float(matrix.square().mean().sqrt()) == pytest.approx(0.2, rel=1e-6)


def test_normuon_resumes_exactly_and_state_is_one_value_per_row() -> None:
    params = fresh(5) + [torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(6)).requires_grad_()]
    options = dict(lr=0.02, normuon_beta2=0.95, orthogonalization="polar_express")
    straight = [p.detach().clone().requires_grad_() for p in params]
    run(gw.Muon(straight, **options), straight, range(20))
    first = gw.Muon(params, **options)
    run(first, params, range(10))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = gw.Muon(params, **options)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    run(resumed, params, range(10, 20))
    for a, b in zip(params, straight, strict=True):
        assert torch.equal(a, b)
    assert resumed.state[params[0]]["normuon_second_moment"].shape == (16,)
    assert resumed.state[params[-1]]["normuon_second_moment"].shape == (3, 4)
    # the memory planner's rule counts it: predicted state bytes equal the measured ones
    assert predicted_bytes(resumed)["optimizer_state"] == measured_bytes(resumed)["optimizer_state"]
    plain = gw.Muon(straight, lr=0.02)
    run(plain, straight, range(1))
    rows = sum(p.shape[0] if p.ndim == 2 else p.shape[0] * p.shape[1] for p in params)
    assert predicted_bytes(resumed)["optimizer_state"] - predicted_bytes(plain)["optimizer_state"] == 4 * rows


@pytest.mark.parametrize("options, match", [
    ({"orthogonalization": "svd"}, "orthogonalization must be one of 'newton_schulz', 'polar_express', got 'svd'"),
    ({"normuon_beta2": 1.0}, r"normuon_beta2 .*1\.0"),
    ({"normuon_beta2": -0.1}, r"normuon_beta2 .*-0\.1"),
    ({"orthogonalization": "polar_express", "ns_coefficients": (3.0, -3.0, 1.0)}, "ns_coefficients must stay"),
])
def test_refinement_options_are_validated(options, match) -> None:
    with pytest.raises(ValueError, match=match):
        gw.Muon([torch.zeros(3, 3, requires_grad=True)], **options)


def test_cli_trains_tiny_gpt_with_every_refinement(tmp_path) -> None:
    out = tmp_path / "run"
    argv = ["train", "--workload", "tiny-gpt", "--workload-options",
            "n_layer=2,d_model=32,n_head=2,seq_len=32,eval_windows=4,final_eval_windows=8", "--batch-size", "4",
            "--steps", "4", "--eval-every", "2", "--checkpoint-every", "2", "--threads", "1", "--no-progress",
            "--optimizer", "muon", "--optimizer-options",
            "orthogonalization=polar_express,normuon_beta2=0.95,adjust_lr_fn=match_rms_adamw", "--out", str(out)]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert summary["final_metrics"]["val_loss"] < first["loss"] + 0.5


# ---- QK-Clip ---------------------------------------------------------------------------------


def probe(model: TinyGPT, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Each attention layer's per-head largest logit on ``tokens``, read through the protocol."""
    seen: list[torch.Tensor] = []
    attentions = [block.attention for block in model.transformer_blocks()]
    for attention in attentions:
        attention.logit_observer = seen.append
    with torch.no_grad():
        model(tokens)
    for attention in attentions:
        attention.logit_observer = None
    return seen


def loud_model() -> tuple[TinyGPT, torch.Tensor]:
    """tiny-gpt with head 0 of layer 0 made loud (its query rows scaled up 40x)."""
    torch.manual_seed(0)
    model = TinyGPT(seq_len=32, d_model=32, n_layer=2, n_head=2)
    with torch.no_grad():
        model.blocks[0].attention.qkv.weight[:16] *= 40
        model.blocks[0].attention.qkv.bias[:16] += 1.0
    return model, torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))


def test_max_logits_match_a_direct_computation() -> None:
    model, tokens = loud_model()
    attention = model.blocks[0].attention
    with torch.no_grad():
        x = model.token_embedding(tokens) + model.position_embedding(torch.arange(32))
        q, k, _ = attention.qkv(model.blocks[0].norm_attention(x)).chunk(3, dim=2)
        q, k = (t.view(4, 32, 2, 16).transpose(1, 2) for t in (q, k))
        logits = q @ k.transpose(-2, -1) / 4.0
        logits = logits.masked_fill(~torch.ones(32, 32, dtype=torch.bool).tril(), -float("inf"))
    torch.testing.assert_close(probe(model, tokens)[0], logits.amax(dim=(0, 2, 3)))


def test_qk_clip_caps_the_loud_head_and_leaves_the_others() -> None:
    model, tokens = loud_model()
    before = probe(model, tokens)
    tau = float(before[0][0]) / 3
    assert float(before[0][1]) < tau and float(before[1].max()) < tau
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    clip = QKClip(model, tau=tau)
    optimizer = gw.Muon(gw.muon_param_groups(model), lr=0.0, adamw_lr=0.0, weight_decay=0.0)
    clip.attach(optimizer)
    torch.nn.functional.cross_entropy(model(tokens).reshape(-1, 256), tokens.reshape(-1)).backward()
    optimizer.step()
    after = probe(model, tokens)
    assert float(after[0][0]) == pytest.approx(tau, rel=1e-4)  # logits scale by tau / max exactly
    qkv = model.blocks[0].attention.qkv
    assert not torch.equal(qkv.weight[:16], weights["blocks.0.attention.qkv.weight"][:16])  # head 0's queries
    assert not torch.equal(qkv.weight[32:48], weights["blocks.0.attention.qkv.weight"][32:48])  # and keys
    assert torch.equal(qkv.weight[16:32], weights["blocks.0.attention.qkv.weight"][16:32])  # head 1 untouched
    assert torch.equal(qkv.weight[64:], weights["blocks.0.attention.qkv.weight"][64:])  # values untouched
    for name, param in model.named_parameters():
        if not name.startswith("blocks.0.attention.qkv"):
            assert torch.equal(param.detach(), weights[name]), name
    assert torch.equal(after[0][1], before[0][1])  # same input, same weights: same logits
    assert clip.max_logits == {}  # forgotten after the clip


def test_qk_clip_with_training_steps_keeps_logits_near_tau() -> None:
    """With a real lr the clip uses the step's forward logits, so after the step the logits
    may drift by what the update changes (Kimi K2's semantics): they stay within a few percent."""
    model, tokens = loud_model()
    tau = float(probe(model, tokens)[0][0]) / 3
    clip = QKClip(model, tau=tau)
    optimizer = gw.Muon(gw.muon_param_groups(model), lr=0.002, adamw_lr=1e-4)
    clip.attach(optimizer)
    for _ in range(5):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(tokens).reshape(-1, 256), tokens.reshape(-1)).backward()
        optimizer.step()
        assert float(torch.cat(probe(model, tokens)).max()) < tau * 1.1


def test_qk_clip_records_training_forwards_only_and_keeps_the_max() -> None:
    model, tokens = loud_model()
    clip = QKClip(model, tau=1e6)
    with torch.no_grad():
        model(tokens)
    assert clip.max_logits == {}
    model(tokens[:2])
    model(tokens[2:])
    torch.testing.assert_close(clip.max_logits[0], probe(model, tokens)[0])  # max over both micro-batches
    clip.clip()
    clip.remove()
    assert all(block.attention.logit_observer is None for block in model.transformer_blocks())


def test_qk_clip_refuses_bad_inputs() -> None:
    with pytest.raises(ValueError, match="tau"):
        QKClip(TinyGPT(seq_len=8, d_model=8, n_layer=1, n_head=2), tau=0.0)
    with pytest.raises(ValueError, match="reports its attention logits"):
        QKClip(torch.nn.Linear(3, 3))
