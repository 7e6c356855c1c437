"""QK-Clip (MuonClip): cap each attention head's largest logit by rescaling its query and key weights.

Kimi K2 (Kimi Team 2025, arXiv:2507.20534, section 2.1) trained a 1T-parameter model with
Muon without a single loss spike by adding, after every optimizer step, for each attention
head :math:`h` whose largest pre-softmax logit in the step's forward passes,
:math:`S^h_{\\max} = \\max_{\\text{batch}, i, j} q^h_i \\cdot k^h_j / \\sqrt{d}`, exceeds a
threshold :math:`\\tau`:

.. math::
    \\gamma_h = \\min(1, \\tau / S^h_{\\max}),\\qquad
    W^h_q \\leftarrow \\sqrt{\\gamma_h}\\, W^h_q,\\qquad W^h_k \\leftarrow \\sqrt{\\gamma_h}\\, W^h_k,

so that the same inputs now give that head logits scaled by :math:`\\gamma_h` (at most
:math:`\\tau`), and heads under the threshold are left alone. Muon's orthogonalised updates
grow the weights' spectral norms faster than AdamW's; the clip bounds the logits where they
would explode, without changing the optimizer's update itself (the paper's motivation for
clipping the weights rather than the logits or the update). The biases of the query and key
projections, where a model has them, are scaled with their weights, so the logits scale by
exactly :math:`\\gamma_h`.

The clip runs after the step and needs the logits of the step's forward passes (over all
micro-batches of an accumulated step), which only the model sees. Hence the protocol
:class:`ReportsAttentionLogits`: an attention module that has a ``logit_observer`` attribute
(``None`` by default) calls it during its forward with its heads' largest logits, and knows
how to scale its own heads' queries and keys (``scale_query_key_``); its layout (fused or
separate projections, grouped-query heads) stays its own business. :class:`QKClip` installs an
observer in every such module of a model and clips after each step of the optimizer it is
attached to (a torch step post-hook, so any optimizer works, Muon first of all).
Forward passes without gradients (evaluations) are not recorded.

Under data parallelism each rank sees part of the batch, so each records its own maxima; with
``process_group`` set, :meth:`QKClip.clip` first takes their maximum over the group (one
all-reduce of every head's logit), so every replica scales its heads by the same factors and the
replicas stay equal. Tensor parallelism (heads split over ranks) is not covered: a rank would
hold only its own heads' logits and rows.

Example::

    clip = QKClip(model, tau=100.0)
    opt = gradwise.optim.Muon(gradwise.optim.muon_param_groups(model), lr=0.02)
    clip.attach(opt)  # every opt.step() is followed by clip.clip()
"""

from __future__ import annotations

from functools import partial
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from gradwise.validation import check_range


@runtime_checkable
class ReportsAttentionLogits(Protocol):
    """What an attention module offers QK-Clip.

    - ``logit_observer``: ``None``, or a callable that the module's ``forward`` calls with a
      detached tensor of shape ``(heads,)``: each head's largest pre-softmax logit (after the
      ``1/sqrt(d)`` scaling and over the positions the mask lets through) in that forward;
    - ``scale_query_key_(factors)``: multiplies head ``h``'s query and key projections (weights
      and biases) by ``sqrt(factors[h])``, in place, so its logits scale by ``factors[h]``.

    Computing the logits costs a second ``q k^T`` product: a module does it only while an
    observer is set.
    """

    logit_observer: Any

    def scale_query_key_(self, factors: Tensor) -> None: ...


class QKClip:
    """Clip the attention logits of every :class:`ReportsAttentionLogits` module of ``model``
    at ``tau`` (Kimi K2's default: 100) after each optimizer step (see the module docstring).

    ``record`` keeps, per module, the largest logit per head seen in training forward passes
    since the last :meth:`clip`; :meth:`clip` rescales the heads above ``tau`` and forgets them
    (:meth:`forget` drops them without clipping: a step that did not update the weights).
    No host synchronisation: the factors are computed and applied as tensors.
    ``process_group``: the data-parallel ranks whose maxima :meth:`clip` combines (see the module
    docstring); ``None`` for one process.
    """

    def __init__(self, model: nn.Module, tau: float = 100.0, process_group: dist.ProcessGroup | None = None) -> None:
        self.tau = check_range("tau", tau, 0.0, low_open=True)
        self.process_group = process_group
        self.modules = [module for module in model.modules() if isinstance(module, ReportsAttentionLogits)]
        if not self.modules:
            raise ValueError(
                f"model: no module of this {type(model).__name__} reports its attention logits (QK-Clip needs "
                "modules with a logit_observer attribute and a scale_query_key_ method: see ReportsAttentionLogits)"
            )
        self.max_logits: dict[int, Tensor] = {}
        """Per module (by index in :attr:`modules`): the largest logit per head since the last clip."""
        for index, module in enumerate(self.modules):
            module.logit_observer = partial(self.record, index)

    def record(self, index: int, max_logits: Tensor) -> None:
        """Take module ``index``'s heads' largest logits from a forward (ignored without grad)."""
        if not torch.is_grad_enabled():
            return
        max_logits = max_logits.detach().float()
        seen = self.max_logits.get(index)
        self.max_logits[index] = max_logits if seen is None else torch.maximum(seen, max_logits)

    @torch.no_grad()
    def clip(self) -> None:
        """Scale the query and key weights of each head whose recorded logit exceeds ``tau``
        (over every rank of ``process_group``, when set)."""
        if self.process_group is not None:
            self.combine_ranks()
        for index, max_logits in self.max_logits.items():
            factors = (self.tau / max_logits.clamp(min=self.tau)).nan_to_num(nan=1.0)
            self.modules[index].scale_query_key_(factors)
        self.forget()

    def combine_ranks(self) -> None:
        """Every recorded maximum replaced by its maximum over ``process_group``: one all-reduce of
        all heads' logits together (every rank records the same modules: the same forward passes)."""
        indices = sorted(self.max_logits)
        if not indices:
            return
        flat = torch.cat([self.max_logits[index] for index in indices])
        dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=self.process_group)
        for index, part in zip(indices, flat.split([self.max_logits[index].numel() for index in indices])):
            self.max_logits[index] = part

    def forget(self) -> None:
        """Drop the recorded logits without clipping."""
        self.max_logits.clear()

    def attach(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Run :meth:`clip` after every ``optimizer.step()``; returns the hook's handle."""
        return optimizer.register_step_post_hook(lambda *_: self.clip())

    def remove(self) -> None:
        """Stop observing: the modules' ``logit_observer`` back to ``None``."""
        for module in self.modules:
            module.logit_observer = None
        self.forget()
