"""A byte-level text corpus built from the Python standard library's own source files.

Every machine with Python has these files, so the corpus needs no download. The files are
found at run time under ``sysconfig.get_paths()["stdlib"]``: every ``.py`` file except
tests (``test``/``tests``/``idle_test`` folders, ``test_*.py`` files) and installed
packages (``site-packages``, ``dist-packages``). Paths are sorted, and each file goes to
the validation split when the SHA-256 of its relative path, as a number, is divisible by
``VALIDATION_MODULUS``: the split depends on the file's name only, never on the order or
the number of files, so one Python version gives the same corpus everywhere.

About 13 MB of text for CPython 3.11; its byte unigram entropy is about 3.24 nats/byte.
"""

from __future__ import annotations

import hashlib
import math
import os
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

VALIDATION_MODULUS = 10
"""About one file in ten goes to the validation split."""

EXCLUDED_FOLDERS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})

FILE_SEPARATOR = b"\n\n"


def stdlib_source_files(root: Path | None = None) -> list[Path]:
    """The standard library's ``.py`` files under ``root`` (default: this Python's), sorted, tests excluded."""
    root = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    files = []
    # An excluded folder is pruned from the walk rather than walked and filtered: an interpreter's
    # site-packages under the stdlib can hold ten times the stdlib's own files. Symbolic links to
    # folders are not followed (as ``Path.rglob`` does not).
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in EXCLUDED_FOLDERS]
        for name in names:
            path = Path(folder, name)
            if name.endswith(".py") and not name.startswith("test_") and path.is_file():
                files.append(path)
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


def is_validation_file(relative_path: str) -> bool:
    """Whether the file at ``relative_path`` (posix, relative to the stdlib root) is in the validation split."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest, "big") % VALIDATION_MODULUS == 0


@dataclass(frozen=True)
class ByteCorpus:
    """Training and validation bytes as ``uint8`` tensors, with where they came from."""

    train: torch.Tensor
    validation: torch.Tensor
    description: str

    def unigram_baseline(self) -> float:
        """Cross-entropy (nats/byte) of the validation bytes under the training bytes' unigram frequencies.

        The best a model that ignores context can do: ``-mean_i log q(x_i)`` with ``q`` the
        byte frequencies of the training split, add-one smoothed so that a byte unseen in
        training has a finite cost.
        """
        return unigram_cross_entropy(self.train, self.validation)


def unigram_cross_entropy(train: torch.Tensor, evaluation: torch.Tensor) -> float:
    """``-mean log q(x)`` over ``evaluation``, ``q`` the add-one smoothed byte frequencies of ``train``."""
    counts = torch.bincount(train.long(), minlength=256).double() + 1.0
    log_q = counts.log() - math.log(counts.sum().item())
    evaluation_counts = torch.bincount(evaluation.long(), minlength=256).double()
    return float(-(evaluation_counts * log_q).sum() / evaluation_counts.sum())


@lru_cache(maxsize=2)
def stdlib_corpus(root: str | None = None) -> ByteCorpus:
    """The standard-library corpus, split by file name (see the module docstring)."""
    root_path = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    train_parts: list[bytes] = []
    validation_parts: list[bytes] = []
    files = stdlib_source_files(root_path)
    for path in files:
        relative = path.relative_to(root_path).as_posix()
        (validation_parts if is_validation_file(relative) else train_parts).append(path.read_bytes())
    if not train_parts or not validation_parts:
        raise ValueError(f"no standard-library sources to build a corpus from under {str(root_path)!r}")
    train = torch.frombuffer(bytearray(FILE_SEPARATOR.join(train_parts)), dtype=torch.uint8)
    validation = torch.frombuffer(bytearray(FILE_SEPARATOR.join(validation_parts)), dtype=torch.uint8)
    description = (
        f"{len(files)} standard-library .py files under {root_path}: "
        f"{train.numel():,} training bytes, {validation.numel():,} validation bytes"
    )
    return ByteCorpus(train, validation, description)
