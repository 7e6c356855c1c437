"""ZeRO stages 1 and 2: two real ranks over gloo equal one process with the unsharded optimizer.

One spawned job runs every case (process start-up dominates on 2 cores); the tests read
its results. Each rank feeds its half of the global batch; the reference steps the
unsharded optimizer on the whole batch in the same process.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradwise.distributed import run_processes
from gradwise.distributed.state_bytes import optimizer_state_bytes
from gradwise.distributed.strategies.zero_optimizer import ZeroOptimizer, assign_whole_tensors
from gradwise.optim import (
    KFAC,
    LBFGS,
    SGD,
    Adafactor,
    Adagrad,
    AdamW,
    AdEMAMix,
    Lion,
    Muon,
    NAdam,
    PSGDKron,
    RMSprop,
    ScheduleFreeAdamW,
    ScheduleFreeSGD,
    Shampoo,
    muon_param_groups,
)

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(280)]

STEPS, GLOBAL_BATCH, WORLD = 3, 8, 2

# 5*7 + 7 + 7*3 = 63 parameters: odd, so the flat buffer needs one element of padding.
OPTIMIZERS = {
    "adamw": lambda m: AdamW(m.parameters(), lr=0.05, weight_decay=0.1),
    "lion": lambda m: Lion(m.parameters(), lr=0.01, weight_decay=0.5),
    "sgd": lambda m: SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    "nadam": lambda m: NAdam(m.parameters(), lr=0.02),
    "rmsprop": lambda m: RMSprop(m.parameters(), lr=0.01, momentum=0.5, centered=True),
    "adagrad": lambda m: Adagrad(m.parameters(), lr=0.05),
    # the step count and averaging weights live in the param groups (as the schedulefree package keeps them)
    "schedule-free-adamw": lambda m: ScheduleFreeAdamW(m.parameters(), lr=0.05, weight_decay=0.1, warmup_steps=2),
    "schedule-free-sgd": lambda m: ScheduleFreeSGD(m.parameters(), lr=0.1, weight_decay=0.01),
    "muon": lambda m: Muon(muon_param_groups(m), lr=0.05, adamw_lr=0.01, ns_dtype=torch.float32),
    # Muon's refinements: NorMuon's row state goes with its tensor's whole-tensor shard
    "muon-normuon-polar-express": lambda m: Muon(muon_param_groups(m), lr=0.05, adamw_lr=0.01, ns_dtype=torch.float32,
                                                 normuon_beta2=0.95, orthogonalization="polar_express"),
    "adafactor": lambda m: Adafactor(m.parameters(), lr=0.01),
    "kfac": lambda m: KFAC(m, lr=0.05, damping=0.01, momentum=0.9, inverse_every=1),
    "shampoo": lambda m: Shampoo(m.parameters(), lr=0.01, precondition_every=1, start_preconditioning_step=1,
                                 eps=1e-4),
    # per-tensor statistics (the mask's count, MARS's norm): sharded by whole tensors
    "adamw-cautious-mars": lambda m: AdamW(m.parameters(), lr=0.05, weight_decay=0.1, cautious=True, mars_gamma=0.5),
    "ademamix-mars": lambda m: AdEMAMix(m.parameters(), lr=0.05, t_alpha_beta3=2, mars_gamma=0.5),
    # probes seeded per tensor and step, not per rank: the sharded run draws the unsharded run's probes
    "psgd-kron": lambda m: PSGDKron(m.parameters(), lr=0.01, weight_decay=0.1),
    # state formats quantise per block of a whole tensor: ZeRO gives each rank whole tensors
    "adamw-8bit": lambda m: AdamW(m.parameters(), lr=0.05, weight_decay=0.1, state_format="8bit"),
    "adamw-4bit": lambda m: AdamW(m.parameters(), lr=0.05, weight_decay=0.1, state_format="4bit"),
    "lion-bf16-sr": lambda m: Lion(m.parameters(), lr=0.01, weight_decay=0.5, state_format="bf16-sr"),
}
CLIPPED = {"adamw": 0.05}  # clip_grad_norm_ below the gradient's norm, so it scales


def make_model(single_tensor: bool = False) -> nn.Module:
    torch.manual_seed(0)
    if single_tensor:
        return nn.Linear(5, 3, bias=False)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3, bias=False))


def batches() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(STEPS, GLOBAL_BATCH, 5, generator=generator)
    return inputs, torch.randn(STEPS, GLOBAL_BATCH, 3, generator=generator)


def train(model, optimizer, steps, rank=None, clip=None, schedule=True):
    """Run ``steps``; ``rank`` set: a ZeroOptimizer fed this rank's rows. Returns the grad norms."""
    inputs, targets = batches()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + 2 * s)) if schedule else None
    norms, grads_kept = [], []
    for step in steps:
        x, y = inputs[step], targets[step]
        if rank is not None:
            rows = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
            x, y = x[rows], y[rows]
        F.mse_loss(model(x), y).backward()
        if rank is None:
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip or math.inf).item())
        else:
            optimizer.reduce_gradients()
            grads_kept.append([p.grad is not None for p in model.parameters()])
            norms.append(optimizer.clip_grad_norm_(clip) if clip else optimizer.grad_norm())
        optimizer.step()
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()
    return norms, grads_kept


