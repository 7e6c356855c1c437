"""Cautious updates (arXiv:2411.16085) and MARS (arXiv:2411.10438), the two options shared by
the momentum optimizers through gradwise.optim.base: each against pytorch_optimizer where its
definition matches, else against the paper's formula written out; refusals; state and resume."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pytorch_optimizer import MARS as ReferenceMARS
from pytorch_optimizer import AdEMAMix as ReferenceAdEMAMix
from pytorch_optimizer import Lion as ReferenceLion

import gradwise.optim as gw
from gradwise.optim.base import cautious_updates

SHAPES = [(6, 5), (7,)]  # a matrix and a vector


def _params(seed: int, dtype=torch.float64) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=dtype) for shape in SHAPES]


def _drive(optimizers_and_params, steps: int, seed: int = 11) -> None:
    """``steps`` steps of each (optimizer, params) on the same random gradients."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        grads = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in SHAPES]
        for optimizer, params in optimizers_and_params:
            for param, grad in zip(params, grads):
                param.grad = grad.to(param.dtype)
            optimizer.step()


def _mask(update: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The paper's mask, rescaled: 1[u g > 0] * d / (nnz + 1)."""
    mask = (update * grad > 0).to(update.dtype)
    return mask * (mask.numel() / (mask.sum() + 1))


def _mars(grad: torch.Tensor, last: torch.Tensor, gamma: float, beta1: float) -> torch.Tensor:
    """MARS-approx's corrected gradient, clipped to norm 1."""
    c = grad + gamma * beta1 / (1 - beta1) * (grad - last)
    return c / max(1.0, float(c.norm()))


# The shared helper.


def test_cautious_mask_by_hand():
    """Two of four signs agree: those coordinates are kept and scaled by 4 / (2 + 1)."""
    update = torch.tensor([1.0, -2.0, 3.0, -4.0])
    grad = torch.tensor([0.5, 1.0, -1.0, -0.1])
    (masked,) = cautious_updates([update], [grad])
    torch.testing.assert_close(masked, torch.tensor([4 / 3, 0.0, 0.0, -16 / 3]))
    assert torch.equal(update, torch.tensor([1.0, -2.0, 3.0, -4.0]))  # the input (state) is untouched
    (none_agree,) = cautious_updates([update], [-update])
    assert torch.equal(none_agree, torch.zeros(4))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
def test_cautious_mask_equals_the_formula(seed, dtype):
    generator = torch.Generator().manual_seed(seed)
    updates = [torch.randn(shape, generator=generator).to(dtype) for shape in [(3, 4), (5,), (1,), (64, 65)]]
    grads = [torch.randn(u.shape, generator=generator).to(dtype) for u in updates]
    for masked, update, grad in zip(cautious_updates(updates, grads), updates, grads):
        torch.testing.assert_close(masked, update * _mask(update, grad).to(dtype))


# Cautious: each optimizer that takes it.


@pytest.mark.parametrize("cls, options", [
    (gw.AdamW, {"weight_decay": 0.0}), (gw.Lion, {}), (gw.SGD, {"momentum": 0.9}), (gw.AdEMAMix, {}),
])
def test_cautious_masks_a_large_tensor_as_a_whole(cls, options):
    """A tensor larger than a CPU cache block (2^18 elements) is masked with its own count, not
    a block's. Two runs share their state (the mask does not touch it) and, without weight decay,
    the plain step is -lr u: the cautious step must be -lr u * 1[u g > 0] * d / (nnz + 1) over the
    whole tensor (the first block's signs are flipped, so the blocks' counts differ)."""
    generator = torch.Generator().manual_seed(0)
    plain_param = torch.zeros(600, 500)
    cautious_param = torch.zeros(600, 500)
    plain = cls([plain_param], lr=0.1, **options)
    cautious = cls([cautious_param], lr=0.1, cautious=True, **options)
    for step in range(2):
        grad = torch.randn(600, 500, generator=generator)
        if step:
            grad[:50] = -grad[:50].abs()
        before = plain_param.clone(), cautious_param.clone()
        plain_param.grad, cautious_param.grad = grad, grad.clone()
        plain.step()
        cautious.step()
    plain_step, cautious_step = plain_param - before[0], cautious_param - before[1]
    kept = (-plain_step * grad > 0).float()
    expected = plain_step * kept * (kept.numel() / (kept.sum() + 1))
    torch.testing.assert_close(cautious_step, expected, rtol=1e-4, atol=1e-7)


def test_cautious_adamw_is_the_papers_c_adamw():
    """C-AdamW (Algorithm 2 of the paper): AdamW whose update m_hat / (sqrt(v_hat) + eps) is
    masked against g_t, decay unmasked. pytorch_optimizer has no cautious AdamW to compare."""
    lr, (beta1, beta2), eps, wd = 0.01, (0.9, 0.99), 1e-8, 0.1
    ours = _params(0)
    optimizer = gw.AdamW(ours, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd, cautious=True)
    expected = [p.clone() for p in ours]
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in expected]
    generator = torch.Generator().manual_seed(11)
    for t in range(1, 101):
        grads = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in SHAPES]
        for i, (g, (m, v)) in enumerate(zip(grads, moments)):
            m.mul_(beta1).add_(g, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            update = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)
            expected[i] = expected[i] * (1 - lr * wd) - lr * update * _mask(update, g)
        for p, g in zip(ours, grads):
            p.grad = g
        optimizer.step()
    for mine, reference in zip(ours, expected):
        torch.testing.assert_close(mine, reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("maximize", [False, True])
def test_cautious_lion_matches_pytorch_optimizer(maximize):
    """150 steps: Lion(cautious=True) equals pytorch_optimizer's Lion(cautious=True)."""
    ours, theirs = _params(1), _params(1)
    kwargs = dict(lr=3e-3, betas=(0.9, 0.99), weight_decay=0.5, maximize=maximize)
    _drive([(gw.Lion(ours, cautious=True, **kwargs), ours),
            (ReferenceLion(theirs, cautious=True, **kwargs), theirs)], 150)
    for mine, reference in zip(ours, theirs):
        torch.testing.assert_close(mine, reference, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("nesterov", [False, True])
def test_cautious_sgd_masks_the_momentum_step(nesterov):
    """C-SGD: the heavy-ball (or Nesterov) step masked against g_t; the buffer itself unmasked."""
    lr, mu = 0.05, 0.9
    ours = _params(2)
    optimizer = gw.SGD(ours, lr=lr, momentum=mu, nesterov=nesterov, cautious=True)
    expected = [p.clone() for p in ours]
    buffers: list[torch.Tensor | None] = [None, None]
    generator = torch.Generator().manual_seed(11)
    for _ in range(100):
        grads = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in SHAPES]
        for i, g in enumerate(grads):
            buffers[i] = g.clone() if buffers[i] is None else mu * buffers[i] + g
            step = g + mu * buffers[i] if nesterov else buffers[i]
            expected[i] = expected[i] - lr * step * _mask(step, g)
        for p, g in zip(ours, grads):
            p.grad = g
        optimizer.step()
    for mine, reference in zip(ours, expected):
        torch.testing.assert_close(mine, reference, rtol=1e-10, atol=1e-12)
    for p, b in zip(ours, buffers):
        torch.testing.assert_close(optimizer.state[p]["momentum_buffer"], b)


def test_cautious_ademamix_masks_the_whole_update():
    """The paper's rule on AdEMAMix: the mixed update (m1_hat + alpha m2) / denominator is masked.
    pytorch_optimizer's AdEMAMix(cautious=True) masks m1 alone, so it is not the reference here:
    checked to differ, so this test would notice if the two rules coincided on this run."""
    betas, alpha, lr, eps = (0.9, 0.99, 0.999), 5.0, 0.01, 1e-8
    ours = _params(3)
    optimizer = gw.AdEMAMix(ours, lr=lr, betas=betas, alpha=alpha, eps=eps, cautious=True)
    expected = [p.clone() for p in ours]
    state = [[torch.zeros_like(p) for _ in range(3)] for p in expected]
    generator = torch.Generator().manual_seed(11)
    for t in range(1, 101):
        grads = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in SHAPES]
        for i, g in enumerate(grads):
            m1, m2, nu = state[i]
            m1.lerp_(g, 1 - betas[0])
            m2.lerp_(g, 1 - betas[2])
            nu.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
            update = (m1 / (1 - betas[0] ** t) + alpha * m2) / ((nu / (1 - betas[1] ** t)).sqrt() + eps)
            expected[i] = expected[i] - lr * update * _mask(update, g)
        for p, g in zip(ours, grads):
            p.grad = g
        optimizer.step()
    for mine, reference in zip(ours, expected):
        torch.testing.assert_close(mine, reference, rtol=1e-10, atol=1e-12)
    theirs = _params(3)
    _drive([(ReferenceAdEMAMix(theirs, lr=lr, betas=betas, alpha=alpha, eps=eps, cautious=True), theirs)], 100)
    assert not torch.allclose(theirs[0], ours[0], rtol=1e-6)


