"""Gradient transformations: the building blocks that aliases chain together.

Each function returns a :class:`~fnnet.optim.GradientTransformation`; its state is a small
NamedTuple (``ScaleByAdamState(count, mu, nu)``), as in optax's ``transform.py``. The math
is done with ``torch._foreach_*`` ops on leaf lists grouped by device and dtype (on CPU, in
cache-sized chunks; see ``_foreach.py``). With ``donate=True`` the ops write into the donated
grads and state (the updates come back in the gradient buffers); otherwise they allocate and
the inputs are left untouched.

Two building blocks, :func:`scale_by_adam` and :func:`trace`, take an optional
``learning_rate``: then they also multiply by ``-learning_rate`` inside their own pass over
memory, which is ``chain(block, scale_by_learning_rate(learning_rate))`` with one pass fewer
(the ``adam`` and ``sgd`` aliases use it). Nothing else is fused; :func:`~fnnet.optim.chain`
is optax's plain loop.

Nothing here syncs with an accelerator or branches on a tensor's value in Python (step
counts are 0-dim tensors and bias corrections are tensor math on them), so a whole training
step, optimizer included, can be compiled by ``torch.compile``. (On CPU, outside
``torch.compile``, counters and scales are read as Python numbers, which is free there and is
what torch.optim does: Adam then folds its output scale into its denominator.)
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import optree
import torch

from .. import tree as _tree
from . import _common as C
from . import _foreach as F
from .base import (
    EmptyState,
    GradientTransformation,
    OptState,
    Params,
    ScalarOrSchedule,
    ScaleByLearningRateState,
    ScaleByScheduleState,
    Shards,
    Updates,
    global_sum,
    update_with,
)

__all__ = [
    "ScaleByAdamState",
    "ScaleByRmsState",
    "ScaleByRStdDevState",
    "ScaleByRssState",
    "TraceState",
    "MaskedState",
    "MultiStepsState",
    "scale",
    "scale_by_learning_rate",
    "scale_by_adam",
    "scale_by_rms",
    "scale_by_stddev",
    "scale_by_rss",
    "trace",
    "add_decayed_weights",
    "clip_by_global_norm",
    "clip",
    "set_to_zero",
    "masked",
    "multi_steps",
]

Mask = Any  # a pytree of bools, a prefix of the params' structure, or a callable params -> such a tree


# -- states -----------------------------------------------------------------------------------


class ScaleByAdamState(NamedTuple):
    """``count``: updates done (0-dim int64); ``mu``, ``nu``: first and second moments (params' tree)."""

    count: torch.Tensor
    mu: Updates
    nu: Updates


class ScaleByRmsState(NamedTuple):
    """``nu``: the moving average of squared gradients (torch: ``square_avg``)."""

    nu: Updates


class ScaleByRStdDevState(NamedTuple):
    """``mu``, ``nu``: moving averages of gradients and squared gradients (torch: ``grad_avg``, ``square_avg``)."""

    mu: Updates
    nu: Updates


class ScaleByRssState(NamedTuple):
    """``sum_of_squares``: the running sum of squared gradients (torch: Adagrad's ``sum``)."""

    sum_of_squares: Updates


class TraceState(NamedTuple):
    """``trace``: the momentum buffer (torch: ``momentum_buffer``)."""

    trace: Updates


class MaskedState(NamedTuple):
    """``inner_state``: the state of the masked transformation, over the selected leaves only."""

    inner_state: OptState


class MultiStepsState(NamedTuple):
    """State of :func:`multi_steps`.

    Attributes:
        mini_step: 0-dim int64, micro-batches accumulated since the last real update.
        gradient_step: 0-dim int64, real updates done by the inner transformation.
        inner_state: the inner transformation's state.
        acc_grads: the sum of the gradients accumulated since the last real update.
    """

    mini_step: torch.Tensor
    gradient_step: torch.Tensor
    inner_state: OptState
    acc_grads: Updates


# -- helpers ----------------------------------------------------------------------------------


def _stateless(update: Callable[[Updates, Params | None, bool], Updates]) -> GradientTransformation:
    """A transformation with no state from ``update(updates, params, donate) -> updates`` (``optax.stateless``)."""

    def update_fn(updates: Updates, state: EmptyState, params: Params | None = None, *, donate: bool = False):
        return update(updates, params, donate), state

    return GradientTransformation(C.init_empty, update_fn)


def _map_updates(updates: Updates, fn: Callable[[list[torch.Tensor]], list[torch.Tensor]]) -> Updates:
    """Apply a stateless foreach function to the leaves of ``updates``."""
    leaves, spec = _tree.flatten(updates)
    (out,) = F.grouped(lambda _, u: (fn(u),), [leaves], (None,))
    return _tree.unflatten(spec, out)


def _scale_updates(updates: Updates, factor: torch.Tensor | float, donate: bool) -> Updates:
    leaves, spec = _tree.flatten(updates)
    (out,) = F.grouped(lambda s, u: (F.mul(u, s[0], donate),), [leaves], (None,), scalars=(factor,))
    return _tree.unflatten(spec, out)


def _factor(sign: float, lr: torch.Tensor, count: torch.Tensor) -> torch.Tensor | float:
    """``sign * lr``: a Python float where reading ``lr`` is free (CPU, eager), else a tensor.

    A Python scalar spares a tensor op here and in every op that multiplies by it (foreach
    ops take it directly); torch.optim's own numbers are Python floats too.
    """
    if lr.is_cpu and not lr.requires_grad and C.can_branch(count):  # keep a learned rate's gradient
        return sign * lr.item()
    return sign * lr


# -- the learning rate ------------------------------------------------------------------------

LearningRateStage = tuple[Callable[[Params], Any], Callable[[Any], tuple[Any, Any]]]


def _learning_rate_stage(learning_rate: ScalarOrSchedule, sign: float, where: str) -> LearningRateStage:
    """``(init, factor)`` of a learning-rate stage: ``factor(state) -> (sign * lr, next state)``.

    Shared by :func:`scale_by_learning_rate` and the fused ``learning_rate=`` of
    :func:`scale_by_adam` and :func:`trace`, so the learning rate lives in one kind of state.
    """
    if callable(learning_rate):
        schedule = learning_rate

        def evaluate(count: torch.Tensor) -> torch.Tensor:
            value = schedule(count)
            try:
                C.check_learning_rate(value, where)
            except ValueError as err:
                step = f" at step {int(count)}" if C.can_branch(count) else ""
                raise ValueError(f"{err} (the schedule's value{step})") from None
            return C.scalar_value(value, count.device)

        def init_schedule(params: Params) -> ScaleByScheduleState:
            count = C.count(params, where)
            lr = evaluate(count)
            # One device sync at init (not per step): checks schedule(0) on accelerators too.
            C.check_learning_rate(lr.cpu(), f"{where}: schedule(0)")
            return ScaleByScheduleState(count=count, learning_rate=lr)

        def scheduled(state: ScaleByScheduleState) -> tuple[Any, ScaleByScheduleState]:
            lr = evaluate(state.count)
            return _factor(sign, lr, state.count), ScaleByScheduleState(count=state.count + 1, learning_rate=lr)

        return init_schedule, scheduled

    C.check_learning_rate(learning_rate, where)

    def init(params: Params) -> ScaleByLearningRateState:
        count = C.count(params, where)
        return ScaleByLearningRateState(count=count, learning_rate=C.scalar_value(learning_rate, count.device))

    def constant(state: ScaleByLearningRateState) -> tuple[Any, ScaleByLearningRateState]:
        lr = state.learning_rate
        return _factor(sign, lr, state.count), ScaleByLearningRateState(count=state.count + 1, learning_rate=lr)

    return init, constant


Kernel = Callable[[Updates, Any, bool, Any], tuple[Updates, Any]]


def _with_learning_rate(init: Callable[[Params], Any], kernel: Kernel, learning_rate: ScalarOrSchedule | None,
                        where: str) -> GradientTransformation:
    """The transformation of ``kernel(updates, state, donate, factor)``, optionally fused with a learning rate.

    Without ``learning_rate`` the kernel runs with ``factor=None``. With it, the state is
    ``(state, learning-rate state)``, what ``chain(block, scale_by_learning_rate(lr))`` holds,
    and the kernel multiplies its output by ``-lr`` in its own pass.
    """
    if learning_rate is None:

        def update(updates: Updates, state: Any, params: Params | None = None, *, donate: bool = False):
            del params
            return kernel(updates, state, donate, None)

        return GradientTransformation(init, update)

    lr_init, lr_factor = _learning_rate_stage(learning_rate, -1.0, where)

    def fused_init(params: Params) -> tuple[Any, Any]:
        return init(params), lr_init(params)

    def fused_update(updates: Updates, state: Any, params: Params | None = None, *, donate: bool = False):
        del params
        if not (isinstance(state, tuple) and len(state) == 2 and not hasattr(state, "_fields")):
            raise ValueError(f"{where}(..., learning_rate=...): expected its state, a pair (state, learning-rate "
                             f"state) as init returned, got {type(state).__name__}")
        inner, lr_state = state
        factor, lr_state = lr_factor(lr_state)
        updates, inner = kernel(updates, inner, donate, factor)
        return updates, (inner, lr_state)

    return GradientTransformation(fused_init, fused_update)


# -- scaling ----------------------------------------------------------------------------------


def scale(step_size: float) -> GradientTransformation:
    """Multiply updates by a constant: ``u -> step_size * u`` (``optax.scale``).

    Args:
        step_size: a finite float (negative to turn a descent direction into a step).

    Returns:
        A stateless :class:`GradientTransformation` (state ``EmptyState()``).
    """
    C.check_number("scale", step_size=step_size)
    return _stateless(lambda updates, params, donate: _scale_updates(updates, step_size, donate))


def scale_by_learning_rate(learning_rate: ScalarOrSchedule, *, flip_sign: bool = True) -> GradientTransformation:
    """Multiply updates by ``-learning_rate`` (``optax.scale_by_learning_rate``).

    The learning rate lives in the state, so a trainer can log it
    (:func:`~fnnet.optim.get_learning_rate`) and, when it is constant, change it
    (:func:`~fnnet.optim.set_learning_rate`): fnnet's counterpart of
    ``optax.inject_hyperparams`` and of ``param_group["lr"]`` in torch.optim.

    Args:
        learning_rate: a float (or 0-dim tensor), or a schedule ``step -> value`` evaluated
            at the step count before it is incremented: the first update uses
            ``schedule(0)``, like a torch ``LRScheduler`` stepped after every update.
        flip_sign: multiply by ``-learning_rate`` (descent, the default) or ``+learning_rate``.

    Returns:
        A :class:`GradientTransformation` whose state is ``ScaleByLearningRateState(count,
        learning_rate)`` for a constant or ``ScaleByScheduleState(count, learning_rate)`` for
        a schedule (``learning_rate`` = the value of the last update).

    Raises:
        TypeError: a learning rate that is not a number, a 0-dim tensor or a callable.
        ValueError: a negative or non-finite learning rate, from a constant, or from a
            schedule at ``init`` (``schedule(0)``) and at every update where checking needs no
            device sync: when the value is a Python number or a CPU tensor outside
            ``torch.compile``. On an accelerator only ``schedule(0)`` is checked, so a
            per-step check never waits for the device.
    """
    init, factor_of = _learning_rate_stage(learning_rate, -1.0 if flip_sign else 1.0, "scale_by_learning_rate")

    def update(updates: Updates, state: Any, params: Params | None = None, *, donate: bool = False):
        del params
        factor, state = factor_of(state)
        return _scale_updates(updates, factor, donate), state

    return GradientTransformation(init, update)


# -- adaptive scalings ------------------------------------------------------------------------


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0, *,
                  learning_rate: ScalarOrSchedule | None = None) -> GradientTransformation:
    """Rescale updates by Adam's bias-corrected moment estimates (``optax.scale_by_adam``).

    With ``t`` the update number (1, 2, ...)::

        mu = b1 * mu + (1 - b1) * g            nu = b2 * nu + (1 - b2) * g**2
        u  = (mu / (1 - b1**t)) / (sqrt(nu / (1 - b2**t) + eps_root) + eps)

    ``chain(scale_by_adam(b1, b2, eps), scale_by_learning_rate(lr))`` is
    ``torch.optim.Adam(lr=lr, betas=(b1, b2), eps=eps)``; the bias corrections are Python
    floats on CPU (as torch's) and float64 tensor math elsewhere.

    Args:
        b1, b2: decay rates of the first and second moments, in [0, 1).
        eps: added to the denominator outside the square root (torch's and optax's ``eps``).
        eps_root: added inside the square root (optax's ``eps_root``; torch has none).
        learning_rate: if given, also multiply by ``-learning_rate`` in the same pass: the
            numbers of ``chain(scale_by_adam(...), scale_by_learning_rate(learning_rate))``
            (up to the last bit), with one pass over memory fewer. The state is then the pair
            ``(ScaleByAdamState, learning-rate state)`` that chain would hold.

    Returns:
        A :class:`GradientTransformation` with state ``ScaleByAdamState(count, mu, nu)``;
        ``mu`` and ``nu`` have the params' structure, dtypes and devices.
    """
    where = "scale_by_adam"
    C.check_decay(where, b1=b1, b2=b2)
    C.check_nonneg(where, eps=eps, eps_root=eps_root)

    def init(params: Params) -> ScaleByAdamState:
        return ScaleByAdamState(count=C.count(params, where), mu=C.zeros_tree(params, where), nu=C.zeros_tree(params, where))

    def kernel(updates: Updates, state: ScaleByAdamState, donate: bool, factor: Any):
        mu, spec = _tree.flatten(state.mu)
        nu = _tree.leaves(state.nu)
        g = F.leaves_like(updates, spec, state.mu, f"{where}: the optimizer state (mu) and the updates", mu)
        count = state.count + 1
        # Bias corrections: Python floats where the count is free to read (CPU, eager), as in
        # torch.optim; otherwise float64 tensor math that never waits for the device.
        if C.can_branch(count) and not isinstance(factor, torch.Tensor):
            t: Any = count.item()
        else:
            t = count.to(C.scalar_dtype(count.device))
        inv_bc2 = 1.0 / (1.0 - b2**t)
        if eps_root == 0.0:  # sqrt(nu / bc2) = sqrt(nu) * (1 / sqrt(bc2)), as torch
            inv_bc2 = math.sqrt(inv_bc2) if isinstance(inv_bc2, float) else inv_bc2.sqrt()
        out_scale = 1.0 / (1.0 - b1**t)  # times a fused learning rate: torch's lr / bc1
        if factor is not None:
            out_scale = out_scale * factor
        # The tensor-valued scalars only ever multiply, except where _can_fold allows (CPU,
        # eager): _foreach_mul_ takes a 0-dim tensor as is, while _foreach_add_(list, tensor)
        # reads it on the host on some devices (a sync).

        def math_(s, g, mu, nu):
            s_inv_bc2, s_out = s
            mu = F.lerp(mu, g, 1.0 - b1, donate)
            nu = F.mul(nu, b2, donate)
            torch._foreach_addcmul_(nu, g, g, value=1.0 - b2)
            fold = eps_root == 0.0 and _can_fold(s_out, mu[0])
            if eps_root == 0.0:
                d = list(torch._foreach_sqrt(nu))
                torch._foreach_mul_(d, s_inv_bc2 / s_out if fold else s_inv_bc2)
            else:
                d = list(torch._foreach_mul(nu, s_inv_bc2))
                torch._foreach_add_(d, eps_root)
                torch._foreach_sqrt_(d)
            torch._foreach_add_(d, eps / s_out if fold else eps)
            u = _divide(mu, d, out=g if donate else None)
            if not fold:
                torch._foreach_mul_(u, s_out)
            return u, mu, nu

        u, mu, nu = F.grouped(math_, [g, mu, nu], (None, 1, 2), scalars=(inv_bc2, out_scale), chunked=True)
        return _tree.unflatten(spec, u), ScaleByAdamState(count, _tree.unflatten(spec, mu), _tree.unflatten(spec, nu))

    return _with_learning_rate(init, kernel, learning_rate, where)


