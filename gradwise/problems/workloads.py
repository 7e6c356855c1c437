"""The training workloads by name, with the run settings that suit each.

``WORKLOADS[name]`` is a :class:`WorkloadEntry`: the factory ``(batch_size, seed, **options)
-> Workload`` and its default ``steps``, ``batch_size``, ``lr``, ``precision`` and
``eval_every``. Build one with :func:`make_workload`.

The ``tiny-gpt`` defaults (800 steps of 32 x 128 bytes, AdamW at 2e-3 with a cosine
schedule, bf16) reach the 0.6x-unigram target within ten minutes on two CPU cores (the measured
run is in ``benchmarks/results/train_tiny_gpt.json``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gradwise.problems.mlp import logreg, mlp
from gradwise.problems.tiny_gpt import tiny_gpt
from gradwise.problems.user_data import npy_pair, text_file
from gradwise.problems.workload import Workload
from gradwise.validation import check_choice


@dataclass(frozen=True)
class WorkloadEntry:
    factory: Callable[..., Workload]
    defaults: dict[str, Any]
    takes_data: bool
    description: str


WORKLOADS: dict[str, WorkloadEntry] = {
    "tiny-gpt": WorkloadEntry(
        tiny_gpt,
        dict(steps=800, batch_size=32, lr=2e-3, precision="bf16", eval_every=100),
        False,
        "byte-level transformer (1.2M parameters) on the Python standard library's sources",
    ),
    "mlp": WorkloadEntry(
        mlp, dict(steps=600, batch_size=64, lr=3e-3, precision="fp32", eval_every=100), False,
        "ReLU MLP on a tanh teacher's labels (generated)",
    ),
    "logreg": WorkloadEntry(
        logreg, dict(steps=300, batch_size=64, lr=1e-2, precision="fp32", eval_every=50), False,
        "logistic regression on a linear softmax teacher's samples (generated)",
    ),
    "text": WorkloadEntry(
        text_file, dict(steps=1000, batch_size=32, lr=2e-3, precision="bf16", eval_every=100), True,
        "byte-level transformer on your text file (--data FILE)",
    ),
    "npy": WorkloadEntry(
        npy_pair, dict(steps=600, batch_size=64, lr=3e-3, precision="fp32", eval_every=100), True,
        "ReLU MLP on your arrays (--data X.npy,y.npy)",
    ),
}


def make_workload(name: str, batch_size: int, seed: int = 0, data: list[str] | None = None,
                  **options: Any) -> Workload:
    """Build the workload ``name``; ``data`` are the user's files for ``text`` and ``npy``."""
    entry = WORKLOADS[check_choice("workload", name, WORKLOADS)]
    if data and not entry.takes_data:
        raise ValueError(f"workload {name!r} generates its own data; data files are for 'text' and 'npy'")
    try:
        if entry.takes_data:
            return entry.factory(batch_size, seed, data=data, **options)
        return entry.factory(batch_size, seed, **options)
    except TypeError as error:  # an unknown option name
        raise ValueError(f"workload {name!r}: {error}") from None
