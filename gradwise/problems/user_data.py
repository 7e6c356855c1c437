"""Workloads on the user's own files: ``text`` (a byte-level language model) and ``npy`` (a classifier).

* ``text``: one text file (any bytes); the last tenth is the validation split. The model
  and the target are those of ``tiny-gpt`` (validation loss at most 0.6x the unigram
  baseline of the same split).
* ``npy``: an inputs file ``X.npy`` (``n x d`` numbers) and a labels file ``y.npy``
  (``n`` integers ``0..C-1``). Rows are shuffled once with a fixed seed and the last fifth
  validates. The model is a ReLU MLP; the target is an accuracy halfway between the
  majority class's and 1.

The files are checked once, here, at load, so that a bad file is one line naming the file,
the row and what is wrong, before any training: a regular file of at most
:data:`~gradwise.user_files.MAX_DATA_BYTES`; for ``npy`` a real ``.npy`` (not ``.npz``, no
pickled objects), real finite numbers that fit in float32, integer labels ``0..C-1`` with
``C <= MAX_CLASSES``, and rows enough for both splits. Non-finite inputs would otherwise be
found only by the divergence guards, several rollbacks later.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from gradwise.problems.corpus import ByteCorpus
from gradwise.problems.mlp import classifier, majority_accuracy, relu_mlp
from gradwise.problems.tiny_gpt import byte_language_model
from gradwise.problems.workload import Target, Workload
from gradwise.user_files import MAX_DATA_BYTES, check_user_file, read_user_file
from gradwise.validation import check_int

VALIDATION_FRACTION_TEXT = 0.1
VALIDATION_FRACTION_ROWS = 0.2
SHUFFLE_SEED = 1234
MAX_CLASSES = 10_000
"""Labels are class indices and the model has one output per class: a label of 1e7 would build a
1e7-way classifier. More than this many classes is far more likely a regression target or an id
column than a classification, so it is refused rather than built."""
FLOAT32_MAX = float(np.finfo(np.float32).max)


def _single_path(paths: list[str], name: str, expected: str) -> list[Path]:
    if not paths:
        raise ValueError(f"workload {name!r} needs data: {expected}")
    return [check_user_file(path, "data file") for path in paths]


def _load_npy(path: Path) -> np.ndarray:
    """The array in the ``.npy`` file ``path``, read without unpickling anything."""
    data = read_user_file(path, "data file", MAX_DATA_BYTES)
    if data.startswith(b"PK"):
        raise ValueError(f"{str(path)!r} is an .npz archive: save each array with numpy.save as its own .npy file")
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except MemoryError:  # a header that claims more than the file holds
        raise ValueError(f"{str(path)!r} is not a valid .npy file: its header claims more data than it holds") from None
    except (ValueError, EOFError, OSError) as error:
        raise ValueError(f"{str(path)!r} is not a valid .npy file: {error}") from None
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{str(path)!r} is not a single .npy array")
    return array


def _first_bad_row(mask: np.ndarray) -> int:
    """The first row (0-based) where ``mask`` (rows x ...) is true."""
    return int(np.argwhere(mask.reshape(mask.shape[0], -1).any(axis=1))[0, 0])


def check_inputs(x_array: np.ndarray, path: Path) -> np.ndarray:
    """``x_array`` (an ``n x d`` array of real numbers, finite in float32) as float32."""
    where = str(path)
    if x_array.ndim != 2:
        raise ValueError(f"{where!r}: inputs must be an n x d array, got shape {x_array.shape}")
    if np.iscomplexobj(x_array):
        raise ValueError(f"{where!r}: inputs are complex ({x_array.dtype}); give real numbers (e.g. real and "
                         f"imaginary parts as two columns)")
    if x_array.dtype == np.bool_ or not np.issubdtype(x_array.dtype, np.number):
        raise ValueError(f"{where!r}: inputs must be numbers, got dtype {x_array.dtype}")
    if x_array.shape[0] == 0 or x_array.shape[1] == 0:
        raise ValueError(f"{where!r}: inputs are empty (shape {x_array.shape})")
    finite = np.isfinite(x_array)
    if not finite.all():
        row = _first_bad_row(~finite)
        raise ValueError(f"{where!r} row {row}: {x_array[row][~finite[row]][0]} is not a finite number")
    too_large = np.abs(x_array) > FLOAT32_MAX
    if too_large.any():
        row = _first_bad_row(too_large)
        raise ValueError(f"{where!r} row {row}: {x_array[row][too_large[row]][0]} is beyond float32's range "
                         f"(+-{FLOAT32_MAX:.4g})")
    return x_array.astype(np.float32)


def check_labels(y_array: np.ndarray, path: Path) -> np.ndarray:
    """``y_array`` (a vector of integer class indices ``0..C-1``, ``C <= MAX_CLASSES``) as int64."""
    where = str(path)
    if y_array.ndim != 1 or y_array.dtype == np.bool_ or not np.issubdtype(y_array.dtype, np.integer):
        raise ValueError(f"{where!r}: labels must be a vector of integers, got shape {y_array.shape}, "
                         f"dtype {y_array.dtype}")
    if y_array.size == 0:
        raise ValueError(f"{where!r}: labels are empty")
    too_large = f"is not a class index 0..{MAX_CLASSES - 1} (gradwise classifies at most {MAX_CLASSES} classes)"
    for bad, what in ((y_array < 0, "is negative"), (y_array >= MAX_CLASSES, too_large)):
        if bad.any():
            row = int(np.argmax(bad))
            raise ValueError(f"{where!r} row {row}: label {y_array[row]} {what}")
    return y_array.astype(np.int64)


def _enough_rows(rows: int, where: str) -> int:
    """The training rows of ``rows``; both splits must hold at least one row."""
    train_count = int(round(rows * (1 - VALIDATION_FRACTION_ROWS)))
    if not 1 <= train_count < rows:
        needed = next(n for n in range(2, 100) if 1 <= round(n * (1 - VALIDATION_FRACTION_ROWS)) < n)
        raise ValueError(f"{where!r} has {rows} row{'s' * (rows != 1)}: at least {needed} are needed, "
                         f"for the training rows and the last fifth that validates")
    return train_count


def text_file(batch_size: int, seed: int = 0, data: list[str] | None = None, seq_len: int = 128,
              d_model: int = 128, n_layer: int = 6, n_head: int = 4, eval_windows: int = 128,
              final_eval_windows: int | None = None) -> Workload:
    """The ``text`` workload: a :class:`~gradwise.problems.tiny_gpt.TinyGPT` on one text file."""
    files = _single_path(data or [], "text", "one text file")
    if len(files) != 1:
        raise ValueError(f"workload 'text' takes one text file, got {len(files)}")
    raw = read_user_file(files[0], "data file", MAX_DATA_BYTES)
    if not raw:
        raise ValueError(f"data file {str(files[0])!r} is empty")
    tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
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
    x_array = check_inputs(_load_npy(files[0]), files[0])
    y_array = check_labels(_load_npy(files[1]), files[1])
    if x_array.shape[0] != y_array.shape[0]:
        raise ValueError(f"inputs have {x_array.shape[0]} rows but labels {y_array.shape[0]} "
                         f"({str(files[0])!r}, {str(files[1])!r})")
    train_count = _enough_rows(x_array.shape[0], str(files[0]))
    order = torch.randperm(x_array.shape[0], generator=torch.Generator().manual_seed(SHUFFLE_SEED))
    inputs = torch.from_numpy(x_array)[order]
    labels = torch.from_numpy(y_array)[order]
    classes = int(labels.max()) + 1
    torch.manual_seed(seed)
    model = relu_mlp(inputs.shape[1], hidden, depth, classes)
    baseline = majority_accuracy(labels[train_count:])
    return classifier(
        "npy", model, inputs, labels, train_count, batch_size, seed,
        Target("val_accuracy", (1 + baseline) / 2, True, baseline, "majority-class accuracy"),
        f"{files[0]} ({inputs.shape[0]} x {inputs.shape[1]}), {files[1]} ({classes} classes); "
        f"ReLU MLP {depth} x {hidden}",
        dict(hidden=hidden, depth=depth),
    )
