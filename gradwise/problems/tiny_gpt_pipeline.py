"""Pipeline parallelism for :class:`~gradwise.problems.tiny_gpt.TinyGPT` on ``torch.distributed.pipelining``.

The ``n_layer`` blocks are cut into ``stages`` equal runs, one per rank: stage 0 also holds
the token and position embeddings, the last stage the final LayerNorm and the output
layer. A batch of ``B`` rows is split into ``m`` micro-batches of ``B / m`` rows that flow
through the stages under GPipe's schedule (all forwards, then all backwards; Huang et al.
2019, arXiv:1811.06965) or 1F1B's (one forward, one backward in the steady state;
Narayanan et al. 2019, PipeDream, arXiv:1806.03377), which holds at most ``stages``
micro-batches' activations instead of ``m``.

Interleaved 1F1B (Narayanan et al. 2021, arXiv:2104.04473, section 2.2.2) cuts the blocks
into ``v p`` chunks for ``p`` ranks instead (``v`` virtual stages per rank): rank ``r`` holds
chunks ``r, r + p, ..., r + (v - 1) p``, so a micro-batch visits every rank ``v`` times and
the ramp-up and ramp-down of the pipeline take ``(p - 1)`` chunk steps of ``1 / v`` of a
stage's work each. The bubble shrinks from ``(p - 1) / (m + p - 1)`` to
``(p - 1) / (v m + p - 1)`` of the step, for ``v`` times the point-to-point messages.
Chunk 0 (the embeddings) is on rank 0 and chunk ``v p - 1`` (the norm and output layer) on
rank ``p - 1``, as without interleaving; the rank's chunks together are a
:class:`TinyGPTChunks`, whose parameter names are still the whole model's.

Each micro-batch's loss is its mean cross-entropy divided by ``m``, so the accumulated
gradient is that of the batch mean:

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
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from gradwise.problems.tiny_gpt import TinyGPT
from gradwise.validation import check_choice, check_int, check_range

if TYPE_CHECKING:
    from torch.distributed.pipelining.schedules import PipelineScheduleMulti, PipelineScheduleSingle
    from torch.distributed.pipelining.stage import _PipelineStageBase

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b")
"""GPipe (Huang et al. 2019), one-forward-one-backward (Narayanan et al. 2019, PipeDream-Flush) and
its interleaved form over virtual stages (Narayanan et al. 2021)."""


def check_schedule(schedule: str, microbatches: int, virtual_stages: int, stages: int | None = None) -> None:
    """Refuse a schedule the pipeline cannot run: ``virtual_stages > 1`` goes with ``interleaved-1f1b``,
    which needs them (as :class:`gradwise.plan.parallelism.Layout` has it), and torch's
    ``ScheduleInterleaved1F1B`` runs the ``m`` micro-batches in ``max(1, m // stages)`` rounds of equal
    size, so ``m`` must be a multiple of that (any ``m <= stages``, or a multiple of ``stages``, is);
    ``stages`` None: only the rules that do not depend on it."""
    check_choice("schedule", schedule, SCHEDULES)
    check_int("microbatches", microbatches, 1)
    check_int("virtual_stages", virtual_stages, 1)
    interleaved = schedule == "interleaved-1f1b"
    if interleaved != (virtual_stages > 1):
        raise ValueError(f"virtual_stages > 1 goes with the interleaved-1f1b schedule and it needs them, got "
                         f"schedule={schedule!r}, virtual_stages={virtual_stages}")
    if stages is None or not interleaved:
        return
    rounds = max(1, microbatches // check_int("stages", stages, 2))
    if microbatches % rounds:
        raise ValueError(f"interleaved-1f1b runs the micro-batches in max(1, microbatches // stages) = {rounds} "
                         f"equal rounds, got microbatches={microbatches} for stages={stages}")


class _TinyGPTPart(nn.Module):
    """What the pipeline asks of a rank's part of TinyGPT: whether it holds the first and the last
    chunk, and its copy of the tied matrix."""

    is_first: bool
    is_last: bool
    token_embedding: nn.Embedding  # on the part that holds the first chunk
    output_weight: nn.Parameter  # on the part that holds the last chunk

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


class TinyGPTStage(_TinyGPTPart):
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_first:
            length = x.shape[1]
            if length > self.seq_len:
                raise ValueError(f"input of {length} bytes is longer than the model's seq_len {self.seq_len}")
            x = self.token_embedding(x) + self.position_embedding(torch.arange(length, device=x.device))
        for block in self.blocks.values():
            x = block(x)
        return self.norm(x) @ self.output_weight.T if self.is_last else x


class TinyGPTChunks(_TinyGPTPart):
    """One rank's chunks (virtual stages) under interleaved 1F1B, as one module for the optimizer, the
    gradient norm and the checkpoints: the chunks' embeddings, blocks, norm and ``output_weight`` under
    the whole model's names (``blocks.0`` and ``blocks.2`` for chunks 0 and 2 of one block each).

    It registers the chunks' own submodules and parameters, taken after any parallelization replaced
    them (tensor parallelism, FSDP2), so it holds the tensors the optimizer must step; the schedule runs
    each chunk's ``forward``, and this module has none.
    """

    def __init__(self, chunks: list[TinyGPTStage]) -> None:
        super().__init__()
        first, last = chunks[0], chunks[-1]
        self.is_first, self.is_last = first.is_first, last.is_last
        if self.is_first:
            self.token_embedding = first.token_embedding
            self.position_embedding = first.position_embedding
        self.blocks = nn.ModuleDict({name: block for chunk in chunks for name, block in chunk.blocks.items()})
        if self.is_last:
            self.norm = last.norm
            self.output_weight = last.output_weight


def _micro_batch_loss(logits: torch.Tensor, targets: torch.Tensor, microbatches: int) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1)) / microbatches


class TinyGPTPipeline:
    """Runs forward and backward of TinyGPT batches over a pipeline of ``stages`` processes.

    Every rank of ``group`` (default: the whole job) builds the same ``model`` (same seed)
    and keeps its part as :attr:`module`: stage ``rank`` (a :class:`TinyGPTStage`), or under
    ``interleaved-1f1b`` its ``virtual_stages`` chunks (a :class:`TinyGPTChunks`); build the
    optimizer on ``pipeline.module.parameters()``. ``parallelize`` splits each stage or chunk
    further (tensor parallel, FSDP2) before the schedule is built. :meth:`step` leaves the
    part's gradients (the tied matrix's already summed over its two copies), so any optimizer
    steps them; gradients accumulate over calls as with ``loss.backward()``. :meth:`grad_norm`
    and :meth:`clip_grad_norm_` see the whole model's gradient; :meth:`evaluate` runs the
    forward passes only.

    Usage::

        pipeline = TinyGPTPipeline(TinyGPT(...), stages=2, microbatches=4, schedule="interleaved-1f1b",
                                   virtual_stages=2)
        optimizer = AdamW(pipeline.module.parameters(), lr=1e-3)
        loss = pipeline.step(inputs, targets); pipeline.clip_grad_norm_(1.0); optimizer.step(); optimizer.zero_grad()
    """

    def __init__(self, model: TinyGPT, stages: int, microbatches: int, schedule: str = "gpipe",
                 group: dist.ProcessGroup | None = None,
                 parallelize: Callable[[TinyGPTStage], nn.Module] | None = None, virtual_stages: int = 1) -> None:
        check_int("stages", stages, 2)
        check_schedule(schedule, microbatches, virtual_stages, stages)
        self.microbatches = microbatches
        world_size = dist.get_world_size(group)
        if world_size != stages:
            raise ValueError(f"stages must equal the pipeline group's world size, got stages={stages} for "
                             f"world size {world_size}")
        n_layer = len(model.blocks)
        chunks = stages * virtual_stages
        if n_layer % chunks:
            factors = "stages" if virtual_stages == 1 else "stages x virtual_stages"
            given = f"stages={stages}" + (f", virtual_stages={virtual_stages}" if virtual_stages > 1 else "")
            raise ValueError(f"n_layer must be a multiple of {factors}, got n_layer={n_layer}, {given}")
        self.group = group
        self.stages = stages
        self.stage_index = dist.get_rank(group)
        self.last_rank = dist.get_global_rank(group, stages - 1) if group is not None else stages - 1
        per_chunk = n_layer // chunks
        indices = range(self.stage_index, chunks, stages)  # rank r's chunks: r, r + p, ...
        parts = [TinyGPTStage(model, index * per_chunk, (index + 1) * per_chunk, index == 0, index == chunks - 1)
                 for index in indices]
        self.device = model.token_embedding.weight.device
        if parallelize is not None:
            for part in parts:
                parallelize(part)
        self.module: TinyGPTStage | TinyGPTChunks = parts[0] if virtual_stages == 1 else TinyGPTChunks(parts)
        self.tied_shape = self._tied_local_shape()
        # imported here: torch.distributed.pipelining costs 0.7 s, which every other strategy would pay
        from torch.distributed.pipelining import (
            PipelineStage,
            Schedule1F1B,
            ScheduleGPipe,
            ScheduleInterleaved1F1B,
        )

        pipeline_stages: list[_PipelineStageBase] = [PipelineStage(part, index, chunks, self.device, group=group)
                           for index, part in zip(indices, parts, strict=True)]
        loss_fn = partial(_micro_batch_loss, microbatches=microbatches)
        self.schedule: PipelineScheduleSingle | PipelineScheduleMulti
        if virtual_stages > 1:
            self.schedule = ScheduleInterleaved1F1B(pipeline_stages, microbatches, scale_grads=False, loss_fn=loss_fn)
        else:
            schedule_class = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
            self.schedule = schedule_class(pipeline_stages[0], microbatches, scale_grads=False, loss_fn=loss_fn)

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
