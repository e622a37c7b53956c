"""torch.optim objects as fnnet optimizers and schedules: :func:`from_torch`, :func:`schedule_from_torch`.

For code written the chapter's way (``torch.optim.Adam(model.parameters(), lr=0.02)`` and a
``torch.optim.lr_scheduler.StepLR`` stepped once per epoch), these build the fnnet alias and
schedule that compute the same numbers::

    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    tx = fnnet.optim.from_torch(opt, scheduler=sched, steps_per_epoch=len(dl_train))
    # tx is fnnet.optim.adam(per_epoch(step_lr(0.02, 1, 0.9), len(dl_train)))

The torch objects are read once, when converting, and never stepped or written: from then
on the fnnet optimizer's state holds everything (optax's way). Only hyperparameters are
read, never the optimizer's buffers, so convert before training (a torch optimizer that has
already taken steps converts to a fresh fnnet optimizer, not to its current state).
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections import Counter
from typing import Any, Callable

import torch
from torch.optim import lr_scheduler as _lrs

from .. import tree as _tree
from .._warnings import user_stacklevel
from ._common import check_int, make_schedule, scalar_value
from .aliases import adagrad, adam, adamw, rmsprop, sgd
from .base import GradientTransformation, Schedule, chain
from .schedules import exponential_decay, join_schedules, per_epoch, piecewise_constant_schedule, step_lr
from .transforms import masked, scale, set_to_zero

__all__ = ["TorchConversionWarning", "from_torch", "schedule_from_torch", "torch_optimizers_of"]


class TorchConversionWarning(UserWarning):
    """Issued by :func:`from_torch` to say which fnnet optimizer stands for the torch one.

    One line per conversion, e.g. ``fnnet: torch.optim.Adam(lr=0.02, betas=(0.9, 0.999),
    eps=1e-08, weight_decay=0) -> fnnet.optim.adam(0.02, b1=0.9, b2=0.999, eps=1e-08,
    weight_decay=0)``. Silence it with ``warnings.filterwarnings("ignore",
    category=fnnet.optim.TorchConversionWarning)``.
    """


# How torch runs a step: ignored, fnnet follows torch's default path (see from_torch's docstring).
_IMPLEMENTATION = frozenset({"foreach", "fused", "capturable", "differentiable"})

_BUILDING_BLOCKS = (
    "fnnet.optim's building blocks: chain(scale_by_adam(...), scale_by_learning_rate(lr)), trace (momentum), "
    "scale_by_rms, scale_by_stddev, scale_by_rss, add_decayed_weights, clip_by_global_norm, or a "
    "GradientTransformation(init, update) of your own"
)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, tuple):
        return "(" + ", ".join(_fmt(v) for v in value) + ")"
    return repr(value)


def _number(value: Any) -> Any:
    """torch allows tensors for lr and betas; fnnet's aliases take Python numbers."""
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, tuple):
        return tuple(_number(v) for v in value)
    return value


def _unsupported(cls: str, what: str, instead: str) -> ValueError:
    return ValueError(f"from_torch: torch.optim.{cls}({what}) has no fnnet equivalent: {instead}")


# -- one converter per optimizer class: torch's hyperparameters -> (alias, its arguments) --------------


def _sgd(h: dict) -> tuple[Callable, dict]:
    if h["dampening"] != 0:
        raise _unsupported("SGD", f"dampening={h['dampening']!r}", "fnnet.optim.sgd has dampening=0 (torch's "
                           "default); build torch.optim.SGD(..., dampening=0), or pass fnnet.optim.sgd(lr, momentum) "
                           "directly")
    return sgd, {"momentum": h["momentum"], "nesterov": h["nesterov"], "weight_decay": h["weight_decay"]}


def _adam_like(cls: str, h: dict) -> tuple[Callable, dict]:
    if h.get("amsgrad", False):
        raise _unsupported(cls, "amsgrad=True", f"build torch.optim.{cls}(..., amsgrad=False), or write AMSGrad with "
                           f"{_BUILDING_BLOCKS}")
    b1, b2 = h["betas"]
    kwargs = {"b1": b1, "b2": b2, "eps": h["eps"], "weight_decay": h["weight_decay"]}
    return (adamw if h.get("decoupled_weight_decay", cls == "AdamW") else adam), kwargs


