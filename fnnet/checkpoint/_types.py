"""The classes a checkpoint may rebuild without ``like=``: a registry from stable tags to fnnet's own classes.

A file names a class by its tag (``"fnnet.TrainState"``), never by an import path, and
:func:`class_of` only looks the tag up in this table: nothing a file says is imported, run or
reached through a module's attributes. A tag stays the same when its class moves between
modules, so files survive a refactoring.

Adding a state class (an accumulator, a new optimizer state): add it to :data:`_FNNET` below,
or, from a module that sits above ``fnnet.checkpoint``, call :func:`fnnet.checkpoint.register`.
Imports point down: this module imports ``state``, ``optim`` and ``metrics``, never the reverse.
"""

from __future__ import annotations

from typing import Any

import optree

from .. import tree as _tree
from ..metrics import MeanState
from ..optim import base as _base, master as _master, transforms as _transforms
from ..state import Accumulation, DynamicScale, TrainState

_FNNET: dict[str, type] = {
    "fnnet.TrainState": TrainState,
    "fnnet.DynamicScale": DynamicScale,
    "fnnet.Accumulation": Accumulation,
    "fnnet.optim.EmptyState": _base.EmptyState,
    "fnnet.optim.ScaleByLearningRateState": _base.ScaleByLearningRateState,
    "fnnet.optim.ScaleByScheduleState": _base.ScaleByScheduleState,
    "fnnet.optim.ScaleByAdamState": _transforms.ScaleByAdamState,
    "fnnet.optim.ScaleByRmsState": _transforms.ScaleByRmsState,
    "fnnet.optim.ScaleByRStdDevState": _transforms.ScaleByRStdDevState,
    "fnnet.optim.ScaleByRssState": _transforms.ScaleByRssState,
    "fnnet.optim.TraceState": _transforms.TraceState,
    "fnnet.optim.MaskedState": _transforms.MaskedState,
    "fnnet.optim.MultiStepsState": _transforms.MultiStepsState,
    "fnnet.optim.MasterWeightsState": _master.MasterWeightsState,
    "fnnet.metrics.MeanState": MeanState,
}

# Format 2 files (fnnet 0.2) named classes ``module:qualname``. These are the exact names that
# release wrote; each is read as the tag it stands for, and any other name is refused.
LEGACY_NAMES: dict[str, str] = {
    "fnnet.state:TrainState": "fnnet.TrainState",
    "fnnet.state:DynamicScale": "fnnet.DynamicScale",
    "fnnet.optim._common:EmptyState": "fnnet.optim.EmptyState",
    "fnnet.optim.base:ScaleByLearningRateState": "fnnet.optim.ScaleByLearningRateState",
    "fnnet.optim.base:ScaleByScheduleState": "fnnet.optim.ScaleByScheduleState",
    "fnnet.optim.transforms:ScaleByAdamState": "fnnet.optim.ScaleByAdamState",
    "fnnet.optim.transforms:ScaleByRmsState": "fnnet.optim.ScaleByRmsState",
    "fnnet.optim.transforms:ScaleByRStdDevState": "fnnet.optim.ScaleByRStdDevState",
    "fnnet.optim.transforms:ScaleByRssState": "fnnet.optim.ScaleByRssState",
    "fnnet.optim.transforms:TraceState": "fnnet.optim.TraceState",
    "fnnet.optim.transforms:MaskedState": "fnnet.optim.MaskedState",
    "fnnet.optim.transforms:MultiStepsState": "fnnet.optim.MultiStepsState",
    "fnnet.metrics:MeanState": "fnnet.metrics.MeanState",
}

_CLASSES: dict[str, type] = {}
_TAGS: dict[type, str] = {}


def _is_container(cls: Any) -> bool:
    if not isinstance(cls, type):
        return False
    entry = optree.register_pytree_node.get(cls, namespace=_tree.NAMESPACE)
    # namespace "": optree's built-in containers (dict, list...), which a file stores as themselves
    return optree.is_namedtuple_class(cls) or (entry is not None and entry.namespace == _tree.NAMESPACE)


def register(tag: str, cls: type) -> type:
    """Let :func:`fnnet.load` rebuild ``cls`` without ``like=``, from files that name it ``tag``.

    ``cls`` is a ``NamedTuple`` or a class registered with :func:`fnnet.tree.register_dataclass`
    / :func:`fnnet.tree.register`; ``tag`` is a stable name (fnnet's own start with ``"fnnet."``)
    that :func:`fnnet.save` writes instead of an import path, so keep it when the class moves.
    Registering the same pair again is a no-op. Returns ``cls``.

    Raises:
        TypeError: ``cls`` is not such a container class, or ``tag`` is not a non-empty string.
        ValueError: ``tag`` already names another class, or ``cls`` already has another tag.
    """
    if not isinstance(tag, str) or not tag:
        raise TypeError(f"register: the tag must be a non-empty string, got {tag!r}")
    if not _is_container(cls):
        raise TypeError(f"register: {getattr(cls, '__qualname__', cls)!r} is neither a NamedTuple nor a class "
                        "registered with fnnet.tree.register_dataclass / fnnet.tree.register")
    if _CLASSES.get(tag, cls) is not cls:
        raise ValueError(f"register: the tag {tag!r} already names {_describe(_CLASSES[tag])}; choose another tag")
    if _TAGS.get(cls, tag) != tag:
        raise ValueError(f"register: {_describe(cls)} is already registered as {_TAGS[cls]!r}")
    _CLASSES[tag] = cls
    _TAGS[cls] = tag
    return cls


def _describe(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def tag_of(cls: type) -> str | None:
    """The tag :func:`fnnet.save` writes for ``cls``; ``None`` for a class that is not registered."""
    return _TAGS.get(cls)


def class_of(tag: Any) -> type | None:
    """The registered class of ``tag``; ``None`` for anything else (nothing is imported)."""
    return _CLASSES.get(tag) if isinstance(tag, str) else None


def known_tags() -> list[str]:
    return sorted(_CLASSES)


for _tag, _cls in _FNNET.items():
    register(_tag, _cls)
