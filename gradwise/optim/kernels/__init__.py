"""Hand-written kernels, compiled on first use with ``torch.utils.cpp_extension``.

The build (about 30 s on a 2-core machine, needs a C++ compiler and ninja) is cached by
torch under ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), so later
processes load it in well under a second.
"""

from __future__ import annotations

import fcntl
import functools
import os
import shutil
import warnings
from pathlib import Path
from types import ModuleType

_HERE = Path(__file__).parent


class ToolchainMissing(RuntimeError):
    """This machine has no C++ compiler or no ninja, so no kernel can be built here; a build that a present
    toolchain fails is a plain ``RuntimeError``."""


def _build(name: str, source: str, what: str, fallback: str, cflags: tuple[str, ...] = ()) -> ModuleType:
    """Compile (or load from torch's cache) the extension ``name`` from ``source`` beside this file;
    a failure is a ``RuntimeError`` (:class:`ToolchainMissing` without a compiler or ninja) that names
    the kernel (``what``) and the way around it."""
    from torch.utils.cpp_extension import _get_build_directory, load

    if shutil.which("ninja") is None:
        # torch looks for ninja on PATH; the ninja package from PyPI ships the binary.
        try:
            import ninja
        except ImportError:
            raise ToolchainMissing(
                f"could not build gradwise's {what}: no ninja (pip install ninja); {fallback}"
            ) from None
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    try:
        folder = Path(_get_build_directory(name, verbose=False))
        with open(folder / "gradwise-build.flock", "w") as guard:
            # torch serialises builds with a lock file, which a builder killed mid-build leaves
            # behind: every later process would wait for it forever. An OS lock dies with its
            # process; whoever holds it knows that no build is running, so a torch lock is stale.
            fcntl.flock(guard, fcntl.LOCK_EX)
            (folder / "lock").unlink(missing_ok=True)
            # The headers beside the sources (adam_cpu_common.h) are found on the include path;
            # ninja records every header a source includes (-MMD) and rebuilds when one changes.
            return load(
                name=name,
                sources=[str(_HERE / source)],
                extra_include_paths=[str(_HERE)],
                extra_cflags=["-O3", "-march=native", "-fopenmp", *cflags],
                extra_ldflags=["-fopenmp"],
            )
    except (OSError, RuntimeError, ImportError) as error:
        compiler = (os.environ.get("CXX") or "c++").split()[0]  # the compiler torch calls
        failure = ToolchainMissing if shutil.which(compiler) is None else RuntimeError
        raise failure(
            f"could not build gradwise's {what} ({error}); it needs a C++ compiler and the ninja package; {fallback}"
        ) from error


@functools.cache
def lion_cpu() -> ModuleType:
    """The fused CPU Lion kernel: ``lion_(params, grads, exp_avgs, lr, decay, beta1, beta2)``."""
    return _build("gradwise_lion_cpu", "lion_cpu.cpp", "fused CPU Lion kernel", "use Lion(fused=False) instead")


@functools.cache
def adam_8bit_cpu() -> ModuleType:
    """The fused CPU Adam/AdamW kernel for 8-bit moments (``state_format="8bit"``):
    ``adam_8bit_(params, grads, exp_avg_codes, exp_avg_absmaxes, exp_avg_sq_codes,
    exp_avg_sq_absmaxes, signed_map, unsigned_map, minus_step_sizes, bias_correction2_sqrts,
    beta1, beta2, eps, weight_decay, lr, decoupled, maximize)``.

    Built without contracting products into fused multiply-adds (``-ffp-contract=off``) and
    with ``-fno-math-errno -fno-trapping-math`` (so its selects vectorise; neither changes a
    result): its arithmetic is spelled out op by op as ATen's kernels do it, except the square
    root, which is the CPU's correctly rounded one where torch.sqrt uses MKL's (see the source)."""
    return _build(
        "gradwise_adam_8bit_cpu",
        "adam_8bit_cpu.cpp",
        "fused CPU 8-bit Adam kernel",
        "pass fused=False to use the generic 8-bit path",
        cflags=("-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"),
    )


@functools.cache
def adam_4bit_cpu() -> ModuleType:
    """The fused CPU Adam/AdamW kernel for 4-bit moments (``state_format="4bit"``, Li et al. 2023):
    ``adam_4bit_(params, grads, exp_avg_codes, exp_avg_scales, exp_avg_sq_codes, exp_avg_sq_scales,
    signed_map, unsigned_map, minus_step_sizes, bias_correction2_sqrts, beta1, beta2, eps,
    weight_decay, lr, decoupled, maximize)``, built with the 8-bit kernel's flags (its arithmetic is
    spelled out op by op the same way)."""
    return _build(
        "gradwise_adam_4bit_cpu",
        "adam_4bit_cpu.cpp",
        "fused CPU 4-bit Adam kernel",
        "pass fused=False to use the generic 4-bit path",
        cflags=("-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"),
    )


@functools.cache
def adam_bf16_cpu() -> ModuleType:
    """The fused CPU Adam/AdamW kernel for bfloat16 moments (``state_format="bf16"`` and
    ``"bf16-sr"``): ``adam_bf16_(params, grads, exp_avgs, exp_avg_sqs, minus_step_sizes,
    bias_correction2_sqrts, beta1, beta2, eps, weight_decay, lr, decoupled, maximize, stochastic,
    seeds)``, built with the 8-bit kernel's flags (its arithmetic is spelled out op by op the same way)."""
    return _build(
        "gradwise_adam_bf16_cpu",
        "adam_bf16_cpu.cpp",
        "fused CPU bf16 Adam kernel",
        "pass fused=False to use the generic bf16 path",
        cflags=("-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"),
    )


_FAILED: dict[str, str] = {}


def optional_kernel(loader) -> ModuleType | None:
    """``loader()``, or ``None`` when it cannot be built: a default run then takes the generic
    path, warned once per process (the failure is remembered, so the build is not retried every
    step)."""
    name = loader.__name__
    if name in _FAILED:
        return None
    try:
        return loader()
    except RuntimeError as error:
        _FAILED[name] = str(error)
        warnings.warn(f"{error}; falling back to the generic path", RuntimeWarning, stacklevel=3)
        return None
