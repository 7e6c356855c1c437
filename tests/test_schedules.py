"""Schedules against closed forms and torch's own schedulers; the ScheduleLR adaptor and resume."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose

import gradwise.optim
from gradwise.schedules import (
    SCHEDULE_OPTIONS,
    SCHEDULES,
    ScheduleLR,
    area_under,
    constant,
    cosine,
    cosine_with_restarts,
    join_schedules,
    linear_decay,
    linear_warmup,
    make_schedule,
    wsd,
)

FLOORS = [0.0, 0.1, 0.5]


def values(schedule, steps):
    return [schedule(step) for step in steps]


# --- warmup ---------------------------------------------------------------------------


def test_linear_warmup_rises_as_s_plus_one_over_w_then_holds():
    assert values(linear_warmup(4), range(7)) == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]


def test_zero_warmup_is_the_peak_from_the_first_step():
    assert values(linear_warmup(0), range(3)) == [1.0, 1.0, 1.0]
    assert cosine(100)(0) == 1.0


@pytest.mark.parametrize("name", ["linear_warmup", "cosine", "linear_decay", "wsd", "cosine_with_restarts"])
def test_every_schedule_but_constant_starts_with_the_same_warmup(name):
    schedule = make_schedule(name, total_steps=200, warmup_steps=8, T_0=50)
    assert values(schedule, range(9)) == pytest.approx([(step + 1) / 8 for step in range(8)] + [1.0])


def test_constant_is_one_everywhere_and_takes_no_warmup():
    assert values(constant(), [0, 1, 10**9]) == [1.0, 1.0, 1.0]
    assert make_schedule("constant", total_steps=100, warmup_steps=10)(0) == 1.0


# --- cosine ---------------------------------------------------------------------------


@pytest.mark.parametrize("floor", FLOORS)
def test_cosine_midpoint_endpoints_and_hold(floor):
    schedule = cosine(total_steps=1000, warmup_steps=100, floor=floor)
    assert schedule(100) == 1.0
    assert schedule(550) == pytest.approx((1 + floor) / 2, abs=1e-15)  # halfway through the decay
    assert schedule(100 + 900 // 4) == pytest.approx(floor + (1 - floor) * (1 + math.sqrt(0.5)) / 2)
    assert schedule(999) == pytest.approx(floor + (1 - floor) * (1 + math.cos(math.pi * 899 / 900)) / 2)
    assert schedule(1000) == floor
    assert schedule(10**6) == floor


@pytest.mark.parametrize("floor", FLOORS)
def test_cosine_matches_torch_cosine_annealing(floor):
    peak, total = 0.5, 60
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=peak)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total, eta_min=floor * peak)
    expected = []
    for _ in range(total + 1):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        reference.step()
    assert [peak * value for value in values(cosine(total, floor=floor), range(total + 1))] == pytest.approx(
        expected, rel=1e-9, abs=1e-12
    )


# --- linear decay ---------------------------------------------------------------------


@pytest.mark.parametrize("floor", FLOORS)
def test_linear_decay_closed_form(floor):
    schedule = linear_decay(total_steps=500, warmup_steps=100, floor=floor)
    assert schedule(100) == 1.0
    assert schedule(200) == pytest.approx(floor + (1 - floor) * 0.75)
    assert schedule(300) == pytest.approx((1 + floor) / 2)
    assert schedule(500) == floor
    assert schedule(501) == floor


def test_linear_decay_matches_torch_linear_lr():
    total, floor = 40, 0.2
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    reference = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=floor, total_iters=total)
    expected = []
    for _ in range(total + 5):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        reference.step()
    assert values(linear_decay(total, floor=floor), range(total + 5)) == pytest.approx(expected, rel=1e-9)


# --- warmup-stable-decay --------------------------------------------------------------


@pytest.mark.parametrize("tail", ["linear", "1-sqrt"])
@pytest.mark.parametrize("floor", FLOORS)
def test_wsd_plateau_is_the_peak_until_the_tail(tail, floor):
    schedule = wsd(total_steps=1000, warmup_steps=100, decay_fraction=0.2, tail=tail, floor=floor)
    assert set(values(schedule, range(100, 801))) == {1.0}
    assert schedule(801) < 1.0
    assert schedule(1000) == floor
    assert schedule(5000) == floor


@pytest.mark.parametrize("floor", FLOORS)
@pytest.mark.parametrize(
    ("tail", "step", "shape"),
    [
        ("linear", 850, 0.75),
        ("linear", 900, 0.5),
        ("linear", 950, 0.25),
        ("1-sqrt", 850, 0.5),  # progress 1/4, 1 - sqrt(1/4)
        ("1-sqrt", 832, 0.6),  # progress 4/25
        ("1-sqrt", 962, 0.1),  # progress 81/100
    ],
)
def test_wsd_tail_closed_form(floor, tail, step, shape):
    schedule = wsd(total_steps=1000, warmup_steps=100, decay_fraction=0.2, tail=tail, floor=floor)
    assert schedule(step) == pytest.approx(floor + (1 - floor) * shape)


def test_wsd_tail_length_is_a_fraction_of_all_steps_including_warmup():
    schedule = wsd(total_steps=200, warmup_steps=50, decay_fraction=0.25)
    assert schedule(149) == 1.0
    assert schedule(150) == 1.0  # first step of the 50-step tail, progress 0
    assert schedule(175) == 0.5


def test_wsd_with_no_tail_holds_the_peak_to_the_end():
    schedule = wsd(total_steps=100, warmup_steps=10, decay_fraction=0.0, floor=0.3)
    assert set(values(schedule, range(10, 100))) == {1.0}
    assert schedule(100) == 0.3


def test_wsd_tail_may_fill_everything_after_warmup():
    schedule = wsd(total_steps=100, warmup_steps=20, decay_fraction=0.8)
    assert schedule(20) == 1.0
    assert schedule(60) == 0.5


# --- cosine with warm restarts --------------------------------------------------------


@pytest.mark.parametrize("floor", FLOORS)
def test_restarts_at_10_30_70_for_T0_10_and_T_mult_2(floor):
    schedule = cosine_with_restarts(T_0=10, T_mult=2, floor=floor)
    for start, length in [(0, 10), (10, 20), (30, 40), (70, 80)]:
        assert schedule(start) == 1.0
        assert schedule(start + length // 2) == pytest.approx((1 + floor) / 2)
        last = floor + (1 - floor) * (1 + math.cos(math.pi * (length - 1) / length)) / 2
        assert schedule(start + length - 1) == pytest.approx(last)
        assert schedule(start + length - 1) < schedule(start + length - 2)


def test_restarts_with_T_mult_1_are_periodic_and_warmup_shifts_them():
    periodic = cosine_with_restarts(T_0=7)
    assert values(periodic, range(7)) * 3 == values(periodic, range(21))
    warmed = cosine_with_restarts(T_0=10, T_mult=2, warmup_steps=5)
    assert values(warmed, [5, 15, 35, 75]) == [1.0, 1.0, 1.0, 1.0]
    assert warmed(4) == 1.0 and warmed(0) == 0.2


@pytest.mark.parametrize(("T_0", "T_mult"), [(5, 1), (4, 2), (3, 3)])
def test_restarts_match_torch_cosine_annealing_warm_restarts(T_0, T_mult):
    peak, floor, steps = 2.0, 0.1, 150
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=peak)
    reference = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        optimizer, T_0=T_0, T_mult=T_mult, eta_min=floor * peak
    )
    expected = []
    for _ in range(steps):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        reference.step()
    schedule = cosine_with_restarts(T_0, T_mult, floor=floor)
    assert [peak * value for value in values(schedule, range(steps))] == pytest.approx(expected, rel=1e-9)


# --- properties of every schedule -----------------------------------------------------


@st.composite
def schedule_settings(draw):
    total = draw(st.integers(1, 3000))
    warmup = draw(st.integers(0, total))
    return {
        "name": draw(st.sampled_from(sorted(SCHEDULES))),
        "total_steps": total,
        "warmup_steps": warmup,
        "floor": draw(st.floats(0.0, 1.0)),
        "decay_fraction": draw(st.floats(0.0, (total - warmup) / total)),
        "tail": draw(st.sampled_from(["linear", "1-sqrt"])),
        "T_0": draw(st.integers(1, 500)),
        "T_mult": draw(st.integers(1, 4)),
    }


@settings(max_examples=300, deadline=None)
@given(config=schedule_settings(), position=st.floats(0.0, 3.0))
def test_every_schedule_stays_between_floor_and_peak(config, position):
    name, total, warmup, floor = config["name"], config["total_steps"], config["warmup_steps"], config["floor"]
    schedule = make_schedule(**config)
    step = int(position * total)
    value = schedule(step)
    assert isinstance(value, float)
    assert 0.0 <= value <= 1.0
    if name == "constant":
        assert value == 1.0
    elif step < warmup:
        assert value == pytest.approx((step + 1) / warmup)
    else:
        assert floor <= value
    if step >= total and name in ("cosine", "linear_decay", "wsd"):
        assert value == floor


@settings(max_examples=100, deadline=None)
@given(config=schedule_settings())
def test_decays_never_increase_after_warmup_and_warmup_never_decreases(config):
    # constant has no warmup, and the restarts rise again by design: check their neighbours.
    config["name"] = {"constant": "linear_warmup", "cosine_with_restarts": "cosine"}.get(config["name"], config["name"])
    schedule = make_schedule(**config)
    total, warmup = config["total_steps"], config["warmup_steps"]
    curve = values(schedule, range(total + 2))
    rise, fall = curve[:warmup], curve[max(warmup - 1, 0) :]
    assert all(a < b for a, b in zip(rise, rise[1:]))
    assert all(a >= b for a, b in zip(fall, fall[1:]))


# --- composition and the registry -----------------------------------------------------


def test_join_schedules_runs_each_piece_on_its_own_clock():
    joined = join_schedules([linear_warmup(4), linear_decay(10), constant()], [2, 7])
    assert values(joined, range(9)) == [0.25, 0.5, 1.0, 0.9, 0.8, 0.7, 0.6, 1.0, 1.0]


def test_join_schedules_rejects_bad_boundaries():
    with pytest.raises(ValueError, match="one more schedule than boundaries"):
        join_schedules([constant(), constant()], [1, 2])
    with pytest.raises(ValueError, match=r"boundaries\[1\]"):
        join_schedules([constant()] * 3, [5, 3])


def test_make_schedule_builds_what_the_factories_build():
    made = make_schedule("wsd", 300, 30, decay_fraction=0.1, tail="1-sqrt", floor=0.1, T_0=9)
    direct = wsd(300, 30, decay_fraction=0.1, tail="1-sqrt", floor=0.1)
    assert values(made, range(320)) == values(direct, range(320))
    restarts = make_schedule("cosine_with_restarts", 300, 30, T_0=9, T_mult=2, floor=0.2, tail="linear")
    assert values(restarts, range(320)) == values(cosine_with_restarts(9, 2, 0.2, 30), range(320))
    assert set(SCHEDULE_OPTIONS) == {"floor", "decay_fraction", "tail", "T_0", "T_mult"}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: make_schedule("cosin", 100), "schedule must be one of .*'cosin'"),
        (lambda: make_schedule("cosine", 100, flor=0.1), "schedule option must be one of .*'flor'"),
        (lambda: make_schedule("cosine_with_restarts", 100), "needs the option T_0"),
        (lambda: make_schedule("constant", 100, 101), r"warmup_steps must be an integer in \[0, 100\], got 101"),
    ],
)
def test_make_schedule_rejects_bad_names_and_options(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize(
    ("factory", "kwargs", "parameter"),
    [
        (cosine, {"total_steps": 0}, "total_steps"),
        (cosine, {"total_steps": 10.0}, "total_steps"),
        (cosine, {"total_steps": 10, "warmup_steps": 11}, "warmup_steps"),
        (cosine, {"total_steps": 10, "warmup_steps": -1}, "warmup_steps"),
        (cosine, {"total_steps": 10, "floor": 1.5}, "floor"),
        (linear_decay, {"total_steps": 10, "floor": -0.1}, "floor"),
        (linear_decay, {"total_steps": 10, "floor": math.nan}, "floor"),
        (linear_warmup, {"warmup_steps": -3}, "warmup_steps"),
        (wsd, {"total_steps": 10, "decay_fraction": 1.5}, "decay_fraction"),
        (wsd, {"total_steps": 10, "decay_fraction": -0.1}, "decay_fraction"),
        (wsd, {"total_steps": 10, "warmup_steps": 5, "decay_fraction": 0.6}, "decay_fraction"),
        (wsd, {"total_steps": 10, "tail": "sqrt"}, "tail"),
        (cosine_with_restarts, {"T_0": 0}, "T_0"),
        (cosine_with_restarts, {"T_0": 10, "T_mult": 0}, "T_mult"),
        (cosine_with_restarts, {"T_0": 10, "T_mult": 1.5}, "T_mult"),
        (cosine_with_restarts, {"T_0": 10, "floor": 2}, "floor"),
    ],
)
def test_invalid_arguments_raise_value_error_naming_the_parameter(factory, kwargs, parameter):
    with pytest.raises(ValueError, match=rf"^{parameter} must be .*got"):
        factory(**kwargs)


@pytest.mark.parametrize("step", [-1, 2.0, True])
def test_steps_must_be_non_negative_integers(step):
    with pytest.raises(ValueError, match="^step must be"):
        cosine(10, warmup_steps=2)(step)


# --- area under the curve -------------------------------------------------------------


@pytest.mark.parametrize("total", [1, 2, 7, 1000])
def test_area_under_closed_forms(total):
    peak = 3e-4
    assert area_under(constant(), total, peak) == pytest.approx(total * peak)
    # sum_{s<T} (s+1)/T = (T+1)/2, and both sum_{s<T} (1 + cos(pi s/T))/2 and sum_{s<T} (1 - s/T) are (T+1)/2 too.
    assert area_under(linear_warmup(total), total, peak) == pytest.approx((total + 1) / 2 * peak)
    assert area_under(cosine(total), total, peak) == pytest.approx((total + 1) / 2 * peak)
    assert area_under(linear_decay(total), total, peak) == pytest.approx((total + 1) / 2 * peak)


def test_area_under_wsd_is_warmup_plus_plateau_plus_tail():
    # warmup (1+...+10)/10, plateau 80 steps, linear tail sum_{k<10} (1 - k/10) = 5.5
    assert area_under(wsd(100, 10, decay_fraction=0.1), 100, 1.0) == pytest.approx(5.5 + 80 + 5.5)


def test_area_under_validates_its_arguments():
    with pytest.raises(ValueError, match="^peak must be >= 0"):
        area_under(constant(), 10, -1.0)
    with pytest.raises(ValueError, match="^total_steps must be"):
        area_under(constant(), 0, 1.0)


# --- the ScheduleLR adaptor -----------------------------------------------------------


def lr_sequence(optimizer, scheduler, steps):
    """The lr of every group at each of ``steps`` optimizer steps, stepping the scheduler after each."""
    sequence = []
    for _ in range(steps):
        sequence.append([float(group["lr"]) for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return sequence


OPTIMIZERS = [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, gradwise.optim.AdamW, gradwise.optim.Lion]


@pytest.mark.parametrize("optimizer_class", OPTIMIZERS)
def test_schedule_lr_sets_peak_times_multiplier(optimizer_class):
    schedule = wsd(total_steps=50, warmup_steps=5, decay_fraction=0.4, tail="1-sqrt", floor=0.1)
    optimizer = optimizer_class([torch.nn.Parameter(torch.ones(3))], lr=0.02)
    scheduler = ScheduleLR(optimizer, schedule)
    sequence = lr_sequence(optimizer, scheduler, 60)
    assert_allclose(sequence, [[0.02 * schedule(step)] for step in range(60)], rtol=1e-12)
    assert scheduler.get_last_lr() == pytest.approx([0.02 * schedule(60)])


def test_schedule_lr_scales_each_param_group_from_its_own_lr():
    schedule = cosine(total_steps=30, warmup_steps=3, floor=0.05)
    groups = [
        {"params": [torch.nn.Parameter(torch.ones(2))], "lr": 0.1},
        {"params": [torch.nn.Parameter(torch.ones(2))], "lr": 0.003},
        {"params": [torch.nn.Parameter(torch.ones(2))]},
    ]
    optimizer = torch.optim.SGD(groups, lr=1.0, momentum=0.9)
    sequence = lr_sequence(optimizer, ScheduleLR(optimizer, schedule), 35)
    expected = [[base * schedule(step) for base in (0.1, 0.003, 1.0)] for step in range(35)]
    assert_allclose(sequence, expected, rtol=1e-12)


def test_schedule_lr_agrees_with_lambda_lr_and_keeps_tensor_lrs_tensors():
    schedule = cosine_with_restarts(T_0=4, T_mult=2, warmup_steps=2)
    ours = torch.optim.Adam([torch.nn.Parameter(torch.ones(2))], lr=torch.tensor(0.01))
    theirs = torch.optim.Adam([torch.nn.Parameter(torch.ones(2))], lr=torch.tensor(0.01))
    our_sequence = lr_sequence(ours, ScheduleLR(ours, schedule), 40)
    their_sequence = lr_sequence(theirs, torch.optim.lr_scheduler.LambdaLR(theirs, schedule), 40)
    assert our_sequence == their_sequence
    assert isinstance(ours.param_groups[0]["lr"], torch.Tensor)


def test_schedule_lr_needs_a_callable():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with pytest.raises(TypeError, match="schedule must be a callable"):
        ScheduleLR(optimizer, 0.5)


def make_run(schedule, optimizer_class=torch.optim.AdamW):
    """A model, an optimizer with two groups and a scheduler, identical on every call."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = optimizer_class(
        [{"params": model[0].parameters(), "lr": 1e-2}, {"params": model[2].parameters(), "lr": 3e-3}]
    )
    return model, optimizer, ScheduleLR(optimizer, schedule)