def _rmsprop(h: dict) -> tuple[Callable, dict]:
    return rmsprop, {"alpha": h["alpha"], "eps": h["eps"], "weight_decay": h["weight_decay"],
                     "momentum": h["momentum"], "centered": h["centered"]}


def _adagrad(h: dict) -> tuple[Callable, dict]:
    return adagrad, {"lr_decay": h["lr_decay"], "weight_decay": h["weight_decay"],
                     "initial_accumulator_value": h["initial_accumulator_value"], "eps": h["eps"]}


# class -> (converter, the torch options it reads besides lr and maximize)
_CONVERTERS: dict[type, tuple[Callable[[dict], tuple[Callable, dict]], tuple[str, ...]]] = {
    torch.optim.SGD: (_sgd, ("momentum", "dampening", "weight_decay", "nesterov")),
    torch.optim.Adam: (lambda h: _adam_like("Adam", h), ("betas", "eps", "weight_decay", "amsgrad", "decoupled_weight_decay")),
    torch.optim.AdamW: (lambda h: _adam_like("AdamW", h), ("betas", "eps", "weight_decay", "amsgrad", "decoupled_weight_decay")),
    torch.optim.RMSprop: (_rmsprop, ("alpha", "eps", "weight_decay", "momentum", "centered")),
    torch.optim.Adagrad: (_adagrad, ("lr_decay", "weight_decay", "initial_accumulator_value", "eps")),
}
_SUPPORTED = ", ".join(f"torch.optim.{c.__name__}" for c in _CONVERTERS)


