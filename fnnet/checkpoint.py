"""Checkpoints: any pytree of tensors as one safetensors file, written atomically.

``save(path, tree)`` writes every tensor leaf under its dotted key path (``"params.layers.0.weight"``)
and the tree's structure, as JSON, in the file's metadata; ``load(path)`` rebuilds the tree, and
``load(path, like=tree)`` restores into ``like``'s structure after checking every key path,
shape and dtype (``orbax``'s ``restore(item=...)``, ``flax.serialization.from_bytes(target, ...)``).

What a checkpoint can hold
--------------------------
Containers: ``dict`` and ``OrderedDict`` (keys: str, int, float, bool or None), ``list``,
``tuple``, ``None``, ``NamedTuple``\\ s (optimizer states) and classes registered with
:func:`fnnet.tree.register_dataclass` / :func:`fnnet.tree.register` (``TrainState``).
Leaves: tensors (any dense dtype safetensors knows, ``bfloat16`` and ``bool`` included), ``int``,
``float`` (``nan``/``inf`` too), ``bool``, ``str`` and :class:`fnnet.random.Key`.

Tensors are saved from the CPU, contiguous and unshared: a view or a tensor that shares
storage with another is copied first, so tied weights come back as two equal tensors.

Safety
------
Loading never unpickles and never imports. A namedtuple or registered class is named in the
metadata by ``module:qualname`` and looked up in ``sys.modules`` only; it is rebuilt only if it
is a namedtuple with the saved fields, or a class registered as an fnnet pytree node whose
fields match. Anything else raises a ``ValueError`` that suggests ``load(path, like=...)``,
which takes every container from ``like`` and only tensors and plain values from the file.

File layout (metadata keys)
---------------------------
``"fnnet.format"``: ``"1"``. ``"fnnet.crc32"``: ``{name: CRC-32 of the tensor's bytes}``,
checked on load, so a damaged file is an error rather than silently wrong weights.
``"fnnet.tree"``: the structure as one JSON node, where a node is one of::

    {"kind": "tensor", "name": "params.w"}            # the safetensors name = the key path
    {"kind": "int" | "float" | "bool" | "str", "value": ...}   # float nan/inf as "nan", "inf"
    {"kind": "key", "value": ["<hi hex>", "<lo hex>"]}          # fnnet.random.Key
    {"kind": "none"}
    {"kind": "list" | "tuple", "children": [...]}
    {"kind": "dict" | "OrderedDict", "keys": [...], "children": [...]}   # insertion order
    {"kind": "namedtuple", "class": "module:Qual", "fields": [...], "children": [...]}
    {"kind": "custom", "class": "module:Qual", "entries": [...], "meta": <static fields>,
     "children": [...]}                                # registered classes (TrainState)

A plain safetensors file (no fnnet metadata) loads as a flat ``{name: tensor}`` dict.

Interop with ``torch.nn.Module``
--------------------------------
``fnnet.Model.params`` is already keyed like ``state_dict()``, so
``module.load_state_dict(load(path).params)`` works for a saved ``TrainState`` (add
``strict=False`` when the module has buffers, which fnnet keeps apart in ``state.buffers``). :func:`to_state_dict` flattens nested param trees to such a
dict; :func:`load_state_dict` reads a ``torch.save``\\ d ``state_dict`` (with
``weights_only=True``) or a safetensors file as a flat dict of tensors.
"""

from __future__ import annotations

import collections
import json
import math
import os
import pickle
import sys
import uuid
import zipfile
import zlib
from typing import Any, Mapping, Union

import optree
import safetensors
import safetensors.torch
import torch

from . import tree as _tree
from .device import DeviceLike, place, resolve_device
from .random import Key

__all__ = ["save", "load", "load_state_dict", "to_state_dict"]

PathLike = Union[str, "os.PathLike[str]"]

FORMAT_VERSION = "1"
_META_FORMAT = "fnnet.format"
_META_TREE = "fnnet.tree"
_META_CRC = "fnnet.crc32"

_SCALARS = ("int", "float", "bool", "str", "key")
_DICTS = {"dict": dict, "OrderedDict": collections.OrderedDict}


