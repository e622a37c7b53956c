"""Optimizers as explicit state transforms: optax's protocol on torch tensors.

An optimizer is a :class:`GradientTransformation`, a pair of pure functions::

    opt = fnnet.optim.adam(1e-3)
    state = opt.init(params)
    updates, state = opt.update(grads, state, params)
    params = fnnet.optim.apply_updates(params, updates)

Building blocks (``scale_by_adam``, ``trace``, ``clip_by_global_norm``, ...) compose with
:func:`chain`; aliases (``sgd``, ``adam``, ``adamw``, ``rmsprop``, ``adagrad``) are short
chains whose trajectories match ``torch.optim``'s. Schedules are functions ``step -> value``.

Layout: ``base.py`` (the protocol, ``chain``, ``apply_updates``, the learning rate in the
state), ``transforms.py`` (building blocks), ``aliases.py``, ``schedules.py``.
"""

from .aliases import adagrad, adam, adamw, rmsprop, sgd
from .base import (
    EmptyState,
    GradientTransformation,
    OptState,
    Params,
    ScalarOrSchedule,
    ScaleByLearningRateState,
    ScaleByScheduleState,
    Schedule,
    Updates,
    apply_updates,
    chain,
    get_learning_rate,
    identity,
    set_learning_rate,
)
from .schedules import (
    constant_schedule,
    cosine_decay_schedule,
    exponential_decay,
    join_schedules,
    linear_schedule,
    per_epoch,
    piecewise_constant_schedule,
    polynomial_schedule,
    step_lr,
    warmup_cosine_decay_schedule,
)
from .transforms import (
    MaskedState,
    MultiStepsState,
    ScaleByAdamState,
    ScaleByRmsState,
    ScaleByRssState,
    ScaleByRStdDevState,
    TraceState,
    add_decayed_weights,
    clip,
    clip_by_global_norm,
    masked,
    multi_steps,
    scale,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_rms,
    scale_by_rss,
    scale_by_stddev,
    set_to_zero,
    trace,
)

__all__ = [
    # protocol
    "GradientTransformation",
    "EmptyState",
    "Params",
    "Updates",
    "OptState",
    "Schedule",
    "ScalarOrSchedule",
    "chain",
    "identity",
    "apply_updates",
    "get_learning_rate",
    "set_learning_rate",
    # building blocks and their states
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
    "ScaleByLearningRateState",
    "ScaleByScheduleState",
    "ScaleByAdamState",
    "ScaleByRmsState",
    "ScaleByRStdDevState",
    "ScaleByRssState",
    "TraceState",
    "MaskedState",
    "MultiStepsState",
    # aliases
    "sgd",
    "adam",
    "adamw",
    "rmsprop",
    "adagrad",
    # schedules
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
