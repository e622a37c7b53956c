"""Schedules: functions ``step -> value``, for learning rates (optax's ``schedule.py``).

A schedule takes the step count an update is about to use (0 for the first update) and
returns the value for that step. Given a Python int it returns a Python float (to print or
plot a schedule); given a 0-dim tensor (the count in an optimizer state) it returns a 0-dim
float64 tensor on the same device, computed with tensor ops only, so evaluating it inside a
training step never syncs with the device and compiles without graph breaks.

``scale_by_learning_rate(schedule)`` (and every alias) evaluates ``schedule(count)`` before
incrementing ``count``: the behaviour of a torch ``LRScheduler`` whose ``step()`` is called
after every ``optimizer.step()``. For schedules counted in epochs, wrap them with
:func:`per_epoch`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from ._common import check_int, check_number, make_schedule, scalar_dtype
from .base import Schedule

__all__ = [
    "constant_schedule",
    "exponential_decay",
    "step_lr",
    "piecewise_constant_schedule",
    "polynomial_schedule",
    "linear_schedule",
    "cosine_decay_schedule",
    "warmup_cosine_decay_schedule",
    "join_schedules",
    "per_epoch",
]


def constant_schedule(value: float) -> Schedule:
    """``step -> value`` (``optax.constant_schedule``; torch: no scheduler)."""
    check_number("constant_schedule", value=value)
    return make_schedule(lambda t: torch.full_like(t, value), f"constant_schedule({value})")


def exponential_decay(
    init_value: float,
    transition_steps: int,
    decay_rate: float,
    transition_begin: int = 0,
    staircase: bool = False,
    end_value: float | None = None,
) -> Schedule:
    """``init_value * decay_rate ** ((step - transition_begin) / transition_steps)`` (``optax.exponential_decay``).

    Args:
        init_value: the value up to ``transition_begin``.
        transition_steps: steps per factor of ``decay_rate`` (an int >= 1).
        decay_rate: the factor per ``transition_steps`` (>= 0; > 1 grows).
        transition_begin: steps at ``init_value`` before the decay starts.
        staircase: floor the exponent, so the value changes every ``transition_steps``
            steps: ``exponential_decay(lr, n, gamma, staircase=True)`` is torch's
            ``StepLR(step_size=n, gamma=gamma)`` stepped after every update.
        end_value: a floor (for decay) or ceiling (for growth) of the value.
    """
    where = "exponential_decay"
    check_number(where, init_value=init_value, decay_rate=decay_rate)
    check_int(where, transition_steps=transition_steps)
    check_int(where, 0, transition_begin=transition_begin)
    if decay_rate < 0:
        raise ValueError(f"{where}: decay_rate must be >= 0, got {decay_rate}")
    if end_value is not None:
        check_number(where, end_value=end_value)

    def fn(t: torch.Tensor) -> torch.Tensor:
        elapsed = t - transition_begin
        exponent = elapsed / transition_steps
        if staircase:
            exponent = torch.floor(exponent)
        value = torch.where(elapsed <= 0, init_value, init_value * torch.pow(decay_rate, exponent))
        if end_value is not None:
            value = torch.clamp(value, min=end_value) if decay_rate < 1 else torch.clamp(value, max=end_value)
        return value

    return make_schedule(fn, f"exponential_decay({init_value}, {transition_steps}, {decay_rate})")


def step_lr(init_value: float, step_size: int, gamma: float = 0.1) -> Schedule:
    """``init_value * gamma ** (step // step_size)``: torch's ``StepLR``, counted in updates.

    ``adam(step_lr(1e-3, 10, 0.5))`` is ``torch.optim.Adam(lr=1e-3)`` with
    ``StepLR(step_size=10, gamma=0.5)`` stepped after every update; for torch's usual
    once-per-epoch stepping use ``per_epoch(step_lr(1e-3, 10, 0.5), steps_per_epoch)``.
    Same as ``exponential_decay(init_value, step_size, gamma, staircase=True)``.
    """
    check_number("step_lr", init_value=init_value, gamma=gamma)
    check_int("step_lr", step_size=step_size)
    return exponential_decay(init_value, step_size, gamma, staircase=True)


def piecewise_constant_schedule(init_value: float, boundaries_and_scales: Mapping[int, float] | None = None) -> Schedule:
    """``init_value`` multiplied by ``scale`` from step ``boundary`` on, for every pair (``optax.piecewise_constant_schedule``).

    ``piecewise_constant_schedule(lr, {30: 0.1, 80: 0.1})`` is torch's
    ``MultiStepLR(milestones=[30, 80], gamma=0.1)`` stepped after every update.
    """
    where = "piecewise_constant_schedule"
    check_number(where, init_value=init_value)
    items = sorted((boundaries_and_scales or {}).items())
    for boundary, s in items:
        check_int(where, 0, boundary=boundary)
        check_number(where, scale=s)

    def fn(t: torch.Tensor) -> torch.Tensor:
        value = torch.full_like(t, init_value)
        for boundary, s in items:
            value = torch.where(t >= boundary, value * s, value)
        return value

    return make_schedule(fn, f"piecewise_constant_schedule({init_value}, {dict(items)})")


def polynomial_schedule(
    init_value: float, end_value: float, power: float, transition_steps: int, transition_begin: int = 0
) -> Schedule:
    """From ``init_value`` to ``end_value`` along ``(1 - fraction) ** power`` (``optax.polynomial_schedule``).

    The value is ``init_value`` up to ``transition_begin``, then
    ``(init_value - end_value) * (1 - k / transition_steps) ** power + end_value`` with ``k``
    the steps since ``transition_begin`` (at most ``transition_steps``), then ``end_value``.
    torch: ``PolynomialLR(total_iters=transition_steps, power=power)`` when ``end_value == 0``.
    """
    where = "polynomial_schedule"
    check_number(where, init_value=init_value, end_value=end_value, power=power)
    check_int(where, transition_steps=transition_steps)
    check_int(where, 0, transition_begin=transition_begin)

    def fn(t: torch.Tensor) -> torch.Tensor:
        k = torch.clamp(t - transition_begin, 0, transition_steps)
        return (init_value - end_value) * (1 - k / transition_steps) ** power + end_value

    return make_schedule(fn, f"polynomial_schedule({init_value}, {end_value}, {power}, {transition_steps})")


def linear_schedule(init_value: float, end_value: float, transition_steps: int, transition_begin: int = 0) -> Schedule:
    """From ``init_value`` to ``end_value`` linearly over ``transition_steps`` (``optax.linear_schedule``).

    torch: ``LinearLR(start_factor, end_factor, total_iters)`` with ``start_factor * lr =
    init_value`` and ``end_factor * lr = end_value``.
    """
    return polynomial_schedule(init_value, end_value, 1, transition_steps, transition_begin)


def cosine_decay_schedule(init_value: float, decay_steps: int, alpha: float = 0.0, exponent: float = 1.0) -> Schedule:
    """Half a cosine from ``init_value`` down to ``alpha * init_value`` over ``decay_steps`` (``optax.cosine_decay_schedule``).

    ``init_value * ((1 - alpha) * c ** exponent + alpha)`` with ``c = (1 + cos(pi * min(step,
    decay_steps) / decay_steps)) / 2``: torch's ``CosineAnnealingLR(T_max=decay_steps,
    eta_min=alpha * init_value)`` for ``exponent=1``, except that it stays at the floor after
    ``decay_steps`` where torch's goes back up.
    """
    where = "cosine_decay_schedule"
    check_number(where, init_value=init_value, alpha=alpha, exponent=exponent)
    check_int(where, decay_steps=decay_steps)

    def fn(t: torch.Tensor) -> torch.Tensor:
        k = torch.clamp(t, 0, decay_steps)
        cosine = 0.5 * (1 + torch.cos(math.pi * k / decay_steps))
        return init_value * ((1 - alpha) * cosine**exponent + alpha)

    return make_schedule(fn, f"cosine_decay_schedule({init_value}, {decay_steps}, alpha={alpha})")


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Run ``schedules[i]`` from ``boundaries[i - 1]`` on, each restarted at step 0 (``optax.join_schedules``).

    Args:
        schedules: ``len(boundaries) + 1`` schedules.
        boundaries: increasing steps where the next schedule takes over.
    """
    where = "join_schedules"
    if len(schedules) != len(boundaries) + 1:
        raise ValueError(f"{where}: needs one more schedule than boundaries, got {len(schedules)} and {len(boundaries)}")
    for b in boundaries:
        check_int(where, 0, boundary=b)
    if list(boundaries) != sorted(boundaries):
        raise ValueError(f"{where}: boundaries must be increasing, got {list(boundaries)}")

    def schedule(step: Any) -> Any:
        if not isinstance(step, torch.Tensor):
            start, chosen = 0, schedules[0]
            for b, s in zip(boundaries, schedules[1:]):
                if step >= b:
                    start, chosen = b, s
            return chosen(step - start)
        dtype = scalar_dtype(step.device)
        value = torch.as_tensor(schedules[0](step), dtype=dtype, device=step.device)
        for b, s in zip(boundaries, schedules[1:]):
            # every part is evaluated (no branch on the device); before its boundary at step 0, its own
            # first step, so a part never sees a negative step (a Python lambda may not be defined there)
            later = torch.as_tensor(s(torch.clamp(step - b, min=0)), dtype=dtype, device=step.device)
            value = torch.where(step < b, value, later)
        return value

    return schedule


