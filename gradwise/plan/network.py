r"""The network of a cluster: its minimum spanning tree, and the most data it can move.

A topology is a set of nodes (storage, switches, workers) and links, each with a latency
(or any cost) and a bandwidth. Two questions, each answered by one of scipy's graph routines
(``scipy.sparse.csgraph``):

- the **minimum spanning tree** of the latency (cost) graph: the cheapest set of links that
  connects every node, the backbone over which a tree broadcast or reduction would run
  (Kruskal 1956; ``minimum_spanning_tree``);
- the **maximum flow** from storage to the workers with bandwidths as capacities, and a
  **minimum cut**: the links whose total bandwidth bounds that flow, the bottleneck
  (Ford & Fulkerson 1956, max-flow min-cut theorem; ``maximum_flow``, Dinic's algorithm).
  Several workers are joined to one super-sink by links of unbounded capacity.

Topologies are read from JSON::

    {"links": [{"from": "storage", "to": "switch", "latency": 2e-6, "bandwidth": 1.25e9}, ...],
     "source": "storage", "sinks": ["worker0", "worker1"], "directed": false}

or from CSV with a header ``from,to,latency,bandwidth`` (a ``cost`` column may replace or
join ``latency``; either of the two numbers may be empty on a row). Links are undirected
(full duplex: the bandwidth in each direction) unless ``"directed": true``.

scipy's max-flow takes 32-bit integer capacities: bandwidths are integers already when they
are whole numbers that sum below 2^31; otherwise they are counted in units of
(sum of bandwidths) / 2^30, a relative resolution of about 1e-9.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.sparse import csr_array
from scipy.sparse.csgraph import breadth_first_order, connected_components, maximum_flow, minimum_spanning_tree

from gradwise.user_files import MAX_TABLE_BYTES, read_user_text

WEIGHT_COLUMNS = ("cost", "latency")
INT32_BUDGET = 2**30


@dataclass(frozen=True)
class Link:
    source: str
    target: str
    latency: float | None = None  # or any cost
    bandwidth: float | None = None


@dataclass
class Topology:
    links: list[Link]
    source: str | None = None
    sinks: list[str] = field(default_factory=list)
    directed: bool = False

    @property
    def nodes(self) -> list[str]:
        names = dict.fromkeys([self.source] if self.source else [])
        for link in self.links:
            names.update(dict.fromkeys((link.source, link.target)))
        names.update(dict.fromkeys(self.sinks))
        return list(names)


def _number(value, where: str) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a number, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{where} must be a finite number > 0, got {value!r}")
    return number


def _link(record: dict, where: str) -> Link:
    if not isinstance(record, dict):
        raise ValueError(f"{where} must be an object with from, to, latency/cost and bandwidth, got {record!r}")
    ends = []
    for key in ("from", "to"):
        name = record.get(key)
        if name is None or not str(name).strip():
            raise ValueError(f"{where}.{key} is missing")
        ends.append(str(name).strip())
    if ends[0] == ends[1]:
        raise ValueError(f"{where} links {ends[0]!r} to itself")
    weight_key = next((key for key in WEIGHT_COLUMNS if record.get(key) not in (None, "")), "latency")
    latency = _number(record.get(weight_key), f"{where}.{weight_key}")
    bandwidth = _number(record.get("bandwidth"), f"{where}.bandwidth")
    if latency is None and bandwidth is None:
        raise ValueError(f"{where} has neither a latency (or cost) nor a bandwidth")
    return Link(ends[0], ends[1], latency, bandwidth)


def read_topology(path: str | Path) -> Topology:
    """Read a topology from a ``.json`` or ``.csv`` file (see the module docstring); it must have links,
    and the source and sinks it names must be ends of them."""
    topology = _parse_topology(Path(path))
    if not topology.links:
        raise ValueError(f"topology: {Path(path).name} has no links")
    ends = {name for link in topology.links for name in (link.source, link.target)}
    for role, name in [("source", topology.source), *(("sinks", sink) for sink in topology.sinks)]:
        if name is not None and name not in ends:
            raise ValueError(f"topology.{role}: {name!r} is not the end of any link")
    return topology


def _parse_topology(path: Path) -> Topology:
    if path.suffix.lower() not in (".json", ".csv"):
        raise ValueError(f"topology: {path.name} must end in .json or .csv")
    text = read_user_text(path, "topology", MAX_TABLE_BYTES)  # a regular file of bounded size
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"topology: {path.name} is not valid JSON: {error.msg} at line {error.lineno}") from None
        except RecursionError:
            raise ValueError(f"topology: {path.name} nests JSON too deeply") from None
        if not isinstance(data, dict) or not isinstance(data.get("links"), list):
            raise ValueError("topology.links is missing: expected a list of links")
        links = [_link(record, f"topology.links[{i}]") for i, record in enumerate(data["links"])]
        sinks = data.get("sinks", [])
        if not isinstance(sinks, list):
            raise ValueError(f"topology.sinks must be a list of node names, got {sinks!r}")
        source = data.get("source")
        return Topology(links, None if source is None else str(source), [str(s) for s in sinks],
                        bool(data.get("directed", False)))
    try:
        return _csv_topology(path, text)
    except csv.Error as error:
        raise ValueError(f"topology: {path.name} is not valid CSV: {error}") from None


def _csv_topology(path: Path, text: str) -> Topology:
    reader = csv.DictReader(text.splitlines())
    columns = {name.strip().lower() for name in reader.fieldnames or []}
    missing = {"from", "to"} - columns
    if missing or not (columns & {"latency", "cost", "bandwidth"}):
        raise ValueError(
            f"topology: {path.name} needs the columns from,to and latency (or cost) and/or bandwidth, "
            f"got {sorted(columns)}"
        )
    links = []
    for line, row in enumerate(reader, start=2):
        record = {key.strip().lower(): value for key, value in row.items() if key is not None}
        links.append(_link(record, f"topology line {line}"))
    return Topology(links)


def _index(topology: Topology) -> dict[str, int]:
    return {name: i for i, name in enumerate(topology.nodes)}


@dataclass(frozen=True)
class SpanningTree:
    links: list[tuple[str, str, float]]
    total: float
    components: int  # 1: the tree spans every node; more: a spanning forest


def spanning_tree(topology: Topology) -> SpanningTree:
    """The minimum spanning tree (forest) of the links that have a latency or cost."""
    weighted = [(link, link.latency) for link in topology.links if link.latency is not None]
    if not weighted:
        raise ValueError("topology has no link with a latency or cost")
    index = _index(topology)
    size = len(index)
    weights: dict[tuple[int, int], float] = {}
    for link, latency in weighted:  # undirected: keep the cheapest of parallel links
        low, high = sorted((index[link.source], index[link.target]))
        weights[(low, high)] = min(weights.get((low, high), math.inf), latency)
    rows, cols = zip(*weights)
    graph = csr_array((list(weights.values()), (rows, cols)), shape=(size, size))
    tree = minimum_spanning_tree(graph).tocoo()
    names = list(index)
    edges = sorted(
        ((names[i], names[j], float(w)) for i, j, w in zip(tree.row, tree.col, tree.data)), key=lambda e: (e[2], e[:2])
    )
    components, _ = connected_components(graph, directed=False)
    return SpanningTree(edges, float(sum(e[2] for e in edges)), int(components))


@dataclass(frozen=True)
class MaxFlow:
    source: str
    sinks: list[str]
    value: float  # bytes per second from the source to all sinks together
    per_sink: dict[str, float]
    cut: list[tuple[str, str, float]]  # the links of a minimum cut and their bandwidths
    link_flows: list[tuple[str, str, float]]  # flow on each used link, in its direction


def max_flow(topology: Topology, source: str | None = None, sinks: list[str] | None = None) -> MaxFlow:
    """The maximum flow from ``source`` to ``sinks`` (default: the topology's) over the links'
    bandwidths, with a minimum cut."""
    source = source if source is not None else topology.source
    sinks = list(sinks if sinks is not None else topology.sinks)
    links = [(link, link.bandwidth) for link in topology.links if link.bandwidth is not None]
    if not links:
        raise ValueError("topology has no link with a bandwidth")
    index = _index(topology)
    if source is None:
        raise ValueError("source is missing: name the storage node (--source or topology.source)")
    if not sinks:
        raise ValueError("sinks are missing: name the workers (--sinks or topology.sinks)")
    for name, role in [(source, "source"), *((sink, "sink") for sink in sinks)]:
        if name not in index:
            raise ValueError(f"{role} {name!r} is not a node of the topology")
    if source in sinks:
        raise ValueError(f"source {source!r} is also a sink")

    capacity: dict[tuple[int, int], float] = {}
    for link, bandwidth in links:
        pairs = [(link.source, link.target)] + ([] if topology.directed else [(link.target, link.source)])
        for u, v in pairs:
            key = (index[u], index[v])
            capacity[key] = capacity.get(key, 0.0) + bandwidth
    total = sum(capacity.values())
    whole = all(float(c).is_integer() for c in capacity.values()) and 2 * total < 2**31
    unit = 1.0 if whole else total / INT32_BUDGET
    super_sink = len(index)
    for sink in sinks:  # "unbounded": more than everything that can arrive
        capacity[(index[sink], super_sink)] = total
    keys = list(capacity)
    data = np.array([max(1, round(capacity[k] / unit)) if k[1] != super_sink else round(total / unit) for k in keys],
                    dtype=np.int32)
    rows, cols = (np.array(part, dtype=np.int32) for part in zip(*keys))
    graph = csr_array((data, (rows, cols)), shape=(super_sink + 1, super_sink + 1))
    result = maximum_flow(graph, index[source], super_sink, method="dinic")
    flow = result.flow.toarray()
    dense = graph.toarray()
    cut_off = [sink for sink in sinks if flow[index[sink], super_sink] == 0]
    if cut_off:  # a flow of 0 bytes/s answers no question: the topology is not what was meant
        raise ValueError(f"sink {cut_off[0]!r} cannot be reached from source {source!r} over links with a bandwidth")

    # The minimum cut: nodes reachable from the source in the residual graph, and the links leaving them.
    residual = csr_array(np.where(dense - flow > 0, 1, 0))
    reachable = set(breadth_first_order(residual, index[source], directed=True, return_predecessors=False).tolist())
    names = list(index)
    cut: dict[tuple[str, str], float] = {}
    for link, bandwidth in links:
        pairs = [(link.source, link.target)] + ([] if topology.directed else [(link.target, link.source)])
        for u, v in pairs:
            if index[u] in reachable and index[v] not in reachable:
                cut[(u, v)] = cut.get((u, v), 0.0) + bandwidth
    used = [
        (names[i], names[j], float(flow[i, j]) * unit)
        for i in range(len(names)) for j in range(len(names)) if flow[i, j] > 0
    ]
    return MaxFlow(
        source=source,
        sinks=sinks,
        value=float(result.flow_value) * unit,
        per_sink={sink: float(flow[index[sink], super_sink]) * unit for sink in sinks},
        cut=[(u, v, bandwidth) for (u, v), bandwidth in sorted(cut.items())],
        link_flows=used,
    )
