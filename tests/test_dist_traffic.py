"""TrafficMeter counts what each collective carries, whoever issues it (Python, DDP's reducer)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from gradwise.distributed import run_processes
from gradwise.distributed.traffic import TrafficMeter, ring_bytes

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(120)]


def metered_collectives(rank: int, world_size: int) -> tuple[int, dict, dict, float]:
    model = nn.parallel.DistributedDataParallel(nn.Linear(10, 10))  # 110 parameters: one 440-byte bucket
    with TrafficMeter() as meter:
        model(torch.randn(3, 10)).sum().backward()
        dist.all_gather_single(torch.empty(2000), torch.ones(1000))
        dist.reduce_scatter_single(torch.empty(500), torch.ones(1000))
        dist.broadcast(torch.ones(7), 0)
        message = torch.ones(5, dtype=torch.float64)
        if rank == 0:
            dist.send(message, 1)
        else:
            dist.recv(message, 0)
    return meter.payload_bytes, dict(meter.calls), dict(meter.payload_by_kind), meter.ring_link_bytes


def test_meter_counts_payload_of_every_kind_including_ddp_buckets():
    for payload, calls, by_kind, ring in run_processes(metered_collectives, 2):
        assert by_kind == {"all-reduce": 440, "all-gather": 4000, "reduce-scatter": 4000, "broadcast": 28,
                           "send/recv": 40}
        assert calls == dict.fromkeys(by_kind, 1)
        assert payload == sum(by_kind.values())
        assert ring == pytest.approx(440 + 4000 + 2000 + 28 + 40)


@pytest.mark.parametrize(("kind", "expected"), [("all-reduce", 1500.0), ("all-gather", 3000.0),
                                                 ("reduce-scatter", 750.0), ("broadcast", 1000.0)])
def test_ring_bytes_follow_the_ring_algorithms(kind, expected):
    assert ring_bytes(kind, 1000, 4) == expected
    assert ring_bytes(kind, 1000, 1) == 0.0