# --------------------------------------------------------------------------------------
# Encoding a tree as JSON + named tensors
# --------------------------------------------------------------------------------------
def _encode_scalar(x: Any) -> dict[str, Any] | None:
    """The JSON node of a non-tensor leaf, or None when ``x`` is not one."""
    if type(x) is bool:
        return {"kind": "bool", "value": x}
    if type(x) is int:
        return {"kind": "int", "value": x}
    if isinstance(x, float):  # numpy.float64 is a float subclass; it comes back as float
        x = float(x)
        return {"kind": "float", "value": x if math.isfinite(x) else repr(x)}
    if type(x) is str:
        return {"kind": "str", "value": x}
    if isinstance(x, Key):
        # hex strings: 64-bit words do not survive JSON readers that use doubles
        return {"kind": "key", "value": [f"{x.hi:016x}", f"{x.lo:016x}"]}
    return None


def _decode_scalar(node: Mapping[str, Any]) -> Any:
    kind, value = node["kind"], node["value"]
    if kind == "float":
        return float(value)
    if kind == "key":
        return Key(int(value[0], 16), int(value[1], 16))
    if kind == "int" and type(value) is not int or kind == "bool" and type(value) is not bool:
        raise TypeError(f"{kind} node holds {value!r}")
    if kind == "str" and type(value) is not str:
        raise TypeError(f"str node holds {value!r}")
    return value


def _encode_meta(x: Any) -> dict[str, Any]:
    """Static node metadata (e.g. a dataclass's static fields): plain values or opaque."""
    leaf = _encode_scalar(x)
    if leaf is not None:
        return leaf
    if x is None:
        return {"kind": "none"}
    if type(x) in (tuple, list):
        children = [_encode_meta(c) for c in x]
        if all(c["kind"] != "opaque" for c in children):
            return {"kind": type(x).__name__, "children": children}
    return {"kind": "opaque", "type": type(x).__qualname__}


def _decode_meta(node: Mapping[str, Any]) -> Any:
    kind = node["kind"]
    if kind == "none":
        return None
    if kind in ("tuple", "list"):
        children = [_decode_meta(c) for c in node["children"]]
        return tuple(children) if kind == "tuple" else children
    return _decode_scalar(node)


def _class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _entry(e: Any) -> Any:
    return e if type(e) in (str, int) else str(e)


