"""Two defects of torch's fused CPU kernels that gradwise routes around, pinned as tests.

The README's compatibility table quotes them. Each test measures torch's kernel beside
gradwise's default path on the same input: if torch fixes its kernel, the test fails, and the
routing (and the README's row) should be revisited.
"""

from __future__ import annotations

import pytest
import torch

import gradwise.optim as gw


def _one_step(optimizer_class, param: torch.Tensor, grad: torch.Tensor, **options) -> torch.Tensor:
    param = param.clone().requires_grad_()
    param.grad = grad.clone()
    optimizer_class([param], lr=0.1, **options).step()
    return param.detach()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torchs_fused_cpu_sgd_is_wrong_for_16_bit_tensors_and_gradwise_avoids_it(dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    param = torch.randn(64, 33, generator=generator).to(dtype)
    grad = torch.randn(64, 33, generator=generator).to(dtype)
    exact = param.float() - 0.1 * grad.float()
    torch_fused = _one_step(torch.optim.SGD, param, grad, fused=True).float()
    ours = _one_step(gw.SGD, param, grad).float()  # the default path
    assert (torch_fused - exact).abs().max() > 0.1  # 0.41 in bf16 when measured
    assert (ours - exact).abs().max() < 0.02  # one 16-bit rounding of the result
    with pytest.raises(RuntimeError, match="fused=True"):
        _one_step(gw.SGD, param, grad, fused=True)


def test_torchs_fused_cpu_adam_is_wrong_on_strided_parameters_and_gradwise_avoids_it() -> None:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=generator)
    grads = [torch.randn(4, 3, generator=generator) for _ in range(3)]

    def run(optimizer_class, strided: bool, **options) -> torch.Tensor:
        param = (base.clone()[:, ::2] if strided else base[:, ::2].clone()).requires_grad_()
        optimizer = optimizer_class([param], lr=0.1, **options)
        for grad in grads:
            param.grad = grad.clone()
            optimizer.step()
        return param.detach()

    contiguous = run(torch.optim.Adam, strided=False)
    assert (run(torch.optim.Adam, strided=True, fused=True) - contiguous).abs().max() > 0.1  # 0.42 measured
    torch.testing.assert_close(run(gw.Adam, strided=True), contiguous)  # gradwise's default path
