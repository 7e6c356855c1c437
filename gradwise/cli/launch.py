"""``--nproc N``: run the same ``gradwise`` command again under ``torchrun`` with N processes.

The relaunched command is ``python -m torch.distributed.run --standalone --nproc-per-node N
--max-restarts R -m gradwise <the arguments without --nproc and --max-restarts>``. Each
process gets ``cores / N`` threads (unless ``OMP_NUM_THREADS`` is set), and
``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` keeps a restarted group from reaching for the
previous attempt's port (without it, restarts failed on gloo: see the team's FACTS.md).
"""

from __future__ import annotations

import os
import subprocess
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
    """Run ``gradwise argv`` (launch options removed) under torchrun; returns its exit code."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "--max-restarts", str(max_restarts), "-m", "gradwise", *without_launch_options(argv)]
    environment = dict(os.environ, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    environment.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.run(command, env=environment, check=False).returncode
