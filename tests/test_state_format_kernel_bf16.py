"""The fused CPU kernel of Adam/AdamW with bf16 moments (gradwise/optim/kernels/adam_bf16_cpu.cpp)
against the generic bf16 path (moments decoded, Adam's foreach update, rounded back): round to
nearest equal to it up to the square root's last bit (the moments bit for bit without coupled
weight decay); stochastic rounding unbiased onto the two neighbours, with its own draws (resume bit
for bit and the cases left to the generic path: test_state_format_kernel.py, with the 8-bit kernel's)."""

from __future__ import annotations

import pytest
import torch

import gradwise.optim.kernels as kernels
from gradwise.optim import Adam, AdamW

SHAPES = [(0,), (1,), (3, 7), (257,), (300, 70), (2, 3, 100)]


@pytest.fixture(scope="module", autouse=True)
def kernel():
    """Build (or load) the kernel once; a machine without a compiler skips these tests (a source that does not
    compile fails them)."""
    try:
        return kernels.adam_bf16_cpu()
    except kernels.ToolchainMissing as error:
        pytest.skip(str(error))


def _params(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for shape in SHAPES]


def _run(params, steps, state_format="bf16", opt=None, cls=AdamW, **options):
    opt = opt or cls(params, state_format=state_format, **options)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator) * 3.0
        opt.step()
    return opt


@pytest.mark.parametrize("cls", [Adam, AdamW])
@pytest.mark.parametrize("options", [
    {},
    {"maximize": True},
    {"weight_decay": 0.1},
    {"weight_decay": 0.3, "maximize": True, "lr": 0.01},
    {"betas": (0.0, 0.0)},  # lerp's other branch, v = g^2
])
def test_round_to_nearest_kernel_matches_the_generic_path(cls, options, monkeypatch):
    fused_params, generic_params = _params(), _params()
    with monkeypatch.context() as patch:
        patch.setattr(Adam, "_formatted_update", lambda *args: pytest.fail("generic path ran"))
        fused = _run(fused_params, 40, cls=cls, **options)
    generic = _run(generic_params, 40, cls=cls, fused=False, **options)
    moments_exact = cls is AdamW or not options.get("weight_decay")
    lr = options.get("lr", 1e-3)
    for a, b in zip(fused_params, generic_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=40 * lr * (2.0**-20 if moments_exact else 0.1))
        for key in ("exp_avg", "exp_avg_sq"):
            stored, reference = fused.state[a].get(key), generic.state[b].get(key)
            if reference is None:
                continue
            assert stored.dtype == torch.bfloat16
            if moments_exact:
                assert torch.equal(stored, reference), key
            else:  # a parameter's last bit may move a moment to the neighbouring bf16 value
                torch.testing.assert_close(stored, reference, rtol=2**-7, atol=0.0)
    assert any(not torch.equal(a, b) for a, b in zip(fused_params, _params()) if a.numel())


@pytest.mark.parametrize("value", [1.0 + 2**-10, -3.0 - 3 * 2**-9, 1e-20, 5e4 + 3.0])
def test_stochastic_rounding_in_the_kernel_is_unbiased_onto_the_two_neighbours(value):
    """With beta1 = 0 the stored m is the gradient itself: 20000 copies of a value between two bf16
    numbers round to those two only, with the mean of the value (to 2e-4) and draws that differ
    from one write to the next."""
    param = torch.zeros(20000)
    param.grad = torch.full((20000,), value)
    opt = Adam([param], betas=(0.0, 0.9), state_format="bf16-sr")
    opt.step()
    stored = opt.state[param]["exp_avg"].float()
    low, high = sorted({float(stored.min()), float(stored.max())})
    assert low <= value <= high and set(stored.unique().tolist()) <= {low, high} and low < high
    assert float(stored.double().mean()) == pytest.approx(value, rel=2e-4)
    first = stored.clone()
    param.grad = torch.full((20000,), value)
    opt.step()
    assert not torch.equal(opt.state[param]["exp_avg"].float(), first)  # a fresh draw


def test_non_finite_moments_are_kept_as_the_generic_path_keeps_them():
    """Infinite and NaN gradients: the kernel's stochastic rounding leaves infinities and NaNs where
    the generic path leaves them (its rounding passes non-finite values through)."""
    def stored(fused):
        param = torch.zeros(4)
        param.grad = torch.tensor([float("inf"), -float("inf"), float("nan"), 1.0])
        opt = Adam([param], state_format="bf16-sr", fused=fused)
        opt.step()
        return [opt.state[param][key].float() for key in ("exp_avg", "exp_avg_sq")]

    for mine, reference in zip(stored(None), stored(False)):
        assert torch.equal(torch.isnan(mine), torch.isnan(reference))
        finite_or_inf = ~torch.isnan(reference)
        assert torch.equal(mine[finite_or_inf].isinf(), reference[finite_or_inf].isinf())
        assert torch.equal(mine[reference.isinf()], reference[reference.isinf()])


def test_kernel_refuses_mismatched_moments(kernel):
    """The kernel checks what it is given: a moment of another dtype or size is refused, not read past."""
    param, grad = torch.zeros(10), torch.zeros(10)
    short = torch.zeros(5, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="moments must be contiguous bfloat16"):
        kernel.adam_bf16_([param], [grad], [short], [short.clone()], [-1e-3], [1.0], 0.9, 0.999, 1e-8, 0.0, 1e-3,
                          True, False, False, [])
    with pytest.raises(RuntimeError, match="lists differ in length"):
        kernel.adam_bf16_([param], [grad], [torch.zeros(10, dtype=torch.bfloat16)],
                          [torch.zeros(10, dtype=torch.bfloat16)], [-1e-3], [1.0], 0.9, 0.999, 1e-8, 0.0, 1e-3,
                          True, False, True, [1])