def train(model, optimizer, scheduler, steps, start):
    """Train ``steps`` steps on data fixed by the step number; return the lrs used."""
    used = []
    for step in range(start, start + steps):
        generator = torch.Generator().manual_seed(step)
        inputs = torch.randn(16, 4, generator=generator)
        loss = (model(inputs).squeeze(1) - inputs.sum(1)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        used.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return used


@pytest.mark.parametrize("optimizer_class", [torch.optim.AdamW, gradwise.optim.Lion])
@pytest.mark.parametrize("load_optimizer", [True, False])
def test_resume_from_state_dict_gives_the_identical_run(tmp_path, load_optimizer, optimizer_class):
    def schedule():
        return wsd(total_steps=60, warmup_steps=10, decay_fraction=0.3, tail="1-sqrt")

    model, optimizer, scheduler = make_run(schedule(), optimizer_class)
    uninterrupted = train(model, optimizer, scheduler, 70, start=0)
    final_weights = [parameter.detach().clone() for parameter in model.parameters()]

    model, optimizer, scheduler = make_run(schedule(), optimizer_class)
    first_part = train(model, optimizer, scheduler, 37, start=0)
    path = tmp_path / "checkpoint.pt"
    torch.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, path
    )

    checkpoint = torch.load(path)  # weights_only=True: the scheduler state holds no functions
    model, optimizer, scheduler = make_run(schedule(), optimizer_class)
    model.load_state_dict(checkpoint["model"])
    if load_optimizer:
        optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    second_part = train(model, optimizer, scheduler, 33, start=37)

    assert first_part + second_part == uninterrupted
    if load_optimizer:
        for parameter, expected in zip(model.parameters(), final_weights):
            torch.testing.assert_close(parameter.detach(), expected, rtol=0, atol=0)


