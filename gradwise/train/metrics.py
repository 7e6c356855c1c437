"""Metrics of a run, one record per step and per evaluation, as JSONL and CSV.

``metrics.jsonl`` is the record of truth: one JSON object per line, floats written with
``repr`` precision so a loss reads back bit for bit. ``metrics.csv`` holds the same rows
with fixed columns for spreadsheets. Both are appended as the run goes; a resumed run
first cuts them back to the checkpoint's step (a killed run may have logged steps after
its last checkpoint, and a cut-off last line), then appends the steps it redoes.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from pathlib import Path
from typing import Any

from gradwise.checkpoints.atomic import write_atomically


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file, stopping at the first line that does not parse (a cut-off write)."""
    records: list[dict[str, Any]] = []
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def _json_number(value: Any) -> Any:
    # JSON has no NaN or infinity: write them as strings so the file stays valid JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsWriter:
    """Appends records to ``metrics.jsonl`` and ``metrics.csv`` in ``folder``.

    CSV columns: kind (train, eval, rollback), step, loss, lr, grad_norm, ``{unit}_per_s``,
    elapsed_s, event, then ``eval_metrics``: the evaluation metrics and any further entries the run
    records (the sharpness's, :data:`gradwise.train.sharpness.COLUMNS`).
    """

    def __init__(self, folder: Path, unit: str, eval_metrics: list[str]) -> None:
        self.jsonl = folder / "metrics.jsonl"
        self.csv = folder / "metrics.csv"
        self.columns = ["kind", "step", "loss", "lr", "grad_norm", f"{unit}_per_s", "elapsed_s", "event",
                        *eval_metrics]

    def _csv_text(self, records: list[dict[str, Any]], header: bool) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
        if header:
            writer.writeheader()
        writer.writerows(records)
        return buffer.getvalue()

    def start(self, resume_step: int | None) -> list[dict[str, Any]]:
        """Begin a fresh log (``resume_step=None``) or keep the records written before the checkpoint of
        ``resume_step``; returns those kept. The final full evaluation follows the last checkpoint, so
        a run resumed from that checkpoint writes it again: the old one is dropped."""
        kept = [] if resume_step is None else [
            r for r in read_records(self.jsonl)
            if r["step"] < resume_step or (r["step"] == resume_step and not r.get("full"))
        ]
        write_atomically(self.jsonl, "".join(json.dumps(record) + "\n" for record in kept).encode())
        write_atomically(self.csv, self._csv_text(kept, header=True).encode())
        return kept

    def write(self, record: dict[str, Any]) -> None:
        record = {key: _json_number(value) for key, value in record.items()}
        with self.jsonl.open("a") as file:
            file.write(json.dumps(record) + "\n")
        with self.csv.open("a") as file:
            file.write(self._csv_text([record], header=False))


class Throughput:
    """Items per second over the time spent in training steps (evaluation and checkpoints excluded)."""

    def __init__(self) -> None:
        self.items = 0
        self.seconds = 0.0
        self._started = 0.0

    def start(self) -> None:
        self._started = time.perf_counter()

    def stop(self, items: int) -> float:
        """End a step that processed ``items``; returns that step's rate."""
        elapsed = time.perf_counter() - self._started
        self.items += items
        self.seconds += elapsed
        return items / elapsed if elapsed > 0 else math.inf

    @property
    def rate(self) -> float:
        """Average items per second over every step so far."""
        return self.items / self.seconds if self.seconds > 0 else 0.0
