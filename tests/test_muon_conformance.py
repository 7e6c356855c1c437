"""gradwise.optim.Muon against torch.optim.Muon's contract: named parameters, state_dict both
ways, OneCycleLR's momentum, 1-D parameters, maximize, tensor lr, zero-size, bf16/fp16,
complex, non-finite gradients and torch.compile of the step."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch._dynamo
from torch import nn

import gradwise.optim as gw

SHAPES = [(8, 6), (6, 8), (8, 6), (5, 5)]


def matrices(seed: int = 0, dtype=torch.float32) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype).requires_grad_() for shape in SHAPES]


def loss_of(params: list[torch.Tensor], step: int) -> torch.Tensor:
    """A nonconvex loss whose gradients change with ``step``."""
    generator = torch.Generator().manual_seed(1000 + step)
    total = 0.0
    for p in params:
        target = torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype)
        total = total + ((p - target) ** 2).sum() + 0.1 * torch.sin(3 * p).sum()
    return total


def train(optimizer, params, steps, scheduler=None) -> None:
    for step in steps:
        optimizer.zero_grad()
        loss_of(params, step).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def clone(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


def reload(optimizer, cls, params, **options):
    """A new ``cls`` over ``params`` loaded from ``optimizer``'s state_dict through
    torch.save / torch.load(weights_only=True)."""
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    loaded = cls(params, **options)
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
    return loaded


def assert_close_lists(actual, expected, atol=1e-6) -> None:
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a.detach(), e.detach(), rtol=0, atol=atol)


def test_named_parameters_step_as_plain_parameters() -> None:
    model = nn.Sequential(nn.Linear(6, 8, bias=False), nn.Tanh(), nn.Linear(8, 3, bias=False))
    twin = copy.deepcopy(model)
    named, plain = gw.Muon(model.named_parameters(), lr=0.05), gw.Muon(twin.parameters(), lr=0.05)
    x = torch.randn(16, 6)
    for optimizer, net in ((named, model), (plain, twin)):
        for _ in range(3):
            optimizer.zero_grad()
            net(x).square().mean().backward()
            optimizer.step()
    assert_close_lists(list(model.parameters()), list(twin.parameters()), atol=0)
    assert named.state_dict()["param_groups"][0]["param_names"] == ["0.weight", "2.weight"]


@pytest.mark.parametrize("source, target", [(torch.optim.Muon, gw.Muon), (gw.Muon, torch.optim.Muon)])
def test_state_dict_moves_between_torch_and_gradwise(source, target) -> None:
    """3 steps of one, save, load into the other, 3 more: the run equals 6 steps of torch's."""
    options = dict(lr=0.02, momentum=0.9, weight_decay=0.05)
    expected = matrices()
    train(torch.optim.Muon(expected, **options), expected, range(6))
    params = matrices()
    first = source(params, **options)
    train(first, params, range(3))
    resumed = reload(first, target, params, **options)
    train(resumed, params, range(3, 6))
    assert_close_lists(params, expected)
    if target is gw.Muon:  # torch's groups have no use_muon: they stay Muon groups
        assert [group["use_muon"] for group in resumed.param_groups] == [None]
        assert set(resumed.state[params[0]]) == {"momentum_buffer"}


def test_state_dict_round_trip_resumes_exactly_with_both_routes() -> None:
    def build(params):
        return gw.Muon([{"params": params[:2]}, {"params": params[2:], "use_muon": False}], lr=0.02, adamw_lr=0.01)

    def vectors_and_matrices():
        generator = torch.Generator().manual_seed(3)
        return [torch.randn(s, generator=generator).requires_grad_() for s in [(8, 6), (6, 6), (6,), (3,)]]

    straight = vectors_and_matrices()
    train(build(straight), straight, range(6))
    params = vectors_and_matrices()
    optimizer = build(params)
    train(optimizer, params, range(3))
    saved = optimizer.state_dict()
    resumed = build(params)
    resumed.load_state_dict(copy.deepcopy(saved))
    assert resumed.state_dict()["param_groups"] == saved["param_groups"]
    train(resumed, params, range(3, 6))
    assert_close_lists(params, straight, atol=0)