# MARS.


@pytest.mark.parametrize("path", [{}, {"fused": False}, {"foreach": False}])
def test_mars_adamw_matches_pytorch_optimizer(path):
    """150 steps: AdamW(mars_gamma) equals pytorch_optimizer's MARS (mars_type="adamw",
    optimize_1d=True so the vector takes MARS too). Its denominator is (sqrt(v) + eps) /
    sqrt(1 - beta2^t) rather than torch's sqrt(v / (1 - beta2^t)) + eps: with eps = 1e-16 the
    two agree to rounding."""
    ours, theirs = _params(4), _params(4)
    kwargs = dict(lr=3e-3, betas=(0.95, 0.99), weight_decay=0.1, eps=1e-16)
    _drive([(gw.AdamW(ours, mars_gamma=0.025, **kwargs, **path), ours),
            (ReferenceMARS(theirs, gamma=0.025, mars_type="adamw", optimize_1d=True, **kwargs), theirs)], 150)
    for mine, reference in zip(ours, theirs):
        torch.testing.assert_close(mine, reference, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("path", [{}, {"fused": True}])
def test_mars_lion_matches_pytorch_optimizer_with_equal_betas(path):
    """MARS-Lion of the paper and of pytorch_optimizer is the sign of one EMA of the corrected
    gradient: Lion(mars_gamma) with betas (beta, beta). 150 steps, weight decay."""
    ours, theirs = _params(5), _params(5)
    if path:  # Lion's kernel updates float32 tensors
        ours, theirs = [p.float() for p in ours], [p.float() for p in theirs]
    beta = 0.9
    _drive([(gw.Lion(ours, lr=1e-3, betas=(beta, beta), weight_decay=0.5, mars_gamma=0.025, **path), ours),
            (ReferenceMARS(theirs, lr=1e-3, betas=(beta, 0.99), weight_decay=0.5, gamma=0.025, mars_type="lion",
                           optimize_1d=True), theirs)], 150)
    tolerance = 1e-5 if path else 1e-12  # float32: the kernel decays by one factor 1 - lr wd
    for mine, reference in zip(ours, theirs):
        torch.testing.assert_close(mine, reference, rtol=tolerance, atol=tolerance)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), gamma=st.floats(0.0, 1.0), scale=st.sampled_from([1e-3, 1.0, 100.0]))
