"""The alpha-beta model: formulas, the fit, and its check against timed gloo all-reduces."""

from __future__ import annotations

import pytest

from gradwise.plan import communication as comm
from gradwise.plan.collective_timing import time_collectives


def test_ring_terms():
    assert comm.terms("ring_all_reduce", 1000, 4) == (6.0, 1500.0)
    assert comm.terms("ring_reduce_scatter", 1000, 4) == (3.0, 750.0)
    assert comm.terms("ring_all_gather", 1000, 4) == (3.0, 750.0)
    assert comm.terms("ring_all_reduce", 1000, 1) == (0.0, 0.0)
    # all-reduce = reduce-scatter + all-gather
    rs, ag = comm.terms("ring_reduce_scatter", 96, 8), comm.terms("ring_all_gather", 96, 8)
    assert comm.terms("ring_all_reduce", 96, 8) == (rs[0] + ag[0], rs[1] + ag[1])


def test_tree_and_parameter_server_terms():
    assert comm.terms("tree_all_reduce", 100, 8) == (6.0, 600.0)  # 2 log2(8) rounds
    assert comm.terms("parameter_server", 100, 8) == (2.0, 1600.0)  # the server's link carries 8 x 100 each way
    assert comm.terms("parameter_server", 100, 8, servers=8) == (16.0, 200.0)


def test_collective_time_and_latency_share():
    link = comm.AlphaBeta.from_link(latency=1e-5, bandwidth=1e9)
    assert comm.collective_time(link, "ring_all_reduce", 1e6, 4) == pytest.approx(6e-5 + 1.5e-3)
    assert comm.latency_share(link, "ring_all_reduce", 1e6, 4) == pytest.approx(6e-5 / (6e-5 + 1.5e-3))
    # bandwidth term nearly flat in p, latency linear: small messages become latency-bound
    assert comm.latency_share(link, "ring_all_reduce", 1e3, 1024) > 0.99
    # two processes per core share the host's bandwidth (max-rate model)
    assert comm.collective_time(link, "ring_all_reduce", 1e6, 4, cores=2) == pytest.approx(6e-5 + 3e-3)


def test_fit_recovers_alpha_and_beta_from_exact_timings():
    truth = comm.AlphaBeta(2e-4, 7e-10)
    sizes = [4096, 65536, 2**20, 2**22, 2**24]
    procs = [2, 2, 2, 3, 4]
    times = [comm.collective_time(truth, "ring_all_reduce", n, p) for n, p in zip(sizes, procs)]
    fitted = comm.fit_alpha_beta("ring_all_reduce", sizes, procs, times)
    assert fitted.alpha == pytest.approx(truth.alpha, rel=1e-9)
    assert fitted.beta == pytest.approx(truth.beta, rel=1e-9)


def test_bad_inputs_name_the_field():
    with pytest.raises(ValueError, match="bandwidth must be > 0"):
        comm.AlphaBeta.from_link(1e-6, 0)
    with pytest.raises(ValueError, match="latency must be >= 0"):
        comm.AlphaBeta(-1.0, 1e-9)
    with pytest.raises(ValueError, match="algorithm must be one of"):
        comm.terms("butterfly", 10, 2)
    with pytest.raises(ValueError, match="processes must be an integer >= 1"):
        comm.terms("ring_all_reduce", 10, 0)


FIT_SIZES = [2**12, 2**16, 2**20, 2**22]
HELD_OUT = [2**14, 2**18, 2**21]


@pytest.mark.measurement
def test_alpha_beta_fitted_on_gloo_all_reduce_predicts_other_message_sizes():
    """Fit alpha and beta on timed all-reduces between two local gloo processes, then predict
    message sizes left out of the fit within 25%. Two processes because the machine has two
    cores: with more processes than cores the latency is the scheduler's, not the link's
    (``benchmarks/collectives.py`` measures and reports that regime). A shared machine is
    noisy: the fastest of 15 calls is the least disturbed, and a failed attempt is measured
    again, up to three times, before the test fails. It runs alone, with ``make measure``
    (marker ``measurement``): its errors sit at 20-25% here, too close to the limit for CI."""
    errors = None
    for attempt in range(3):
        timings = time_collectives(2, FIT_SIZES + HELD_OUT, repeats=15, seed=attempt)
        seconds = {t.message_bytes: t.fastest for t in timings}
        link = comm.fit_alpha_beta("ring_all_reduce", FIT_SIZES, [2] * len(FIT_SIZES), [seconds[n] for n in FIT_SIZES])
        assert link.alpha > 0 and link.beta > 0
        errors = {n: comm.collective_time(link, "ring_all_reduce", n, 2) / seconds[n] - 1 for n in HELD_OUT}
        if all(abs(e) <= 0.25 for e in errors.values()):
            return
    pytest.fail(f"relative prediction errors {errors} exceed 25% in three attempts")