# Below this output scale (|lr / bc1|) the folded denominator could overflow float32.
_FOLD_MIN_SCALE = 1e-12


def _can_fold(scale: Any, like: torch.Tensor) -> bool:
    """Whether Adam may fold its output ``scale`` into the denominator, ``u = mu / (d / scale)``:
    one pass over memory fewer, at the cost of reading ``scale``. Only where that read is free
    (CPU, eager), in float32/float64 (``d / scale`` would overflow float16 and lose bfloat16's
    precision) and for a scale far from 0 (a warm-up from lr 0 multiplies instead)."""
    if like.device.type != "cpu" or like.dtype not in (torch.float32, torch.float64):
        return False
    if torch.compiler.is_compiling():
        return False
    value = float(scale.detach()) if isinstance(scale, torch.Tensor) else float(scale)
    return math.isfinite(value) and abs(value) >= _FOLD_MIN_SCALE


def _divide(x: list[torch.Tensor], d: list[torch.Tensor], out: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """``x / d``, into the donated buffers ``out`` when given (no new updates tree), else new tensors."""
    if out is None:
        return list(torch._foreach_div(x, d))
    if out is not x:
        torch._foreach_copy_(out, x)
    torch._foreach_div_(out, d)
    return out


def _denominator(x: list[torch.Tensor], eps: float, eps_in_sqrt: bool, *, scratch: bool = False) -> list[torch.Tensor]:
    """``sqrt(x + eps)`` or ``sqrt(x) + eps``: new tensors, or computed in ``x`` when it is ``scratch``."""
    if eps_in_sqrt:
        d = x if scratch else list(torch._foreach_add(x, eps))
        if scratch:
            torch._foreach_add_(d, eps)
        torch._foreach_sqrt_(d)
    else:
        d = x if scratch else list(torch._foreach_sqrt(x))
        if scratch:
            torch._foreach_sqrt_(d)
        torch._foreach_add_(d, eps)
    return d


def scale_by_rms(
    decay: float = 0.9, eps: float = 1e-8, initial_scale: float = 0.0, *, eps_in_sqrt: bool = True
) -> GradientTransformation:
    """Divide updates by the root of a moving average of squared gradients (``optax.scale_by_rms``).

    ``nu = decay * nu + (1 - decay) * g**2``; ``u = g / sqrt(nu + eps)``, or with
    ``eps_in_sqrt=False`` ``u = g / (sqrt(nu) + eps)``, which is ``torch.optim.RMSprop``
    (``alpha=decay``, ``centered=False``) before its learning rate.

    Args:
        decay: the moving average's decay rate, in [0, 1) (torch's ``alpha``).
        eps: the denominator's regulariser.
        initial_scale: the initial value of ``nu`` (0 in torch and optax).
        eps_in_sqrt: put ``eps`` inside the square root (optax's default) or outside (torch).

    Returns:
        A :class:`GradientTransformation` with state ``ScaleByRmsState(nu)``.
    """
    where = "scale_by_rms"
    C.check_decay(where, decay=decay)
    C.check_nonneg(where, eps=eps, initial_scale=initial_scale)

    def init(params: Params) -> ScaleByRmsState:
        return ScaleByRmsState(nu=C.zeros_tree(params, where, initial_scale))

    def update(updates: Updates, state: ScaleByRmsState, params: Params | None = None, *, donate: bool = False):
        del params
        nu, spec = _tree.flatten(state.nu)
        g = F.leaves_like(updates, spec, state.nu, f"{where}: the optimizer state (nu) and the updates", nu)

        def math_(_, g, nu):
            nu = F.mul(nu, decay, donate)
            torch._foreach_addcmul_(nu, g, g, value=1.0 - decay)
            return _divide(g, _denominator(nu, eps, eps_in_sqrt), g if donate else None), nu

        u, nu = F.grouped(math_, [g, nu], (None, 1), chunked=True)
        return _tree.unflatten(spec, u), ScaleByRmsState(_tree.unflatten(spec, nu))

    return GradientTransformation(init, update)


def scale_by_stddev(
    decay: float = 0.9, eps: float = 1e-8, initial_scale: float = 0.0, *, eps_in_sqrt: bool = True
) -> GradientTransformation:
    """Divide updates by a moving estimate of the gradients' standard deviation (``optax.scale_by_stddev``).

    ``mu = decay * mu + (1 - decay) * g``; ``nu = decay * nu + (1 - decay) * g**2``;
    ``u = g / sqrt(nu - mu**2 + eps)`` (or ``g / (sqrt(nu - mu**2) + eps)`` with
    ``eps_in_sqrt=False``, which is ``torch.optim.RMSprop(centered=True)`` before its
    learning rate).

    Returns:
        A :class:`GradientTransformation` with state ``ScaleByRStdDevState(mu, nu)``.
    """
    where = "scale_by_stddev"
    C.check_decay(where, decay=decay)
    C.check_nonneg(where, eps=eps, initial_scale=initial_scale)

    def init(params: Params) -> ScaleByRStdDevState:
        return ScaleByRStdDevState(mu=C.zeros_tree(params, where), nu=C.zeros_tree(params, where, initial_scale))

    def update(updates: Updates, state: ScaleByRStdDevState, params: Params | None = None, *, donate: bool = False):
        del params
        mu, spec = _tree.flatten(state.mu)
        nu = _tree.leaves(state.nu)
        g = F.leaves_like(updates, spec, state.mu, f"{where}: the optimizer state (mu) and the updates", mu)

        def math_(_, g, mu, nu):
            mu = F.lerp(mu, g, 1.0 - decay, donate)
            nu = F.mul(nu, decay, donate)
            torch._foreach_addcmul_(nu, g, g, value=1.0 - decay)
            variance = list(torch._foreach_addcmul(nu, mu, mu, value=-1.0))
            return _divide(g, _denominator(variance, eps, eps_in_sqrt, scratch=True), g if donate else None), mu, nu

        u, mu, nu = F.grouped(math_, [g, mu, nu], (None, 1, 2), chunked=True)
        return _tree.unflatten(spec, u), ScaleByRStdDevState(_tree.unflatten(spec, mu), _tree.unflatten(spec, nu))

    return GradientTransformation(init, update)


def scale_by_rss(
    initial_accumulator_value: float = 0.1, eps: float = 1e-7, *, eps_in_sqrt: bool = True
) -> GradientTransformation:
    """Divide updates by the root of the sum of all squared gradients so far (``optax.scale_by_rss``).

    ``s = s + g**2``; ``u = g / sqrt(s + eps)``, or with ``eps_in_sqrt=False``
    ``u = g / (sqrt(s) + eps)``, which is ``torch.optim.Adagrad`` before its learning rate.
    (optax returns 0 where ``s == 0``; here that leaf's gradient has been 0 throughout, so
    the update is 0 too, unless ``eps == 0``, where it is NaN as in torch.)

    Args:
        initial_accumulator_value: the initial value of ``s`` (optax 0.1, torch 0).
        eps: the denominator's regulariser (optax 1e-7, torch 1e-10).
        eps_in_sqrt: ``eps`` inside the square root (optax) or outside (torch).

    Returns:
        A :class:`GradientTransformation` with state ``ScaleByRssState(sum_of_squares)``.
    """
    where = "scale_by_rss"
    C.check_nonneg(where, initial_accumulator_value=initial_accumulator_value, eps=eps)

    def init(params: Params) -> ScaleByRssState:
        return ScaleByRssState(sum_of_squares=C.zeros_tree(params, where, initial_accumulator_value))

    def update(updates: Updates, state: ScaleByRssState, params: Params | None = None, *, donate: bool = False):
        del params
        s, spec = _tree.flatten(state.sum_of_squares)
        g = F.leaves_like(updates, spec, state.sum_of_squares, f"{where}: the optimizer state and the updates", s)

        def math_(_, g, s):
            if donate:
                torch._foreach_addcmul_(s, g, g, value=1.0)
            else:
                s = list(torch._foreach_addcmul(s, g, g, value=1.0))
            return _divide(g, _denominator(s, eps, eps_in_sqrt), g if donate else None), s

        u, s = F.grouped(math_, [g, s], (None, 1), chunked=True)
        return _tree.unflatten(spec, u), ScaleByRssState(_tree.unflatten(spec, s))

    return GradientTransformation(init, update)


# -- momentum and weight decay ----------------------------------------------------------------


def trace(decay: float, nesterov: bool = False, *, learning_rate: ScalarOrSchedule | None = None) -> GradientTransformation:
    """Momentum (``optax.trace``; torch.optim.SGD's ``momentum`` with ``dampening=0``).

    ``trace = decay * trace + g``; ``u = trace``, or ``u = g + decay * trace`` with
    ``nesterov=True``. The first update gives ``trace = g``, like torch's buffer, which
    starts as a copy of the first gradient.

    Args:
        decay: the momentum, >= 0.
        nesterov: Nesterov momentum.
        learning_rate: if given, also multiply by ``-learning_rate`` in the same pass (see
            :func:`scale_by_adam`); the state is then ``(TraceState, learning-rate state)``.

    Returns:
        A :class:`GradientTransformation` with state ``TraceState(trace)``.
    """
    where = "trace"
    C.check_nonneg(where, decay=decay)

    def init(params: Params) -> TraceState:
        return TraceState(trace=C.zeros_tree(params, where))

    def kernel(updates: Updates, state: TraceState, donate: bool, factor: Any):
        tr, spec = _tree.flatten(state.trace)
        g = F.leaves_like(updates, spec, state.trace, f"{where}: the optimizer state (trace) and the updates", tr)

        def math_(s, g, tr):
            tr = F.mul(tr, decay, donate)
            torch._foreach_add_(tr, g)
            if nesterov:
                u = F.add(g, tr, donate, alpha=decay)
            elif donate:  # the updates take the gradient buffers; they must not alias the state
                torch._foreach_copy_(g, tr)
                u = g
            elif s:  # a new tensor, scaled: no copy needed
                return list(torch._foreach_mul(tr, s[0])), tr
            else:
                u = F.copy(tr)
            if s:
                torch._foreach_mul_(u, s[0])
            return u, tr

        scalars = () if factor is None else (factor,)
        u, tr = F.grouped(math_, [g, tr], (None, 1), scalars=scalars, chunked=True)
        return _tree.unflatten(spec, u), TraceState(_tree.unflatten(spec, tr))

    return _with_learning_rate(init, kernel, learning_rate, where)


def add_decayed_weights(weight_decay: float = 0.0, mask: Mask | None = None) -> GradientTransformation:
    """Add ``weight_decay * params`` to the updates (``optax.add_decayed_weights``).

    Before an adaptive scaling this is L2 regularisation, torch.optim's ``weight_decay`` in
    SGD, Adam, RMSprop and Adagrad; after it (``adamw``) it is decoupled weight decay.

    Args:
        weight_decay: a finite float >= 0.
        mask: optional tree of bools (a prefix of the params' structure) or a callable
            ``params -> tree``; only leaves marked ``True`` are decayed (e.g. no decay for
            biases and norms), as in optax.

    Returns:
        A stateless :class:`GradientTransformation`; its ``update`` needs ``params``.
    """
    where = "add_decayed_weights"
    C.check_nonneg(where, weight_decay=weight_decay)
    if mask is not None:
        return masked(add_decayed_weights(weight_decay), mask)

    def update(updates: Updates, params: Params | None, donate: bool) -> Updates:
        if params is None:
            raise ValueError(f"{where}: the update needs the params: call opt.update(grads, state, params)")
        if weight_decay == 0.0:
            return updates
        p, spec = C.float_leaves(params, where)
        u = F.leaves_like(updates, spec, params, f"{where}: the params and the updates", p)
        (u,) = F.grouped(lambda _, u, p: (F.add(u, p, donate, alpha=weight_decay),), [u, p], (None,))
        return _tree.unflatten(spec, u)

    return _stateless(update)


# -- clipping ---------------------------------------------------------------------------------


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Rescale updates so that their global L2 norm is at most ``max_norm`` (``optax.clip_by_global_norm``).

    ``u -> u * min(1, max_norm / ||u||)`` where ``||u||`` is the L2 norm of all leaves
    together. ``torch.nn.utils.clip_grad_norm_(params, max_norm)`` computes
    ``min(1, max_norm / (||g|| + 1e-6))``: the same except for torch's ``1e-6`` in the
    denominator, so above the threshold torch's clipped norm is ``max_norm * ||g|| / (||g||
    + 1e-6)``, smaller by a relative ``1e-6 / ||g||``. Here (as in optax) the clipped norm is
    exactly ``max_norm``, and a zero gradient stays zero.

    Args:
        max_norm: a finite float > 0 (a zero would turn every update into 0 / 0).

    Returns:
        A stateless :class:`GradientTransformation` (``EmptyState``). No host sync: the
        scale is a tensor. Its ``update`` takes ``shards=`` (:class:`fnnet.optim.Shards`): on a
        part of the parameters (a sharded step supplies it) the norm is the whole gradient's.
    """
    C.check_positive("clip_by_global_norm", max_norm=max_norm)

    def update(updates: Updates, state: Any, params: Params | None = None, *, donate: bool = False,
               shards: Shards | None = None) -> tuple[Updates, Any]:
        leaves = _tree.leaves(updates)
        if not leaves:
            return updates, state
        groups = F.index_groups([leaves])
        device = leaves[0].device
        dtype = torch.float32
        for idx in groups:
            dtype = torch.promote_types(dtype, leaves[idx[0]].dtype)
        group_norms = []
        for idx in groups:
            norms = torch._foreach_norm([leaves[i] for i in idx])
            group_norms.append(torch.linalg.vector_norm(torch.stack(norms)).to(device=device, dtype=dtype))
        total = group_norms[0] if len(group_norms) == 1 else torch.linalg.vector_norm(torch.stack(group_norms))
        if shards is not None:  # a part of the parameters (a sharded step): the norm of every part together
            total = global_sum(total * total, shards).sqrt()
        # max_norm / 0 = inf, clamped to 1: an all-zero gradient stays zero.
        factor = torch.clamp(max_norm / total, max=1.0)
        return _scale_updates(updates, factor, donate), state

    return GradientTransformation(C.init_empty, update)


def clip(max_delta: float) -> GradientTransformation:
    """Clamp every update element to ``[-max_delta, max_delta]`` (``optax.clip``; ``torch.nn.utils.clip_grad_value_``).

    Returns:
        A stateless :class:`GradientTransformation`.
    """
    C.check_nonneg("clip", max_delta=max_delta)
    return _stateless(lambda updates, params, donate: _map_updates(
        updates, lambda u: F.clamp(u, -max_delta, max_delta, donate)))


def set_to_zero() -> GradientTransformation:
    """Replace updates by zeros (``optax.set_to_zero``): with :func:`masked`, freezes parameters.

    ``chain(masked(set_to_zero(), frozen), adam(1e-3))`` keeps the leaves marked in
    ``frozen`` fixed (Adam's moments of those leaves stay at zero).
    """
    return _stateless(lambda updates, params, donate: _map_updates(updates, lambda u: F.zeros_like(u, donate)))


# -- combinators ------------------------------------------------------------------------------


def _mask_flags(mask: Mask, tree: Any, where: str) -> list[bool]:
    """One bool per leaf of ``tree``: the flag of the mask leaf whose path is a prefix of the leaf's."""
    m = mask(tree) if callable(mask) else mask
    if not torch.compiler.is_compiling():  # checked eagerly at init; the check trips torch.compile (2.13)
        try:
            _tree.assert_same_structure(m, tree, what="the mask and the tree", prefix=True)
        except ValueError as err:
            raise ValueError(f"{where}: the mask must have the structure of the params (or a prefix of it): {err}") from None
    by_path = dict(_mask_items(m, ()))
    for path, flag in by_path.items():
        if not isinstance(flag, bool):
            raise TypeError(
                f"{where}: mask leaves must be Python bools, got {type(flag).__name__} at "
                f"'{_tree.path_str(path)}' (a tensor would need a device sync)"
            )
    flags = []
    for path in optree.tree_paths(tree, none_is_leaf=False, namespace=_tree.NAMESPACE):
        flags.append(next(by_path[path[:k]] for k in range(len(path) + 1) if path[:k] in by_path))
    return flags


def _mask_items(m: Any, path: tuple[Any, ...]) -> list[tuple[tuple[Any, ...], Any]]:
    """``(key path, leaf)`` pairs of a mask, as ``optree.tree_flatten_with_path`` would give.

    Plain recursion for the usual containers: torch.compile (2.13) cannot flatten a dict built
    inside the compiled region (a callable mask's result) with optree, nor rebuild one with
    ``tree.map`` and flatten it again.
    """
    if m is None:
        return []
    if isinstance(m, dict):
        return [item for k, v in m.items() for item in _mask_items(v, path + (k,))]
    if isinstance(m, (list, tuple)):
        return [item for i, v in enumerate(m) for item in _mask_items(v, path + (i,))]
    if isinstance(m, bool):
        return [(path, m)]
    # anything else (a registered container, or a wrong leaf that the caller reports): optree
    paths, leaves, _ = optree.tree_flatten_with_path(m, none_is_leaf=False, namespace=_tree.NAMESPACE)
    return [(path + p, leaf) for p, leaf in zip(paths, leaves)]


def _select(paths: list[str], leaves: list[Any], flags: list[bool]) -> dict[str, Any]:
    """The selected leaves as a flat dict keyed by their dotted key paths."""
    return {path: leaf for path, leaf, f in zip(paths, leaves, flags) if f}


def _sub_shards(shards: Shards | None, paths: list[str], flags: list[bool]) -> Shards | None:
    """``shards`` for the selected leaves (their whole shapes, in ``_select``'s flat dict)."""
    if shards is None:
        return None
    return shards._replace(whole=_select(paths, _tree.leaves(shards.whole), flags))


def masked(inner: GradientTransformation, mask: Mask) -> GradientTransformation:
    """Apply ``inner`` only to the leaves selected by ``mask``; others pass through (``optax.masked``).

    The counterpart of torch.optim's parameter groups: e.g. weight decay on weights only,
    or with :func:`set_to_zero`, frozen parameters. Leaves not selected are returned
    unchanged, *not* zeroed: to freeze them, mask them with ``set_to_zero()``.

    Args:
        inner: the transformation for the selected leaves.
        mask: a tree of Python bools with the params' structure or a prefix of it (one
            bool may stand for a whole subtree: ``{"encoder": False, "head": True}``), or a
            callable ``tree -> such a tree``, called with the params at ``init`` and the
            updates at ``update`` (in a sharded step, with the whole tree's shapes:
            ``update(..., shards=)``, :class:`fnnet.optim.Shards`).

    Returns:
        A :class:`GradientTransformation` with state ``MaskedState(inner_state)``. The inner
        transformation sees the selected leaves as a flat dict keyed by their dotted key
        paths (``{"layers.0.weight": ...}``), so its state holds nothing for the others.
    """
    where = "masked"

    def init(params: Params) -> MaskedState:
        flags = _mask_flags(mask, params, where)
        paths = _tree.paths(params)
        chosen = [p for p, f in zip(paths, flags) if f]
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"{where}: two selected leaves have the same key path in {chosen}; rename one")
        return MaskedState(inner.init(_select(paths, _tree.leaves(params), flags)))

    def update(updates: Updates, state: MaskedState, params: Params | None = None, *, donate: bool = False,
               shards: Shards | None = None):
        # a mask function looks at the whole tree (shapes), not at a sharded step's 1-D parts
        flags = _mask_flags(mask, shards.whole if shards is not None and callable(mask) else updates, where)
        leaves, spec = _tree.flatten(updates)
        paths = _tree.paths(updates)
        sub_params = None
        if params is not None:
            p_leaves = F.leaves_like(params, spec, updates, f"{where}: the updates and the params")
            sub_params = _select(paths, p_leaves, flags)
        new_sub, inner_state = update_with(inner, _select(paths, leaves, flags), state.inner_state, sub_params,
                                           donate=donate, shards=_sub_shards(shards, paths, flags))
        out = [new_sub[p] if f else u for p, u, f in zip(paths, leaves, flags)]
        return _tree.unflatten(spec, out), MaskedState(inner_state)

    return GradientTransformation(init, update)