def test_mars_feeds_the_corrected_gradient_to_adam(seed, gamma, scale):
    """Adam(mars_gamma) is Adam on c_t: the same steps as torch's Adam fed the formula's c_t
    (checked with small and large gradients: clipping active or not), and last_grad holds g_t."""
    beta1 = 0.9
    ours = _params(seed % 1000)
    theirs = [p.clone() for p in ours]
    optimizer = gw.Adam(ours, lr=0.01, betas=(beta1, 0.999), mars_gamma=gamma, fused=False)
    reference = torch.optim.Adam(theirs, lr=0.01, betas=(beta1, 0.999), foreach=False)
    last = [torch.zeros_like(p) for p in ours]
    generator = torch.Generator().manual_seed(seed)
    for _ in range(30):
        grads = [scale * torch.randn(shape, generator=generator, dtype=torch.float64) for shape in SHAPES]
        for i, (p, q, g) in enumerate(zip(ours, theirs, grads)):
            p.grad = g
            q.grad = _mars(g, last[i], gamma, beta1)
            last[i] = g
        optimizer.step()
        reference.step()
    for p, q, g in zip(ours, theirs, last):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
        assert torch.equal(optimizer.state[p]["last_grad"], g)


def test_mars_and_cautious_compose_on_adamw():
    """Both options at once: the mask compares the update with the gradient the optimizer is
    fed, c_t (pytorch_optimizer's MARS compares with g_t; the paper of cautious updates has no MARS)."""
    gamma, lr, (beta1, beta2), eps = 0.5, 0.01, (0.9, 0.99), 1e-8
    ours = _params(6)
    optimizer = gw.AdamW(ours, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=0.0, mars_gamma=gamma,
                         cautious=True)
    expected = [p.clone() for p in ours]
    state = [(torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p)) for p in expected]
    generator = torch.Generator().manual_seed(11)
    for t in range(1, 61):
        grads = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in SHAPES]
        for i, (g, (m, v, last)) in enumerate(zip(grads, state)):
            c = _mars(g, last, gamma, beta1)
            last.copy_(g)
            m.lerp_(c, 1 - beta1)
            v.mul_(beta2).addcmul_(c, c, value=1 - beta2)
            update = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)
            expected[i] = expected[i] - lr * update * _mask(update, c)
        for p, g in zip(ours, grads):
            p.grad = g
        optimizer.step()
    for mine, reference in zip(ours, expected):
        torch.testing.assert_close(mine, reference, rtol=1e-10, atol=1e-12)


