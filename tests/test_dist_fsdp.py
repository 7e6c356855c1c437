"""ZeRO-3 through FSDP2: gradwise optimizers on sharded (DTensor) parameters equal one process.

One spawned job of 2 ranks runs every case on a tiny TinyGPT (tied output layer, two
blocks, each its own FSDP unit); each rank feeds its half of the global batch and the
reference steps the unsharded optimizer on the whole batch in the same process.
"""

from __future__ import annotations

import pytest
import torch

from gradwise.distributed import run_processes
from gradwise.distributed.state_bytes import optimizer_state_bytes
from gradwise.distributed.strategies.fsdp import shard_model
from gradwise.optim import SGD, AdamW, AdEMAMix, Lion, Muon, muon_param_groups
from gradwise.problems.tiny_gpt import TinyGPT, next_byte_loss

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(120)]

STEPS, GLOBAL_BATCH, WORLD = 3, 4, 2

OPTIMIZERS = {
    "adamw": lambda params: AdamW(params, lr=0.01, weight_decay=0.1),
    "lion": lambda params: Lion(params, lr=0.003, weight_decay=0.3),
    "muon": lambda params: Muon(params, lr=0.02, adamw_lr=0.01, ns_dtype=torch.float32),
    "muon-polar-express": lambda params: Muon(params, lr=0.02, adamw_lr=0.01, ns_dtype=torch.float32,
                                              orthogonalization="polar_express"),
    "sgd": lambda params: SGD(params, lr=0.1, momentum=0.9, nesterov=True),
    # the paper's gamma (a larger one amplifies the key bias's rounding noise past the check's
    # tolerance); the norms of sharded tensors: test_statistics_of_dtensors_are_the_whole_tensors
    "adamw-mars": lambda params: AdamW(params, lr=0.01, weight_decay=0.1, mars_gamma=0.025),
    "ademamix-mars": lambda params: AdEMAMix(params, lr=0.01, t_alpha_beta3=2, mars_gamma=0.025),
}
CASES = [("adamw", True), ("adamw", False), ("lion", True), ("muon", True), ("muon", False),
         ("muon-polar-express", True), ("sgd", True),
         ("adamw-mars", True), ("ademamix-mars", True)]


def make_model() -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT(seq_len=8, d_model=16, n_layer=2, n_head=2)


def param_groups(name, model):
    return muon_param_groups(model) if name.startswith("muon") else model.parameters()


def train(model, optimizer, rank=None):
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (STEPS, GLOBAL_BATCH, 9), generator=generator)
    for step in range(STEPS):
        batch = tokens[step]
        if rank is not None:
            batch = batch[rank * GLOBAL_BATCH // WORLD : (rank + 1) * GLOBAL_BATCH // WORLD]
        next_byte_loss(model, (batch[:, :-1], batch[:, 1:])).backward()
        optimizer.step()
        optimizer.zero_grad()


def full_params(model):
    """Whole parameters as plain lists (a DTensor is gathered first)."""
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().reshape(-1).tolist()
            for p in model.parameters()]


def scalar_bytes(optimizer):
    return sum(v.element_size() for s in optimizer.state.values() for v in s.values()
               if isinstance(v, torch.Tensor) and v.ndim == 0)


def fsdp_cases(rank: int, world_size: int) -> dict:
    results = {}
    for name, reshard in CASES:
        reference_model = make_model()
        reference = OPTIMIZERS[name](param_groups(name, reference_model))
        train(reference_model, reference)
        model = shard_model(make_model(), reshard_after_forward=reshard)
        optimizer = OPTIMIZERS[name](param_groups(name, model))
        train(model, optimizer, rank)
        results[name, reshard] = dict(
            names=[n for n, _ in model.named_parameters()], params=full_params(model),
            reference=full_params(reference_model),
            bytes=optimizer_state_bytes(optimizer), scalar_bytes=scalar_bytes(optimizer),
            reference_bytes=optimizer_state_bytes(reference), reference_scalar_bytes=scalar_bytes(reference),
            sharded=all(type(p).__name__ == "DTensor" for p in model.parameters()),
        )
    results["statistics"] = statistics_of_dtensors(world_size)
    return results


def statistics_of_dtensors(world_size: int) -> dict:
    """Three AdamW(cautious, MARS) steps on row-sharded DTensors and on the same plain tensors,
    with gradients whose corrected norm exceeds 1 (MARS clips): the mask's count and the norm are
    reduced over the shards. Checked on given gradients: a model's sharded and unsharded
    gradients differ by rounding, and a sign flipped by it moves a whole masked step."""
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,))
    generator = torch.Generator().manual_seed(2)
    plain = [torch.randn(shape, generator=generator) for shape in ((8, 3), (6,))]
    sharded = [distribute_tensor(p.clone(), mesh, [Shard(0)]) for p in plain]
    optimizers = [AdamW(params, lr=0.1, cautious=True, mars_gamma=0.5) for params in (plain, sharded)]
    for _ in range(3):
        grads = [3 * torch.randn(p.shape, generator=generator) for p in plain]
        for p, q, g in zip(plain, sharded, grads):
            p.grad, q.grad = g, distribute_tensor(g, mesh, [Shard(0)])
        for optimizer in optimizers:
            optimizer.step()
    return dict(sharded=[q.full_tensor() for q in sharded], plain=plain)


@pytest.fixture(scope="module")
def results():
    return run_processes(fsdp_cases, WORLD, timeout_s=100)


@pytest.mark.parametrize("name, reshard", CASES)
def test_fsdp_equals_the_unsharded_optimizer(results, name, reshard):
    for rank in range(WORLD):
        case = results[rank][name, reshard]
        assert case["sharded"]
        for name_, actual, expected in zip(case["names"], case["params"], case["reference"]):
            actual, expected = torch.tensor(actual), torch.tensor(expected)
            if name_.endswith("qkv.bias"):
                # The key bias has an exactly zero gradient in exact arithmetic (softmax ignores
                # a shift shared by all keys): rounding noise, which Adam divides by its own size.
                keys = slice(actual.numel() // 3, 2 * actual.numel() // 3)
                torch.testing.assert_close(actual[keys], expected[keys], rtol=0, atol=1e-5)
                actual[keys], expected[keys] = 0, 0
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=lambda m, n=name_: f"{n}: {m}")


def test_statistics_of_dtensors_are_the_whole_tensors(results):
    for rank in range(WORLD):
        case = results[rank]["statistics"]
        for sharded, plain in zip(case["sharded"], case["plain"]):
            torch.testing.assert_close(sharded, plain, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name, reshard", CASES)
def test_fsdp_state_is_one_nth_per_rank(results, name, reshard):
    # Every dim 0 of this model is even, so each rank holds exactly half of every element-wise
    # state tensor; scalar step counters are per parameter, on every rank. Muon's matrices keep
    # their whole momentum on their owner only (owner-computes): the ranks' state adds up to one
    # process's, split as the owners are.
    cases = [results[rank][name, reshard] for rank in range(WORLD)]
    reference_tensor_bytes = cases[0]["reference_bytes"] - cases[0]["reference_scalar_bytes"]
    tensor_bytes = [case["bytes"] - case["scalar_bytes"] for case in cases]
    if name.startswith("muon"):
        assert sum(tensor_bytes) == reference_tensor_bytes
        assert max(tensor_bytes) < 0.6 * reference_tensor_bytes
        return
    for case, rank_bytes in zip(cases, tensor_bytes):
        assert case["scalar_bytes"] == case["reference_scalar_bytes"]
        assert rank_bytes == reference_tensor_bytes // WORLD
