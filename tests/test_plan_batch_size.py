"""Batch size: per-example gradients, Chebyshev's bound checked by sampling, the noise scale."""

from __future__ import annotations

import pytest
import torch

from gradwise.plan import batch_size


@pytest.fixture(scope="module")
def workload():
    model, inputs, targets, loss_fn = batch_size.workload_examples("mlp", examples=512, seed=3)
    per_example = batch_size.per_example_gradients(model, loss_fn, inputs, targets)
    return model, inputs, targets, loss_fn, per_example


def test_vmap_per_example_gradients_equal_a_loop_of_backward_passes(workload):
    model, inputs, targets, loss_fn, per_example = workload
    for i in (0, 17, 511):
        model.zero_grad()
        loss_fn(model(inputs[i : i + 1]), targets[i : i + 1]).backward()
        expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(per_example[i], expected, rtol=1e-5, atol=1e-6)
    # their mean is the full-batch gradient
    model.zero_grad()
    loss_fn(model(inputs), targets).backward()
    full = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(per_example.mean(dim=0).float(), full, rtol=1e-4, atol=1e-6)


def test_statistics_by_hand():
    g = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 3.0]])
    stats = batch_size.gradient_statistics(g)
    torch.testing.assert_close(stats.mean, torch.tensor([2.0, 1.0], dtype=torch.float64))
    assert stats.variance == pytest.approx((2 + 2 + 4) / 3)  # |(-1,-1)|^2, |(1,-1)|^2, |(0,2)|^2
    assert stats.noise_scale == pytest.approx((8 / 3) / 5)


def test_chebyshev_bound_holds_by_sampling(workload):
    *_, per_example = workload
    stats = batch_size.gradient_statistics(per_example)
    eps, delta = 0.3 * stats.mean_norm, 0.1
    n = batch_size.chebyshev_batch_size(stats.variance, eps, delta)
    assert n == pytest.approx(stats.noise_scale / (0.3**2 * 0.1), abs=1)
    check = batch_size.check_by_sampling(per_example, n, eps, samples=2000, seed=1)
    assert check.fraction_within >= 1 - delta
    # the variance that the bound rests on: E|g_n - G|^2 = sigma^2 / n (sampling with replacement)
    assert check.mean_squared_error == pytest.approx(stats.variance / n, rel=0.1)
    # and at a far smaller batch the mini-batch gradients are not within eps as often
    small = batch_size.check_by_sampling(per_example, max(1, n // 50), eps, samples=1000, seed=2)
    assert small.fraction_within < 1 - delta


def test_noise_scale_from_two_batch_sizes_matches_per_example_estimate(workload):
    *_, per_example = workload
    stats = batch_size.gradient_statistics(per_example)
    generator = torch.Generator().manual_seed(0)
    norms = {}
    for size in (4, 256):
        batches = batch_size.sample_batch_gradients(per_example, size, 2000, generator)
        norms[size] = float(batches.pow(2).sum(dim=1).mean())
    mean_norm_sq, variance = batch_size.noise_scale_from_two_batches(norms[4], norms[256], 4, 256)
    assert mean_norm_sq == pytest.approx(stats.mean_norm**2, rel=0.1)
    assert variance / mean_norm_sq == pytest.approx(stats.noise_scale, rel=0.1)


def test_linear_scaling_rule():
    assert batch_size.linear_scaling_lr(0.1, 256, 8192) == pytest.approx(3.2)
    with pytest.raises(ValueError, match="batch must be an integer >= 1"):
        batch_size.linear_scaling_lr(0.1, 256, 0)


@pytest.mark.parametrize(
    ("args", "message"),
    [((1.0, 0.0, 0.1), "eps must be > 0"), ((1.0, 0.1, 1.0), r"delta must be in \(0, 1\)"),
     ((-1.0, 0.1, 0.1), "variance must be >= 0")],
)
def test_bound_rejects_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        batch_size.chebyshev_batch_size(*args)