# Validation, state_dict, resume, memory.


_HOSTILE = [({"mars_gamma": -0.1}, "mars_gamma"), ({"mars_gamma": float("nan")}, "mars_gamma"),
            ({"mars_gamma": "0.1"}, "mars_gamma"), ({"cautious": 1}, "cautious")]


@pytest.mark.parametrize(("cls", "options", "named"), [
    *[(cls, options, named) for cls in (gw.Adam, gw.AdamW, gw.Lion, gw.AdEMAMix) for options, named in _HOSTILE],
    *[(cls, {"cautious": True, "fused": True}, "fused") for cls in (gw.Adam, gw.AdamW, gw.Lion, gw.SGD)],
])
def test_hostile_options_are_refused_by_name(cls, options, named):
    options = {"momentum": 0.9, **options} if cls is gw.SGD else options
    with pytest.raises(ValueError, match=named):
        cls([torch.zeros(2)], **options)
    with pytest.raises(ValueError, match=named):
        cls([{"params": [torch.zeros(2)], **options}])


def test_sgd_refuses_cautious_without_momentum_and_with_sparse_gradients():
    with pytest.raises(ValueError, match="cautious.*momentum > 0"):
        gw.SGD([torch.zeros(2)], cautious=True)
    embedding = torch.nn.Embedding(4, 2, sparse=True)
    optimizer = gw.SGD(embedding.parameters(), lr=0.1, momentum=0.9, cautious=True)
    embedding(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="cautious.*sparse"):
        optimizer.step()


