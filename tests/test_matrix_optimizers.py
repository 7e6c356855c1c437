"""Adafactor, Muon, Shampoo, SOAP, K-FAC and Sophia: reference math, torch.optim twins,
exact resume, param groups, validation and convergence to known optima."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwise.optim as gw
from gradwise.curvature import hutchinson_diagonal
from gradwise.curvature.gauss_newton_bartlett import gauss_newton_bartlett, sample_labels
from gradwise.optim.muon import newton_schulz
from gradwise.optim.shampoo import matrix_view_shape


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These problems are tiny: intra-op threads only add waiting (tens of ms per op on a
    loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------
# A least-squares problem with a known minimiser, shared by the contract tests.


def regression_data(seed: int = 0, rows: int = 64, inputs: int = 6, outputs: int = 3, conditioning: float = 1.0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, inputs, generator=generator, dtype=torch.float64)
    x = x * torch.logspace(0, np.log10(conditioning), inputs, dtype=torch.float64)
    y = x @ torch.randn(inputs, outputs, generator=generator, dtype=torch.float64) + 0.1 * torch.randn(
        rows, outputs, generator=generator, dtype=torch.float64
    )
    return x, y


def least_squares_minimum(x: torch.Tensor, y: torch.Tensor) -> float:
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    solution = torch.linalg.lstsq(design, y).solution
    return float(0.5 * ((design @ solution - y) ** 2).sum(1).mean())


def regression_model(x: torch.Tensor, y: torch.Tensor, seed: int = 1) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(x.shape[1], y.shape[1]).double()


def mse(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((output - y) ** 2).sum(1).mean()


@dataclass
class Trainer:
    """How to build one optimizer over a model and take one step on a batch."""

    name: str
    build: Callable[[nn.Module, list[dict] | None], torch.optim.Optimizer]
    steps: int  # for convergence to the least-squares minimum
    tol: float = 1e-6
    # Fixed-size steps (Muon's orthogonal ones, Adam-like ones) hover around the minimum at
    # a constant lr; a linear decay to zero, as in training, lets them settle.
    decay: bool = False

    def step(self, optimizer: torch.optim.Optimizer, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        optimizer.zero_grad()
        output = model(x)
        if isinstance(optimizer, gw.KFAC):
            with optimizer.capture_fisher():
                sampled = output.detach() + torch.randn(output.shape, dtype=output.dtype, generator=_SAMPLES)
                optimizer.fisher_backward(mse(output, sampled))
        loss = mse(output, y)
        if isinstance(optimizer, gw.Sophia) and optimizer.hessian_update_due:
            params = list(model.parameters())
            grads = torch.autograd.grad(loss, params, create_graph=True)
            optimizer.update_hessian(hutchinson_diagonal(grads, params, samples=4, generator=_SAMPLES))
        loss.backward()
        optimizer.step()
        return float(loss.detach())


_SAMPLES = torch.Generator().manual_seed(123)


def _params(model, groups):
    return model.parameters() if groups is None else groups


def _muon_groups(model, groups):
    """Muon's groups: matrices to Muon, a group of vectors to its AdamW (use_muon=False)."""
    groups = [{"params": [p for p in model.parameters()]}] if groups is None else groups
    routed = []
    for group in groups:
        matrices = [p for p in group["params"] if p.ndim >= 2]
        vectors = [p for p in group["params"] if p.ndim < 2]
        routed += [{**group, "params": matrices}] if matrices else []
        routed += [{**group, "params": vectors, "use_muon": False}] if vectors else []
    return routed


TRAINERS = [
    Trainer("Adafactor", lambda m, g: gw.Adafactor(_params(m, g), lr=0.1, relative_step=False, beta1=0.9), 600,
            decay=True),
    Trainer(
        "Muon",
        lambda m, g: gw.Muon(_muon_groups(m, g), lr=0.02, weight_decay=0.0, adamw_lr=0.05, ns_dtype=torch.float64),
        800,
        decay=True,
    ),
    Trainer("Shampoo", lambda m, g: gw.Shampoo(_params(m, g), lr=0.05, momentum=0.9, graft="adam"), 600),
    Trainer("SOAP", lambda m, g: gw.SOAP(_params(m, g), lr=0.02, weight_decay=0.0), 600, decay=True),
    Trainer("KFAC", lambda m, g: gw.KFAC(m, lr=0.5, damping=1e-4, inverse_every=1, params=g), 60),
    Trainer("Sophia", lambda m, g: gw.Sophia(_params(m, g), lr=0.05, rho=1.0, weight_decay=0.0, betas=(0.9, 0.99)),
            600),
]


