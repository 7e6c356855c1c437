"""``gradwise distributed``: the distributed methods that are not training-loop strategies, one command each.

Each subcommand runs one job on a ``torch.distributed`` process group (gloo, CPU) and has
rank 0 print a summary and write ``summary.json`` and a plot to ``--out``:

- ``parameter-server``: asynchronous SGD (:mod:`gradwise.distributed.algorithms.parameter_server`);
  rank 0 serves, ranks 1..N-1 work on their own slices of the ``logreg`` or ``mlp`` data.
- ``fedavg``: federated averaging (:mod:`gradwise.distributed.algorithms.federated`) and ``admm``:
  consensus ADMM (:mod:`gradwise.distributed.algorithms.admm`), every rank one client of the
  label-skewed logistic regression of :mod:`gradwise.distributed.algorithms.federated_logistic`,
  judged against its centralised optimum.
- ``split``: split learning (:mod:`gradwise.distributed.algorithms.split_learning`) of the ``mlp``
  workload; rank 0 holds the inputs and the layers before the cut, rank 1 the rest and the
  labels.

``--nproc N`` checks the options, then runs the same command under ``torchrun`` with N
processes (as ``gradwise train --nproc`` does); ``torchrun --nproc-per-node N -m gradwise
distributed ...`` works directly.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from gradwise.cli.launch import run_under_torchrun
from gradwise.cli.parsing import OneLineErrorParser, UsageError, check_output_folder, output_folder
from gradwise.distributed import DistContext, RankSlice, init_distributed, shutdown
from gradwise.distributed.algorithms.admm import LOCAL_SOLVERS, consensus_admm
from gradwise.distributed.algorithms.federated import FedAvg
from gradwise.distributed.algorithms.federated_logistic import FederatedLogistic
from gradwise.distributed.algorithms.parameter_server import (
    ORDERS,
    ParameterServer,
    ParameterWorker,
)
from gradwise.distributed.algorithms.split_learning import SplitClient, SplitServer
from gradwise.problems.workloads import WORKLOADS, make_workload
from gradwise.train import OPTIMIZERS, build_optimizer
from gradwise.train.config import LARGEST_SEED
from gradwise.validation import check_int, check_range

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DESCRIPTION = """\
Distributed methods on N processes (gloo): asynchronous SGD with a parameter server,
federated averaging, consensus ADMM and split learning. Each prints a summary and writes
summary.json and a plot to --out.
Example: gradwise distributed parameter-server --nproc 4 --workload logreg --updates 600
(or torchrun --nproc-per-node 4 -m gradwise distributed parameter-server ...)
"""

PS_WORKLOADS = ("logreg", "mlp")
PS_LR = {"logreg": 0.5, "mlp": 0.2}
"""Default step of the server's plain SGD per workload (other optimizers: the workload's training lr)."""
DPI = 110


@dataclass(frozen=True)
class Method:
    """One subcommand: its options, their checks, its job on every rank and its report on rank 0."""

    name: str
    help: str
    min_ranks: int
    max_ranks: int | None
    add_options: Callable[[argparse.ArgumentParser], None]
    check: Callable[[argparse.Namespace], None]
    job: Callable[[argparse.Namespace, DistContext], dict[str, Any] | None]
    """Runs on every rank; the ranks' results, merged in rank order, are the summary."""
    report: Callable[[dict[str, Any], Path], list[str]]
    """Prints the summary, writes the plot, returns the names of the files written."""


def new_figure(**options: Any) -> Figure:
    """A matplotlib figure (Agg, no display); matplotlib is imported here, when a report plots,
    so that ``gradwise distributed --help`` and the worker ranks do not pay for its import."""
    from matplotlib.figure import Figure

    return Figure(**options)


# --- parameter server ------------------------------------------------------------------------