def params_of(model):
    """Plain lists: tensors returned from a worker would travel through shared memory that
    the exiting worker takes with it."""
    return [p.detach().reshape(-1).tolist() for p in model.parameters()]


def assert_params_close(actual, expected, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close([torch.tensor(p) for p in actual], [torch.tensor(p) for p in expected],
                               rtol=rtol, atol=atol)


def zero_cases(rank: int, world_size: int) -> dict:
    results = {}
    for stage in (1, 2):
        for name, build in OPTIMIZERS.items():
            reference_model = make_model()
            reference = build(reference_model)
            reference_norms, _ = train(reference_model, reference, range(STEPS), clip=CLIPPED.get(name))
            model = make_model()
            zero = ZeroOptimizer(build(model), stage=stage)
            norms, grads_kept = train(model, zero, range(STEPS), rank=rank, clip=CLIPPED.get(name))
            results[name, stage] = dict(
                params=params_of(model), reference=params_of(reference_model), norms=norms,
                reference_norms=reference_norms, grads_kept=grads_kept, bytes=zero.state_bytes(),
                reference_bytes=optimizer_state_bytes(reference),
                largest_tensor_bytes=max(
                    optimizer_state_bytes_of_param(reference, p) for p in reference_model.parameters()
                ),
            )
    # More ranks than tensors: rank 1 owns nothing.
    reference_model, model = make_model(single_tensor=True), make_model(single_tensor=True)
    reference = Muon(reference_model.parameters(), lr=0.05, ns_dtype=torch.float32)
    train(reference_model, reference, range(STEPS))
    zero = ZeroOptimizer(Muon(model.parameters(), lr=0.05, ns_dtype=torch.float32), stage=2)
    train(model, zero, range(STEPS), rank=rank)
    results["single-tensor"] = dict(params=params_of(model), reference=params_of(reference_model),
                                    bytes=zero.state_bytes(), reference_bytes=optimizer_state_bytes(reference))
    # state_dict round trip: 2 steps, save, rebuild, load, 1 step == 3 steps straight.
    for name, stage in (("adamw", 2), ("muon", 1)):
        straight = make_model()
        train(straight, ZeroOptimizer(OPTIMIZERS[name](straight), stage=stage), range(STEPS), rank=rank, schedule=False)
        first = make_model()
        zero = ZeroOptimizer(OPTIMIZERS[name](first), stage=stage)
        train(first, zero, range(STEPS - 1), rank=rank, schedule=False)
        saved = zero.state_dict()
        resumed = make_model()
        resumed.load_state_dict(first.state_dict())
        zero = ZeroOptimizer(OPTIMIZERS[name](resumed), stage=stage)
        zero.load_state_dict(saved)
        train(resumed, zero, range(STEPS - 1, STEPS), rank=rank, schedule=False)
        results["roundtrip", name] = dict(params=params_of(resumed), reference=params_of(straight))
    return results


def optimizer_state_bytes_of_param(optimizer, param) -> int:
    return sum(v.numel() * v.element_size() for v in optimizer.state[param].values() if isinstance(v, torch.Tensor))


@pytest.fixture(scope="module")
def results():
    return run_processes(zero_cases, WORLD, timeout_s=250)


CASES = [(name, stage) for stage in (1, 2) for name in OPTIMIZERS]


@pytest.mark.parametrize("name, stage", CASES)
def test_zero_equals_the_unsharded_optimizer_under_an_lr_schedule(results, name, stage):
    for rank in range(WORLD):
        case = results[rank][name, stage]
        assert_params_close(case["params"], case["reference"])
        # The schedule decays the lr 5x over the run; a local optimizer missing it would differ.
        torch.testing.assert_close(case["norms"], case["reference_norms"], rtol=1e-5, atol=0)


def test_stage_two_keeps_only_the_owned_gradients(results):
    for rank in range(WORLD):
        assert results[rank]["adamw", 1]["grads_kept"][0] == [True, True, True]
        assert results[rank]["adamw", 2]["grads_kept"][0] == [False, False, False]  # in the flat shard instead
        # Muon: weight 0 (35 elements) to rank 0, the head (21) and the bias (7) to rank 1.
        assert results[rank]["muon", 2]["grads_kept"][0] == [rank == 0, rank == 1, rank == 1]


@pytest.mark.parametrize("name", ["adamw", "lion", "sgd"])
@pytest.mark.parametrize("stage", [1, 2])
def test_elementwise_state_is_one_nth_up_to_padding(results, name, stage):
    per_element = {"adamw": 8, "lion": 4, "sgd": 4}[name]
    step_bytes = {"adamw": 4, "lion": 0, "sgd": 0}[name]  # AdamW's fused kernel keeps a float32 step
    shard = math.ceil(63 / WORLD)
    for rank in range(WORLD):
        case = results[rank][name, stage]
        assert case["bytes"] == per_element * shard + step_bytes
        assert case["reference_bytes"] == per_element * 63 + 3 * step_bytes


@pytest.mark.parametrize(
    "name", ["muon", "adafactor", "shampoo", "kfac", "adamw-cautious-mars", "ademamix-mars", "psgd-kron", "adamw-8bit",
             "adamw-4bit", "lion-bf16-sr"]
)
def test_whole_tensor_state_is_one_nth_within_one_tensor(results, name):
    for stage in (1, 2):
        per_rank = [results[rank][name, stage]["bytes"] for rank in range(WORLD)]
        total = results[0][name, stage]["reference_bytes"]
        assert sum(per_rank) == total
        assert max(per_rank) - total / WORLD <= results[0][name, stage]["largest_tensor_bytes"]
        assert min(per_rank) > 0


def test_more_ranks_than_tensors_leaves_a_rank_without_state(results):
    for rank in range(WORLD):
        case = results[rank]["single-tensor"]
        assert_params_close(case["params"], case["reference"])
    assert [results[rank]["single-tensor"]["bytes"] for rank in range(WORLD)] == [
        results[0]["single-tensor"]["reference_bytes"], 0
    ]


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_state_dict_round_trip_resumes_exactly(results, name):
    for rank in range(WORLD):
        case = results[rank]["roundtrip", name]
        assert_params_close(case["params"], case["reference"], rtol=0, atol=0)


def test_assignment_is_greedy_largest_first_onto_the_least_loaded_rank():
    assert assign_whole_tensors([35, 7, 21], 2) == [0, 1, 1]
    # 5 -> r0, 5 -> r1, 4 -> r0 (tie, lower rank), 3 -> r1 (5 < 9), 3 -> r1 (8 < 9): loads 9 and 11.
    assert assign_whole_tensors([5, 5, 4, 3, 3], 2) == [0, 1, 0, 1, 1]
    assert assign_whole_tensors([4, 1], 3) == [0, 1]  # rank 2 owns nothing
    assert assign_whole_tensors([], 2) == []


def test_assignment_stays_within_one_tensor_of_the_mean():
    generator = torch.Generator().manual_seed(3)
    for world_size in (2, 3, 5):
        sizes = torch.randint(1, 1000, (40,), generator=generator).tolist()
        owners = assign_whole_tensors(sizes, world_size)
        loads = [sum(s for s, o in zip(sizes, owners) if o == r) for r in range(world_size)]
        assert max(loads) - sum(sizes) / world_size <= max(sizes)


def test_bad_input_is_refused_with_the_parameter_named():
    model = make_model()
    with pytest.raises(ValueError, match="stage must be one of 1, 2, got 3"):
        ZeroOptimizer(AdamW(model.parameters()), stage=3)
    with pytest.raises(ValueError, match="optimizer must be one whose description has a sharding .*got LBFGS"):
        ZeroOptimizer(LBFGS(model.parameters()), stage=1)
    stepped = SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 5)).sum().backward()
    stepped.step()
    with pytest.raises(ValueError, match="already has state"):
        ZeroOptimizer(stepped)
    with pytest.raises(ValueError, match="world_size must be an integer"):
        assign_whole_tensors([3], 0)
    with pytest.raises(ValueError, match=r"sizes\[1\] must be an integer"):
        assign_whole_tensors([3, -1], 2)
