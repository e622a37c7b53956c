"""Sharded checkpoints: every rank writes the part of the state it holds, and any layout reads its own.

A sharded checkpoint is a folder::

    ckpt/
      part-00000-of-00002.safetensors   # rank 0's pieces (an ordinary fnnet file: checksummed, atomic)
      part-00001-of-00002.safetensors   # rank 1's pieces
      fnnet-checkpoint.json             # the manifest, written last: the folder is complete once it exists

Each leaf of the saved tree is either *whole* (the same on every rank: parameters, keys, a step
count; written once, by one rank, the ranks taking turns by size) or a *part*: the range
``[lo, hi)`` of the flattened elements of a whole leaf (ZeRO-2's optimizer state, ZeRO-3's
parameters and optimizer state; a strategy says which through
:meth:`fnnet.step.TrainStep.local_parts`). Identical parts on several ranks (HSDP's replicas) are
written once. The manifest names every leaf's whole shape and dtype and the
file, name and range of each of its pieces, the tree's structure (fnnet's JSON, never pickle),
the run that wrote the folder and the SHA-256 digest of every part file.

Writing (:func:`save_sharded`, collective): every rank writes its file atomically (temporary,
fsync, rename, folder fsync) into a hidden folder ``.<name>.<run>.partial`` next to the target;
the ranks then confirm to each other that every file is durable; only then rank 0 writes the
manifest (temporary, fsync, rename) and moves the folder into place (the old one aside first,
then removed). A crash at any point leaves either the old checkpoint or the new complete one,
plus a ``.partial`` folder without manifest that :func:`load_sharded` refuses and the next save
into the same parent folder removes. ``async_save=True`` copies what this rank writes to host
memory and returns a :class:`SaveHandle`; the writing, the confirmation (on a process group of
its own) and the manifest happen in a background thread, in the same order.

Reading (:func:`load_sharded`, not collective): any rank reads, from whichever files hold them,
the whole leaves and the ranges its own layout needs, so a checkpoint written by any strategy at
any world size loads into any other. torch's ``torch.distributed.checkpoint`` (DCP) does the same
with a pickled ``.metadata`` file; fnnet keeps its promise that loading never unpickles, and
ZeRO-2's ranges (buckets cut across parameters, uneven and often empty per leaf) are not a
DTensor placement, so they are written as flat ranges with their offsets.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import re
import shutil
import threading
import uuid
import weakref
from typing import Any, Mapping, NamedTuple

import optree
import torch

from .. import tree as _tree
from ..state import Accumulation, host_finite
from . import _codec, _file

__all__ = ["MANIFEST", "Part", "SaveHandle", "save_sharded", "load_sharded", "is_sharded", "is_complete",
           "consolidate"]

MANIFEST = "fnnet-checkpoint.json"
FORMAT = "fnnet.sharded/1"


class Part(NamedTuple):
    """A leaf that is the flattened range ``[lo, hi)`` of a whole leaf of shape ``shape``."""

    lo: int
    hi: int
    shape: tuple[int, ...]


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _as_parts(parts: Mapping[str, Any] | None, what: str) -> dict[str, Part]:
    """``parts`` checked: each value ``(lo, hi, whole shape)`` of ints with ``0 <= lo <= hi <= numel(shape)``;
    a ``TypeError``/``ValueError`` naming the key path and the value otherwise."""
    if parts is None:
        return {}
    if not isinstance(parts, Mapping):
        raise TypeError(f"{what}: parts must be a dict {{key path: (lo, hi, whole shape)}} "
                        f"(step.local_parts(state)[1]), got {type(parts).__name__}")
    out = {}
    for p, r in parts.items():
        valid = (f"{what}: parts['{p}'] must be (lo, hi, whole shape): two ints and a tuple of ints, the range "
                 f"[lo, hi) of the flattened whole leaf with 0 <= lo <= hi <= its numel; got {r!r}")
        if not isinstance(p, str):
            raise TypeError(f"{what}: parts' keys must be key paths (str), got {p!r}")
        if not (isinstance(r, (tuple, list)) and len(r) == 3 and _is_int(r[0]) and _is_int(r[1])
                and isinstance(r[2], (tuple, list, torch.Size)) and all(_is_int(s) and int(s) >= 0 for s in r[2])):
            raise TypeError(valid)
        part = Part(int(r[0]), int(r[1]), tuple(int(s) for s in r[2]))
        if not 0 <= part.lo <= part.hi <= _numel(part.shape):
            raise ValueError(valid + f" (numel {_numel(part.shape)})")
        out[p] = part
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _rank_world(group: Any) -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _all_gather(obj: Any, group: Any) -> list[Any]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


class _References(_codec.Encoder):
    """The structure JSON, with every tensor only referenced (no copy): a rank copies only what it writes."""

    def _add(self, t: torch.Tensor, path: tuple[Any, ...]) -> str:
        name = _tree.path_str(path)
        if name in self.tensors:
            raise ValueError(f"save_sharded: two tensors have the key path '{name}'; rename one of them")
        if t.layout != torch.strided or t.device.type == "meta":
            raise TypeError(f"save_sharded: the tensor at '{name}' is {t.layout} on {t.device}; only dense tensors "
                            "holding data can be saved")
        self.tensors[name] = t.detach()
        return name


def _writable(tensors: Mapping[str, torch.Tensor], copy: bool) -> dict[str, torch.Tensor]:
    """Flat CPU tensors safetensors can write: copied when ``copy`` (a snapshot for a background write), when
    on another device, or when a view or sharing storage (ZeRO's parameters are views of bucket buffers)."""
    out, seen = {}, set()
    for name, t in tensors.items():
        t = t.reshape(-1).cpu().resolve_conj().resolve_neg()
        storage = t.untyped_storage()
        owner = storage.data_ptr()
        shared = t.storage_offset() != 0 or storage.nbytes() != t.numel() * t.element_size() or owner in seen
        out[name] = t.clone() if (copy or shared or not t.is_contiguous()) else t
        if t.numel():
            seen.add(owner)
    return out


# -- the plan: who writes what -------------------------------------------------------------------


def _local_plan(tensors: Mapping[str, torch.Tensor], parts: Mapping[str, Part]) -> dict[str, Any]:
    """What this rank holds: each tensor's whole shape, dtype, and its range if it is a part."""
    out = {}
    for name, t in tensors.items():
        if name in parts:
            p = parts[name]
            if p.hi - p.lo != t.numel() or not 0 <= p.lo <= p.hi <= _numel(p.shape):
                raise ValueError(f"save_sharded: the part at '{name}' holds {t.numel()} elements, its range "
                                 f"[{p.lo}, {p.hi}) of a whole {list(p.shape)} does not fit")
            out[name] = {"shape": list(p.shape), "dtype": _dtype_name(t), "range": [p.lo, p.hi]}
        else:
            out[name] = {"shape": list(t.shape), "dtype": _dtype_name(t), "range": None}
    return out


def _check_no_window(tree: Any) -> None:
    """A ``ValueError`` when ``tree`` holds an unfinished accumulation window: its gradients and loss are this
    rank's own (no rank holds the others'), so a folder written as replicated would keep rank 0's only."""
    found = optree.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, Accumulation), none_is_leaf=False,
                                          namespace=_tree.NAMESPACE)
    windows = [_tree.path_str(p) for p, x in zip(found[0], found[1]) if isinstance(x, Accumulation)]
    if windows:
        raise ValueError(f"save_sharded: '{windows[0]}' holds an unfinished gradient-accumulation window: each "
                         "rank's own partial gradients, which a sharded checkpoint cannot hold; call "
                         "`state, _ = step.flush(state)` first, or save after an update (metrics['updated'])")