def test_options_are_per_param_group():
    """The matrix takes MARS and the cautious mask, the vector plain AdamW, as the MARS authors
    run vectors (their optimize_1d=False): the vector steps as torch's AdamW."""
    matrix, vector = _params(7)
    reference = vector.clone()
    optimizer = gw.AdamW([{"params": [matrix], "mars_gamma": 0.025, "cautious": True}, {"params": [vector]}])
    torch_opt = torch.optim.AdamW([reference])
    for step in range(20):
        grad = torch.randn(vector.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        matrix.grad, vector.grad, reference.grad = torch.ones_like(matrix), grad, grad.clone()
        optimizer.step()
        torch_opt.step()
    torch.testing.assert_close(vector, reference)
    assert "last_grad" in optimizer.state[matrix] and "last_grad" not in optimizer.state[vector]


@pytest.mark.parametrize("cls", [gw.AdamW, gw.Lion, gw.AdEMAMix])
def test_mars_resumes_exactly_from_a_checkpoint(cls):
    """last_grad travels in the state_dict: 5 + 5 steps across a save equal 10 steps."""
    straight, resumed = _params(8), _params(8)
    first = cls(straight, lr=1e-2, mars_gamma=0.1, cautious=True)
    _drive([(first, straight)], 10)
    partial = cls(resumed, lr=1e-2, mars_gamma=0.1, cautious=True)
    _drive([(partial, resumed)], 5)
    saved = partial.state_dict()
    assert saved["param_groups"][0]["mars_gamma"] == 0.1 and saved["param_groups"][0]["cautious"] is True
    fresh = cls(resumed, lr=1e-2, mars_gamma=0.1, cautious=True)
    fresh.load_state_dict(saved)
    generator_state = torch.Generator().manual_seed(11)
    for _ in range(5):  # the gradients of steps 1-5, drawn and discarded
        [torch.randn(shape, generator=generator_state, dtype=torch.float64) for shape in SHAPES]
    for _ in range(5):
        grads = [torch.randn(shape, generator=generator_state, dtype=torch.float64) for shape in SHAPES]
        for p, g in zip(resumed, grads):
            p.grad = g
        fresh.step()
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


def test_a_torch_adamw_checkpoint_loads_with_the_options_off():
    """A state_dict of torch's AdamW (no cautious, no mars_gamma keys) continues as plain AdamW."""
    ours, theirs = _params(9), _params(9)
    torch_opt = torch.optim.AdamW(theirs, lr=0.01)
    _drive([(torch_opt, theirs)], 3)
    optimizer = gw.AdamW(ours, lr=0.01)
    for p, q in zip(ours, theirs):
        p.data.copy_(q)
    optimizer.load_state_dict(copy.deepcopy(torch_opt.state_dict()))  # a checkpoint, not shared tensors
    assert optimizer.param_groups[0]["cautious"] is False and optimizer.param_groups[0]["mars_gamma"] is None
    _drive([(optimizer, ours), (torch_opt, theirs)], 3, seed=12)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize(("cls", "options", "buffers", "scalars"), [
    (gw.AdamW, {}, 2, 1), (gw.AdamW, {"mars_gamma": 0.025}, 3, 1),
    (gw.AdamW, {"mars_gamma": 0.1, "amsgrad": True}, 4, 1),
    (gw.Lion, {}, 1, 0), (gw.Lion, {"mars_gamma": 0.025}, 2, 0), (gw.Lion, {"cautious": True}, 1, 0),
    (gw.SGD, {"momentum": 0.9, "cautious": True}, 1, 0),
])
def test_memory_rule_counts_the_options_state(cls, options, buffers, scalars):
    param = torch.zeros(3, 4)
    optimizer = cls([param], **options)
    param.grad = torch.ones(3, 4)
    optimizer.step()
    state = optimizer.state[param].values()
    assert sum(v.numel() for v in state if v.dim() > 0) == buffers * 12
    assert sum(1 for v in state if v.dim() == 0) == scalars
    assert cls.description.state((3, 4), options).values == buffers * 12
