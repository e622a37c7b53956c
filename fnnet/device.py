"""Devices and placement: the one way fnnet moves data between CPU and accelerators.

``place(tree, device)`` replaces the chapter's ``.to(device)`` / ``.cuda()`` calls for single
tensors, parameter dicts, optimizer states and whole batches alike.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, Union

import torch

from . import tree as _tree

__all__ = [
    "DeviceLike",
    "devices",
    "device_count",
    "default_device",
    "existing_devices",
    "resolve_device",
    "parse_devices",
    "tree_device",
    "place",
    "empty_cache",
    "memory_stats",
    "synchronize",
    "device_info",
]

DeviceLike = Union[torch.device, str, int]


def device_count() -> int:
    """Number of visible CUDA devices (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def devices() -> list[torch.device]:
    """Every visible accelerator (``cuda:0``, ``cuda:1``, ...), or ``[cpu]`` when there is none."""
    n = device_count()
    if n == 0:
        return [torch.device("cpu")]
    return [torch.device("cuda", i) for i in range(n)]


def default_device() -> torch.device:
    """``cuda:0`` when CUDA is available, else ``cpu``."""
    return torch.device("cuda", 0) if device_count() > 0 else torch.device("cpu")


def existing_devices() -> str:
    """The devices this machine has, as text for error messages: ``"cpu, cuda:0"``."""
    names = ["cpu"] + [f"cuda:{i}" for i in range(device_count())]
    return ", ".join(names)


def resolve_device(device: DeviceLike | None) -> torch.device:
    """Turn any accepted spelling into a concrete ``torch.device`` that exists on this machine.

    Accepted: a ``torch.device``, ``"cpu"``, ``"cuda"`` (= ``cuda:0``), ``"cuda:N"``, an int
    index ``N`` (= ``cuda:N``), ``"auto"`` or ``None`` (= :func:`default_device`); strings in any
    case. Anything else, or a device this machine does not have, raises ``ValueError`` listing
    the devices that exist. (An int here is a device *index*; ``Trainer(devices=N)`` takes a
    device *count*, as Lightning's ``gpus=N`` did: ``0`` there means the CPU.)
    """
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return default_device()
    if isinstance(device, bool):
        raise TypeError(f"device must be a torch.device, str or int, not bool ({device!r})")
    if isinstance(device, int):
        if device < 0:
            raise ValueError(f"device index {device} is negative; devices here: {existing_devices()}")
        dev = torch.device("cuda", device)
    elif isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str):
        try:
            dev = torch.device(device.strip().lower())
        except RuntimeError:
            raise ValueError(
                f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'. "
                f"devices here: {existing_devices()}"
            ) from None
    else:
        raise TypeError(f"device must be a torch.device, str or int, not {type(device).__name__}")

    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda":
        n = device_count()
        index = 0 if dev.index is None else dev.index
        if n == 0:
            raise ValueError(f"device {device!r} was asked for but CUDA is not available; devices here: {existing_devices()}")
        if index >= n:
            raise ValueError(f"device {device!r} does not exist ({n} CUDA device(s)); devices here: {existing_devices()}")
        return torch.device("cuda", index)
    raise ValueError(f"device type {dev.type!r} ({device!r}) is not supported by fnnet; devices here: {existing_devices()}")


def parse_devices(devices: Any) -> list[torch.device]:
    """The devices a ``Trainer(devices=...)`` request names (the chapter's Lightning ``gpus=`` meanings).

    * ``"auto"`` (a GPU when there is one, else the CPU), ``"cpu"``, ``"cuda"`` / ``"gpu"`` /
      ``"cuda:N"``, a ``torch.device``: that one device;
    * an int is a *count*: ``0`` = the CPU, ``n`` = the first ``n`` GPUs, ``-1`` = every GPU;
    * a list: GPU indices (``[0, 1]``) and/or device names (``["cuda:0", "cuda:1"]``,
      ``["cpu", "cpu"]``), in the order given.

    A GPU index listed twice (``[0, 0]``) is an error; an explicit device *name* may repeat
    (``["cpu", "cpu"]``, ``["cuda:0", "cuda:0"]``): several shards on one device, which is how
    the data-parallel path runs (and is tested) on a machine with one device. A request this
    machine cannot satisfy raises ``ValueError`` listing the devices that exist.
    """
    if isinstance(devices, bool):
        raise TypeError(f"devices must be 'auto', 'cpu', 'cuda', an int or a list, not {devices!r}")
    if devices is None or isinstance(devices, (str, torch.device)):
        spelled = "cuda" if isinstance(devices, str) and devices.strip().lower() in ("gpu", "gpus") else devices
        try:
            return [resolve_device(spelled)]
        except ValueError as exc:
            raise ValueError(f"devices={devices!r}: {exc}") from None
    n = device_count()
    if isinstance(devices, int):
        if devices == 0:
            return [torch.device("cpu")]
        if devices == -1:
            if n == 0:
                raise ValueError(f"devices=-1 asks for every GPU, but this machine has none; devices here: {existing_devices()}")
            return [torch.device("cuda", i) for i in range(n)]
        if devices < -1:
            raise ValueError(f"devices={devices} is not valid: use 0 (CPU), a GPU count >= 1, or -1 (all GPUs)")
        if devices > n:
            raise ValueError(f"devices={devices} asks for {devices} GPU(s) but this machine has {n}; "
                             f"devices here: {existing_devices()}")
        return [torch.device("cuda", i) for i in range(devices)]
    if isinstance(devices, (list, tuple)):
        if not devices:
            raise ValueError("devices=[] names no device; use 0 or 'cpu' for the CPU")
        out, indices = [], []
        for entry in devices:
            if isinstance(entry, bool) or not isinstance(entry, (int, str, torch.device)):
                raise TypeError(f"devices={list(devices)}: entries are GPU indices or device names, got {entry!r}")
            if isinstance(entry, int):
                if not 0 <= entry < n:
                    raise ValueError(f"devices={list(devices)}: GPU {entry} does not exist; devices here: {existing_devices()}")
                indices.append(entry)
                out.append(torch.device("cuda", entry))
            else:
                try:
                    out.append(resolve_device(entry))
                except ValueError as exc:
                    raise ValueError(f"devices={list(devices)}: {exc}") from None
        twice = sorted({i for i in indices if indices.count(i) > 1})
        if twice:
            raise ValueError(
                f"devices={list(devices)} names GPU {twice[0]} twice; to put several shards on one device on "
                f"purpose, name it explicitly (devices=['cuda:{twice[0]}', 'cuda:{twice[0]}'])"
            )
        return out
    raise TypeError(f"devices must be 'auto', 'cpu', 'cuda', an int or a list, not {type(devices).__name__}")


