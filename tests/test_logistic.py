"""The sparse logistic-regression problem (closed forms against autograd), the logistic race
(the survey's qualitative finding on a small instance) and ``gradwise race --problem logistic``."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from gradwise.bench.logistic_race import format_logistic_table, logistic_race, plot_logistic_race, solve_to_optimum
from gradwise.cli import main
from gradwise.curvature import hvp
from gradwise.problems.logistic import SparseLogistic, make_sparse_classification

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


@pytest.fixture(scope="module")
def small() -> SparseLogistic:
    return SparseLogistic(num_examples=300, num_features=2000, density=0.01, seed=3)


def test_data_is_shaped_like_rcv1_and_reproducible():
    data, labels = make_sparse_classification(2000, 20_000, density=0.002, seed=1)
    assert data.matrix.layout == torch.sparse_csr
    assert data.shape == (2000, 20_000)
    density = data.matrix.values().numel() / (2000 * 20_000)
    assert 0.0015 < density < 0.0025
    row_norms = torch.segment_reduce(data.matrix.values() ** 2, "sum", offsets=data.matrix.crow_indices()).sqrt()
    assert torch.allclose(row_norms, torch.ones(2000, dtype=torch.float64))
    assert set(labels.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(labels.mean())) < 0.1
    again, again_labels = make_sparse_classification(2000, 20_000, density=0.002, seed=1)
    assert torch.equal(again.matrix.values(), data.matrix.values()) and torch.equal(again_labels, labels)
    other, _ = make_sparse_classification(2000, 20_000, density=0.002, seed=2)
    assert not torch.equal(other.matrix.crow_indices(), data.matrix.crow_indices())


def dense_loss(problem: SparseLogistic, w: torch.Tensor, rows=None) -> torch.Tensor:
    """The same objective with a dense matrix: the reference."""
    x = problem.data.matrix.to_dense()
    y = problem.labels
    if rows is not None:
        x, y = x[rows], y[rows]
    return torch.nn.functional.softplus(-y * (x @ w)).mean() + 0.5 * problem.l2 * w @ w


@pytest.mark.parametrize("rows", [None, torch.tensor([5, 0, 17, 5, 299])])
def test_closed_forms_match_autograd_on_the_dense_matrix(small, rows):
    generator = torch.Generator().manual_seed(0)
    w = 0.3 * torch.randn(small.num_features, generator=generator, dtype=torch.float64)
    v = torch.randn(small.num_features, generator=generator, dtype=torch.float64)
    reference = w.clone().requires_grad_()
    loss = dense_loss(small, reference, rows)
    (grad,) = torch.autograd.grad(loss, reference, create_graph=True)
    (hessian_v,) = torch.autograd.grad(grad, reference, v)
    assert small.objective(w, rows) == pytest.approx(float(loss.detach()), rel=1e-13)
    assert torch.allclose(small.gradient(w, rows), grad, atol=1e-15)
    assert torch.allclose(small.hvp(w, v, rows), hessian_v, atol=1e-14)
    # The differentiable loss (sparse products in autograd) is twice differentiable.
    assert torch.allclose(hvp(lambda ps: small.loss(ps[0], rows), [w], [v])[0], hessian_v, atol=1e-14)


def test_per_example_gradients_average_to_the_gradient(small):
    w = 0.1 * torch.randn(small.num_features, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rows = torch.arange(40)
    per_example = small.per_example_gradients(w, rows)
    assert per_example.shape == (40, small.num_features)
    assert torch.allclose(per_example.mean(0), small.gradient(w, rows), atol=1e-15)
    assert torch.allclose(per_example[7], small.gradient(w, rows[7:8]), atol=1e-15)


def test_race_reproduces_the_survey_finding_on_a_small_instance(tmp_path):
    """SGD is far ahead within the first epoch; the batch methods win at high accuracy."""
    problem = SparseLogistic(num_examples=1500, num_features=4000, seed=0)
    result = logistic_race(problem, ("sgd", "svrg", "lbfgs", "newton_cg"), epochs=8, batch_size=16)
    n = problem.num_examples
    curves = result.curves
    assert curves["sgd"].gap_at(0.5 * n) < 0.5 * min(curves[m].gap_at(0.5 * n) for m in ("lbfgs", "newton_cg"))
    assert curves["sgd"].gap_at(n) == min(c.gap_at(n) for c in curves.values())
    assert min(curves[m].gap_at(8 * n) for m in ("lbfgs", "newton_cg")) < 1e-3 * curves["sgd"].gap_at(8 * n)
    table = format_logistic_table(result)
    assert "sgd" in table and "1 ep" in table
    assert plot_logistic_race(result, tmp_path / "race.png").stat().st_size > 10_000


def test_optimum_has_a_vanishing_gradient(small):
    optimum, minimiser = solve_to_optimum(small)
    assert float(small.gradient(minimiser).abs().max()) < 1e-10
    assert small.objective(minimiser) == optimum
    # Strong convexity: F(w) - F* >= l2/2 |w - w*|^2 > 0 anywhere else.
    assert small.objective(minimiser + 1e-3) > optimum


def test_cli_race_problem_logistic(tmp_path, capsys):
    out = tmp_path / "runs"
    argv = ["race", "--problem", "logistic", "--methods", "sgd,lbfgs", "--epochs", "0.5", "--out", str(out), "--json"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "F* =" in stdout and "sgd" in stdout and "lbfgs" in stdout
    assert (out / "logistic.png").exists()
    saved = json.loads((out / "logistic.json").read_text())
    assert set(saved["curves"]) == {"sgd", "lbfgs"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--problem", "logistic,beale"], "give it alone"),
        (["--problem", "logistic", "--methods", "adam"], "method must be one of"),
        (["--problem", "logistic", "--epochs", "0"], "epochs must be > 0"),
    ],
)
def test_cli_logistic_bad_arguments(argv, message, capsys):
    assert main(["race", *argv]) == 2
    assert message in capsys.readouterr().err