def test_one_cycle_lr_cycles_muons_momentum() -> None:
    """OneCycleLR(cycle_momentum=True) reads 'betas' if the optimizer has it, else 'momentum':
    Muon's AdamW betas are adamw_betas, so Muon's momentum cycles as in torch's Muon."""
    ours, theirs = matrices(), matrices()
    runs = []
    for cls, params in ((gw.Muon, ours), (torch.optim.Muon, theirs)):
        optimizer = cls(params, lr=0.02)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=10, cycle_momentum=True)
        momenta = []
        for step in range(8):
            train(optimizer, params, [step])
            scheduler.step()
            momenta.append(optimizer.param_groups[0]["momentum"])
        runs.append(momenta)
    assert runs[0] == runs[1] and len(set(runs[0])) > 4
    assert_close_lists(ours, theirs)
    muon = gw.Muon([{"params": matrices()[:1]}, {"params": [torch.zeros(3, requires_grad=True)], "use_muon": False}])
    torch.optim.lr_scheduler.OneCycleLR(muon, max_lr=0.05, total_steps=10, cycle_momentum=True)
    assert muon.param_groups[1]["adamw_betas"] == (0.9, 0.95)  # AdamW's betas are not touched


def test_vectors_are_refused_as_torch_refuses_them_unless_routed() -> None:
    bias = torch.zeros(4, requires_grad=True)
    weight = torch.zeros(4, 3, requires_grad=True)
    for params in ([weight, bias], [{"params": [weight]}, {"params": [bias], "lr": 0.1}]):
        with pytest.raises(ValueError, match=r"Muon only supports 2D parameters .* size: \(4,\).*use_muon=False"):
            gw.Muon(params)
        with pytest.raises(ValueError, match="Muon only supports 2D parameters"):
            torch.optim.Muon(params)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Linear(4, 2))
    optimizer = gw.Muon(gw.muon_param_groups(model, head=model[3]), lr=0.02)
    assert [[p.ndim for p in group["params"]] for group in optimizer.param_groups] == [[2, 2], [2], [1, 1, 1]]
    assert [group["use_muon"] for group in optimizer.param_groups] == [True, False, False]  # hidden; head; biases
    explicit = gw.Muon([{"params": [bias], "use_muon": True}], lr=0.1)  # opt-in: a 1 x n matrix
    bias.grad = torch.tensor([3.0, 0.0, -4.0, 0.0])
    explicit.step()
    # The orthogonalisation of a row is the row normalised (to within Newton-Schulz's 0.7-1.2).
    step = bias.detach()
    torch.testing.assert_close(step / step.norm(), -bias.grad / bias.grad.norm(), atol=0.01, rtol=0)
    assert 0.1 * 0.6 < step.norm() < 0.1 * 1.3
    gw.Muon([{"params": [torch.zeros(2, 3, 4, requires_grad=True)]}])  # 3-D: a batch of matrices, accepted


@pytest.mark.parametrize("use_muon", [None, False])
def test_maximize_ascends_as_minimizing_the_negated_loss(use_muon) -> None:
    up, down = matrices(), matrices()
    ascending = gw.Muon([{"params": up, "use_muon": use_muon}], lr=0.02, maximize=True)
    descending = gw.Muon([{"params": down, "use_muon": use_muon}], lr=0.02)
    for step in range(4):
        ascending.zero_grad()
        (-loss_of(up, step)).backward()
        ascending.step()
    train(descending, down, range(4))
    assert_close_lists(up, down, atol=0)
    with pytest.raises(ValueError, match="maximize must be True or False"):
        gw.Muon(matrices(), maximize="False")