def _assign(plans: list[dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], list[list[tuple[str, int, int]]]]:
    """The manifest's leaves and, per rank, the ``(name, lo, hi)`` ranges it writes: each part by the lowest
    rank holding the same range; each whole leaf cut into ``W`` equal ranges, rank ``r`` writing the ``r``-th
    (so no rank writes more than ``1/W`` of what is replicated, however large one leaf is)."""
    world = len(plans)
    names = list(plans[0])
    for r, plan in enumerate(plans[1:], 1):
        if list(plan) != names:
            diff = sorted(set(plan) ^ set(names))
            raise ValueError(f"save_sharded: rank {r} holds other leaves than rank 0 (differing: {diff[:5]})")
    writes: list[list[tuple[str, int, int]]] = [[] for _ in range(world)]
    leaves: dict[str, dict[str, Any]] = {}
    for name in names:
        head = plans[0][name]
        for r, plan in enumerate(plans):
            if plan[name]["shape"] != head["shape"] or plan[name]["dtype"] != head["dtype"]:
                raise ValueError(f"save_sharded: '{name}' is {plan[name]['dtype']}{plan[name]['shape']} on rank {r}, "
                                 f"{head['dtype']}{head['shape']} on rank 0")
        pieces: list[list[int]] = []
        leaves[name] = {"shape": head["shape"], "dtype": head["dtype"], "pieces": pieces}
        if head["range"] is None:
            n = _numel(tuple(head["shape"]))
            c = -(-n // world)
            ranges = [(r, r * c, min(n, (r + 1) * c)) for r in range(world)] if n else [(0, 0, 0)]
        else:
            ranges = _part_pieces(name, plans)
        for r, lo, hi in ranges:
            if hi > lo or not _numel(tuple(head["shape"])):
                writes[r].append((name, lo, hi))
                pieces.append([r, lo, hi])
    return leaves, writes


def _part_pieces(name: str, plans: list[dict[str, Any]]) -> list[tuple[int, int, int]]:
    """The ``(rank, lo, hi)`` pieces of the part leaf ``name``: each non-empty range once, by the lowest rank
    holding it, after checking that the ranks' ranges tile ``[0, numel)`` (no gap, no overlap): a ``ValueError``
    naming the leaf, the gaps and the overlaps otherwise (the same on every rank: nothing is written)."""
    held = [plan[name]["range"] for plan in plans]
    whole = [r for r, h in enumerate(held) if h is None]
    if whole:
        raise ValueError(f"save_sharded: '{name}' is a part (parts names it) on some ranks and whole on ranks "
                         f"{whole}: every rank must list it in parts")
    ranges, seen = [], set()
    for r, (lo, hi) in enumerate(held):
        if hi > lo and (lo, hi) not in seen:
            seen.add((lo, hi))
            ranges.append((r, lo, hi))
    n, end, gaps, overlaps = _numel(tuple(plans[0][name]["shape"])), 0, [], []
    for r, lo, hi in sorted(ranges, key=lambda x: (x[1], x[2])):
        if lo > end:
            gaps.append([end, lo])
        elif lo < end:
            overlaps.append([lo, min(end, hi)])
        end = max(end, hi)
    if end < n:
        gaps.append([end, n])
    if gaps or overlaps:
        raise ValueError(f"save_sharded: the ranks' ranges of '{name}' (whole {plans[0][name]['shape']}, {n} "
                         f"elements) do not tile [0, {n}): gaps {gaps}, overlaps {overlaps} (ranges per rank: "
                         f"{[list(h) for h in held]}); each element must be held by exactly one range (identical "
                         "ranges on several ranks are one replica); nothing was written")
    return ranges


def _file_name(rank: int, world: int) -> str:
    return f"part-{rank:05d}-of-{world:05d}.safetensors"


def _piece_name(name: str, lo: int, hi: int) -> str:
    return f"{name}[{lo}:{hi}]"


# -- writing -------------------------------------------------------------------------------------


class SaveHandle:
    """A sharded save, finished (sync) or in flight in a background thread (``async_save=True``).

    :meth:`wait` blocks until the checkpoint is complete (the manifest in place) and raises the
    error the background writing met, if any (naming the rank); :meth:`done` says whether it
    has finished. Every rank holds one; all must be waited on.
    """

    def __init__(self, path: str, thread: threading.Thread | None = None):
        self.path, self._thread, self.error = path, thread, None  # type: ignore[var-annotated]

    def done(self) -> bool:
        """Whether the background write has finished (or there was none)."""
        return self._thread is None or not self._thread.is_alive()

    def wait(self) -> str:
        """Block until the save has finished; the checkpoint's path, or the background error raised."""
        if self._thread is not None:
            self._thread.join()
        if self.error is not None:
            err, self.error = self.error, None
            raise err
        return self.path


_ASYNC_GROUP: dict[str, Any] = {}


def _async_group() -> Any:
    """A gloo group of its own for the background threads' confirmations, so that they never interleave
    with the training's collectives on the default group (made once, collectively, on the first async save)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    # a weak reference: torch's registry owns the group, so destroy_process_group() frees it at once, as it
    # frees every other group. A strong module-level reference kept it alive until interpreter teardown,
    # where gloo's threads were destroyed late: about 1 in 10 two-rank runs died with SIGABRT
    # ("terminate called without an active exception") after their last save had completed.
    ref = _ASYNC_GROUP.get("group")
    group = ref() if ref is not None else None
    if group is None:
        group = dist.new_group(backend="gloo")
        _ASYNC_GROUP["group"] = weakref.ref(group)
    return group


_STALE = re.compile(r"\..+\.[0-9a-f]{16}\.(partial|old)")


def _clean_stale(parent: str, run: str) -> None:
    """Remove the hidden folders of earlier saves into ``parent`` (``.<name>.<run>.partial`` never completed
    or left complete beside its target; ``.<name>.<run>.old``): a save is awaited before the next one starts."""
    if not os.path.isdir(parent):
        return
    for entry in os.listdir(parent):
        if _STALE.fullmatch(entry) and run not in entry:  # only the hidden names a save gives its folders
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _write_json(path: str, obj: Any) -> None:
    """``obj`` as JSON at ``path``, atomically: temporary, fsync, rename, folder fsync."""
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _file._fsync_dir(os.path.dirname(path))


def _file_digest(path: str) -> str:
    import safetensors

    with safetensors.safe_open(path, framework="pt", device="cpu") as f:
        return (f.metadata() or {})[_file.META_DIGEST]


def _finish(job: dict[str, Any], group: Any) -> None:
    """Write this rank's file, confirm across the ranks, then (rank 0) the manifest and the move into place."""
    rank, world, partial = job["rank"], job["world"], job["partial"]
    # a checkpoint is always a state training can resume from: checked before anything is written (here: off the
    # step when async), every rank's verdict gathered so that every rank refuses, naming the ranks and key paths
    bad = sorted({k.rsplit("[", 1)[0] for k, t in job["tensors"].items() if not host_finite(t)})
    refused = [f"rank {r}: {b[:5]}" for r, b in enumerate(_all_gather(bad, group)) if b]
    if refused:
        job["tensors"] = None
        raise ValueError(f"save_sharded: non-finite values at {'; '.join(refused)}; not written to '{job['path']}' "
                         "(nothing was written; the checkpoint there, if any, is kept)")
    status: tuple[str | None, str | None] = (None, None)
    try:
        os.makedirs(partial, exist_ok=True)
        name = _file_name(rank, world)
        node = {"kind": "dict", "keys": list(job["tensors"]),
                "children": [{"kind": "tensor", "name": k} for k in job["tensors"]]}
        structure = {"kind": "dict", "keys": ["run", "rank", "world", "pieces"],
                     "children": [{"kind": "str", "value": job["run"]}, {"kind": "int", "value": rank},
                                  {"kind": "int", "value": world}, node]}
        _file.write(os.path.join(partial, name), job["tensors"], structure)
        status = (None, _file_digest(os.path.join(partial, name)))
    except Exception as exc:  # noqa: BLE001 - reported to every rank, raised below
        status = (f"{type(exc).__name__}: {exc}", None)
    job["tensors"] = None  # the host copy is written: free it
    statuses = _all_gather(status, group)
    failed = [f"rank {r}: {s[0]}" for r, s in enumerate(statuses) if s[0] is not None]
    if failed:
        raise RuntimeError(f"save_sharded('{job['path']}'): not complete, no manifest written; " + "; ".join(failed))
    if rank == 0:
        manifest = job["manifest"]
        manifest["files"] = {_file_name(r, world): s[1] for r, s in enumerate(statuses)}
        _write_json(os.path.join(partial, MANIFEST), manifest)
        path = job["path"]
        old = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{job['run']}.old")
        if os.path.lexists(path):
            os.replace(path, old)
        os.replace(partial, path)
        _file._fsync_dir(os.path.dirname(path))
        shutil.rmtree(old, ignore_errors=True)
    _all_gather(None, group)  # every rank returns once the checkpoint is in place


def save_sharded(path: Any, tree: Any, *, parts: Mapping[str, Any] | None = None, group: Any = None,
                 async_save: bool = False) -> SaveHandle:
    """Write ``tree`` as a sharded checkpoint folder at ``path``: every rank calls it with its own tree.

    ``parts`` maps key paths of ``tree`` to ``(lo, hi, whole shape)``: that leaf is the range
    ``[lo, hi)`` of the flattened whole leaf (what :meth:`fnnet.step.TrainStep.local_parts` returns,
    the key paths prefixed as in ``tree``); every other leaf is whole and must be the same on every
    rank of ``group`` (``None``: the default group; no process group: one process). The folder
    replaces an existing one at ``path`` only once complete (module docstring). Matches
    ``torch.distributed.checkpoint.save`` (DCP) and orbax's ``CheckpointManager.save``.

    Args:
        async_save: copy this rank's pieces to host memory, then write, confirm and move into place
            in a background thread (its collectives on a gloo group of their own).

    Returns:
        a :class:`SaveHandle`; call ``wait()`` (sync saves have finished already).

    Raises:
        TypeError: a value of ``parts`` that is no ``(int lo, int hi, tuple of ints)`` (naming its key path).
        ValueError: a part's range that does not fit its whole shape or its tensor, ranks whose ranges of
            a part leaf do not tile it (a gap or an overlap: the leaf named), ranks holding different
            leaves, a tree holding an unfinished accumulation window (``TrainState.accum``) on several
            ranks (each rank's own partial gradients: call ``step.flush(state)`` first), or non-finite
            values on any rank (every rank raises, naming the ranks and key paths; with ``async_save``
            at ``wait()``): nothing is written, not even the hidden ``.partial`` folder.
        RuntimeError: a rank failed to write its file (every rank raises, naming it; with
            ``async_save`` at ``wait()``); no manifest is written.
    """
    path = os.path.abspath(os.fspath(path))
    rank, world = _rank_world(group)
    part_map = _as_parts(parts, "save_sharded")
    enc = _References()
    structure = enc.node(tree)
    unknown = sorted(set(part_map) - set(enc.tensors))
    if unknown:
        raise ValueError(f"save_sharded: parts names key paths that are no tensor of the tree: {unknown[:5]}")
    try:
        if world > 1:
            _check_no_window(tree)
        plan: Any = _local_plan(enc.tensors, part_map)
    except ValueError as exc:  # every rank must hear of it, or the others wait in the gather below
        plan = str(exc)
    gathered = _all_gather((plan, uuid.uuid4().hex[:16]), group)
    bad = [f"rank {r}: {g[0]}" for r, g in enumerate(gathered) if isinstance(g[0], str)]
    if bad:
        raise ValueError("; ".join(bad))
    leaves, writes = _assign([g[0] for g in gathered])
    run = gathered[0][1]
    mine = {}
    for name, lo, hi in writes[rank]:
        base = part_map[name].lo if name in part_map else 0  # a part holds [base, ...) of its whole leaf
        mine[_piece_name(name, lo, hi)] = enc.tensors[name].reshape(-1)[lo - base:hi - base]
    mine = _writable(mine, copy=async_save)
    parent = os.path.dirname(path)
    if rank == 0:
        _clean_stale(parent, run)
    job = {"rank": rank, "world": world, "run": run, "path": path, "tensors": mine,
           "partial": os.path.join(parent, f".{os.path.basename(path)}.{run}.partial"),
           "manifest": {"format": FORMAT, "run": run, "world": world, "structure": structure, "leaves": leaves}}
    if not async_save:
        _finish(job, group)
        return SaveHandle(path)
    ckpt_group = _async_group()
    handle = SaveHandle(path)

    def background() -> None:
        try:
            _finish(job, ckpt_group)
        except BaseException as exc:  # noqa: BLE001 - kept for wait()
            handle.error = exc

    handle._thread = threading.Thread(target=background, name=f"fnnet-save-{os.path.basename(path)}", daemon=True)
    handle._thread.start()
    return handle


# -- reading -------------------------------------------------------------------------------------


def is_sharded(path: Any) -> bool:
    """Whether ``path`` is a folder (a sharded checkpoint, complete or not) rather than a file."""
    return os.path.isdir(os.fspath(path))


def is_complete(path: Any) -> bool:
    """Whether ``path`` is a sharded checkpoint folder with its manifest (written last: a complete save)."""
    return os.path.isfile(os.path.join(os.fspath(path), MANIFEST))


def _read_manifest(path: str) -> dict[str, Any]:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no sharded checkpoint folder at '{path}'")
    file = os.path.join(path, MANIFEST)
    if not os.path.isfile(file):
        names = sorted(os.listdir(path))
        torn = path.rstrip(os.sep).endswith(".partial") or any(n.startswith("part-") for n in names)
        if not torn:  # no part and not a save's hidden folder: a folder of other files, not a torn save
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "") or "nothing"
            raise ValueError(f"'{path}' is a folder, not a checkpoint: no manifest '{MANIFEST}' and no part files "
                             f"(it holds {shown}). Give a checkpoint file inside it (a ModelCheckpoint folder "
                             "holds one file per checkpoint), a sharded checkpoint folder, or fit(resume='auto') "
                             "for the newest checkpoint of the ModelCheckpoint callbacks")
        raise ValueError(f"'{path}' is not a complete sharded checkpoint: its manifest '{MANIFEST}' (written last, "
                         "once every rank's part is durable) is missing: a save that did not finish; load an older one")
    try:
        with open(file) as f:
            manifest = json.load(f)
        assert manifest["format"] == FORMAT and isinstance(manifest["leaves"], dict)
        assert isinstance(manifest["files"], dict) and isinstance(manifest["structure"], dict)
    except (ValueError, KeyError, TypeError, AssertionError) as exc:
        raise ValueError(f"'{file}' is corrupted or not a manifest of format {FORMAT!r} ({exc!r})") from None
    listed = set(manifest["files"])
    strays = sorted(e for e in os.listdir(path) if e.startswith("part-") and e not in listed)
    if strays:
        raise ValueError(f"'{path}' mixes two saves: {strays} are not in its manifest (run {manifest['run']}, "
                         f"{manifest['world']} ranks); remove them or save again")
    for name in sorted(listed):
        f = os.path.join(path, name)
        if not os.path.isfile(f):
            raise ValueError(f"'{path}': the part '{name}' listed by the manifest is missing (rank "
                             f"{int(name[5:10])} of {manifest['world']}); the checkpoint cannot be loaded")
        if _file_digest(f) != manifest["files"][name]:
            raise ValueError(f"'{f}' is not the part the manifest wrote (run {manifest['run']}): a part of another "
                             "save or another model was copied in")
    return manifest


