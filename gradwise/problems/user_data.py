"""Workloads on the user's own files: ``text`` (a byte-level language model) and ``npy`` (a classifier).

* ``text``: one text file (any bytes); the last tenth is the validation split. The model
  and the target are those of ``tiny-gpt`` (validation loss at most 0.6x the unigram
  baseline of the same split).
* ``npy``: an inputs file ``X.npy`` (``n x d`` numbers) and a labels file ``y.npy``
  (``n`` integers ``0..C-1``). Rows are shuffled once with a fixed seed and the last fifth
  validates. The model is a ReLU MLP; the target is an accuracy halfway between the
  majority class's and 1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from gradwise.problems.corpus import ByteCorpus
from gradwise.problems.mlp import classifier, majority_accuracy
from gradwise.problems.tiny_gpt import byte_language_model
from gradwise.problems.workload import Target, Workload
from gradwise.validation import check_int

VALIDATION_FRACTION_TEXT = 0.1
VALIDATION_FRACTION_ROWS = 0.2
SHUFFLE_SEED = 1234


def _single_path(paths: list[str], name: str, expected: str) -> list[Path]:
    if not paths:
        raise ValueError(f"workload {name!r} needs data: {expected}")
    files = [Path(path) for path in paths]
    for file in files:
        if not file.is_file():
            raise ValueError(f"data file {str(file)!r} does not exist")
    return files


def text_file(batch_size: int, seed: int = 0, data: list[str] | None = None, seq_len: int = 128,
              d_model: int = 128, n_layer: int = 6, n_head: int = 4, eval_windows: int = 128,
              final_eval_windows: int | None = None) -> Workload:
    """The ``text`` workload: a :class:`~gradwise.problems.tiny_gpt.TinyGPT` on one text file."""
    files = _single_path(data or [], "text", "one text file")
    if len(files) != 1:
        raise ValueError(f"workload 'text' takes one text file, got {len(files)}")
    tokens = torch.frombuffer(bytearray(files[0].read_bytes()), dtype=torch.uint8)
    split = int(tokens.numel() * (1 - VALIDATION_FRACTION_TEXT))
    if tokens.numel() - split < seq_len + 2:
        raise ValueError(
            f"{str(files[0])!r} has {tokens.numel()} bytes: its last tenth must hold more than seq_len + 1 = "
            f"{seq_len + 1} bytes (choose a smaller seq_len or a longer file)"
        )
    corpus = ByteCorpus(tokens[:split], tokens[split:],
                        f"{files[0]}: {split:,} training bytes, {tokens.numel() - split:,} validation bytes")
    return byte_language_model("text", corpus, batch_size, seed, seq_len, d_model, n_layer, n_head, eval_windows,
                               final_eval_windows)


def npy_pair(batch_size: int, seed: int = 0, data: list[str] | None = None, hidden: int = 128,
             depth: int = 2) -> Workload:
    """The ``npy`` workload: a ReLU MLP on ``X.npy`` (inputs) and ``y.npy`` (integer labels)."""
    files = _single_path(data or [], "npy", "an inputs .npy and a labels .npy")
    if len(files) != 2:
        raise ValueError(f"workload 'npy' takes two files (inputs, labels), got {len(files)}")
    check_int("hidden", hidden, 1)
    check_int("depth", depth, 0)
    try:
        x_array, y_array = (np.load(file, allow_pickle=False) for file in files)
    except ValueError as error:
        raise ValueError(f"cannot read the .npy files: {error}") from None
    if x_array.ndim != 2 or not np.issubdtype(x_array.dtype, np.number):
        raise ValueError(f"inputs must be an n x d array of numbers, got shape {x_array.shape}, dtype {x_array.dtype}")
    if y_array.ndim != 1 or not np.issubdtype(y_array.dtype, np.integer) or (y_array.size and y_array.min() < 0):
        raise ValueError(f"labels must be a vector of integers >= 0, got shape {y_array.shape}, dtype {y_array.dtype}")
    if x_array.shape[0] != y_array.shape[0]:
        raise ValueError(f"inputs have {x_array.shape[0]} rows but labels {y_array.shape[0]}")
    order = torch.randperm(x_array.shape[0], generator=torch.Generator().manual_seed(SHUFFLE_SEED))
    inputs = torch.from_numpy(x_array.astype(np.float32))[order]
    labels = torch.from_numpy(y_array.astype(np.int64))[order]
    classes = int(labels.max()) + 1
    train_count = int(round(inputs.shape[0] * (1 - VALIDATION_FRACTION_ROWS)))
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width = inputs.shape[1]
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    baseline = majority_accuracy(labels[train_count:])
    return classifier(
        "npy", nn.Sequential(*layers, nn.Linear(width, classes)), inputs, labels, train_count, batch_size, seed,
        Target("val_accuracy", (1 + baseline) / 2, True, baseline, "majority-class accuracy"),
        f"{files[0]} ({inputs.shape[0]} x {inputs.shape[1]}), {files[1]} ({classes} classes); "
        f"ReLU MLP {depth} x {hidden}",
        dict(hidden=hidden, depth=depth),
    )
