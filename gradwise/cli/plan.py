"""``gradwise plan``: memory, step time, batch size, stability, networks and failures, before a run."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradwise.cli.parsing import (
    OneLineErrorParser,
    UsageError,
    output_folder,
    parse_key_values,
    parse_list,
    text_table,
)
from gradwise.optim.state_formats import check_state_format
from gradwise.plan import memory, svg_bars
from gradwise.train.config import LARGEST_SEED
from gradwise.validation import check_choice, check_int, check_range

if TYPE_CHECKING:
    from gradwise.plan.communication import AlphaBeta
    from gradwise.plan.owner_computes import OwnerComputes
    from gradwise.plan.parallel_step_time import ParallelStepTime
    from gradwise.plan.parallelism import Layout
    from gradwise.plan.step_time import FormatPlan

GB = 1e9
DEFAULT_OUT = "plan-results"
DEFAULT_SPEEDUPS = {"fp32": 0.5, "bf16": 1.0, "mixed": 1.0, "fp8": 2.0}
MEMORY_KINDS = ["parameters", "gradients", "master_weights", "optimizer_state", "activations"]
"""The parts of a device's memory, in the order of the table's columns and of the plot's stacks."""

EPILOG = """\
examples:
  gradwise plan memory --params 7e9 --optimizer adamw --precision bf16 --zero 3 --devices 8
  gradwise plan memory --layers 96 --width 12288 --seq-len 2048 --tp 8 --pp 8 --microbatches 24 --devices 8
  gradwise plan step --params 1.3e9 --devices 64 --bandwidth 25e9 --latency 5e-6
  gradwise plan step --layers 96 --width 12288 --seq-len 2048 --tp 8 --pp 8 --microbatches 24 --tokens 3145728
  gradwise plan batch --workload mlp --eps 0.1 --delta 0.05
  gradwise plan stability --tau 4
  gradwise plan network topology.json
  gradwise plan failures jobs.csv"""


