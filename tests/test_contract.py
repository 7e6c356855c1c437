"""torch's optimizer contract, checked over every entry of the contract table.

One tiny model (6 -> 4 -> 2 with tanh, a mean-squared loss on 8 examples in 4 mini-batch
slots) serves every optimizer, whatever its drive (see ``optimizer_contract.py``). Each
check builds it, drives the optimizer a few steps and compares with a reference run:
torch.optim's twin, the same optimizer on other inputs (contiguous for strided, real views
for complex, float lr for tensor lr), or an earlier point of the same run (resume).
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from optimizer_contract import ENTRIES, Entry, entries_with, exported_optimizers, twins
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.testing._internal.common_optimizers import OptimizerErrorEnum, optim_db

from gradwise.optim.driving import drive_step

SLOTS = 4
SHAPES = {"fc1.weight": (4, 6), "fc1.bias": (4,), "fc2.weight": (2, 4), "fc2.bias": (2,)}
TORCH_INFO = {info.optim_cls.__name__: info for info in optim_db}


# Contract checks gradwise does not meet yet, by test id, with the precise cause. Each is a
# strict xfail: the suite stays green, and the mark fails once the cause is fixed (then
# delete its line).
KNOWN_FAILURES: dict[str, str] = {
}


@pytest.fixture(autouse=True)
def _known_failure(request: pytest.FixtureRequest) -> None:
    reason = KNOWN_FAILURES.get(request.node.name)
    if reason is not None:
        request.node.add_marker(pytest.mark.xfail(strict=True, reason=reason))


def _data(dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2 * SLOTS, 6, generator=generator, dtype=torch.float64)
    y = torch.randn(2 * SLOTS, 2, generator=generator, dtype=torch.float64)
    if dtype.is_complex:
        y = torch.complex(y, torch.randn(2 * SLOTS, 2, generator=generator, dtype=torch.float64))
    return x.to(dtype), y.to(dtype)


class TinyNet(nn.Module):
    """fc2(tanh(fc1(x))). ``layout`` stores the same values contiguously, as strided views
    (every other element of a larger tensor), as complex numbers, or as the real views of
    complex numbers (``(..., 2)``, turned back into complex in ``forward``). ``extras`` adds
    a zero-size parameter (in the loss) and one the loss does not use (no gradient);
    ``embedding`` ("sparse" or "dense") an embedding with sparse or dense gradients."""

    def __init__(self, dtype=torch.float64, layout="contiguous", extras=False, embedding=None, seed=0):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 4), nn.Linear(4, 2)
        self.layout, self.extras, self.embedding_kind = layout, extras, embedding
        generator = torch.Generator().manual_seed(seed)
        complex_values = layout in ("complex", "real_view")
        for name, shape in SHAPES.items():
            values = torch.randn(shape, generator=generator, dtype=torch.float64)
            if complex_values:
                values = torch.complex(values, torch.randn(shape, generator=generator, dtype=torch.float64))
            if layout == "strided":
                base = torch.zeros(*shape[:-1], 2 * shape[-1], dtype=dtype)
                base[..., ::2] = values.to(dtype)
                tensor = base[..., ::2]
                assert not tensor.is_contiguous()
            elif layout == "complex":
                tensor = values.to(_complex_of(dtype))
            elif layout == "real_view":
                tensor = torch.view_as_real(values.to(_complex_of(dtype))).clone()
            else:
                tensor = values.to(dtype)
            module, attribute = name.split(".")
            setattr(getattr(self, module), attribute, nn.Parameter(tensor))
        if extras:
            self.empty = nn.Parameter(torch.zeros(0, 3, dtype=dtype))
            self.unused = nn.Parameter(torch.ones(3, dtype=dtype))
        if embedding:
            self.embedding = nn.Embedding(5, 3, sparse=embedding == "sparse", dtype=dtype)
            with torch.no_grad():
                self.embedding.weight.copy_(torch.randn(5, 3, generator=generator, dtype=torch.float64))
        self.data_dtype = _complex_of(dtype) if complex_values else dtype

    def forward(self, x: Tensor) -> Tensor:
        if self.layout == "real_view":
            layers = (self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
            w1, b1, w2, b2 = (torch.view_as_complex(p) for p in layers)
            return F.linear(torch.tanh(F.linear(x, w1, b1)), w2, b2)
        return self.fc2(torch.tanh(self.fc1(x)))

    def loss(self, slot: int | None = None) -> Tensor:
        """Mean squared error on mini-batch ``slot`` (all examples when None)."""
        x, y = _data(self.data_dtype)
        if slot is not None:
            x, y = x[2 * slot : 2 * slot + 2], y[2 * slot : 2 * slot + 2]
        loss = (self(x) - y).abs().square().mean()
        if self.extras:
            loss = loss + self.empty.sum()
        if self.embedding_kind:
            index = torch.tensor([0, 2, 2]) if slot is None else torch.tensor([slot % 5, 4])
            loss = loss + 0.5 * self.embedding(index).square().sum()
        return loss.real if loss.is_complex() else loss

    def matrices(self) -> list[Tensor]:
        return [self.fc1.weight, self.fc2.weight]


def _complex_of(dtype: torch.dtype) -> torch.dtype:
    return {torch.float64: torch.complex128, torch.float32: torch.complex64}.get(dtype, dtype)


def route(entry: Entry, pairs: list[tuple[str, Tensor]], named: bool = False) -> list:
    """The parameters as ``entry``'s optimizer takes them: a list (of tensors, or of
    (name, tensor) pairs with ``named``), or, where the entry splits vectors off
    (Muon's internal AdamW), two param groups."""
    pairs = list(pairs)  # read twice below (named_parameters() is a generator)
    items = list(pairs) if named else [p for _, p in pairs]
    if not entry.vectors_apart:
        return items
    is_matrix = [p.ndim >= 2 for _, p in pairs]
    matrices = [item for item, matrix in zip(items, is_matrix) if matrix]
    vectors = [item for item, matrix in zip(items, is_matrix) if not matrix]
    return [{"params": matrices}] + ([{"params": vectors, "use_muon": False}] if vectors else [])


def make(entry: Entry, model: nn.Module, params=None, **options) -> torch.optim.Optimizer:
    """``entry``'s optimizer on ``params`` (default: all of ``model``'s), with its contract options."""
    kwargs = {**entry.kwargs, **options}
    params = route(entry, model.named_parameters()) if params is None else params
    if entry.drive == "model":
        return entry.optimizer(model, params=params, **kwargs)
    return entry.optimizer(params, **kwargs)


def squared_gradients(loss: Tensor, params: list[Tensor]) -> list[Tensor]:
    """A Gauss-Newton-like Hessian diagonal (deterministic, so runs can be compared); for a complex
    parameter, the estimate of its real view, stored complex."""
    grads = torch.autograd.grad(loss, params, retain_graph=True, materialize_grads=True)
    return [torch.view_as_complex(torch.view_as_real(g).square()) if g.is_complex() else g * g for g in grads]


def drive(entry: Entry, optimizer: torch.optim.Optimizer, model: TinyNet, steps: range, sign: float = 1.0) -> None:
    """Run ``steps`` of ``optimizer`` on ``sign * model.loss`` by the shared driver: step ``k`` on
    slot ``k % SLOTS`` (its sample index), a snapshot of the full loss each epoch of the slots,
    curvature from the next slot."""
    for step in steps:
        drive_step(
            optimizer,
            lambda step=step: sign * model.loss(step % SLOTS),
            full_loss=(lambda: sign * model.loss()) if step % SLOTS == 0 else None,
            slot=step % SLOTS,
            hessian_loss=lambda step=step: sign * model.loss((step + 1) % SLOTS),
            hessian_estimate=squared_gradients,
            drive=entry.drive,  # torch's twin is driven as the entry
        )


def run(entry: Entry, steps: int = 4, model: TinyNet | None = None, **options) -> tuple[TinyNet, torch.optim.Optimizer]:
    model = TinyNet() if model is None else model
    optimizer = make(entry, model, **options)
    drive(entry, optimizer, model, range(steps))
    return model, optimizer


def assert_same_params(actual: nn.Module, expected: nn.Module, exact: bool = False, **tolerance) -> None:
    for (name, a), (_, b) in zip(actual.named_parameters(), expected.named_parameters()):
        if exact:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, **(tolerance or {"rtol": 1e-7, "atol": 1e-10}),
                                       msg=lambda m, name=name: f"{name}: {m}")


