r"""The federated test problem: L2-regularised logistic regression split over clients by label.

.. math::
    F(w) = \sum_{k=1}^K \frac{n_k}{n} F_k(w),\qquad
    F_k(w) = \frac1{n_k} \sum_{i \in \mathcal D_k} \log\big(1 + e^{-y_i x_i^\top w}\big)
             + \frac\lambda2 \lVert w\rVert^2,\qquad y_i \in \{-1, +1\},

with :math:`n = \sum_k n_k`. :math:`F` is :math:`\lambda`-strongly convex and smooth, so it has
one minimiser :math:`w^\star`, the *centralised optimum* that FedAvg and consensus ADMM
must reach. The data are generated, never downloaded: Gaussian features
:math:`x_i \sim \mathcal N(0, I_d)` and labels drawn from a planted logistic model
:math:`P(y_i = 1) = \sigma(x_i^\top w_{\text{true}})`, :math:`w_{\text{true}} \sim \mathcal N(0, I_d)`.

Non-identical clients (label skew, the "pathological non-IID" split of McMahan et al. 2017,
arXiv:1602.05629, Sec. 3, made continuous): with probability :math:`s` (``label_skew``) an
example's key is its label :math:`\frac{y_i + 1}2 \in \{0, 1\}`, otherwise a uniform draw
:math:`U_i \in (0, 1)`; the examples are sorted by key and client :math:`k` takes the next
:math:`n_k` of them. :math:`s = 0` is an IID split, :math:`s = 1` sorts by label (the first
clients see only negatives, the last only positives).
Then the clients' minimisers differ and :math:`\nabla F_k(w^\star) \neq 0`: the heterogeneity
that biases FedAvg with a fixed step size.

:meth:`FederatedLogistic.optimum` is the centralised reference: Newton's method
(:class:`gradwise.optim.Newton`, dense Hessian and Cholesky, quadratic convergence) on all
the data in float64 until :math:`\lVert\nabla F(w)\rVert_2 \le 10^{-10}`.

Every process builds the same problem from the same seed, so a client's data never travels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from gradwise.optim.newton import Newton
from gradwise.validation import check_int, check_range


class FederatedLogistic:
    """Logistic regression data generated from ``seed`` and split over ``num_clients`` clients.

    Args:
        num_clients: K.
        examples_per_client: :math:`n_k`, one number for all clients or one per client.
        num_features: d.
        label_skew: s in [0, 1], from IID (0) to sorted by label (1).
        l2: :math:`\\lambda > 0`.
        seed: generates the features, the labels and the split.

    Example::

        problem = FederatedLogistic(num_clients=4, examples_per_client=200, num_features=10)
        w = torch.zeros(10, dtype=torch.float64, requires_grad=True)
        problem.loss(w, client=2).backward()       # client 2's F_k
        distance = (w - problem.optimum()).norm()
    """

    def __init__(
        self,
        num_clients: int = 4,
        examples_per_client: int | Sequence[int] = 200,
        num_features: int = 10,
        label_skew: float = 0.9,
        l2: float = 1e-2,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.num_clients = check_int("num_clients", num_clients, 1)
        if isinstance(examples_per_client, Sequence):
            if len(examples_per_client) != num_clients:
                raise ValueError(f"examples_per_client must give one size per client ({num_clients}), "
                                 f"got {len(examples_per_client)}")
            sizes = [check_int(f"examples_per_client[{k}]", n, 1) for k, n in enumerate(examples_per_client)]
        else:
            sizes = [check_int("examples_per_client", examples_per_client, 1)] * num_clients
        self.num_features = check_int("num_features", num_features, 1)
        self.label_skew = check_range("label_skew", label_skew, 0.0, 1.0)
        self.l2 = check_range("l2", l2, 0.0, low_open=True)
        self.sizes = sizes
        self.num_examples = sum(sizes)
        generator = torch.Generator().manual_seed(seed)
        n, d = self.num_examples, num_features
        self.inputs = torch.randn(n, d, generator=generator, dtype=dtype)
        planted = torch.randn(d, generator=generator, dtype=dtype)
        positive = torch.rand(n, generator=generator, dtype=dtype) < torch.sigmoid(self.inputs @ planted)
        self.labels = torch.where(positive, 1.0, -1.0).to(dtype)
        sorted_by_label = torch.rand(n, generator=generator, dtype=dtype) < label_skew
        key = torch.where(sorted_by_label, (self.labels + 1) / 2, torch.rand(n, generator=generator, dtype=dtype))
        self.client_rows = list(torch.argsort(key, stable=True).split(sizes))

    def client(self, k: int) -> tuple[Tensor, Tensor]:
        """Client ``k``'s features ``(n_k, d)`` and labels ``(n_k,)`` in {-1, +1}."""
        rows = self.client_rows[check_int("client", k, 0, self.num_clients - 1)]
        return self.inputs[rows], self.labels[rows]

    def weight(self, k: int) -> float:
        """:math:`n_k / n`, client ``k``'s share of :math:`F`."""
        return self.sizes[check_int("client", k, 0, self.num_clients - 1)] / self.num_examples

    def loss(self, w: Tensor, client: int | None = None, rows: Tensor | None = None) -> Tensor:
        """:math:`F_k(w)` (``client=None``: :math:`F(w)`), twice differentiable; ``rows``
        restricts the mean to those rows of the client's (or the whole) data set."""
        inputs, labels = (self.inputs, self.labels) if client is None else self.client(client)
        if rows is not None:
            inputs, labels = inputs[rows], labels[rows]
        margins = labels * (inputs @ w)
        return torch.nn.functional.softplus(-margins).mean() + 0.5 * self.l2 * (w * w).sum()

    def optimum(self, tolerance: float = 1e-10, max_iterations: int = 50) -> Tensor:
        """:math:`w^\\star = \\arg\\min F` by Newton's method to gradient norm ``tolerance``."""
        check_range("tolerance", tolerance, 0.0, low_open=True)
        check_int("max_iterations", max_iterations, 1)
        w = torch.zeros(self.num_features, dtype=self.inputs.dtype, requires_grad=True)
        newton = Newton([w])
        for _ in range(max_iterations):
            newton.step(lambda: self.loss(w))
            (gradient,) = torch.autograd.grad(self.loss(w), w)
            if float(gradient.norm()) <= tolerance:
                return w.detach()
        raise RuntimeError(f"Newton did not reach gradient norm {tolerance:g} in {max_iterations} iterations "
                           f"(last {float(gradient.norm()):.3g})")
