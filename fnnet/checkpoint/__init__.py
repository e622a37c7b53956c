"""Checkpoints: any pytree of tensors as one safetensors file, written atomically and checksummed.

``save(path, tree)`` writes every tensor leaf under its dotted key path (``"params.layers.0.weight"``)
and the tree's structure, as JSON, in the file's metadata; ``load(path)`` rebuilds the tree, and
``load(path, like=tree)`` restores into ``like``'s structure after checking every key path,
shape and dtype (``orbax``'s ``restore(item=...)``, ``flax.serialization.from_bytes(target, ...)``,
equinox's ``tree_deserialise_leaves(path, like)``).

What a checkpoint can hold
--------------------------
Containers: ``dict`` and ``OrderedDict`` (keys: str, int, float, bool or None), ``list``,
``tuple``, ``None``, ``NamedTuple``\\ s and classes registered with
:func:`fnnet.tree.register_dataclass` / :func:`fnnet.tree.register`. Leaves: tensors (any dense
dtype safetensors knows, ``bfloat16`` and ``bool`` included), ``int``, ``float`` (``nan``/``inf``
too), ``bool``, ``str`` and :class:`fnnet.random.Key`. Tensors are saved from the CPU,
contiguous and unshared: a view or a tensor that shares storage with another is copied
first, so tied weights come back as two equal tensors.

Safety
------
Loading never unpickles, never imports anything and never runs code a file chooses. A file
names a class by a stable tag (``"fnnet.TrainState"``), never by an import path, and without
``like=`` only plain containers and the classes registered under those tags are rebuilt:
fnnet's own ``TrainState``, ``DynamicScale`` and optimizer and metric states (see
:func:`register`). Any other class is an error naming the file and the tag and asking for
``like=``, which takes every container from ``like`` and only tensors and plain values from
the file. Files of fnnet 0.2 (format 2, classes named ``module:qualname``) load through a
fixed table of the names that release wrote. Every read checks the file's checksums (see
``_file.py``): a changed byte anywhere, or a truncated file, is an error naming the file,
never silently wrong weights. The checksums guard integrity, not authenticity: they are
unkeyed, so whoever crafts a file can compute them too; the safety above comes from
rebuilding nothing unlisted. A plain safetensors file (no fnnet metadata, e.g. written from
JAX) loads as a flat ``{name: tensor}`` dict.

Interop with ``torch.nn.Module``
--------------------------------
``fnnet.Model.params`` is already keyed like ``state_dict()``, so
``module.load_state_dict(load(path).params, strict=False)`` works for a saved ``TrainState``
(``strict=False`` when the module has buffers, which fnnet keeps apart in ``state.buffers``).
:func:`to_state_dict` flattens nested param trees to such a dict; :func:`load_state_dict`
reads a ``torch.save``\\ d ``state_dict`` (with ``weights_only=True``) or a safetensors file as
a flat dict of tensors, and strips the ``module.`` prefix that ``nn.DataParallel`` and DDP
put on every key.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
import zipfile
from typing import Any, Mapping, Union

import torch

from .. import tree as _tree
from ..device import DeviceLike, place, resolve_device
from . import _codec, _file
from ._types import register

__all__ = ["save", "load", "load_state_dict", "to_state_dict", "register"]

PathLike = Union[str, "os.PathLike[str]"]


def save(path: PathLike, tree: Any, *, sharded: bool = False, parts: Mapping[str, Any] | None = None,
         group: Any = None, async_save: bool = False) -> Any:
    """Write ``tree`` (any pytree of tensors and plain values) to ``path`` as one safetensors file,
    or, with ``sharded=True``, as a sharded checkpoint folder every rank writes its part of.

    Tensors are keyed by their dotted key path (``fnnet.tree.paths``) and the structure goes
    into the metadata, so :func:`load` rebuilds the same tree (tensors on the CPU). The write
    is atomic: the file is written to a temporary name in the same folder, flushed, fsynced
    and renamed over ``path`` (then the folder is fsynced); if anything fails, the temporary
    file is removed and an existing checkpoint at ``path`` is left as it was. Missing parent
    folders are created. The suffix ``.safetensors`` is conventional but not required.

    ``sharded=True`` (collective: every rank calls it with its own ``tree``) is
    :func:`fnnet.checkpoint.sharded.save_sharded`: ``parts`` maps key paths of ``tree`` to
    ``(lo, hi, whole shape)``, the leaves that are this rank's range of a whole leaf (from your own
    loop: ``state, parts = step.local_parts(state)``, the key paths prefixed as in ``tree``); every
    other leaf is whole and the same on every rank of ``group`` (``None``: the default group, or one
    process). The folder is complete once its manifest is written, last; ``async_save=True`` copies
    this rank's pieces to host memory and writes them in a background thread. Matches
    ``torch.distributed.checkpoint.save`` (and orbax's ``CheckpointManager.save``); :func:`load`
    reads the folder back at any world size and layout.

    Returns:
        ``None`` for a file; with ``sharded=True`` a :class:`fnnet.checkpoint.sharded.SaveHandle`
        whose ``wait()`` returns once the folder is complete (at once for a synchronous save) and
        raises a background save's error.

    Raises:
        TypeError: a leaf that cannot be saved, naming its key path; a value of ``parts`` that is no
            ``(int lo, int hi, tuple of ints)``.
        ValueError: two leaves with the same dotted key path, or a tree that contains itself;
            ``parts``, ``group`` or ``async_save`` without ``sharded=True``; for a sharded save, a
            part's range that does not fit its whole shape, ranks' ranges of a part leaf that leave a
            gap or overlap, ranks holding different leaves, an unfinished accumulation window
            (``state.accum``) on several ranks, or non-finite values on any rank (every rank raises,
            naming the ranks and key paths): nothing is written, not even a hidden ``.partial`` folder.
        RuntimeError: (sharded) a rank failed to write its part (every rank raises, naming it; no
            manifest is written).
        IsADirectoryError, NotADirectoryError, PermissionError: ``path`` is a folder, its
            parent is a file, or it is a read-only file (its permissions are respected).
    """
    if sharded:
        from .sharded import save_sharded

        return save_sharded(path, tree, parts=parts, group=group, async_save=async_save)
    given = [k for k, v in (("parts", parts), ("group", group), ("async_save", async_save)) if v not in (None, False)]
    if given:
        raise ValueError(f"fnnet.save: {given} apply to a sharded checkpoint only: pass sharded=True (a folder every "
                         "rank writes its part of), or leave them out for one whole file")
    path = os.fspath(path)
    encoder = _codec.Encoder()
    structure = encoder.node(tree)
    _file.write(path, encoder.tensors, structure)


def load(path: PathLike, like: Any = None, device: DeviceLike | None = None, *,
         parts: Mapping[str, Any] | None = None) -> Any:
    """Read a checkpoint written by :func:`save`: a file, or a sharded checkpoint folder.

    Without ``like`` the saved tree is rebuilt as it was (plain containers and fnnet's own
    types; see the module docstring); its tensors are on the CPU, or on ``device``. A plain
    safetensors file without fnnet metadata loads as ``{name: tensor}``.

    With ``like`` (e.g. a freshly created ``TrainState``), the result has ``like``'s structure
    and the file's leaves, matched by dotted key path; every tensor must have ``like``'s shape
    and dtype and every other leaf ``like``'s type. All problems -- missing, unexpected,
    shape-, dtype- and type-mismatched key paths -- are listed in one ``ValueError``. Each
    tensor goes to ``device`` if given, else to the device of the matching tensor in ``like``
    (so ``load(path, like=state)`` resumes on the devices the state lives on).

    A folder (``save(path, tree, sharded=True)``, ``Trainer.save(path, sharded=True)``) is read by
    :func:`fnnet.checkpoint.sharded.load_sharded`, whatever world size and layout wrote it: without
    ``like`` the whole tree; with ``like`` and ``parts`` (``{key path: (lo, hi, whole shape)}``, this
    rank's layout: ``like, parts = step.local_parts(state)``) each listed leaf gets only its range of
    the whole leaf, so a checkpoint of any strategy loads into any other (not collective; matches
    ``torch.distributed.checkpoint.load``, which reshards too).

    Raises:
        FileNotFoundError, IsADirectoryError, PermissionError: no readable file at ``path`` (a
            folder holding neither a manifest nor part files is no checkpoint).
        ValueError: a truncated or corrupted file (naming it), a mismatch with ``like``, or a
            class that is not registered (naming its tag), which needs ``like``; for a folder: no
            manifest (a save that did not finish), a missing, stray or foreign part (naming it);
            ``parts`` for a file.
    """
    if os.path.isdir(os.fspath(path)):
        from .sharded import MANIFEST, load_sharded

        if not any(e == MANIFEST or e.startswith("part-") for e in os.listdir(path)):
            raise IsADirectoryError(f"fnnet.load: '{os.fspath(path)}' is a folder that is no checkpoint: neither a "
                                    f"file nor a sharded checkpoint folder (no manifest '{MANIFEST}', no part files)")
        out = load_sharded(path, like, parts=parts, device=device)
        return place(out, resolve_device(device)) if like is None and device is not None else out
    if parts is not None:
        raise ValueError(f"fnnet.load('{os.fspath(path)}'): parts= reads ranges of a sharded checkpoint folder; "
                         "this is a file (a whole checkpoint): load it without parts and cut it with "
                         "step.shard_state(state)")
    path = os.fspath(path)
    _file.check_exists(path, "checkpoint")
    dev = resolve_device(device) if device is not None else None
    tensors, metadata = _file.read(path)
    try:
        structure = json.loads(metadata[_file.META_TREE]) if _file.META_TREE in metadata else None
        if structure is not None and not isinstance(structure, dict):
            raise _codec.CorruptStructure("not a JSON object")
        if structure is not None and metadata.get(_file.META_FORMAT) == "2":
            structure = _codec.from_format_2(structure)
        if like is None:
            if structure is None:
                return place(dict(tensors), dev) if dev is not None else dict(tensors)
            result = _codec.decode(structure, tensors)
            _check_all_used(path, structure, tensors)
            return result if dev is None else place(result, dev)
        saved = dict(tensors) if structure is None else _codec.flatten_saved(structure, tensors)
    except ValueError as exc:
        if isinstance(exc, _codec.CorruptStructure) or isinstance(exc, json.JSONDecodeError):
            raise ValueError(f"'{path}': the tree structure metadata is corrupted ({exc})") from None
        raise ValueError(f"'{path}': {exc}") from None
    except (KeyError, TypeError, AttributeError, IndexError, RecursionError) as exc:
        raise ValueError(f"'{path}': the tree structure metadata is corrupted ({type(exc).__name__}: {exc})") from None
    return _restore_like(path, saved, like, dev)


def _check_all_used(path: str, structure: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    leaves = _codec.flatten_saved(structure, tensors)
    used = {k for k, v in leaves.items() if isinstance(v, torch.Tensor)}
    extra = sorted(set(tensors) - used)
    if extra:
        raise _codec.CorruptStructure(f"tensors {extra} are not part of the saved tree structure")


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor {str(x.dtype).replace('torch.', '')}{list(x.shape)}"
    return type(x).__name__


def _restore_like(file: str, saved: Mapping[str, Any], like: Any, device: torch.device | None) -> Any:
    like_leaves, spec = _tree.flatten_with_path(like)
    missing, shape_bad, dtype_bad, kind_bad = [], [], [], []
    out = []
    for p, ref in like_leaves:
        if p not in saved:
            missing.append(p)
            out.append(None)
            continue
        got = saved[p]
        if isinstance(ref, torch.Tensor) != isinstance(got, torch.Tensor) or (
            not isinstance(ref, torch.Tensor) and type(ref) is not type(got)
        ):
            kind_bad.append(f"{p}: file has {_describe(got)}, like has {_describe(ref)}")
        elif isinstance(ref, torch.Tensor):
            if got.shape != ref.shape:
                shape_bad.append(f"{p}: file {tuple(got.shape)}, like {tuple(ref.shape)}")
            if got.dtype != ref.dtype:
                dtype_bad.append(f"{p}: file {got.dtype}, like {ref.dtype}")
            target = device if device is not None else (ref.device if ref.device.type != "meta" else None)
            if target is not None and got.device != target:
                got = got.to(target)
        out.append(got)
    known = {p for p, _ in like_leaves}
    unexpected = [p for p in saved if p not in known]
    if missing or unexpected or shape_bad or dtype_bad or kind_bad:
        lines = [f"checkpoint '{file}' does not match `like`:"]
        if missing:
            lines.append("  missing (in like, not in the file): " + ", ".join(missing))
        if unexpected:
            lines.append("  unexpected (in the file, not in like): " + ", ".join(unexpected))
        for title, items in (("shape mismatch", shape_bad), ("dtype mismatch", dtype_bad), ("type mismatch", kind_bad)):
            lines += [f"  {title}: {item}" for item in items]
        raise ValueError("\n".join(lines))
    return _tree.unflatten(spec, out)


# -- torch state_dict interop ---------------------------------------------------------------------


def to_state_dict(tree: Any) -> dict[str, torch.Tensor]:
    """A flat ``{dotted key path: tensor}`` dict of ``tree``, for ``nn.Module.load_state_dict``.

    ``fnnet.Model.params`` is already flat (``{"layers.0.weight": ...}``) and comes back as is;
    a nested tree ``{"layers": [{"weight": w}]}`` becomes ``{"layers.0.weight": w}``. The reverse,
    a ``module.state_dict()`` into fnnet params, needs no conversion: the flat dict *is* the
    params format (split off the buffers: ``{k: sd[k] for k in model.params}``).
    """
    out: dict[str, torch.Tensor] = {}
    bad = []
    for p, leaf in _tree.leaves_with_path(tree):
        if not isinstance(leaf, torch.Tensor):
            bad.append(f"{p} ({type(leaf).__name__})")
        elif p in out:
            raise ValueError(f"to_state_dict: two tensors have the key path '{p}'")
        else:
            out[p] = leaf
    if bad:
        raise TypeError(f"to_state_dict: a state_dict holds tensors only; these leaves are not: {', '.join(bad)}")
    return out


def _is_safetensors(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 8 + n <= os.path.getsize(path)


_WRAPPER_PREFIX = "module."


def load_state_dict(path: PathLike, *, prefix: str = "") -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` dict (on the CPU) from a ``torch.save`` file or a safetensors file.

    ``torch.save(module.state_dict(), path)`` files are read with
    ``torch.load(path, map_location="cpu", weights_only=True)`` -- never with unrestricted
    pickle -- and nested dicts are flattened to dotted names. A safetensors file (an fnnet
    checkpoint included) gives its tensors by name. A state dict saved from a model wrapped
    in ``nn.DataParallel`` or ``DistributedDataParallel`` (the chapter's
    ``net.module.state_dict()`` forgotten: every key starts with ``module.``) comes back with
    the prefix stripped, with a warning saying so. ``prefix`` keeps only the names that start
    with it, with the prefix removed: ``load_state_dict("ckpt.safetensors", prefix="params.")``
    is the params part of a saved ``TrainState``, ready for ``module.load_state_dict``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is damaged, is not a dict of tensors, needs unrestricted pickle,
            or no name starts with ``prefix``.
    """
    path = os.fspath(path)
    _file.check_exists(path, "state_dict file")
    if _is_safetensors(path):
        flat = _file.read(path)[0]
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ValueError(
                f"'{path}' needs more than weights_only=True unpickling, which fnnet refuses: save "
                f"module.state_dict() (not the module) with torch.save. ({str(exc).splitlines()[0]})"
            ) from None
        except PermissionError:
            raise PermissionError(f"cannot read '{path}': permission denied") from None
        except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
            raise ValueError(
                f"'{path}' ({os.path.getsize(path)} bytes) is neither a safetensors file nor a readable "
                f"torch.save file: truncated or corrupted? ({type(exc).__name__}: {exc})"
            ) from None
        if isinstance(obj, torch.Tensor) or not isinstance(obj, Mapping):
            raise ValueError(f"'{path}' holds a {type(obj).__name__}, not a state_dict (a dict of tensors)")
        try:
            flat = to_state_dict(obj)
        except TypeError as exc:
            raise ValueError(f"'{path}': {exc}") from None
    if flat and all(k.startswith(_WRAPPER_PREFIX) for k in flat):
        warnings.warn(
            f"load_state_dict('{path}'): every key starts with 'module.' (saved from an nn.DataParallel or "
            "DistributedDataParallel wrapper); the prefix was stripped", stacklevel=2)
        flat = {k[len(_WRAPPER_PREFIX):]: v for k, v in flat.items()}
    if prefix:
        found = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
        if not found:
            tops = sorted({k.split(".", 1)[0] + "." for k in flat})
            raise ValueError(f"'{path}': no tensor name starts with {prefix!r}; names start with {tops}")
        return found
    return flat
