r"""Do failure types depend on the hardware? A chi-squared test of independence.

Job records (hardware, outcome: success, out-of-memory, missing-shard, diverged, ...) make a
contingency table :math:`O_{ij}` of hardware :math:`i` by outcome :math:`j`. Under
independence the expected counts are :math:`E_{ij} = r_i c_j / N` and Pearson's statistic
:math:`X^2 = \sum (O_{ij} - E_{ij})^2 / E_{ij}` is approximately :math:`\chi^2` with
:math:`(I-1)(J-1)` degrees of freedom (``scipy.stats.chi2_contingency``; no continuity
correction, so that the statistic is exactly Pearson's).

The cells that drive a dependence are those with large adjusted standardised residuals
(Haberman 1973, "The analysis of residuals in cross-classified tables", Biometrics 29(1)),

.. math:: r_{ij} = \frac{O_{ij} - E_{ij}}{\sqrt{E_{ij}(1 - r_i/N)(1 - c_j/N)}},

approximately standard normal under independence: a cell is reported when
:math:`|r_{ij}|` exceeds the two-sided normal quantile at ``alpha`` divided by the number of
cells (a Bonferroni correction). The test is approximate when expected counts are small
(fewer than 5); the result says so.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gradwise.user_files import MAX_TABLE_BYTES, read_user_text
from gradwise.validation import check_range

REQUIRED_COLUMNS = ("hardware", "outcome")


@dataclass(frozen=True)
class Cell:
    hardware: str
    outcome: str
    observed: int
    expected: float
    residual: float  # adjusted standardised residual


@dataclass(frozen=True)
class FailureTest:
    hardware: list[str]
    outcomes: list[str]
    observed: np.ndarray  # hardware x outcome counts
    expected: np.ndarray
    residuals: np.ndarray
    statistic: float
    dof: int
    p_value: float
    threshold: float  # |residual| above which a cell is reported
    driving_cells: list[Cell]  # sorted by |residual|, largest first
    small_expected: int  # cells with an expected count below 5


def read_jobs(path: str | Path) -> list[tuple[str, str]]:
    """(hardware, outcome) of every job in a CSV file with those columns (others ignored)."""
    path = Path(path)
    text = read_user_text(path, "jobs", MAX_TABLE_BYTES)  # a regular file of bounded size
    try:
        return _jobs(path, text)
    except csv.Error as error:
        raise ValueError(f"jobs: {path.name} is not valid CSV: {error}") from None


def _jobs(path: Path, text: str) -> list[tuple[str, str]]:
    reader = csv.DictReader(text.splitlines())
    columns = {(name or "").strip().lower() for name in reader.fieldnames or []}
    for column in REQUIRED_COLUMNS:
        if column not in columns:
            raise ValueError(f"jobs: {path.name} has no {column!r} column (columns: {sorted(columns)})")
    jobs = []
    for line, row in enumerate(reader, start=2):
        record = {key.strip().lower(): (value or "").strip()  # key None: the surplus cells of a long row
                  for key, value in row.items() if key is not None}
        for column in REQUIRED_COLUMNS:
            if not record.get(column):
                raise ValueError(f"jobs: {path.name} line {line}: {column} is empty")
        jobs.append((record["hardware"], record["outcome"]))
    if not jobs:
        raise ValueError(f"jobs: {path.name} has no job records")
    return jobs


def contingency_table(jobs: list[tuple[str, str]]) -> tuple[list[str], list[str], np.ndarray]:
    """Hardware names, outcome names (both sorted) and the table of counts."""
    hardware = sorted({h for h, _ in jobs})
    outcomes = sorted({o for _, o in jobs})
    table = np.zeros((len(hardware), len(outcomes)), dtype=np.int64)
    rows = {name: i for i, name in enumerate(hardware)}
    cols = {name: j for j, name in enumerate(outcomes)}
    for h, o in jobs:
        table[rows[h], cols[o]] += 1
    return hardware, outcomes, table


def dependence_test(jobs: list[tuple[str, str]], alpha: float = 0.05) -> FailureTest:
    """Chi-squared test of independence of outcome and hardware, with the driving cells."""
    check_range("alpha", alpha, 0.0, 1.0, low_open=True, high_open=True)
    hardware, outcomes, observed = contingency_table(jobs)
    if len(hardware) < 2 or len(outcomes) < 2:
        raise ValueError(
            f"jobs need at least two kinds of hardware and two outcomes, got {len(hardware)} and {len(outcomes)}"
        )
    from scipy.stats import chi2_contingency, norm  # here: scipy.stats costs every gradwise command 0.7 s

    statistic, p_value, dof, expected = chi2_contingency(observed, correction=False)
    total = observed.sum()
    row_share = observed.sum(axis=1, keepdims=True) / total
    col_share = observed.sum(axis=0, keepdims=True) / total
    residuals = (observed - expected) / np.sqrt(expected * (1 - row_share) * (1 - col_share))
    threshold = float(norm.ppf(1 - alpha / (2 * observed.size)))
    cells = [
        Cell(hardware[i], outcomes[j], int(observed[i, j]), float(expected[i, j]), float(residuals[i, j]))
        for i in range(len(hardware)) for j in range(len(outcomes)) if abs(residuals[i, j]) > threshold
    ]
    cells.sort(key=lambda cell: -abs(cell.residual))
    return FailureTest(
        hardware, outcomes, observed, expected, residuals, float(statistic), int(dof), float(p_value),
        threshold, cells, int((expected < 5).sum()),
    )
