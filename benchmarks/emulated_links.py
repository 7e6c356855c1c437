r"""The alpha-beta model checked at 2-4 processes over emulated links (issue 18, item 4).

Issue 7's check - fit alpha and beta at two processes, predict other process counts within
25% - could not be made with gloo processes on 127.0.0.1: on two cores, three and four
processes measure the scheduler, not a link. Here every process gets a host of its own:

- **Links.** One network namespace per process (``ip netns add``), joined to a bridge in a
  namespace of its own by a veth pair, with addresses on the private 10.218.0.0/24. Each
  host's egress (its end of the veth) is limited by a token bucket (``tc qdisc ... tbf``)
  to ``--rate-mbit``, so that a process sends at most that rate whatever the others do, as
  on a switched network where every host has its own link. The kernel here has no ``netem``,
  so no delay is added: alpha is the software's latency (gloo, TCP, the scheduler) plus the
  link's serialisation of a message's first packets.
- **Why 100 Mbit/s.** Unlimited, gloo's all-reduce of 4 MiB among four processes moves
  1.3 Gbit/s per link on these two cores (the run measures it first and records it as
  ``unlimited_all_reduce``); the limit is 13 times below that, so that the processes spend most
  of a collective waiting on the link rather than queueing for a core, even while other jobs
  load the machine. A 4 MiB all-reduce over four hosts then takes about half a second and the
  whole run 8-9 minutes. The token bucket holds 4 KiB (``burst``), about three full-size frames: a
  larger bucket lets the first bytes of every message pass at the veth's speed, a smaller
  one (one frame) loses a quarter of the rate to the kernel's timer.
- **Collectives.** gloo processes started in their namespaces (``ip netns exec NS python -m
  benchmarks.emulated_links worker``, ``MASTER_ADDR`` on the bridge's subnet,
  ``GLOO_SOCKET_IFNAME`` the host's veth) time all-reduce, reduce-scatter and all-gather of
  fp32 messages of 4 KiB to 4 MiB (powers of two), ``--repeats`` calls each in interleaved
  rounds (every size once per round, in a new random order), each call's time that of its
  slowest rank (the loop of :mod:`gradwise.plan.collective_timing`). The model's alpha-beta
  formulas have no broadcast, so none is timed.
- **The fit and the predictions.** For each collective, :func:`gradwise.plan.communication.fit_alpha_beta`
  fits alpha and beta to the times at two processes and every other size (4, 16, 64, 256 KiB,
  1 and 4 MiB); :func:`~gradwise.plan.communication.collective_time`
  then predicts the held-out sizes at two processes and every size at three and four, with
  the ring's terms (:math:`p` processes, :math:`n` bytes):

  .. math::
      t_{\text{all-reduce}} = 2(p-1)\alpha + 2\tfrac{p-1}{p} n\beta, \qquad
      t_{\text{reduce-scatter}} = t_{\text{all-gather}} = (p-1)\alpha + \tfrac{p-1}{p} n\beta.

  The relative error is :math:`t_{\text{model}} / t_{\text{measured}} - 1`; the target is a
  median :math:`|e|` within 25% at each process count. The time of a case is its fastest
  call, as in ``benchmarks/collectives.py``: the model describes the undisturbed cost, and on
  a shared machine the slower calls add other jobs' scheduling delays. The median of the
  calls is fitted and checked the same way and reported beside it (``summary_median``).
- **A data-parallel step.** tiny-gpt trained with DDP and AdamW as ``benchmarks/distributed.py``
  trains it, ``--batch-size`` windows of 128 bytes per rank, each step's time that of its
  slowest rank, at 1-4 processes on unlimited links and at 2-4 on the limited ones. The
  prediction is :func:`gradwise.plan.step_time.data_parallel_step_time` with the throughput
  :math:`R = 6\Psi T_1 / t_1` that makes its compute term the step :math:`t_1` measured at one
  process (:math:`\Psi` parameters, :math:`T_1` tokens per rank) and the all-reduce's fitted
  alpha and beta for the gradients. The step on unlimited links at the same process count
  shows what the cores alone cost: the limited step less it is the link's part, compared
  with the model's communication term (``communication_error``), a clean comparison only
  where the unlimited step is not itself slowed by processes sharing the cores.
- **A 3-D step** (``3d``, issue 19). tiny-gpt under the ``3d`` strategy on four hosts, each mesh
  shape of :data:`SHAPES_3D` (pipeline x data x tensor), 1F1B over ``--microbatches``, the same
  global batch for every shape, against :func:`gradwise.plan.parallel_step_time.parallel_step_time`
  fed what the planner asks for: each collective's alpha and beta, fitted in the same run at two
  processes (every group of these meshes has two; gloo's reduce-scatter moves an all-reduce's bytes),
  the all-reduce's as the link of the sends; fp32; ZeRO stage 3 (FSDP2); the throughput that makes its
  one-device compute the step measured at one process on the whole batch; and the software's fixed
  cost per micro-batch per stage (``overhead``), calibrated on the same mesh on unlimited links, where
  it is the step over its :math:`m + (p - 1)/v` slots less a slot's compute (Python, DTensor's dispatch,
  the schedule and four processes on two cores: 5-8 times the compute here). Each shape thus runs
  on unlimited links first, to show what the cores and the software cost without the link. The
  check is the median step against the model fed the median calls' fits (a step is a sum of typical
  calls); the fastest step against the fastest calls' fits is printed beside it. The JSON goes to
  ``benchmarks/results/emulated_links_3d.json`` (the committed run at 25 Mbit/s, where the links
  weigh four times more, to ``emulated_links_3d_25mbit.json``).

Everything is torn down in a ``finally`` - after a failure, on Ctrl-C and on SIGTERM - and
every run's names carry a random token, so that a leftover of an interrupted run does not
collide with the next. Needs root (``ip netns``) and ``tc``. The JSON goes to
``benchmarks/results/emulated_links.json``, the plot beside it.

Usage (from the repository root)::

    nice -n 5 .venv/bin/python -m benchmarks.emulated_links                # 8-9 minutes
    nice -n 5 .venv/bin/python -m benchmarks.emulated_links --repeats 3 --max-processes 3
    nice -n 5 .venv/bin/python -m benchmarks.emulated_links 3d             # the 3-D step, 5-6 minutes
    nice -n 5 .venv/bin/python -m benchmarks.emulated_links 3d --rate-mbit 25 \
        --out benchmarks/results/emulated_links_3d_25mbit.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from gradwise import optim
from gradwise.bench.machine import describe_machine
from gradwise.distributed import RankSlice
from gradwise.distributed.context import DistContext
from gradwise.distributed.strategies.three_d import ThreeDStrategy
from gradwise.plan.collective_timing import COLLECTIVES, sample_collectives
from gradwise.plan.communication import AlphaBeta, collective_time, fit_alpha_beta
from gradwise.plan.parallel_step_time import parallel_step_time
from gradwise.plan.parallelism import Layout, Transformer
from gradwise.plan.step_time import data_parallel_step_time
from gradwise.problems.corpus import stdlib_corpus
from gradwise.problems.data import RandomWindows
from gradwise.problems.tiny_gpt import TinyGPT

RATE_MBIT = 100.0
BURST_BYTES = 4096
SUBNET = "10.218.0"  # the hosts are SUBNET.1, SUBNET.2, ... on a /24
MASTER_PORT = 29500  # rank 0's namespace is its own: no other program can hold the port
SIZES = [4096 * 2**k for k in range(11)]  # 4 KiB ... 4 MiB
FIT_SIZES = SIZES[::2]  # 4, 16, 64, 256 KiB, 1 and 4 MiB
STATISTICS = ("fastest_s", "median_s")  # the fit and the errors use the first; the second is reported beside it
ALGORITHM = {"all_reduce": "ring_all_reduce", "reduce_scatter": "ring_reduce_scatter", "all_gather": "ring_all_gather"}
SEQ_LEN = 128  # benchmarks/distributed.py's windows
WARMUP_STEPS = 2  # DDP steps before the timed ones
TARGET = 0.25
SHAPES_3D = ((2, 1, 2), (2, 2, 1))  # (pp, dp, tp); the 3d strategy needs pp >= 2, so no 1 x 2 x 2
SCHEDULE_3D = "1f1b"
PARTS_3D = ("compute", "overhead", "bubble", "tensor", "pipeline", "data", "tied")  # ParallelStepTime's parts of a step
NO_DELAY = ("not emulated: this kernel has no netem qdisc, so no delay could be added; alpha is the "
            "software's latency (gloo, TCP, scheduling) plus the link's")
RESULTS = Path(__file__).parent / "results"

Runner = Callable[..., object]  # run(command, check=True), as subprocess.run


@dataclass(frozen=True)
class Topology:
    """The names and addresses of one run's emulated network of ``hosts`` hosts.

    ``token`` makes every name unique to the run. Interface names stay within the kernel's
    15 characters (``gw`` + 6 hex digits + ``h``/``b`` + the rank).
    """

    token: str
    hosts: int

    @property
    def bridge_namespace(self) -> str:
        return f"gw-{self.token}-bridge"

    def namespace(self, rank: int) -> str:
        return f"gw-{self.token}-host{rank}"

    def device(self, rank: int) -> str:
        """The host's end of its veth pair (the interface gloo uses)."""
        return f"gw{self.token}h{rank}"

    def bridge_port(self, rank: int) -> str:
        """The bridge's end of the host's veth pair."""
        return f"gw{self.token}b{rank}"

    def address(self, rank: int) -> str:
        return f"{SUBNET}.{rank + 1}"