def _hyperparameters(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The options of ``optimizer``'s param groups, which must all agree (fnnet's aliases have one set)."""
    cls = type(optimizer).__name__
    known = _CONVERTERS[type(optimizer)][1]
    options = set(optimizer.defaults)  # what the class takes; param groups may hold schedulers' bookkeeping too
    unknown = sorted(options - set(known) - _IMPLEMENTATION - {"lr", "maximize"})
    if unknown:
        raise ValueError(f"from_torch: torch.optim.{cls} has options fnnet does not know: {unknown} (a torch newer "
                         "than fnnet's converter?); pass the fnnet alias directly: fnnet.optim.sgd, adam, adamw, "
                         "rmsprop or adagrad, which take torch.optim's arguments")
    groups = [{k: _number(g[k]) for k in sorted(options - _IMPLEMENTATION) if k in g} for g in optimizer.param_groups]
    if not groups:
        raise ValueError(f"from_torch: the torch.optim.{cls} has no param groups")
    for i, g in enumerate(groups[1:], start=1):
        differ = [k for k in g if g[k] != groups[0].get(k)]
        if differ:
            pairs = ", ".join(f"{k}: {_fmt(groups[0].get(k))} vs {_fmt(g[k])}" for k in differ)
            raise ValueError(
                f"from_torch: param groups 0 and {i} of the torch.optim.{cls} differ ({pairs}); an fnnet alias has one "
                f"set of hyperparameters. Write one alias per group with fnnet.optim.masked over the params' key paths, "
                f"e.g. chain(masked(adam(1e-4), {{'backbone': True, 'head': False}}), masked(adam(1e-3), "
                f"{{'backbone': False, 'head': True}}))"
            )
    return groups[0]


# -- schedulers ---------------------------------------------------------------------------------------

_SCHEDULERS = ("StepLR, ExponentialLR, MultiStepLR, CosineAnnealingLR, LambdaLR, OneCycleLR, and SequentialLR or "
               "ChainedScheduler of these")


def _same_over_groups(values: list[Any], what: str, scheduler: Any) -> Any:
    if any(v != values[0] for v in values[1:]):
        raise ValueError(
            f"schedule_from_torch: the {type(scheduler).__name__}'s param groups have different {what} ({values}); "
            "an fnnet optimizer has one learning rate. Use one fnnet alias per group with fnnet.optim.masked, "
            "each with its own schedule"
        )
    return values[0]


def _named(schedule: Schedule, name: str) -> Schedule:
    schedule.__name__ = schedule.__qualname__ = name
    return schedule


def _cosine_annealing(base: float, t_max: int, eta_min: float, name: str) -> Schedule:
    # Not cosine_decay_schedule: torch's CosineAnnealingLR does not stop at T_max, it goes back up
    # (period 2 * T_max), and so does this closed form of its recursion.
    return make_schedule(lambda t: eta_min + (base - eta_min) * (1 + torch.cos(math.pi * t / t_max)) / 2, name)


def _lambda(base: float, fn: Callable[[int], float], name: str) -> Schedule:
    def schedule(step: Any) -> Any:
        # The lambda is user code written for Python ints (as torch calls it), so the step is read on
        # the host: free on CPU, a sync per evaluation on an accelerator, a graph break under compile.
        value = base * float(fn(int(step)))
        if isinstance(step, torch.Tensor):
            return scalar_value(value, step.device)
        return value

    return _named(schedule, name)


def _one_cycle(scheduler: Any, name: str) -> Schedule:
    if scheduler.cycle_momentum:
        raise ValueError(
            "schedule_from_torch: OneCycleLR(cycle_momentum=True) (torch's default) also cycles the optimizer's "
            "momentum (beta1 for Adam) between base_momentum and max_momentum at every step, which fnnet's "
            "optimizers hold constant; build it with cycle_momentum=False to get torch's numbers exactly"
        )
    anneal_kind = getattr(scheduler, "_anneal_func_type", None)
    schedule_phases = getattr(scheduler, "_schedule_phases", None)
    if anneal_kind not in ("cos", "linear") or not schedule_phases:  # torch's private fields: fail loudly if they move
        raise TypeError("schedule_from_torch: this torch's OneCycleLR does not expose its phases as fnnet expects; "
                        "write the schedule with fnnet.optim.join_schedules of linear_schedule / cosine_decay_schedule")
    groups = scheduler.optimizer.param_groups
    phases = [
        (float(p["end_step"]),
         _same_over_groups([g[p["start_lr"]] for g in groups], p["start_lr"], scheduler),
         _same_over_groups([g[p["end_lr"]] for g in groups], p["end_lr"], scheduler))
        for p in schedule_phases
    ]
    total = scheduler.total_steps
    cosine = anneal_kind == "cos"

    def anneal(start: float, end: float, pct: torch.Tensor) -> torch.Tensor:
        if cosine:
            return end + (start - end) / 2.0 * (torch.cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    starts = [0.0] + [end for end, _, _ in phases[:-1]]

    def fn(t: torch.Tensor) -> torch.Tensor:
        # torch raises after total_steps scheduler steps; past that, keep the last value it defines.
        t = torch.clamp(t, max=total)
        value = anneal(phases[-1][1], phases[-1][2], (t - starts[-1]) / (phases[-1][0] - starts[-1]))
        for (end, lo, hi), start in zip(reversed(phases[:-1]), reversed(starts[:-1])):  # the first phase that holds t wins
            value = torch.where(t <= end, anneal(lo, hi, (t - start) / (end - start)), value)
        return value

    return make_schedule(fn, name)


def _check_scheduler(scheduler: Any, where: str) -> None:
    """A single torch ``LRScheduler``, or a ``TypeError`` that says what to pass instead."""
    if isinstance(scheduler, (list, tuple)):
        raise TypeError(
            f"{where}: expected one torch scheduler, got a {type(scheduler).__name__} of {len(scheduler)}; combine "
            "them as torch does: torch.optim.lr_scheduler.SequentialLR(optimizer, [a, b], milestones=[...]) (one "
            "after the other) or ChainedScheduler([a, b]) (all at once), which fnnet converts where their parts convert"
        )
    if isinstance(scheduler, _lrs.ReduceLROnPlateau):
        raise TypeError(
            f"{where}: ReduceLROnPlateau follows a monitored value, not the step count, so it is no "
            "schedule; use the callback fnnet.callbacks.ReduceLROnPlateau(monitor='val_loss', ...) (or pass the torch "
            "object in the Trainer's callbacks=, which converts it)"
        )
    if not isinstance(scheduler, _lrs.LRScheduler):
        raise TypeError(f"{where}: expected a torch.optim.lr_scheduler object ({_SCHEDULERS}), "
                        f"got {type(scheduler).__name__}")


def _parts(scheduler: Any) -> list[Any]:
    parts = getattr(scheduler, "_schedulers", None)  # torch's private field: fail loudly if it moves
    if not isinstance(parts, (list, tuple)) or not parts:
        raise TypeError(f"schedule_from_torch: this torch's {type(scheduler).__name__} does not expose its schedulers "
                        "as fnnet expects; write the schedule with fnnet.optim.join_schedules")
    return list(parts)


def _epoch_or_step_schedule(scheduler: Any, where: str = "schedule_from_torch") -> tuple[Schedule, bool]:
    """``(schedule, per_step)``: the schedule counted in ``scheduler.step()`` calls, and whether torch steps it per update."""
    _check_scheduler(scheduler, where)
    # A ChainedScheduler has no counter of its own: its parts count (a SequentialLR resets its parts' counters).
    counters = ([s.last_epoch for s in _parts(scheduler)] if isinstance(scheduler, _lrs.ChainedScheduler)
                else [scheduler.last_epoch])
    if any(c != 0 for c in counters):
        raise ValueError(
            f"{where}: this {type(scheduler).__name__} has been stepped {max(counters)} time(s); pass a fresh one (an "
            "fnnet schedule counts from the optimizer state's own step 0, and a resumed Trainer from its epoch count)"
        )
    return _convert(scheduler)


# A ChainedScheduler is the product of its parts' schedules when each part multiplies the learning rate
# the others left by its own factor; CosineAnnealingLR's and LambdaLR's steps do not.
_MULTIPLICATIVE = (_lrs.StepLR, _lrs.MultiStepLR, _lrs.ExponentialLR)


def _convert_part(composite: Any, index: int, part: Any, base: float | None = None) -> tuple[Schedule, bool]:
    outer, kind = type(composite).__name__, type(part).__name__
    if isinstance(part, (_lrs.SequentialLR, _lrs.ChainedScheduler)):
        raise TypeError(f"schedule_from_torch: a {kind} inside a {outer} (part {index}): fnnet converts one level; "
                        f"put the inner {kind}'s schedulers in the {outer} itself, or write the schedule with "
                        "fnnet.optim.join_schedules")
    try:
        return _convert(part, base)
    except (TypeError, ValueError) as err:
        raise type(err)(f"schedule_from_torch: {outer} part {index} ({kind}): "
                        + str(err).removeprefix("schedule_from_torch: ")) from None


def _sequential(scheduler: Any) -> tuple[Schedule, bool]:
    # torch steps the part of the current interval, and at a milestone restarts the next part at 0
    # (its closed form at epoch 0): join_schedules' "each restarted at step 0".
    converted = [_convert_part(scheduler, i, s) for i, s in enumerate(_parts(scheduler))]
    if len({per_step for _, per_step in converted}) > 1:
        raise TypeError("schedule_from_torch: this SequentialLR mixes OneCycleLR, which torch steps after every "
                        "update, with schedulers stepped once per epoch; write the schedule with "
                        "fnnet.optim.join_schedules in one unit (updates)")
    milestones = [int(m) for m in scheduler._milestones]
    schedules = [s for s, _ in converted]
    name = f"join_schedules([{', '.join(s.__name__ for s in schedules)}], {milestones})"
    return _named(join_schedules(schedules, milestones), name), converted[0][1]


def _chained(scheduler: Any) -> tuple[Schedule, bool]:
    parts = _parts(scheduler)
    if len(parts) == 1:
        return _convert_part(scheduler, 0, parts[0])
    for i, s in enumerate(parts):
        if type(s) not in _MULTIPLICATIVE:
            raise TypeError(
                f"schedule_from_torch: ChainedScheduler part {i} is a {type(s).__name__}: each part of a "
                "ChainedScheduler rescales the learning rate the parts before it left, which is the product of their "
                f"schedules only for {', '.join(c.__name__ for c in _MULTIPLICATIVE)}; chain only those, or write "
                "the schedule as a function step -> lr"
            )
    base = float(_same_over_groups(list(parts[0].base_lrs), "initial learning rates", scheduler))
    factors = [_convert_part(scheduler, i, s, base=1.0)[0] for i, s in enumerate(parts)]

    def fn(t: torch.Tensor) -> torch.Tensor:
        value = torch.full_like(t, base)
        for factor in factors:
            value = value * factor(t)
        return value

    return make_schedule(fn, f"{base!r} * " + " * ".join(f.__name__ for f in factors)), False


def _convert(scheduler: Any, base: float | None = None) -> tuple[Schedule, bool]:
    """The conversion of a scheduler, whatever its counter; ``base`` replaces its initial learning rate."""
    t = type(scheduler)
    if t is _lrs.SequentialLR:
        return _sequential(scheduler)
    if t is _lrs.ChainedScheduler:
        return _chained(scheduler)
    kind = t.__name__
    if base is None:
        base = float(_same_over_groups(list(scheduler.base_lrs), "initial learning rates", scheduler))
    if t is _lrs.StepLR:
        name = f"step_lr({base!r}, {scheduler.step_size}, {scheduler.gamma!r})"
        return _named(step_lr(base, scheduler.step_size, scheduler.gamma), name), False
    if t is _lrs.ExponentialLR:
        name = f"exponential_decay({base!r}, 1, {scheduler.gamma!r})"
        return _named(exponential_decay(base, 1, scheduler.gamma), name), False
    if t is _lrs.MultiStepLR:
        # milestones is a Counter: a milestone given twice decays twice, as in torch
        scales = {int(m): scheduler.gamma ** n for m, n in sorted(scheduler.milestones.items())}
        name = f"piecewise_constant_schedule({base!r}, {scales!r})"
        return _named(piecewise_constant_schedule(base, scales), name), False
    if t is _lrs.CosineAnnealingLR:
        name = f"schedule_from_torch(CosineAnnealingLR(T_max={scheduler.T_max}, eta_min={scheduler.eta_min!r}), lr={base!r})"
        return _cosine_annealing(base, scheduler.T_max, float(scheduler.eta_min), name), False
    if t is _lrs.LambdaLR:
        fn = _same_over_groups(list(scheduler.lr_lambdas), "lr_lambda functions", scheduler)
        return _lambda(base, fn, f"schedule_from_torch(LambdaLR({getattr(fn, '__name__', 'lr_lambda')}), lr={base!r})"), False
    if t is _lrs.OneCycleLR:
        return _one_cycle(scheduler, f"schedule_from_torch(OneCycleLR(total_steps={scheduler.total_steps}))"), True
    raise TypeError(
        f"schedule_from_torch: no conversion of torch.optim.lr_scheduler.{kind} (supported: {_SCHEDULERS}); write "
        "the fnnet schedule: linear_schedule (LinearLR), polynomial_schedule (PolynomialLR), cosine_decay_schedule, "
        "warmup_cosine_decay_schedule, join_schedules (SequentialLR), piecewise_constant_schedule, or any "
        "function step -> lr, wrapped in per_epoch(schedule, steps_per_epoch) for once-per-epoch stepping"
    )


def schedule_from_torch(scheduler: Any, steps_per_epoch: int | None = None) -> Schedule:
    """The fnnet schedule (``step -> lr``) of a torch learning-rate scheduler.

    ``StepLR``, ``ExponentialLR``, ``MultiStepLR``, ``CosineAnnealingLR``, ``LambdaLR`` and
    ``OneCycleLR`` are converted; the schedule's value at every optimizer update is the
    learning rate torch uses there (to rounding: torch computes most schedules by recursion,
    fnnet in closed form). So are the combinations of these: ``SequentialLR`` becomes
    :func:`join_schedules` of its parts at its milestones (torch restarts each part at 0 there),
    and ``ChainedScheduler`` the product of its parts' schedules when each part is a ``StepLR``,
    ``MultiStepLR`` or ``ExponentialLR`` (any convertible one alone), the only parts whose steps
    multiply the learning rate the others left.

    Args:
        scheduler: a fresh ``torch.optim.lr_scheduler`` object (not stepped yet); its initial
            learning rate is the optimizer's ``lr`` when the scheduler was built.
        steps_per_epoch: the optimizer updates per epoch, for schedulers stepped once per epoch
            (the chapter's ``scheduler.step()`` after each epoch): the result is
            ``per_epoch(schedule, steps_per_epoch)``, counted in updates, ready for an alias.
            Without it the schedule counts ``scheduler.step()`` calls, i.e. epochs: what
            ``fnnet.callbacks.LearningRateSchedule(schedule, interval="epoch")`` takes.
            ``OneCycleLR`` is stepped after every update in torch, so its schedule always
            counts updates and ``steps_per_epoch`` is not used.

    Returns:
        A schedule as in :mod:`fnnet.optim.schedules`: a Python float for an int step, a 0-dim
        float64 tensor (tensor math only) for a tensor step. ``LambdaLR``'s lambda is Python
        code written for ints, so for a tensor step the count is read on the host (free on CPU;
        on an accelerator prefer the callback route, which calls it once per epoch). Past
        ``OneCycleLR``'s ``total_steps`` (where torch raises) the value stays at the last one
        torch defines; ``CosineAnnealingLR`` goes back up after ``T_max`` as torch's does.

    Raises:
        TypeError: not a scheduler (a list of them: combine them with ``SequentialLR`` or
            ``ChainedScheduler``), ``ReduceLROnPlateau`` (a callback:
            ``fnnet.callbacks.ReduceLROnPlateau``), or a scheduler with no conversion (the
            message names the fnnet schedule to write instead; for a part of a ``SequentialLR``
            or ``ChainedScheduler``, which part): a ``ChainedScheduler`` of a part other than
            ``StepLR``, ``MultiStepLR``, ``ExponentialLR``, a composite inside a composite, a
            ``SequentialLR`` mixing ``OneCycleLR`` with per-epoch parts.
        ValueError: the scheduler was already stepped; its param groups start from different
            learning rates; ``OneCycleLR(cycle_momentum=True)`` (fnnet's momentum is constant:
            build it with ``cycle_momentum=False``); a bad ``steps_per_epoch``.
    """
    schedule, per_step = _epoch_or_step_schedule(scheduler)
    if steps_per_epoch is None or per_step:
        if steps_per_epoch is not None:
            check_int("schedule_from_torch", steps_per_epoch=steps_per_epoch)
        return schedule
    check_int("schedule_from_torch", steps_per_epoch=steps_per_epoch)
    return per_epoch(schedule, steps_per_epoch)


# -- the optimizer -----------------------------------------------------------------------------------


def from_torch(
    optimizer: torch.optim.Optimizer,
    *,
    scheduler: Any = None,
    steps_per_epoch: int | None = None,
    module: torch.nn.Module | None = None,
) -> GradientTransformation:
    """The fnnet alias that computes what ``optimizer`` computes, from its hyperparameters.

    ``torch.optim.SGD`` -> :func:`sgd` (momentum, nesterov, weight_decay; ``dampening=0``),
    ``Adam`` -> :func:`adam` (:func:`adamw` when ``decoupled_weight_decay=True``), ``AdamW`` ->
    :func:`adamw`, ``RMSprop`` -> :func:`rmsprop`, ``Adagrad`` -> :func:`adagrad`; their parameter
    trajectories equal torch.optim's (tested in float64 to 1e-10). ``maximize=True`` becomes
    ``chain(scale(-1.0), alias)``, torch's negated gradients. ``foreach``, ``fused``,
    ``capturable`` and ``differentiable`` say how torch runs a step and are ignored: fnnet
    computes what torch's default path computes (``foreach=False`` gives the same numbers).
    Some of the others round differently: ``Adam(differentiable=True)`` computes its bias
    corrections from a float32 step tensor, and after 100 steps (lr 0.01, float64) its
    parameters differ from the default path's, and fnnet's, by up to 6e-7 (fnnet's differ
    from the default path's by 1e-15). Each call issues one :class:`TorchConversionWarning` naming the alias built,
    e.g. ``fnnet: torch.optim.Adam(lr=0.02, ...) -> fnnet.optim.adam(0.02, ...)``.

    Args:
        optimizer: the torch optimizer; read, never stepped or modified. Its current ``lr`` is
            the constant learning rate, unless ``scheduler`` is given.
        scheduler: one fresh ``torch.optim.lr_scheduler`` object built on ``optimizer`` (several:
            combine them with ``SequentialLR`` or ``ChainedScheduler``): the alias's learning
            rate is then :func:`schedule_from_torch` of it.
        steps_per_epoch: updates per epoch, needed with a scheduler torch steps once per epoch
            (all but ``OneCycleLR``): the chapter's ``scheduler.step()`` after each epoch.
        module: the ``nn.Module`` whose ``named_parameters()`` the fnnet optimizer will be
            initialised with (what the ``Trainer`` trains). Its parameters that ``optimizer``
            does not hold are then left alone, as torch.optim leaves them (``masked`` with
            ``set_to_zero``). Without it the fnnet optimizer moves every parameter it is given, so
            its ``init`` refuses params with a tensor the torch optimizer does not hold (matched
            by shape: ``from_torch(torch.optim.Adam(net[0].parameters()))`` initialised with all
            of ``net``'s parameters is a ``ValueError`` that asks for ``module=net``).

    Returns:
        A :class:`GradientTransformation` whose state holds the learning rate: constant (so
        ``set_learning_rate`` and learning-rate callbacks can change it) or the schedule.

    Raises:
        TypeError: ``optimizer`` is not one of the five classes (``LBFGS``, ``Adamax``, a
            subclass...): the message names fnnet's building blocks to write it with.
        ValueError: an option fnnet has no equivalent for (``amsgrad=True``, ``dampening != 0``),
            param groups with different hyperparameters (write ``masked`` per group), a
            scheduler on another optimizer or without the ``steps_per_epoch`` it needs, or a
            ``module`` that lacks tensors the optimizer holds; at ``init`` without ``module``,
            params the optimizer does not hold (see ``module``). See also
            :func:`schedule_from_torch`.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"from_torch: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    cls = type(optimizer)
    if cls not in _CONVERTERS:
        sub = next((c for c in _CONVERTERS if isinstance(optimizer, c)), None)
        why = (f"a subclass of torch.optim.{sub.__name__} may compute something else" if sub is not None
               else f"fnnet has no equivalent of torch.optim.{cls.__name__}")
        raise TypeError(f"from_torch: {why} (supported: {_SUPPORTED}); write it with {_BUILDING_BLOCKS}")
    h = _hyperparameters(optimizer)
    alias, kwargs = _CONVERTERS[cls][0](h)
    flags = ("amsgrad", "decoupled_weight_decay", "maximize")  # shown when they are on
    shown = [k for k in ("lr", *_CONVERTERS[cls][1], "maximize") if k in h and (k not in flags or h[k])]
    torch_args = ", ".join(f"{k}={_fmt(h[k])}" for k in shown)
    described = f"torch.optim.{cls.__name__}({torch_args})"

    learning_rate: Any = float(h["lr"])
    lr_text = _fmt(learning_rate)
    if scheduler is not None:
        _check_scheduler(scheduler, "from_torch")
        if scheduler.optimizer is not optimizer:
            raise ValueError("from_torch: the scheduler was built on another optimizer than the one given; build it on "
                             "this one (torch.optim.lr_scheduler.StepLR(optimizer, ...))")
        learning_rate, per_step = _epoch_or_step_schedule(scheduler, "from_torch")
        if per_step:
            described += f" with {type(scheduler).__name__} stepped after every update"
        else:
            if steps_per_epoch is None:
                raise ValueError(
                    f"from_torch: a {type(scheduler).__name__} is stepped once per epoch (the chapter's "
                    "scheduler.step() after each epoch), so the schedule needs steps_per_epoch=len(train_loader); or "
                    "convert the optimizer alone and pass the scheduler to the Trainer in callbacks=, which counts "
                    "epochs itself"
                )
            check_int("from_torch", steps_per_epoch=steps_per_epoch)
            learning_rate = per_epoch(learning_rate, steps_per_epoch)
            described += f" with {type(scheduler).__name__} stepped once per epoch of {steps_per_epoch} updates"
        lr_text = learning_rate.__name__
    elif steps_per_epoch is not None:
        raise ValueError("from_torch: steps_per_epoch is only used with a scheduler; pass scheduler= too, or leave it out")

    tx = alias(learning_rate, **kwargs)
    built = f"fnnet.optim.{alias.__name__}({lr_text}, {', '.join(f'{k}={_fmt(v)}' for k, v in kwargs.items())})"
    if h.get("maximize", False):
        tx = chain(scale(-1.0), tx)
        built = f"chain(scale(-1.0), {built})"
    if module is not None:
        tx, note = _restrict_to_held(tx, optimizer, module)
        built += note
    else:
        tx = _refusing_unheld(tx, optimizer)
    warnings.warn(f"fnnet: {described} -> {built}", TorchConversionWarning, stacklevel=user_stacklevel())
    _CONVERTED_FROM[tx.update] = weakref.ref(optimizer)
    return tx


# The torch optimizer each from_torch result stands for, keyed by its update function; weak both
# ways, so neither keeps the other alive. Read by torch_optimizers_of.
_CONVERTED_FROM: weakref.WeakKeyDictionary[Callable, weakref.ref] = weakref.WeakKeyDictionary()


def torch_optimizers_of(tx: GradientTransformation) -> list[torch.optim.Optimizer]:
    """The torch optimizers that :func:`from_torch` converted into ``tx``, or into a transformation it wraps.

    ``tx`` itself, and the transformations ``chain``, ``masked`` and other combinators hold
    (found through their functions' closures: ``masked(from_torch(opt), mask)``, as the
    ``Trainer`` builds for frozen parameters, gives ``[opt]``). What a torch scheduler in the
    ``Trainer``'s ``callbacks=`` is checked against: it must be built on one of these.

    Returns:
        The optimizers in the order found, each once; ``[]`` for an optimizer written with
        fnnet's aliases (or whose torch optimizer no longer exists).
    """
    found: list[torch.optim.Optimizer] = []
    seen: set[int] = set()

    def visit(obj: Any) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, GradientTransformation):
            source = _CONVERTED_FROM.get(obj.update, lambda: None)()
            if source is not None and not any(source is f for f in found):
                found.append(source)
            visit(obj.update)
        elif isinstance(obj, (tuple, list)):
            for item in obj:
                visit(item)
        elif callable(obj) and getattr(obj, "__closure__", None):
            for cell in obj.__closure__:
                try:
                    visit(cell.cell_contents)
                except ValueError:  # a cell not filled yet
                    pass

    visit(tx)
    return found


def _restrict_to_held(tx: GradientTransformation, optimizer: torch.optim.Optimizer,
                      module: torch.nn.Module) -> tuple[GradientTransformation, str]:
    """``tx`` on the module's parameters that ``optimizer`` holds; the others stay where they are."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"from_torch: module must be an nn.Module, got {type(module).__name__}")
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    named = dict(module.named_parameters())
    stray = held - {id(p) for p in named.values()}
    if stray:
        raise ValueError(f"from_torch: the optimizer holds {len(stray)} tensor(s) that are not parameters of the "
                         f"{type(module).__name__} given as module; build the optimizer on module.parameters() (or a "
                         "subset of them)")
    holds = {name: id(p) in held for name, p in named.items()}
    if all(holds.values()):
        return tx, ""

    def flags(tree: Any, value: bool) -> Any:
        # By key path, so the mask fits the module's parameters and any part of them (the
        # Trainer masks out frozen ones before this optimizer sees the rest).
        leaves, spec = _tree.flatten(tree)
        paths = _tree.paths(tree)
        strangers = [p for p in paths if p not in holds]
        if strangers:
            raise ValueError(f"from_torch: the params hold {strangers[:3]}, which are not parameters of the "
                             f"{type(module).__name__} given as module (its named_parameters() are "
                             f"{list(holds)[:3]}...); initialise with dict(module.named_parameters())")
        return _tree.unflatten(spec, [holds[p] == value for p in paths])

    note = f", on the {sum(holds.values())} of {len(holds)} parameter tensors it holds (the others are left alone)"
    return chain(masked(tx, lambda tree: flags(tree, True)), masked(set_to_zero(), lambda tree: flags(tree, False))), note


def _refusing_unheld(tx: GradientTransformation, optimizer: torch.optim.Optimizer) -> GradientTransformation:
    """``tx``, whose ``init`` refuses params with a tensor ``optimizer`` cannot hold.

    Without ``module=`` the tensors are not the optimizer's own (the caller's params are
    copies), so they are matched by shape: every leaf needs a held tensor of its shape. An
    optimizer on part of a network then fails here instead of moving the whole network.
    """
    cls = type(optimizer).__name__
    held = Counter(tuple(p.shape) for g in optimizer.param_groups for p in g["params"])

    def init(params: Any) -> Any:
        given = Counter(tuple(getattr(leaf, "shape", ())) for leaf in _tree.leaves(params))
        unheld = given - held
        if unheld:
            raise ValueError(
                f"from_torch: the torch.optim.{cls} holds {sum(held.values())} parameter tensors, but the fnnet "
                f"optimizer is initialised with {sum(given.values())}, and {sum(unheld.values())} of them (shapes "
                f"{sorted(unheld.elements())}) have no tensor of their shape in it. torch.optim moves only the "
                "tensors it holds; this optimizer would move every one it is given. Pass module=net (the nn.Module "
                "whose named_parameters() you train) to leave the others alone, or build the torch optimizer on "
                "all of them"
            )
        return tx.init(params)

    return GradientTransformation(init, tx.update)

