r"""Federated averaging (FedAvg; McMahan et al. 2017, arXiv:1602.05629, Algorithm 1).

Every rank of the process group is one client :math:`k` with :math:`n_k` examples of its own.
Round :math:`t` (all ranks agree on everything below without talking: same seed, same counter):

1. the participants :math:`S_t`: :math:`m = \max(1, \operatorname{round}(C K))` of the :math:`K`
   clients drawn uniformly without replacement (``fraction`` = :math:`C`);
2. each participant starts from the global model :math:`w_t` and runs :math:`E` local SGD
   steps (``local_steps``) on its own data with step size :math:`\eta_t`;
3. the new global model is the sample-weighted average of the participants' models,

.. math::
    w_{t+1} = \sum_{k \in S_t} \frac{n_k}{\sum_{j \in S_t} n_j}\, w^k_{t+1},

computed by one all-reduce (sum) of :math:`[n_k w^k_{t+1},\ n_k]`, to which the clients outside
:math:`S_t` add zeros: the result is what a server would compute from the participants' uploads.
Bytes per round and rank: (number of parameters + 1) x element size, after one broadcast of
the initial model from rank 0.

**Why the step size must decay.** With :math:`E > 1` local steps on non-identical data the
clients drift towards their own minimisers. At the optimum :math:`w^\star` of
:math:`F = \sum_k \frac{n_k}{n} F_k` the local gradients :math:`g_k = \nabla F_k(w^\star)` do not
vanish, only their weighted sum does. Expanding the :math:`E` local steps of a round that starts
at :math:`w^\star` with a fixed :math:`\eta` gives
:math:`w_{t+1} - w^\star \approx \eta^2 \frac{E(E-1)}2 \sum_k \frac{n_k}{n} \nabla^2 F_k\, g_k \neq 0`,
while a round contracts errors by about :math:`1 - \eta E \mu`: the fixed point of FedAvg is
:math:`O(\eta (E - 1))` away from :math:`w^\star` (Li et al. 2020, "On the convergence of FedAvg
on non-IID data", arXiv:1907.02189, Sec. 3.3, Theorem 4).
Partial participation adds an error of size :math:`O(\eta E \lVert g_k\rVert)` each round
(zero-mean when the clients hold equal numbers of examples; Li et al.'s sampling scheme II).
Both vanish as :math:`\eta_t \to 0`; with :math:`\eta_t = \eta_0 / (1 + t / h)` (``lr_decay_rounds``
= :math:`h`) FedAvg converges at rate :math:`O(1/t)` for strongly convex
smooth :math:`F_k` (Li et al., Theorems 1-3, their :math:`\eta_t = \beta / (t + \gamma)`) when
:math:`\eta_0 h E \mu` is large enough (:math:`\mu` the strong convexity).

With full participation, one local step and full-batch local gradients, a round is exactly
one step of gradient descent on :math:`F`:
:math:`\sum_k \frac{n_k}{n}(w_t - \eta\nabla F_k(w_t)) = w_t - \eta\nabla F(w_t)`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from gradwise.optim.sgd import SGD
from gradwise.validation import check_int, check_range

LocalLoss = Callable[[], Tensor]
"""Returns the loss of this client's next local batch (not yet differentiated)."""


class FedAvg:
    """This rank's client in FedAvg: local SGD on ``local_loss``, then the weighted average.

    Args:
        params: the model's parameters; every rank starts from rank 0's values (one broadcast).
        num_samples: :math:`n_k`, this client's number of examples (the averaging weight).
        lr: :math:`\\eta_0`, the local SGD step size of round 0.
        fraction: :math:`C \\in (0, 1]`, the fraction of clients taking part in each round.
        local_steps: :math:`E \\geq 1`, local SGD steps per round.
        lr_decay_rounds: :math:`h`; :math:`\\eta_t = \\eta_0 / (1 + t / h)`. ``None``: a fixed step.
        seed: draws the participants (the same on every rank).
        process_group: the clients (default: the whole world).

    Example::

        fedavg = FedAvg(model.parameters(), num_samples=len(my_data), lr=0.5, fraction=0.5,
                        local_steps=5, lr_decay_rounds=20)
        for _ in range(rounds):
            fedavg.round(lambda: loss_fn(model(x_local), y_local))
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        num_samples: int,
        lr: float,
        *,
        fraction: float = 1.0,
        local_steps: int = 1,
        lr_decay_rounds: float | None = None,
        seed: int = 0,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("params must contain at least one tensor that requires grad, got none")
        self.num_samples = check_int("num_samples", num_samples, 1)
        self.lr = check_range("lr", lr, 0.0, low_open=True)
        self.fraction = check_range("fraction", fraction, 0.0, 1.0, low_open=True)
        self.local_steps = check_int("local_steps", local_steps, 1)
        if lr_decay_rounds is not None:
            check_range("lr_decay_rounds", lr_decay_rounds, 0.0, low_open=True)
        self.lr_decay_rounds = lr_decay_rounds
        self.seed = check_int("seed", seed, 0)
        self.process_group = process_group
        self.rank = dist.get_rank(process_group)
        self.num_clients = dist.get_world_size(process_group)
        self.per_round = max(1, round(self.fraction * self.num_clients))
        self.local_optimizer = SGD(self.params, lr=lr)
        self.rounds_done = 0
        self.bytes_communicated = 0
        self._broadcast_initial_model()

    def participants(self, round_index: int) -> list[int]:
        """The clients of round ``round_index``, sorted; the same on every rank."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + check_int("round_index", round_index, 0))
        return sorted(torch.randperm(self.num_clients, generator=generator)[: self.per_round].tolist())

    def lr_at(self, round_index: int) -> float:
        """:math:`\\eta_t` of round ``round_index``."""
        if self.lr_decay_rounds is None:
            return self.lr
        return self.lr / (1.0 + round_index / self.lr_decay_rounds)

    def round(self, local_loss: LocalLoss) -> bool:
        """Run one round (collective: every client calls it); returns whether this client took part.

        A participant calls ``local_loss`` ``local_steps`` times, each followed by backward
        and an SGD step; then every client receives the new global model in ``params``.
        """
        participating = self.rank in self.participants(self.rounds_done)
        if participating:
            for group in self.local_optimizer.param_groups:
                group["lr"] = self.lr_at(self.rounds_done)
            for _ in range(self.local_steps):
                self.local_optimizer.zero_grad(set_to_none=True)
                local_loss().backward()
                self.local_optimizer.step()
        self._average(float(self.num_samples) if participating else 0.0)
        self.rounds_done += 1
        return participating

    @torch.no_grad()
    def _broadcast_initial_model(self) -> None:
        """Every client starts from client 0's :math:`w_0` (the server's initial model)."""
        flat = torch.cat([p.detach().reshape(-1) for p in self.params])
        dist.broadcast(flat, group=self.process_group, group_src=0)
        self.bytes_communicated += flat.numel() * flat.element_size()
        self._assign(flat)

    def _assign(self, flat: Tensor) -> None:
        torch._foreach_copy_(self.params, [v.view_as(p) for v, p in zip(flat.split([p.numel() for p in self.params]),
                                                                        self.params)])

    @torch.no_grad()
    def _average(self, weight: float) -> None:
        flat = torch.cat([p.detach().reshape(-1) for p in self.params])
        message = torch.cat([flat * weight, flat.new_tensor([weight])])
        dist.all_reduce(message, group=self.process_group)
        self.bytes_communicated += message.numel() * message.element_size()
        self._assign(message[:-1] / message[-1])
