"""Pytrees with JAX semantics, on optree.

A pytree is a nested structure of containers (dict, list, tuple, namedtuple, ``None``,
and classes registered with :func:`register_dataclass` / :func:`register`) whose leaves
are everything else: tensors, Python scalars, strings, :class:`fnnet.random.Key`.

The semantics follow ``jax.tree_util``: ``None`` is an empty subtree (it has no leaves),
dict keys are visited in sorted order, and every leaf has a key path. Paths are rendered
as dotted strings (``"layers.0.weight"``; a dict key that already contains dots, such as a
``state_dict`` key, is kept whole), which is what every fnnet error message names.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Sequence

import optree

__all__ = [
    "map",
    "map_with_path",
    "leaves",
    "leaves_with_path",
    "structure",
    "flatten",
    "flatten_with_path",
    "unflatten",
    "paths",
    "path_str",
    "all_equal",
    "register",
    "register_dataclass",
    "assert_same_structure",
    "PyTreeSpec",
]

NAMESPACE = "fnnet"
PyTreeSpec = optree.PyTreeSpec

_builtin_map = map


_OPTS: dict[str, Any] = {"none_is_leaf": False, "namespace": NAMESPACE}  # never mutated: read on every step


def _opts() -> dict[str, Any]:
    return _OPTS


def path_str(path: Sequence[Any]) -> str:
    """Render a key path (a tuple of dict keys, indices and field names) as ``a.0.b``."""
    if not path:
        return "<root>"
    return ".".join(str(p) for p in path)


def leaves(tree: Any) -> list[Any]:
    """The leaves of ``tree`` in canonical order (``jax.tree_util.tree_leaves``)."""
    return optree.tree_leaves(tree, **_OPTS)


def structure(tree: Any) -> PyTreeSpec:
    """The structure (treedef) of ``tree`` (``jax.tree_util.tree_structure``)."""
    return optree.tree_structure(tree, **_OPTS)


def flatten(tree: Any) -> tuple[list[Any], PyTreeSpec]:
    """``(leaves, structure)`` of ``tree`` (``jax.tree_util.tree_flatten``)."""
    return optree.tree_flatten(tree, **_OPTS)


def unflatten(spec: PyTreeSpec, leaves_: Iterable[Any]) -> Any:
    """Rebuild a tree from its structure and leaves; ``unflatten(structure(t), leaves(t)) == t``."""
    leaves_ = list(leaves_)
    if len(leaves_) != spec.num_leaves:
        raise ValueError(
            f"unflatten: the structure has {spec.num_leaves} leaves but {len(leaves_)} were given"
        )
    return optree.tree_unflatten(spec, leaves_)


def _accessor_path(accessor: Any) -> tuple[Any, ...]:
    # Namedtuple fields by name (as jax.tree_util's GetAttrKey), everything else by key/index.
    return tuple(getattr(e, "field", e.entry) for e in accessor)


def paths(tree: Any) -> list[str]:
    """The dotted key path of every leaf, in the order of :func:`leaves`."""
    return [path_str(_accessor_path(a)) for a in optree.tree_accessors(tree, **_opts())]


def flatten_with_path(tree: Any) -> tuple[list[tuple[str, Any]], PyTreeSpec]:
    """``([(path, leaf), ...], structure)``; namedtuple fields appear by name."""
    accessors, leaves_, spec = optree.tree_flatten_with_accessor(tree, **_opts())
    return [(path_str(_accessor_path(a)), leaf) for a, leaf in zip(accessors, leaves_)], spec


def leaves_with_path(tree: Any) -> list[tuple[str, Any]]:
    """``[(path, leaf), ...]`` in canonical order (``jax.tree_util.tree_leaves_with_path``)."""
    return flatten_with_path(tree)[0]


def _node_entries(spec: PyTreeSpec) -> tuple[Any, tuple[Any, ...], list[PyTreeSpec]]:
    return spec.type, tuple(spec.entries()), spec.children()


def _describe(spec: PyTreeSpec) -> str:
    if spec.is_leaf():
        return "a leaf"
    kind = getattr(spec.type, "__name__", str(spec.type))
    if spec.type is None or kind == "NoneType":
        return "None"
    entries = list(spec.entries())
    if spec.type is dict or isinstance(entries[:1] and entries[0], str):
        return f"{kind} with keys {entries}"
    return f"{kind} of length {len(entries)}"


def _first_difference(a: PyTreeSpec, b: PyTreeSpec, path: tuple[Any, ...], prefix_ok: bool) -> str | None:
    """Describe the first place where ``b`` does not match ``a`` (``a`` a prefix of ``b`` if ``prefix_ok``)."""
    if a.is_leaf():
        if prefix_ok or b.is_leaf():
            return None
        return f"at '{path_str(path)}': expected a leaf, got {_describe(b)}"
    if b.is_leaf() or a.type is not b.type:
        return f"at '{path_str(path)}': expected {_describe(a)}, got {_describe(b)}"
    a_type, a_entries, a_children = _node_entries(a)
    _, b_entries, b_children = _node_entries(b)
    if a_entries != b_entries:
        missing = [e for e in a_entries if e not in b_entries]
        extra = [e for e in b_entries if e not in a_entries]
        where = path_str(path + tuple((missing or extra or list(a_entries))[:1]))
        details = []
        if missing:
            details.append(f"missing {missing}")
        if extra:
            details.append(f"unexpected {extra}")
        if not details:
            details.append(f"entries {list(b_entries)} instead of {list(a_entries)}")
        return f"at '{where}': {', '.join(details)}"
    fields = getattr(a_type, "_fields", None)
    for entry, ca, cb in zip(a_entries, a_children, b_children):
        name = fields[entry] if fields is not None and isinstance(entry, int) else entry
        found = _first_difference(ca, cb, path + (name,), prefix_ok)
        if found is not None:
            return found
    if a != b and not prefix_ok:  # same children but different node metadata (e.g. namedtuple type)
        return f"at '{path_str(path)}': node metadata differs ({a} vs {b})"
    return None


def assert_same_structure(a: Any, b: Any, *, what: str = "trees", prefix: bool = False) -> None:
    """Raise ``ValueError`` naming the first differing key path unless ``a`` and ``b`` match.

    With ``prefix=True`` every leaf of ``a`` may stand for a whole subtree of ``b``.
    """
    sa, sb = structure(a), structure(b)
    if sa == sb:
        return
    diff = _first_difference(sa, sb, (), prefix)
    if diff is not None:
        raise ValueError(f"{what} differ in structure {diff}")


def map(f: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """Apply ``f`` leaf-wise over ``tree`` and ``rest`` (``jax.tree_util.tree_map``).

    Every tree in ``rest`` must have ``tree``'s structure (or have it as a prefix). If not,
    ``ValueError`` names the first differing key path.
    """
    try:
        return optree.tree_map(f, tree, *rest, **_opts())
    except (ValueError, TypeError) as exc:
        for i, other in enumerate(rest):
            try:
                assert_same_structure(tree, other, what=f"map: tree 0 and tree {i + 1}", prefix=True)
            except ValueError as mismatch:
                raise mismatch from None
        raise exc


def map_with_path(f: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """Like :func:`map`, with the leaf's dotted path as ``f``'s first argument."""
    try:
        spec = structure(tree)
        flat = [spec.flatten_up_to(r) for r in rest]
        out = [f(p, *xs) for p, *xs in zip(paths(tree), leaves(tree), *flat)]
        return optree.tree_unflatten(spec, out)
    except (ValueError, TypeError) as exc:
        for i, other in enumerate(rest):
            assert_same_structure(tree, other, what=f"map_with_path: tree 0 and tree {i + 1}", prefix=True)
        raise exc


def all_equal(a: Any, b: Any) -> bool:
    """True when both trees have one structure and every pair of leaves is equal (bitwise for tensors)."""
    import torch

    if structure(a) != structure(b):
        return False
    for x, y in zip(leaves(a), leaves(b)):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
                return False
            if x.dtype != y.dtype or x.shape != y.shape or x.device != y.device or not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


def register(cls: type, flatten_fn: Callable, unflatten_fn: Callable, path_entry_type: Any = None) -> type:
    """Register a container class with fnnet's pytree namespace (``optree.register_pytree_node``).

    ``flatten_fn(obj) -> (children, metadata, entries)``; ``unflatten_fn(metadata, children) -> obj``.
    """
    kwargs = {"namespace": NAMESPACE}
    if path_entry_type is not None:
        kwargs["path_entry_type"] = path_entry_type
    optree.register_pytree_node(cls, flatten_fn, unflatten_fn, **kwargs)
    return cls


def register_dataclass(cls: type | None = None, *, static: Sequence[str] = ()) -> Any:
    """Register a dataclass as a pytree container: its fields are children, in declaration order.

    Fields named in ``static`` are kept as metadata (not leaves): use them for hyperparameters
    and callables. Usable as a decorator with or without arguments.
    """

    def wrap(klass: type) -> type:
        if not dataclasses.is_dataclass(klass):
            raise TypeError(f"register_dataclass: {klass.__name__} is not a dataclass")
        names = [f.name for f in dataclasses.fields(klass) if f.name not in static]
        static_names = [f.name for f in dataclasses.fields(klass) if f.name in static]
        unknown = set(static) - {f.name for f in dataclasses.fields(klass)}
        if unknown:
            raise ValueError(f"register_dataclass: {klass.__name__} has no fields {sorted(unknown)}")

        def flatten_fn(obj: Any) -> tuple[list[Any], tuple[Any, ...], tuple[str, ...]]:
            return (
                [getattr(obj, n) for n in names],
                tuple(getattr(obj, n) for n in static_names),
                tuple(names),
            )

        def unflatten_fn(meta: tuple[Any, ...], children: Iterable[Any]) -> Any:
            kwargs = dict(zip(names, children))
            kwargs.update(zip(static_names, meta))
            obj = object.__new__(klass)
            for k, v in kwargs.items():
                object.__setattr__(obj, k, v)
            return obj

        return register(klass, flatten_fn, unflatten_fn)

    if cls is None:
        return wrap
    return wrap(cls)