def warmup_cosine_decay_schedule(
    init_value: float,
    peak_value: float,
    warmup_steps: int,
    decay_steps: int,
    end_value: float = 0.0,
    exponent: float = 1.0,
) -> Schedule:
    """Linear warmup from ``init_value`` to ``peak_value``, then cosine decay to ``end_value`` (``optax.warmup_cosine_decay_schedule``).

    ``decay_steps`` counts the whole schedule, warmup included (as in optax). torch:
    ``SequentialLR([LinearLR(...), CosineAnnealingLR(...)], milestones=[warmup_steps])``.
    """
    where = "warmup_cosine_decay_schedule"
    check_number(where, init_value=init_value, peak_value=peak_value, end_value=end_value, exponent=exponent)
    check_int(where, 0, warmup_steps=warmup_steps)
    check_int(where, 1, decay_steps=decay_steps)
    if decay_steps <= warmup_steps:
        raise ValueError(
            f"{where}: decay_steps counts the whole schedule, warmup included, so it must exceed "
            f"warmup_steps; got decay_steps={decay_steps}, warmup_steps={warmup_steps}"
        )
    alpha = 0.0 if peak_value == 0 else end_value / peak_value
    decay = cosine_decay_schedule(peak_value, decay_steps - warmup_steps, alpha, exponent)
    if warmup_steps == 0:
        return decay
    return join_schedules([linear_schedule(init_value, peak_value, warmup_steps), decay], [warmup_steps])


def per_epoch(schedule: Schedule, steps_per_epoch: int) -> Schedule:
    """A schedule over epochs as a schedule over steps: ``step -> schedule(step // steps_per_epoch)``.

    The value changes only at epoch boundaries, as with a torch ``LRScheduler`` stepped once
    per epoch: ``adam(per_epoch(step_lr(1e-3, 30, 0.1), len(loader)))`` is Adam with
    ``StepLR(step_size=30, gamma=0.1)`` and ``scheduler.step()`` after every epoch.
    """
    check_int("per_epoch", steps_per_epoch=steps_per_epoch)

    def stepped(step: Any) -> Any:
        if isinstance(step, torch.Tensor):
            return schedule(torch.div(step, steps_per_epoch, rounding_mode="floor"))
        return schedule(int(step) // steps_per_epoch)

    stepped.__name__ = stepped.__qualname__ = f"per_epoch({getattr(schedule, '__name__', 'schedule')}, {steps_per_epoch})"
    return stepped