def ps_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--workload", choices=PS_WORKLOADS, default="logreg", help="the problem (default: logreg)")
    add("--updates", type=int, default=300, metavar="U", help="updates the server applies (default: 300)")
    add("--optimizer", choices=list(OPTIMIZERS), default="sgd", help="the server's optimizer (default: sgd)")
    add("--lr", type=float, default=None,
        help=f"the server's step size (default with sgd: {', '.join(f'{k} {v:g}' for k, v in PS_LR.items())}; "
             f"else the workload's training lr)")
    add("--batch-size", type=int, default=32, metavar="B", help="examples per worker gradient (default: 32)")
    add("--max-staleness", type=int, default=None, metavar="K",
        help="drop pushes staler than K updates; the worker re-pulls (default: no bound)")
    add("--staleness-aware", action="store_true", help="step lr / (1 + staleness) (Zhang et al. 2016)")
    add("--order", choices=ORDERS, default="arrival",
        help="take pushes as they arrive, or from workers 1, 2, ... in turn (default: arrival)")


def ps_check(args: argparse.Namespace) -> None:
    check_int("updates", args.updates, 1)
    if args.lr is None:
        args.lr = PS_LR[args.workload] if args.optimizer == "sgd" else WORKLOADS[args.workload].defaults["lr"]
    check_range("lr", args.lr, 0.0, low_open=True)
    check_int("batch_size", args.batch_size, 1)
    if args.max_staleness is not None:
        check_int("max_staleness", args.max_staleness, 0)


def ps_job(args: argparse.Namespace, context: DistContext) -> dict[str, Any] | None:
    """Every rank builds the same workload (the same initial model); worker r takes slice r - 1
    of each global batch of ``workers x batch_size`` rows, so the workers' k-th batches are disjoint."""
    workers = context.world_size - 1
    workload = make_workload(args.workload, args.batch_size * workers, args.seed)
    if context.rank != 0:
        stream = RankSlice(workload.train_data, context.rank - 1, workers)
        ParameterWorker(workload.model, lambda model: workload.loss(model, stream.next_batch())).run()
        return None
    optimizer = build_optimizer(args.optimizer, workload.model, args.lr, weight_decay=0.0)
    start = workload.evaluate(workload.model, True)
    server = ParameterServer(workload.model, optimizer, args.updates, max_staleness=args.max_staleness,
                             staleness_aware=args.staleness_aware, order=args.order)
    began = time.perf_counter()
    log = server.run()
    wall = time.perf_counter() - began
    return {
        "method": "parameter-server", "workload": args.workload, "description": workload.description,
        "workers": workers, "parameters": server.size, "optimizer": args.optimizer, "lr": args.lr,
        "batch_size": args.batch_size, "updates": args.updates, "order": args.order,
        "max_staleness": args.max_staleness, "staleness_aware": args.staleness_aware, "seed": args.seed,
        "staleness": log.staleness, "worker_of_update": log.workers, "loss_of_update": log.losses,
        "staleness_mean": sum(log.staleness) / len(log.staleness), "staleness_max": max(log.staleness),
        "dropped": log.dropped, "discarded": log.discarded,
        "bytes_received": log.bytes_received, "bytes_sent": log.bytes_sent,
        "start": start, "end": workload.evaluate(workload.model, True),
        "wall_time_s": wall, "updates_per_s": len(log.staleness) / wall,
    }