def new_topology(hosts: int) -> Topology:
    """A topology of ``hosts`` hosts with a fresh random token."""
    return Topology(secrets.token_hex(3), hosts)


def setup_commands(topology: Topology, rate_mbit: float | None, burst_bytes: int = BURST_BYTES) -> list[list[str]]:
    """The ``ip``/``tc`` commands that build ``topology``: a bridge in its own namespace, a
    namespace per host joined to it by a veth pair, and (unless ``rate_mbit`` is None) a
    token-bucket limit of ``rate_mbit`` on each host's egress."""
    bridge = topology.bridge_namespace
    commands = [
        ["ip", "netns", "add", bridge],
        ["ip", "-n", bridge, "link", "add", "br0", "type", "bridge"],
        ["ip", "-n", bridge, "link", "set", "br0", "up"],
    ]
    for rank in range(topology.hosts):
        host, device, port = topology.namespace(rank), topology.device(rank), topology.bridge_port(rank)
        commands += [
            ["ip", "netns", "add", host],
            # Both ends are created inside their namespaces: nothing is left in the root namespace.
            ["ip", "link", "add", device, "netns", host, "type", "veth", "peer", "name", port, "netns", bridge],
            ["ip", "-n", bridge, "link", "set", port, "master", "br0"],
            ["ip", "-n", bridge, "link", "set", port, "up"],
            ["ip", "-n", host, "addr", "add", f"{topology.address(rank)}/24", "dev", device],
            ["ip", "-n", host, "link", "set", device, "up"],
            ["ip", "-n", host, "link", "set", "lo", "up"],
        ]
        if rate_mbit is not None:
            commands.append(["tc", "-n", host, "qdisc", "add", "dev", device, "root", "tbf", "rate",
                             f"{rate_mbit:g}mbit", "burst", str(burst_bytes), "latency", "100ms"])
    return commands


