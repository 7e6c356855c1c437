"""The fused CPU kernel of Adam/AdamW with 4-bit moments (gradwise/optim/kernels/adam_4bit_cpu.cpp)
against the generic 4-bit path (moments decoded, Adam's foreach update, quantize_4bit): block-wise
m, block-wise v of vectors, rank-1 normalised v of matrices and 3-D tensors, odd and empty sizes.

As for the 8-bit kernel (test_state_format_kernel.py, whose helpers these tests use and where the
resume, codes-around-every-midpoint, hostile-gradient and left-to-the-generic-path tests cover 4
bits too) the two paths differ only in the square root of v, so parameters agree to rtol 1e-6 and
the codes and scales (block absmaxes and rank-1 maxima) are the generic path's bit for bit, unless
weight decay is coupled, when a moment may land on the neighbouring code."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_state_format_kernel import _assert_close, _moments_exact, _params, _run

import gradwise.optim.adam as adam_module
import gradwise.optim.kernels as kernels
from gradwise.optim import Adam, AdamW
from gradwise.optim.state_formats import dynamic_map, linear_map_4bit, quantize_4bit

SHAPES = [(0,), (1,), (127,), (128,), (129,), (), (5, 0), (3, 7), (129, 3), (257, 1), (2, 3, 50), (4, 128)]
"""Odd and empty sizes, a scalar, vectors (block-wise v) and rank-1 normalised matrices and a 3-D
tensor, whose rows are shorter than, longer than and as long as a block of 128."""


@pytest.fixture(scope="module", autouse=True)
def kernel():
    """Build (or load) the kernel once; a machine without a compiler skips these tests (a source that does not
    compile fails them)."""
    try:
        return kernels.adam_4bit_cpu()
    except kernels.ToolchainMissing as error:
        pytest.skip(str(error))


def _kernel_only(monkeypatch):
    """Fails the test if the generic path runs a step."""
    monkeypatch.setattr(Adam, "_formatted_update", lambda *args: pytest.fail("generic path ran"))


@pytest.mark.parametrize("cls, options", [
    (AdamW, {}),
    (AdamW, {"weight_decay": 0.3, "maximize": True, "lr": 0.01}),
    (Adam, {"weight_decay": 0.1}),  # coupled: a moment may land on the neighbouring code
    (Adam, {"betas": (0.0, 0.0)}),  # lerp's other branch (weight >= 0.5), v = g^2
])
def test_kernel_matches_generic_path(cls, options, monkeypatch):
    fused_params = _params(SHAPES)
    with monkeypatch.context() as patch:
        _kernel_only(patch)
        fused = _run(cls, fused_params, 12, None, state_format="4bit", **options)
    generic_params = _params(SHAPES)
    generic = _run(cls, generic_params, 12, False, state_format="4bit", **options)
    _assert_close(fused_params, fused, generic_params, generic, cls is AdamW or _moments_exact(options), 12,
                  options.get("lr", 1e-3))
    assert any(not torch.equal(a, b) for a, b in zip(fused_params, _params(SHAPES)) if a.numel())  # it moved
    rows, columns = fused_params[8].shape  # the (129, 3) matrix: its v keeps one maximum per row and column
    assert fused.state[fused_params[8]]["exp_avg_sq_absmax"].shape == (rows + columns,)


@settings(max_examples=4, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(1, 60), min_size=1, max_size=3).map(tuple), min_size=1, max_size=3),
    decoupled=st.booleans(),
    weight_decay=st.sampled_from([0.0, 0.5]),
    betas=st.tuples(st.floats(0.0, 0.99), st.floats(0.0, 0.9999)),
    scale=st.sampled_from([1e-6, 1.0, 1e4]),
)
def test_kernel_matches_generic_path_random(shapes, decoupled, weight_decay, betas, scale):
    options = dict(lr=1e-2, betas=betas, weight_decay=weight_decay, decoupled_weight_decay=decoupled)
    fused_params, generic_params = _params(shapes), _params(shapes)
    fused = _run(Adam, fused_params, 5, None, scale=scale, state_format="4bit", **options)
    generic = _run(Adam, generic_params, 5, False, scale=scale, state_format="4bit", **options)
    _assert_close(fused_params, fused, generic_params, generic, _moments_exact(options), 5, 1e-2)


def test_an_outlier_row_and_column_set_their_own_scales(monkeypatch):
    """Rank-1 normalisation's point: one large row and one large column of gradients leave the other
    entries of v on their own (smaller) scales; the kernel finds the same maxima as the generic path.
    Gradients of magnitude 1 to 2, row 5 times 1e3 and column 40 times 1e2: v = 1e-3 g^2 after one step."""
    def run(fused):
        param = torch.zeros(64, 48)
        generator = torch.Generator().manual_seed(0)
        param.grad = (1 + torch.rand(64, 48, generator=generator)) * torch.randn(64, 48, generator=generator).sign()
        param.grad[5] *= 1e3
        param.grad[:, 40] *= 1e2
        opt = AdamW([param], state_format="4bit", fused=fused)
        opt.step()
        return opt.state[param]

    with monkeypatch.context() as patch:
        _kernel_only(patch)
        fused = run(None)
    generic = run(False)
    for key in ("exp_avg", "exp_avg_absmax", "exp_avg_sq", "exp_avg_sq_absmax"):
        assert torch.equal(fused[key], generic[key]), key
    row_maxima, column_maxima = fused["exp_avg_sq_absmax"].split([64, 48])
    assert row_maxima[5] > 1e4 * row_maxima[6] and column_maxima[40] > 1e3 * column_maxima[41]


def test_the_dispatch_reads_the_4bit_layout_only():
    """The kernel applies to fresh moments and to moments in the 4-bit layout (codes packed flat,
    rank-1 maxima for a matrix's v), not to a moment stored otherwise (here v of a matrix with block
    scales, as a vector's would be): the generic path reads that one."""
    param = torch.randn(30, 10)
    param.grad = torch.randn(30, 10)
    opt = AdamW([param], state_format="4bit")
    group = opt.param_groups[0]
    assert adam_module._adam_kernel_applies(opt, group, [param])
    opt.step()
    state = opt.state[param]
    assert state["exp_avg"].shape == (150,) and state["exp_avg_sq_absmax"].shape == (40,)
    assert adam_module._adam_kernel_applies(opt, group, [param])
    state["exp_avg_sq"], state["exp_avg_sq_absmax"] = quantize_4bit(torch.rand(300), signed=False)
    assert not adam_module._adam_kernel_applies(opt, group, [param])


def test_kernel_refuses_mismatched_scales(kernel):
    """The kernel checks what it is given: block scales where a matrix's v needs its rank-1 maxima
    (or codes of another size) are refused, not read past."""
    param, grad = torch.zeros(30, 10), torch.zeros(30, 10)
    codes, block_scales = torch.zeros(150, dtype=torch.uint8), torch.zeros(3)
    maps = dynamic_map(True, decades=3), linear_map_4bit()
    arguments = [-1e-3], [1.0], 0.9, 0.999, 1e-8, 0.0, 1e-3, True, False
    with pytest.raises(RuntimeError, match="rank-1 maxima"):
        kernel.adam_4bit_([param], [grad], [codes], [block_scales], [codes], [block_scales], *maps, *arguments)
    with pytest.raises(RuntimeError, match="codes"):
        kernel.adam_4bit_([param], [grad], [codes[:149]], [block_scales], [codes], [torch.zeros(40)], *maps,
                          *arguments)