def ps_report(summary: dict[str, Any], out: Path) -> list[str]:
    histogram = sorted(Counter(summary["staleness"]).items())
    pushes = summary["updates"] + summary["dropped"] + summary["discarded"]
    print(f"parameter server: {summary['workers']} workers, {summary['updates']} updates of {summary['optimizer']} "
          f"(lr {summary['lr']:g}{', staleness-aware' if summary['staleness_aware'] else ''}, "
          f"{summary['order']} order) on {summary['workload']} ({summary['parameters']:,} parameters)")
    print(f"staleness: mean {summary['staleness_mean']:.2f}, max {summary['staleness_max']}; updates by staleness "
          + ", ".join(f"{staleness}: {count}" for staleness, count in histogram))
    bound = "" if summary["max_staleness"] is None else f" (staler than {summary['max_staleness']})"
    print(f"dropped pushes{bound}: {summary['dropped']}; pushes answered with stop: {summary['discarded']}")
    for metric in summary["start"]:
        print(f"{metric}: {summary['start'][metric]:.4f} at the start -> {summary['end'][metric]:.4f} at the end")
    print(f"{summary['wall_time_s']:.2f} s, {summary['updates_per_s']:,.0f} updates/s; server traffic "
          f"{summary['bytes_received']:,} bytes in, {summary['bytes_sent']:,} out "
          f"({summary['bytes_received'] // pushes:,} per push, "
          f"{summary['bytes_sent'] // (pushes + summary['workers']):,} "
          f"per pull)")
    figure = new_figure(figsize=(10, 4), layout="constrained")
    bars, losses = figure.subplots(1, 2)
    staleness, counts = zip(*histogram)
    bars.vlines(staleness, 0.8, counts, linewidth=4, color="tab:blue")  # rare large delays stay visible
    bars.plot(staleness, counts, "o", color="tab:blue")
    bars.set_yscale("log")
    bars.set_xlabel("staleness (updates between pull and push)")
    bars.set_ylabel("updates")
    bars.set_title(f"{summary['workers']} workers, mean staleness {summary['staleness_mean']:.2f}")
    losses.plot(range(len(summary["loss_of_update"])), summary["loss_of_update"], linewidth=0.8)
    losses.set_yscale("log")
    losses.set_xlabel("update")
    losses.set_ylabel("pushing worker's loss")
    losses.set_title(f"{summary['workload']}, {summary['optimizer']} lr {summary['lr']:g}")
    for axes in (bars, losses):
        axes.grid(alpha=0.3)
    figure.savefig(out / "staleness.png", dpi=DPI)
    return ["summary.json", "staleness.png"]


# --- federated logistic regression: FedAvg and ADMM -------------------------------------------


def problem_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--examples-per-client", type=int, default=200, metavar="N", help="examples per client (default: 200)")
    add("--features", type=int, default=10, metavar="D", help="features (default: 10)")
    add("--label-skew", type=float, default=0.5, metavar="S",
        help="0 splits the data IID, 1 sorts it by label over the clients (default: 0.5)")
    add("--l2", type=float, default=5e-2, help="L2 regularisation (default: 0.05)")


def problem_check(args: argparse.Namespace) -> None:
    check_int("examples_per_client", args.examples_per_client, 1)
    check_int("features", args.features, 1)
    check_range("label_skew", args.label_skew, 0.0, 1.0)
    check_range("l2", args.l2, 0.0, low_open=True)


def federated_problem(args: argparse.Namespace, clients: int) -> FederatedLogistic:
    return FederatedLogistic(num_clients=clients, examples_per_client=args.examples_per_client,
                             num_features=args.features, label_skew=args.label_skew, l2=args.l2, seed=args.seed)


def problem_summary(args: argparse.Namespace, problem: FederatedLogistic) -> dict[str, Any]:
    return {"clients": problem.num_clients, "examples_per_client": args.examples_per_client,
            "features": args.features, "label_skew": args.label_skew, "l2": args.l2, "seed": args.seed}


def fedavg_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--rounds", type=int, default=300, metavar="R", help="communication rounds (default: 300)")
    add("--lr", type=float, default=2.0, help="local SGD step size of round 0 (default: 2.0)")
    add("--lr-decay-rounds", type=float, default=1.0, metavar="H",
        help="step size lr / (1 + round / H); 0 keeps it fixed (default: 1)")
    add("--fraction", type=float, default=0.5, metavar="C", help="fraction of clients in each round (default: 0.5)")
    add("--local-steps", type=int, default=5, metavar="E", help="local SGD steps per round (default: 5)")
    add("--batch-size", type=int, default=None, metavar="B",
        help="examples per local step, drawn at random (default: the client's whole data)")
    problem_options(parser)


def fedavg_check(args: argparse.Namespace) -> None:
    check_int("rounds", args.rounds, 1)
    check_range("lr", args.lr, 0.0, low_open=True)
    check_range("lr_decay_rounds", args.lr_decay_rounds, 0.0)
    check_range("fraction", args.fraction, 0.0, 1.0, low_open=True)
    check_int("local_steps", args.local_steps, 1)
    problem_check(args)
    if args.batch_size is not None:
        check_int("batch_size", args.batch_size, 1, args.examples_per_client)


