"""What the transformations of :mod:`fnnet.optim` share: argument checks, the empty state,
step counters, zero trees and the dtype of optimizer scalars.

Private to the package: ``base``, ``transforms``, ``aliases`` and ``schedules`` import from
here, and nothing outside ``fnnet.optim`` does.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple

import torch

from .. import tree as _tree
from ..device import tree_device


class EmptyState(NamedTuple):
    """The state of a stateless transformation (optax's ``EmptyState``)."""


def init_empty(params: Any) -> EmptyState:
    """The ``init`` of every stateless transformation."""
    del params
    return EmptyState()


# -- argument checks: errors name the function and the argument ---------------------------------


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_number(where: str, **values: Any) -> None:
    """Each value must be a finite real number (a bool or a string is not one; a tensor is a ``TypeError``)."""
    for name, v in values.items():
        if isinstance(v, torch.Tensor):
            shown = repr(v.item()) if v.numel() == 1 else f"of shape {tuple(v.shape)}"
            raise TypeError(f"{where}: {name} must be a Python number, got a tensor ({shown}); torch.optim takes "
                            f"tensors for lr and betas, fnnet's hyperparameters are numbers (only the learning "
                            f"rate may be a 0-dim tensor): pass {name}=float({name})")
        if not _is_real(v) or not math.isfinite(v):
            raise ValueError(f"{where}: {name} must be a finite number, got {v!r}")


def check_nonneg(where: str, **values: Any) -> None:
    check_number(where, **values)
    for name, v in values.items():
        if v < 0:
            raise ValueError(f"{where}: {name} must be >= 0, got {v}")


def check_positive(where: str, **values: Any) -> None:
    check_number(where, **values)
    for name, v in values.items():
        if v <= 0:
            raise ValueError(f"{where}: {name} must be > 0, got {v}")


def check_decay(where: str, **values: Any) -> None:
    check_number(where, **values)
    for name, v in values.items():
        if not 0.0 <= v < 1.0:
            raise ValueError(f"{where}: {name} must be in [0, 1), got {v}")


def check_int(where: str, minimum: int = 1, **values: Any) -> None:
    """Each value must be an int (not a bool) >= ``minimum`` (step counts, periods)."""
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < minimum:
            raise ValueError(f"{where}: {name} must be an int >= {minimum}, got {v!r}")


def check_learning_rate(value: Any, where: str) -> None:
    """A learning rate is a real number or a 0-dim floating tensor, finite and >= 0.

    Raises ``TypeError`` for anything else (a string, a bool, a list) and ``ValueError`` for a
    negative or non-finite value. Values are read only where that needs no device sync: a
    tensor on an accelerator, or any tensor while ``torch.compile`` traces, is checked for
    type and shape only (such values are checked once, at ``init``).
    """
    if isinstance(value, torch.Tensor):
        if value.ndim != 0:
            raise ValueError(f"{where}: the learning rate must be a scalar, got a tensor of shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{where}: the learning rate must be a floating-point tensor, got {value.dtype}")
        if value.device.type != "cpu" or torch.compiler.is_compiling():
            return
        number = float(value.detach())
    elif _is_real(value):
        number = float(value)
    else:
        raise TypeError(
            f"{where}: the learning rate must be a number, a 0-dim tensor or a schedule (step -> value), "
            f"got {type(value).__name__} {value!r}"
        )
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{where}: the learning rate must be finite and >= 0, got {number}")


# -- state helpers ------------------------------------------------------------------------------


def float_leaves(params: Any, where: str) -> tuple[list[torch.Tensor], _tree.PyTreeSpec]:
    """The leaves of ``params``, which must all be floating-point tensors.

    Optimizers move floating-point parameters only (as ``torch.autograd`` differentiates
    only those): an integer or bool leaf is a ``TypeError`` naming its key path, raised when
    the optimizer state is created, instead of a silently truncated update later.
    """
    leaves, spec = _tree.flatten(params)
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"{where}: every leaf of params must be a tensor, got {type(leaf).__name__} at "
                            f"'{_tree.paths(params)[i]}'")
        if not (leaf.is_floating_point() or leaf.is_complex()):
            raise TypeError(
                f"{where}: the params leaf at '{_tree.paths(params)[i]}' is {leaf.dtype}; optimizers update "
                "floating-point tensors only. Keep integer and bool values out of the params (in buffers), "
                "or leave them out of the tree the optimizer sees"
            )
    return leaves, spec


def zeros_tree(params: Any, where: str, fill: float = 0.0) -> Any:
    """A tree of ``params``' structure, shapes, dtypes and devices, filled with ``fill``."""
    leaves, spec = float_leaves(params, where)
    return _tree.unflatten(spec, [torch.full_like(p, fill) if fill else torch.zeros_like(p) for p in leaves])


def count(params: Any, where: str) -> torch.Tensor:
    """A 0-dim int64 step counter on the params' device (after checking the params' leaves)."""
    float_leaves(params, where)
    return torch.zeros((), dtype=torch.int64, device=tree_device(params))


def scalar_dtype(device: torch.device) -> torch.dtype:
    """The dtype of optimizer scalars (bias corrections, learning rates) on ``device``.

    float64, so float64 parameters get double-precision scalars like torch.optim's Python
    floats; float32 on MPS, which has no float64.
    """
    return torch.float32 if device.type == "mps" else torch.float64


def scalar_value(x: Any, device: torch.device) -> torch.Tensor:
    """A learning rate or scale as a 0-dim tensor of :func:`scalar_dtype` on ``device``."""
    dtype = scalar_dtype(device)
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype)
    return torch.as_tensor(x, dtype=dtype, device=device)


def can_branch(counter: torch.Tensor) -> bool:
    """Whether Python may read ``counter``: free on CPU, a device sync or a graph break otherwise."""
    return counter.is_cpu and not torch.compiler.is_compiling()


def make_schedule(fn: Callable[[torch.Tensor], torch.Tensor], name: str) -> Callable[[Any], Any]:
    """A schedule ``step -> value`` from ``fn``, tensor math on a 0-dim float step.

    Given a 0-dim tensor (an optimizer's count) it returns a tensor on its device, with no
    host sync; given a Python int, a Python float (to print or plot a schedule).
    """

    def schedule(step: Any) -> Any:
        if isinstance(step, torch.Tensor):
            return fn(step.to(scalar_dtype(step.device)))
        return float(fn(torch.tensor(float(step), dtype=torch.float64)))

    schedule.__name__ = schedule.__qualname__ = name
    return schedule
