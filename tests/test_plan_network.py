"""Spanning trees and max flow / min cut on small graphs solved by hand."""

from __future__ import annotations

import json

import pytest

from gradwise.plan import network

# storage feeds two switches, which feed two workers (directed, bandwidths in GB/s):
#   storage -20-> s1, storage -5-> s2, s1 -4-> w1, s1 -8-> w2, s2 -10-> w2
# By hand: s1 can pass on at most 4 + 8 = 12 of its 20, s2 all of its 5: 17 in total, and
# the cut {s1->w1, s1->w2, storage->s2} has exactly 4 + 8 + 5 = 17.
LINKS = [
    {"from": "storage", "to": "s1", "latency": 1, "bandwidth": 20},
    {"from": "storage", "to": "s2", "latency": 4, "bandwidth": 5},
    {"from": "s1", "to": "w1", "latency": 2, "bandwidth": 4},
    {"from": "s1", "to": "w2", "latency": 3, "bandwidth": 8},
    {"from": "s2", "to": "w2", "latency": 1, "bandwidth": 10},
]


def write(tmp_path, data, name="topology.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data) if name.endswith(".json") else data)
    return path


def test_max_flow_and_min_cut_by_hand(tmp_path):
    topology = network.read_topology(
        write(tmp_path, {"links": LINKS, "source": "storage", "sinks": ["w1", "w2"], "directed": True})
    )
    flow = network.max_flow(topology)
    assert flow.value == 17
    assert flow.per_sink == {"w1": 4, "w2": 13}
    assert flow.cut == [("s1", "w1", 4), ("s1", "w2", 8), ("storage", "s2", 5)]


def test_a_thin_storage_link_is_the_bottleneck(tmp_path):
    links = [dict(link) for link in LINKS]
    links[0]["bandwidth"] = 3  # storage -> s1
    topology = network.read_topology(write(tmp_path, {"links": links, "source": "storage", "sinks": ["w1", "w2"],
                                                      "directed": True}))
    flow = network.max_flow(topology)
    assert flow.value == 8
    assert flow.cut == [("storage", "s1", 3), ("storage", "s2", 5)]


def test_undirected_links_carry_flow_both_ways_and_fractional_bandwidths(tmp_path):
    # a square a-b-c-d-a with a diagonal a-c; from a to c: a-b-c (min 1.5e9), a-d-c (min 2.5e9), a-c 1e9
    csv = "from,to,latency,bandwidth\na,b,1,1.5e9\nb,c,1,3e9\nc,d,1,2.5e9\nd,a,1,4e9\na,c,5,1e9\n"
    topology = network.read_topology(write(tmp_path, csv, "net.csv"))
    flow = network.max_flow(topology, source="a", sinks=["c"])
    assert flow.value == pytest.approx(5e9, rel=1e-8)
    assert {(u, v) for u, v, _ in flow.cut} in ({("a", "b"), ("d", "c"), ("a", "c")},
                                                {("a", "b"), ("c", "d"), ("a", "c")})
    assert sum(b for *_, b in flow.cut) == pytest.approx(5e9)


def test_minimum_spanning_tree_by_hand(tmp_path):
    topology = network.read_topology(write(tmp_path, {"links": LINKS}))
    tree = network.spanning_tree(topology)
    # Kruskal: storage-s1 (1), s2-w2 (1), s1-w1 (2), s1-w2 (3); storage-s2 (4) would close a cycle
    assert tree.total == 7 and tree.components == 1
    assert {frozenset(edge[:2]) for edge in tree.links} == {
        frozenset(p) for p in [("storage", "s1"), ("s2", "w2"), ("s1", "w1"), ("s1", "w2")]
    }


def test_spanning_forest_of_a_disconnected_cluster(tmp_path):
    csv = "from,to,cost\na,b,2\nb,c,1\na,c,5\nx,y,3\n"
    tree = network.spanning_tree(network.read_topology(write(tmp_path, csv, "net.csv")))
    assert tree.components == 2 and tree.total == 6


@pytest.mark.parametrize(
    ("content", "name", "message"),
    [
        ({"links": [{"from": "a", "to": "b", "bandwidth": -1}]}, "t.json", r"topology.links\[0\].bandwidth must be"),
        ({"links": [{"from": "a", "latency": 1}]}, "t.json", r"topology.links\[0\].to is missing"),
        ({"nodes": []}, "t.json", "topology.links is missing"),
        ("{not json", "t.json", "is not valid JSON"),
        ("from,to,latency\na,b,x\n", "t.csv", "topology line 2.latency must be a number"),
        ("src,dst\na,b\n", "t.csv", "needs the columns from,to"),
        ("a b", "t.txt", "must end in .json or .csv"),
    ],
)
def test_malformed_topologies_name_the_field(tmp_path, content, name, message):
    path = tmp_path / name
    path.write_text(json.dumps(content) if isinstance(content, dict) else content)
    with pytest.raises(ValueError, match=message):
        network.read_topology(path)


def test_max_flow_needs_known_source_and_sinks(tmp_path):
    topology = network.read_topology(write(tmp_path, {"links": LINKS}))
    with pytest.raises(ValueError, match="source is missing"):
        network.max_flow(topology, sinks=["w1"])
    with pytest.raises(ValueError, match="sink 'w9' is not a node"):
        network.max_flow(topology, source="storage", sinks=["w9"])