@pytest.mark.parametrize("trainer", TRAINERS, ids=lambda t: t.name)
def test_converges_to_least_squares_minimum(trainer: Trainer) -> None:
    x, y = regression_data()
    model = regression_model(x, y)
    optimizer = trainer.build(model, None)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1 - t / trainer.steps if trainer.decay else 1.0)
    for _ in range(trainer.steps):
        trainer.step(optimizer, model, x, y)
        schedule.step()
    with torch.no_grad():
        gap = float(mse(model(x), y)) - least_squares_minimum(x, y)
    assert -1e-12 < gap < trainer.tol * max(1.0, least_squares_minimum(x, y))


@pytest.mark.parametrize("trainer", TRAINERS, ids=lambda t: t.name)
def test_state_dict_resume_is_exact(trainer: Trainer) -> None:
    """Stop after 12 steps (past a preconditioner refresh), save, restore into a new
    optimizer and model; the next 12 steps equal those of an uninterrupted run."""
    x, y = regression_data(seed=3)
    model = regression_model(x, y)
    optimizer = trainer.build(model, None)
    torch.manual_seed(7)
    _SAMPLES.manual_seed(7)
    for _ in range(12):
        trainer.step(optimizer, model, x, y)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    rng = _SAMPLES.get_state()
    for _ in range(12):
        trainer.step(optimizer, model, x, y)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=False)
    resumed_model = regression_model(x, y, seed=99)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = trainer.build(resumed_model, None)
    resumed.load_state_dict(checkpoint["optimizer"])
    _SAMPLES.set_state(rng)
    for _ in range(12):
        trainer.step(resumed, resumed_model, x, y)
    for mine, reference in zip(resumed_model.parameters(), model.parameters()):
        torch.testing.assert_close(mine, reference, rtol=0, atol=0)


@pytest.mark.parametrize("trainer", TRAINERS, ids=lambda t: t.name)
def test_param_groups_are_independent(trainer: Trainer) -> None:
    """A group with lr 0 stays put; the other moves as it would under its own lr."""
    x, y = regression_data(seed=4)
    model = regression_model(x, y)
    frozen_bias = model.bias.detach().clone()
    groups = [{"params": [model.weight]}, {"params": [model.bias], "lr": 0.0}]
    optimizer = trainer.build(model, groups)
    for _ in range(5):
        trainer.step(optimizer, model, x, y)
    assert torch.equal(model.bias.detach(), frozen_bias)
    assert optimizer.param_groups[1]["lr"] == 0.0
    assert not torch.equal(model.weight.detach(), regression_model(x, y).weight.detach())


# --------------------------------------------------------------------------------------
# Adafactor


