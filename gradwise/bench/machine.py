"""The description of the machine that every benchmark and race result records."""

from __future__ import annotations

import os
import platform

import torch

from gradwise import __version__


def describe_machine() -> dict[str, object]:
    """CPU model, core count, torch threads, versions and platform, as JSON-ready values.

    Results from shared machines are only comparable with the machine they came from, so
    every committed result carries this.
    """
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gradwise": __version__,
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
