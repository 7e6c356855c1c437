"""``gradwise landscape``: what a trained run found: the loss along a line and on a plane, sharpness, and
the curvature of each layer (see :mod:`gradwise.curvature.landscape` and :mod:`gradwise.curvature.sharpness`).

The run's parameters are read safely: ``model.pt`` (its final weights) with ``weights_only=True``, a
checkpoint only if its checksum verifies (:func:`gradwise.checkpoints.atomic.read_checkpoint`). The initial
parameters are the run's step-0 checkpoint when it was kept, and otherwise rebuilt from the run's seed by
the workload's own model construction (which seeds torch before building the model, as the run did). Every
loss is evaluated in float32 in eval mode, without the run's autocast, on a fixed sample: the first
``--samples`` training examples of the run's seed, and the workload's quick validation set.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradwise.cli.parsing import UsageError, check_output_folder, output_folder, text_table
from gradwise.validation import check_int

if TYPE_CHECKING:
    import torch
    from torch import nn

    from gradwise.curvature.landscape import Cost
    from gradwise.problems.workload import Workload
    from gradwise.train.config import TrainConfig

ANALYSES = ("line", "plane", "sharpness", "layers")
"""What the command computes, in this order; all four when none is named."""

DESCRIPTION = """\
Look at the minimum a run found. Four analyses (all of them unless some are named):
  --line       the training and validation loss along the straight line from the run's initial to its
               final parameters (or to another run's final parameters, --other), alpha in --alpha-range
  --plane      the training loss on the plane of two random filter-normalised directions (Li et al. 2018)
               around the final parameters, a --grid x --grid grid over [-span, span]^2
  --sharpness  the top Hessian eigenvalue (Lanczos, with its residual bound) and the trace (Hutchinson,
               with its standard error)
  --layers     per parameter tensor: the extreme eigenvalues of its diagonal Hessian block and the condition
               estimate lambda_max / lambda_min, a lower bound (infinite when lambda_min <= 0)
Each prints its cost (forward passes, Hessian-vector products) before it starts. Losses are float32, in
eval mode, on a fixed sample: the first --samples training examples of the run's seed and the workload's
quick validation set. Plots (PNG) and landscape.json go to --out (default RUN_DIR/landscape).
"""

EPILOG = """\
examples:
  gradwise landscape runs/mlp
  gradwise landscape runs/mlp --plane --grid 21 --span 0.5 --samples 512
  gradwise landscape runs/sgd --line --other runs/adamw --json
  gradwise landscape --workload tiny-gpt --checkpoint runs/gpt/checkpoints/step-00000400.ckpt --layers"""


def register(subparsers: argparse._SubParsersAction, summary: str) -> None:
    """Add the ``landscape`` parser; ``summary`` is its line in ``gradwise --help``."""
    parser = subparsers.add_parser(
        "landscape",
        help=summary,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("run", nargs="?", type=Path, default=None, metavar="RUN_DIR", help="a run folder of gradwise train")
    add("--workload", default=None, metavar="NAME", help="with --checkpoint and no RUN_DIR: the checkpoint's workload")
    add(
        "--checkpoint",
        type=Path,
        default=None,
        metavar="FILE",
        help="a checkpoint (step-*.ckpt) to use as the final parameters in place of RUN_DIR/model.pt",
    )
    for name in ANALYSES:
        add(f"--{name}", action="store_true", help=f"compute the {name} analysis")
    add(
        "--other",
        type=Path,
        default=None,
        metavar="RUN_DIR2",
        help="line: from this run's final parameters to RUN_DIR2's (same workload) instead of initial to final",
    )
    add("--points", type=int, default=21, help="line: points along the line (default: 21)")
    add(
        "--alpha-range",
        type=float,
        nargs=2,
        default=(-0.5, 1.5),
        metavar=("LOW", "HIGH"),
        help="line: alpha from LOW to HIGH; 0 is the start, 1 the end (default: -0.5 1.5)",
    )
    add("--grid", type=int, default=11, metavar="N", help="plane: N x N points (default: 11)")
    add("--span", type=float, default=1.0, metavar="S", help="plane: coordinates from -S to S (default: 1)")
    add(
        "--one-dim",
        default="zero",
        metavar="HOW",
        help="plane: biases and other 1-D parameters in the directions: zero (Li et al.) or filter (default: zero)",
    )
    add(
        "--samples",
        type=int,
        default=None,
        metavar="K",
        help="examples (sequences) in the fixed training sample, at most a fixed training set's size (default: the "
        "run's batch size)",
    )
    add("--lanczos-steps", type=int, default=20, metavar="M", help="sharpness, layers: Lanczos steps (default: 20)")
    add("--probes", type=int, default=20, metavar="P", help="sharpness: Hutchinson probes (default: 20)")
    add("--seed", type=int, default=0, help="seed of the directions, the Lanczos starts and the probes (default: 0)")
    add("--threads", type=int, default=None, metavar="T", help="CPU threads (default: every core)")
    add(
        "--out",
        type=output_folder,
        default=None,
        metavar="DIR",
        help="folder for the PNGs and landscape.json (default: RUN_DIR/landscape; none without RUN_DIR)",
    )
    add("--no-plot", action="store_true", help="write no PNG")
    add("--json", action="store_true", help="print the results as JSON (the costs go to stderr)")
    add("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(handler=run)


def chosen_analyses(args: argparse.Namespace) -> list[str]:
    """The analyses named, or all of them; refuses options that apply to none of those chosen."""
    chosen = [name for name in ANALYSES if getattr(args, name)] or list(ANALYSES)
    if args.other is not None and "line" not in chosen:
        raise UsageError("--other applies to --line")
    return chosen


def check_arguments(args: argparse.Namespace, chosen: list[str]) -> None:
    """Every numeric and source option, before anything is loaded (one-line ``ValueError``/``UsageError``)."""
    from gradwise.curvature.landscape import ONE_DIM, alpha_grid, plane_coordinates
    from gradwise.train.config import LARGEST_SEED
    from gradwise.validation import check_choice

    if args.run is None and args.workload is None:
        raise UsageError("give a RUN_DIR, or --workload NAME --checkpoint FILE")
    if args.run is not None and args.workload is not None:
        raise UsageError("--workload goes with --checkpoint and no RUN_DIR: a run folder names its workload")
    if args.workload is not None and args.checkpoint is None:
        raise UsageError("--workload needs --checkpoint FILE (the parameters to look at)")
    alpha_grid(args.alpha_range[0], args.alpha_range[1], args.points)
    plane_coordinates(args.span, args.grid)
    check_choice("one_dim", args.one_dim, ONE_DIM)
    if args.samples is not None:
        check_int("samples", args.samples, 1)
    check_int("lanczos_steps", args.lanczos_steps, 1)
    check_int("probes", args.probes, 2)
    check_int("seed", args.seed, 0, LARGEST_SEED)
    if args.threads is not None:
        check_int("threads", args.threads, 1, os.cpu_count() or 1)


# --- the run: its settings and its parameters -------------------------------------------------------------


def read_run_config(folder: Path, what: str = "RUN_DIR") -> TrainConfig:
    """A run folder's settings (``config.json``); one-line errors for a missing folder or one that is no run."""
    from gradwise.train.config import TrainConfig
    from gradwise.train.loop import read_saved_config

    if not folder.exists():
        raise UsageError(f"{what} {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise UsageError(f"{what} {str(folder)!r} is not a folder")
    saved = read_saved_config(folder)
    if saved is None:
        raise UsageError(f"{what} {str(folder)!r} is not a gradwise run folder (it has no config.json)")
    return TrainConfig.from_dict(saved, source=str(folder / "config.json")).validate()


def read_model_file(path: Path) -> dict[str, torch.Tensor]:
    """A run's ``model.pt`` (a state_dict of tensors), loaded with ``weights_only=True``."""
    import pickle
    import warnings

    import torch

    from gradwise.checkpoints.atomic import load_refusal

    if not path.is_file():
        raise UsageError(
            f"{str(path.parent)!r} holds no model.pt (the run did not finish): "
            "name one of its checkpoints with --checkpoint"
        )
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol: the refusal below says what matters
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise UsageError(f"{str(path)!r} was refused by the safe loader: {load_refusal(error)}") from None
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise UsageError(f"{str(path)!r} does not hold a model's state_dict (names to tensors)")
    return state


def read_checkpoint_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """A verified checkpoint's model state and the settings it was written under (``None`` if it has none)."""
    import torch

    from gradwise.checkpoints.atomic import CorruptCheckpoint, read_checkpoint

    if not path.exists():
        raise UsageError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        raise UsageError(f"checkpoint {str(path)!r} is a folder (a sharded checkpoint): use the run's model.pt")
    try:
        payload = read_checkpoint(path)
    except CorruptCheckpoint as error:
        raise UsageError(f"checkpoint {str(path)!r} does not verify: {error}") from None
    model = payload.get("model")
    if not isinstance(model, dict) or not all(isinstance(value, torch.Tensor) for value in model.values()):
        raise UsageError(f"checkpoint {str(path)!r} holds no model state")
    settings = payload.get("settings")
    return model, settings if isinstance(settings, dict) else None


def checkpoint_config(workload: str, settings: dict[str, Any] | None, path: Path) -> TrainConfig:
    """The config of a checkpoint given with ``--workload``: the settings it was written under (they must name
    that workload), or the workload's defaults when it records none."""
    from gradwise.problems.workloads import WORKLOADS
    from gradwise.train.config import TrainConfig
    from gradwise.train.loop import resolved_config

    if settings is None:
        return resolved_config(TrainConfig(workload=workload))
    config = TrainConfig.from_dict(
        {key: value for key, value in settings.items() if key != "world_size"}, source=f"checkpoint {str(path)!r}"
    )
    if config.workload != workload:
        raise UsageError(f"checkpoint {str(path)!r} was written by a {config.workload!r} run, not {workload!r}")
    return config.with_workload_defaults(WORKLOADS[config.workload].defaults)


@dataclass
class Source:
    """What the command looks at: the run's settings and the final parameters' state, with where they came from."""

    config: TrainConfig
    final: dict[str, torch.Tensor]
    final_from: str
    folder: Path | None


def read_source(args: argparse.Namespace) -> Source:
    """The run folder (or the checkpoint) the command was given, read and checked."""
    if args.run is not None:
        config = read_run_config(args.run)
        if args.checkpoint is not None:
            model, _ = read_checkpoint_file(args.checkpoint)
            return Source(config, model, str(args.checkpoint), args.run)
        return Source(config, read_model_file(args.run / "model.pt"), str(args.run / "model.pt"), args.run)
    model, settings = read_checkpoint_file(args.checkpoint)
    return Source(checkpoint_config(args.workload, settings, args.checkpoint), model, str(args.checkpoint), None)


def parameters_from(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> list[torch.Tensor]:
    """``state`` loaded into ``model`` (its shapes checked, its values finite): copies of the trainable
    parameters in float32, in the model's order."""
    import torch

    from gradwise.checkpoints.atomic import first_nonfinite

    if (found := first_nonfinite(state)) is not None:
        raise UsageError(f"{what} holds non-finite values in {found}")
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    mismatched = [f"{key} saved {tuple(state[key].shape)}, model {tuple(value.shape)}"
                  for key, value in expected.items() if key in state and state[key].shape != value.shape]
    for label, names in (("lacks", missing), ("has unknown", unexpected), ("has other shapes:", mismatched)):
        if names:
            listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            raise UsageError(f"{what} does not fit the model its settings build: it {label} {listed}")
    model.load_state_dict(state)
    return [p.detach().to(torch.float32).clone() for p in model.parameters() if p.requires_grad]


def initial_parameters(source: Source, model: nn.Module) -> tuple[list[torch.Tensor], str]:
    """The run's initial parameters: its step-0 checkpoint when kept and verified, else ``model``'s own (the
    workload rebuilt from the run's seed, untouched)."""
    from gradwise.checkpoints.atomic import CheckpointManager, CorruptCheckpoint, read_checkpoint

    rebuilt = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    if source.folder is not None:
        first = CheckpointManager(source.folder / "checkpoints").path(0)
        try:
            state = read_checkpoint(first).get("model") if first.is_file() else None
        except CorruptCheckpoint:
            state = None
        if isinstance(state, dict):
            return parameters_from(model, state, f"checkpoint {str(first)!r}"), f"checkpoint {first}"
    return rebuilt, f"rebuilt from seed {source.config.seed} (the workload's model construction)"


# --- loss functions at given parameter values ---------------------------------------------------------------


def at_values(model: nn.Module, names: Sequence[str], values: Sequence[torch.Tensor]) -> nn.Module:
    """A module that runs ``model`` with its parameters replaced by ``values`` (``torch.func.functional_call``),
    in eval mode, for the workload's own loss and evaluation functions."""
    import torch
    from torch import nn

    class AtValues(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(self.model, dict(zip(names, values)), (inputs,))

    return AtValues().eval()


def loss_functions(
    workload: Workload, model: nn.Module, names: Sequence[str]
) -> dict[str, Callable[[Sequence[torch.Tensor]], Any]]:
    """``train_loss`` on the fixed sample (the stream's first batch) and, where the workload has it,
    ``val_loss`` (its quick validation estimate), as functions of the parameter values."""
    sample = workload.train_data.next_batch()
    losses: dict[str, Callable[[Sequence[torch.Tensor]], Any]] = {
        "train_loss": lambda values: workload.loss(at_values(model, names, values), sample)
    }
    if "val_loss" in workload.eval_metrics:
        losses["val_loss"] = lambda values: workload.evaluate(at_values(model, names, values), False)["val_loss"]
    return losses


# --- the analyses ---------------------------------------------------------------------------------------------


def announce(args: argparse.Namespace, name: str, cost: Cost, detail: str) -> None:
    """The cost line printed before an analysis starts (to stderr under --json, whose stdout is the JSON)."""
    print(f"{name}: {detail}; cost {cost.describe()}", file=sys.stderr if args.json else sys.stdout, flush=True)


@dataclass
class Loaded:
    """What the analyses run on: the workload (built for the fixed sample), its model, the parameters' names,
    the final parameters, the line's two ends, and the loss functions."""

    config: TrainConfig
    model: nn.Module
    names: list[str]
    final: list[torch.Tensor]
    ends: tuple[list[torch.Tensor], list[torch.Tensor], str, str] | None
    losses: dict[str, Callable[[Sequence[torch.Tensor]], Any]]
    report: dict[str, Any]


def check_sample_size(workload: Workload, samples: int) -> None:
    """``--samples`` within a fixed training set (mlp's, logreg's, npy's): a larger sample repeats examples,
    and one far larger than the data would exhaust memory before any analysis starts."""
    from gradwise.problems.data import ShuffledEpochs

    stream = workload.train_data
    if isinstance(stream, ShuffledEpochs) and samples > (size := stream.inputs.shape[0]):
        raise UsageError(f"samples must be an integer in [1, {size}] (the run's training examples), got {samples}")


def load(args: argparse.Namespace, chosen: list[str]) -> Loaded:
    """Read the run (and ``--other``), build its workload on the fixed sample, and gather the parameters."""
    from gradwise.problems.workloads import make_workload
    from gradwise.train.config import required

    source = read_source(args)
    config = source.config
    other = read_run_config(args.other, "--other") if args.other is not None else None
    if other is not None and (other.workload, other.workload_options, other.data) != (
        config.workload,
        config.workload_options,
        config.data,
    ):
        raise UsageError(
            f"--other {str(args.other)!r} trained {other.workload!r} with options "
            f"{other.workload_options}, not {config.workload!r} with {config.workload_options}"
        )
    samples = args.samples if args.samples is not None else required(config.batch_size, "batch_size")
    workload = make_workload(config.workload, samples, config.seed, config.data, **config.workload_options)
    if args.samples is not None:
        check_sample_size(workload, args.samples)
    model = workload.model.float().eval()
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    ends = None
    initial_from = None
    if "line" in chosen and other is None:
        initial, initial_from = initial_parameters(source, model)
        final = parameters_from(model, source.final, source.final_from)
        ends = (initial, final, "initial", "final")
    elif "line" in chosen and args.other is not None:
        other_final = parameters_from(model, read_model_file(args.other / "model.pt"), f"{args.other}/model.pt")
        final = parameters_from(model, source.final, source.final_from)
        ends = (final, other_final, "final", f"{args.other} final")
    else:
        final = parameters_from(model, source.final, source.final_from)
    losses = loss_functions(workload, model, names)
    report = {
        "workload": config.workload,
        "workload_options": config.workload_options,
        "seed": config.seed,
        "final": source.final_from,
        "initial": initial_from,
        "parameters": sum(p.numel() for p in final),
        "sample": {"train_examples": samples, "validation": "val_loss" in losses},
        "precision": "float32, eval mode",
        "analysis_seed": args.seed,
    }
    return Loaded(config, model, names, final, ends, losses, report)


def run(args: argparse.Namespace) -> int:
    chosen = chosen_analyses(args)
    check_arguments(args, chosen)
    out = args.out if args.out is not None else None if args.run is None else args.run / "landscape"
    if args.out is None and out is not None:
        check_output_folder(str(out))

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from gradwise.curvature import landscape, sharpness

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    loaded = load(args, chosen)
    report, losses, final, workload = loaded.report, loaded.losses, loaded.final, loaded.config.workload
    train_loss = losses["train_loss"]
    generator = torch.Generator().manual_seed(args.seed)
    progress = not args.no_progress
    text: list[str] = []
    line = surface = rows = None
    ends = ("", "")

    if loaded.ends is not None:
        start, end, *names = loaded.ends
        ends = (names[0], names[1])
        cost = landscape.line_cost(args.points, len(losses))
        announce(args, "line", cost, f"{ends[0]} -> {ends[1]}, {args.points} points x {len(losses)} losses")
        alphas = landscape.alpha_grid(args.alpha_range[0], args.alpha_range[1], args.points)
        line = landscape.interpolate(losses, start, end, alphas, progress=progress)
        report["line"] = {"from": ends[0], "to": ends[1], "cost": cost.to_dict(), **line.to_dict()}
        text.append(
            text_table(
                ["alpha", *line.losses],
                [
                    [f"{alpha:+.3f}", *(f"{values[k]:.5g}" for values in line.losses.values())]
                    for k, alpha in enumerate(line.alphas)
                ],
            )
        )

    if "plane" in chosen:
        cost = landscape.plane_cost(args.grid)
        announce(
            args,
            "plane",
            cost,
            f"{args.grid} x {args.grid} points in [-{args.span:g}, {args.span:g}]^2, "
            f"train_loss on {report['sample']['train_examples']} examples",
        )
        directions = (
            landscape.random_direction(final, generator, one_dim=args.one_dim),
            landscape.random_direction(final, generator, one_dim=args.one_dim),
        )
        surface = landscape.plane(
            {"train_loss": train_loss},
            final,
            directions,
            landscape.plane_coordinates(args.span, args.grid),
            progress=progress,
        )
        values = surface.losses["train_loss"]
        report["plane"] = {
            "grid": args.grid,
            "span": args.span,
            "one_dim": args.one_dim,
            "cost": cost.to_dict(),
            **surface.to_dict(),
        }
        centre = f"at the solution {values[args.grid // 2, args.grid // 2]:.5g}, " if args.grid % 2 else ""
        text.append(f"plane: train_loss {centre}lowest {values.min():.5g}, highest {values.max():.5g} on the grid")

    if "sharpness" in chosen:
        dim = report["parameters"]
        cost = sharpness.sharpness_cost(dim, steps=args.lanczos_steps, probes=args.probes)
        dense = ", the dense Hessian" if dim * dim <= sharpness.DENSE_LIMIT else ""
        announce(
            args,
            "sharpness",
            cost,
            f"{dim:,} parameters, {args.lanczos_steps} Lanczos steps, {args.probes} probes{dense}",
        )
        with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no second derivative
            found = sharpness.sharpness(
                train_loss, final, steps=args.lanczos_steps, probes=args.probes, generator=generator
            )
        report["sharpness"] = {"cost": cost.to_dict(), **found.to_dict()}
        said = (
            f"sharpness: top eigenvalue {found.top_eigenvalue:.5g} +- {found.top_eigenvalue_error:.2g} "
            f"(Lanczos residual), trace {found.trace:.5g} +- {found.trace_standard_error:.2g} "
            f"(standard error, {found.probes} probes)"
        )
        if found.exact is not None:
            said += (
                f"; exact (dense): top {found.exact.top_eigenvalue:.5g}, bottom "
                f"{found.exact.bottom_eigenvalue:.5g}, trace {found.exact.trace:.5g}"
            )
        text.append(said)

    if "layers" in chosen:
        cost = sharpness.layer_curvature_cost([p.numel() for p in final], steps=args.lanczos_steps)
        announce(args, "layers", cost, f"{len(final)} tensors, {args.lanczos_steps} Lanczos steps at each end")
        with sdpa_kernel(SDPBackend.MATH):
            rows = sharpness.layer_curvature(
                train_loss, final, loaded.names, steps=args.lanczos_steps, generator=generator, progress=progress
            )
        report["layers"] = {"cost": cost.to_dict(), "rows": [row.to_dict() for row in rows]}
        text.append(
            text_table(
                ["tensor", "size", "lambda_max", "+-", "lambda_min", "+-", "condition"],
                [
                    [
                        row.name,
                        f"{row.size:,}",
                        f"{row.lambda_max:.4g}",
                        f"{row.lambda_max_error:.2g}",
                        f"{row.lambda_min:.4g}",
                        f"{row.lambda_min_error:.2g}",
                        "inf" if math.isinf(row.condition) else f"{row.condition:.4g}",
                    ]
                    for row in rows
                ],
            )
        )

    written: list[str] = []
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if not args.no_plot:
            from gradwise.curvature import landscape_plots as plots

            if line is not None:
                plots.plot_line(line, out / "line.png", f"{workload}: {ends[0]} -> {ends[1]}", ends)
                written.append(str(out / "line.png"))
            if surface is not None:
                title = f"{workload}: train_loss around the final parameters"
                plots.plot_contour(surface, "train_loss", out / "plane_contour.png", title)
                plots.plot_surface(surface, "train_loss", out / "plane_surface.png", title)
                written += [str(out / "plane_contour.png"), str(out / "plane_surface.png")]
            if rows is not None:
                plots.plot_layers(rows, out / "layers.png", f"{workload}: curvature of each tensor's Hessian block")
                written.append(str(out / "layers.png"))
        written.append(str(out / "landscape.json"))
        report["files"] = written
        (out / "landscape.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    if args.json:
        print(json.dumps(report, indent=2, allow_nan=False))
    else:
        print("\n\n".join(text))
        if written:
            print(f"wrote {', '.join(written)}")
    return 0
