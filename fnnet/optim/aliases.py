"""The usual optimizers, each a short :func:`chain` of building blocks (optax's ``alias.py``).

Arguments mean what they mean in ``torch.optim`` (``weight_decay`` in :func:`adam` is L2 as
in ``torch.optim.Adam``; :func:`adamw`'s is decoupled as in ``torch.optim.AdamW``), and
the parameter trajectories match torch.optim's. ``learning_rate`` is a float or a schedule
(``fnnet.optim.step_lr``, ``cosine_decay_schedule``, ..., or any ``step -> value``).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import torch

from ._common import check_decay, check_learning_rate, check_nonneg, scalar_dtype
from .base import GradientTransformation, ScalarOrSchedule, chain
from .transforms import (
    Mask,
    add_decayed_weights,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_rms,
    scale_by_rss,
    scale_by_stddev,
    trace,
)

__all__ = ["sgd", "adam", "adamw", "rmsprop", "adagrad"]


# torch.optim's arguments that the aliases name otherwise or do not take, and what to write instead.
_TORCH_ARGUMENTS = {
    "lr": "the learning rate is the first argument, learning_rate",
    "betas": "fnnet takes them as two numbers: b1={0}, b2={1}",
    "maximize": "fnnet minimises; negate the updates with chain(scale(-1.0), {alias}(...)) (what "
                "fnnet.optim.from_torch builds for maximize=True), or negate the loss",
    "amsgrad": "fnnet has no AMSGrad alias; write it with fnnet.optim's building blocks",
    "dampening": "fnnet.optim.sgd is torch's dampening=0; leave it out",
    "decoupled_weight_decay": "use fnnet.optim.adamw for decoupled weight decay",
    **{name: "it says how torch runs a step; fnnet has one implementation: leave it out"
       for name in ("foreach", "fused", "capturable", "differentiable")},
}


def _torch_arguments(alias: Callable) -> Callable:
    """``alias``, where a torch.optim argument it does not take is a ``TypeError`` saying what to write instead."""
    takes = set(inspect.signature(alias).parameters)

    @functools.wraps(alias)
    def checked(*args: Any, **kwargs: Any) -> GradientTransformation:
        for name in kwargs:
            if name in _TORCH_ARGUMENTS and name not in takes:
                hint = _TORCH_ARGUMENTS[name]
                if name == "betas":
                    hint = hint.format(*kwargs[name]) if isinstance(kwargs[name], (tuple, list)) else hint.format("...", "...")
                raise TypeError(f"{alias.__name__}: {name}= is torch.optim's; {hint.replace('{alias}', alias.__name__)}")
        return alias(*args, **kwargs)

    return checked


def _chain(*maybe: GradientTransformation | None) -> GradientTransformation:
    """``chain`` of the stages that are not ``None``; a single stage is returned as is."""
    stages = [t for t in maybe if t is not None]
    return stages[0] if len(stages) == 1 else chain(*stages)


def _check_lr(learning_rate: Any, where: str) -> None:
    """Errors about the learning rate name the alias (a schedule is checked when it is evaluated)."""
    if not callable(learning_rate):
        check_learning_rate(learning_rate, where)


def _momentum_step(momentum: float, nesterov: bool, learning_rate: ScalarOrSchedule) -> GradientTransformation:
    """The last stage of sgd and rmsprop: with momentum, the trace and the learning rate in one
    pass over memory (trace's ``learning_rate=``: the numbers of ``chain(trace(momentum,
    nesterov), scale_by_learning_rate(lr))``); without, the learning rate alone."""
    if momentum != 0:
        return trace(momentum, nesterov, learning_rate=learning_rate)
    return scale_by_learning_rate(learning_rate)


def _l2(weight_decay: float) -> GradientTransformation | None:
    return add_decayed_weights(weight_decay) if weight_decay != 0 else None


@_torch_arguments
def sgd(
    learning_rate: ScalarOrSchedule, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0
) -> GradientTransformation:
    """Stochastic gradient descent, with optional momentum and L2 weight decay.

    ``torch.optim.SGD(lr=learning_rate, momentum=momentum, nesterov=nesterov,
    weight_decay=weight_decay)`` with ``dampening=0``; ``optax.sgd(learning_rate, momentum,
    nesterov)`` when ``weight_decay == 0``.

    Returns:
        ``chain([add_decayed_weights(weight_decay)], trace(momentum, nesterov,
        learning_rate=learning_rate))`` with momentum, else ``chain([...],
        scale_by_learning_rate(learning_rate))``; the bracketed stage only when nonzero.
    """
    # Checked here, so that errors name sgd's own arguments (not the building blocks').
    check_nonneg("sgd", momentum=momentum, weight_decay=weight_decay)
    if nesterov and momentum <= 0:
        raise ValueError("sgd: nesterov=True needs momentum > 0 (as in torch.optim.SGD)")
    _check_lr(learning_rate, "sgd")
    return _chain(_l2(weight_decay), _momentum_step(momentum, nesterov, learning_rate))


@_torch_arguments
def adam(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    eps_root: float = 0.0,
) -> GradientTransformation:
    """Adam, with optional L2 weight decay added to the gradients.

    ``torch.optim.Adam(lr=learning_rate, betas=(b1, b2), eps=eps, weight_decay=weight_decay)``;
    ``optax.adam(learning_rate, b1, b2, eps, eps_root)`` when ``weight_decay == 0``.

    Returns:
        ``chain([add_decayed_weights(weight_decay)], scale_by_adam(b1, b2, eps, eps_root,
        learning_rate=learning_rate))``: Adam with the learning rate fused into its pass.
    """
    check_decay("adam", b1=b1, b2=b2)
    check_nonneg("adam", eps=eps, weight_decay=weight_decay, eps_root=eps_root)
    _check_lr(learning_rate, "adam")
    # Adam and the learning rate in one pass over memory (scale_by_adam's learning_rate=):
    # the numbers of chain(scale_by_adam(...), scale_by_learning_rate(learning_rate)).
    return _chain(_l2(weight_decay), scale_by_adam(b1, b2, eps, eps_root, learning_rate=learning_rate))


@_torch_arguments
def adamw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    *,
    eps_root: float = 0.0,
    mask: Mask | None = None,
) -> GradientTransformation:
    """Adam with decoupled weight decay: ``p -= learning_rate * (adam_update + weight_decay * p)``.

    ``torch.optim.AdamW(lr=learning_rate, betas=(b1, b2), eps=eps, weight_decay=weight_decay)``
    and ``optax.adamw(learning_rate, b1, b2, eps, eps_root, weight_decay=weight_decay, mask=mask)``
    (the default ``weight_decay`` is torch's 1e-2; optax's is 1e-4).

    Args:
        mask: which leaves to decay (a tree of bools or a callable, see ``masked``); all
            by default, as in torch.

    Returns:
        ``chain(scale_by_adam(b1, b2, eps, eps_root), add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate))``.
    """
    check_decay("adamw", b1=b1, b2=b2)
    check_nonneg("adamw", eps=eps, weight_decay=weight_decay, eps_root=eps_root)
    _check_lr(learning_rate, "adamw")
    return chain(
        scale_by_adam(b1, b2, eps, eps_root),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )


@_torch_arguments
def rmsprop(
    learning_rate: ScalarOrSchedule,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
) -> GradientTransformation:
    """RMSprop: ``torch.optim.RMSprop(lr, alpha, eps, weight_decay, momentum, centered)``.

    ``eps`` is added outside the square root, as in torch, and the trajectories match
    torch.optim's for every argument combination.

    optax: ``optax.rmsprop(learning_rate, decay=alpha, eps=eps, momentum=momentum,
    centered=centered, eps_in_sqrt=False)`` computes the same when ``weight_decay == 0`` and
    either the learning rate is constant or ``momentum == 0``. With momentum *and* a
    schedule they differ: optax multiplies by the learning rate before the momentum trace
    (the trace accumulates ``lr_t * g``), fnnet and torch after it (``lr_t * trace``).
    optax's own defaults also differ (``decay=0.9``, ``eps`` inside the root).

    Returns:
        ``chain([add_decayed_weights(weight_decay)], scale_by_rms(alpha, eps,
        eps_in_sqrt=False)`` or ``scale_by_stddev(...)`` if centered, then
        ``trace(momentum, learning_rate=learning_rate)`` with momentum or
        ``scale_by_learning_rate(learning_rate)`` without)``.
    """
    check_decay("rmsprop", alpha=alpha)
    check_nonneg("rmsprop", eps=eps, weight_decay=weight_decay, momentum=momentum)
    _check_lr(learning_rate, "rmsprop")
    scaling = scale_by_stddev if centered else scale_by_rms
    return _chain(_l2(weight_decay), scaling(alpha, eps, eps_in_sqrt=False), _momentum_step(momentum, False, learning_rate))


def _inverse_time_decay(learning_rate: ScalarOrSchedule, lr_decay: float) -> Any:
    """torch Adagrad's ``lr / (1 + (step - 1) * lr_decay)``, with fnnet's 0-based step."""

    def schedule(step: Any) -> Any:
        base = learning_rate(step) if callable(learning_rate) else learning_rate
        if isinstance(step, torch.Tensor):
            step = step.to(scalar_dtype(step.device))
        return base / (1 + step * lr_decay)

    return schedule


@_torch_arguments
def adagrad(
    learning_rate: ScalarOrSchedule,
    lr_decay: float = 0.0,
    weight_decay: float = 0.0,
    initial_accumulator_value: float = 0.0,
    eps: float = 1e-10,
) -> GradientTransformation:
    """Adagrad: ``torch.optim.Adagrad(lr, lr_decay, weight_decay, initial_accumulator_value, eps)``.

    ``eps`` is added outside the square root, as in torch. ``optax.adagrad(learning_rate,
    initial_accumulator_value, eps)`` puts it inside (and defaults to 0.1 and 1e-7): use
    ``chain(scale_by_rss(0.1, 1e-7), scale_by_learning_rate(lr))`` for optax's numbers.

    Returns:
        ``chain([add_decayed_weights(weight_decay)], scale_by_rss(initial_accumulator_value,
        eps, eps_in_sqrt=False), scale_by_learning_rate(lr))``, where ``lr`` decays as
        ``learning_rate / (1 + step * lr_decay)`` when ``lr_decay`` is nonzero.
    """
    check_nonneg("adagrad", lr_decay=lr_decay, weight_decay=weight_decay,
                  initial_accumulator_value=initial_accumulator_value, eps=eps)
    _check_lr(learning_rate, "adagrad")
    lr = _inverse_time_decay(learning_rate, lr_decay) if lr_decay != 0 else learning_rate
    return _chain(
        _l2(weight_decay),
        scale_by_rss(initial_accumulator_value, eps, eps_in_sqrt=False),
        scale_by_learning_rate(lr),
    )