class _Encoder:
    """Walks a tree once: collects ``{dotted path: tensor}`` and returns the structure's JSON."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._storages: set[tuple[int, int]] = set()

    def node(self, obj: Any, path: tuple[Any, ...]) -> dict[str, Any]:
        """The JSON node of ``obj`` at ``path`` (node kinds: see the module docstring)."""
        if isinstance(obj, torch.Tensor):
            return {"kind": "tensor", "name": self._add(obj, path)}
        leaf = _encode_scalar(obj)
        if leaf is not None:
            return leaf
        if obj is None:
            return {"kind": "none"}
        typ = type(obj)
        if typ in (list, tuple):
            return {"kind": typ.__name__, "children": [self.node(c, path + (i,)) for i, c in enumerate(obj)]}
        if typ in (dict, collections.OrderedDict):
            for k in obj:
                if type(k) not in (str, int, float, bool) and k is not None:
                    raise TypeError(
                        f"save: dict key {k!r} at '{_tree.path_str(path)}' is a {type(k).__name__}; "
                        "checkpoint dict keys must be str, int, float, bool or None"
                    )
            return {
                "kind": typ.__name__,
                "keys": list(obj.keys()),
                "children": [self.node(v, path + (k,)) for k, v in obj.items()],
            }
        try:
            one = optree.tree_flatten_one_level(obj, none_is_leaf=False, namespace=_tree.NAMESPACE)
        except ValueError:
            raise TypeError(
                f"save: the leaf at '{_tree.path_str(path)}' is a {typ.__module__}.{typ.__qualname__}; "
                "a checkpoint holds tensors, int, float, bool, str, None and fnnet.random.Key leaves "
                "(convert numpy arrays with torch.from_numpy)"
            ) from None
        # the same entries fnnet.tree's paths use: namedtuple / structseq fields by name
        if optree.is_namedtuple_class(typ):
            entries: list[Any] = list(optree.namedtuple_fields(typ))
        elif optree.is_structseq_class(typ):
            entries = list(optree.structseq_fields(typ))
        else:
            entries = [_entry(e) for e in one.entries]
        children = [self.node(c, path + (e,)) for c, e in zip(one.children, entries)]
        if optree.is_namedtuple_class(typ):
            return {"kind": "namedtuple", "class": _class_name(typ), "fields": entries, "children": children}
        return {
            "kind": "custom",
            "class": _class_name(typ),
            "entries": entries,
            "meta": _encode_meta(one.metadata),
            "children": children,
        }

    def _add(self, t: torch.Tensor, path: tuple[Any, ...]) -> str:
        name = _tree.path_str(path)
        if name in self.tensors:
            raise ValueError(
                f"save: two tensors have the key path '{name}' (a dict key containing dots collides "
                "with a nested path); rename one of them"
            )
        if t.layout != torch.strided:
            raise TypeError(f"save: the tensor at '{name}' has layout {t.layout}; only dense tensors can be saved")
        if t.device.type == "meta":
            raise ValueError(f"save: the tensor at '{name}' is on the meta device and holds no data")
        t = t.detach().cpu().resolve_conj().resolve_neg()
        storage = t.untyped_storage()
        nbytes = t.numel() * t.element_size()
        owner = (storage.data_ptr(), storage.nbytes())
        # safetensors refuses views and storage shared between tensors: copy those
        if not t.is_contiguous() or t.storage_offset() != 0 or storage.nbytes() != nbytes or owner in self._storages:
            t = t.clone(memory_format=torch.contiguous_format)
        elif nbytes > 0:
            self._storages.add(owner)
        self.tensors[name] = t
        return name


def _crc32(t: torch.Tensor) -> int:
    if t.numel() == 0:
        return 0
    return zlib.crc32(t.reshape(-1).view(torch.uint8).numpy())


# --------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------
def _fsync_dir(folder: str) -> None:
    if not hasattr(os, "O_DIRECTORY"):  # Windows cannot open a folder to fsync it
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(path: PathLike, tree: Any) -> None:
    """Write ``tree`` (any pytree of tensors and plain values) to ``path`` as one safetensors file.

    Tensors are keyed by their dotted key path (``fnnet.tree.paths``) and the structure goes
    into the metadata, so :func:`load` rebuilds the same tree (tensors on the CPU). The write
    is atomic: the file is written to a temporary name in the same folder, flushed, fsynced
    and renamed over ``path`` (then the folder is fsynced); if anything fails, the temporary
    file is removed and an existing checkpoint at ``path`` is left as it was. Missing parent
    folders are created. The suffix ``.safetensors`` is conventional but not required.

    Raises:
        TypeError: a leaf that cannot be saved, naming its key path.
        ValueError: two leaves with the same dotted key path.
    """
    path = os.fspath(path)
    encoder = _Encoder()
    structure = encoder.node(tree, ())
    tensors = encoder.tensors
    metadata = {
        "format": "pt",
        _META_FORMAT: FORMAT_VERSION,
        _META_TREE: json.dumps(structure, separators=(",", ":"), allow_nan=False),
        _META_CRC: json.dumps({k: _crc32(v) for k, v in tensors.items()}, separators=(",", ":")),
    }
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    # O_EXCL: never clobber anything; mode 0o666 & ~umask like any new file
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        mode = os.stat(tmp).st_mode & 0o777
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, mode)  # safetensors writes the file anew with mode 0o600
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(folder)


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------
def _check_exists(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {what} at '{path}' (absolute: {os.path.abspath(path)})")
    if os.path.isdir(path):
        raise IsADirectoryError(f"'{path}' is a folder; give the path of a {what} file")


def _read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors (on the CPU) and the metadata, with a readable error for a damaged file."""
    try:
        with safetensors.safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except PermissionError:
        raise
    except (safetensors.SafetensorError, RuntimeError, OSError, ValueError) as exc:
        size = os.path.getsize(path)
        raise ValueError(
            f"'{path}' ({size} bytes) is not a readable safetensors checkpoint: it is truncated, "
            f"corrupted or another format ({type(exc).__name__}: {exc})"
        ) from None
    version = metadata.get(_META_FORMAT)
    if version is not None and version != FORMAT_VERSION:
        raise ValueError(
            f"'{path}' has fnnet checkpoint format {version!r}; this fnnet reads format {FORMAT_VERSION!r} "
            "(upgrade fnnet)"
        )
    if _META_CRC in metadata:
        try:
            crcs = json.loads(metadata[_META_CRC])
        except json.JSONDecodeError:
            raise ValueError(f"'{path}': the checksum metadata is corrupted") from None
        bad = sorted(k for k, t in tensors.items() if k in crcs and crcs[k] != _crc32(t))
        unlisted = sorted(set(tensors) ^ set(crcs))
        if bad or unlisted:
            raise ValueError(
                f"'{path}' is corrupted: the data of tensors {bad} fails its CRC-32 checksum"
                + (f"; tensors {unlisted} are not listed consistently in the checksums" if unlisted else "")
            )
    return tensors, metadata


