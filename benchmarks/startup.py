"""Start-up time of the ``gradwise`` command against ``python -c "import torch"``, side by side.

Every command is a fresh interpreter (the operating system's file cache is warm after the
first round, for all of them alike). The commands run interleaved, round after round, so that
the machine's drift and other load fall on all of them; the table gives each command's median
wall time and its ratio to the median of ``import torch`` (the floor: every useful subcommand
needs torch). ``gradwise plan memory`` runs twice: as given (it also writes its plot, memory.svg,
as SVG text without matplotlib) and with ``--no-plot --json``.

    python benchmarks/startup.py --rounds 15

prints the table and writes ``benchmarks/results/startup.json`` with the machine's description.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gradwise.bench.machine import describe_machine

PLOT_FOLDER = Path(tempfile.gettempdir()) / "gradwise-startup-plan"
COMMANDS = {
    "import torch": [sys.executable, "-c", "import torch"],
    "gradwise --help": [sys.executable, "-m", "gradwise", "--help"],
    "gradwise plan memory --params 1e9": [sys.executable, "-m", "gradwise", "plan", "memory", "--params", "1e9",
                                          "--out", str(PLOT_FOLDER)],
    "gradwise plan memory --params 1e9 --no-plot --json": [sys.executable, "-m", "gradwise", "plan", "memory",
                                                           "--params", "1e9", "--no-plot", "--json"],
}
BASELINE = "import torch"
TARGET = 1.3
"""Issue 13: ``gradwise --help`` and ``gradwise plan memory ...`` within 1.3x of ``import torch``."""


def wall_time(command: list[str]) -> float:
    """Seconds from start to exit of ``command`` (which must succeed)."""
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def measure(rounds: int) -> dict[str, list[float]]:
    """Each command's wall times over ``rounds`` interleaved rounds, after one warm-up round."""
    for command in COMMANDS.values():
        wall_time(command)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(rounds):
        for name, command in COMMANDS.items():
            times[name].append(wall_time(command))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved repetitions (default: 15)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "startup.json")
    args = parser.parse_args()
    times = measure(args.rounds)
    baseline = statistics.median(times[BASELINE])
    rows = []
    for name, seconds in times.items():
        median = statistics.median(seconds)
        rows.append({"command": name, "median_s": median, "min_s": min(seconds), "max_s": max(seconds),
                     "ratio_to_import_torch": median / baseline})
    width = max(len(row["command"]) for row in rows)
    print(f"{'command':<{width}}  median s  min s   max s   x import torch")
    for row in rows:
        print(f"{row['command']:<{width}}  {row['median_s']:8.3f}  {row['min_s']:6.3f}  {row['max_s']:6.3f}  "
              f"{row['ratio_to_import_torch']:6.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": describe_machine(), "rounds": args.rounds, "target_ratio": TARGET,
                                    "times_s": times, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
