"""Hand-written kernels, compiled on first use with ``torch.utils.cpp_extension``.

The build (about 30 s on a 2-core machine, needs a C++ compiler and ninja) is cached by
torch under ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), so later
processes load it in well under a second.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path
from types import ModuleType

_HERE = Path(__file__).parent


@functools.cache
def lion_cpu() -> ModuleType:
    """The fused CPU Lion kernel: ``lion_(params, grads, exp_avgs, lr, decay, beta1, beta2)``."""
    from torch.utils.cpp_extension import load

    if shutil.which("ninja") is None:
        # torch looks for ninja on PATH; the ninja package from PyPI ships the binary.
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    try:
        return load(
            name="gradwise_lion_cpu",
            sources=[str(_HERE / "lion_cpu.cpp")],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
        )
    except (OSError, RuntimeError) as error:
        raise RuntimeError(
            f"could not build gradwise's fused CPU Lion kernel ({error}); "
            "it needs a C++ compiler and the ninja package; use Lion(fused=False) instead"
        ) from error