def round_trip(obj):
    """``obj`` saved with torch.save and loaded back (a checkpoint's journey)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def assert_equal_state_dicts(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert len(a["param_groups"]) == len(b["param_groups"])
    for group_a, group_b in zip(a["param_groups"], b["param_groups"]):
        assert group_a.keys() == group_b.keys()
        for key in group_a:
            assert _equal(group_a[key], group_b[key]), key
    assert a["state"].keys() == b["state"].keys()
    for index in a["state"]:
        assert a["state"][index].keys() == b["state"][index].keys(), index
        for key in a["state"][index]:
            assert _equal(a["state"][index][key], b["state"][index][key]), (index, key)
    for key in a.keys() - {"state", "param_groups"}:
        assert _equal(a[key], b[key]), key


def _equal(x, y) -> bool:
    if isinstance(x, Tensor) or isinstance(y, Tensor):
        return isinstance(x, Tensor) and isinstance(y, Tensor) and x.dtype == y.dtype and torch.equal(x, y)
    if isinstance(x, (list, tuple)):
        return type(x) is type(y) and len(x) == len(y) and all(_equal(u, v) for u, v in zip(x, y))
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_equal(x[k], y[k]) for k in x)
    if isinstance(x, float) and math.isnan(x):
        return isinstance(y, float) and math.isnan(y)
    return x == y


# The table covers gradwise.optim.


def test_every_exported_optimizer_has_an_entry() -> None:
    """One entry named as each exported class; entries of a shared option (cautious updates,
    MARS) are named ``Class[option]``."""
    exported = exported_optimizers()
    assert set(exported) <= {entry.name for entry in ENTRIES}
    for entry in ENTRIES:
        assert exported[entry.name.split("[")[0]] is entry.optimizer


def test_every_twin_is_in_torchs_optim_db() -> None:
    for entry in twins():
        assert entry.torch_twin.__name__ == entry.name and entry.name in TORCH_INFO


# Parity with torch.optim.


def _twin_params(entry: Entry, model: TinyNet) -> list[Tensor]:
    return model.matrices() if entry.twin_params == "matrices" else list(model.parameters())


def _torch_inputs():
    cases = []
    for entry in twins():
        for optim_input in TORCH_INFO[entry.name].optim_inputs_func(device="cpu"):
            marks = ()
            if optim_input.desc in entry.skip_torch_inputs:
                marks = pytest.mark.skip(reason=entry.skip_torch_inputs[optim_input.desc])
            cases.append(pytest.param(entry, optim_input, id=f"{entry.name}-{optim_input.desc}", marks=marks))
    return cases


@pytest.mark.parametrize("entry, optim_input", _torch_inputs())
def test_matches_torch_on_its_hyperparameter_sets(entry: Entry, optim_input) -> None:
    """torch's own hyperparameter sets (optim_db), 6 steps: gradwise's class equals torch's."""
    ours_model, theirs_model = TinyNet(), TinyNet()
    ours = entry.optimizer(_twin_params(entry, ours_model), **optim_input.kwargs)
    theirs = entry.torch_twin(_twin_params(entry, theirs_model), **optim_input.kwargs)
    drive(entry, ours, ours_model, range(6))
    drive(entry, theirs, theirs_model, range(6))
    assert_same_params(ours_model, theirs_model, rtol=1e-6, atol=1e-9)