def _parse_structure(path: str, metadata: Mapping[str, str]) -> dict[str, Any] | None:
    if _META_TREE not in metadata:
        return None
    try:
        structure = json.loads(metadata[_META_TREE])
    except json.JSONDecodeError as exc:
        raise ValueError(f"'{path}': the tree structure metadata is not valid JSON ({exc})") from None
    if not isinstance(structure, dict):
        raise ValueError(f"'{path}': the tree structure metadata is corrupted (not a JSON object)")
    return structure


def _find_class(name: str, where: str, file: str) -> type:
    """The class ``module:qualname``, from ``sys.modules`` only (never imported)."""
    module_name, _, qualname = name.partition(":")
    hint = (
        f"Import {module_name} before loading, or pass like=<a tree of the same structure> "
        "to restore into it"
    )
    obj: Any = sys.modules.get(module_name)
    if obj is None:
        raise ValueError(
            f"'{file}': the node at '{where}' is a {qualname} from module {module_name}, which is "
            f"not imported (fnnet never imports while loading). {hint}."
        )
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ValueError(
                f"'{file}': the node at '{where}' is a {name}, which does not exist in the imported "
                f"module (a class defined inside a function cannot be found). {hint}."
            )
    if not isinstance(obj, type):
        raise ValueError(f"'{file}': the node at '{where}' names {name}, which is not a class. {hint}.")
    return obj


def _decode(node: Mapping[str, Any], path: tuple[Any, ...], tensors: Mapping[str, torch.Tensor], file: str) -> Any:
    """Rebuild the tree from its JSON (no ``like``)."""
    kind = node["kind"]
    where = _tree.path_str(path)
    if kind == "tensor":
        return tensors[node["name"]]
    if kind in _SCALARS:
        return _decode_scalar(node)
    if kind == "none":
        return None
    if kind in ("list", "tuple"):
        children = [_decode(c, path + (i,), tensors, file) for i, c in enumerate(node["children"])]
        return children if kind == "list" else tuple(children)
    if kind in _DICTS:
        keys = node["keys"]
        if len(keys) != len(node["children"]):
            raise TypeError("dict keys and children differ in number")
        return _DICTS[kind]((k, _decode(c, path + (k,), tensors, file)) for k, c in zip(keys, node["children"]))
    if kind == "namedtuple":
        cls = _find_class(node["class"], where, file)
        if not optree.is_namedtuple_class(cls) or list(cls._fields) != node["fields"]:
            raise ValueError(
                f"'{file}': the node at '{where}' was saved as namedtuple {node['class']} with fields "
                f"{node['fields']}, but that class now is {getattr(cls, '_fields', 'not a namedtuple')}. "
                "Pass like=<a tree of the current structure> to restore into it."
            )
        return cls(*(_decode(c, path + (f,), tensors, file) for f, c in zip(node["fields"], node["children"])))
    if kind == "custom":
        cls = _find_class(node["class"], where, file)
        entry = optree.register_pytree_node.get(cls, namespace=_tree.NAMESPACE)
        if entry is None:
            raise ValueError(
                f"'{file}': the node at '{where}' is a {node['class']}, which is not registered as an "
                "fnnet pytree node (fnnet.tree.register_dataclass). Register it, or pass like=<a tree "
                "of the same structure>."
            )
        if node["meta"]["kind"] == "opaque":
            raise ValueError(
                f"'{file}': the node at '{where}' ({node['class']}) has static metadata of type "
                f"{node['meta']['type']}, which is not saved; pass like=<a tree of the same structure> "
                "to take it from there."
            )
        meta = _decode_meta(node["meta"])
        entries = node["entries"]
        children = [_decode(c, path + (e,), tensors, file) for e, c in zip(entries, node["children"])]
        try:
            obj = entry.unflatten_func(meta, children)
            one = optree.tree_flatten_one_level(obj, none_is_leaf=False, namespace=_tree.NAMESPACE)
            same = [_entry(e) for e in one.entries] == entries and one.metadata == meta
        except Exception:  # noqa: BLE001 - a changed class fails in its own ways; all mean "changed"
            same = False
        if not same:
            raise ValueError(
                f"'{file}': the node at '{where}' was saved as {node['class']} with fields {entries}; "
                "the class has changed since. Pass like=<a tree of the current structure> to restore into it."
            )
        return obj
    raise TypeError(f"unknown node kind {kind!r}")


