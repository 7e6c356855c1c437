"""``--nproc N``: run the same ``gradwise`` command again under ``torchrun`` with N processes.

The command is handed to torchrun's own launcher (``torch.distributed.run``, the code behind
``torchrun --standalone --nproc-per-node N --max-restarts R -m gradwise ...``), without
``--nproc`` and ``--max-restarts``. Each process gets ``cores / N`` threads (unless
``OMP_NUM_THREADS`` is set), and ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` keeps a restarted
group from reaching for the previous attempt's port (without it, restarts failed on gloo:
see the team's FACTS.md).

A worker that stops with an exit code has already said why on stderr (a one-line error, a
divergence report or a traceback), so the launcher returns that code and adds nothing, also when
a peer was killed by a signal around then (its collective broken by the exit):
torchrun's failure table and log lines would bury the one line under forty. A worker killed
by a signal could say nothing: the launcher says in two lines which rank died of which
signal, and keeps torchrun's full report in ``RUN/logs/torchrun-failure.log``. The
workers that survive it find their collectives broken (gloo: "Connection reset by peer"):
each says so in one line (:func:`lost_peer`) and keeps its traceback in
``RUN/logs/rank-R-attempt-A.log``, whether or not torchrun then restarts the job.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from pathlib import Path

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


def keep_log(folder: Path | None, name: str, text: str) -> str:
    """Write ``text`` to ``folder/logs/name``; returns where it went, for the one line that points to it."""
    if folder is None:
        return "not kept (no run folder)"
    path = Path(folder) / "logs" / name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as error:
        return f"not kept ({error.strerror})"
    return f"in {path}"


def lost_peer(error: BaseException, folder: Path | None) -> str | None:
    """Under torchrun: one line for a collective broken by another process's death, else ``None``.

    gloo raises a ``RuntimeError`` ("Read error ...: Connection reset by peer") on every rank
    still waiting for the one that died. That is the consequence, not the cause (torchrun's
    report names the cause), so the traceback goes to the run folder's ``logs/`` and the line
    says what torchrun does next (``TORCHELASTIC_MAX_RESTARTS`` and ``..._RESTART_COUNT``).
    """
    if "RANK" not in os.environ or not isinstance(error, RuntimeError):
        return None
    import torch.distributed as dist

    text = str(error)
    if not (isinstance(error, dist.DistError) or "gloo" in text or "by peer" in text):
        return None
    rank, attempt = os.environ["RANK"], int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    report = "".join(traceback.format_exception(error))
    kept = keep_log(folder, f"rank-{rank}-attempt-{attempt}.log", report)
    reason = re.search(r"(Connection \w+ by peer|Timed out[^.]*|Socket closed)", text)
    after = (f"torchrun restarts the job from the newest checkpoint (restart {attempt + 1} of {restarts})"
             if attempt < restarts else "no restarts left")
    return (f"rank {rank} lost contact with the other processes "
            f"({reason.group(1) if reason else text[:80]}); {after}; traceback {kept}")


def run_under_torchrun(nproc: int, argv: list[str], max_restarts: int = 0, folder: Path | None = None) -> int:
    """Run ``gradwise argv`` (launch options removed) on ``nproc`` processes; returns the job's exit code.

    ``folder`` (the run's output folder) receives torchrun's report when a worker dies of a signal."""
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
        # A worker that exited with a code said why; peers killed around then (gloo aborts a process
        # whose peer closed its socket mid-collective) died of that, whichever torchrun saw first.
        explained = sorted((failure.timestamp, failure.exitcode) for failure in failed.failures.values()
                           if failure.exitcode > 0)
        if explained:
            return explained[0][1]
        rank, failure = failed.get_first_failure()
        kept = keep_log(folder, "torchrun-failure.log", failed.format_msg() + "\n")
        after = f"after {max_restarts} restart{'s' * (max_restarts != 1)}" if max_restarts else "with --max-restarts 0"
        print(f"gradwise: rank {rank} (pid {failure.pid}) was killed by {failure.signal_name()}; the job stopped "
              f"{after}\ngradwise: torchrun's report {kept}", file=sys.stderr)
        return 1
    return 0