def _with_paths(entries):
    return [pytest.param(entry, path, id=f"{entry.name}-{_path_id(path)}") for entry in entries for path in entry.paths]


def _path_id(path: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in path.items()) or "default"


def _random_shapes(rng: np.random.Generator, count: int) -> list[tuple[int, ...]]:
    return [tuple(int(n) for n in rng.integers(1, 6, size=int(rng.integers(0, 4)))) for _ in range(count)]


def _random_params(shapes, seed: int, dtype=torch.float64) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=dtype).requires_grad_() for shape in shapes]


def _noisy_loss(params: list[Tensor], step: int) -> Tensor:
    """A smooth nonconvex loss with a step-dependent linear term (a noisy gradient)."""
    generator = torch.Generator().manual_seed(1000 + step)
    total = torch.zeros((), dtype=params[0].dtype)
    for index, p in enumerate(params):
        noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        total = total + (0.5 * (0.5 + index) * p**2 + torch.sin(3 * p) + noise * p).sum()
    return total


def _split_groups(params, hyperparameters: list[dict]) -> list[dict]:
    count = len(hyperparameters)
    return [{"params": params[i::count], **hyperparameters[i]} for i in range(count) if params[i::count]]


@pytest.mark.parametrize("entry, path", _with_paths([e for e in twins() if e.sample is not None]))
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1))
def test_matches_torch_on_random_hyperparameters(entry: Entry, path: dict, seed: int) -> None:
    """100 steps, random shapes and hyperparameters, several param groups: allclose in
    float64, and the state has torch's layout (so checkpoints move between the two)."""
    rng = np.random.default_rng(seed)
    shapes = _random_shapes(rng, int(rng.integers(2, 6)))
    hyperparameters = [entry.sample(rng) for _ in range(int(rng.integers(1, 3)))]
    ours, theirs = _random_params(shapes, seed), _random_params(shapes, seed)
    options = dict(path)
    for key in entry.constructor_only:
        options[key] = hyperparameters[0][key]
        for group in hyperparameters:
            del group[key]
    ours_opt = entry.optimizer(_split_groups(ours, hyperparameters), **options)
    torch_options = {key: options[key] for key in entry.constructor_only}
    torch_opt = entry.torch_twin(_split_groups(theirs, hyperparameters), **torch_options)
    for step in range(100):
        for optimizer, params in ((ours_opt, ours), (torch_opt, theirs)):
            optimizer.zero_grad()
            _noisy_loss(params, step).backward()
            optimizer.step()
    for mine, reference in zip(ours, theirs):
        torch.testing.assert_close(mine, reference, rtol=1e-6, atol=1e-12)
        for key, value in torch_opt.state[reference].items():
            torch.testing.assert_close(ours_opt.state[mine][key].cpu().to(value.dtype), value.cpu(),
                                       rtol=1e-6, atol=1e-12)