def test_tensor_lr_steps_as_the_float() -> None:
    tensor_lr, float_lr = matrices(), matrices()
    train(gw.Muon(tensor_lr, lr=torch.tensor(0.02)), tensor_lr, range(3))
    train(gw.Muon(float_lr, lr=float(torch.tensor(0.02))), float_lr, range(3))  # the tensor's float32 value
    assert_close_lists(tensor_lr, float_lr, atol=0)


def test_zero_size_parameters_are_skipped() -> None:
    params = matrices()
    empty_matrix, empty_vector = torch.zeros(0, 4, requires_grad=True), torch.zeros(0, requires_grad=True)
    optimizer = gw.Muon([{"params": params + [empty_matrix]}, {"params": [empty_vector], "use_muon": False}], lr=0.02)
    reference = matrices()
    train(gw.Muon(reference, lr=0.02), reference, range(3))
    for step in range(3):
        optimizer.zero_grad()
        (loss_of(params, step) + empty_matrix.sum() + empty_vector.sum()).backward()
        optimizer.step()
    assert_close_lists(params, reference, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_follow_the_float32_run(dtype) -> None:
    low, full = matrices(dtype=dtype), matrices()
    train(gw.Muon(low, lr=0.02, weight_decay=0.0), low, range(3))
    train(gw.Muon(full, lr=0.02, weight_decay=0.0), full, range(3))
    for a, b in zip(low, full):
        assert a.dtype == dtype
        torch.testing.assert_close(a.detach().float(), b.detach(), rtol=0, atol=0.03)


def test_complex_parameters_are_refused_at_step_as_torch() -> None:
    param = torch.randn(2, 3, dtype=torch.complex64, requires_grad=True)
    param.grad = torch.randn_like(param)
    for optimizer in (gw.Muon([param]), torch.optim.Muon([param])):
        with pytest.raises(RuntimeError, match="Muon does not support complex parameters"):
            optimizer.step()


def test_a_non_finite_gradient_element_spoils_only_its_matrix_as_in_torch() -> None:
    """The documented choice: torch's behaviour (no host synchronisation to check)."""
    ours, theirs = matrices(), matrices()
    pairs = ((gw.Muon(ours, lr=0.02, ns_dtype=torch.float32), ours), (torch.optim.Muon(theirs, lr=0.02), theirs))
    for optimizer, params in pairs:
        for p in params:
            p.grad = torch.ones_like(p)
        params[1].grad[2, 3] = float("nan")
        optimizer.step()
        assert params[1].isnan().all()
        assert all(p.isfinite().all() for i, p in enumerate(params) if i != 1)


def test_adjust_lr_fn_is_refused_with_torchs_message() -> None:
    with pytest.raises(ValueError, match="Adjust learning rate function arbitrary is not supported"):
        gw.Muon(matrices(), adjust_lr_fn="arbitrary")
    with pytest.raises(ValueError, match=r"adamw_betas\[1\] must be in \[0, 1\)"):
        gw.Muon(matrices(), adamw_betas=(0.9, 1.0))


@pytest.mark.parametrize("routes", ["muon", "adamw", "both"])
def test_compiled_step_equals_eager_without_graph_breaks(routes) -> None:
    def build(params):
        if routes == "muon":
            return gw.Muon(params, lr=0.02, ns_dtype=torch.float32)
        if routes == "adamw":
            return gw.Muon(params, lr=0.02, use_muon=False)
        groups = [{"params": params[:2]}, {"params": params[2:], "use_muon": False}]
        return gw.Muon(groups, lr=0.02, ns_dtype=torch.float32)

    compiled_params, eager_params = matrices(), matrices()
    compiled, eager = build(compiled_params), build(eager_params)
    torch._dynamo.reset()
    step = torch.compile(compiled.step)
    for index in range(3):
        for optimizer, params, run in ((compiled, compiled_params, step), (eager, eager_params, eager.step)):
            optimizer.zero_grad()
            loss_of(params, index).backward()
            run()
    assert_close_lists(compiled_params, eager_params, atol=1e-5)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(compiled.step)()
    assert explanation.graph_break_count == 0, explanation.break_reasons
