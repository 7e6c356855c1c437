"""Step time and time to solution: compute, bucketed all-reduce, overlap, number formats."""

from __future__ import annotations

import math

import pytest

from gradwise.plan import step_time
from gradwise.plan.communication import AlphaBeta, collective_time

LINK = AlphaBeta.from_link(latency=5e-6, bandwidth=25e9)


def test_compute_time_is_flops_over_throughput():
    assert step_time.compute_time(6e12, 2e12) == 3.0
    with pytest.raises(ValueError, match="throughput must be > 0"):
        step_time.compute_time(1.0, 0.0)


def test_one_device_has_no_communication():
    step = step_time.data_parallel_step_time(1e9, 1e6, 1, 1e15, LINK, 2)
    assert step.communication == 0 and step.total == pytest.approx(6e9 * 1e6 / 1e15)


def test_bucketed_all_reduce_pays_latency_per_bucket():
    params, devices = 1.3e9, 64
    step = step_time.data_parallel_step_time(params, 1e6, devices, 1e15, LINK, 2, overlap=False)
    buckets = math.ceil(params * 2 / step_time.DDP_BUCKET_BYTES)
    assert step.latency == pytest.approx(buckets * 2 * (devices - 1) * LINK.alpha)
    per_bucket = collective_time(LINK, "ring_all_reduce", params * 2 / buckets, devices)
    assert step.communication == pytest.approx(buckets * per_bucket)
    assert step.total == pytest.approx(step.compute + step.communication)


def test_overlap_hides_communication_behind_the_backward_pass():
    kwargs = dict(params=1e9, tokens_per_step=5e5, devices=64, throughput=3e14, link=LINK, gradient_bytes_per_param=2)
    serial = step_time.data_parallel_step_time(**kwargs, overlap=False)
    overlapped = step_time.data_parallel_step_time(**kwargs, overlap=True)
    assert max(serial.compute, serial.communication) <= overlapped.total < serial.total
    _, _, last = step_time.gradient_sync_time(LINK, 2e9, 64)
    expected = serial.compute / 3 + max(2 * serial.compute / 3 + last, serial.communication)
    assert overlapped.total == pytest.approx(expected)


def test_zero_3_moves_one_and_a_half_times_the_bytes():
    bandwidth_only = AlphaBeta(0.0, 1e-9)
    plain, _, _ = step_time.gradient_sync_time(bandwidth_only, 1e9, 8)
    zero3, _, _ = step_time.gradient_sync_time(bandwidth_only, 1e9, 8, zero_stage=3)
    assert zero3 == pytest.approx(1.5 * plain)


def test_a_faster_format_halves_a_compute_bound_step_but_not_a_latency_bound_one():
    throughputs = {"bf16": 4e14, "fp8": 8e14}
    few = {p.precision: p for p in step_time.compare_formats(1.2e7, 2.6e5, 1, LINK, throughputs)}
    many = {p.precision: p for p in step_time.compare_formats(1.2e7, 2.6e5, 4096, LINK, throughputs)}
    assert few["bf16"].step.total / few["fp8"].step.total == pytest.approx(2.0)
    assert many["fp8"].step.latency_share > 0.9
    assert many["bf16"].step.total / many["fp8"].step.total < 1.05


def test_time_to_solution_is_steps_times_step_time():
    plans = step_time.compare_formats(1e9, 1e6, 8, LINK, {"bf16": 4e14, "fp8": 8e14}, steps=1000,
                                      step_factors={"fp8": 1.25})
    by_name = {p.precision: p for p in plans}
    assert by_name["bf16"].time_to_solution == pytest.approx(1000 * by_name["bf16"].step.total)
    assert by_name["fp8"].steps_to_solution == 1250
    assert by_name["fp8"].time_to_solution == pytest.approx(1250 * by_name["fp8"].step.total)
    with pytest.raises(ValueError, match="precision must be one of"):
        step_time.compare_formats(1e9, 1e6, 8, LINK, {"fp4": 1e15})