def fedavg_job(args: argparse.Namespace, context: DistContext) -> dict[str, Any] | None:
    problem = federated_problem(args, context.world_size)
    rank = context.rank
    w = torch.zeros(problem.num_features, dtype=torch.float64, requires_grad=True)
    fedavg = FedAvg([w], problem.sizes[rank], args.lr, fraction=args.fraction, local_steps=args.local_steps,
                    lr_decay_rounds=args.lr_decay_rounds or None, seed=args.seed)
    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + rank)

    def local_loss() -> torch.Tensor:
        if args.batch_size is None:
            return problem.loss(w, client=rank)
        rows = torch.randint(0, problem.sizes[rank], (args.batch_size,), generator=generator)
        return problem.loss(w, client=rank, rows=rows)

    objective = [float(problem.loss(w.detach()))] if rank == 0 else []
    began = time.perf_counter()
    for _ in range(args.rounds):
        fedavg.round(local_loss)
        if rank == 0:
            objective.append(float(problem.loss(w.detach())))
    wall = time.perf_counter() - began
    if rank != 0:
        return None
    optimum = problem.optimum()
    best = float(problem.loss(optimum))
    return {
        "method": "fedavg", **problem_summary(args, problem), "rounds": args.rounds, "lr": args.lr,
        "lr_decay_rounds": args.lr_decay_rounds or None, "fraction": args.fraction,
        "clients_per_round": fedavg.per_round, "local_steps": args.local_steps, "batch_size": args.batch_size,
        "objective": objective, "optimum_objective": best, "gap": [value - best for value in objective],
        "final_gap": objective[-1] - best, "distance_to_optimum": float((w.detach() - optimum).norm()),
        "bytes_per_client": fedavg.bytes_communicated, "wall_time_s": wall,
    }


def fedavg_report(summary: dict[str, Any], out: Path) -> list[str]:
    decay = "fixed" if summary["lr_decay_rounds"] is None else f"/ (1 + t / {summary['lr_decay_rounds']:g})"
    print(f"fedavg: {summary['clients']} clients ({summary['examples_per_client']} examples each, label skew "
          f"{summary['label_skew']:g}), {summary['clients_per_round']} per round, {summary['local_steps']} local "
          f"steps, lr {summary['lr']:g} {decay}, {summary['rounds']} rounds in {summary['wall_time_s']:.2f} s")
    print(f"objective F(w) {summary['objective'][0]:.6f} at the start -> {summary['objective'][-1]:.8f}; "
          f"centralised optimum F(w*) {summary['optimum_objective']:.8f} (Newton)")
    print(f"gap F(w) - F(w*) {summary['final_gap']:.3e}, |w - w*| {summary['distance_to_optimum']:.3e}; "
          f"{summary['bytes_per_client']:,} bytes communicated per client")
    figure = new_figure(figsize=(6, 4), layout="constrained")
    axes = figure.subplots()
    axes.semilogy(range(len(summary["gap"])), [max(gap, 1e-16) for gap in summary["gap"]])
    axes.set_xlabel("round")
    axes.set_ylabel("F(w) - F(w*)")
    axes.set_title(f"FedAvg, {summary['clients']} clients, {summary['clients_per_round']} per round")
    axes.grid(alpha=0.3)
    figure.savefig(out / "fedavg.png", dpi=DPI)
    return ["summary.json", "fedavg.png"]


def admm_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--rho", type=float, default=0.05, help="penalty rho (default: 0.05)")
    add("--max-iterations", type=int, default=500, metavar="K", help="most ADMM iterations (default: 500)")
    add("--local-solver", choices=LOCAL_SOLVERS, default="newton", help="the local solve (default: newton)")
    add("--local-iterations", type=int, default=3, metavar="K",
        help="local solver iterations per ADMM iteration (default: 3)")
    add("--abs-tol", type=float, default=1e-10, help="absolute tolerance of the stopping rule (default: 1e-10)")
    add("--rel-tol", type=float, default=1e-8, help="relative tolerance of the stopping rule (default: 1e-8)")
    problem_options(parser)