def _targets(manifest: dict[str, Any], path: str, like: Any, parts: dict[str, Part]) -> dict[str, tuple[int, int]]:
    """The range of every saved tensor this load needs (the whole leaf, or the part ``parts`` names),
    after checking ``like``'s leaves against the manifest (every mismatch listed)."""
    leaves = manifest["leaves"]
    if like is None:
        return {n: (0, _numel(tuple(v["shape"]))) for n, v in leaves.items()}
    out, bad = {}, []
    saved = set(_codec.flatten_saved(manifest["structure"], {n: None for n in leaves}))
    for p, ref in _tree.leaves_with_path(like):
        if p not in saved:
            bad.append(f"missing (in like, not in the checkpoint): {p}")
        elif isinstance(ref, torch.Tensor) and p not in leaves:
            bad.append(f"{p}: like has a tensor, the checkpoint a {type(ref).__name__}")
        elif isinstance(ref, torch.Tensor):
            part = parts.get(p)
            shape = part.shape if part else tuple(ref.shape)
            if tuple(leaves[p]["shape"]) != shape or leaves[p]["dtype"] != _dtype_name(ref):
                bad.append(f"{p}: checkpoint {leaves[p]['dtype']}{leaves[p]['shape']}, like "
                           f"{_dtype_name(ref)}{list(shape)}")
            elif part and ref.numel() != part.hi - part.lo:
                bad.append(f"{p}: like holds {ref.numel()} elements, its range [{part.lo}, {part.hi}) in parts "
                           f"{part.hi - part.lo}")
            out[p] = (part.lo, part.hi) if part else (0, _numel(shape))
    known = {p for p, _ in _tree.leaves_with_path(like)}
    bad += [f"unexpected (in the checkpoint, not in like): {p}" for p in sorted(saved - known)]
    if bad:
        raise ValueError(f"sharded checkpoint '{path}' does not match `like` (another model?):\n  " + "\n  ".join(bad))
    return out


