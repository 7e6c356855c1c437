"""Pipeline parallelism for :class:`~gradwise.problems.tiny_gpt.TinyGPT` on ``torch.distributed.pipelining``.

The ``n_layer`` blocks are cut into ``stages`` equal runs, one per rank: stage 0 also holds
the token and position embeddings, the last stage the final LayerNorm and the output
layer. A batch of ``B`` rows is split into ``m`` micro-batches of ``B / m`` rows that flow
through the stages under GPipe's schedule (all forwards, then all backwards; Huang et al.
2019, arXiv:1811.06965) or 1F1B's (one forward, one backward in the steady state;
Narayanan et al. 2019, PipeDream, arXiv:1806.03377), which holds at most ``stages``
micro-batches' activations instead of ``m``. Each micro-batch's loss is its mean
cross-entropy divided by ``m``, so the accumulated gradient is that of the batch mean:

    grad (1 / B) sum_i l_i = sum_{j=1..m} grad (1 / m) (m / B) sum_{i in micro-batch j} l_i.

The output layer is tied to the token embedding (Press & Wolf 2017): the first and the last
stage each hold a copy ``E`` and, as in Megatron-LM, their gradients are summed after the
backward pass (an all-reduce over the pipeline group, the middle stages adding zeros),

    grad_E L = grad_E L |_embedding + grad_E L |_output layer,

which is the single-process gradient of the shared matrix; with identical copies, updates
and optimizer states the two copies stay equal.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from gradwise.problems.tiny_gpt import TinyGPT
from gradwise.validation import check_choice, check_int, check_range

SCHEDULES = ("gpipe", "1f1b")
"""GPipe (Huang et al. 2019) and one-forward-one-backward (Narayanan et al. 2019, PipeDream-Flush)."""


class TinyGPTStage(nn.Module):
    """Blocks ``first_block .. last_block - 1`` of a TinyGPT, with the embeddings on the first stage and
    the final norm and a copy of the tied output layer (``output_weight``) on the last.

    Submodules keep TinyGPT's names (``blocks.3`` is block 3 of the whole model), so a
    stage's ``state_dict`` keys are those of the model's it holds.
    """

    def __init__(self, model: TinyGPT, first_block: int, last_block: int, is_first: bool, is_last: bool) -> None:
        super().__init__()
        self.is_first, self.is_last = is_first, is_last
        self.seq_len = model.seq_len
        if is_first:
            self.token_embedding = model.token_embedding
            self.position_embedding = model.position_embedding
        self.blocks = nn.ModuleDict({str(index): model.blocks[index] for index in range(first_block, last_block)})
        if is_last:
            self.norm = model.norm
            self.output_weight = nn.Parameter(model.token_embedding.weight.detach().clone())

    def get_output_embeddings(self) -> nn.Module | None:
        """The last stage's copy of the tied output layer as a module (Hugging Face's name for a model's
        head), so that an optimizer that treats the head apart finds it as it finds the whole model's
        (Muon's internal AdamW: there the head is the token embedding); ``None`` on the other stages."""
        if not self.is_last:
            return None
        head = nn.Module()
        head.weight = self.output_weight  # registered in this throwaway module only; the stage keeps its names
        return head

    def tied_weight(self) -> torch.Tensor | None:
        """This stage's copy of the token-embedding / output matrix (``None`` on a middle stage)."""
        if self.is_first:
            return self.token_embedding.weight
        return self.output_weight if self.is_last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_first:
            length = x.shape[1]
            if length > self.seq_len:
                raise ValueError(f"input of {length} bytes is longer than the model's seq_len {self.seq_len}")
            x = self.token_embedding(x) + self.position_embedding(torch.arange(length, device=x.device))
        for block in self.blocks.values():
            x = block(x)
        return self.norm(x) @ self.output_weight.T if self.is_last else x


def _micro_batch_loss(logits: torch.Tensor, targets: torch.Tensor, microbatches: int) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1)) / microbatches