def teardown_commands(topology: Topology) -> list[list[str]]:
    """Deleting the namespaces deletes the veth pairs, the bridge and the limits inside them."""
    hosts = [topology.namespace(rank) for rank in range(topology.hosts)]
    return [["ip", "netns", "delete", namespace] for namespace in [*hosts, topology.bridge_namespace]]


def run_command(command: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
    """Run one setup or teardown command; with ``check``, a failure raises with its error output."""
    done = subprocess.run(command, capture_output=True, text=True)
    if check and done.returncode:
        raise RuntimeError(f"{' '.join(command)} exited with {done.returncode}: {done.stderr.strip()}")
    return done


@contextlib.contextmanager
def emulated_links(topology: Topology, rate_mbit: float | None, run: Runner = run_command) -> Iterator[Topology]:
    """Build ``topology`` for the ``with`` block and tear it down after it, whatever happens:
    a failed setup command, an exception in the block, Ctrl-C. Teardown runs every command
    whatever the earlier ones did (a namespace that was never made just fails to delete)."""
    try:
        for command in setup_commands(topology, rate_mbit):
            run(command)
        yield topology
    finally:
        for command in teardown_commands(topology):
            run(command, check=False)


def worker_command(topology: Topology, rank: int, task_args: Sequence[str]) -> list[str]:
    """The command that runs rank ``rank``'s worker inside its host's namespace."""
    return ["ip", "netns", "exec", topology.namespace(rank), sys.executable, "-m", "benchmarks.emulated_links",
            "worker", *task_args]


def worker_env(topology: Topology, rank: int, world_size: int) -> dict[str, str]:
    """The environment that joins rank ``rank`` to the process group over its veth."""
    return {"MASTER_ADDR": topology.address(0), "MASTER_PORT": str(MASTER_PORT), "RANK": str(rank),
            "WORLD_SIZE": str(world_size), "GLOO_SOCKET_IFNAME": topology.device(rank), "OMP_NUM_THREADS": "1"}


def launch(topology: Topology, world_size: int, task_args: Sequence[str], timeout_s: float = 900.0) -> Any:
    """Run a worker on hosts ``0 .. world_size - 1`` and return what rank 0 wrote.

    Every worker is killed if one fails, the time runs out or the caller is interrupted.
    """
    with tempfile.TemporaryDirectory(prefix="gradwise-emulated-") as folder:
        out = Path(folder) / "result.json"
        root = str(Path(__file__).resolve().parent.parent)
        workers = [
            subprocess.Popen(worker_command(topology, rank, [*task_args, "--out", str(out)]), cwd=root,
                             env={**os.environ, **worker_env(topology, rank, world_size)})
            for rank in range(world_size)
        ]
        try:
            deadline = time.monotonic() + timeout_s
            while any(worker.poll() is None for worker in workers):
                failed = [worker.returncode for worker in workers if worker.returncode not in (None, 0)]
                if failed:
                    raise RuntimeError(f"a worker of {world_size} ({' '.join(task_args)}) exited with {failed[0]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world_size} workers ({' '.join(task_args)}) ran past {timeout_s:g} s")
                time.sleep(0.1)
            if any(worker.returncode for worker in workers):
                raise RuntimeError(f"a worker of {world_size} ({' '.join(task_args)}) failed")
            return json.loads(out.read_text())
        finally:
            for worker in workers:
                if worker.poll() is None:
                    worker.kill()
                    worker.wait()


# --- inside a namespace ------------------------------------------------------------------------

def _summary(times: Sequence[float]) -> dict:
    return {"fastest_s": min(times), "median_s": statistics.median(times), "repeats": len(times)}


def time_collectives_worker(sizes: Sequence[int], repeats: int, seed: int) -> list[dict]:
    """This rank's part in timing every collective and size
    (:func:`gradwise.plan.collective_timing.sample_collectives`); rank 0 returns the fastest and the
    median of ``repeats`` calls per case, the others an empty list."""
    samples = sample_collectives(COLLECTIVES, sizes, repeats, seed)
    if dist.get_rank() != 0:
        return []
    return [{"collective": collective, "processes": dist.get_world_size(), "message_bytes": nbytes,
             **_summary(times)} for (collective, nbytes), times in sorted(samples.items())]


def time_ddp_worker(batch_size: int, steps: int) -> dict:
    """This rank's part in timing tiny-gpt's DDP step (forward, backward with DDP's bucketed
    all-reduce, AdamW) as ``benchmarks/distributed.py`` trains it; each step's time is the
    slowest rank's. Rank 0 returns the fastest and median of ``steps`` steps after
    :data:`WARMUP_STEPS` and the bytes of the gradients."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = TinyGPT(SEQ_LEN)
    data = RankSlice(RandomWindows(stdlib_corpus().train, world_size * batch_size, SEQ_LEN, seed=0), rank, world_size)
    module = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = optim.AdamW(optim.weight_decay_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.95))
    times = []
    for step in range(WARMUP_STEPS + steps):
        inputs, targets = data.next_batch()
        dist.barrier()
        start = time.perf_counter()
        logits = module(inputs)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if step >= WARMUP_STEPS:
            times.append(float(elapsed))
    return {"processes": world_size, "gradient_bytes": 4 * sum(p.numel() for p in model.parameters()),
            **_summary(times)}


def time_3d_worker(pp: int, tp: int, microbatches: int, batch_size: int, steps: int) -> dict:
    """This rank's part in timing tiny-gpt's step under the ``3d`` strategy (``pp x dp x tp`` with
    ``dp`` the world size over ``pp tp``; :data:`SCHEDULE_3D` over ``microbatches``, FSDP2 over
    ``dp``, AdamW), ``batch_size`` windows per data-parallel replica; each step's time is the slowest
    rank's. Rank 0 returns the fastest and median of ``steps`` steps after :data:`WARMUP_STEPS`."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    context = DistContext(rank, world_size, 0, torch.device("cpu"), "gloo")
    strategy = ThreeDStrategy(context, {"pp": pp, "tp": tp, "microbatches": microbatches, "schedule": SCHEDULE_3D})
    torch.manual_seed(0)
    stage = strategy.wrap_model(TinyGPT(SEQ_LEN))
    stream = RandomWindows(stdlib_corpus().train, strategy.dp_size * batch_size, SEQ_LEN, seed=0)
    data = RankSlice(stream, strategy.dp_rank, strategy.dp_size)
    optimizer = optim.AdamW(optim.weight_decay_groups(stage, 0.1), lr=1e-3, betas=(0.9, 0.95))
    times = []
    for step in range(WARMUP_STEPS + steps):
        inputs, targets = data.next_batch()
        dist.barrier()
        start = time.perf_counter()
        strategy.pipeline.step(inputs, targets)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if step >= WARMUP_STEPS:
            times.append(float(elapsed))
    return {"pp": pp, "dp": strategy.dp_size, "tp": tp, **_summary(times)}


def worker_main(argv: Sequence[str]) -> None:
    """A worker's entry: join the process group (``env://``, set by :func:`worker_env`), run
    the task, rank 0 writes its result to ``--out``."""
    parser = argparse.ArgumentParser(prog="emulated_links worker")
    parser.add_argument("task", choices=("collectives", "ddp", "3d"))
    parser.add_argument("--sizes", help="collectives: message bytes, comma separated")
    parser.add_argument("--repeats", type=int, help="collectives: timed calls per collective and size")
    parser.add_argument("--batch-size", type=int, help="ddp: windows per rank; 3d: per data-parallel replica")
    parser.add_argument("--steps", type=int, help="ddp, 3d: timed steps (after WARMUP_STEPS)")
    parser.add_argument("--pp", type=int, help="3d: pipeline stages")
    parser.add_argument("--tp", type=int, help="3d: tensor-parallel ranks per stage")
    parser.add_argument("--microbatches", type=int, help="3d: micro-batches per step")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        if args.task == "collectives":
            result: object = time_collectives_worker([int(s) for s in args.sizes.split(",")], args.repeats, seed=0)
        elif args.task == "ddp":
            result = time_ddp_worker(args.batch_size, args.steps)
        else:
            result = time_3d_worker(args.pp, args.tp, args.microbatches, args.batch_size, args.steps)
        if dist.get_rank() == 0:
            args.out.write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


# --- the model's side --------------------------------------------------------------------------

def fit_links(rows: Sequence[dict], statistic: str = STATISTICS[0],
              fit_sizes: Sequence[int] = FIT_SIZES) -> dict[str, AlphaBeta]:
    """Alpha and beta per collective, fitted to ``statistic`` of the times at two processes
    and ``fit_sizes``."""
    links = {}
    for collective in COLLECTIVES:
        fit = [r for r in rows if r["collective"] == collective and r["processes"] == 2
               and r["message_bytes"] in fit_sizes]
        links[collective] = fit_alpha_beta(ALGORITHM[collective], [r["message_bytes"] for r in fit],
                                           [2] * len(fit), [r[statistic] for r in fit])
    return links


def predict(rows: Sequence[dict], links: dict[str, AlphaBeta], statistic: str = STATISTICS[0],
            fit_sizes: Sequence[int] = FIT_SIZES) -> list[dict]:
    """Each timing with the model's prediction, its relative error against ``statistic`` and
    whether it was fitted."""
    predicted = []
    for row in rows:
        model = collective_time(links[row["collective"]], ALGORITHM[row["collective"]], row["message_bytes"],
                                row["processes"])
        predicted.append({**row, "predicted_s": model, "error": model / row[statistic] - 1,
                          "in_fit": row["processes"] == 2 and row["message_bytes"] in fit_sizes})
    return predicted


def summarise(rows: Sequence[dict]) -> list[dict]:
    """The held-out predictions' median and worst |error| per collective and process count."""
    groups: dict[tuple[str, int], list[float]] = {}
    for row in rows:
        if not row["in_fit"]:
            groups.setdefault((row["collective"], row["processes"]), []).append(abs(row["error"]))
    return [{"collective": c, "processes": p, "held_out": len(errors), "median_abs_error": statistics.median(errors),
             "max_abs_error": max(errors), "within_target": sum(e <= TARGET for e in errors)}
            for (c, p), errors in sorted(groups.items())]


def predict_steps(limited: dict[int, dict], unlimited: dict[int, dict], batch_size: int, link: AlphaBeta,
                  statistic: str = STATISTICS[0]) -> list[dict]:
    r"""The DDP step at each process count against :func:`data_parallel_step_time`.

    The throughput :math:`R = 6\Psi T_1 / t_1` makes the model's compute term the step measured
    at one process; the gradients (fp32, 4 bytes a parameter) are all-reduced with ``link``
    in DDP's buckets, overlapped with the backward pass. Beside it, the step on unlimited
    links at the same process count: the step less the link, so that
    ``measured - unlimited`` is the time the limited link added, which the model's
    communication term should match (``communication_error``) whatever the cores did to
    the compute.
    """
    params = unlimited[1]["gradient_bytes"] // 4
    tokens = batch_size * SEQ_LEN
    throughput = 6 * params * tokens / unlimited[1][statistic]
    rows = []
    for processes in sorted(limited):
        measured, fast = limited[processes][statistic], unlimited[processes][statistic]
        model = data_parallel_step_time(params, processes * tokens, processes, throughput, link, 4.0)
        rows.append({"processes": processes, "measured_s": measured, "unlimited_s": fast,
                     "predicted_s": model.total, "predicted_compute_s": model.compute,
                     "predicted_communication_s": model.communication, "error": model.total / measured - 1,
                     "communication_error": model.communication / (measured - fast) - 1})
    return rows


def tiny_gpt_shape(model: TinyGPT) -> Transformer:
    """The planner's description of ``model``: its layers, width, heads, vocabulary and context."""
    embedding = model.token_embedding
    return Transformer(len(model.blocks), embedding.embedding_dim, model.transformer_blocks()[0].attention.n_head,
                       embedding.num_embeddings, model.seq_len)


def predict_3d_steps(limited: Sequence[dict], unlimited: Sequence[dict], one_process: dict, model: Transformer,
                     global_batch: int, microbatches: int, fits: dict[str, AlphaBeta],
                     statistic: str = STATISTICS[0]) -> list[dict]:
    r"""Each 3-D step (``limited``: one per mesh shape) against :func:`parallel_step_time`.

    The planner gets what a user measures before such a run: the throughput :math:`R` that makes its
    compute at one device the step ``one_process`` measured there on the same global batch; each
    collective's alpha and beta fitted at two processes (``collective_links``: every group of these
    meshes has two ranks; the sends on the all-reduce's link); fp32; ZeRO stage 3 (FSDP2, the ``3d``
    strategy's data dimension); and the software's overhead per micro-batch per stage, calibrated on
    the same mesh on unlimited links (``unlimited``, in the same order): that step over its
    :math:`m + (p - 1)/v` slots less a slot's compute. The step on the limited links is then
    predicted (``predicted_s``); beside it the planner without the overhead (``predicted_bare_s``)
    and the link's share - the prediction less the same step on infinitely fast links - against the
    step measured on the limited links less the unlimited one (``link_error``).
    """
    tokens = global_batch * model.seq_len
    link = fits["all_reduce"]
    collective_links = {name.replace("_", "-"): fit for name, fit in fits.items()}
    flops = parallel_step_time(model, Layout(), tokens, 1.0, link, "fp32").compute  # at 1 FLOP/s: the FLOPs
    throughput = flops / one_process[statistic]
    rows = []
    for measured, fast in zip(limited, unlimited, strict=True):
        layout = Layout(pp=measured["pp"], dp=measured["dp"], tp=measured["tp"], microbatches=microbatches,
                        schedule=SCHEDULE_3D)
        slots = microbatches + (layout.pp - 1) / layout.virtual_stages

        instant = parallel_step_time(model, layout, tokens, throughput, AlphaBeta(0.0, 0.0), "fp32", zero_stage=3)
        overhead = max(0.0, (fast[statistic] - instant.total) / slots)  # the cores alone: the slots' compute
        bare = parallel_step_time(model, layout, tokens, throughput, link, "fp32", zero_stage=3,
                                  collective_links=collective_links)
        step = parallel_step_time(model, layout, tokens, throughput, link, "fp32", zero_stage=3,
                                  collective_links=collective_links, overhead=overhead)
        parts = {part: getattr(step, part) for part in PARTS_3D}
        rows.append({"shape": f"{layout.pp}x{layout.dp}x{layout.tp}", "pp": layout.pp, "dp": layout.dp,
                     "tp": layout.tp, "microbatches": microbatches, "micro_batch": step.micro_batch,
                     "measured_s": measured[statistic], "unlimited_s": fast[statistic], "overhead_s": overhead,
                     "predicted_s": step.total, "parts_s": parts, "largest_part": max(parts, key=parts.__getitem__),
                     "error": step.total / measured[statistic] - 1, "predicted_bare_s": bare.total,
                     "error_bare": bare.total / measured[statistic] - 1, "predicted_link_s": bare.total - instant.total,
                     "link_error": (bare.total - instant.total) / (measured[statistic] - fast[statistic]) - 1})
    return rows


# --- the run -----------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict:
    """Unlimited links first (the ceiling the limit must stay below, the DDP step at 1-4
    processes without the link), then the limited links (the collectives and the DDP step)."""
    def collectives(sizes: Sequence[int]) -> list[str]:
        return ["collectives", "--sizes", ",".join(map(str, sizes)), "--repeats", str(args.repeats)]

    ddp = ["ddp", "--batch-size", str(args.batch_size), "--steps", str(args.steps)]
    counts = range(2, args.max_processes + 1)
    with emulated_links(new_topology(args.max_processes), None) as topology:
        print(f"unlimited links: all-reduce of {SIZES[-1]} bytes at {args.max_processes} processes", flush=True)
        ceiling = next(r for r in launch(topology, args.max_processes, collectives(SIZES[-1:]))
                       if r["collective"] == "all_reduce")
        unlimited_steps = {}
        for processes in range(1, args.max_processes + 1):
            print(f"unlimited links: DDP step at {processes} processes", flush=True)
            unlimited_steps[processes] = launch(topology, processes, ddp)
    timings: list[dict] = []
    steps = {}
    with emulated_links(new_topology(args.max_processes), args.rate_mbit) as topology:
        for processes in counts:
            print(f"{args.rate_mbit:g} Mbit/s links: collectives at {processes} processes", flush=True)
            timings += launch(topology, processes, collectives(SIZES))
        for processes in counts:
            print(f"{args.rate_mbit:g} Mbit/s links: DDP step at {processes} processes", flush=True)
            steps[processes] = launch(topology, processes, ddp)
    fits = {statistic: fit_links(timings, statistic) for statistic in STATISTICS}
    rows = predict(timings, fits[STATISTICS[0]])
    volume = 2 * (args.max_processes - 1) / args.max_processes * ceiling["message_bytes"]
    return {
        "machine": describe_machine(),
        "load_average_at_end": os.getloadavg(),
        "links": {"topology": f"one network namespace per process, a veth pair from each into a bridge in its own "
                              f"namespace, {SUBNET}.0/24", "qdisc": "tbf on each host's egress",
                  "rate_mbit_s": args.rate_mbit, "burst_bytes": BURST_BYTES, "delay": NO_DELAY},
        "unlimited_all_reduce": {**ceiling, "bus_mbit_s": 8 * volume / ceiling["median_s"] / 1e6},
        "repeats": args.repeats, "sizes": SIZES,
        "statistic": "fastest of the repeats of the slowest rank's time (the median is kept and fitted too)",
        "fitted_on": "2 processes, sizes " + ", ".join(map(str, FIT_SIZES)),
        "fits": {statistic: {c: {"alpha_s": link.alpha, "beta_s_per_byte": link.beta,
                                 "bandwidth_mbit_s": 8e-6 / link.beta} for c, link in fit.items()}
                 for statistic, fit in fits.items()},
        "target": TARGET, "rows": rows, "summary": summarise(rows),
        "summary_median": summarise(predict(timings, fits["median_s"], "median_s")),
        "dp_step": {"model": f"tiny-gpt ({unlimited_steps[1]['gradient_bytes'] // 4} parameters), DDP, AdamW, "
                             f"{args.batch_size} windows of {SEQ_LEN} bytes per rank, 1 thread per process",
                    "statistic": f"fastest and median of {args.steps} steps (after {WARMUP_STEPS}) of the slowest "
                                 "rank's step",
                    "prediction": "gradwise.plan.step_time.data_parallel_step_time: compute = the 1-process step, "
                                  "the gradients' all-reduce with the all-reduce's fitted alpha and beta",
                    "rows": predict_steps(steps, unlimited_steps, args.batch_size, fits[STATISTICS[0]]["all_reduce"]),
                    "rows_median": predict_steps(steps, unlimited_steps, args.batch_size,
                                                 fits["median_s"]["all_reduce"], "median_s")},
    }


def print_report(report: dict) -> None:
    ceiling = report["unlimited_all_reduce"]
    print(f"\nunlimited links: all-reduce of {ceiling['message_bytes']} B at {ceiling['processes']} processes "
          f"{ceiling['median_s'] * 1e3:.1f} ms (median): bus bandwidth {ceiling['bus_mbit_s']:.0f} Mbit/s")
    print(f"limit: {report['links']['rate_mbit_s']:g} Mbit/s per host (tbf); delay {report['links']['delay']}")
    for statistic, fits in report["fits"].items():
        for collective, fit in fits.items():
            print(f"{statistic[:-2]:>8} {collective:<15} alpha = {fit['alpha_s'] * 1e6:6.0f} us, beta = "
                  f"{fit['beta_s_per_byte'] * 1e9:5.1f} ns/B ({fit['bandwidth_mbit_s']:.0f} Mbit/s)")
    print(f"fitted on {report['fitted_on']}")
    print(f"\n{'collective':<15}{'p':>3}{'bytes':>9}{'fastest ms':>12}{'median ms':>11}{'model ms':>10}{'error':>8}")
    for row in report["rows"]:
        print(f"{row['collective']:<15}{row['processes']:>3}{row['message_bytes']:>9}{row['fastest_s'] * 1e3:>12.2f}"
              f"{row['median_s'] * 1e3:>11.2f}{row['predicted_s'] * 1e3:>10.2f}{row['error']:>+8.0%}"
              f"{' (fit)' if row['in_fit'] else ''}")
    print(f"\nheld-out predictions (target: median |error| within {TARGET:.0%}): fastest | median")
    for line, median in zip(report["summary"], report["summary_median"]):
        print(f"  {line['collective']:<15} p={line['processes']}: median |error| {line['median_abs_error']:4.0%}, "
              f"worst {line['max_abs_error']:4.0%}, {line['within_target']}/{line['held_out']} within | "
              f"median |error| {median['median_abs_error']:4.0%}, worst {median['max_abs_error']:4.0%}")
    print(f"\nDDP step of {report['dp_step']['model']}: fastest | median")
    print(f"{'p':>3}{'measured ms':>13}{'unlimited':>10}{'model ms':>10}{'compute':>9}{'comm':>8}{'error':>8}"
          f"{'comm err':>10} |{'measured':>9}{'model':>8}{'error':>8}")
    for row, median in zip(report["dp_step"]["rows"], report["dp_step"]["rows_median"]):
        print(f"{row['processes']:>3}{row['measured_s'] * 1e3:>13.1f}{row['unlimited_s'] * 1e3:>10.1f}"
              f"{row['predicted_s'] * 1e3:>10.1f}{row['predicted_compute_s'] * 1e3:>9.1f}"
              f"{row['predicted_communication_s'] * 1e3:>8.1f}{row['error']:>+8.0%}{row['communication_error']:>+10.0%}"
              f" |{median['measured_s'] * 1e3:>9.1f}{median['predicted_s'] * 1e3:>8.1f}{median['error']:>+8.0%}")


def plot(report: dict, path: Path) -> None:
    """Measured (markers: the fastest call) against predicted (lines) time, log-log, one panel
    per collective and one for the DDP step; the fitted points are hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(COLLECTIVES) + 1, figsize=(17, 4.4))
    colours = {p: f"C{p - 2}" for p in sorted({r["processes"] for r in report["rows"]})}
    for axis, collective in zip(axes, COLLECTIVES):
        for processes, colour in colours.items():
            rows = [r for r in report["rows"] if r["collective"] == collective and r["processes"] == processes]
            sizes = [r["message_bytes"] for r in rows]
            axis.plot(sizes, [r["predicted_s"] for r in rows], "-", color=colour, label=f"model, p={processes}")
            held_out = [r for r in rows if not r["in_fit"]]
            fitted = [r for r in rows if r["in_fit"]]
            axis.scatter([r["message_bytes"] for r in held_out], [r["fastest_s"] for r in held_out], color=colour,
                         label=f"measured, p={processes}", zorder=3)
            axis.scatter([r["message_bytes"] for r in fitted], [r["fastest_s"] for r in fitted], color=colour,
                         facecolors="none", zorder=3)
        axis.set(xscale="log", yscale="log", xlabel="message (bytes)", ylabel="seconds", title=collective)
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    step_rows = report["dp_step"]["rows"]
    processes = [r["processes"] for r in step_rows]
    axes[-1].plot(processes, [r["predicted_s"] for r in step_rows], "-o", label="model")
    axes[-1].plot(processes, [r["measured_s"] for r in step_rows], "s", label="measured")
    axes[-1].plot(processes, [r["unlimited_s"] for r in step_rows], "^", label="measured, unlimited links")
    axes[-1].set(xlabel="processes", ylabel="seconds", yscale="log", xticks=processes, title="tiny-gpt DDP step")
    axes[-1].grid(True, which="both", alpha=0.3)
    axes[-1].legend(fontsize=7)
    figure.suptitle(f"alpha-beta model fitted at 2 processes (hollow: fitted points), "
                    f"{report['links']['rate_mbit_s']:g} Mbit/s token-bucket links, no added delay")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# --- the 3-D step ------------------------------------------------------------------------------

def run_3d(args: argparse.Namespace) -> dict:
    """Unlimited links first (the one-process step, each shape's 3-D step without the link), then the
    limited links (the collectives at two processes for the fit, each shape's 3-D step)."""
    shapes = [(pp, dp, tp) for pp, dp, tp in SHAPES_3D if pp * dp * tp <= args.max_processes]

    def step(shape: tuple[int, int, int]) -> list[str]:
        pp, dp, tp = shape
        return ["3d", "--pp", str(pp), "--tp", str(tp), "--microbatches", str(args.microbatches),
                "--batch-size", str(args.global_batch // dp), "--steps", str(args.steps)]

    with emulated_links(new_topology(args.max_processes), None) as topology:
        print(f"unlimited links: tiny-gpt step of {args.global_batch} windows at 1 process", flush=True)
        one_process = launch(topology, 1, ["ddp", "--batch-size", str(args.global_batch), "--steps", str(args.steps)])
        unlimited = []
        for shape in shapes:
            print(f"unlimited links: 3-D step {'x'.join(map(str, shape))}", flush=True)
            unlimited.append(launch(topology, math.prod(shape), step(shape)))
    with emulated_links(new_topology(args.max_processes), args.rate_mbit) as topology:
        print(f"{args.rate_mbit:g} Mbit/s links: collectives at 2 processes (the fit)", flush=True)
        timings = launch(topology, 2, ["collectives", "--sizes", ",".join(map(str, FIT_SIZES)),
                                       "--repeats", str(args.repeats)])
        limited = []
        for shape in shapes:
            print(f"{args.rate_mbit:g} Mbit/s links: 3-D step {'x'.join(map(str, shape))}", flush=True)
            limited.append(launch(topology, math.prod(shape), step(shape)))
    model = tiny_gpt_shape(TinyGPT(SEQ_LEN))
    fits = {statistic: fit_links(timings, statistic) for statistic in STATISTICS}
    rows = {statistic: predict_3d_steps(limited, unlimited, one_process, model, args.global_batch,
                                        args.microbatches, fits[statistic], statistic) for statistic in STATISTICS}
    return {
        "machine": describe_machine(),
        "load_average_at_end": os.getloadavg(),
        "links": {"topology": f"one network namespace per process, a veth pair from each into a bridge in its own "
                              f"namespace, {SUBNET}.0/24", "qdisc": "tbf on each host's egress",
                  "rate_mbit_s": args.rate_mbit, "burst_bytes": BURST_BYTES, "delay": NO_DELAY},
        "model": f"tiny-gpt: {model.layers} layers, width {model.width}, {model.heads} heads, vocabulary "
                 f"{model.vocab}, {model.seq_len} bytes of context ({model.parameter_count()} parameters), fp32, "
                 "AdamW, 1 thread per process",
        "strategy": f"3d: (pp, dp, tp) mesh, {SCHEDULE_3D}, FSDP2 over dp, Megatron's layout over tp",
        "global_batch": args.global_batch, "microbatches": args.microbatches,
        "statistic": f"fastest and median of {args.steps} steps (after {WARMUP_STEPS}) of the slowest rank's step",
        "fit": f"alpha and beta per collective at 2 processes, sizes {', '.join(map(str, FIT_SIZES))}, "
               f"{args.repeats} calls each, on the same limited links in the same run",
        "fits": {statistic: {c: {"alpha_s": link.alpha, "beta_s_per_byte": link.beta,
                                 "bandwidth_mbit_s": 8e-6 / link.beta} for c, link in fit.items()}
                 for statistic, fit in fits.items()},
        "one_process_step": one_process,
        "prediction": "gradwise.plan.parallel_step_time.parallel_step_time(model, Layout(pp, dp, tp, microbatches, "
                      "'1f1b'), global batch x context tokens, throughput, the all-reduce's fit, 'fp32', "
                      "zero_stage=3, collective_links=each collective's fit, overhead=the unlimited step over its "
                      "m + p - 1 slots less a slot's compute), the throughput making its 1-device compute the "
                      "1-process step",
        "target": TARGET, "rows": rows[STATISTICS[0]], "rows_median": rows[STATISTICS[1]],
    }


def print_report_3d(report: dict) -> None:
    fit = report["fits"]["fastest_s"]["all_reduce"]
    print(f"\n{report['model']}; global batch {report['global_batch']}, {report['microbatches']} micro-batches")
    print(f"planner's link (all-reduce fit): alpha {fit['alpha_s'] * 1e6:.0f} us, {fit['bandwidth_mbit_s']:.0f} "
          f"Mbit/s; 1-process step {report['one_process_step']['fastest_s'] * 1e3:.0f} ms (fastest)")
    parts = "".join(f"{part[:8]:>9}" for part in PARTS_3D)
    print(f"\n{'shape':<7}{'measured':>9}{'unlimit':>9}{'model':>8}{'error':>7}{parts}{'bare':>7}{'error':>7}"
          f"{'link':>7}{'model':>7} | {'median':>7}{'model':>7}{'error':>7}")
    for row, median in zip(report["rows"], report["rows_median"]):
        values = "".join(f"{row['parts_s'][part] * 1e3:>9.0f}" for part in PARTS_3D)
        print(f"{row['shape']:<7}{row['measured_s'] * 1e3:>9.0f}{row['unlimited_s'] * 1e3:>9.0f}"
              f"{row['predicted_s'] * 1e3:>8.0f}{row['error']:>+7.0%}{values}{row['predicted_bare_s'] * 1e3:>7.0f}"
              f"{row['error_bare']:>+7.0%}{(row['measured_s'] - row['unlimited_s']) * 1e3:>7.0f}"
              f"{row['predicted_link_s'] * 1e3:>7.0f} | {median['measured_s'] * 1e3:>7.0f}"
              f"{median['predicted_s'] * 1e3:>7.0f}{median['error']:>+7.0%}")
    print("(ms; fastest step, the planner with the fastest calls' fits | the median step and fits; 'bare': the "
          "planner without the overhead calibrated on unlimited links; 'link': the step less the unlimited one, "
          "against the model's step less its infinitely fast links' step)")


def plot_3d(report: dict, path: Path) -> None:
    """Per shape, the planner's step stacked by part (fed the median calls' fits) beside the median
    measured step, with the fastest and the unlimited steps marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows_median"]
    figure, axis = plt.subplots(figsize=(7, 4.4))
    positions = range(len(rows))
    bottom = [0.0] * len(rows)
    for index, part in enumerate(PARTS_3D):
        heights = [row["parts_s"][part] for row in rows]
        axis.bar([x - 0.2 for x in positions], heights, 0.4, bottom=bottom, color=f"C{index}", label=f"model: {part}")
        bottom = [b + h for b, h in zip(bottom, heights)]
    axis.bar([x + 0.2 for x in positions], [row["measured_s"] for row in rows], 0.4, color="0.35",
             label="measured (median)")
    axis.scatter([x + 0.2 for x in positions], [row["measured_s"] for row in report["rows"]], color="k",
                 marker="_", s=400, zorder=3, label="measured (fastest)")
    axis.scatter([x + 0.2 for x in positions], [row["unlimited_s"] for row in rows], color="w", edgecolors="k",
                 marker="v", zorder=3, label="measured, unlimited links")
    axis.set_xticks(list(positions), [f"{row['shape']} (pp x dp x tp)\nerror {row['error']:+.0%}" for row in rows])
    axis.set(ylabel="seconds per step", title=f"tiny-gpt 3-D step, {report['microbatches']} micro-batches, "
                                              f"{SCHEDULE_3D}, {report['links']['rate_mbit_s']:g} Mbit/s links")
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main_3d(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="emulated_links 3d",
                                     description="tiny-gpt's 3-D step over emulated links against the planner")
    parser.add_argument("--rate-mbit", type=float, default=RATE_MBIT, help="each host's egress limit (default: 100)")
    parser.add_argument("--repeats", type=int, default=9, help="timed calls per collective and size (default: 9)")
    parser.add_argument("--max-processes", type=int, default=4, help="largest mesh (default: 4)")
    parser.add_argument("--global-batch", type=int, default=8, help="tiny-gpt windows per step (default: 8)")
    parser.add_argument("--microbatches", type=int, default=4, help="micro-batches per step (default: 4)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps (default: 8)")
    parser.add_argument("--out", type=Path, default=RESULTS / "emulated_links_3d.json")
    _run_and_write(run_3d, print_report_3d, plot_3d, parser.parse_args(argv))


def _run_and_write(run_fn: Callable[[argparse.Namespace], dict], report_fn: Callable[[dict], None],
                   plot_fn: Callable[[dict, Path], None], args: argparse.Namespace) -> None:
    """Run a study (SIGTERM unwinding through the teardown), print its table, write its JSON and plot."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    report = run_fn(args)
    report_fn(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot_fn(report, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that tear the links down


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:
        worker_main(argv[1:])
        return
    if argv[:1] == ["3d"]:
        main_3d(argv[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate-mbit", type=float, default=RATE_MBIT, help="each host's egress limit (default: 100)")
    parser.add_argument("--repeats", type=int, default=9, help="timed calls per collective and size (default: 9)")
    parser.add_argument("--max-processes", type=int, default=4, help="largest process count (default: 4)")
    parser.add_argument("--batch-size", type=int, default=2, help="tiny-gpt windows per rank (default: 2)")
    parser.add_argument("--steps", type=int, default=8, help="timed DDP steps (default: 8)")
    parser.add_argument("--out", type=Path, default=RESULTS / "emulated_links.json")
    _run_and_write(run, print_report, plot, parser.parse_args(argv))


if __name__ == "__main__":
    main()