def _error_inputs():
    cases = []
    for entry in twins():
        for error_input in TORCH_INFO[entry.name].optim_error_inputs_func(device="cpu", dtype=torch.float32):
            desc = error_input.optimizer_error_input.desc
            marks = ()
            if desc in entry.skip_error_inputs:
                marks = pytest.mark.skip(reason=entry.skip_error_inputs[desc])
            readable = desc.replace("\\", "")  # torch's descs quote regexes ("betas\\[0\\]")
            cases.append(pytest.param(entry, error_input, id=f"{entry.name}-{readable}", marks=marks))
    return cases


@pytest.mark.parametrize("entry, error_input", _error_inputs())
def test_refuses_torchs_error_inputs(entry: Entry, error_input) -> None:
    """torch's error inputs (optim_db): the same error type, with torch's message or one
    that names the offending option."""
    optim_input = error_input.optimizer_error_input
    params = optim_input.params if optim_input.params is not None else [torch.rand(2, 3, requires_grad=True)]
    kwargs = optim_input.kwargs

    def attempt():
        optimizer = entry.optimizer(params, **kwargs)
        if error_input.error_on == OptimizerErrorEnum.STEP_ERROR:
            optimizer.step()

    if issubclass(error_input.error_type, Warning):
        with pytest.warns(error_input.error_type, match=error_input.error_regex):
            attempt()
        return
    with pytest.raises(error_input.error_type) as raised:
        attempt()
    message = str(raised.value)
    assert re.search(error_input.error_regex, message) or any(key in message for key in kwargs), message


@pytest.mark.parametrize(
    "entry, keyword, value",
    [pytest.param(entry, key, value, id=f"{entry.name}-{key}={value!r}")
     for entry in ENTRIES for key, value in entry.invalid],
)
def test_invalid_hyperparameter_is_named(entry: Entry, keyword: str, value) -> None:
    """A ValueError naming the option, whether given to the constructor or in a param group."""
    model = TinyNet()
    params = model if entry.drive == "model" else [model.fc1.weight]
    with pytest.raises(ValueError, match=re.escape(keyword)):
        entry.optimizer(params, **{keyword: value})
    if keyword in ("stats_every",):  # an optimizer-wide option, not a param group's
        return
    groups = [{"params": [model.fc1.weight], keyword: value}]
    with pytest.raises(ValueError, match=re.escape(keyword)):
        if entry.drive == "model":
            entry.optimizer(model, params=groups)
        else:
            entry.optimizer(groups)


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e.sample is not None], ids=str)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_hyperparameters_are_accepted_or_named(entry: Entry, data) -> None:
    """Any value for any numeric hyperparameter is either accepted or rejected by name."""
    numeric = [key for key, value in entry.optimizer([torch.zeros(1)]).defaults.items()
               if isinstance(value, float) and not isinstance(value, bool)]
    keyword = data.draw(st.sampled_from(numeric))
    value = data.draw(st.floats(allow_nan=True, allow_infinity=True) | st.integers(-10, 10))
    param = torch.zeros(2, requires_grad=True)
    try:
        optimizer = entry.optimizer([param], **{keyword: value})
    except ValueError as error:
        assert keyword in str(error) and repr(value) in str(error)
        return
    assert math.isfinite(value) and value >= 0
    assert optimizer.param_groups[0][keyword] == value


# state_dict: resume, determinism, both directions with torch.


