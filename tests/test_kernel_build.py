"""The kernels' build survives a builder killed mid-build: torch's lock file, left behind, would
make every later process wait for it forever (it hung a CI run); gradwise holds an OS lock while
building, which dies with its process, and clears a torch lock it finds under it. A header the
sources include rebuilds them when it changes; a missing toolchain is told apart from a source that
does not compile (the kernel tests skip on the first only)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from torch.utils.cpp_extension import _get_build_directory

import gradwise.optim.kernels as kernels
from gradwise.optim.kernels import lion_cpu


def test_a_stale_torch_lock_does_not_hang_the_next_load(tmp_path) -> None:
    try:
        lion_cpu()  # built (or loaded) here, so that the copy below loads without compiling
    except kernels.ToolchainMissing as error:
        pytest.skip(str(error))
    built = _get_build_directory("gradwise_lion_cpu", verbose=False)
    copy = tmp_path / "gradwise_lion_cpu"  # where torch builds it under TORCH_EXTENSIONS_DIR
    shutil.copytree(built, copy)
    (copy / "lock").touch()  # what a killed builder leaves
    environment = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", "from gradwise.optim.kernels import lion_cpu; lion_cpu()"],
                            env=environment, timeout=240, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (copy / "lock").exists()


HEADER_CHANGE = """
import sys
from pathlib import Path
import gradwise.optim.kernels as kernels
kernels._HERE = Path(sys.argv[1])
print(kernels._build("gradwise_test_header", "marked.cpp", "test kernel", "none").marker())
"""


MARKED_SOURCE = """#include <Python.h>
#include "marker.h"
#define GRADWISE_INIT_(name) PyInit_##name
#define GRADWISE_INIT(name) GRADWISE_INIT_(name)
static PyObject* marker(PyObject*, PyObject*) { return PyLong_FromLong(kMarker); }
static PyMethodDef methods[] = {{"marker", marker, METH_NOARGS, nullptr}, {nullptr, nullptr, 0, nullptr}};
static PyModuleDef definition = {PyModuleDef_HEAD_INIT, "gradwise_test_header", nullptr, -1, methods};
PyMODINIT_FUNC GRADWISE_INIT(TORCH_EXTENSION_NAME)() { return PyModule_Create(&definition); }
"""


def test_a_changed_header_rebuilds_the_kernel_that_includes_it(tmp_path) -> None:
    """torch keys its cache on the sources alone; ninja's record of the headers each source included
    rebuilds it in the next process when one of them changes. The module is written against Python's
    C API, not pybind11, whose headers took most of each of the two builds."""
    (tmp_path / "marked.cpp").write_text(MARKED_SOURCE)
    environment = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "built")}
    for marker in (1, 2):
        (tmp_path / "marker.h").write_text(f"constexpr int kMarker = {marker};\n")
        result = subprocess.run([sys.executable, "-c", HEADER_CHANGE, str(tmp_path)], env=environment, timeout=240,
                                capture_output=True, text=True)
        if result.returncode != 0 and "ToolchainMissing" in result.stderr:
            pytest.skip("no C++ toolchain")
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.split() == [str(marker)]


def test_a_source_that_does_not_compile_is_a_failure_not_a_missing_toolchain(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(kernels, "_HERE", tmp_path)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "built"))
    (tmp_path / "broken.cpp").write_text("#error this kernel does not compile\n")
    with pytest.raises(RuntimeError, match="could not build gradwise's broken kernel") as raised:
        kernels._build("gradwise_test_broken", "broken.cpp", "broken kernel", "none")
    if isinstance(raised.value, kernels.ToolchainMissing):
        pytest.skip("no C++ toolchain")
    assert "this kernel does not compile" in str(raised.value)


def test_without_ninja_a_default_step_falls_back_to_the_generic_path(monkeypatch) -> None:
    """No ninja on PATH and no ninja package: a missing toolchain (a RuntimeError), which a default run
    warns about once and steps around, where the ImportError escaped from the optimizer's step."""
    monkeypatch.setattr(kernels.shutil, "which", lambda name: None)
    monkeypatch.setitem(sys.modules, "ninja", None)  # import ninja raises ImportError

    def loader():
        return kernels._build("gradwise_test_no_ninja", "lion_cpu.cpp", "test kernel", "use the generic path")

    with pytest.raises(kernels.ToolchainMissing, match="no ninja"):
        loader()
    monkeypatch.setattr(kernels, "_FAILED", {})
    with pytest.warns(RuntimeWarning, match="no ninja"):
        assert kernels.optional_kernel(loader) is None
