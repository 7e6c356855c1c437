"""The fused CPU kernel of 8-bit Adam/AdamW (gradwise/optim/kernels/adam_8bit_cpu.cpp) against
the generic 8-bit path (moments decoded, Adam's foreach update, quantize_8bit), over many steps,
shapes and hyperparameters; resume and the cases it leaves to the generic path, for it and the
4-bit and bf16 kernels; a build failure. The helpers here serve the 4-bit kernel's tests too
(test_state_format_kernel_4bit.py).

The two paths differ only in the square root of v: the kernel's is the CPU's correctly rounded
one, torch.sqrt on float32 CPU tensors goes through MKL, which is not (about one root in five is
one ulp off). So parameters agree to rtol 1e-6, and the moments, which do not depend on the
parameters unless weight decay is coupled (Adam's L2 term), are the same codes and scales bit
for bit; with coupled decay a parameter's last bit may move a moment across one midpoint, to
the neighbouring code. The kernel against itself (resume) stays bit for bit."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradwise.optim.adam as adam_module
import gradwise.optim.kernels as kernels
from gradwise.optim import Adam, AdamW
from gradwise.optim.state_formats import (
    BLOCK,
    BLOCK_4BIT,
    _map_and_bounds,
    dynamic_map,
    quantize_4bit,
    quantize_8bit,
)

SHAPES = [(0,), (1,), (3, 7), (256,), (257,), (300, 7), (2, 3, 100), (2, 256)]


@pytest.fixture(scope="module", autouse=True)
def kernel():
    """Build (or load) the kernel once; a machine without a compiler skips these tests (a source that does not
    compile fails them)."""
    try:
        return kernels.adam_8bit_cpu()
    except kernels.ToolchainMissing as error:
        pytest.skip(str(error))


def _params(shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for shape in shapes]


def _run(cls, params, steps, fused, seed=1, scale=3.0, opt=None, state_format="8bit", **options):
    """``steps`` steps of random gradients; returns the optimizer."""
    opt = opt or cls(params, state_format=state_format, fused=fused, **options)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator) * scale
        opt.step()
    return opt


def _same(a, b):
    """Bit for bit (NaN included): equal values, and zeros of the same sign."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b) or (
        a.dtype == torch.float32 and torch.equal(a.detach().view(torch.int32), b.detach().view(torch.int32)))


def _codes(stored, state_format):
    """The codes of a quantised moment, one per value (4-bit ones unpacked: code 2j is the low half of byte j)."""
    if state_format != "4bit":
        return stored.int()
    return torch.stack([stored & 15, stored >> 4], dim=-1).reshape(-1).int()


def _assert_close(params_a, opt_a, params_b, opt_b, moments_exact, steps, lr=1e-3):
    """Parameters allclose (NaN where the other has NaN) to rtol 1e-6 and, for parameters near
    zero, an absolute drift of a few ulps of each step's update (whose size is about ``lr``) over
    ``steps``; codes and block scales bit for bit when ``moments_exact``. Else codes at most one
    apart and scales allclose; a moment one code off moves its step by up to a tenth of ``lr``
    (the 4-bit maps' gaps are wider: up to a third)."""
    state_format = opt_b.param_groups[0]["state_format"]
    atol = steps * lr * (2.0**-20 if moments_exact else 0.1 if state_format != "4bit" else 0.3)
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=max(1e-12, atol), equal_nan=True)
        state_a, state_b = opt_a.state[a], opt_b.state[b]
        assert list(state_a) == list(state_b)
        for key in state_b:
            if moments_exact or key == "step":
                assert _same(state_a[key], state_b[key]), key
            elif state_b[key].dtype == torch.uint8:
                difference = _codes(state_a[key], state_format) - _codes(state_b[key], state_format)
                assert bool((difference.abs() <= 1).all()), key
            else:
                # the scales follow the parameters through the decay term
                torch.testing.assert_close(state_a[key], state_b[key], rtol=1e-3, atol=0.0, equal_nan=True)


