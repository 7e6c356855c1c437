r"""The alpha-beta model of collective communication.

A message of :math:`n` bytes between two processes takes :math:`\alpha + n\beta` seconds:
a latency :math:`\alpha` and an inverse bandwidth :math:`\beta` (Hockney 1994, "The
communication challenge for MPP: Intel Paragon and Meiko CS-2", Parallel Computing 20(3)).
For :math:`p` processes (Thakur, Rabenseifner & Gropp 2005, "Optimization of collective
communication operations in MPICH", IJHPCA 19(1); Patarasuk & Yuan 2009 for the ring):

=====================  =============================================================
ring reduce-scatter    :math:`(p-1)\alpha + \frac{p-1}{p} n\beta`
ring all-gather        :math:`(p-1)\alpha + \frac{p-1}{p} n\beta`
ring all-reduce        :math:`2(p-1)\alpha + 2\frac{p-1}{p} n\beta` (reduce-scatter, then all-gather)
tree all-reduce        :math:`2\lceil\log_2 p\rceil(\alpha + n\beta)` (reduce, then broadcast)
parameter server       :math:`2(k\alpha + \max(n, pn/k)\beta)` (push, then pull; :math:`k` servers)
send / receive         :math:`\alpha + n\beta` (one message between two of the processes)
=====================  =============================================================

where :math:`n` is the size of the whole vector (all-gather: the gathered result). The ring
all-reduce's bandwidth term barely grows with :math:`p`, its latency term grows linearly; the
parameter server's bandwidth term grows with :math:`p/k`.

Processes that share one host also share its memory bandwidth and cores. The max-rate model
(Gropp, Olson & Samfass 2016, "Modeling MPI communication performance on SMP nodes: is it
time to retire the ping pong test", EuroMPI) caps the rate of :math:`k` processes on a node
at the node's rate: with ``processes_per_host`` processes on ``cores`` cores, the bandwidth
term is multiplied by :math:`\max(1, k/\text{cores})`. On a cluster with one process per
device this factor is 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import nnls

from gradwise.validation import check_choice, check_int, check_range

ALGORITHMS = ("ring_all_reduce", "ring_reduce_scatter", "ring_all_gather", "tree_all_reduce", "parameter_server",
              "send_recv")


@dataclass(frozen=True)
class AlphaBeta:
    """Latency ``alpha`` (seconds per message) and inverse bandwidth ``beta`` (seconds per byte)."""

    alpha: float
    beta: float

    def __post_init__(self) -> None:
        check_range("latency", self.alpha, 0.0)
        check_range("beta", self.beta, 0.0)

    @classmethod
    def from_link(cls, latency: float, bandwidth: float) -> AlphaBeta:
        """From a latency in seconds and a bandwidth in bytes per second."""
        check_range("bandwidth", bandwidth, 0.0, low_open=True)
        return cls(latency, 1.0 / bandwidth)


def terms(algorithm: str, message_bytes: float, processes: int, servers: int = 1) -> tuple[float, float]:
    """The (messages, bytes) multiplying alpha and beta in ``algorithm``'s time."""
    check_choice("algorithm", algorithm, ALGORITHMS)
    check_range("message_bytes", message_bytes, 0.0)
    check_int("processes", processes, 1)
    check_int("servers", servers, 1)
    p, n = processes, float(message_bytes)
    if p == 1:
        return 0.0, 0.0
    if algorithm == "ring_all_reduce":
        return 2.0 * (p - 1), 2.0 * (p - 1) / p * n
    if algorithm in ("ring_reduce_scatter", "ring_all_gather"):
        return float(p - 1), (p - 1) / p * n
    if algorithm == "send_recv":
        return 1.0, n
    if algorithm == "tree_all_reduce":
        rounds = 2.0 * math.ceil(math.log2(p))
        return rounds, rounds * n
    return 2.0 * servers, 2.0 * max(n, p * n / servers)


def contention(processes_per_host: int, cores: int | None) -> float:
    """The max-rate model's factor on the bandwidth term: ``max(1, processes / cores)``."""
    if cores is None:
        return 1.0
    check_int("cores", cores, 1)
    return max(1.0, processes_per_host / cores)


def collective_time(
    link: AlphaBeta,
    algorithm: str,
    message_bytes: float,
    processes: int,
    servers: int = 1,
    cores: int | None = None,
) -> float:
    """Seconds for one collective: ``messages * alpha + bytes * beta * contention``; ``cores``
    set means all ``processes`` share one host with that many cores."""
    messages, volume = terms(algorithm, message_bytes, processes, servers)
    return messages * link.alpha + volume * link.beta * contention(processes, cores)


def latency_share(link: AlphaBeta, algorithm: str, message_bytes: float, processes: int) -> float:
    """Fraction of the collective's time spent in the latency term."""
    messages, volume = terms(algorithm, message_bytes, processes)
    latency, bandwidth = messages * link.alpha, volume * link.beta
    return latency / (latency + bandwidth) if latency + bandwidth > 0 else 0.0


def fit_alpha_beta(
    algorithm: str,
    message_bytes: Sequence[float],
    processes: Sequence[int],
    seconds: Sequence[float],
    cores: int | None = None,
) -> AlphaBeta:
    """Least-squares alpha and beta (both >= 0) from timed collectives.

    Minimises the relative error ``sum ((model - t) / t)^2``, so that small and large
    messages count alike (their times differ by orders of magnitude).
    """
    if not (len(message_bytes) == len(processes) == len(seconds)) or len(seconds) < 2:
        raise ValueError("fit_alpha_beta needs at least two timings, one per message size and process count")
    rows = []
    for n, p in zip(message_bytes, processes):
        messages, volume = terms(algorithm, n, p)
        rows.append((messages, volume * contention(p, cores)))
    design = np.array(rows, dtype=float)
    times = np.array([check_range("seconds", t, 0.0, low_open=True) for t in seconds], dtype=float)
    weighted = design / times[:, None]
    # Scale the columns so that the solver sees comparable numbers (alpha ~ 1e-4, beta ~ 1e-9).
    scale = np.abs(weighted).max(axis=0)
    scale[scale == 0] = 1.0
    solution, _ = nnls(weighted / scale, np.ones_like(times))
    alpha, beta = solution / scale
    return AlphaBeta(float(alpha), float(beta))