def test_resume_with_a_different_schedule_is_refused():
    model, optimizer, scheduler = make_run(cosine(total_steps=100, warmup_steps=10))
    train(model, optimizer, scheduler, 40, start=0)
    state = scheduler.state_dict()
    _, _, fresh_scheduler = make_run(cosine(total_steps=200, warmup_steps=10))
    with pytest.raises(ValueError, match="build the scheduler with the schedule it was saved with"):
        fresh_scheduler.load_state_dict(state)
    assert fresh_scheduler.last_epoch == 0


@pytest.mark.parametrize("lr", [0.02, torch.tensor(0.02)], ids=["float", "tensor"])
def test_schedule_lr_rescale_scales_every_later_lr(lr):
    schedule = cosine(total_steps=40, warmup_steps=4, floor=0.1)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=lr)
    scheduler = ScheduleLR(optimizer, schedule)
    before = lr_sequence(optimizer, scheduler, 10)
    group_lr = optimizer.param_groups[0]["lr"]
    scheduler.rescale(0.25)
    if isinstance(lr, torch.Tensor):
        assert optimizer.param_groups[0]["lr"] is group_lr  # a tensor lr is scaled in place
    after = lr_sequence(optimizer, scheduler, 30)
    assert_allclose(before + after, [[0.02 * schedule(s) * (1 if s < 10 else 0.25)] for s in range(40)], rtol=1e-6)
    assert scheduler.get_last_lr() == pytest.approx([0.02 * 0.25 * schedule(40)])
    assert float(optimizer.param_groups[0]["initial_lr"]) == pytest.approx(0.005)
    for factor in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="^factor must be"):
            scheduler.rescale(factor)


def test_schedule_lr_rescheduled_load_takes_the_lr_of_the_new_schedule():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    scheduler = ScheduleLR(optimizer, cosine(total_steps=20, warmup_steps=2))
    lr_sequence(optimizer, scheduler, 8)
    state = scheduler.state_dict()
    longer = cosine(total_steps=50, warmup_steps=2)
    resumed_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    resumed = ScheduleLR(resumed_optimizer, longer)
    with pytest.raises(ValueError, match="build the scheduler with the schedule"):
        resumed.load_state_dict(state)
    resumed.load_state_dict(state, rescheduled=True)
    assert resumed.last_epoch == 8 and resumed_optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * longer(8))
    assert resumed.get_last_lr() == pytest.approx([0.1 * longer(8)])