def register(subparsers: argparse._SubParsersAction, summary: str) -> None:
    """Add the ``plan`` parser; ``summary`` is its line in ``gradwise --help``."""
    parser = subparsers.add_parser(
        "plan",
        help=summary,
        description="Analytic models that decide a large run before it starts; each prints a table "
        "(--json: machine-readable output) and, where a curve says more, writes a plot to --out.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    models = parser.add_subparsers(dest="model", metavar="MODEL", parser_class=OneLineErrorParser)
    models.required = True
    for add in (_add_memory, _add_step, _add_batch, _add_stability, _add_network, _add_failures):
        add(models)


def _common(parser: argparse.ArgumentParser, plot: bool) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of the table")
    if plot:
        parser.add_argument("--out", type=output_folder, default=Path(DEFAULT_OUT), metavar="DIR",
                            help=f"folder for the plot (default: {DEFAULT_OUT})")
        parser.add_argument("--no-plot", action="store_true", help="write no plot")


def _emit(args: argparse.Namespace, payload: dict, text: str) -> None:
    print(json.dumps(payload, indent=2, allow_nan=False) if args.json else text)


def _plot_path(args: argparse.Namespace, name: str) -> Path | None:
    if args.no_plot:
        return None
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out: {str(args.out)!r} exists and is not a directory")
    args.out.mkdir(parents=True, exist_ok=True)
    return args.out / name


def _gb(value: float) -> str:
    return f"{value / GB:.3f}"


def _wrote(path: Path | None) -> str:
    """The last line of a text: the plot written, if one was."""
    return "" if path is None else f"\n\nwrote {path}"


LAYOUT_OPTIONS = ("tp", "pp", "microbatches", "schedule", "virtual_stages")


def _add_layout(parser: argparse.ArgumentParser, sequence_parallel: bool) -> None:
    """The 3-D layout's options: --devices stays the data-parallel degree."""
    group = parser.add_argument_group(
        "3-D parallelism (Narayanan et al. 2021, arXiv:2104.04473): pipeline x data x tensor parallel; --devices "
        "is the data-parallel degree and the devices in all are devices x tp x pp; needs --layers, --width and "
        "--seq-len")
    group.add_argument("--tp", type=int, metavar="T",
                       help="tensor-parallel degree: each layer's matrices split in Megatron's layout (default: 1)")
    group.add_argument("--pp", type=int, metavar="P", help="pipeline stages of layers / P layers each (default: 1)")
    group.add_argument("--microbatches", type=int, metavar="M",
                       help="micro-batches per step through the pipeline (default: 1)")
    group.add_argument("--schedule", metavar="NAME",
                       help="pipeline schedule: gpipe, 1f1b or interleaved-1f1b (default: 1f1b)")
    group.add_argument("--virtual-stages", type=int, metavar="V",
                       help="layer chunks per device under interleaved-1f1b (default: 2)")
    if sequence_parallel:
        group.add_argument("--sequence-parallel", action="store_true",
                           help="split the activations that tensor parallelism keeps whole along the sequence")


def _layout_given(args: argparse.Namespace) -> bool:
    return any(getattr(args, name) is not None for name in LAYOUT_OPTIONS) or getattr(args, "sequence_parallel", False)


def _layout(args: argparse.Namespace, dp: int) -> Layout:
    from gradwise.plan.parallelism import Layout

    schedule = "1f1b" if args.schedule is None else args.schedule
    chunks = args.virtual_stages if args.virtual_stages is not None else 2 if schedule == "interleaved-1f1b" else 1
    return Layout(pp=1 if args.pp is None else args.pp, dp=dp, tp=1 if args.tp is None else args.tp,
                  microbatches=1 if args.microbatches is None else args.microbatches, schedule=schedule,
                  virtual_stages=chunks, sequence_parallel=getattr(args, "sequence_parallel", False))


def _layout_json(layout: Layout) -> dict[str, Any]:
    return {"pp": layout.pp, "dp": layout.dp, "tp": layout.tp, "devices": layout.devices,
            "microbatches": layout.microbatches, "schedule": layout.schedule, "virtual_stages": layout.virtual_stages,
            "sequence_parallel": layout.sequence_parallel}


def _layout_text(layout: Layout) -> str:
    chunks = f" of {layout.virtual_stages} chunks per device" if layout.virtual_stages > 1 else ""
    return (f"pp {layout.pp} x dp {layout.dp} x tp {layout.tp} = {layout.devices} devices, {layout.schedule}{chunks}, "
            f"{layout.microbatches} micro-batch(es) per step")


# ---- memory ---------------------------------------------------------------------------------


def _add_memory(models) -> None:
    parser = models.add_parser(
        "memory", help="bytes per device by optimizer, precision and ZeRO stage",
        description="Bytes per device of parameters, gradients, master weights, optimizer state and "
        "activations, under data parallelism and ZeRO stages 1-3. Precisions: "
        + "; ".join(f"{p.name}: {p.description}" for p in memory.PRECISIONS.values())
        + ". Optimizers: " + ", ".join(memory.OPTIMIZERS) + ".",
    )
    parser.add_argument("--params", type=float, metavar="N",
                        help="parameter count (default: that of the transformer of --layers/--width/--vocab)")
    parser.add_argument("--optimizer", default="adamw", help="optimizer (default: adamw)")
    parser.add_argument("--precision", default="bf16", help="number format recipe (default: bf16)")
    parser.add_argument("--state-format", default="fp32", metavar="FORMAT",
                        help="the optimizer's moments: fp32 (as the precision says), bf16, bf16-sr, 8bit or 4bit "
                             "(default: fp32)")
    parser.add_argument("--zero", type=int, default=0, metavar="STAGE", help="ZeRO stage 0-3 (default: 0)")
    parser.add_argument("--devices", type=int, default=1, metavar="N",
                        help="data-parallel devices (with --tp/--pp: the data-parallel degree; default: 1)")
    parser.add_argument("--layers", type=int, metavar="L", help="transformer layers (for activations)")
    parser.add_argument("--width", type=int, metavar="H",
                        help="hidden width (default with --params alone: a GPT-like width for that size)")
    parser.add_argument("--heads", type=int, metavar="A", help="attention heads (default: width / 128)")
    parser.add_argument("--vocab", type=int, default=50257, metavar="V", help="vocabulary size (default: 50257)")
    parser.add_argument("--seq-len", type=int, metavar="S",
                        help="sequence length (for activations; learned position embeddings of S rows are counted)")
    parser.add_argument("--micro-batch", type=int, default=1, metavar="B",
                        help="sequences per device (per micro-batch with --microbatches; default: 1)")
    parser.add_argument("--checkpointing", action="store_true", help="full activation checkpointing")
    _add_layout(parser, sequence_parallel=True)
    _common(parser, plot=True)
    parser.set_defaults(handler=_memory)


def _memory(args: argparse.Namespace) -> int:
    check_choice("optimizer", args.optimizer, memory.OPTIMIZERS)
    check_choice("precision", args.precision, memory.PRECISIONS)
    check_state_format(memory.OPTIMIZERS[args.optimizer].optimizer, args.state_format)
    if args.state_format == "fp32":  # a preset may name one (adamw-8bit)
        args.state_format = memory.OPTIMIZERS[args.optimizer].options.get("state_format", "fp32")
    optimizer = args.optimizer if args.state_format == "fp32" else f"{args.optimizer} ({args.state_format} state)"
    check_choice("zero", args.zero, memory.ZERO_STAGES)
    check_int("devices", args.devices, 1)
    if args.params is not None:
        check_range("params", args.params, 1.0)
    for name in ("layers", "width", "heads", "vocab", "seq_len", "micro_batch"):  # used or not: a typo is refused
        if getattr(args, name) is not None:
            check_int(name.replace("_", "-"), getattr(args, name), 1)
    fmt = memory.PRECISIONS[args.precision]
    if _layout_given(args):
        return _memory_3d(args, optimizer, fmt)
    architecture = args.layers is not None
    if args.params is None and not (architecture and args.width):
        raise UsageError("give --params, or --layers and --width (and --vocab) of a transformer")
    if args.params is not None:
        width = args.width if args.width is not None else memory.default_width(args.params)
        shapes = memory.square_matrix_shapes(args.params, width)
    else:
        width = args.width
        shapes = memory.transformer_shapes(args.layers, width, args.vocab, args.seq_len or 0)
    activations = 0
    if args.seq_len is not None:
        if not architecture:
            raise UsageError("--seq-len needs --layers (activations are those of a transformer)")
        heads = args.heads if args.heads is not None else max(1, width // 128)
        activations = memory.transformer_activation_bytes(
            args.layers, width, heads, args.seq_len, args.micro_batch, fmt.activation_bytes, args.checkpointing
        )
    params = memory.parameter_count(shapes)
    owners = _owner_computes(args, shapes, args.precision, args.state_format)
    rows: list[dict[str, Any]] = []
    for stage in memory.ZERO_STAGES:
        estimate = memory.estimate_memory(shapes, args.optimizer, args.precision, stage, args.devices, activations,
                                          args.state_format)
        if stage == 3 and owners is not None:  # FSDP2: each matrix's whole state on its owner
            most = owners.ranks[owners.most_loaded]
            estimate = dataclasses.replace(estimate, optimizer_state=float(most.state_bytes))
        label = "DP" if stage == 0 else f"ZeRO-{stage}"
        rows.append({"zero_stage": stage, "label": label, "bytes": estimate.as_dict()})
    chosen = rows[args.zero]
    payload = {
        "params": params, "optimizer": args.optimizer, "precision": args.precision,
        "state_format": args.state_format, "devices": args.devices,
        "zero_stage": args.zero, "bytes_per_param": {
            "weights": fmt.weight_bytes, "gradients": fmt.grad_bytes, "master": fmt.master_bytes,
            "optimizer_state": memory.optimizer_state_bytes(shapes, args.optimizer, fmt.state_bytes,
                                                            args.state_format) / params,
        },
        "activations_included": args.seq_len is not None, "per_device": chosen["bytes"], "by_stage": rows,
        **({"owner_computes": owners.as_dict()} if owners is not None else {}),
    }
    title = f"{params / 1e9:.3g}B params, {optimizer}, {args.precision}, {args.devices} devices"
    path = _plot_memory(args, payload, rows, title)
    table = _memory_table(rows, chosen)
    per_param = payload["bytes_per_param"]
    text = (
        f"{params:.4g} parameters, {optimizer}, {args.precision} ({fmt.description}), "
        f"{args.devices} device(s); GB (1e9 bytes) per device\n"
        f"bytes per parameter: weights {per_param['weights']}, gradients {per_param['gradients']}, "
        f"master {per_param['master']}, optimizer state {per_param['optimizer_state']:.4g}\n\n{table}"
        + ("" if args.seq_len is not None else "\n(activations not included: give --layers, --width and --seq-len)")
        + ("" if owners is None else "\n\nZeRO-3 is FSDP2 with owner-computes: its optimizer state is the most loaded "
           "rank's\n" + _owner_computes_text(owners))
        + _wrote(path)
    )
    _emit(args, payload, text)
    return 0


def _plot_memory(args: argparse.Namespace, payload: dict[str, Any], rows: list[dict[str, Any]],
                 title: str) -> Path | None:
    """Each ZeRO stage's bytes per device as stacked bars, unless --no-plot; the plot's path goes in the payload.
    The SVG is written by hand: importing matplotlib would cost a third of torch's start-up."""
    path = _plot_path(args, "memory.svg")
    if path is not None:
        series = {kind.replace("_", " "): [row["bytes"][kind] / GB for row in rows] for kind in MEMORY_KINDS}
        payload["plot"] = str(svg_bars.write_stacked_bars(path, [row["label"] for row in rows], series, title,
                                                          "GB per device", total_format="{:.3g} GB"))
    return path


def _memory_table(rows: list[dict[str, Any]], chosen: dict[str, Any], pp: int | None = None) -> str:
    """GB per device of each kind by ZeRO stage, the chosen stage starred; with ``pp``, the pipeline stage
    each row is of."""
    kinds = [*MEMORY_KINDS, "total"]
    stage = ["pp stage"] if pp is not None else []
    return text_table(
        ["stage", *stage, *(k.replace("_weights", "").replace("optimizer_", "") for k in kinds)],
        [[("* " if row is chosen else "  ") + row["label"],
          *([f"{row['pipeline_stage']} of {pp}"] if pp is not None else []),
          *(_gb(row["bytes"][k]) for k in kinds)] for row in rows],
    )


def _owner_computes(args: argparse.Namespace, shapes: memory.Shapes, precision: str, state_format: str,
                    tensor_parallel: int = 1) -> OwnerComputes | None:
    """Owner-computes for an optimizer that updates whole matrices on a 1-D mesh: FSDP2 (--zero 3) over
    --devices ranks, or with ``tensor_parallel`` > 1 tensor parallelism alone over that many; of the
    transformer of --layers/--width/--vocab/--seq-len, or of the tensors of ``shapes``. ``None`` for any
    other layout or optimizer (:func:`gradwise.plan.owner_computes.owner_computes`)."""
    if tensor_parallel == 1 and args.zero != 3:
        return None
    from gradwise.plan import owner_computes  # here: it loads torch and the optimizers

    model = (owner_computes.meta_tensors(shapes) if args.params is not None
             else owner_computes.meta_transformer(args.layers, args.width, args.vocab, args.seq_len or 0))
    element = owner_computes.sharded_element_bytes(precision)
    ranks, dims = ((args.devices, None) if tensor_parallel == 1
                   else (tensor_parallel, owner_computes.tensor_parallel_dims(model)))
    return owner_computes.owner_computes(args.optimizer, model, ranks, element, element,
                                         memory.PRECISIONS[precision].state_bytes, state_format, dims)


def _owner_computes_text(owners: OwnerComputes, link: AlphaBeta | None = None,
                         throughput: float | None = None) -> str:
    """Lines on each rank's optimizer state, compute and traffic under owner-computes; with ``link`` and
    ``throughput`` (FLOP/s), the slowest rank's seconds."""
    ranks = owners.ranks
    most, least = ranks[owners.most_loaded], min(ranks, key=lambda rank: rank.state_bytes)
    lines = [f"owner-computes over {len(ranks)} ranks ({owners.optimizer}: each whole-matrix update on one rank, "
             f"LPT on r*c*min(r,c)): optimizer state per rank {_gb(most.state_bytes)} GB (rank {owners.most_loaded}, "
             f"the most loaded) to {_gb(least.state_bytes)} GB, {owners.state_spread:.3f}x the mean"]
    if owners.flops_modelled:
        flops = max(rank.flops or 0 for rank in ranks)
        update = owners.update_seconds(throughput) if throughput else None
        seconds = f", {update * 1e3:.4g} ms" if update is not None else ""
        lines.append(f"update FLOPs per rank: at most {flops:.4g}{seconds} (the matrix products FlopCounterMode "
                     "counts)")
    else:
        lines.append(f"update FLOPs per rank: not modelled for {owners.optimizer} (its roots and eigenbases are not "
                     f"counted by FlopCounterMode); matrix_cost load at most {max(rank.cost for rank in ranks):.4g}")
    sent = max(rank.sent_bytes for rank in ranks)
    seconds = f", {owners.exchange_seconds(link) * 1e3:.4g} ms" if link is not None else ""
    lines.append(f"sent per rank per step: at most {sent / 1e6:.4g} MB in {owners.exchanges} "
                 f"all_to_all_single{seconds}")
    return "\n".join(lines)


def _transformer(args: argparse.Namespace, what: str) -> Any:
    """The transformer of --layers, --width, --heads, --vocab and --seq-len, which the 3-D models need."""
    from gradwise.plan.parallelism import Transformer

    if args.params is not None:
        raise UsageError(f"--params: {what} counts the transformer's own parameters; give --layers, --width and "
                         f"--seq-len instead")
    if args.layers is None or args.width is None or args.seq_len is None:
        raise UsageError(f"{what} needs the transformer: --layers, --width and --seq-len (and --heads, --vocab)")
    heads = args.heads if args.heads is not None else max(1, args.width // 128)
    return Transformer(args.layers, args.width, heads, args.vocab, args.seq_len)


def _activation_formula(layout: Layout) -> str:
    if layout.sequence_parallel:
        return "sbh(34 + 5as/h)/t (tensor and sequence parallel)"
    if layout.tp > 1:
        return "sbh(10 + 24/t + 5as/(ht)) (tensor parallel, no sequence parallelism)"
    return "sbh(34 + 5as/h)"


def _memory_3d(args: argparse.Namespace, optimizer: str, fmt: memory.Precision) -> int:
    """``plan memory`` with --tp/--pp/--microbatches: the device of the largest pipeline stage."""
    from gradwise.plan import parallelism

    model = _transformer(args, "the 3-D layout")
    layout = _layout(args, args.devices)
    layout.check(model)
    owners = (_owner_computes(args, model.shapes(), args.precision, args.state_format, layout.tp)
              if layout.tp > 1 and layout.dp == layout.pp == 1 else None)  # a 1-D tensor-parallel mesh
    stage_rows: list[list[memory.MemoryEstimate]] = []
    rows: list[dict[str, Any]] = []
    for zero in memory.ZERO_STAGES:
        stages = [parallelism.largest_device(model, layout, stage, args.optimizer, args.precision, zero,
                                             args.state_format, args.micro_batch, args.checkpointing)
                  for stage in range(layout.pp)]
        largest = parallelism.largest_stage(stages)
        stage_rows.append(stages)
        rows.append({"zero_stage": zero, "label": "DP" if zero == 0 else f"ZeRO-{zero}", "pipeline_stage": largest,
                     "bytes": stages[largest].as_dict()})
    chosen = rows[args.zero]
    shapes = model.shapes()
    params = memory.parameter_count(shapes)
    in_flight = [parallelism.layers_in_flight(model, layout, stage) for stage in range(layout.pp)]
    per_layer = memory.layer_activation_bytes(model.width, model.heads, model.seq_len, args.micro_batch,
                                              fmt.activation_bytes, layout.tp, layout.sequence_parallel)
    payload = {
        "params": params, "optimizer": args.optimizer, "precision": args.precision,
        "state_format": args.state_format, "devices": layout.devices, "layout": _layout_json(layout),
        "zero_stage": args.zero, "micro_batch": args.micro_batch, "checkpointing": args.checkpointing,
        "bytes_per_param": {
            "weights": fmt.weight_bytes, "gradients": fmt.grad_bytes, "master": fmt.master_bytes,
            "optimizer_state": memory.optimizer_state_bytes(shapes, args.optimizer, fmt.state_bytes,
                                                            args.state_format) / params,
        },
        "activations": {"formula": _activation_formula(layout), "per_layer_micro_batch": per_layer,
                        "layers_in_flight": in_flight},
        "largest_stage": chosen["pipeline_stage"], "per_device": chosen["bytes"], "by_stage": rows,
        "stages": [estimate.as_dict() for estimate in stage_rows[args.zero]],
        **({"owner_computes": owners.as_dict()} if owners is not None else {}),
    }
    title = (f"{params / 1e9:.3g}B params, {optimizer}, {args.precision}, pp {layout.pp} x dp {layout.dp} x "
             f"tp {layout.tp}, largest stage")
    path = _plot_memory(args, payload, rows, title)
    table = _memory_table(rows, chosen, layout.pp)
    per_stage = ", ".join(f"{stage}: {_gb(estimate.total)}" for stage, estimate in enumerate(stage_rows[args.zero]))
    sharding = ("FSDP2 shards of the device that holds the most (data rank 0's shards, or the owner of the most "
                "optimizer state)" if args.zero == 3
                else "ZeRO's 1/dp of the sharded kinds" if args.zero else "no data sharding")
    text = (
        f"{params:.4g} parameters, {optimizer}, {args.precision} ({fmt.description}); "
        f"GB (1e9 bytes) per device of the largest pipeline stage\n"
        f"{_layout_text(layout)} of {args.micro_batch} sequence(s); {sharding}\n"
        f"activations per layer and micro-batch: Korthikanti et al. 2022, {_activation_formula(layout)} bytes in "
        f"16 bits (here {fmt.activation_bytes}-byte values, one-byte masks); layers x micro-batches in flight per "
        f"stage: {in_flight}\n\n{table}\n\n"
        f"per pipeline stage ({chosen['label']}): {per_stage} GB"
        + ("" if owners is None else "\n\ntensor parallelism with owner-computes: the optimizer state is the most "
           "loaded rank's\n" + _owner_computes_text(owners))
        + _wrote(path)
    )
    _emit(args, payload, text)
    return 0


# ---- step time ------------------------------------------------------------------------------


def _add_step(models) -> None:
    parser = models.add_parser(
        "step", help="data-parallel step time and time to solution by number format",
        description="Step time of data-parallel training against the number of devices (fixed global "
        "batch), for several number formats: compute from 6 x params FLOPs per token at a throughput, "
        "gradient all-reduce by the alpha-beta model in DDP-sized buckets, with or without overlap. "
        "Shows where latency dominates and a faster number format stops helping.",
    )
    parser.add_argument("--params", type=float, metavar="N",
                        help="parameter count (or the transformer's --layers, --width and --seq-len)")
    parser.add_argument("--devices", type=int, default=64, metavar="N",
                        help="data-parallel devices (the table runs over powers of two up to N; default: 64)")
    parser.add_argument("--bandwidth", type=float, default=25e9, metavar="B/S",
                        help="link bandwidth, bytes/s (default: 25e9)")
    parser.add_argument("--latency", type=float, default=5e-6, metavar="S",
                        help="link latency, seconds (default: 5e-6)")
    parser.add_argument("--tokens", type=float, default=2**20, metavar="T",
                        help="tokens per step, the global batch (default: 2^20)")
    parser.add_argument("--throughput", default="4e14", metavar="FLOP/S",
                        help="achieved FLOP/s per device in bf16, or 'measure' to time a matrix product here "
                        "(default: 4e14, 40%% of an H100's dense bf16 peak)")
    parser.add_argument("--speedup", default="", metavar="FMT=X,...",
                        help="throughput of each format relative to bf16 (default: fp32=0.5,fp8=2)")
    parser.add_argument("--precisions", default="fp32,bf16,fp8", metavar="LIST",
                        help="number formats to compare (default: fp32,bf16,fp8)")
    parser.add_argument("--steps", type=float, default=1e5, metavar="N",
                        help="steps to the target in bf16, for time to solution (default: 1e5)")
    parser.add_argument("--step-factor", default="", metavar="FMT=X,...",
                        help="extra steps a format needs, e.g. fp8=1.1 (default: 1 for all)")
    parser.add_argument("--zero", type=int, default=0, metavar="STAGE", help="ZeRO stage (3: 1.5x the traffic)")
    parser.add_argument("--optimizer", default="adamw",
                        help="optimizer; with --zero 3 one that updates whole matrices (muon, shampoo, soap, ...) is "
                        "planned by owner-computes: its per-rank update and exchange (default: adamw)")
    parser.add_argument("--bucket-mb", type=float, default=25.0, metavar="MIB", help="gradient bucket (default: 25)")
    parser.add_argument("--no-overlap", action="store_true", help="communicate after the backward pass")
    model = parser.add_argument_group(
        "a transformer's shape, for the 3-D model (Narayanan et al.'s FLOPs, the pipeline bubble, each dimension's "
        "traffic; nothing overlapped)")
    model.add_argument("--layers", type=int, metavar="L", help="transformer layers")
    model.add_argument("--width", type=int, metavar="H", help="hidden width")
    model.add_argument("--heads", type=int, metavar="A", help="attention heads (default: width / 128)")
    model.add_argument("--vocab", type=int, default=50257, metavar="V", help="vocabulary size (default: 50257)")
    model.add_argument("--seq-len", type=int, metavar="S", help="sequence length")
    model.add_argument("--checkpointing", action="store_true",
                       help="full activation checkpointing: a second forward pass")
    model.add_argument("--tp-bandwidth", type=float, metavar="B/S",
                       help="link bandwidth within a tensor-parallel group (default: --bandwidth)")
    model.add_argument("--tp-latency", type=float, metavar="S",
                       help="link latency within a tensor-parallel group (default: --latency)")
    model.add_argument("--overhead", type=float, metavar="S",
                       help="software's fixed seconds per micro-batch per pipeline stage: launches, the schedule "
                       "(default: 0; measure it as the step on fast links over its m + p - 1 slots less the compute)")
    _add_layout(parser, sequence_parallel=False)
    _common(parser, plot=True)
    parser.set_defaults(handler=_step)


def _per_format(text: str, option: str) -> dict[str, float]:
    """``--speedup``/``--step-factor``: each format a known one and each factor > 0, whether or not compared."""
    values = parse_key_values(text, option)
    for name, value in values.items():
        check_choice(f"{option} format", name, memory.PRECISIONS)
        check_range(f"{option} of {name}", value, 0.0, low_open=True)
    return values


def _throughputs(args: argparse.Namespace, names: list[str]) -> tuple[dict[str, float], str]:
    from gradwise.plan import step_time

    speedups = {**DEFAULT_SPEEDUPS, **_per_format(args.speedup, "--speedup")}
    if args.throughput.strip().lower() == "measure":
        import torch

        measured = {"fp32": step_time.measure_matmul_throughput(torch.float32),
                    "bf16": step_time.measure_matmul_throughput(torch.bfloat16)}
        base, source = measured["bf16"], "measured here (1024 x 1024 matmul)"
    else:
        try:
            base = float(args.throughput)
        except ValueError:
            raise UsageError(f"--throughput must be a number of FLOP/s or 'measure', got {args.throughput!r}") from None
        check_range("throughput", base, 0.0, low_open=True)
        measured, source = {}, "given"
    result = {}
    for name in names:
        check_range(f"speedup of {name}", speedups.get(name, 1.0), 0.0, low_open=True)
        result[name] = measured.get(name, base * speedups.get(name, 1.0))
    return result, source


def _step(args: argparse.Namespace) -> int:
    from gradwise.plan import step_time
    from gradwise.plan.communication import AlphaBeta

    if args.params is not None:
        check_range("params", args.params, 1.0)
    check_int("devices", args.devices, 1)
    check_range("tokens", args.tokens, 1.0)
    check_range("bucket-mb", args.bucket_mb, 0.0, low_open=True)
    check_range("steps", args.steps, 1.0)
    check_range("bandwidth", args.bandwidth, 0.0, low_open=True)
    check_choice("zero", args.zero, memory.ZERO_STAGES)
    check_choice("optimizer", args.optimizer, memory.OPTIMIZERS)
    names = parse_list(args.precisions)
    if not names:
        raise UsageError("--precisions needs at least one number format")
    for name in names:
        check_choice("precision", name, memory.PRECISIONS)
    link = AlphaBeta.from_link(check_range("latency", args.latency, 0.0), args.bandwidth)
    throughputs, source = _throughputs(args, names)
    factors = _per_format(args.step_factor, "--step-factor")
    three_d = (_layout_given(args) or args.checkpointing
               or any(getattr(args, name) is not None for name in STEP_MODEL_OPTIONS))
    if three_d:
        return _step_3d(args, names, link, throughputs, source, factors)
    if args.params is None:
        raise UsageError("give --params, or the transformer's --layers, --width and --seq-len")
    counts = sorted({2**k for k in range(int(math.log2(args.devices)) + 1)} | {args.devices})
    options = dict(overlap=not args.no_overlap, bucket_bytes=args.bucket_mb * 2**20, zero_stage=args.zero)
    curves: dict[str, list[float]] = {n: [] for n in names}
    shares: dict[str, list[float]] = {n: [] for n in names}
    table_rows, json_rows = [], []
    for devices in counts:
        plans = step_time.compare_formats(args.params, args.tokens, devices, link, throughputs, args.steps,
                                          factors, **options)
        by_name = {plan.precision: plan for plan in plans}
        for name in names:
            curves[name].append(by_name[name].step.total)
            shares[name].append(by_name[name].step.latency_share)
        json_rows.append({"devices": devices, "formats": [_plan_json(plan) for plan in plans]})
        table_rows.append([
            str(devices),
            *(f"{by_name[n].step.total * 1e3:.4g}" for n in names),
            f"{by_name[names[-1]].step.compute * 1e3:.3g}",
            f"{by_name[names[-1]].step.communication * 1e3:.3g}",
            f"{by_name[names[-1]].step.latency_share:.0%}",
            *([f"{by_name[names[-2]].step.total / by_name[names[-1]].step.total:.2f}x"] if len(names) > 1 else []),
        ])
    final = json_rows[-1]["formats"]
    last = names[-1]
    owners = _owner_computes(args, memory.square_matrix_shapes(args.params, memory.default_width(args.params)), last,
                             "fp32")
    dominated = next((d for d, share in zip(counts, shares[last]) if share > 0.5), None)
    regime = (f"latency is most of the {last} step from {dominated} devices on: there a faster format stops helping."
              if dominated else f"latency stays below half of the {last} step up to {args.devices} devices.")
    payload = {
        "params": args.params, "tokens_per_step": args.tokens, "latency": args.latency, "bandwidth": args.bandwidth,
        "throughput": throughputs, "throughput_source": source, "steps": args.steps, **options,
        "by_devices": json_rows, "latency_dominates_from_devices": dominated,
        "time_to_solution": {row["precision"]: row["time_to_solution_s"] for row in final},
        **({"owner_computes": {**owners.as_dict(), "precision": last,
                               "update_s": owners.update_seconds(throughputs[last]),
                               "exchange_s": owners.exchange_seconds(link)}} if owners is not None else {}),
    }
    title = f"{args.params / 1e9:.3g}B params, {args.tokens:.3g} tokens/step"
    path = _plot_step_time(args, payload, counts, curves, shares, title)
    header = ["devices", *(f"{n} ms" for n in names), f"{last} compute", f"{last} comm", f"{last} latency"]
    header += [f"{last} vs {names[-2]}"] if len(names) > 1 else []
    text = (
        f"{args.params:.4g} params, {args.tokens:.4g} tokens per step, links {args.latency:g} s + "
        f"1/{args.bandwidth:.3g} s/B, {'no ' if args.no_overlap else ''}overlap, throughput {source}\n\n"
        f"{text_table(header, table_rows)}\n\n"
        f"{regime}\n\n"
        f"on {args.devices} devices:\n{_solution_table(final)}"
        + ("" if owners is None else f"\n\noptimizer step ({last}), not in the step times above:\n"
           + _owner_computes_text(owners, link, throughputs[last]))
        + _wrote(path)
    )
    _emit(args, payload, text)
    return 0


def _plot_step_time(args: argparse.Namespace, payload: dict[str, Any], devices: list[int],
                    curves: dict[str, list[float]], shares: dict[str, list[float]], title: str) -> Path | None:
    """Step time and latency share against the devices, unless --no-plot; the plot's path goes in the payload."""
    path = _plot_path(args, "step_time.png")
    if path is not None:
        from gradwise.plan import plots  # matplotlib, only for a plot

        payload["plot"] = str(plots.plot_step_time(devices, curves, shares, title, path))
    return path


def _solution_table(formats: list[dict[str, Any]]) -> str:
    """Each format's throughput, steps and time to solution at the largest device count."""
    return text_table(
        ["format", "FLOP/s", "steps", "step ms", "time to solution (h)"],
        [[row["precision"], f"{row['throughput']:.3g}", f"{row['steps_to_solution']:.4g}",
          f"{row['step_s'] * 1e3:.4g}", f"{row['time_to_solution_s'] / 3600:.4g}"] for row in formats],
    )


STEP_MODEL_OPTIONS = ("layers", "width", "heads", "seq_len", "tp_bandwidth", "tp_latency", "overhead")


def _step_3d(args: argparse.Namespace, names: list[str], link: Any, throughputs: dict[str, float], source: str,
             factors: dict[str, float]) -> int:
    """``plan step`` with a transformer's shape: the 3-D model over data-parallel degrees up to --devices."""
    from gradwise.plan.communication import AlphaBeta
    from gradwise.plan.parallel_step_time import SEND_RECV, micro_batch_size, parallel_step_time

    model = _transformer(args, "the 3-D step model")
    tp_latency = link.alpha if args.tp_latency is None else check_range("tp-latency", args.tp_latency, 0.0)
    tp_bandwidth = 1 / link.beta if args.tp_bandwidth is None else args.tp_bandwidth
    tp_link = AlphaBeta.from_link(tp_latency, check_range("tp-bandwidth", tp_bandwidth, 0.0, low_open=True))
    final = _layout(args, args.devices)
    final.check(model)
    micro_batch_size(model, final, args.tokens)  # refuses a batch that does not split at --devices

    def splits(dp: int) -> bool:
        try:
            micro_batch_size(model, _layout(args, dp), args.tokens)
        except ValueError:
            return False
        return True

    dps = [dp for dp in sorted({2**k for k in range(int(math.log2(args.devices)) + 1)} | {args.devices}) if splits(dp)]
    overhead = 0.0 if args.overhead is None else check_range("overhead", args.overhead, 0.0)
    options = dict(zero_stage=args.zero, tp_link=tp_link, checkpointing=args.checkpointing,
                   bucket_bytes=args.bucket_mb * 2**20, overhead=overhead)
    last = names[-1]
    curves: dict[str, list[float]] = {n: [] for n in names}
    shares: dict[str, list[float]] = {n: [] for n in names}
    table_rows, json_rows = [], []
    steps: dict[str, ParallelStepTime] = {}
    for dp in dps:
        layout = _layout(args, dp)
        steps = {name: parallel_step_time(model, layout, args.tokens, throughputs[name], link, name, **options)
                 for name in names}
        for name in names:
            curves[name].append(steps[name].total)
            shares[name].append(steps[name].latency_share)
        json_rows.append({"dp": dp, "devices": layout.devices, "formats": [
            _parallel_json(name, throughputs[name], steps[name], args.steps * factors.get(name, 1.0))
            for name in names]})
        step = steps[last]
        table_rows.append([
            str(dp), str(layout.devices), *(f"{steps[n].total * 1e3:.4g}" for n in names),
            *(f"{seconds * 1e3:.4g}" for seconds in (step.compute, step.bubble, step.tensor, step.pipeline,
                                                     step.data + step.tied, step.overhead)),
            f"{step.latency_share:.0%}",
            *([f"{steps[names[-2]].total / step.total:.2f}x"] if len(names) > 1 else []),
        ])
    step = steps[last]
    traffic: list[dict[str, Any]] = [
        {"stage": stage, "dimension": entry.dimension, "collective": entry.collective, "calls": entry.calls,
         "payload_bytes": entry.payload_bytes, "group": entry.group}
        for stage, entries in enumerate(step.traffic) for entry in entries]
    busiest: dict[tuple[str, str], dict[str, Any]] = {}
    for entry in traffic:
        key = (entry["dimension"], entry["collective"])
        if key not in busiest or entry["payload_bytes"] > busiest[key]["payload_bytes"]:
            busiest[key] = entry
    final_formats = json_rows[-1]["formats"]
    payload = {
        "params": model.parameter_count(), "layers": model.layers, "width": model.width, "heads": model.heads,
        "vocab": model.vocab, "seq_len": model.seq_len, "tokens_per_step": args.tokens, "layout": _layout_json(final),
        "micro_batch": step.micro_batch, "bubble_fraction": step.bubble_fraction, "latency": args.latency,
        "bandwidth": args.bandwidth, "tp_latency": tp_latency, "tp_bandwidth": tp_bandwidth,
        "throughput": throughputs, "throughput_source": source, "steps": args.steps, "zero_stage": args.zero,
        "checkpointing": args.checkpointing, "by_devices": json_rows, "traffic": traffic,
        "time_to_solution": {row["precision"]: row["time_to_solution_s"] for row in final_formats},
    }
    title = f"{model.parameter_count() / 1e9:.3g}B params, pp {final.pp} x tp {final.tp}, {args.tokens:.3g} tokens"
    path = _plot_step_time(args, payload, [row["devices"] for row in json_rows], curves, shares, title)
    header = ["dp", "devices", *(f"{n} ms" for n in names), f"{last} compute", "bubble", "tensor", "pipeline",
              "data", "overhead", "latency"]
    header += [f"{last} vs {names[-2]}"] if len(names) > 1 else []
    traffic_table = text_table(
        ["dimension", "collective", "stage", "calls", "payload GB", "group"],
        [[entry["dimension"], entry["collective"], str(entry["stage"]), str(entry["calls"]),
          _gb(entry["payload_bytes"]), str(entry["group"])] for entry in busiest.values()])
    sends = f"; {SEND_RECV} counts messages sent and received" if (("pipeline", SEND_RECV) in busiest) else ""
    skipped = "" if len(dps) > 1 or args.devices == 1 else " (no smaller data-parallel degree splits the batch)"
    text = (
        f"{model.parameter_count():.4g} params ({model.layers} layers of {model.width}, {model.heads} heads, "
        f"vocab {model.vocab}, {model.seq_len} tokens), {args.tokens:.4g} tokens per step, links {args.latency:g} s "
        f"+ 1/{args.bandwidth:.3g} s/B (tensor parallel: {tp_latency:g} s + 1/{tp_bandwidth:.3g} s/B), "
        f"nothing overlapped, throughput {source}\n\n"
        f"{text_table(header, table_rows)}{skipped}\n\n"
        f"{_layout_text(final)} of {step.micro_batch} sequence(s): the bubble (p-1)/(vm+p-1) is "
        f"{step.bubble_fraction:.1%} of the pipeline's time\n"
        f"{last} step: compute {step.compute:.4g} s + bubble {step.bubble:.4g} + tensor {step.tensor:.4g} + pipeline "
        f"{step.pipeline:.4g} + data {step.data:.4g} + tied {step.tied:.4g} + overhead {step.overhead:.4g} = "
        f"{step.total:.4g} s\n\n"
        f"traffic per device per step ({last}; each dimension's busiest stage{sends}):\n{traffic_table}\n\n"
        f"on {final.devices} devices:\n{_solution_table(final_formats)}"
        + _wrote(path)
    )
    _emit(args, payload, text)
    return 0


def _parallel_json(precision: str, throughput: float, step: ParallelStepTime, steps: float) -> dict:
    return {
        "precision": precision, "throughput": throughput, "step_s": step.total, "compute_s": step.compute,
        "bubble_s": step.bubble, "tensor_s": step.tensor, "pipeline_s": step.pipeline, "data_s": step.data,
        "tied_s": step.tied, "overhead_s": step.overhead, "latency_share": step.latency_share,
        "steps_to_solution": steps, "time_to_solution_s": steps * step.total,
    }


def _plan_json(plan: FormatPlan) -> dict:
    return {
        "precision": plan.precision, "throughput": plan.throughput, "step_s": plan.step.total,
        "compute_s": plan.step.compute, "communication_s": plan.step.communication,
        "latency_s": plan.step.latency, "latency_share": plan.step.latency_share,
        "steps_to_solution": plan.steps_to_solution, "time_to_solution_s": plan.time_to_solution,
    }


# ---- batch size -----------------------------------------------------------------------------

def _add_batch(models) -> None:
    parser = models.add_parser(
        "batch", help="mini-batch size from per-example gradient variance (Chebyshev bound)",
        description="Estimates the total variance sigma^2 of per-example gradients of a real model "
        "(torch.func.vmap), the Chebyshev batch size n >= sigma^2 / (eps^2 delta) that keeps the "
        "mini-batch gradient within eps of the full gradient with probability 1 - delta, checks it by "
        "sampling mini-batches, and gives the gradient noise scale and the linear-scaling learning rate.",
    )
    parser.add_argument("--workload", default="mlp",
                        help="classification workload of gradwise.problems at its initialisation: mlp (ReLU MLP on "
                        "a tanh teacher's labels) or logreg (default: mlp)")
    parser.add_argument("--eps", type=float, default=0.1, metavar="E",
                        help="tolerance relative to the full gradient's norm (default: 0.1)")
    parser.add_argument("--delta", type=float, default=0.05, metavar="D", help="failure probability (default: 0.05)")
    parser.add_argument("--examples", type=int, default=2048, metavar="N", help="examples (default: 2048)")
    parser.add_argument("--samples", type=int, default=2000, metavar="K",
                        help="mini-batches drawn for the check (default: 2000)")
    parser.add_argument("--base-lr", type=float, default=0.1, metavar="LR", help="lr at --base-batch (default: 0.1)")
    parser.add_argument("--base-batch", type=int, default=32, metavar="B", help="reference batch (default: 32)")
    parser.add_argument("--seed", type=int, default=0, help="data and initialisation seed (default: 0)")
    _common(parser, plot=False)
    parser.set_defaults(handler=_batch)


def _batch(args: argparse.Namespace) -> int:
    from gradwise.plan import batch_size

    check_choice("workload", args.workload, batch_size.CLASSIFICATION_WORKLOADS)
    check_range("eps", args.eps, 0.0, low_open=True)
    check_range("delta", args.delta, 0.0, 1.0, low_open=True, high_open=True)
    check_int("examples", args.examples, 2)
    check_int("samples", args.samples, 1)
    check_range("base-lr", args.base_lr, 0.0, low_open=True)
    check_int("base-batch", args.base_batch, 1)
    check_int("seed", args.seed, 0, LARGEST_SEED)
    model, inputs, targets, loss_fn = batch_size.workload_examples(args.workload, args.examples, args.seed)
    per_example = batch_size.per_example_gradients(model, loss_fn, inputs, targets)
    stats = batch_size.gradient_statistics(per_example)
    eps = args.eps * stats.mean_norm
    bound = batch_size.chebyshev_batch_size(stats.variance, eps, args.delta)
    check = batch_size.check_by_sampling(per_example, bound, eps, args.samples, args.seed)
    small, big = max(1, bound // 64), max(2, bound // 4)
    small_check = batch_size.check_by_sampling(per_example, small, eps, args.samples, args.seed + 1)
    big_check = batch_size.check_by_sampling(per_example, big, eps, args.samples, args.seed + 2)
    # E|g_B|^2 = |G|^2 + E|g_B - G|^2: the two-batch estimator of McCandlish et al. on the samples.
    norm_sq = stats.mean_norm**2
    g2, s = batch_size.noise_scale_from_two_batches(
        norm_sq + small_check.mean_squared_error, norm_sq + big_check.mean_squared_error, small, big
    )
    scaled = [(b, batch_size.linear_scaling_lr(args.base_lr, args.base_batch, b))
              for b in sorted({args.base_batch, max(1, round(stats.noise_scale)), bound})]
    payload = {
        "workload": args.workload, "examples": args.examples, "parameters": per_example.shape[1],
        "full_gradient_norm": stats.mean_norm, "variance": stats.variance, "noise_scale": stats.noise_scale,
        "noise_scale_two_batches": s / g2, "eps_relative": args.eps, "eps": eps, "delta": args.delta,
        "batch_size": bound, "sampled": {"batch": bound, "samples": check.samples,
                                         "fraction_within_eps": check.fraction_within,
                                         "mean_squared_error": check.mean_squared_error,
                                         "predicted_mean_squared_error": stats.variance / bound},
        "linear_scaling": [{"batch": b, "lr": lr} for b, lr in scaled],
    }
    rows = [
        ["parameters", str(per_example.shape[1])],
        ["full gradient norm |G|", f"{stats.mean_norm:.4g}"],
        ["total variance sigma^2", f"{stats.variance:.4g}"],
        ["noise scale B_simple = sigma^2/|G|^2", f"{stats.noise_scale:.4g}"],
        [f"  from batches of {small} and {big}", f"{s / g2:.4g}"],
        [f"eps = {args.eps:g} |G|, delta = {args.delta:g}: batch size", str(bound)],
        [f"sampled: within eps ({check.samples} batches)", f"{check.fraction_within:.2%} (>= {1 - args.delta:.0%})"],
        ["sampled mean |g_n - G|^2 (model sigma^2/n)",
         f"{check.mean_squared_error:.4g} ({stats.variance / bound:.4g})"],
        *([f"linear scaling: lr at batch {b}", f"{lr:.4g}"] for b, lr in scaled),
    ]
    heading = f"workload {args.workload}: {args.examples} examples"
    _emit(args, payload, f"{heading}\n\n" + text_table(["quantity", "value"], rows))
    return 0


# ---- stability ------------------------------------------------------------------------------


def _add_stability(models) -> None:
    parser = models.add_parser(
        "stability", help="largest stable step with stale gradients; GD and heavy-ball rates",
        description="Delayed gradient descent x_{k+1} = x_k - eta a x_{k-tau} is stable iff "
        "eta a < 2 sin(pi / (4 tau + 2)). Prints the critical eta a by formula and by simulation for "
        "tau = 0..--max-tau, the largest lr for a curvature, and the rates of gradient descent and "
        "heavy ball for a condition number; plots the stability region.",
    )
    parser.add_argument("--tau", type=int, default=4, metavar="T", help="delay in steps (default: 4)")
    parser.add_argument("--max-tau", type=int, metavar="T", help="last delay of the table (default: max(10, tau))")
    parser.add_argument("--curvature", type=float, metavar="A",
                        help="largest Hessian eigenvalue a: prints the largest stable lr C / a")
    parser.add_argument("--kappa", type=float, metavar="K", help="condition number for the GD and heavy-ball rates")
    parser.add_argument("--no-simulation", action="store_true", help="skip the simulated boundary")
    _common(parser, plot=True)
    parser.set_defaults(handler=_stability)


def _stability(args: argparse.Namespace) -> int:
    from gradwise.plan import stability

    check_int("tau", args.tau, 0, 1000)
    max_tau = args.max_tau if args.max_tau is not None else max(10, args.tau)
    check_int("max-tau", max_tau, args.tau, 1000)
    if args.curvature is not None:
        check_range("curvature", args.curvature, 0.0, low_open=True)
    taus = list(range(max_tau + 1))
    formula = [stability.critical_step(t) for t in taus]
    simulated = None if args.no_simulation else stability.simulated_critical_step(taus)
    rows = []
    for i, tau in enumerate(taus):
        row = [("* " if tau == args.tau else "  ") + str(tau), f"{formula[i]:.6f}"]
        if simulated is not None:
            row += [f"{simulated[i]:.6f}", f"{simulated[i] / formula[i] - 1:+.1e}"]
        if args.curvature is not None:
            row.append(f"{formula[i] / args.curvature:.4g}")
        rows.append(row)
    header = ["tau", "critical eta a"] + (["simulated", "rel. diff"] if simulated else [])
    header += ["max lr"] if args.curvature is not None else []
    table = [{"tau": t, "formula": formula[t], **({"simulated": simulated[t]} if simulated else {})} for t in taus]
    payload: dict = {"tau": args.tau, "critical_step": formula[args.tau], "table": table}
    if args.curvature is not None:
        payload["curvature"] = args.curvature
        payload["max_lr"] = formula[args.tau] / args.curvature
    text = f"delayed gradient descent, stable iff eta a < 2 sin(pi / (4 tau + 2))\n\n{text_table(header, rows)}"
    if args.kappa is not None:
        kappa = check_range("kappa", args.kappa, 1.0)
        step, momentum = stability.heavy_ball_parameters(1.0, 1.0 / kappa)
        rates = {"gradient_descent": stability.gradient_descent_rate(1.0, 1.0 / kappa),
                 "heavy_ball": stability.optimal_heavy_ball_rate(1.0, 1.0 / kappa),
                 "heavy_ball_step_times_L": step, "heavy_ball_momentum": momentum}
        payload["rates"] = {"kappa": kappa, **rates}
        text += (
            f"\n\nkappa = {kappa:g}: gradient descent at step 2/(L+mu) contracts by {rates['gradient_descent']:.6f} "
            f"per step; heavy ball (step {step:.4g}/L, momentum {momentum:.4g}) by {rates['heavy_ball']:.6f}"
        )
    path = _plot_path(args, "stability.png")
    if path is not None:
        marked = (args.tau, formula[args.tau])
        from gradwise.plan import plots  # matplotlib, only for a plot

        payload["plot"] = str(plots.plot_stability_region(taus, formula, simulated, marked, path))
        text += f"\n\nwrote {path}"
    _emit(args, payload, text)
    return 0


# ---- network --------------------------------------------------------------------------------


def _add_network(models) -> None:
    parser = models.add_parser(
        "network", help="minimum spanning tree and max flow / min cut of a cluster topology",
        description="Reads a topology (JSON with links, source and sinks, or CSV with columns "
        "from,to,latency,bandwidth) and prints the minimum spanning tree of the latency (or cost) graph "
        "and the maximum data flow from the source (storage) to the sinks (workers) with a minimum cut.",
    )
    parser.add_argument("topology", type=Path, help="a .json or .csv topology file")
    parser.add_argument("--source", help="storage node (default: the topology's 'source')")
    parser.add_argument("--sinks", type=parse_list, help="comma-separated worker nodes (default: the topology's)")
    _common(parser, plot=False)
    parser.set_defaults(handler=_network)


def _network(args: argparse.Namespace) -> int:
    from gradwise.plan import network

    topology = network.read_topology(args.topology)
    if args.sinks is not None:  # parse_list lower-cases; match node names case-insensitively
        lookup = {name.lower(): name for name in topology.nodes}
        args.sinks = [lookup.get(sink, sink) for sink in args.sinks]
        if not args.sinks:
            raise UsageError("--sinks names no node")
    for role, name in [("--source", args.source), *(("--sinks", sink) for sink in args.sinks or [])]:
        if name is not None and name not in topology.nodes:  # refused even where no max flow is computed
            raise UsageError(f"{role}: {name!r} is not a node of the topology (nodes: {', '.join(topology.nodes)})")
    payload: dict = {"nodes": topology.nodes}
    parts = []
    if any(link.latency is not None for link in topology.links):
        tree = network.spanning_tree(topology)
        payload["spanning_tree"] = {"links": [{"from": u, "to": v, "latency": w} for u, v, w in tree.links],
                                    "total": tree.total, "components": tree.components}
        note = "" if tree.components == 1 else f" (not connected: a forest of {tree.components} trees)"
        parts.append(f"minimum spanning tree: total latency {tree.total:.4g}{note}\n"
                     + text_table(["from", "to", "latency"], [[u, v, f"{w:.4g}"] for u, v, w in tree.links]))
    if any(link.bandwidth is not None for link in topology.links) and (args.source or topology.source):
        flow = network.max_flow(topology, args.source, args.sinks)
        payload["max_flow"] = {
            "source": flow.source, "sinks": flow.sinks, "value": flow.value, "per_sink": flow.per_sink,
            "min_cut": [{"from": u, "to": v, "bandwidth": b} for u, v, b in flow.cut],
        }
        parts.append(
            f"maximum flow {flow.source} -> {', '.join(flow.sinks)}: {flow.value:.4g} bytes/s\n"
            + text_table(["sink", "bytes/s"], [[s, f"{v:.4g}"] for s, v in flow.per_sink.items()])
            + "\n\nminimum cut (the bottleneck links):\n"
            + text_table(["from", "to", "bandwidth"], [[u, v, f"{b:.4g}"] for u, v, b in flow.cut])
        )
    elif args.sinks or args.source:
        raise UsageError("max flow needs links with a bandwidth and a source")
    _emit(args, payload, "\n\n".join(parts))
    return 0


# ---- failures -------------------------------------------------------------------------------


def _add_failures(models) -> None:
    parser = models.add_parser(
        "failures", help="chi-squared test: do failure types depend on hardware?",
        description="Reads job records (CSV with columns hardware and outcome) and tests whether the "
        "outcome depends on the hardware (Pearson's chi-squared test of independence); prints the table "
        "of counts, the statistic, the p-value and the cells that drive it (adjusted residuals).",
    )
    parser.add_argument("jobs", type=Path, help="CSV file with columns hardware,outcome")
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level (default: 0.05)")
    _common(parser, plot=False)
    parser.set_defaults(handler=_failures)


def _failures(args: argparse.Namespace) -> int:
    from gradwise.plan import failures

    check_range("alpha", args.alpha, 0.0, 1.0, low_open=True, high_open=True)
    result = failures.dependence_test(failures.read_jobs(args.jobs), args.alpha)
    payload = {
        "hardware": result.hardware, "outcomes": result.outcomes, "observed": result.observed.tolist(),
        "expected": result.expected.tolist(), "residuals": result.residuals.tolist(),
        "statistic": result.statistic, "dof": result.dof, "p_value": result.p_value,
        "residual_threshold": result.threshold, "small_expected_cells": result.small_expected,
        "driving_cells": [cell.__dict__ for cell in result.driving_cells],
    }
    counts = text_table(
        ["hardware", *result.outcomes],
        [[h, *(f"{result.observed[i, j]} ({result.expected[i, j]:.1f})" for j in range(len(result.outcomes)))]
         for i, h in enumerate(result.hardware)],
    )
    verdict = "depends on" if result.p_value < args.alpha else "shows no significant dependence on"
    text = (
        f"observed (expected under independence) counts:\n{counts}\n\n"
        f"chi-squared = {result.statistic:.4g}, dof = {result.dof}, p-value = {result.p_value:.3g}: "
        f"outcome {verdict} hardware at alpha = {args.alpha:g}"
    )
    if result.driving_cells:
        text += f"\n\ncells that drive it (|adjusted residual| > {result.threshold:.2f}):\n" + text_table(
            ["hardware", "outcome", "observed", "expected", "residual"],
            [[c.hardware, c.outcome, str(c.observed), f"{c.expected:.1f}", f"{c.residual:+.2f}"]
             for c in result.driving_cells],
        )
    if result.small_expected:
        text += f"\n\nnote: {result.small_expected} cell(s) expect fewer than 5 jobs; the p-value is approximate"
    _emit(args, payload, text)
    return 0
