"""The chi-squared test of failure type against hardware: planted dependence and none."""

from __future__ import annotations

import numpy as np
import pytest

from gradwise.plan import failures

OUTCOMES = ["success", "out-of-memory", "missing-shard", "diverged"]


def jobs_from(probabilities: dict[str, list[float]], count: int, seed: int) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    jobs = []
    for hardware, p in probabilities.items():
        jobs += [(hardware, OUTCOMES[i]) for i in rng.choice(len(OUTCOMES), size=count, p=p)]
    return jobs


SAME = [0.85, 0.05, 0.05, 0.05]


def test_planted_dependence_is_found_with_its_cell():
    # the a100-40gb nodes run out of memory six times as often as the others
    planted = {"h100": SAME, "a100-80gb": SAME, "a100-40gb": [0.60, 0.30, 0.05, 0.05]}
    result = failures.dependence_test(jobs_from(planted, 300, seed=0))
    assert result.p_value < 1e-6
    assert result.dof == (3 - 1) * (4 - 1)
    top = result.driving_cells[0]
    assert (top.hardware, top.outcome) == ("a100-40gb", "out-of-memory") and top.residual > 0
    # the planted change moved jobs from success to out-of-memory on one kind of hardware
    second = result.driving_cells[1]
    assert (second.hardware, second.outcome) == ("a100-40gb", "success") and second.residual < 0


def test_no_dependence_rejects_at_about_the_nominal_rate():
    rejections = sum(
        failures.dependence_test(jobs_from({"h100": SAME, "a100": SAME, "mi300": SAME}, 200, seed)).p_value < 0.05
        for seed in range(200)
    )
    assert 2 <= rejections <= 20  # about 10 expected under the null (5%)


def test_statistic_and_residuals_by_hand():
    jobs = [("a", "ok")] * 30 + [("a", "oom")] * 10 + [("b", "ok")] * 20 + [("b", "oom")] * 20
    result = failures.dependence_test(jobs)
    observed = np.array([[30, 10], [20, 20]])
    expected = np.outer(observed.sum(1), observed.sum(0)) / 80
    assert result.hardware == ["a", "b"] and result.outcomes == ["ok", "oom"]
    np.testing.assert_array_equal(result.observed, observed)
    assert result.statistic == pytest.approx(((observed - expected) ** 2 / expected).sum())
    # in a 2 x 2 table every adjusted residual is +-sqrt(X^2)
    np.testing.assert_allclose(np.abs(result.residuals), np.sqrt(result.statistic))


def test_reading_job_records(tmp_path):
    path = tmp_path / "jobs.csv"
    path.write_text("job,Hardware,outcome\n1,h100,success\n2,a100,diverged\n")
    assert failures.read_jobs(path) == [("h100", "success"), ("a100", "diverged")]
    path.write_text("job,hardware\n1,h100\n")
    with pytest.raises(ValueError, match="has no 'outcome' column"):
        failures.read_jobs(path)
    path.write_text("hardware,outcome\nh100,\n")
    with pytest.raises(ValueError, match="line 2: outcome is empty"):
        failures.read_jobs(path)
    with pytest.raises(ValueError, match="at least two kinds of hardware"):
        failures.dependence_test([("h100", "ok"), ("h100", "oom")])
