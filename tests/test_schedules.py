"""fnnet.optim schedules: values, torch LRScheduler and optax parity, tensor/int agreement, errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import fnnet.optim as O

SCHEDULES = {
    "constant": lambda: O.constant_schedule(0.3),
    "exp": lambda: O.exponential_decay(0.1, 7, 0.8),
    "exp_staircase_begin_end": lambda: O.exponential_decay(0.1, 5, 0.5, transition_begin=4, staircase=True, end_value=0.01),
    "exp_growth_capped": lambda: O.exponential_decay(0.01, 3, 2.0, end_value=0.5),
    "step_lr": lambda: O.step_lr(0.1, 10, 0.5),
    "piecewise": lambda: O.piecewise_constant_schedule(1.0, {5: 0.5, 20: 0.1}),
    "polynomial": lambda: O.polynomial_schedule(1.0, 0.1, 2.0, 30, transition_begin=5),
    "linear": lambda: O.linear_schedule(0.0, 1.0, 20),
    "cosine": lambda: O.cosine_decay_schedule(0.5, 40, alpha=0.1),
    "cosine_exponent": lambda: O.cosine_decay_schedule(0.5, 40, exponent=2.0),
    "warmup_cosine": lambda: O.warmup_cosine_decay_schedule(0.0, 1.0, 10, 50, end_value=0.05),
    "warmup0_cosine": lambda: O.warmup_cosine_decay_schedule(0.0, 1.0, 0, 50),
    "join": lambda: O.join_schedules([O.constant_schedule(1.0), O.linear_schedule(1.0, 0.0, 10)], [15]),
    "per_epoch": lambda: O.per_epoch(O.step_lr(0.1, 2, 0.5), 7),
}


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(sorted(SCHEDULES)), step=st.integers(0, 200))
def test_int_and_tensor_steps_agree(name, step):
    schedule = SCHEDULES[name]()
    as_int = schedule(step)
    as_tensor = schedule(torch.tensor(step))
    assert isinstance(as_int, float)
    assert isinstance(as_tensor, torch.Tensor) and as_tensor.ndim == 0 and as_tensor.dtype == torch.float64
    assert as_tensor.device == torch.device("cpu")
    assert math.isfinite(as_int)
    assert as_int == float(as_tensor)


def _torch_lrs(make_sched, steps, lr=1.0):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = make_sched(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def _ours(schedule, steps):
    return [schedule(i) for i in range(steps)]


def _close(a, b, rel=1e-12):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert math.isclose(x, y, rel_tol=rel, abs_tol=1e-15), f"step {i}: {x} != {y}"


def test_step_lr_and_staircase_exponential_decay_match_torch_step_lr():
    theirs = _torch_lrs(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=10, gamma=0.5), 55, lr=0.1)
    _close(_ours(O.step_lr(0.1, 10, 0.5), 55), theirs)
    _close(_ours(O.exponential_decay(0.1, 10, 0.5, staircase=True), 55), theirs)
    # gamma=0.1 is not a power of two: torch multiplies step by step, we take a power
    theirs = _torch_lrs(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.1), 20, lr=0.1)
    _close(_ours(O.step_lr(0.1, 3, 0.1), 20), theirs)


def test_exponential_decay_matches_exponential_lr():
    theirs = _torch_lrs(lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9), 40, lr=0.2)
    _close(_ours(O.exponential_decay(0.2, 1, 0.9), 40), theirs)


def test_piecewise_constant_matches_multistep_lr():
    theirs = _torch_lrs(lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[5, 12], gamma=0.1), 20, lr=1.0)
    _close(_ours(O.piecewise_constant_schedule(1.0, {5: 0.1, 12: 0.1}), 20), theirs)


def test_linear_matches_linear_lr():
    theirs = _torch_lrs(lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.25, end_factor=1.0, total_iters=8), 15, lr=0.4)
    _close(_ours(O.linear_schedule(0.1, 0.4, 8), 15), theirs, rel=1e-9)


def test_polynomial_matches_polynomial_lr():
    theirs = _torch_lrs(lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=12, power=2.0), 16, lr=0.5)
    _close(_ours(O.polynomial_schedule(0.5, 0.0, 2.0, 12), 16), theirs, rel=1e-9)


def test_cosine_matches_cosine_annealing_lr_within_decay_steps():
    theirs = _torch_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=30, eta_min=0.01), 31, lr=0.1)
    _close(_ours(O.cosine_decay_schedule(0.1, 30, alpha=0.1), 31), theirs, rel=1e-9)
    # after decay_steps fnnet (like optax) stays at the floor
    assert O.cosine_decay_schedule(0.1, 30, alpha=0.1)(45) == pytest.approx(0.01)


def test_warmup_cosine_shape():
    s = O.warmup_cosine_decay_schedule(0.01, 1.0, 10, 50, end_value=0.05)
    assert s(0) == pytest.approx(0.01)
    assert s(5) == pytest.approx(0.01 + 0.5 * 0.99)
    assert s(10) == pytest.approx(1.0)
    assert s(30) == pytest.approx(0.05 + 0.95 * 0.5)
    assert s(50) == pytest.approx(0.05) and s(80) == pytest.approx(0.05)
    values = _ours(s, 60)
    assert all(b >= a for a, b in zip(values[:10], values[1:11]))
    assert all(b <= a for a, b in zip(values[10:], values[11:]))


def test_per_epoch_changes_only_at_epoch_boundaries():
    s = O.per_epoch(O.step_lr(1.0, 2, 0.5), 3)
    assert _ours(s, 13) == [1.0] * 6 + [0.5] * 6 + [0.25]
    assert float(s(torch.tensor(7))) == 0.5


def test_join_schedules_restarts_each_part():
    s = O.join_schedules([O.constant_schedule(2.0), O.linear_schedule(1.0, 0.0, 4), O.constant_schedule(7.0)], [3, 9])
    assert _ours(s, 11) == [2.0, 2.0, 2.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0, 7.0, 7.0]
    assert [float(s(torch.tensor(i))) for i in range(11)] == _ours(s, 11)


@pytest.mark.parametrize(
    "name, ours, theirs",
    [
        ("constant", lambda: O.constant_schedule(0.3), lambda o: o.constant_schedule(0.3)),
        ("exp", lambda: O.exponential_decay(0.1, 7, 0.8), lambda o: o.exponential_decay(0.1, 7, 0.8)),
        (
            "exp_all",
            lambda: O.exponential_decay(0.1, 5, 0.5, transition_begin=4, staircase=True, end_value=0.01),
            lambda o: o.exponential_decay(0.1, 5, 0.5, transition_begin=4, staircase=True, end_value=0.01),
        ),
        ("piecewise", lambda: O.piecewise_constant_schedule(1.0, {5: 0.5, 20: 0.1}), lambda o: o.piecewise_constant_schedule(1.0, {5: 0.5, 20: 0.1})),
        ("polynomial", lambda: O.polynomial_schedule(1.0, 0.1, 2.0, 30, 5), lambda o: o.polynomial_schedule(1.0, 0.1, 2.0, 30, 5)),
        ("linear", lambda: O.linear_schedule(0.0, 1.0, 20), lambda o: o.linear_schedule(0.0, 1.0, 20)),
        ("cosine", lambda: O.cosine_decay_schedule(0.5, 40, 0.1, 2.0), lambda o: o.cosine_decay_schedule(0.5, 40, 0.1, 2.0)),
        (
            "warmup_cosine",
            lambda: O.warmup_cosine_decay_schedule(0.0, 1.0, 10, 50, 0.05),
            lambda o: o.warmup_cosine_decay_schedule(0.0, 1.0, 10, 50, 0.05),
        ),
    ],
)
def test_matches_optax_schedules(name, ours, theirs):
    pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    s, ref = ours(), theirs(optax)
    for step in range(70):
        assert float(s(step)) == pytest.approx(float(ref(step)), rel=1e-5, abs=1e-7), f"{name} at step {step}"


@pytest.mark.parametrize(
    "make",
    [
        lambda: O.exponential_decay(0.1, 0, 0.5),
        lambda: O.exponential_decay(0.1, 10, -0.5),
        lambda: O.exponential_decay(float("nan"), 10, 0.5),
        lambda: O.step_lr(0.1, 0),
        lambda: O.step_lr(0.1, 2.5, 0.1),
        lambda: O.constant_schedule(float("inf")),
        lambda: O.piecewise_constant_schedule(1.0, {-1: 0.5}),
        lambda: O.linear_schedule(1.0, 0.0, 0),
        lambda: O.cosine_decay_schedule(1.0, 0),
        lambda: O.warmup_cosine_decay_schedule(0.0, 1.0, 10, 10),
        lambda: O.join_schedules([O.constant_schedule(1.0)], [3]),
        lambda: O.join_schedules([O.constant_schedule(1.0)] * 3, [5, 3]),
        lambda: O.per_epoch(O.constant_schedule(1.0), 0),
    ],
)
def test_bad_arguments(make):
    with pytest.raises(ValueError):
        make()


def test_schedules_compile_without_graph_breaks():
    torch._dynamo.reset()
    schedules = [make() for make in SCHEDULES.values()]

    def all_values(step):
        return torch.stack([s(step) for s in schedules])

    step = torch.tensor(23)
    compiled = torch.compile(all_values, backend="eager", fullgraph=True)
    assert torch.equal(compiled(step), all_values(step))
