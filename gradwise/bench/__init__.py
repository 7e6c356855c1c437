"""Benchmarks: the optimizer race, its learning-rate sweep, tables and plots.

``race`` runs every chosen optimizer on every chosen problem with the same budget and
returns a ``RaceResult``; ``gradwise.bench.report`` turns it into tables and JSON and
``gradwise.bench.plots`` into PNGs::

    from gradwise.bench import OPTIMIZERS, race
    from gradwise.problems import make_problem

    result = race([make_problem("beale")], [OPTIMIZERS["adam"], OPTIMIZERS["sgd"]], steps=500)
"""

from gradwise.bench.optimizers import DEFAULT_OPTIMIZERS, OPTIMIZERS, OptimizerSpec, get_optimizer
from gradwise.bench.race import Entry, RaceResult, Run, race, rank_key, run_optimizer, sweep

__all__ = [
    "DEFAULT_OPTIMIZERS",
    "OPTIMIZERS",
    "Entry",
    "OptimizerSpec",
    "RaceResult",
    "Run",
    "get_optimizer",
    "race",
    "rank_key",
    "run_optimizer",
    "sweep",
]
