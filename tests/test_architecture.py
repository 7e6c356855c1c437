"""The layer rule of docs/ARCHITECTURE.md, checked on the source: every ``gradwise.*`` import
of every module under ``gradwise/`` (at module level, inside functions, under
``if TYPE_CHECKING``) goes to its own layer or to one its row of the table allows.

The table is written twice, in the page and here, and a test compares the two, so neither
can drift: a new import that breaks the rule fails here, and so does an edit of the page
that the code does not follow.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gradwise"
PAGE = ROOT / "docs" / "ARCHITECTURE.md"

EVERYTHING = "everything"

LAYERS: dict[str, frozenset[str] | str] = {
    "foundation": frozenset(),
    "optim": frozenset({"foundation"}),
    "schedules": frozenset({"foundation"}),
    "curvature": frozenset({"foundation"}),
    "problems": frozenset({"foundation"}),
    "checkpoints": frozenset({"foundation"}),
    "distributed": frozenset({"foundation", "optim", "problems", "checkpoints"}),
    "train": frozenset({"foundation", "optim", "schedules", "curvature", "problems", "checkpoints", "distributed"}),
    "plan": frozenset({"foundation", "optim", "schedules", "problems"}),
    "bench": frozenset({"foundation", "optim", "schedules", "curvature", "problems", "checkpoints", "plan", "train"}),
    "cli": EVERYTHING,
}
"""Each layer, bottom to top, and the layers it may import besides itself (the page's table)."""

FOUNDATION = {"gradwise", "gradwise.validation", "gradwise.user_files"}
"""The modules below every layer: the package root (its version) and the shared helpers."""


def layer_of(module: str) -> str:
    """The layer of a dotted module name inside ``gradwise``."""
    if module in FOUNDATION:
        return "foundation"
    if module == "gradwise.__main__":
        return "cli"
    top = module.split(".")[1]
    if top not in LAYERS:
        raise ValueError(f"module {module!r} belongs to no layer of docs/ARCHITECTURE.md; add its layer to the table")
    return top


def gradwise_imports(source: str) -> list[tuple[int, str]]:
    """``(line, module)`` of every absolute ``gradwise`` import in ``source``, wherever it sits.

    ``from gradwise import optim`` names the module ``gradwise.optim`` (a submodule is what it
    imports); ``from gradwise import __version__`` names the package root. A relative import
    is returned as ``"."`` followed by its dots and module, for :func:`violations` to refuse:
    the package imports absolutely, so that every import can be read (here and by a person)
    without knowing where its file sits.
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "gradwise"]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            found.append((node.lineno, "." * node.level + (node.module or "")))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "gradwise":
            if node.module == "gradwise":
                found += [(node.lineno, f"gradwise.{alias.name}" if not alias.name.startswith("_") else "gradwise")
                          for alias in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


def violations(module: str, source: str) -> list[str]:
    """The imports of ``module`` (given its ``source``) that the layer table forbids, one line each."""
    own = layer_of(module)
    allowed = LAYERS[own]
    bad = []
    for line, target in gradwise_imports(source):
        if target.startswith("."):
            bad.append(f"{module}:{line} imports {target} relatively; import gradwise's modules by their full name")
            continue
        other = layer_of(target)
        if allowed == EVERYTHING or other == own or other in allowed:
            continue
        bad.append(f"{module}:{line} ({own}) imports {target} ({other})")
    return bad


def package_modules() -> list[tuple[str, Path]]:
    modules = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules.append((".".join(parts), path))
    return modules


def test_every_module_imports_only_the_layers_its_row_allows():
    modules = package_modules()
    assert len(modules) > 100  # the walk found the package, not an empty folder
    bad = [line for module, path in modules for line in violations(module, path.read_text())]
    assert not bad, "imports against docs/ARCHITECTURE.md's layer table:\n" + "\n".join(bad)


def test_every_module_belongs_to_a_layer_and_every_layer_has_modules():
    seen = {layer_of(module) for module, _ in package_modules()}
    assert seen == set(LAYERS)


def test_the_lazily_loaded_names_of_gradwise_distributed_respect_the_rule():
    """``gradwise.distributed`` imports these by name at first use, out of reach of ``ast``."""
    import gradwise.distributed as distributed

    for name, module in distributed.LAZY.items():
        other = layer_of(module)
        assert other == "distributed" or other in LAYERS["distributed"], f"{name} comes from {module} ({other})"
        assert hasattr(__import__(module, fromlist=[name]), name), f"{module} defines no {name}"


def test_the_table_only_allows_layers_below():
    order = list(LAYERS)
    for position, (layer, allowed) in enumerate(LAYERS.items()):
        if allowed != EVERYTHING:
            above = {other for other in allowed if order.index(other) >= position}
            assert not above, f"{layer} may import {sorted(above)}, which are not below it"
    assert LAYERS["optim"] == {"foundation"}
    assert "train" not in LAYERS["distributed"]
    assert "bench" not in LAYERS["train"]
    assert order[-1] == "cli" and LAYERS["cli"] == EVERYTHING


def page_table(text: str) -> dict[str, frozenset[str] | str]:
    """The layer table of the page: the first column's layer, the last column's allowed layers."""
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    if header[0] != "layer" or header[-1] != "may import":
        raise ValueError(f"the layer table's columns must start with 'layer' and end with 'may import', got {header}")
    table: dict[str, frozenset[str] | str] = {}
    for row in rows[2:]:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        layer = cells[0].strip("`")
        allowed = cells[-1]
        table[layer] = EVERYTHING if allowed == EVERYTHING else (
            frozenset() if allowed == "nothing" else frozenset(re.findall(r"`([a-z_]+)`", allowed)))
    return table


def test_the_page_and_this_test_state_the_same_table():
    table = page_table(PAGE.read_text())
    assert list(table) == list(LAYERS), "the layers or their order differ"
    assert table == LAYERS


# --- the checker itself, on synthetic modules ---------------------------------------------------

def test_the_checker_finds_an_upward_import_anywhere_in_a_module():
    source = '''
import torch
from gradwise.validation import check_int
from gradwise.optim.base import GradwiseOptimizer

def later():
    from gradwise.train.loop import Trainer  # function-level: still an import of the layer

if TYPE_CHECKING:
    import gradwise.bench.race
'''
    bad = violations("gradwise.distributed.strategies.fake", source)
    assert bad == [
        "gradwise.distributed.strategies.fake:7 (distributed) imports gradwise.train.loop (train)",
        "gradwise.distributed.strategies.fake:10 (distributed) imports gradwise.bench.race (bench)",
    ]


@pytest.mark.parametrize(("module", "source", "expected"), [
    ("gradwise.optim.fake", "from gradwise.problems import make_problem\n", 1),
    ("gradwise.optim.fake", "from gradwise import schedules\n", 1),
    ("gradwise.optim.fake", "from gradwise import __version__\nfrom gradwise.optim.base import x\n", 0),
    ("gradwise.train.fake", "from gradwise.bench.race import race\n", 1),
    ("gradwise.checkpoints.fake", "from gradwise.distributed.context import DistContext\n", 1),
    ("gradwise.cli.fake", "from gradwise.bench.race import race\nfrom gradwise.train import train\n", 0),
    ("gradwise.__main__", "from gradwise.cli import main\n", 0),
    ("gradwise.plan.fake", "import gradwise.train.loop as loop\n", 1),
])
def test_the_checker_on_each_kind_of_import(module, source, expected):
    assert len(violations(module, source)) == expected


def test_a_relative_import_is_refused_as_it_hides_its_layer():
    assert violations("gradwise.train.fake", "from ..bench import race\nfrom . import loop\n") == [
        "gradwise.train.fake:1 imports ..bench relatively; import gradwise's modules by their full name",
        "gradwise.train.fake:2 imports . relatively; import gradwise's modules by their full name",
    ]


def test_a_module_outside_every_layer_is_refused():
    with pytest.raises(ValueError, match="gradwise.newlayer.x.*belongs to no layer"):
        violations("gradwise.newlayer.x", "")


def test_the_page_parser_reads_a_changed_page():
    text = PAGE.read_text().replace(
        "| `foundation`, `optim`, `problems`, `checkpoints` |",
        "| `foundation`, `optim`, `problems`, `checkpoints`, `train` |",
    )
    assert page_table(text)["distributed"] == LAYERS["distributed"] | {"train"}
    assert page_table(text) != LAYERS