def tree_device(tree: Any) -> torch.device:
    """The device of the first tensor leaf of ``tree`` (where its counters live); CPU if it has none."""
    for leaf in _tree.leaves(tree):
        if isinstance(leaf, torch.Tensor):
            return leaf.device
    return torch.device("cpu")


# The tensor rank each layout applies to (None: no relayout).
_LAYOUT_RANKS = {torch.channels_last: 4, torch.channels_last_3d: 5, torch.contiguous_format: 4, torch.preserve_format: None}


def place(tree: Any, device: DeviceLike | None, *, non_blocking: bool = False,
          memory_format: torch.memory_format | None = None) -> Any:
    """Return ``tree`` with every tensor leaf on ``device``; other leaves pass through.

    A leaf already on ``device`` (and, with ``memory_format``, already in that layout) is
    returned as is (no copy), so placing twice is free. The structure is unchanged.
    ``non_blocking=True`` overlaps host-to-device copies with compute (pin the source memory
    for it to matter). ``memory_format=torch.channels_last`` also lays out every 4-D tensor
    leaf (conv weights, image batches) as NHWC, the layout flax uses and in which oneDNN's CPU
    convolutions and pooling run fastest (``torch.channels_last_3d`` does the same for 5-D
    leaves, ``torch.contiguous_format`` puts 4-D leaves back in NCHW); tensors of other ranks
    keep their layout. See :func:`resolve_device` for the device spellings.
    """
    dev = resolve_device(device)
    if memory_format is not None and memory_format not in _LAYOUT_RANKS:
        raise TypeError(
            "memory_format must be torch.channels_last (4-D leaves), torch.channels_last_3d (5-D leaves), "
            f"torch.contiguous_format (4-D leaves), torch.preserve_format or None, got {memory_format!r}"
        )
    rank = _LAYOUT_RANKS.get(memory_format)

    def move(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            if _holds_tensors(x):
                path = next(p for p, leaf in _tree.leaves_with_path(tree) if leaf is x)
                raise TypeError(
                    f"place: the leaf at '{path}' is a {type(x).__name__} holding tensors, which fnnet.tree does not "
                    "see into, so they would not be moved; register the class (fnnet.tree.register_dataclass) "
                    "or pass a dict, list or tuple"
                )
            return x
        if rank is not None and x.ndim == rank:
            return x.to(dev, non_blocking=non_blocking, memory_format=memory_format)
        if x.device != dev:
            return x.to(dev, non_blocking=non_blocking)
        return x

    return _tree.map(move, tree)


def _holds_tensors(x: Any, depth: int = 0) -> bool:
    """Whether a leaf that is not a tensor is a container (a mapping, a dataclass, a sequence) holding some."""
    if isinstance(x, torch.Tensor):
        return True
    if depth > 3 or isinstance(x, (str, bytes, int, float, bool)) or x is None:
        return False
    if isinstance(x, Mapping):
        children: Any = x.values()
    elif dataclasses.is_dataclass(x) and not isinstance(x, type):
        children = (getattr(x, f.name, None) for f in dataclasses.fields(x))
    elif isinstance(x, (list, tuple, set, frozenset)):
        children = x
    else:
        return False
    return any(_holds_tensors(c, depth + 1) for c in children)


def synchronize(device: DeviceLike | None = None) -> None:
    """Wait for all queued work on ``device`` (no-op on CPU); use it before reading a timer."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def empty_cache() -> None:
    """Release cached, unused accelerator memory back to the driver (no-op on CPU)."""
    if device_count() > 0:
        torch.cuda.empty_cache()


def memory_stats(device: DeviceLike | None = None) -> dict[str, int]:
    """``{"allocated": bytes, "reserved": bytes, "max_allocated": bytes}`` on ``device``.

    On CPU torch keeps no allocator statistics: every count is 0.
    """
    dev = resolve_device(device)
    if dev.type == "cuda":
        return {
            "allocated": torch.cuda.memory_allocated(dev),
            "reserved": torch.cuda.memory_reserved(dev),
            "max_allocated": torch.cuda.max_memory_allocated(dev),
        }
    return {"allocated": 0, "reserved": 0, "max_allocated": 0}


def device_info() -> dict[str, Any]:
    """What ``fnnet info`` prints: torch version, CUDA, each device's name and memory, threads."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
        "device_count": device_count(),
        "default_device": str(default_device()),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "devices": [],
    }
    for i in range(device_count()):
        props = torch.cuda.get_device_properties(i)
        info["devices"].append(
            {
                "index": i,
                "name": props.name,
                "total_memory_bytes": props.total_memory,
                "capability": f"{props.major}.{props.minor}",
                "multiprocessors": props.multi_processor_count,
            }
        )
    return info
