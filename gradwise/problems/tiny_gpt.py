"""``tiny-gpt``: a small decoder-only transformer that models bytes of Python source.

The model is GPT-2's block (Radford et al. 2019) at a small size: learned token and
position embeddings, ``n_layer`` pre-norm blocks of causal multi-head self-attention and a
4x GELU MLP, a final LayerNorm and an output layer tied to the token embedding
(Press & Wolf 2017, arXiv:1608.05859). Residual output projections start with standard
deviation ``0.02 / sqrt(2 n_layer)`` as in GPT-2. Attention runs through
``torch.nn.functional.scaled_dot_product_attention``.

The loss is the mean next-byte cross-entropy in nats per byte; the target is a validation
loss at most ``TARGET_FRACTION`` of the unigram baseline on the same split.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from gradwise.problems.corpus import ByteCorpus, stdlib_corpus
from gradwise.problems.data import Batch, RandomWindows
from gradwise.problems.workload import Target, Workload
from gradwise.validation import check_int

VOCAB_SIZE = 256
TARGET_FRACTION = 0.6
"""The validation loss to reach, as a fraction of the unigram baseline's."""


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, n_layer: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.head_dim = d_model // n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        nn.init.normal_(self.proj.weight, std=0.02 / math.sqrt(2 * n_layer))
        self.logit_observer: Callable[[torch.Tensor], None] | None = None
        """Called with each head's largest attention logit when set (QK-Clip's protocol,
        :class:`gradwise.optim.qk_clip.ReportsAttentionLogits`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        # Widths come from qkv's output: under tensor parallelism it holds only this rank's heads.
        q, k, v = self.qkv(x).chunk(3, dim=2)
        heads = q.shape[2] // self.head_dim
        q, k, v = (t.view(batch, length, heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if self.logit_observer is not None:
            self.logit_observer(self.max_logits(q, k))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, length, heads * self.head_dim))

    @torch.no_grad()
    def max_logits(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Each head's largest logit ``q_i . k_j / sqrt(head_dim)`` over the batch and the
        causal pairs ``j <= i`` (what softmax sees inside scaled_dot_product_attention), in fp32."""
        logits = q.float() @ k.float().transpose(-2, -1) / math.sqrt(self.head_dim)
        length = q.shape[2]
        causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        return logits.masked_fill(~causal, -math.inf).amax(dim=(0, 2, 3))

    @torch.no_grad()
    def scale_query_key_(self, factors: torch.Tensor) -> None:
        """Scale head ``h``'s logits by ``factors[h]``: its query and key rows of ``qkv`` (weight
        and bias) by ``sqrt(factors[h])`` (QK-Clip's protocol)."""
        heads = factors.shape[0]
        roots = factors.sqrt().to(self.qkv.weight.dtype)
        self.qkv.weight.view(3, heads, self.head_dim, -1)[:2].mul_(roots.view(1, heads, 1, 1))
        self.qkv.bias.view(3, heads, self.head_dim)[:2].mul_(roots.view(1, heads, 1))


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int, n_layer: int) -> None:
        super().__init__()
        self.norm_attention = nn.LayerNorm(d_model)
        self.attention = CausalSelfAttention(d_model, n_head, n_layer)
        self.norm_mlp = nn.LayerNorm(d_model)
        expand, contract = nn.Linear(d_model, 4 * d_model), nn.Linear(4 * d_model, d_model)
        self.mlp = nn.Sequential(expand, nn.GELU(), contract)
        nn.init.normal_(contract.weight, std=0.02 / math.sqrt(2 * n_layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm_attention(x))
        return x + self.mlp(self.norm_mlp(x))


class TinyGPT(nn.Module):
    """A byte-level decoder-only transformer: ``(batch, length)`` bytes -> ``(batch, length, 256)`` logits."""

    def __init__(self, seq_len: int = 128, d_model: int = 128, n_layer: int = 6, n_head: int = 4) -> None:
        super().__init__()
        check_int("seq_len", seq_len, 1)
        check_int("d_model", d_model, 1)
        check_int("n_layer", n_layer, 1)
        check_int("n_head", n_head, 1)
        if d_model % n_head:
            raise ValueError(f"d_model must be a multiple of n_head, got d_model={d_model}, n_head={n_head}")
        self.seq_len = seq_len
        self.token_embedding = nn.Embedding(VOCAB_SIZE, d_model)
        self.position_embedding = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_head, n_layer) for _ in range(n_layer))
        self.norm = nn.LayerNorm(d_model)
        for module in self.modules():
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            elif isinstance(module, nn.Linear):
                if module not in (*(block.attention.proj for block in self.transformer_blocks()),
                                  *(block.mlp[2] for block in self.transformer_blocks())):
                    nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def transformer_blocks(self) -> list[Block]:
        """The blocks, typed as such (an ``nn.ModuleList`` hands a type checker plain ``nn.Module``s)."""
        return [cast(Block, block) for block in self.blocks]  # __init__ fills self.blocks with Blocks only

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        if length > self.seq_len:
            raise ValueError(f"input of {length} bytes is longer than the model's seq_len {self.seq_len}")
        positions = torch.arange(length, device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.token_embedding.weight.T  # tied output layer


def next_byte_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy of the next byte, in nats per byte."""
    inputs, targets = batch
    logits = model(inputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


@torch.no_grad()
def validation_loss(model: nn.Module, tokens: torch.Tensor, seq_len: int, max_windows: int | None,
                    batch_size: int = 64) -> float:
    """Mean next-byte loss (nats/byte) over non-overlapping windows of the validation bytes.

    Every byte after the first of each window is predicted once, from the bytes before it
    in its window. ``max_windows`` evenly spaced windows give a quick estimate; ``None``
    covers the whole split.
    """
    count = (tokens.numel() - 1) // seq_len
    starts = torch.arange(count) * seq_len
    if max_windows is not None and max_windows < count:
        starts = starts[torch.linspace(0, count - 1, max_windows).long()]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, predicted = 0.0, 0
    offsets = torch.arange(seq_len + 1)
    for chunk in starts.split(batch_size):
        windows = tokens[chunk[:, None] + offsets].long().to(device)
        logits = model(windows[:, :-1]).float()
        total += F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), windows[:, 1:].reshape(-1), reduction="sum").item()
        predicted += windows[:, 1:].numel()
    model.train(was_training)
    return total / predicted


def byte_language_model(
    name: str,
    corpus: ByteCorpus,
    batch_size: int,
    seed: int,
    seq_len: int,
    d_model: int,
    n_layer: int,
    n_head: int,
    eval_windows: int,
    final_eval_windows: int | None,
) -> Workload:
    """A :class:`TinyGPT` on ``corpus``, with the unigram baseline and the 0.6x target.

    Evaluations during training use ``eval_windows`` evenly spaced validation windows; the
    final one ``final_eval_windows`` (``None``: the whole validation split).
    """
    check_int("eval_windows", eval_windows, 1)
    if final_eval_windows is not None:
        check_int("final_eval_windows", final_eval_windows, 1)
    torch.manual_seed(seed)
    model = TinyGPT(seq_len, d_model, n_layer, n_head)
    baseline = corpus.unigram_baseline()
    parameters = sum(p.numel() for p in model.parameters())

    def evaluate(model: nn.Module, full: bool) -> dict[str, float]:
        windows = final_eval_windows if full else eval_windows
        return {"val_loss": validation_loss(model, corpus.validation, seq_len, windows)}

    return Workload(
        name=name,
        model=model,
        train_data=RandomWindows(corpus.train, batch_size, seq_len, seed),
        loss=next_byte_loss,
        evaluate=evaluate,
        target=Target("val_loss", TARGET_FRACTION * baseline, False, baseline, "unigram baseline (nats/byte)"),
        unit="tokens",
        eval_metrics=("val_loss",),
        description=f"{corpus.description}; {parameters:,}-parameter byte-level transformer "
        f"({n_layer} layers, width {d_model}, {n_head} heads, context {seq_len})",
        options=dict(seq_len=seq_len, d_model=d_model, n_layer=n_layer, n_head=n_head, eval_windows=eval_windows,
                     final_eval_windows=final_eval_windows),
    )


def tiny_gpt(batch_size: int, seed: int = 0, seq_len: int = 128, d_model: int = 128, n_layer: int = 6,
             n_head: int = 4, eval_windows: int = 128, final_eval_windows: int | None = None) -> Workload:
    """The ``tiny-gpt`` workload: :class:`TinyGPT` on the standard-library corpus."""
    return byte_language_model("tiny-gpt", stdlib_corpus(), batch_size, seed, seq_len, d_model, n_layer, n_head,
                               eval_windows, final_eval_windows)