def admm_check(args: argparse.Namespace) -> None:
    check_range("rho", args.rho, 0.0, low_open=True)
    check_int("max_iterations", args.max_iterations, 1)
    check_int("local_iterations", args.local_iterations, 1)
    check_range("abs_tol", args.abs_tol, 0.0)
    check_range("rel_tol", args.rel_tol, 0.0)
    problem_check(args)


def admm_job(args: argparse.Namespace, context: DistContext) -> dict[str, Any] | None:
    problem = federated_problem(args, context.world_size)
    weight = problem.weight(context.rank)
    began = time.perf_counter()
    result = consensus_admm(lambda x: weight * problem.loss(x, client=context.rank),
                            torch.zeros(problem.num_features, dtype=torch.float64), rho=args.rho,
                            max_iterations=args.max_iterations, abs_tol=args.abs_tol, rel_tol=args.rel_tol,
                            local_solver=args.local_solver, local_iterations=args.local_iterations)
    wall = time.perf_counter() - began
    if context.rank != 0:
        return None
    optimum = problem.optimum()
    return {
        "method": "admm", **problem_summary(args, problem), "rho": args.rho, "local_solver": args.local_solver,
        "local_iterations": args.local_iterations, "abs_tol": args.abs_tol, "rel_tol": args.rel_tol,
        "iterations": result.iterations, "converged": result.converged,
        "primal_residuals": result.primal_residuals, "dual_residuals": result.dual_residuals,
        "final_gap": float(problem.loss(result.z)) - float(problem.loss(optimum)),
        "distance_to_optimum": float((result.z - optimum).norm()),
        "bytes_per_client": result.bytes_communicated, "wall_time_s": wall,
    }


def admm_report(summary: dict[str, Any], out: Path) -> list[str]:
    print(f"consensus admm: {summary['clients']} clients ({summary['examples_per_client']} examples each, label skew "
          f"{summary['label_skew']:g}), rho {summary['rho']:g}, local {summary['local_solver']} x "
          f"{summary['local_iterations']}")
    print(f"{'converged' if summary['converged'] else 'NOT converged'} after {summary['iterations']} iterations in "
          f"{summary['wall_time_s']:.2f} s; residuals primal {summary['primal_residuals'][-1]:.3e}, dual "
          f"{summary['dual_residuals'][-1]:.3e}")
    print(f"|z - w*| {summary['distance_to_optimum']:.3e} from the centralised optimum (Newton), gap F(z) - F(w*) "
          f"{summary['final_gap']:.3e}; {summary['bytes_per_client']:,} bytes communicated per client")
    figure = new_figure(figsize=(6, 4), layout="constrained")
    axes = figure.subplots()
    iterations = range(1, summary["iterations"] + 1)
    axes.semilogy(iterations, summary["primal_residuals"], label="primal |r|")
    axes.semilogy(iterations, [max(value, 1e-300) for value in summary["dual_residuals"]], label="dual |s|")
    axes.set_xlabel("iteration")
    axes.set_ylabel("residual")
    axes.set_title(f"consensus ADMM, {summary['clients']} clients, rho {summary['rho']:g}")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.savefig(out / "admm.png", dpi=DPI)
    return ["summary.json", "admm.png"]


# --- split learning ----------------------------------------------------------------------------


def split_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--steps", type=int, default=300, help="training steps (default: 300)")
    add("--batch-size", type=int, default=64, metavar="B", help="examples per step (default: 64)")
    add("--optimizer", choices=list(OPTIMIZERS), default="adam", help="optimizer on both sides (default: adam)")
    add("--lr", type=float, default=WORKLOADS["mlp"].defaults["lr"],
        help=f"step size (default: {WORKLOADS['mlp'].defaults['lr']:g})")
    add("--cut", type=int, default=2, metavar="K",
        help="the mlp's first K modules (Linear, ReLU, ...) run on the client (default: 2)")
    add("--compare-unsplit", action="store_true",
        help="also train the unsplit model on rank 1 from the same start and batches, and compare the losses")