def _nonconvex_loss(params: list[torch.Tensor], step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(step)
    return sum(
        ((0.5 + i) * p**2 + torch.sin(3 * p) + torch.randn(p.shape, generator=generator, dtype=p.dtype) * p).sum()
        for i, p in enumerate(params)
    )


@pytest.mark.parametrize("seed", range(4))
def test_adafactor_matches_torch_optim(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shapes = [(5, 7), (3,), (), (2, 4, 6), (1, 9), (8, 1)]
    generator = torch.Generator().manual_seed(seed)
    ours = [torch.randn(s, generator=generator, dtype=torch.float64).requires_grad_() for s in shapes]
    theirs = [p.detach().clone().requires_grad_() for p in ours]

    def groups(params):
        return [
            {"params": params[::2], "lr": float(rng.uniform(1e-3, 0.1)), "weight_decay": 0.01, "d": 1.5},
            {"params": params[1::2], "beta2_decay": -0.6, "eps": (1e-20, 1e-3)},
        ]

    maximize = bool(seed % 2)
    ours_opt = gw.Adafactor(groups(ours), maximize=maximize)
    rng = np.random.default_rng(seed)
    torch_opt = torch.optim.Adafactor(groups(theirs), maximize=maximize)
    for step in range(60):
        for params, opt in ((ours, ours_opt), (theirs, torch_opt)):
            opt.zero_grad()
            _nonconvex_loss(params, step).backward()
            opt.step()
    for mine, reference in zip(ours, theirs):
        torch.testing.assert_close(mine, reference, rtol=1e-9, atol=1e-12)
    # Same state layout: a torch checkpoint loads and continues identically.
    for mine, reference in zip(ours, theirs):
        assert ours_opt.state[mine].keys() == torch_opt.state[reference].keys()


def test_adafactor_matches_torch_where_the_eps_floor_binds() -> None:
    """Rows and columns of zero gradient make R C / mean(R) fall under eps1^2 there."""
    generator = torch.Generator().manual_seed(0)
    ours = [torch.randn(5, 6, generator=generator, dtype=torch.float64).requires_grad_()]
    theirs = [ours[0].detach().clone().requires_grad_()]
    ours_opt, torch_opt = gw.Adafactor(ours, lr=0.05), torch.optim.Adafactor(theirs, lr=0.05)
    mask = torch.ones(5, 6, dtype=torch.float64)
    mask[1], mask[:, 4] = 0, 0
    for _ in range(10):
        grad = torch.randn(5, 6, generator=generator, dtype=torch.float64) * mask
        for params, opt in ((ours, ours_opt), (theirs, torch_opt)):
            params[0].grad = grad.clone()
            opt.step()
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-12, atol=1e-14)


def test_adafactor_state_is_o_of_m_plus_n() -> None:
    matrix = torch.zeros(300, 500, requires_grad=True)
    batched = torch.zeros(4, 30, 50, requires_grad=True)
    optimizer = gw.Adafactor([matrix, batched])
    for p in (matrix, batched):
        p.grad = torch.randn(p.shape)
    optimizer.step()
    state_numel = {id(p): sum(t.numel() for t in optimizer.state[p].values() if t.ndim > 0) for p in (matrix, batched)}
    assert state_numel[id(matrix)] == 300 + 500
    assert state_numel[id(batched)] == 4 * (30 + 50)


def test_adafactor_momentum_and_absolute_step_follow_the_formula() -> None:
    """With beta1 and relative_step=False: M = b1 M + (1 - b1) U_clipped, theta -= lr M."""
    torch.manual_seed(0)
    param = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    start = param.detach().clone()
    optimizer = gw.Adafactor([param], lr=0.1, beta1=0.8, relative_step=False, d=1.0, eps=(1e-30, 1e-3))
    grad = torch.randn(4, 6, dtype=torch.float64)
    param.grad = grad
    optimizer.step()
    row, col = (grad**2).mean(1, keepdim=True), (grad**2).mean(0, keepdim=True)  # beta2-hat = 0 at t = 1
    update = grad / torch.sqrt(row @ col / row.mean())
    update = update / max(1.0, float(update.pow(2).mean().sqrt()))
    torch.testing.assert_close(param.detach(), start - 0.1 * 0.2 * update)


# --------------------------------------------------------------------------------------
# Muon


@pytest.mark.parametrize("shape, steps", [((32, 128), 5), ((200, 50), 5), ((6, 40, 24), 5), ((64, 64), 8)])
def test_newton_schulz_singular_values_in_band(shape, steps) -> None:
    """Random Gaussian matrices; a square one has singular values down to about 1/n of its
    norm, which 5 steps (each multiplying small ones by about 3.4) do not lift to 0.6."""
    generator = torch.Generator().manual_seed(0)
    matrices = torch.randn(shape, generator=generator)
    for dtype in (torch.bfloat16, torch.float32):
        singular_values = torch.linalg.svdvals(newton_schulz(matrices, steps, dtype=dtype).float())
        assert singular_values.min() >= 0.6 and singular_values.max() <= 1.2, (dtype, singular_values.aminmax())


@pytest.mark.parametrize("nesterov, adjust", [(True, None), (False, "match_rms_adamw")])
def test_muon_matches_torch_optim_on_matrices(nesterov, adjust) -> None:
    generator = torch.Generator().manual_seed(0)
    shapes = [(8, 16), (32, 8), (8, 16), (12, 12)]
    ours = [torch.randn(s, generator=generator).requires_grad_() for s in shapes]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    options = dict(lr=0.02, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust, weight_decay=0.05)
    ours_opt, torch_opt = gw.Muon(ours, **options), torch.optim.Muon(theirs, **options)
    for step in range(10):
        for params, opt in ((ours, ours_opt), (theirs, torch_opt)):
            opt.zero_grad()
            _nonconvex_loss(params, step).backward()
            opt.step()
    for mine, reference in zip(ours, theirs):
        torch.testing.assert_close(mine, reference, rtol=0, atol=1e-6)


def _muon_steps(params: list[torch.Tensor], grads: list[list[torch.Tensor]], **options) -> list[torch.Tensor]:
    optimizer = gw.Muon(params, lr=0.1, ns_dtype=torch.float64, **options)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        optimizer.step()
    return [p.detach() for p in params]


def test_muon_batched_3d_and_conv_4d_equal_2d_updates() -> None:
    generator = torch.Generator().manual_seed(0)
    heads = torch.randn(3, 5, 8, generator=generator, dtype=torch.float64)
    conv = torch.randn(6, 2, 3, 3, generator=generator, dtype=torch.float64)
    grads = [
        [torch.randn(3, 5, 8, generator=generator, dtype=torch.float64),
         torch.randn(6, 2, 3, 3, generator=generator, dtype=torch.float64)]
        for _ in range(3)
    ]
    batched = _muon_steps([heads.clone().requires_grad_(), conv.clone().requires_grad_()], grads)
    slices = _muon_steps(
        [heads[i].clone().requires_grad_() for i in range(3)] + [conv.reshape(6, 18).clone().requires_grad_()],
        [[g[0][i] for i in range(3)] + [g[1].reshape(6, 18)] for g in grads],
    )
    torch.testing.assert_close(batched[0], torch.stack(slices[:3]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(batched[1], slices[3].reshape(6, 2, 3, 3), rtol=1e-12, atol=1e-12)


def test_muon_routed_to_adamw_equals_adamw() -> None:
    generator = torch.Generator().manual_seed(0)
    shapes = [(4, 6), (6,), (3, 2, 2), ()]
    ours = [torch.randn(s, generator=generator, dtype=torch.float64).requires_grad_() for s in shapes]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    options = dict(lr=0.01, weight_decay=0.1)
    ours_opt = gw.Muon([{"params": ours, "use_muon": False, "adamw_betas": (0.8, 0.97), **options}], adamw_eps=1e-7)
    torch_opt = torch.optim.AdamW(theirs, eps=1e-7, betas=(0.8, 0.97), **options)
    for step in range(20):
        for params, opt in ((ours, ours_opt), (theirs, torch_opt)):
            opt.zero_grad()
            _nonconvex_loss(params, step).backward()
            opt.step()
    for mine, reference in zip(ours, theirs):
        torch.testing.assert_close(mine, reference, rtol=1e-12, atol=1e-14)


def test_muon_routes_embeddings_head_and_vectors_to_adamw() -> None:
    model = nn.Sequential(
        nn.Embedding(50, 16), nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 16), nn.Linear(16, 50)
    )
    groups = gw.muon_param_groups(model, head=model[4], adamw_lr=1e-3)
    muon, adamw, undecayed = (group["params"] for group in groups)
    assert {id(p) for p in muon} == {id(model[1].weight), id(model[3].weight)}
    assert {id(p) for p in adamw} == {id(model[0].weight), id(model[4].weight)}  # embedding, head
    assert {id(p) for p in undecayed} == {id(p) for p in model.parameters() if p.ndim < 2}  # biases, gains
    assert groups[1]["lr"] == groups[2]["lr"] == 1e-3 and groups[2]["weight_decay"] == 0.0
    # A group routed to AdamW without an lr of its own takes adamw_lr.
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    optimizer = gw.Muon([{"params": matrices}, {"params": vectors, "use_muon": False}], lr=0.02, adamw_lr=3e-4)
    by_route = {group["use_muon"]: group for group in optimizer.param_groups}
    assert by_route[None]["lr"] == 0.02 and by_route[False]["lr"] == 3e-4
    tokens = torch.randint(0, 50, (4, 7))
    F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
    optimizer.step()
    assert set(optimizer.state[model[0].weight]) == {"momentum_buffer"}
    assert set(optimizer.state[model[2].weight]) == {"exp_avg", "exp_avg_sq", "step"}


# --------------------------------------------------------------------------------------
# Shampoo and SOAP


def _matrix_power(matrix: np.ndarray, power: float, eps: float) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * (np.clip(values, 0, None) + eps) ** power) @ vectors.T


@pytest.mark.parametrize("block_size", [16, 3])
def test_shampoo_preconditioner_is_l_root_g_r_root(block_size: int) -> None:
    """Each step is -lr L^(-1/4) G R^(-1/4) with L, R the sums of G G^T and G^T G (per block),
    and a vector's is -lr L^(-1/2) g."""
    rng = np.random.default_rng(0)
    matrix = torch.zeros(6, 5, dtype=torch.float64, requires_grad=True)
    vector = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    eps, lr = 1e-3, 0.1
    optimizer = gw.Shampoo(
        [matrix, vector], lr=lr, eps=eps, graft=None, block_size=block_size,
        precondition_every=1, start_preconditioning_step=1, eigh_dtype=torch.float64,
    )
    row_cuts = [(0, 6)] if block_size >= 6 else [(0, 3), (3, 6)]
    col_cuts = [(0, 5)] if block_size >= 6 else [(0, 3), (3, 5)]
    sums = {}
    for _ in range(4):
        grads = [rng.standard_normal((6, 5)), rng.standard_normal(4)]
        before = [matrix.detach().numpy().copy(), vector.detach().numpy().copy()]
        matrix.grad, vector.grad = (torch.from_numpy(g) for g in grads)
        optimizer.step()
        expected = np.zeros((6, 5))
        for r0, r1 in row_cuts:
            for c0, c1 in col_cuts:
                block = grads[0][r0:r1, c0:c1]
                left, right = sums.get((r0, c0), (0, 0))
                left, right = left + block @ block.T, right + block.T @ block
                sums[(r0, c0)] = (left, right)
                expected[r0:r1, c0:c1] = _matrix_power(left, -0.25, eps) @ block @ _matrix_power(right, -0.25, eps)
        np.testing.assert_allclose(matrix.detach().numpy(), before[0] - lr * expected, rtol=1e-10, atol=1e-12)
        expected = np.zeros(4)
        for c0, c1 in [(0, 4)] if block_size >= 4 else [(0, 2), (2, 4)]:
            piece = grads[1][c0:c1]
            sums[("vector", c0)] = sums.get(("vector", c0), 0) + np.outer(piece, piece)
            expected[c0:c1] = _matrix_power(sums[("vector", c0)], -0.5, eps) @ piece
        np.testing.assert_allclose(vector.detach().numpy(), before[1] - lr * expected, rtol=1e-10, atol=1e-12)
    assert matrix_view_shape(torch.zeros(2, 3, 4)) == (2, 12)


@pytest.mark.parametrize(
    "graft, reference",
    [
        ("sgd", lambda p, lr: torch.optim.SGD(p, lr=lr)),
        ("adagrad", lambda p, lr: torch.optim.Adagrad(p, lr=lr, eps=1e-10)),
        ("adam", lambda p, lr: torch.optim.Adam(p, lr=lr, betas=(0.0, 0.999), eps=1e-10)),
    ],
)
def test_shampoo_grafted_step_norm_equals_grafted_optimizer(graft, reference) -> None:
    generator = torch.Generator().manual_seed(0)
    shapes = [(6, 5), (7,), (3, 2, 2)]
    ours = [torch.randn(s, generator=generator, dtype=torch.float64).requires_grad_() for s in shapes]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    lr = 0.05
    ours_opt = gw.Shampoo(ours, lr=lr, graft=graft, start_preconditioning_step=3, precondition_every=2, block_size=4)
    torch_opt = reference(theirs, lr)
    for step in range(8):
        steps = []
        for params, opt in ((ours, ours_opt), (theirs, torch_opt)):
            grads = [torch.randn(s, generator=torch.Generator().manual_seed(step), dtype=torch.float64) for s in shapes]
            before = [p.detach().clone() for p in params]
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
            steps.append([p.detach() - b for p, b in zip(params, before)])
            with torch.no_grad():
                for p, b in zip(params, before):
                    p.copy_(b)  # same point for both, so only the step is compared
        for mine, reference_step in zip(*steps):
            torch.testing.assert_close(mine.norm(), reference_step.norm(), rtol=1e-10, atol=0)
            if step < 2:  # before the start step the grafted direction is the step
                torch.testing.assert_close(mine, reference_step, rtol=1e-10, atol=1e-14)


def test_soap_first_adam_step_in_the_eigenbasis() -> None:
    """Step 1 builds L, R and their eigenvectors; step 2 is Adam's first step rotated there."""
    rng = np.random.default_rng(0)
    g1, g2 = rng.standard_normal((5, 4)), rng.standard_normal((5, 4))
    param = torch.zeros(5, 4, dtype=torch.float64, requires_grad=True)
    beta1, beta2, eps, lr = 0.9, 0.95, 1e-8, 0.1
    optimizer = gw.SOAP([param], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=0.0, eigh_dtype=torch.float64)
    param.grad = torch.from_numpy(g1)
    optimizer.step()
    assert torch.equal(param.detach(), torch.zeros(5, 4, dtype=torch.float64))
    param.grad = torch.from_numpy(g2)
    optimizer.step()
    _, q_left = np.linalg.eigh((1 - beta2) * g1 @ g1.T)
    _, q_right = np.linalg.eigh((1 - beta2) * g1.T @ g1)
    rotated = q_left.T @ g2 @ q_right
    m, v = (1 - beta1) * rotated, (1 - beta2) * rotated**2
    expected = -lr * np.sqrt(1 - beta2) / (1 - beta1) * q_left @ (m / (np.sqrt(v) + eps)) @ q_right.T
    np.testing.assert_allclose(param.detach().numpy(), expected, rtol=1e-8, atol=1e-12)


def test_soap_basis_refresh_tracks_the_eigenvectors() -> None:
    """With a changing factor the QR power iteration (one step per refresh) follows it to its
    eigenvectors: first a gradient with one structure, then another that replaces it."""
    generator = torch.Generator().manual_seed(0)
    param = torch.zeros(6, 8, dtype=torch.float64, requires_grad=True)
    optimizer = gw.SOAP([param], lr=0.0, precondition_every=1, eigh_dtype=torch.float64)
    for gradient in (torch.randn(6, 8, generator=generator, dtype=torch.float64) for _ in range(2)):
        for _ in range(400):
            param.grad = gradient
            optimizer.step()
    state = optimizer.state[param]
    basis = state["left_basis"]
    rotated = basis.T @ state["left"] @ basis
    off_diagonal = rotated - torch.diag(rotated.diagonal())
    assert off_diagonal.abs().max() < 1e-3 * rotated.diagonal().abs().max()
    assert torch.all(rotated.diagonal()[:-1] >= rotated.diagonal()[1:] - 1e-9)


# --------------------------------------------------------------------------------------
# K-FAC


def test_kfac_factors_equal_hand_computed() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Conv2d(1, 2, kernel_size=2, bias=False)).double()
    linear, conv = model[0], model[2]
    optimizer = gw.KFAC(model, lr=0.1, stat_decay=0.5)
    x = torch.randn(5, 1, 3, 4, dtype=torch.float64)
    grads = {}
    linear_out = linear(x)
    linear_out.register_hook(lambda g: grads.__setitem__("linear", g))
    conv_out = conv(torch.tanh(linear_out))
    conv_out.register_hook(lambda g: grads.__setitem__("conv", g))
    (conv_out**2).mean().backward()
    optimizer.step()
    batch_rows = 5 * 1 * 3
    a = torch.cat([x.reshape(-1, 4), torch.ones(batch_rows, 1, dtype=torch.float64)], dim=1)
    g = grads["linear"].reshape(-1, 3)
    torch.testing.assert_close(optimizer.state[linear.weight]["A"], a.T @ a / batch_rows)
    torch.testing.assert_close(optimizer.state[linear.weight]["G"], (batch_rows * g).T @ (batch_rows * g) / batch_rows)
    # Conv (KFC): patches summed over positions and averaged over examples; G averaged over both.
    patches = F.unfold(torch.tanh(linear_out.detach()), 2).transpose(1, 2).reshape(-1, 4)  # (N T, C kh kw)
    conv_g = grads["conv"].permute(0, 2, 3, 1).reshape(-1, 2)
    positions = conv_g.shape[0] // 5
    torch.testing.assert_close(optimizer.state[conv.weight]["A"], patches.T @ patches / 5)
    torch.testing.assert_close(optimizer.state[conv.weight]["G"], (5 * conv_g).T @ (5 * conv_g) / (5 * positions))
    # The next batch is folded in with stat_decay.
    first_a = optimizer.state[linear.weight]["A"].clone()
    x2 = torch.randn(5, 1, 3, 4, dtype=torch.float64)
    optimizer.zero_grad()
    (model(x2) ** 2).mean().backward()
    optimizer.step()
    a2 = torch.cat([x2.reshape(-1, 4), torch.ones(batch_rows, 1, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(optimizer.state[linear.weight]["A"], 0.5 * first_a + 0.5 * a2.T @ a2 / batch_rows)


def test_kfac_stats_every_updates_factors_only_on_due_steps(monkeypatch) -> None:
    """With stats_every=3 the hooks compute factors on steps 0, 3, 6 only (never on the
    others), and A, G are the stat_decay running average of exactly those batches'."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    first, second = model[0], model[2]
    optimizer = gw.KFAC(model, lr=0.1, stat_decay=0.5, stats_every=3)
    computed = []
    original = gw.kfac.input_output_factors

    def counting(layer, inputs, grads):
        computed.append(layer)
        return original(layer, inputs, grads)

    monkeypatch.setattr(gw.kfac, "input_output_factors", counting)
    expected: dict[nn.Module, dict[str, torch.Tensor]] = {first: {}, second: {}}
    for step in range(8):
        x = torch.randn(6, 4, dtype=torch.float64)
        optimizer.zero_grad()
        hidden = first(x)
        hidden.retain_grad()
        out = second(torch.tanh(hidden))
        out.retain_grad()
        (out**2).sum(1).mean().backward()
        due = step % 3 == 0
        assert optimizer.stats_due == due
        assert len(computed) == 2 * (step // 3 + 1)
        assert set(optimizer.pending_factors()) == ({first, second} if due else set())
        before = {layer: optimizer.state[layer.weight].get("A", torch.empty(0)).clone() for layer in expected}
        optimizer.step()
        for layer, inputs, grad in ((first, x, hidden.grad), (second, torch.tanh(hidden).detach(), out.grad)):
            state = optimizer.state[layer.weight]
            if not due:
                torch.testing.assert_close(state["A"], before[layer], rtol=0, atol=0)
                continue
            a = torch.cat([inputs, torch.ones(6, 1, dtype=torch.float64)], dim=1)
            batch = {"A": a.T @ a / 6, "G": (6 * grad).T @ (6 * grad) / 6}
            for key, value in batch.items():
                expected[layer][key] = value if step == 0 else 0.5 * expected[layer][key] + 0.5 * value
                torch.testing.assert_close(state[key], expected[layer][key])
    assert optimizer.steps_taken == 8
    restored = gw.KFAC(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double(), stats_every=3)
    restored.load_state_dict(optimizer.state_dict())
    assert restored.steps_taken == 8 and not restored.stats_due


def test_kfac_with_stats_every_reaches_least_squares_minimum() -> None:
    x, y = regression_data()
    model = regression_model(x, y)
    trainer = next(t for t in TRAINERS if t.name == "KFAC")
    optimizer = gw.KFAC(model, lr=0.5, damping=1e-4, inverse_every=1, stats_every=5)
    for _ in range(trainer.steps):
        trainer.step(optimizer, model, x, y)
    with torch.no_grad():
        gap = float(mse(model(x), y)) - least_squares_minimum(x, y)
    assert optimizer.state[model.weight]["factor_updates"] == trainer.steps // 5
    assert -1e-12 < gap < trainer.tol * max(1.0, least_squares_minimum(x, y))


def test_kfac_reaches_least_squares_minimum_in_far_fewer_steps_than_sgd() -> None:
    x, y = regression_data(seed=5, rows=256, conditioning=30.0)
    minimum = least_squares_minimum(x, y)
    trainer = next(t for t in TRAINERS if t.name == "KFAC")

    def steps_to_tolerance(optimizer, model, limit):
        for step in range(1, limit + 1):
            trainer.step(optimizer, model, x, y)
            with torch.no_grad():
                if float(mse(model(x), y)) - minimum < 1e-6:
                    return step
        return None

    model = regression_model(x, y)
    kfac_steps = steps_to_tolerance(gw.KFAC(model, lr=1.0, damping=1e-6, stat_decay=0.9, inverse_every=1), model, 100)
    # SGD at its best stable rate 1/L (L: the largest eigenvalue of the Hessian E[x x^T]).
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    largest = float(torch.linalg.eigvalsh(design.T @ design / len(x)).max())
    model = regression_model(x, y)
    sgd_steps = steps_to_tolerance(torch.optim.SGD(model.parameters(), lr=1.0 / largest), model, 2000)
    assert kfac_steps is not None and kfac_steps <= 20
    assert sgd_steps is None or sgd_steps > 20 * kfac_steps


# --------------------------------------------------------------------------------------
# Sophia and its curvature estimators


def _small_network():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(16, 3, dtype=torch.float64)
    y = torch.randn(16, 2, dtype=torch.float64)
    return model, x, y


def test_hutchinson_estimate_converges_to_true_hessian_diagonal() -> None:
    model, x, y = _small_network()
    params = list(model.parameters())
    shapes = [p.shape for p in params]
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def loss_of(vector):
        pieces, start = [], 0
        for shape in shapes:
            count = int(np.prod(shape))
            pieces.append(vector[start : start + count].reshape(shape))
            start += count
        hidden = torch.tanh(x @ pieces[0].T + pieces[1])
        return mse(hidden @ pieces[2].T + pieces[3], y)

    exact = torch.autograd.functional.hessian(loss_of, flat).diagonal()
    loss = mse(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    errors = []
    for samples in (1, 16, 256, 4096):
        estimate = hutchinson_diagonal(grads, params, samples=samples, generator=torch.Generator().manual_seed(samples))
        errors.append(float((torch.cat([e.reshape(-1) for e in estimate]) - exact).norm() / exact.norm()))
    assert errors[-1] < 0.05 and errors[-1] < errors[0] / 8 and errors[2] < errors[0]


def test_gauss_newton_bartlett_is_unbiased_for_the_gauss_newton_diagonal() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    x = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    logits = x @ weight.T
    # Gauss-Newton of the mean cross-entropy: (1/B) sum_b (diag(p) - p p^T) kron x_b x_b^T.
    probabilities = torch.softmax(logits.detach(), dim=-1)
    exact = torch.zeros(3, 4, dtype=torch.float64)
    for p, row in zip(probabilities, x):
        exact += torch.outer(p - p**2, row**2) / len(x)
    samples = 4000
    total = torch.zeros(3, 4, dtype=torch.float64)
    for _ in range(samples):
        (estimate,) = gauss_newton_bartlett(logits, [weight], generator=generator)
        total += estimate
    torch.testing.assert_close(total / samples, exact, rtol=0.08, atol=1e-3)
    assert sample_labels(torch.zeros(2, 5, 7), generator).shape == (2, 5)


def test_sophia_step_is_clipped_to_lr_and_newton_where_curvature_is_large() -> None:
    """theta -= lr clip(m / max(rho h, eps), 1): a step of exactly lr where m / (rho h) > 1,
    the Newton step m / (rho h) elsewhere."""
    param = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    optimizer = gw.Sophia([param], lr=0.1, betas=(0.0, 0.0), rho=1.0, weight_decay=0.0)
    grad = torch.tensor([1.0, -1.0, 0.01, -0.03], dtype=torch.float64)
    hessian = torch.tensor([0.5, 4.0, 1.0, 0.0], dtype=torch.float64)
    assert optimizer.hessian_update_due
    optimizer.update_hessian([hessian])
    param.grad = grad
    optimizer.step()
    expected = -torch.tensor([0.1, -0.1 * 0.25, 0.1 * 0.01, -0.1], dtype=torch.float64)
    torch.testing.assert_close(param.detach(), expected)
    assert param.detach().abs().max() <= 0.1
    assert not optimizer.hessian_update_due
    for _ in range(9):
        param.grad = torch.randn(4, dtype=torch.float64) * 100
        before = param.detach().clone()
        optimizer.step()
        assert (param.detach() - before).abs().max() <= 0.1 + 1e-15
    assert optimizer.hessian_update_due  # every 10 steps
    with pytest.raises(ValueError, match="one estimate per parameter"):
        optimizer.update_hessian([hessian, hessian])


def test_sophia_with_gauss_newton_bartlett_trains_a_classifier() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(128, 5, generator=generator)
    labels = (x @ torch.randn(5, 3, generator=generator)).argmax(1)
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    optimizer = gw.Sophia(model.parameters(), lr=0.05, rho=0.05, weight_decay=0.0)
    params = list(model.parameters())
    first = None
    for _ in range(200):
        optimizer.zero_grad()
        logits = model(x)
        if optimizer.hessian_update_due:
            optimizer.update_hessian(gauss_newton_bartlett(logits, params, generator=generator))
        loss = F.cross_entropy(logits, labels)
        first = first if first is not None else float(loss.detach())
        loss.backward()
        optimizer.step()
    assert float(loss.detach()) < 0.25 * first
    assert (model(x).argmax(1) == labels).float().mean() > 0.95


# --------------------------------------------------------------------------------------
# The race


def test_race_runs_the_new_optimizers_and_feeds_sophia_its_hessian() -> None:
    from gradwise.bench.optimizers import OPTIMIZERS
    from gradwise.bench.race import race, run_optimizer
    from gradwise.problems import Beale, Quadratic

    names = ["adafactor", "muon", "shampoo", "soap", "sophia"]
    result = race([Beale()], [OPTIMIZERS[n] for n in names], steps=150, sweep_points=3)
    for entry in result.entries:
        assert not entry.run.diverged and entry.run.final_loss < entry.run.losses[0], entry.optimizer
    # Sophia-H with rho 1 on an ill-conditioned (rotated) quadratic reaches the minimum.
    run = run_optimizer(Quadratic(dim=2, kappa=100.0), OPTIMIZERS["sophia"], lr=0.3, steps=600, tol=1e-10)
    assert run.steps_to_tol is not None
