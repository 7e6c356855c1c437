"""The command line imports what a subcommand needs when it runs (issue 13, point 5), and the
``train`` command's options are ``TrainConfig``'s fields (point 4)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from gradwise.cli import main
from gradwise.train.config import TrainConfig

HEAVY = ("torch.distributed.tensor", "matplotlib", "scipy", "gradwise.train.loop", "gradwise.distributed.strategies",
         "gradwise.bench")


def modules_loaded(argv: list[str]) -> list[str]:
    """The heavy modules loaded by a fresh interpreter that runs ``gradwise ARGV``."""
    script = (f"import sys\nfrom gradwise.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
              f"print(__import__('json').dumps(sorted(m for m in sys.modules if m.startswith({HEAVY!r}))))")
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    return json.loads(finished.stdout.splitlines()[-1])


def test_help_loads_no_layer_of_the_library():
    script = "import sys\nfrom gradwise.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n" \
             "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('gradwise.')))"
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert "planning models: memory, step time" in finished.stdout
    assert finished.stdout.splitlines()[-1] == "['gradwise.cli', 'gradwise.cli.launch', 'gradwise.cli.parsing']"


def test_plan_memory_loads_neither_the_training_loop_nor_dtensor_nor_matplotlib():
    assert modules_loaded(["plan", "memory", "--params", "1e9", "--no-plot", "--json"]) == []


def test_the_memory_plan_writes_its_plot_without_matplotlib(tmp_path):
    assert modules_loaded(["plan", "memory", "--params", "1e9", "--out", str(tmp_path)]) == []
    assert (tmp_path / "memory.svg").read_text(encoding="utf-8").startswith('<?xml version="1.0"')


@pytest.mark.parametrize("command", ["distributed", "race"])
def test_help_does_not_load_matplotlib(command):
    assert not [name for name in modules_loaded([command, "--help"]) if name.startswith("matplotlib")]


def test_a_plan_that_plots_a_curve_loads_matplotlib_only_then(tmp_path):
    loaded = modules_loaded(["plan", "stability", "--tau", "2", "--no-simulation", "--out", str(tmp_path)])
    assert "matplotlib" in loaded and not [name for name in loaded if not name.startswith("matplotlib")]
    assert (tmp_path / "stability.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("argv", [["bogus"], [], ["--version"]])
def test_unknown_or_missing_subcommands_are_refused_as_before(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    captured = capsys.readouterr()
    if argv == ["--version"]:
        assert exited.value.code == 0 and captured.out.startswith("gradwise ")
    else:
        assert exited.value.code == 2 and len(captured.err.strip().splitlines()) == 1
        assert "race" in captured.err or "required" in captured.err


def test_every_train_config_field_is_a_train_option_with_its_help(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, also at hyphens
    for item in dataclasses.fields(TrainConfig):
        meta = item.metadata
        flag = "--" + meta.get("flag", item.name).replace("_", "-")
        help_text = meta["help"].format(choices=", ".join(meta["choices"]())) if "choices" in meta else meta["help"]
        assert "".join(f"{flag} {meta.get('metavar', item.name.upper())} {help_text}".split()) in text, flag
    assert "--warmupSTEPSwarmupsteps(default:5%of--steps)" in text


@pytest.mark.parametrize("argv, field, value", [
    (["--warmup", "7"], "warmup_steps", 7), (["--clip", "none"], "clip", None),
    (["--clip-value", "0.5"], "clip_value", 0.5),
    (["--data", "a.txt, b.txt"], "data", ["a.txt", "b.txt"]), (["--workload-options", "d_model=8,bias=true"],
                                                               "workload_options", {"d_model": 8, "bias": True}),
    (["--lr", "3e-4"], "lr", 3e-4), (["--strategy", "ddp"], "strategy", "ddp"),
])
def test_each_option_sets_its_field(argv, field, value, tmp_path):
    from gradwise.cli import build_parser
    from gradwise.cli.train import build_config

    args = build_parser("train").parse_args(["train", *argv, "--out", str(tmp_path / "run")])
    config, _ = build_config(args)
    assert getattr(config, field) == value
    untouched = {name: default for name, default in dataclasses.asdict(TrainConfig()).items() if name != field}
    assert {name: getattr(config, name) for name in untouched} == untouched