def _moments_exact(options):
    """Whether the moments are independent of the parameters (no coupled weight decay)."""
    return not options.get("weight_decay") or options.get("decoupled_weight_decay", False)


def _assert_same(params_a, opt_a, params_b, opt_b):
    for a, b in zip(params_a, params_b):
        assert _same(a, b), (a - b).abs().max()
        state_a, state_b = opt_a.state[a], opt_b.state[b]
        assert list(state_a) == list(state_b)
        for key in state_b:  # tensors bit for bit; stochastic rounding's write counter equal
            same = _same if isinstance(state_b[key], torch.Tensor) else (lambda a, b: a == b)
            assert same(state_a[key], state_b[key]), key


@pytest.mark.parametrize("cls", [Adam, AdamW])
@pytest.mark.parametrize("options", [
    {},
    {"maximize": True},
    {"weight_decay": 0.1},
    {"weight_decay": 0.3, "maximize": True, "lr": 0.01},
    {"betas": (0.5, 0.6), "eps": 1e-3},
    {"betas": (0.0, 0.0)},  # lerp's other branch (weight >= 0.5), v = g^2
])
def test_kernel_matches_generic_path(cls, options, monkeypatch):
    fused_params = _params(SHAPES)
    with monkeypatch.context() as patch:
        patch.setattr(Adam, "_formatted_update", lambda *args: pytest.fail("generic path ran"))
        fused = _run(cls, fused_params, 50, None, **options)
    generic_params = _params(SHAPES)
    generic = _run(cls, generic_params, 50, False, **options)
    _assert_close(fused_params, fused, generic_params, generic, cls is AdamW or _moments_exact(options), 50,
                  options.get("lr", 1e-3))
    assert any(not torch.equal(a, b) for a, b in zip(fused_params, _params(SHAPES)) if a.numel())  # it moved


@settings(max_examples=10, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(0, 600), min_size=1, max_size=2).map(tuple), min_size=1, max_size=4),
    decoupled=st.booleans(),
    maximize=st.booleans(),
    weight_decay=st.sampled_from([0.0, 1e-2, 0.5]),
    beta1=st.floats(0.0, 0.99),
    beta2=st.floats(0.0, 0.9999),
    lr=st.floats(1e-4, 1.0),
    scale=st.sampled_from([1e-6, 1.0, 1e4]),
)
def test_kernel_matches_generic_path_random(shapes, decoupled, maximize, weight_decay, beta1, beta2, lr, scale):
    options = dict(lr=lr, betas=(beta1, beta2), weight_decay=weight_decay, maximize=maximize,
                   decoupled_weight_decay=decoupled)
    fused_params, generic_params = _params(shapes), _params(shapes)
    fused = _run(Adam, fused_params, 8, None, scale=scale, **options)
    generic = _run(Adam, generic_params, 8, False, scale=scale, **options)
    _assert_close(fused_params, fused, generic_params, generic, _moments_exact(options), 8, lr)


@pytest.mark.parametrize("state_format, shape", [("8bit", (600,)), ("4bit", (600,)), ("4bit", (20, 30))])
def test_hostile_gradients_encode_as_the_generic_path(state_format, shape):
    """NaN and infinite gradients: the kernel writes the codes (the last one for NaN) and scales
    (torch.amax's NaN) that the format's quantiser writes, block-wise and under rank-1 normalisation."""
    def run(fused):
        params = _params([shape])
        opt = AdamW(params, state_format=state_format, fused=fused)
        for values in ([float("nan"), 1.0], [float("inf"), -2.0], [1e38, -1e38]):
            grad = torch.randn(600, generator=torch.Generator().manual_seed(3))
            grad[:2] = torch.tensor(values)
            grad[300:302] = torch.tensor(values)
            params[0].grad = grad.view(shape)
            opt.step()
        return params, opt

    _assert_close(*run(None), *run(False), moments_exact=True, steps=3)


