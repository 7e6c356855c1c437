"""Fit the alpha-beta model to timed gloo collectives and check its predictions.

Spawns 2, 3 and 4 local gloo processes (127.0.0.1) and times ``all_reduce``,
``reduce_scatter`` and ``all_gather`` on fp32 messages from 4 KiB to 16 MiB, ``--repeats``
calls each, sizes interleaved in a new random order each round, each call timed on its
slowest rank (see :mod:`gradwise.plan.collective_timing`). The model describes the
undisturbed cost, so the fastest call of each size is used (the median is reported too).
For each collective, alpha and beta are fitted on two processes at four sizes; the model then
predicts every other size and process count, plainly and with the max-rate correction for
processes that share the host's cores. The table reports each prediction's relative error;
the target is 25%.

Usage::

    python benchmarks/collectives.py                 # prints the table, writes JSON
    python benchmarks/collectives.py --repeats 5 --max-processes 2   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from gradwise.bench.machine import describe_machine
from gradwise.plan.collective_timing import COLLECTIVES, time_collectives
from gradwise.plan.communication import collective_time, fit_alpha_beta

SIZES = [2**k for k in range(12, 25, 2)] + [2**21, 2**23]
FIT_SIZES = [2**12, 2**16, 2**20, 2**22]
ALGORITHM = {"all_reduce": "ring_all_reduce", "reduce_scatter": "ring_reduce_scatter", "all_gather": "ring_all_gather"}
TARGET = 0.25


def run(max_processes: int, repeats: int) -> dict[str, object]:
    timings = []
    for processes in range(2, max_processes + 1):
        timings += time_collectives(processes, sorted(set(SIZES)), COLLECTIVES, repeats=repeats)
    cores = os.cpu_count() or 1
    links, rows = {}, []
    for collective in COLLECTIVES:
        fit_rows = [t for t in timings if t.collective == collective and t.world_size == 2
                    and t.message_bytes in FIT_SIZES]
        links[collective] = fit_alpha_beta(ALGORITHM[collective], [t.message_bytes for t in fit_rows],
                                           [2] * len(fit_rows), [t.fastest for t in fit_rows])
        for t in (t for t in timings if t.collective == collective):
            link, algorithm = links[collective], ALGORITHM[collective]
            plain = collective_time(link, algorithm, t.message_bytes, t.world_size)
            shared = collective_time(link, algorithm, t.message_bytes, t.world_size, cores=cores)
            rows.append({
                "collective": collective, "processes": t.world_size, "message_bytes": t.message_bytes,
                "fastest_s": t.fastest, "median_s": t.seconds, "predicted_s": plain, "error": plain / t.fastest - 1,
                "predicted_shared_host_s": shared, "error_shared_host": shared / t.fastest - 1,
                "in_fit": t in fit_rows,
            })
    fits = {c: {"alpha_s": link.alpha, "beta_s_per_byte": link.beta} for c, link in links.items()}
    return {"machine": describe_machine(), "repeats": repeats, "fitted_on": "2 processes, sizes "
            + ", ".join(str(n) for n in FIT_SIZES), "fits": fits, "target": TARGET, "rows": rows}


def summary(report: dict) -> list[dict]:
    """Share of held-out predictions within the target, per collective and process count."""
    groups: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for row in report["rows"]:
        if not row["in_fit"]:
            groups.setdefault((row["collective"], row["processes"]), []).append(
                (abs(row["error"]), abs(row["error_shared_host"])))
    lines = []
    for (c, p), errors in sorted(groups.items()):
        plain, shared = sorted(e[0] for e in errors), sorted(e[1] for e in errors)
        lines.append({"collective": c, "processes": p, "held_out": len(errors),
                      "within_target": sum(x <= TARGET for x in plain), "median_abs_error": plain[len(plain) // 2],
                      "max_abs_error": plain[-1], "within_target_shared_host": sum(x <= TARGET for x in shared),
                      "median_abs_error_shared_host": shared[len(shared) // 2]})
    return lines


def print_report(report: dict) -> None:
    for collective, fit in report["fits"].items():
        print(f"{collective}: alpha = {fit['alpha_s'] * 1e6:.1f} us, beta = {fit['beta_s_per_byte'] * 1e9:.3f} ns/B "
              f"({1e-9 / fit['beta_s_per_byte']:.2f} GB/s), fitted on {report['fitted_on']}")
    print(f"{'collective':<15}{'p':>3}{'bytes':>10}{'fastest ms':>12}{'median ms':>11}{'model ms':>10}{'error':>8}"
          f"{'shared-host ms':>16}{'error':>8}")
    for row in report["rows"]:
        mark = " (fit)" if row["in_fit"] else ""
        print(f"{row['collective']:<15}{row['processes']:>3}{row['message_bytes']:>10}{row['fastest_s'] * 1e3:>12.3f}"
              f"{row['median_s'] * 1e3:>11.3f}{row['predicted_s'] * 1e3:>10.3f}{row['error']:>+8.0%}"
              f"{row['predicted_shared_host_s'] * 1e3:>16.3f}{row['error_shared_host']:>+8.0%}{mark}")
    print(f"\nheld-out predictions within {TARGET:.0%}: plain model | with the shared-host (max-rate) factor")
    for line in report["summary"]:
        print(f"  {line['collective']:<15} p={line['processes']}: {line['within_target']}/{line['held_out']}, "
              f"median |error| {line['median_abs_error']:.0%}, max {line['max_abs_error']:.0%} | "
              f"{line['within_target_shared_host']}/{line['held_out']}, "
              f"median |error| {line['median_abs_error_shared_host']:.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per size (default: 15)")
    parser.add_argument("--max-processes", type=int, default=4, help="largest process count (default: 4)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "collectives.json")
    args = parser.parse_args()
    report = run(args.max_processes, args.repeats)
    report["summary"] = summary(report)
    print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