@pytest.mark.parametrize("entry, path", _with_paths(ENTRIES))
def test_resume_is_exact(entry: Entry, path: dict) -> None:
    """Saved mid-run and loaded into a fresh optimizer, the run continues bit for bit."""
    model, optimizer = run(entry, 4, **path)
    checkpoint = round_trip({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    drive(entry, optimizer, model, range(4, 8))
    resumed = TinyNet(seed=1)
    resumed.load_state_dict(checkpoint["model"])
    fresh = make(entry, resumed, **path)
    fresh.load_state_dict(checkpoint["optimizer"])
    drive(entry, fresh, resumed, range(4, 8))
    assert_same_params(resumed, model, exact=True)


@pytest.mark.parametrize("entry", ENTRIES, ids=str)
def test_state_dict_round_trip_is_deterministic(entry: Entry) -> None:
    """Loading a state_dict and saving it again gives an equal dict: the same keys in every
    group and every state, the same values."""
    model, optimizer = run(entry, 3)
    saved = optimizer.state_dict()
    fresh = make(entry, model)
    fresh.load_state_dict(round_trip(saved))
    assert_equal_state_dicts(fresh.state_dict(), saved)


@pytest.mark.parametrize("writer", ["torch", "gradwise"])
@pytest.mark.parametrize("entry", twins(), ids=str)
def test_state_dict_continues_in_the_other_library(entry: Entry, writer: str) -> None:
    """A checkpoint written by torch.optim continues identically under gradwise, and the reverse."""
    first, second = (entry.torch_twin, entry.optimizer) if writer == "torch" else (entry.optimizer, entry.torch_twin)
    first_model, second_model = TinyNet(), TinyNet()
    written = first(_twin_params(entry, first_model), **entry.kwargs)
    drive(entry, written, first_model, range(3))
    second_model.load_state_dict(first_model.state_dict())
    loaded = second(_twin_params(entry, second_model), **entry.kwargs)
    loaded.load_state_dict(round_trip(written.state_dict()))
    drive(entry, written, first_model, range(3, 7))
    drive(entry, loaded, second_model, range(3, 7))
    assert_same_params(second_model, first_model, rtol=1e-6, atol=1e-9)


# Named parameters and hooks.


@pytest.mark.parametrize("entry", ENTRIES, ids=str)
def test_named_parameters(entry: Entry) -> None:
    """``opt(model.named_parameters())`` steps as ``opt(model.parameters())`` and its
    state_dict carries the names (``param_names``), as torch's does."""
    named_model, plain_model = TinyNet(), TinyNet()
    named = make(entry, named_model, params=route(entry, named_model.named_parameters(), named=True))
    plain = make(entry, plain_model)
    drive(entry, named, named_model, range(3))
    drive(entry, plain, plain_model, range(3))
    assert_same_params(named_model, plain_model, exact=True)
    groups = named.state_dict()["param_groups"]
    expected = [name for group in _as_groups(route(entry, named_model.named_parameters(), named=True))
                for name, _ in group["params"]]
    assert [name for group in groups for name in group["param_names"]] == expected


@pytest.mark.parametrize("entry", ENTRIES, ids=str)
def test_step_hooks(entry: Entry) -> None:
    calls = []
    model = TinyNet()
    optimizer = make(entry, model)
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append(("pre", opt)))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append(("post", opt)))
    handle = register_optimizer_step_post_hook(lambda opt, args, kwargs: calls.append(("global", opt)))
    try:
        drive(entry, optimizer, model, range(2))
    finally:
        handle.remove()
    assert calls == [("pre", optimizer), ("global", optimizer), ("post", optimizer)] * 2 or calls == [
        ("pre", optimizer), ("post", optimizer), ("global", optimizer)] * 2


@pytest.mark.parametrize("entry", ENTRIES, ids=str)
def test_state_dict_hooks(entry: Entry) -> None:
    model, optimizer = run(entry, 2)
    calls = []
    optimizer.register_state_dict_pre_hook(lambda opt: calls.append("save-pre"))

    def tag(opt, state_dict):
        calls.append("save-post")
        state_dict["tag"] = 7
        return state_dict

    optimizer.register_state_dict_post_hook(tag)
    saved = optimizer.state_dict()
    assert saved["tag"] == 7
    fresh = make(entry, model)

    def untag(opt, state_dict):
        calls.append("load-pre")
        state_dict = dict(state_dict)
        state_dict.pop("tag")
        return state_dict

    fresh.register_load_state_dict_pre_hook(untag)
    fresh.register_load_state_dict_post_hook(lambda opt: calls.append("load-post"))
    fresh.load_state_dict(saved)
    assert calls == ["save-pre", "save-post", "load-pre", "load-post"]


# Inputs: tensor lr, strided, complex, low precision, zero-size, sparse.