@pytest.mark.parametrize("state_format, key", [
    ("8bit", "exp_avg"), ("8bit", "exp_avg_sq"), ("4bit", "exp_avg"), ("4bit", "exp_avg_sq"),
])
def test_codes_around_every_midpoint_are_bucketizes(state_format, key, monkeypatch):
    """The kernels find the nearest code without a search (8 bits: cells that hold at most one
    midpoint each; 4 bits: m by a binary search, v in closed form), so their codes are checked on a
    sweep: with betas (0, 0) one step stores m = g and v = g^2 (rounded), here in blocks led by
    g = 1 (the block's scale, 1.0's own code at the top), the rest the 2^13 floats on either side
    of every midpoint of the map, the midpoints (the ties) and the map's values; for v the roots of
    those, whose squares land on or next to them (on some midpoints exactly). The codes and scales
    must be the generic quantiser's (torch.bucketize, right=False): 4.2M values with 8 bits."""
    signed = key == "exp_avg"
    values, bounds = _map_and_bounds(state_format, signed, torch.device("cpu"))
    window = torch.arange(-2**13, 2**13 + 1, dtype=torch.int32)
    targets = torch.cat([(bounds.view(torch.int32).unsqueeze(1) + window).view(torch.float32).reshape(-1), values])
    grad = targets if signed else targets.double().sqrt().float()
    block = BLOCK if state_format == "8bit" else BLOCK_4BIT
    grad = torch.nn.functional.pad(grad, (0, -grad.numel() % (block - 1))).view(-1, block - 1)
    grad = torch.cat([torch.ones(len(grad), 1), grad], dim=1).reshape(-1)
    stored = grad if signed else grad * grad
    assert bool(torch.isin(bounds, stored).any())  # ties among them
    param = torch.zeros(grad.numel())
    param.grad = grad.clone()
    opt = Adam([param], betas=(0.0, 0.0), state_format=state_format)
    with monkeypatch.context() as patch:
        patch.setattr(Adam, "_formatted_update", lambda *args: pytest.fail("generic path ran"))
        opt.step()
    codes, scales = (quantize_8bit if state_format == "8bit" else quantize_4bit)(stored, signed)
    assert torch.equal(opt.state[param][key], codes)
    assert torch.equal(opt.state[param][key + "_absmax"], scales)


@pytest.mark.parametrize("state_format, resumed_fused", [
    ("8bit", None), ("8bit", False), ("4bit", None), ("4bit", False), ("bf16", None), ("bf16", False),
    ("bf16-sr", None),  # the generic path draws its noise otherwise: resumed only with the kernel
])
def test_resume_through_state_dict_is_exact(state_format, resumed_fused):
    """20 steps with the kernel (8-bit, 4-bit or bf16), state_dict through torch.save/torch.load(weights_only=True),
    30 more with the kernel (the 50 uninterrupted steps bit for bit; stochastic rounding's draws are
    seeded by the saved counters) or the generic path (the same codes, scales and bf16 moments;
    parameters to the last bits of the square roots)."""
    whole_params = _params(SHAPES)
    whole = _run(AdamW, whole_params, 50, None, opt=AdamW(whole_params, state_format=state_format, weight_decay=0.1))
    params = _params(SHAPES)
    opt = AdamW(params, state_format=state_format, weight_decay=0.1)
    generator = torch.Generator().manual_seed(1)
    for step in range(50):
        grads = [torch.randn(p.shape, generator=generator) * 3.0 for p in params]
        if step == 20:
            buffer = io.BytesIO()
            torch.save(opt.state_dict(), buffer)
            buffer.seek(0)
            params = [p.detach().clone() for p in params]
            opt = AdamW(params, state_format=state_format, fused=resumed_fused, weight_decay=0.1)
            opt.load_state_dict(torch.load(buffer, weights_only=True))
        for param, grad in zip(params, grads):
            param.grad = grad
        opt.step()
    if resumed_fused is None:
        _assert_same(whole_params, whole, params, opt)
    else:
        _assert_close(whole_params, whole, params, opt, moments_exact=True, steps=30)


