"""A pytree as JSON plus named tensors, and back: the structure half of a checkpoint.

:func:`encode` walks a tree once and returns its structure as one JSON node and the tensors
keyed by dotted key path. :func:`decode` rebuilds the tree from the JSON (plain containers,
and fnnet's own types only); :func:`flatten_saved` lists every leaf by key path without
rebuilding any class, for ``load(path, like=...)``. A node is one of::

    {"kind": "tensor", "name": "params.w"}            # the safetensors name = the key path
    {"kind": "int" | "float" | "bool" | "str", "value": ...}   # float nan/inf as "nan", "inf"
    {"kind": "key", "value": ["<hi hex>", "<lo hex>"]}          # fnnet.random.Key
    {"kind": "none"}
    {"kind": "list" | "tuple", "children": [...]}
    {"kind": "dict" | "OrderedDict", "keys": [...], "children": [...]}   # insertion order
    {"kind": "namedtuple", "tag": "fnnet.optim.ScaleByAdamState", "fields": [...], "children": [...]}
    {"kind": "custom", "tag": "fnnet.TrainState", "entries": [...], "meta": <static fields>,
     "children": [...]}                                # classes registered with fnnet.tree

A class is named by its stable tag from the registry in ``_types.py`` (fnnet's own state
classes: ``TrainState``, ``DynamicScale``, the optimizer and metric states). Any other class
is written with ``"tag": null`` and ``"type": "module.Qual"``, a name for error messages only,
and needs ``like=``. :func:`decode` looks tags up in the registry and nowhere else: nothing
from a file is imported, and nothing from a file chooses which code runs. Format 2 files
(fnnet 0.2) named classes ``"class": "module:Qual"``; :func:`from_format_2` reads those names
through a fixed table of the ones that release wrote.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Mapping

import optree
import torch

from .. import tree as _tree
from ..random import Key
from . import _types

SCALARS = ("int", "float", "bool", "str", "key")
DICTS = {"dict": dict, "OrderedDict": collections.OrderedDict}
MAX_DEPTH = 100  # deeper trees are refused: a crafted file must not exhaust the stack


class CorruptStructure(ValueError):
    """The structure JSON does not describe a tree (the caller names the file)."""


# -- encoding -----------------------------------------------------------------------------------


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


def _class_fields(cls: type) -> dict[str, Any]:
    """How a node names its class: the registered tag, or none and the Python name (for messages only)."""
    tag = _types.tag_of(cls)
    return {"tag": tag} if tag is not None else {"tag": None, "type": f"{cls.__module__}.{cls.__qualname__}"}


def _entry(e: Any) -> Any:
    return e if type(e) in (str, int) else str(e)


class Encoder:
    """Walks a tree once: collects ``{dotted path: tensor}`` and returns the structure's JSON."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._storages: set[tuple[int, int]] = set()
        self._open: set[int] = set()  # containers on the current path: a cycle is an error

    def node(self, obj: Any, path: tuple[Any, ...] = ()) -> dict[str, Any]:
        """The JSON node of ``obj`` at ``path``."""
        if isinstance(obj, torch.Tensor):
            return {"kind": "tensor", "name": self._add(obj, path)}
        leaf = _encode_scalar(obj)
        if leaf is not None:
            return leaf
        if obj is None:
            return {"kind": "none"}
        if id(obj) in self._open:
            raise ValueError(f"save: the tree contains itself at '{_tree.path_str(path)}' (a circular reference); "
                             "a checkpoint holds trees, not graphs")
        if len(path) >= MAX_DEPTH:
            raise ValueError(f"save: the tree is nested more than {MAX_DEPTH} levels deep at '{_tree.path_str(path)}'")
        self._open.add(id(obj))
        try:
            return self._container(obj, path)
        finally:
            self._open.discard(id(obj))

    def _container(self, obj: Any, path: tuple[Any, ...]) -> dict[str, Any]:
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
            return {"kind": typ.__name__, "keys": list(obj.keys()),
                    "children": [self.node(v, path + (k,)) for k, v in obj.items()]}
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
            return {"kind": "namedtuple", **_class_fields(typ), "fields": entries, "children": children}
        return {"kind": "custom", **_class_fields(typ), "entries": entries, "meta": _encode_meta(one.metadata),
                "children": children}

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


# -- decoding -------------------------------------------------------------------------------------


def _decode_scalar(node: Mapping[str, Any]) -> Any:
    kind, value = node["kind"], node["value"]
    if kind == "float":
        if type(value) not in (int, float) and value not in ("nan", "inf", "-inf"):
            raise CorruptStructure(f"float node holds {value!r}")
        return float(value)
    if kind == "key":
        if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)):
            raise CorruptStructure(f"key node holds {value!r}")
        return Key(int(value[0], 16), int(value[1], 16))
    expected = {"int": int, "bool": bool, "str": str}[kind]
    if type(value) is not expected:
        raise CorruptStructure(f"{kind} node holds {value!r}")
    return value


def _decode_meta(node: Mapping[str, Any]) -> Any:
    kind = node["kind"]
    if kind == "none":
        return None
    if kind in ("tuple", "list"):
        children = [_decode_meta(c) for c in node["children"]]
        return tuple(children) if kind == "tuple" else children
    return _decode_scalar(node)


def _registered_class(node: Mapping[str, Any], where: str) -> type:
    """The class registered under the node's tag; a ``ValueError`` asking for ``like=`` otherwise."""
    tag = node.get("tag")
    cls = _types.class_of(tag)
    if cls is not None:
        return cls
    what = f"is a {node.get('type', 'class the file does not name')!r}" if tag is None else f"has the type tag {tag!r}"
    raise ValueError(
        f"the node at '{where}' {what}, which is not a registered type: without like= fnnet rebuilds only plain "
        f"containers and its own types ({', '.join(_types.known_tags())}). Pass load(path, like=<a tree of the "
        "same structure>) to restore into your classes"
    )