def _collect(node: Mapping[str, Any], path: tuple[Any, ...], tensors: Mapping[str, torch.Tensor],
             out: dict[str, Any]) -> None:
    """Every leaf of the saved tree as ``{dotted path: value}``, without looking up any class."""
    kind = node["kind"]
    if kind == "tensor":
        out[_tree.path_str(path)] = tensors[node["name"]]
    elif kind in _SCALARS:
        out[_tree.path_str(path)] = _decode_scalar(node)
    elif kind in ("list", "tuple"):
        for i, c in enumerate(node["children"]):
            _collect(c, path + (i,), tensors, out)
    elif kind == "namedtuple":
        for f, c in zip(node["fields"], node["children"]):
            _collect(c, path + (f,), tensors, out)
    elif kind in _DICTS:
        for k, c in zip(node["keys"], node["children"]):
            _collect(c, path + (k,), tensors, out)
    elif kind == "custom":
        for e, c in zip(node["entries"], node["children"]):
            _collect(c, path + (e,), tensors, out)
    elif kind != "none":
        raise TypeError(f"unknown node kind {kind!r}")


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


def load(path: PathLike, like: Any = None, device: DeviceLike | None = None) -> Any:
    """Read a checkpoint written by :func:`save`.

    Without ``like`` the saved tree is rebuilt as it was (see the module docstring for which
    classes can be rebuilt and how they are found); its tensors are on the CPU, or on
    ``device``. A plain safetensors file without fnnet metadata loads as ``{name: tensor}``.

    With ``like`` (e.g. a freshly created ``TrainState``), the result has ``like``'s structure
    and the file's leaves, matched by dotted key path; every tensor must have ``like``'s shape
    and dtype and every other leaf ``like``'s type. All problems -- missing, unexpected,
    shape-, dtype- and type-mismatched key paths -- are listed in one ``ValueError``. Each
    tensor goes to ``device`` if given, else to the device of the matching tensor in ``like``
    (so ``load(path, like=state)`` resumes on the devices the state lives on).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: a truncated or corrupted file (naming it), a mismatch with ``like``, or a
            class that cannot be rebuilt without ``like``.
    """
    path = os.fspath(path)
    _check_exists(path, "checkpoint")
    dev = resolve_device(device) if device is not None else None
    tensors, metadata = _read_safetensors(path)
    structure = _parse_structure(path, metadata)
    try:
        if like is None:
            if structure is None:
                result: Any = dict(tensors)
            else:
                result = _decode(structure, (), tensors, path)
                _check_all_used(path, structure, tensors)
            return result if dev is None else place(result, dev)
        if structure is None:
            saved: dict[str, Any] = dict(tensors)
        else:
            saved = {}
            _collect(structure, (), tensors, saved)
    except (KeyError, TypeError, AttributeError, IndexError) as exc:
        raise ValueError(f"'{path}': the tree structure metadata is corrupted ({type(exc).__name__}: {exc})") from None
    return _restore_like(path, saved, like, dev)


def _check_all_used(path: str, structure: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    leaves: dict[str, Any] = {}
    _collect(structure, (), tensors, leaves)
    used = {k for k, v in leaves.items() if isinstance(v, torch.Tensor)}
    extra = sorted(set(tensors) - used)
    if extra:
        raise ValueError(f"'{path}': tensors {extra} are not part of the saved tree structure (corrupted metadata)")


# --------------------------------------------------------------------------------------
# torch state_dict interop
# --------------------------------------------------------------------------------------
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


def load_state_dict(path: PathLike, *, prefix: str = "") -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` dict (on the CPU) from a ``torch.save`` file or a safetensors file.

    ``torch.save(module.state_dict(), path)`` files are read with
    ``torch.load(path, map_location="cpu", weights_only=True)`` -- never with unrestricted
    pickle -- and nested dicts are flattened to dotted names. A safetensors file (an fnnet
    checkpoint included) gives its tensors by name. ``prefix`` keeps only the names that start
    with it, with the prefix removed: ``load_state_dict("ckpt.safetensors", prefix="params.")``
    is the params part of a saved ``TrainState``, ready for ``module.load_state_dict``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is damaged, is not a dict of tensors, needs unrestricted pickle,
            or no name starts with ``prefix``.
    """
    path = os.fspath(path)
    _check_exists(path, "state_dict file")
    if _is_safetensors(path):
        flat = _read_safetensors(path)[0]
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ValueError(
                f"'{path}' needs more than weights_only=True unpickling, which fnnet refuses: save "
                f"module.state_dict() (not the module) with torch.save. ({str(exc).splitlines()[0]})"
            ) from None
        except PermissionError:
            raise
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
    if prefix:
        found = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
        if not found:
            tops = sorted({k.split(".", 1)[0] + "." for k in flat})
            raise ValueError(f"'{path}': no tensor name starts with {prefix!r}; names start with {tops}")
        return found
    return flat