@pytest.mark.parametrize("state_format, loader", [("8bit", "adam_8bit_cpu"), ("4bit", "adam_4bit_cpu"),
                                                  ("bf16-sr", "adam_bf16_cpu")])
@pytest.mark.parametrize("case", ["amsgrad", "bf16", "strided", "foreach=False", "cautious", "fused=False",
                                  "fp32 format"])
def test_cases_the_kernel_leaves_to_the_generic_path(case, state_format, loader, monkeypatch):
    def refused():
        raise AssertionError("the kernel was asked for where it does not apply")

    monkeypatch.setattr(adam_module, loader, refused)
    param = torch.randn(40, 30)
    options = {"state_format": state_format}
    if case == "amsgrad":
        options["amsgrad"] = True
    elif case == "bf16":
        param = param.bfloat16()
    elif case == "strided":
        param = torch.randn(40, 60)[:, ::2]
    elif case == "foreach=False":
        options["foreach"] = False
    elif case == "cautious":
        options["cautious"] = True
    elif case == "fused=False":
        options["fused"] = False
    else:
        options["state_format"] = "fp32"
    param.grad = torch.randn_like(param)
    opt = AdamW([param], **options)
    before = param.detach().clone()
    opt.step()
    assert not torch.equal(param, before)


def test_moments_loaded_in_another_format_take_the_generic_path_once(monkeypatch):
    """A moment stored in bf16 (say by a run under state_format='bf16') is not codes: the generic
    path decodes it and writes codes, and the next step is the kernel's."""
    param = torch.randn(300)
    param.grad = torch.randn(300)
    opt = AdamW([param], state_format="bf16")
    opt.step()
    opt.param_groups[0]["state_format"] = "8bit"
    calls = []
    original = Adam._formatted_update
    monkeypatch.setattr(Adam, "_formatted_update", lambda *args: calls.append(1) or original(*args))
    opt.step()
    assert opt.state[param]["exp_avg"].dtype == torch.uint8 and calls == [1]
    opt.step()
    assert calls == [1]


def test_build_failure_falls_back_with_one_warning(monkeypatch):
    def adam_8bit_cpu():
        raise RuntimeError("could not build gradwise's fused CPU 8-bit Adam kernel (no compiler)")

    monkeypatch.setattr(adam_module, "adam_8bit_cpu", adam_8bit_cpu)
    monkeypatch.setattr(kernels, "_FAILED", {})
    params = _params([(300,)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = _run(AdamW, params, 3, None)
    assert [str(w.message) for w in caught if w.category is RuntimeWarning] == [
        "could not build gradwise's fused CPU 8-bit Adam kernel (no compiler); falling back to the generic path"]
    generic_params = _params([(300,)])
    _run(AdamW, generic_params, 3, False)
    # the generic path with fused=None runs torch's fused AdamW on the decoded moments: last-bit apart
    torch.testing.assert_close(params[0], generic_params[0])
    assert opt.state[params[0]]["exp_avg"].dtype == torch.uint8
    with pytest.raises(RuntimeError, match="no compiler"):
        _run(AdamW, _params([(300,)]), 1, True)


def test_kernel_refuses_mismatched_lists(kernel):
    """The kernel checks what it is given: codes of another size are refused, not read past."""
    param, grad = torch.zeros(300), torch.zeros(300)
    codes, scales = torch.zeros(299, dtype=torch.uint8), torch.zeros(2)
    with pytest.raises(RuntimeError, match="codes"):
        kernel.adam_8bit_(
            [param], [grad], [codes], [scales], [codes], [scales], dynamic_map(True), dynamic_map(False),
            [-1e-3], [1.0], 0.9, 0.999, 1e-8, 0.0, 1e-3, True, False,
        )
