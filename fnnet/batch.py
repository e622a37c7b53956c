"""Batches: what fnnet asks of one, in one place.

A *batch* is any pytree of tensors whose leaves share their first dimension (the samples):
``(x, y)``, ``[x, y]``, ``{"x": ..., "y": ...}``, a tensor alone. :func:`split_batch` reads
its inputs and targets, :func:`batch_size_of` is the one rule for how many samples it holds
(every step, metric and loader that weighs by sample counts asks it), and :func:`as_arrays`
tells the data itself (``(X, y)`` arrays) from a loader of batches.
"""

from __future__ import annotations

import numbers
from typing import Any, Mapping

import numpy as np
import torch

from . import tree as _tree

__all__ = ["split_batch", "batch_size_of", "as_arrays", "is_array"]


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a supervised batch: ``(x, y)``, ``[x, y]`` or ``{"x": ..., "y": ...}``.

    A batch of inputs alone (a tensor, a 1-tuple, a dict without ``"y"``) gives ``targets=None``.
    Anything else is a ``ValueError`` saying which forms are accepted.
    """
    if isinstance(batch, Mapping):
        if "x" not in batch:
            raise ValueError(f"a dict batch needs keys 'x' (and 'y' for training), got {sorted(batch)}")
        return batch["x"], batch.get("y")
    if isinstance(batch, (tuple, list)):
        if len(batch) in (1, 2):
            return batch[0], (batch[1] if len(batch) == 2 else None)
        raise ValueError(f"a batch is (inputs, targets), (inputs,) or {{'x': ..., 'y': ...}}; got a {type(batch).__name__} "
                         f"of length {len(batch)}")
    if isinstance(batch, torch.Tensor):
        return batch, None
    raise ValueError(f"a batch is (inputs, targets), (inputs,), a tensor or {{'x': ..., 'y': ...}}; got {type(batch).__name__}")


def batch_size_of(batch: Any) -> int:
    """The number of samples in ``batch``: the first dimension of its first tensor (or array) that has one.

    The one rule fnnet counts samples by: the data-parallel and distributed steps weigh their
    shards with it, the metrics weigh a batch's mean with it (asked of the targets, or of the
    outputs when there are none). Leaves without a first dimension (a 0-dim tensor, a string
    tag, a number) are shared by all samples and do not count; :func:`fnnet.parallel.scatter`
    gives them to every shard. ``ValueError`` for a batch without leaves, or with no tensor
    that has a first dimension (naming the leaves it has).
    """
    leaves = _tree.leaves(batch)  # paths are built only for the error message (this runs every step)
    if not leaves:
        raise ValueError("batch_size_of: the batch has no leaves (an empty container or None)")
    for x in leaves:
        shape = getattr(x, "shape", None)
        if shape is not None and len(shape) > 0:
            return int(shape[0])
    listed = ", ".join(f"'{p}' ({type(x).__name__})" for p, x in _tree.leaves_with_path(batch)[:5])
    raise ValueError(f"batch_size_of: the batch holds no tensor with a first (sample) dimension (its leaves: {listed}); "
                     "batches are trees of tensors with the samples along dimension 0")


def is_array(x: Any) -> bool:
    """Whether ``x`` is data itself, a tensor or a NumPy array (not a loader, a list of batches or a pair)."""
    return isinstance(x, (torch.Tensor, np.ndarray))


def as_arrays(data: Any) -> tuple | None:
    """``data`` as a tuple of tensors when it is the data itself (a tuple or list of tensors or
    NumPy arrays, or Keras' ``(X, y)`` as Python lists of numbers), else ``None`` (a loader, or
    any other iterable of batches).

    Python lists become arrays at once (floats as float32, Keras' default; integers as int64);
    lists that do not form a rectangular array of numbers are a ``ValueError`` right away, before
    any training, naming which part and what would work.
    """
    if isinstance(data, (tuple, list)) and data and all(is_array(a) for a in data):
        return tuple(torch.as_tensor(a) if isinstance(a, np.ndarray) else a for a in data)
    if isinstance(data, tuple) and 1 <= len(data) <= 2 and all(_number_list(a) for a in data):
        return tuple(_from_list(a, name) for a, name in zip(data, ("X", "y")))
    return None


def _number_list(a: Any) -> bool:
    """A Python list of numbers, or of lists of them (not a list of batches: those hold tensors)."""
    if not isinstance(a, list) or not a:
        return False
    first = a[0]
    while isinstance(first, (list, tuple)) and first:
        first = first[0]
    return isinstance(first, numbers.Number)


def _from_list(a: list, name: str) -> torch.Tensor:
    try:
        arr = np.asarray(a)
    except (ValueError, TypeError) as err:
        arr, why = None, type(err).__name__
    else:
        why = "" if arr.dtype.kind in "biuf" else f"elements of type {arr.dtype}"
    if arr is None or why:
        raise ValueError(f"fit((X, y)) got {name} as a Python list that is not a rectangular array of numbers "
                         f"({why or 'ragged'}: rows of different lengths, or mixed types); pass NumPy arrays or "
                         "tensors, e.g. np.asarray(X, dtype=np.float32)")
    return torch.as_tensor(arr.astype(np.float32) if arr.dtype.kind == "f" else arr)
