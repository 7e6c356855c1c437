"""``--nproc N``: run the same ``gradwise`` command again under ``torchrun`` with N processes.

The command is handed to torchrun's own launcher (``torch.distributed.run``, the code behind
``torchrun --standalone --nproc-per-node N --max-restarts R -m gradwise ...``), without
``--nproc`` and ``--max-restarts``. Each process gets ``cores / N`` threads (unless
``OMP_NUM_THREADS`` is set), and ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` keeps a restarted
group from reaching for the previous attempt's port (without it, restarts failed on gloo:
see the team's FACTS.md).

A worker that stops with an exit code has already said why on stderr (a one-line error, a
divergence report or a traceback), so the launcher returns that code and adds nothing:
torchrun's failure table and log lines would bury the one line under forty. Only a worker
killed by a signal, which could say nothing, gets torchrun's report.
"""

from __future__ import annotations

import logging
import os
import sys

LAUNCH_OPTIONS = ("--nproc", "--max-restarts")


def without_launch_options(argv: list[str]) -> list[str]:
    """``argv`` minus ``--nproc N`` and ``--max-restarts R`` (either spelled ``--name=value``)."""
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item in LAUNCH_OPTIONS:
            skip = True
        elif not item.startswith(tuple(f"{option}=" for option in LAUNCH_OPTIONS)):
            kept.append(item)
    return kept


def run_under_torchrun(nproc: int, argv: list[str], max_restarts: int = 0) -> int:
    """Run ``gradwise argv`` (launch options removed) on ``nproc`` processes; returns the job's exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    arguments = parse_args(["--standalone", "--nproc-per-node", str(nproc), "--max-restarts", str(max_restarts),
                            "-m", "gradwise", *without_launch_options(argv)])
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(arguments)
    except ChildFailedError as failed:
        rank, failure = failed.get_first_failure()
        if failure.exitcode > 0:
            return failure.exitcode
        print(failed.format_msg(), file=sys.stderr)
        return 1
    return 0
