r"""How large a mini-batch must be: Chebyshev's bound, the linear scaling rule, the noise scale.

Let :math:`g_i` be the gradient of example :math:`i` of :math:`N`, :math:`G = \frac1N\sum g_i`
the full gradient and :math:`\sigma^2 = \frac1N\sum\|g_i - G\|^2` the total variance (the trace
of the per-example gradient covariance). A mini-batch of :math:`n` examples drawn with
replacement has :math:`\mathbb E\|\hat g_n - G\|^2 = \sigma^2/n`, so by Chebyshev's (Markov's)
inequality :math:`P(\|\hat g_n - G\| \ge \epsilon) \le \sigma^2/(n\epsilon^2)`, and

.. math:: n \ge \frac{\sigma^2}{\epsilon^2\,\delta}

puts the mini-batch gradient within :math:`\epsilon` of the full one with probability at least
:math:`1-\delta` (Bottou, Curtis & Nocedal 2018, "Optimization Methods for Large-Scale Machine
Learning", arXiv:1606.04838, section 5). :math:`\sigma^2` comes from per-example gradients
computed in one pass with ``torch.func.vmap``.

The simple gradient noise scale :math:`B_{\text{simple}} = \sigma^2/\|G\|^2` (McCandlish et al.
2018, "An Empirical Model of Large-Batch Training", arXiv:1812.06162) is the batch size at
which the noise and the signal of a mini-batch gradient are of the same size; with
:math:`\epsilon` relative to :math:`\|G\|` the bound is :math:`B_{\text{simple}}/(\epsilon^2\delta)`.
It can also be estimated without per-example gradients from the squared norms of two
batch sizes, :math:`\mathbb E\|\hat g_B\|^2 = \|G\|^2 + \sigma^2/B` (McCandlish et al., appendix A).

The linear scaling rule (Goyal et al. 2017, "Accurate, Large Minibatch SGD", arXiv:1706.02677)
multiplies the learning rate by :math:`k` when the batch grows :math:`k`-fold, after a warmup.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from gradwise.validation import check_choice, check_int, check_range


def per_example_gradients(
    model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], inputs: Tensor, targets: Tensor
) -> Tensor:
    """Per-example gradients of ``loss_fn(model(x), y)`` as an ``(examples, parameters)`` matrix
    (parameters flattened in ``model.parameters()`` order), in one ``vmap`` pass."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}

    def loss_of_one(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        output = functional_call(model, (params, buffers), (x.unsqueeze(0),))
        return loss_fn(output, y.unsqueeze(0))

    grads = vmap(grad(loss_of_one), in_dims=(None, 0, 0))(params, inputs, targets)
    return torch.cat([g.reshape(inputs.shape[0], -1) for g in grads.values()], dim=1)


@dataclass(frozen=True)
class GradientStatistics:
    """Mean gradient and total variance of per-example gradients."""

    mean: Tensor
    variance: float  # sigma^2 = mean squared distance of the g_i from their mean
    examples: int

    @property
    def mean_norm(self) -> float:
        return float(self.mean.norm())

    @property
    def noise_scale(self) -> float:
        """The simple noise scale B_simple = sigma^2 / |G|^2."""
        return self.variance / self.mean_norm**2


def gradient_statistics(per_example: Tensor) -> GradientStatistics:
    """Statistics of an ``(examples, parameters)`` matrix of per-example gradients."""
    if per_example.ndim != 2 or per_example.shape[0] < 2:
        raise ValueError(f"per_example must be a matrix with at least 2 rows, got shape {tuple(per_example.shape)}")
    g = per_example.double()
    mean = g.mean(dim=0)
    variance = float((g - mean).pow(2).sum(dim=1).mean())
    return GradientStatistics(mean, variance, per_example.shape[0])


def chebyshev_batch_size(variance: float, eps: float, delta: float) -> int:
    """Smallest n with sigma^2 / (n eps^2) <= delta."""
    check_range("variance", variance, 0.0)
    check_range("eps", eps, 0.0, low_open=True)
    check_range("delta", delta, 0.0, 1.0, low_open=True, high_open=True)
    return max(1, math.ceil(variance / (eps * eps * delta) * (1 - 1e-12)))


def linear_scaling_lr(base_lr: float, base_batch: int, batch: int) -> float:
    """The learning rate for ``batch`` by the linear scaling rule: ``base_lr * batch / base_batch``."""
    check_range("base_lr", base_lr, 0.0, low_open=True)
    check_int("base_batch", base_batch, 1)
    check_int("batch", batch, 1)
    return base_lr * batch / base_batch


def noise_scale_from_two_batches(
    small_norm_sq: float, big_norm_sq: float, small: int, big: int
) -> tuple[float, float]:
    """Unbiased (|G|^2, sigma^2) from squared norms of mini-batch gradients of two sizes
    (McCandlish et al. 2018, appendix A): their ratio is B_simple."""
    check_int("small", small, 1)
    check_int("big", big, small + 1)
    mean_norm_sq = (big * big_norm_sq - small * small_norm_sq) / (big - small)
    variance = (small_norm_sq - big_norm_sq) / (1 / small - 1 / big)
    return mean_norm_sq, variance


def sample_batch_gradients(per_example: Tensor, batch: int, samples: int, generator: torch.Generator) -> Tensor:
    """``samples`` mini-batch gradients, each the mean of ``batch`` rows of ``per_example``
    drawn uniformly with replacement: a ``(samples, parameters)`` matrix."""
    check_int("batch", batch, 1)
    check_int("samples", samples, 1)
    examples = per_example.shape[0]
    rows = []
    for start in range(0, samples, 256):  # counts matrices of 256 x examples at a time
        count = min(256, samples - start)
        picks = torch.randint(examples, (count, batch), generator=generator)
        counts = torch.zeros(count, examples, dtype=per_example.dtype).scatter_add_(
            1, picks, torch.ones(count, batch, dtype=per_example.dtype)
        )
        rows.append((counts @ per_example).double() / batch)  # counts are exact integers
    return torch.cat(rows)


@dataclass(frozen=True)
class SamplingCheck:
    batch: int
    samples: int
    fraction_within: float  # of mini-batch gradients within eps of the full gradient
    mean_squared_error: float  # mean |g_batch - G|^2, to compare with sigma^2 / batch


def check_by_sampling(
    per_example: Tensor, batch: int, eps: float, samples: int = 2000, seed: int = 0
) -> SamplingCheck:
    """Draw ``samples`` mini-batches of ``batch`` examples and measure how many of their
    gradients lie within ``eps`` (absolute) of the full gradient."""
    check_range("eps", eps, 0.0, low_open=True)
    mean = per_example.double().mean(dim=0)
    batches = sample_batch_gradients(per_example, batch, samples, torch.Generator().manual_seed(seed))
    squared = (batches - mean).pow(2).sum(dim=1)
    return SamplingCheck(batch, samples, float((squared < eps * eps).double().mean()), float(squared.mean()))


CLASSIFICATION_WORKLOADS = ("mlp", "logreg")


def workload_examples(
    name: str, examples: int, seed: int = 0
) -> tuple[nn.Module, Tensor, Tensor, Callable[[Tensor, Tensor], Tensor]]:
    """The model (at its initialisation) and the training examples of a classification workload
    of :mod:`gradwise.problems.workloads` (``mlp``: a ReLU MLP on a tanh teacher's labels;
    ``logreg``: logistic regression), with ``examples`` training examples.
    Returns (model, inputs, targets, loss function)."""
    from gradwise.problems.data import ShuffledEpochs
    from gradwise.problems.workloads import make_workload

    check_choice("workload", name, CLASSIFICATION_WORKLOADS)
    check_int("examples", examples, 2)
    workload = make_workload(name, batch_size=1, seed=seed, train_examples=examples)
    data = workload.train_data
    if not isinstance(data, ShuffledEpochs):  # the classification workloads hold their examples
        raise TypeError(f"workload {name!r} streams {type(data).__name__}, not a fixed set of examples")
    return workload.model, data.inputs, data.targets, _cross_entropy


def _cross_entropy(output: Tensor, target: Tensor) -> Tensor:
    return nn.functional.cross_entropy(output.float(), target)