def split_check(args: argparse.Namespace) -> None:
    check_int("steps", args.steps, 1)
    check_int("batch_size", args.batch_size, 1)
    check_range("lr", args.lr, 0.0, low_open=True)
    modules = len(layer_stack(make_workload("mlp", args.batch_size, args.seed).model))
    check_int("cut", args.cut, 1, modules - 1)


def layer_stack(model: nn.Module) -> nn.Sequential:
    """The mlp workload's model as the stack of layers that split learning cuts in two."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"split learning cuts an nn.Sequential, got a {type(model).__name__}")
    return model


def layers(modules: nn.Sequential) -> str:
    """``"Linear 8->128, ReLU"``."""
    return ", ".join(f"Linear {m.in_features}->{m.out_features}" if isinstance(m, nn.Linear) else type(m).__name__
                     for m in modules)


def split_job(args: argparse.Namespace, context: DistContext) -> dict[str, Any] | None:
    """Both ranks build the same model and draw the same batches (same seed): the client keeps
    the inputs and the layers before the cut, the server the labels and the rest."""
    workload = make_workload("mlp", args.batch_size, args.seed)
    model, stream = layer_stack(workload.model), workload.train_data
    bottom, top = layer_stack(model[: args.cut]), layer_stack(model[args.cut :])
    if context.rank == 0:
        client = SplitClient(bottom, build_optimizer(args.optimizer, bottom, args.lr, weight_decay=0.0), server=1)
        for _ in range(args.steps):
            client.step(stream.next_batch()[0])
        return {"client_bytes_sent": client.bytes_sent, "client_bytes_received": client.bytes_received}
    with torch.no_grad():
        activation_shape = bottom(torch.zeros(1, workload.options["dim"])).shape[1:]
    server = SplitServer(top, F.cross_entropy, build_optimizer(args.optimizer, top, args.lr, weight_decay=0.0),
                         activation_shape=activation_shape, client=0)
    began = time.perf_counter()
    losses = [server.step(stream.next_batch()[1]) for _ in range(args.steps)]
    summary = {
        "method": "split", "workload": "mlp", "description": workload.description, "steps": args.steps,
        "batch_size": args.batch_size, "optimizer": args.optimizer, "lr": args.lr, "cut": args.cut,
        "client_layers": layers(bottom), "server_layers": layers(top), "activation_shape": list(activation_shape),
        "losses": losses, "wall_time_s": time.perf_counter() - began,
        "server_bytes_sent": server.bytes_sent, "server_bytes_received": server.bytes_received,
    }
    if args.compare_unsplit:
        reference = make_workload("mlp", args.batch_size, args.seed)
        optimizer = build_optimizer(args.optimizer, reference.model, args.lr, weight_decay=0.0)
        unsplit = []
        for _ in range(args.steps):
            optimizer.zero_grad(set_to_none=True)
            loss = reference.loss(reference.model, reference.train_data.next_batch())
            loss.backward()
            optimizer.step()
            unsplit.append(float(loss.detach()))
        summary["unsplit_losses"] = unsplit
        summary["largest_loss_difference"] = max(abs(a - b) for a, b in zip(losses, unsplit))
    return summary


def split_report(summary: dict[str, Any], out: Path) -> list[str]:
    losses, window = summary["losses"], min(10, len(summary["losses"]))
    print(f"split learning: {summary['description']}")
    print(f"client (rank 0): {summary['client_layers']}; server (rank 1): {summary['server_layers']} and the loss")
    print(f"{summary['steps']} steps of {summary['optimizer']} (lr {summary['lr']:g}, batch {summary['batch_size']}) "
          f"in {summary['wall_time_s']:.2f} s; training loss {sum(losses[:window]) / window:.4f} over the first "
          f"{window} steps -> {sum(losses[-window:]) / window:.4f} over the last {window}")
    print(f"crossed: {summary['client_bytes_sent']:,} bytes of activations up, {summary['server_bytes_sent']:,} of "
          f"their gradients down ({summary['client_bytes_sent'] // summary['steps']:,} per step each way: batch "
          f"{summary['batch_size']} x activations {tuple(summary['activation_shape'])})")
    if "unsplit_losses" in summary:
        largest = summary["largest_loss_difference"]
        print(f"unsplit model, same start and batches: largest loss difference {largest:.3e}")
    figure = new_figure(figsize=(6, 4), layout="constrained")
    axes = figure.subplots()
    axes.plot(range(1, len(losses) + 1), losses, linewidth=0.8, label="split")
    if "unsplit_losses" in summary:
        axes.plot(range(1, len(losses) + 1), summary["unsplit_losses"], linewidth=0.8, linestyle="--", label="unsplit")
    axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel("training loss")
    axes.set_title(f"split learning, cut after module {summary['cut']}")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.savefig(out / "split.png", dpi=DPI)
    return ["summary.json", "split.png"]


# --- the command -------------------------------------------------------------------------------

METHODS = {
    method.name: method for method in (
        Method("parameter-server", "asynchronous SGD: rank 0 serves the parameters, the other ranks push gradients",
               2, None, ps_options, ps_check, ps_job, ps_report),
        Method("fedavg", "federated averaging of logistic regression over label-skewed clients",
               2, None, fedavg_options, fedavg_check, fedavg_job, fedavg_report),
        Method("admm", "consensus ADMM on the same federated logistic regression",
               2, None, admm_options, admm_check, admm_job, admm_report),
        Method("split", "split learning of the mlp: the client holds the first layers, the server the rest",
               2, 2, split_options, split_check, split_job, split_report),
    )
}


def register(subparsers: argparse._SubParsersAction, summary: str) -> None:
    """Add the ``distributed`` parser; ``summary`` is its line in ``gradwise --help``."""
    parser = subparsers.add_parser(
        "distributed", help=summary,
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    methods = parser.add_subparsers(dest="method_name", metavar="METHOD", parser_class=OneLineErrorParser)
    methods.required = True
    for method in METHODS.values():
        ranks = f"{method.min_ranks}" if method.max_ranks == method.min_ranks else f"at least {method.min_ranks}"
        sub = methods.add_parser(method.name, help=method.help, description=f"{method.help}; {ranks} processes.")
        sub.add_argument("--nproc", type=int, default=None, metavar="N",
                         help="processes on this machine: runs this command under torchrun with N of them")
        sub.add_argument("--seed", type=int, default=0, help="seed of the model, the data and the draws (default: 0)")
        sub.add_argument("--out", type=output_folder, default=None, metavar="DIR",
                         help=f"folder for the summary and the plot (default: runs/{method.name})")
        method.add_options(sub)
        sub.set_defaults(handler=run, method=method)


def check_ranks(method: Method, name: str, value: int) -> None:
    check_int(name, value, method.min_ranks, method.max_ranks)


def run(args: argparse.Namespace) -> int:
    method: Method = args.method
    check_int("seed", args.seed, 0, LARGEST_SEED)
    method.check(args)
    out = args.out if args.out is not None else check_output_folder(str(Path("runs") / method.name))
    args.run_folder = out  # where a worker that loses its peers keeps its traceback
    if args.nproc is not None:
        if "RANK" in os.environ:
            raise UsageError("--nproc launches torchrun; under torchrun leave it out")
        check_ranks(method, "nproc", args.nproc)
        return run_under_torchrun(args.nproc, args.argv, folder=out)
    if "RANK" not in os.environ:
        raise UsageError(f"{method.name} runs on several processes: give --nproc N, or launch with "
                         f"torchrun --nproc-per-node N -m gradwise distributed {method.name} ...")
    check_ranks(method, "world_size", int(os.environ.get("WORLD_SIZE", "1")))
    context = init_distributed("cpu")
    try:
        result = method.job(args, context)
        results: list[dict[str, Any] | None] | None = [None] * context.world_size if context.is_main else None
        torch.distributed.gather_object(result, results, dst=0)
    finally:
        shutdown()
    if results is None:  # not the main rank: it gathered nothing
        return 0
    summary: dict[str, Any] = {}
    for part in results:
        summary.update(part or {})
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    written = method.report(summary, out)
    print(f"wrote {', '.join(str(out / name) for name in written)}")
    return 0
