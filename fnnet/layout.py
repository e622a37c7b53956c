"""Memory layouts: whether a model trains in NCHW or NHWC (channels-last), decided once, before training.

On CPU, oneDNN's convolutions and pooling run much faster on NHWC tensors (flax's layout);
torch's own default is NCHW. :func:`choose_memory_format` decides, from the request, the
device and the model's parameters, which layout a training run uses, and
:func:`verify_memory_format` checks once, on the first batch, that the model's forward runs
in it. The ``Trainer`` calls the first when it is built and the second on the first batch
it sees, and places parameters, optimizer state and batches with :func:`fnnet.place`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from . import tree as _tree
from .batch import split_batch
from .device import place
from ._functional import Model

__all__ = ["MEMORY_FORMATS", "check_memory_format", "choose_memory_format", "verify_memory_format"]

MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format, "preserve": None}


def check_memory_format(spec: Any) -> Any:
    """``spec`` if it is a valid layout request (``"auto"``, a name of :data:`MEMORY_FORMATS` or a
    ``torch.memory_format``), else a ``ValueError`` listing the valid ones."""
    if isinstance(spec, torch.memory_format) or spec == "auto" or spec in MEMORY_FORMATS:
        return spec
    raise ValueError(f"memory_format must be 'auto', {', '.join(map(repr, MEMORY_FORMATS))} or a torch.memory_format, "
                     f"got {spec!r}")


def choose_memory_format(spec: Any, params: Any, device: torch.device) -> torch.memory_format | None:
    """The layout 4-D tensors (conv weights, image batches) train in; ``None`` leaves them as they are.

    * ``"auto"``: channels-last on CPU for models with 4-D parameters; otherwise (other
      devices, no convolutions) ``None``.
    * ``"channels_last"`` / ``"contiguous"`` / a ``torch.memory_format``: that layout;
      ``"preserve"``: ``None``.
    """
    check_memory_format(spec)
    if isinstance(spec, torch.memory_format):
        return None if spec is torch.preserve_format else spec
    if spec == "auto":
        conv = any(isinstance(t, torch.Tensor) and t.ndim == 4 for t in _tree.leaves(params))
        return torch.channels_last if (conv and device.type == "cpu") else None
    return MEMORY_FORMATS[spec]


def verify_memory_format(spec: Any, chosen: torch.memory_format | None, model: Model, params: Any, buffers: Any,
                         batch: Any, device: torch.device) -> torch.memory_format | None:
    """``chosen``, after checking on one batch that the model's forward runs in it.

    Code written for NCHW tensors can fail on NHWC ones (``x.view(n, -1)`` after a conv; write
    ``x.flatten(1)`` or ``reshape``). For a channels-last layout the forward is tried once on
    ``batch``'s inputs: if it fails there but runs in NCHW, a request of ``"auto"`` warns
    (naming the fix) and returns ``torch.contiguous_format``, and an explicit channels-last
    request raises ``ValueError``. A forward that fails in both layouts is not a layout
    problem: the training step will report it.
    """
    if chosen not in (torch.channels_last, torch.channels_last_3d):
        return chosen
    try:
        inputs, _ = split_batch(batch)
    except ValueError:
        return chosen

    def forward(layout: torch.memory_format) -> None:
        with torch.no_grad():
            model.apply(place(params, device, memory_format=layout), place(inputs, device, memory_format=layout),
                        buffers=buffers)

    try:
        forward(chosen)
        return chosen
    except RuntimeError as err:
        error = err
    try:
        forward(torch.contiguous_format)
    except RuntimeError:
        return chosen
    hint = (f"{model.module_type}'s forward fails on channels-last tensors ({str(error).splitlines()[0]}); "
            "write .reshape(...) or .flatten(1) instead of .view(...) to keep the faster layout")
    if spec != "auto":
        raise ValueError(f"memory_format=channels_last: {hint}, or pass memory_format='contiguous'") from error
    warnings.warn(f"fnnet: {hint}; training in the contiguous (NCHW) layout instead "
                  "(memory_format='contiguous' silences this)", stacklevel=4)
    return torch.contiguous_format