def multi_steps(inner: GradientTransformation, every_k: int) -> GradientTransformation:
    """Gradient accumulation: one ``inner`` update every ``every_k`` calls (``optax.MultiSteps``).

    Each call adds the gradients to an accumulator. Calls 1 .. k-1 of every cycle return
    zero updates (parameters stay put); call k passes the mean of the k gradients to
    ``inner`` and returns its updates. ``chain(..., multi_steps(adam(lr), 4))`` on micro-batches
    is ``torch.optim.Adam`` stepped after 4 ``backward()`` calls of loss / 4.

    Outside ``torch.compile`` with CPU counters the cycle position is read in Python (free on
    CPU). Otherwise (accelerators, compiled steps) there is no host sync: ``inner`` runs on
    every call and ``torch.where`` keeps its result only on the k-th, so each micro-step costs
    one ``inner`` update.

    Returns:
        A :class:`GradientTransformation` with state ``MultiStepsState(mini_step,
        gradient_step, inner_state, acc_grads)``.
    """
    if isinstance(every_k, bool) or not isinstance(every_k, int) or every_k < 1:
        raise ValueError(f"multi_steps: every_k must be an int >= 1, got {every_k!r}")
    where = "multi_steps"

    def init(params: Params) -> MultiStepsState:
        count = C.count(params, where)
        return MultiStepsState(
            mini_step=count, gradient_step=count.clone(), inner_state=inner.init(params), acc_grads=C.zeros_tree(params, where)
        )

    def update(updates: Updates, state: MultiStepsState, params: Params | None = None, *, donate: bool = False,
               shards: Shards | None = None):
        acc, spec = _tree.flatten(state.acc_grads)
        g = F.leaves_like(updates, spec, state.acc_grads, f"{where}: the accumulated gradients and the updates", acc)
        (acc,) = F.grouped(lambda _, a, g: (F.add(a, g, donate),), [acc, g], (0,))
        (mean,) = F.grouped(lambda _, a: (list(torch._foreach_div(a, float(every_k))),), [acc], (None,))
        mean = _tree.unflatten(spec, mean)

        if C.can_branch(state.mini_step):
            if int(state.mini_step) + 1 < every_k:
                zeros = [torch.zeros_like(a) for a in acc]
                new_state = MultiStepsState(state.mini_step + 1, state.gradient_step, state.inner_state, _tree.unflatten(spec, acc))
                return _tree.unflatten(spec, zeros), new_state
            # ``mean`` is fresh, so inner may write into it when the caller donates.
            new_updates, inner_state = update_with(inner, mean, state.inner_state, params, donate=donate, shards=shards)
            acc = F.zeros_like(acc, True)  # ``acc`` is the donated state or a fresh sum
            new_state = MultiStepsState(
                torch.zeros_like(state.mini_step), state.gradient_step + 1, inner_state, _tree.unflatten(spec, acc)
            )
            return new_updates, new_state

        emit = state.mini_step + 1 >= every_k
        new_updates, inner_new = update_with(inner, mean, state.inner_state, params, shards=shards)

        def pick(new: Any, old: Any) -> Any:
            if isinstance(new, torch.Tensor):
                return torch.where(emit.to(new.device), new, old)
            return new

        new_updates = _tree.map(lambda u: torch.where(emit.to(u.device), u, 0.0), new_updates)
        inner_state = _tree.map(pick, inner_new, state.inner_state)
        acc = [torch.where(emit.to(a.device), 0.0, a) for a in acc]
        new_state = MultiStepsState(
            torch.where(emit, 0, state.mini_step + 1),
            state.gradient_step + emit.to(torch.int64),
            inner_state,
            _tree.unflatten(spec, acc),
        )
        return new_updates, new_state

    return GradientTransformation(init, update)