def _read_ranges(path: str, manifest: dict[str, Any], need: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """Each needed range as a flat tensor, copied from the files that hold its pieces (each file read,
    and checked, once)."""
    leaves = manifest["leaves"]
    out = {n: torch.empty(hi - lo, dtype=getattr(torch, leaves[n]["dtype"])) for n, (lo, hi) in need.items()}
    filled = dict.fromkeys(need, 0)
    by_rank: dict[int, list[tuple[str, int, int]]] = {}
    for n, (lo, hi) in need.items():
        for r, plo, phi in leaves[n]["pieces"]:
            if max(lo, plo) < min(hi, phi):
                by_rank.setdefault(r, []).append((n, plo, phi))
    for r in sorted(by_rank):
        tensors, _ = _file.read(os.path.join(path, _file_name(r, manifest["world"])))
        for n, plo, phi in by_rank[r]:
            lo, hi = need[n]
            a, b = max(lo, plo), min(hi, phi)
            out[n][a - lo:b - lo].copy_(tensors[_piece_name(n, plo, phi)][a - plo:b - plo])
            filled[n] += b - a
        del tensors
    short = sorted(n for n, (lo, hi) in need.items() if filled[n] != hi - lo)
    if short:
        raise ValueError(f"'{path}': the pieces of {short[:5]} do not cover the ranges needed (a corrupted manifest)")
    return out


def load_sharded(path: Any, like: Any = None, *, parts: Mapping[str, Any] | None = None, device: Any = None) -> Any:
    """Read a sharded checkpoint folder written by :func:`save_sharded`, at any world size.

    Without ``like``: the whole tree, rebuilt as :func:`fnnet.load` would (on the CPU). With ``like``:
    ``like``'s structure with the checkpoint's leaves; a leaf that ``parts`` names (``{key path: (lo, hi,
    whole shape)}``, this rank's layout: :meth:`fnnet.step.TrainStep.local_parts`) gets only its range of
    the whole leaf, every other tensor the whole leaf, on ``device`` or ``like``'s device. Not collective:
    every rank reads what it needs. Matches ``torch.distributed.checkpoint.load`` (DCP), which reshards too.

    Raises:
        FileNotFoundError: no folder at ``path``.
        ValueError: no manifest (an unfinished save), a listed part missing, a part file not the one the
            manifest wrote (another run or model), a stray part of another save, a damaged file (naming it),
            or a mismatch with ``like`` (every leaf named).
    """
    part_map = _as_parts(parts, "load_sharded")
    path = os.path.abspath(os.fspath(path))
    manifest = _read_manifest(path)
    need = _targets(manifest, path, like, part_map)
    flat = _read_ranges(path, manifest, need)
    leaves = manifest["leaves"]
    tensors = {n: (t if n in part_map else t.view(tuple(leaves[n]["shape"]))) for n, t in flat.items()}
    if like is None:
        return _codec.decode(manifest["structure"], tensors)
    saved = _codec.flatten_saved(manifest["structure"], {**{n: None for n in leaves}, **tensors})
    out, bad = [], []
    like_leaves, spec = _tree.flatten_with_path(like)
    for p, ref in like_leaves:
        got = saved[p]
        if isinstance(ref, torch.Tensor):
            target = device if device is not None else (ref.device if ref.device.type != "meta" else None)
            got = got.to(target) if target is not None else got
        elif type(got) is not type(ref):
            bad.append(f"{p}: checkpoint {type(got).__name__}, like {type(ref).__name__}")
        out.append(got)
    if bad:
        raise ValueError(f"sharded checkpoint '{path}' does not match `like`:\n  " + "\n  ".join(bad))
    return _tree.unflatten(spec, out)


def consolidate(path: Any, out: Any) -> str:
    """Write the sharded checkpoint folder ``path`` as one whole safetensors file ``out`` (``fnnet.save``),
    which :func:`fnnet.load`, ``trainer.load`` and the JAX interop read; the ``fnnet checkpoint
    consolidate DIR OUT`` command. Holds the whole state in this process's memory. Returns ``out``."""
    enc = _codec.Encoder()  # what fnnet.save writes (fnnet.checkpoint imports this module: not imported back)
    structure = enc.node(load_sharded(path))
    _file.write(os.fspath(out), enc.tensors, structure)
    return os.fspath(out)
