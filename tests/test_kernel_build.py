"""The kernels' build survives a builder killed mid-build: torch's lock file, left behind, would
make every later process wait for it forever (it hung a CI run); gradwise holds an OS lock while
building, which dies with its process, and clears a torch lock it finds under it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from torch.utils.cpp_extension import _get_build_directory

from gradwise.optim.kernels import lion_cpu


def test_a_stale_torch_lock_does_not_hang_the_next_load(tmp_path) -> None:
    try:
        lion_cpu()  # built (or loaded) here, so that the copy below loads without compiling
    except RuntimeError as error:
        pytest.skip(f"no C++ toolchain: {error}")
    built = _get_build_directory("gradwise_lion_cpu", verbose=False)
    copy = tmp_path / "gradwise_lion_cpu"  # where torch builds it under TORCH_EXTENSIONS_DIR
    shutil.copytree(built, copy)
    (copy / "lock").touch()  # what a killed builder leaves
    environment = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", "from gradwise.optim.kernels import lion_cpu; lion_cpu()"],
                            env=environment, timeout=240, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (copy / "lock").exists()