@pytest.mark.parametrize("shape", [(), (1,)], ids=["0-d", "1-element"])
@pytest.mark.parametrize("entry", ENTRIES, ids=str)
def test_tensor_lr(entry: Entry, shape) -> None:
    """A tensor learning rate steps as the same float."""
    lr = entry.kwargs.get("lr", entry.optimizer.__init__.__defaults__[0])
    float_model, _ = run(entry, 4)
    tensor_model, _ = run(entry, 4, lr=torch.full(shape, lr, dtype=torch.float64))
    assert_same_params(tensor_model, float_model, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("entry", entries_with("strided"), ids=str)
def test_strided_params_equal_contiguous(entry: Entry) -> None:
    strided, _ = run(entry, 4, model=TinyNet(layout="strided"))
    contiguous, _ = run(entry, 4)
    assert not strided.fc1.weight.is_contiguous()
    # Element-wise updates agree to rounding; matrix products may round differently on
    # another memory layout, and a preconditioner's inverse root of a nearly singular factor
    # (Shampoo's, on a vector) amplifies that to 1e-8. The wrong numbers this catches were
    # 0.1-0.7 apart.
    assert_same_params(strided, contiguous, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("entry", entries_with("complex"), ids=str)
def test_complex_params_are_optimized_as_their_real_view(entry: Entry) -> None:
    """torch's rule: a complex parameter is optimized as its view_as_real; and where torch
    has the algorithm, the numbers are torch's."""
    complex_model, _ = run(entry, 4, model=TinyNet(layout="complex"))
    real_model, _ = run(entry, 4, model=TinyNet(layout="real_view"))
    for (name, z), r in zip(complex_model.named_parameters(), real_model.parameters()):
        torch.testing.assert_close(torch.view_as_real(z.detach()), r.detach(), rtol=1e-9, atol=1e-12,
                                   msg=lambda m, name=name: f"{name}: {m}")
    if entry.torch_twin is not None and TORCH_INFO[entry.name].supports_complex:
        theirs_model = TinyNet(layout="complex")
        drive(entry, entry.torch_twin(list(theirs_model.parameters()), **entry.kwargs), theirs_model, range(4))
        assert_same_params(complex_model, theirs_model, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("entry", [e for e in ENTRIES if "complex" not in e.supports], ids=str)
def test_complex_params_refused_clearly(entry: Entry) -> None:
    model = TinyNet(layout="complex")
    with pytest.raises((RuntimeError, ValueError, TypeError), match="(?i)complex"):
        run(entry, 2, model=model)


@pytest.mark.parametrize(
    "entry, dtype",
    [pytest.param(e, d, id=f"{e.name}-{d}") for e in ENTRIES for d in ("bfloat16", "float16") if d in e.supports],
)
def test_low_precision_params(entry: Entry, dtype: str) -> None:
    """bf16/fp16 parameters take the steps the same optimizer takes in float32, within the
    low precision's rounding."""
    low = getattr(torch, dtype)
    low_model, _ = run(entry, 3, model=TinyNet(dtype=low))
    reference = TinyNet(dtype=torch.float32)
    reference.load_state_dict({k: v.float() for k, v in TinyNet(dtype=low).state_dict().items()})
    run(entry, 3, model=reference)
    for (name, p), q in zip(low_model.named_parameters(), reference.parameters()):
        assert p.dtype == low, name
        torch.testing.assert_close(p.detach().float(), q.detach(), rtol=0.05, atol=0.05,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("entry", ENTRIES, ids=str)
def test_zero_size_and_no_grad_params(entry: Entry) -> None:
    """A zero-size parameter is stepped (nothing to do) and one without a gradient is left alone."""
    model = TinyNet(extras=True)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = make(entry, model)
    drive(entry, optimizer, model, range(3))
    assert model.empty.shape == (0, 3)
    assert torch.equal(model.unused, before["unused"])
    assert not torch.equal(model.fc1.weight, before["fc1.weight"])
    if entry.drive in ("step", "model"):
        assert not optimizer.state.get(model.unused)


@pytest.mark.parametrize("entry", ENTRIES, ids=str)
def test_sparse_gradients(entry: Entry) -> None:
    """Supported as torch supports them: the steps taken with the same gradient dense, and
    torch's numbers where torch has the algorithm; refused clearly elsewhere."""
    model = TinyNet(embedding="sparse")
    if "sparse" not in entry.supports:
        with pytest.raises((RuntimeError, ValueError), match="(?i)sparse"):
            run(entry, 2, model=model)
        return
    run(entry, 3, model=model)
    dense, _ = run(entry, 3, model=TinyNet(embedding="dense"))
    assert_same_params(model, dense, rtol=1e-9, atol=1e-12)
    if entry.torch_twin is not None:
        theirs = TinyNet(embedding="sparse")
        drive(entry, entry.torch_twin(list(theirs.parameters()), **entry.kwargs), theirs, range(3))
        assert_same_params(model, theirs, rtol=1e-9, atol=1e-12)


# Param groups, copies, maximize.


@pytest.mark.parametrize("entry", ENTRIES, ids=str)
def test_add_param_group(entry: Entry) -> None:
    """Adding a group equals constructing with it; the added group gets the defaults and is
    validated. An optimizer of one group refuses a second."""
    model = TinyNet()
    first, second = route(entry, model.fc1.named_parameters()), route(entry, model.fc2.named_parameters())
    optimizer = make(entry, model, params=first)
    if "param_groups" not in entry.supports:
        with pytest.raises(ValueError, match="group"):
            optimizer.add_param_group({"params": second})
        return
    lr = entry.kwargs.get("lr", 0.01) / 2
    added = [{**group, "lr": lr} for group in _as_groups(second)]
    for group in added:
        optimizer.add_param_group(group)
    assert all(group.keys() == optimizer.param_groups[0].keys() for group in optimizer.param_groups)
    assert optimizer.param_groups[-1]["lr"] == lr
    together_model = TinyNet()
    first = _as_groups(route(entry, together_model.fc1.named_parameters()))
    second = [{**group, "lr": lr} for group in _as_groups(route(entry, together_model.fc2.named_parameters()))]
    together = make(entry, together_model, params=first + second)
    drive(entry, optimizer, model, range(3))
    drive(entry, together, together_model, range(3))
    assert_same_params(model, together_model, exact=True)
    with pytest.raises(ValueError, match="lr"):
        optimizer.add_param_group({"params": [nn.Parameter(torch.ones(2, dtype=torch.float64))], "lr": -1.0})


def _as_groups(params: list) -> list[dict]:
    return params if params and isinstance(params[0], dict) else [{"params": params}]


@pytest.mark.parametrize("entry", ENTRIES, ids=str)
def test_deepcopy_and_pickle(entry: Entry) -> None:
    """A deep copy and a pickled copy (each with its model) continue as the original."""
    model, optimizer = run(entry, 3)
    saved = copy.deepcopy(optimizer.state_dict())
    copies = [copy.deepcopy((model, optimizer)), pickle.loads(pickle.dumps((model, optimizer)))]
    drive(entry, optimizer, model, range(3, 6))
    for copied_model, copied_optimizer in copies:
        assert_equal_state_dicts(copied_optimizer.state_dict(), saved)
        drive(entry, copied_optimizer, copied_model, range(3, 6))
        assert_same_params(copied_model, model, exact=True)


@pytest.mark.parametrize("entry", entries_with("maximize"), ids=str)
def test_maximize(entry: Entry) -> None:
    """maximize=True on a loss steps as minimising its negation; a bool option must be a bool."""
    maximized = TinyNet()
    drive(entry, make(entry, maximized, maximize=True), maximized, range(4), sign=-1.0)
    minimized, _ = run(entry, 4)
    assert_same_params(maximized, minimized, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="maximize"):
        make(entry, TinyNet(), maximize="False")


# torch's keywords.


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("entry", entries_with("foreach"), ids=str)
def test_foreach_keyword(entry: Entry, foreach: bool) -> None:
    """foreach=False (single-tensor) and foreach=True (multi-tensor) step as the default."""
    default, _ = run(entry, 4)
    chosen, optimizer = run(entry, 4, foreach=foreach)
    assert optimizer.param_groups[0]["foreach"] is foreach
    assert_same_params(chosen, default, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("entry", entries_with("differentiable"), ids=str)
def test_differentiable_keyword(entry: Entry) -> None:
    """differentiable=True: three recorded steps take torch's (non-differentiable) steps, and
    autograd's derivative of the result with respect to the starting parameters, the gradient
    and the hyperparameter-free state is the true one (gradcheck against finite differences).

    torch's own differentiable steps are not the reference: its SGD detaches the first
    momentum buffer (d theta / d g is then wrong), its Adam(amsgrad=True) and centered
    RMSprop fail in backward after two steps, and its differentiable Adam moves the
    iterates by 2e-6 in float64 (a reordered step-size formula)."""
    kwargs = {**entry.kwargs, "lr": 0.1}

    def steps(cls, param: Tensor, grad: Tensor, differentiable: bool) -> Tensor:
        param = param.clone()
        optimizer = cls([param], differentiable=differentiable, **kwargs) if differentiable else cls([param], **kwargs)
        for _ in range(3):
            param.grad = grad
            optimizer.step()
        return param

    generator = torch.Generator().manual_seed(3)
    start = torch.randn(5, generator=generator, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(5, generator=generator, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        theirs = steps(entry.torch_twin, start.detach(), grad.detach(), differentiable=False)
    torch.testing.assert_close(steps(entry.optimizer, start, grad, differentiable=True).detach(), theirs)
    assert torch.autograd.gradcheck(lambda p, g: steps(entry.optimizer, p, g, differentiable=True), (start, grad))


@pytest.mark.parametrize("entry", [e for e in entries_with("fused") if e.torch_twin is not None], ids=str)
def test_fused_kernels_honour_grad_scale_and_found_inf(entry: Entry) -> None:
    """torch's protocol for its fused kernels (Lion's own kernel has none): ``grad_scale``
    divides the gradients, and ``found_inf = 1`` skips the update and the step count."""
    params = [torch.ones(3) for _ in range(2)]
    for p in params:
        p.grad = torch.full((3,), 4.0)
    optimizer = entry.optimizer(params, fused=True, **entry.kwargs)
    optimizer.grad_scale, optimizer.found_inf = torch.ones(1), torch.ones(())
    optimizer.step()
    assert all(torch.equal(p, torch.ones(3)) for p in params)
    assert all(float(optimizer.state[p].get("step", 0)) == 0 for p in params)
    scaled, plain = torch.ones(3), torch.ones(3)
    scaled.grad, plain.grad = torch.full((3,), 4.0), torch.full((3,), 2.0)
    optimizer = entry.optimizer([scaled], fused=True, **entry.kwargs)
    optimizer.grad_scale, optimizer.found_inf = torch.full((1,), 2.0), torch.zeros(())
    optimizer.step()
    entry.optimizer([plain], fused=True, **entry.kwargs).step()
    torch.testing.assert_close(scaled, plain)


@pytest.mark.parametrize("entry", entries_with("capturable"), ids=str)
def test_capturable_keyword(entry: Entry) -> None:
    """capturable=True on the CPU does what torch's does: the same numbers, or an error both."""

    def outcome(cls):
        model = TinyNet()
        try:
            drive(entry, cls(list(model.parameters()), capturable=True, **entry.kwargs), model, range(3))
        except Exception as error:  # noqa: BLE001 - the outcome compared is "raised"
            return error
        return model

    ours, theirs = outcome(entry.optimizer), outcome(entry.torch_twin)
    if isinstance(theirs, Exception):
        assert isinstance(ours, Exception), f"torch raises {theirs!r}"
        return
    assert not isinstance(ours, Exception), repr(ours)
    assert_same_params(ours, theirs, rtol=1e-6, atol=1e-9)


@pytest.mark.compile
@pytest.mark.parametrize("entry", entries_with("compile"), ids=str)
def test_compiled_step_equals_eager(entry: Entry) -> None:
    """torch.compile of the step (graph breaks allowed) takes the eager steps.

    Each frame compiles at most twice (a step counter read on the host, a first step that
    only creates state, may ask for more); beyond that dynamo runs it eagerly, which keeps
    this check within seconds per optimizer on a CPU.
    """
    torch._dynamo.reset()
    eager, _ = run(entry, 3)
    model = TinyNet()
    optimizer = make(entry, model)
    compiled_step = torch.compile(optimizer.step)
    original = optimizer.step
    optimizer.step = compiled_step
    try:
        with warnings.catch_warnings(), torch._dynamo.config.patch(recompile_limit=2):
            warnings.simplefilter("ignore")
            drive(entry, optimizer, model, range(3))
    finally:
        optimizer.step = original
    # torch's own compiled Adam differs from its eager one by 1e-6 here: in the graph the
    # bias corrections are computed from float32 step counters, eagerly from Python floats.
    tolerance = entry.compile_tolerance
    assert_same_params(model, eager, rtol=tolerance, atol=tolerance / 10)


# Convergence.


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e.converge_lr is not None], ids=str)
def test_converges_to_the_minimiser_of_a_quadratic(entry: Entry) -> None:
    """f(x) = 1/2 sum_i a_i (x_i - c_i)^2 has its minimum 0 at c; every optimizer gets there."""
    curvature = torch.linspace(0.5, 2.0, 10, dtype=torch.float64)
    centre = torch.linspace(-1.0, 1.0, 10, dtype=torch.float64)
    x = torch.zeros(10, dtype=torch.float64, requires_grad=True)
    extra = {"weight_decay": 0.0} if "weight_decay" in entry.optimizer([torch.zeros(1)]).defaults else {}
    optimizer = entry.optimizer([x], lr=entry.converge_lr, **extra)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=2000)
    for _ in range(2000):
        optimizer.zero_grad()
        (0.5 * curvature * (x - centre) ** 2).sum().backward()
        optimizer.step()
        schedule.step()
    assert torch.linalg.vector_norm(x.detach() - centre) < 1e-3


def test_drives_cover_every_entry() -> None:
    """Every entry's drive moves its parameters (so no check above passes vacuously)."""
    for entry in ENTRIES:
        before = TinyNet()
        model, _ = run(entry, 2)
        assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), before.parameters())), entry.name
