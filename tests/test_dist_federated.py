"""FedAvg, consensus ADMM and split learning over real processes (gloo), against single-process references."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradwise.distributed import run_processes
from gradwise.distributed.algorithms.admm import consensus_admm
from gradwise.distributed.algorithms.federated import FedAvg
from gradwise.distributed.algorithms.federated_logistic import FederatedLogistic
from gradwise.distributed.algorithms.split_learning import SplitClient, SplitServer
from gradwise.distributed.traffic import TrafficMeter
from gradwise.optim import Adam

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(120)]

D = 10
PROBLEM = {"num_clients": 4, "examples_per_client": 200, "num_features": D, "label_skew": 0.5, "l2": 5e-2, "seed": 0}
EXACT_PROBLEM = {**PROBLEM, "examples_per_client": [100, 150, 250, 300], "label_skew": 1.0}
EXACT_ROUNDS, ROUNDS = 12, 300
FEDAVG_RUNS = [(EXACT_PROBLEM, EXACT_ROUNDS, {"lr": 0.8, "local_steps": 1, "lr_decay_rounds": 5}),
               (PROBLEM, ROUNDS, {"lr": 2.0, "fraction": 0.5, "local_steps": 5, "lr_decay_rounds": 1, "seed": 7})]
RHO = 0.05
SPLIT_STEPS, SPLIT_BATCH = 15, 12


def fedavg_run(rank: int, problem_args: dict, rounds: int, fedavg_args: dict) -> tuple[list[float], list[bool], int]:
    """Client ``rank`` of FedAvg on full local batches, from rank 0's w = 0 (the others' own
    starting points are overwritten): the final parameters, whether it took part in each
    round, and the bytes it sent."""
    problem = FederatedLogistic(**problem_args)
    w = torch.full((D,), float(rank), dtype=torch.float64, requires_grad=True)
    fedavg = FedAvg([w], problem.sizes[rank], **fedavg_args)
    taken = [fedavg.round(lambda: problem.loss(w, client=rank)) for _ in range(rounds)]
    return w.detach().tolist(), taken, fedavg.bytes_communicated


def admm_run(rank: int, solver: str) -> tuple[list[float], int, bool, list[float], int]:
    problem = FederatedLogistic(**PROBLEM)
    weight = problem.weight(rank)
    result = consensus_admm(lambda x: weight * problem.loss(x, client=rank), torch.zeros(D, dtype=torch.float64),
                            rho=RHO, local_solver=solver, local_iterations=3 if solver == "newton" else 10)
    return result.z.tolist(), result.iterations, result.converged, result.primal_residuals, result.bytes_communicated


def split_model() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def split_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(4)
    return [(torch.randn(SPLIT_BATCH, 6, generator=generator, dtype=torch.float64),
             torch.randint(0, 3, (SPLIT_BATCH,), generator=generator)) for _ in range(SPLIT_STEPS)]


def split_run(rank: int) -> tuple[list[float | None], int, int, int, dict]:
    """Rank 0 is the client (layers up to the second tanh), rank 1 the server (the last layer and the loss)."""
    model = split_model()
    with TrafficMeter() as meter:
        if rank == 0:
            bottom = model[:4]
            with pytest.raises(ValueError, match="server must be another rank than this client's, got 0"):
                SplitClient(bottom, Adam(bottom.parameters()), server=0)
            side = SplitClient(bottom, Adam(bottom.parameters(), lr=0.01), server=1)
            losses = [side.step(inputs) for inputs, _ in split_batches()]
        else:
            top = model[4:]
            side = SplitServer(top, nn.functional.cross_entropy, Adam(top.parameters(), lr=0.01),
                               activation_shape=(8,), client=0)
            losses = [side.step(targets) for _, targets in split_batches()]
    return losses, side.bytes_sent, side.bytes_received, meter.payload_bytes, dict(meter.calls)


def federated_worker(rank: int, world_size: int) -> dict:
    results = {"fedavg": [fedavg_run(rank, *run) for run in FEDAVG_RUNS]}
    for solver in ("newton", "lbfgs"):
        results[solver] = admm_run(rank, solver)
    if rank < 2:  # split learning on ranks 0 and 1; ranks 2 and 3 wait at the closing barrier
        results["split"] = split_run(rank)
    return results


@pytest.fixture(scope="module")
def runs() -> list[dict]:
    """Every distributed case in one start of 4 processes (starting them costs more than the cases)."""
    return run_processes(federated_worker, 4)


def test_label_skew_makes_the_clients_differ_and_newton_finds_the_optimum():
    problem = FederatedLogistic(**PROBLEM)
    positives = [float((problem.client(k)[1] > 0).double().mean()) for k in range(4)]
    assert positives[0] < 0.1 and positives[-1] > 0.9
    optimum = problem.optimum()
    w = optimum.clone().requires_grad_()
    gradients = [torch.autograd.grad(problem.loss(w, client=k), w)[0] for k in range(4)]
    assert float(sum(problem.weight(k) * g for k, g in enumerate(gradients)).norm()) <= 1e-10
    assert min(float(g.norm()) for g in gradients) > 0.02  # heterogeneous: no client is at w*


def test_fedavg_with_full_participation_and_one_local_step_is_gradient_descent(runs):
    problem = FederatedLogistic(**EXACT_PROBLEM)  # unequal n_k: the weighting matters
    w = torch.zeros(D, dtype=torch.float64, requires_grad=True)
    for t in range(EXACT_ROUNDS):
        (gradient,) = torch.autograd.grad(problem.loss(w), w)
        with torch.no_grad():
            w -= 0.8 / (1 + t / 5) * gradient
    for final, taken, sent in (rank["fedavg"][0] for rank in runs):
        torch.testing.assert_close(torch.tensor(final, dtype=torch.float64), w.detach(), rtol=1e-12, atol=1e-14)
        assert all(taken) and sent == D * 8 + EXACT_ROUNDS * (D + 1) * 8  # w_0 broadcast, then rounds


def test_fedavg_converges_to_the_centralised_optimum_despite_drift_and_partial_participation(runs):
    outcomes = [rank["fedavg"][1] for rank in runs]
    for final, taken, sent in outcomes:
        assert final == outcomes[0][0]
        assert sent == D * 8 + ROUNDS * (D + 1) * 8
        assert 0.4 < sum(taken) / ROUNDS < 0.6
    assert [sum(column) for column in zip(*(taken for _, taken, _ in outcomes))] == [2] * ROUNDS
    problem = FederatedLogistic(**PROBLEM)
    final = torch.tensor(outcomes[0][0], dtype=torch.float64)
    gap = float(problem.loss(final)) - float(problem.loss(problem.optimum()))
    assert 0 <= gap <= 1e-4  # the objective gap F(w_T) - F(w*)


@pytest.mark.parametrize("solver", ["newton", "lbfgs"])
def test_consensus_admm_reaches_the_centralised_optimum(runs, solver):
    outcomes = [rank[solver] for rank in runs]
    for z, iterations, converged, _primal_residuals, sent in outcomes:
        assert converged and z == outcomes[0][0]
        assert sent == iterations * (D + 3) * 8
    optimum = FederatedLogistic(**PROBLEM).optimum()
    assert float((torch.tensor(outcomes[0][0], dtype=torch.float64) - optimum).norm()) <= 1e-7
    assert outcomes[0][3][-1] < 1e-6 * outcomes[0][3][0]


def test_split_learning_equals_the_unsplit_model_and_only_activations_and_their_gradients_cross(runs):
    (client_losses, client_sent, client_received, client_meter, client_calls), \
        (losses, server_sent, server_received, server_meter, server_calls) = runs[0]["split"], runs[1]["split"]
    model = split_model()
    optimizer = Adam(model.parameters(), lr=0.01)
    reference = []
    for inputs, targets in split_batches():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()
        optimizer.step()
        reference.append(loss.item())
    assert client_losses == [None] * SPLIT_STEPS
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), rtol=1e-12, atol=0)
    activation_bytes = SPLIT_STEPS * SPLIT_BATCH * 8 * 8  # float64 activations of width 8
    assert client_sent == server_received == activation_bytes
    assert server_sent == client_received == activation_bytes
    assert client_meter == server_meter == 2 * activation_bytes
    assert client_calls == server_calls == {"send/recv": 2 * SPLIT_STEPS}


@pytest.mark.parametrize(("make", "message"), [
    (lambda w: FedAvg([w], 10, lr=0.1, fraction=0.0), r"fraction must be in \(0, 1\], got 0.0"),
    (lambda w: FedAvg([w], 10, lr=0.1, fraction=1.5), r"fraction must be in \(0, 1\], got 1.5"),
    (lambda w: FedAvg([w], 10, lr=0.1, local_steps=0), "local_steps must be an integer >= 1, got 0"),
    (lambda w: FedAvg([w], 0, lr=0.1), "num_samples must be an integer >= 1, got 0"),
    (lambda w: FedAvg([w], 10, lr=-1.0), "lr must be > 0, got -1.0"),
    (lambda w: FedAvg([w], 10, lr=0.1, lr_decay_rounds=0), "lr_decay_rounds must be > 0, got 0"),
    (lambda w: consensus_admm(lambda x: x.sum(), w.detach(), rho=0.0), "rho must be > 0, got 0.0"),
    (lambda w: consensus_admm(lambda x: x.sum(), w.detach(), rho=-1.0), "rho must be > 0, got -1.0"),
    (lambda w: consensus_admm(lambda x: x.sum(), w.detach(), local_solver="sgd"),
     "local_solver must be one of 'newton', 'lbfgs', got 'sgd'"),
    (lambda w: consensus_admm(lambda x: x.sum(), w.detach(), local_iterations=0),
     "local_iterations must be an integer >= 1, got 0"),
    (lambda w: FederatedLogistic(label_skew=1.5), r"label_skew must be in \[0, 1\], got 1.5"),
    (lambda w: FederatedLogistic(num_clients=2, examples_per_client=[5]),
     r"examples_per_client must give one size per client \(2\), got 1"),
])
def test_bad_input_is_refused_with_the_parameter_named(make, message):
    with pytest.raises(ValueError, match=message):
        make(torch.zeros(3, requires_grad=True))