def from_format_2(node: Any, depth: int = 0) -> Any:
    """A format 2 structure in today's form: each ``"class": "module:Qual"`` becomes the tag that
    ``_types.LEGACY_NAMES`` gives it; an unknown name stays as a tag no class is registered under."""
    if depth > MAX_DEPTH:
        raise CorruptStructure(f"the structure is nested more than {MAX_DEPTH} levels deep")
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "class" in node:
        name = node.pop("class")
        node["tag"] = _types.LEGACY_NAMES.get(name, name) if isinstance(name, str) else name
    if isinstance(node.get("children"), list):
        node["children"] = [from_format_2(c, depth + 1) for c in node["children"]]
    return node


def _children(node: Mapping[str, Any], names_key: str) -> list[tuple[Any, Any]]:
    names, children = node[names_key], node["children"]
    if not isinstance(names, list) or not isinstance(children, list) or len(names) != len(children):
        raise CorruptStructure(f"{node['kind']} node with {names_key} and children of different lengths")
    return list(zip(names, children))


def _check_depth(path: tuple[Any, ...]) -> None:
    if len(path) > MAX_DEPTH:
        raise CorruptStructure(f"the structure is nested more than {MAX_DEPTH} levels deep")


def decode(node: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], path: tuple[Any, ...] = ()) -> Any:
    """Rebuild the tree from its JSON (no ``like``): plain containers and fnnet's own classes."""
    _check_depth(path)
    kind = node["kind"]
    where = _tree.path_str(path)
    if kind == "tensor":
        return tensors[node["name"]]
    if kind in SCALARS:
        return _decode_scalar(node)
    if kind == "none":
        return None
    if kind in ("list", "tuple"):
        children = [decode(c, tensors, path + (i,)) for i, c in enumerate(node["children"])]
        return children if kind == "list" else tuple(children)
    if kind in DICTS:
        return DICTS[kind]((k, decode(c, tensors, path + (k,))) for k, c in _children(node, "keys"))
    if kind == "namedtuple":
        cls = _registered_class(node, where)
        pairs = _children(node, "fields")
        if not optree.is_namedtuple_class(cls) or list(cls._fields) != [f for f, _ in pairs]:
            raise ValueError(
                f"the node at '{where}' was saved as namedtuple {node['tag']!r} with fields {[f for f, _ in pairs]}, "
                f"but that class now is {getattr(cls, '_fields', 'not a namedtuple')}; pass like=<a tree of the "
                "current structure> to restore into it"
            )
        return cls(*(decode(c, tensors, path + (f,)) for f, c in pairs))
    if kind == "custom":
        cls = _registered_class(node, where)
        entry = optree.register_pytree_node.get(cls, namespace=_tree.NAMESPACE)
        if entry is None or node["meta"]["kind"] == "opaque":
            raise ValueError(f"the node at '{where}' ({node['tag']!r}) cannot be rebuilt from a file; "
                             "pass like=<a tree of the same structure>")
        meta = _decode_meta(node["meta"])
        pairs = _children(node, "entries")
        children = [decode(c, tensors, path + (e,)) for e, c in pairs]
        children += _added_fields(cls, [e for e, _ in pairs])
        try:
            obj = entry.unflatten_func(meta, children)
            one = optree.tree_flatten_one_level(obj, none_is_leaf=False, namespace=_tree.NAMESPACE)
            same = [_entry(e) for e in one.entries][:len(pairs)] == [e for e, _ in pairs] and one.metadata == meta
        except Exception:  # noqa: BLE001 - a changed class fails in its own ways; all mean "changed"
            same = False
        if not same:
            raise ValueError(
                f"the node at '{where}' was saved as {node['tag']!r} with fields {[e for e, _ in pairs]}; "
                "the class has changed since. Pass like=<a tree of the current structure> to restore into it"
            )
        return obj
    raise CorruptStructure(f"unknown node kind {kind!r}")


def _added_fields(cls: type, saved: list[Any]) -> list[Any]:
    """The default of each field a dataclass gained after ``saved`` was written (its ``default``, or a new
    ``default_factory()``), so older files still load (``TrainState.accum``, new in format 3); nothing when a
    gained field has no default (then the class has changed: ``like=`` is needed)."""
    if not dataclasses.is_dataclass(cls):
        return []
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = [f.name for f in fields]
    if names[:len(saved)] != saved or len(names) == len(saved):
        return []
    extra = fields[len(saved):]
    if any(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING for f in extra):
        return []
    return [f.default if f.default is not dataclasses.MISSING else f.default_factory() for f in extra]


def flatten_saved(node: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], path: tuple[Any, ...] = (),
                  out: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every leaf of the saved tree as ``{dotted path: value}``, without looking up any class."""
    _check_depth(path)
    out = {} if out is None else out
    kind = node["kind"]
    if kind == "tensor":
        out[_tree.path_str(path)] = tensors[node["name"]]
    elif kind in SCALARS:
        out[_tree.path_str(path)] = _decode_scalar(node)
    elif kind in ("list", "tuple"):
        for i, c in enumerate(node["children"]):
            flatten_saved(c, tensors, path + (i,), out)
    elif kind in DICTS or kind in ("namedtuple", "custom"):
        names = {"namedtuple": "fields", "custom": "entries"}.get(kind, "keys")
        for k, c in _children(node, names):
            flatten_saved(c, tensors, path + (k,), out)
    elif kind != "none":
        raise CorruptStructure(f"unknown node kind {kind!r}")
    return out