class TinyGPTPipeline:
    """Runs forward and backward of TinyGPT batches over a pipeline of ``stages`` processes.

    Every rank of ``group`` (default: the whole job) builds the same ``model`` (same seed)
    and keeps stage ``rank``'s part as :attr:`module`; build the optimizer on
    ``pipeline.module.parameters()``. :meth:`step` leaves each stage's gradients (the tied
    matrix's already summed over its two copies), so any optimizer steps them; gradients
    accumulate over calls as with ``loss.backward()``. :meth:`grad_norm` and
    :meth:`clip_grad_norm_` see the whole model's gradient; :meth:`evaluate` runs the
    forward passes only.

    Usage::

        pipeline = TinyGPTPipeline(TinyGPT(...), stages=2, microbatches=4)
        optimizer = AdamW(pipeline.module.parameters(), lr=1e-3)
        loss = pipeline.step(inputs, targets); pipeline.clip_grad_norm_(1.0); optimizer.step(); optimizer.zero_grad()
    """

    def __init__(self, model: TinyGPT, stages: int, microbatches: int, schedule: str = "gpipe",
                 group: dist.ProcessGroup | None = None,
                 parallelize: Callable[[TinyGPTStage], nn.Module] | None = None) -> None:
        check_int("stages", stages, 2)
        self.microbatches = check_int("microbatches", microbatches, 1)
        check_choice("schedule", schedule, SCHEDULES)
        world_size = dist.get_world_size(group)
        if world_size != stages:
            raise ValueError(f"stages must equal the pipeline group's world size, got stages={stages} for "
                             f"world size {world_size}")
        n_layer = len(model.blocks)
        if n_layer % stages:
            raise ValueError(f"n_layer must be a multiple of stages, got n_layer={n_layer}, stages={stages}")
        self.group = group
        self.stages = stages
        self.stage_index = dist.get_rank(group)
        self.last_rank = dist.get_global_rank(group, stages - 1) if group is not None else stages - 1
        per_stage = n_layer // stages
        self.module = TinyGPTStage(model, self.stage_index * per_stage, (self.stage_index + 1) * per_stage,
                                   self.stage_index == 0, self.stage_index == stages - 1)
        self.device = model.token_embedding.weight.device
        if parallelize is not None:
            parallelize(self.module)
        self.tied_shape = self._tied_local_shape()
        # imported here: torch.distributed.pipelining costs 0.7 s, which every other strategy would pay
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        stage = PipelineStage(self.module, self.stage_index, stages, self.device, group=group)
        schedule_class = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
        self.schedule = schedule_class(stage, microbatches, scale_grads=False,
                                       loss_fn=partial(_micro_batch_loss, microbatches=microbatches))

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """Forward and backward of one batch (every rank passes the same batch); returns its mean loss
        on every rank."""
        self._check_rows(inputs)
        tied = self.module.tied_weight()
        earlier = None
        if tied is not None:
            earlier, tied.grad = tied.grad, None
        loss = self._run(self.schedule.step, inputs, targets)
        self._sum_tied_gradients(tied, earlier)
        return loss

    @torch.no_grad()
    def evaluate(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """The mean loss of one batch, forward passes only (for validation); on every rank."""
        self._check_rows(inputs)
        return self._run(self.schedule.eval, inputs, targets)

    def _check_rows(self, inputs: torch.Tensor) -> None:
        rows = inputs.shape[0]
        if rows % self.microbatches:
            raise ValueError(f"the batch of {rows} rows does not split into microbatches={self.microbatches}")

    def _run(self, run: Callable[..., Any], inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """Feed the batch to this stage's end of the schedule; the last stage's loss, broadcast."""
        losses: list[torch.Tensor] = []
        if self.module.is_first:
            run(inputs.to(self.device), return_outputs=False)
        elif self.module.is_last:
            run(target=targets.to(self.device), losses=losses, return_outputs=False)
        else:
            run(return_outputs=False)
        loss = torch.stack(losses).sum().detach() if losses else torch.zeros((), device=self.device)
        dist.broadcast(loss, src=self.last_rank, group=self.group)
        return loss.item()

    @torch.no_grad()
    def grad_norm(self) -> float:
        """The 2-norm of the whole model's gradient (every stage's, the tied matrix counted once), on every rank."""
        grads = [p.grad for name, p in self.module.named_parameters() if p.grad is not None and name != "output_weight"]
        square = torch.stack([grad.float().square().sum() for grad in grads]).sum() if grads else \
            torch.zeros((), device=self.device)
        dist.all_reduce(square, group=self.group)
        return square.sqrt().item()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> float:
        """Scale every stage's gradient by ``min(1, max_norm / (norm + 1e-6))``, as
        ``torch.nn.utils.clip_grad_norm_`` does on one process; returns the norm before clipping."""
        check_range("max_norm", max_norm, 0.0, low_open=True)
        norm = self.grad_norm()
        factor = max_norm / (norm + 1e-6)
        if factor < 1:
            for param in self.module.parameters():
                if param.grad is not None:
                    param.grad.mul_(factor)
        return norm

    def _tied_local_shape(self) -> torch.Size:
        """The shape of this process's part of the tied matrix: the whole matrix, or its local shard when
        ``parallelize`` made it a DTensor; a middle stage, which holds none, learns it from the two ends
        (one all-reduce, at construction)."""
        tied = self.module.tied_weight()
        shape = torch.zeros(2, dtype=torch.int64, device=self.device)
        if self.module.is_first and tied is not None:
            shape += torch.tensor(_local(tied).shape, device=self.device)
        dist.all_reduce(shape, group=self.group)
        return torch.Size(shape.tolist())

    @torch.no_grad()
    def _sum_tied_gradients(self, tied: torch.Tensor | None, earlier: torch.Tensor | None) -> None:
        """All-reduce this step's gradient of the tied matrix over the pipeline (middle stages add zeros;
        a sharded matrix's local shards, which the two ends hold alike), then add back what had
        accumulated before the step."""
        grad = tied.grad if tied is not None else torch.zeros(self.tied_shape, device=self.device)
        if grad is None:
            raise RuntimeError("the tied token-embedding matrix has no gradient after the backward pass")
        dist.all_reduce(_local(grad), group=self.group)
        if earlier is not None:
            grad += earlier


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (the tensor itself otherwise)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
