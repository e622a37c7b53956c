"""JAX, flax and optax interop: arrays through DLPack, flax linen variables, checkpoints.

Nothing here imports JAX until a function is called, so ``import fnnet.interop`` works
without it; every function then raises an ``ImportError`` saying ``pip install "fnnet[jax]"``.

Arrays (:func:`to_jax`, :func:`from_jax`)
-----------------------------------------
Every array leaf of a tree crosses through DLPack (``jax.dlpack.from_dlpack``,
``torch.from_dlpack``), keeping its dtype exactly (``bool``, ``bfloat16`` and ``float8`` included)
and its device (a CUDA tensor becomes a JAX GPU array on the same GPU). The data is shared, not
copied, where the layout allows: a row-major contiguous tensor on the CPU or a GPU (on the CPU JAX
itself copies a buffer that is not 64-byte aligned, e.g. a slice that starts mid-buffer; every
tensor torch allocates is aligned), and every JAX array. Anything else (transposed, strided or
broadcast views, negative-stride numpy arrays, read-only numpy arrays) is copied first, so no
input gives a wrong array.

**The aliasing rule.** A shared buffer belongs to both sides, and JAX arrays are immutable:
JAX assumes that nothing changes them. So never write in place (``t.add_(...)``,
``optimizer.step()``, a ``donate=True`` fnnet step, a ``Trainer``, which donates by default)
into a tensor that shares memory with a JAX array, in either direction, and never donate
(``jax.jit(..., donate_argnums=...)``) a JAX array that torch shares. To write, copy first:
``to_jax(tree, copy=True)`` / ``from_jax(tree, copy=True)``, or ``t.clone()``.

flax linen variables (:func:`to_flax`, :func:`from_flax`)
---------------------------------------------------------
Between fnnet params and buffers of a torch module (keyed like ``module.state_dict()``) and the
``{"params": ..., "batch_stats": ...}`` variables of the equivalent flax linen model:

==========================  ==============================  ======================================
torch                       flax linen                      layout
==========================  ==============================  ======================================
``Linear``                  ``Dense_k``                     ``weight (out, in)`` -> ``kernel (in, out)``
``Conv1d/2d/3d``            ``Conv_k``                      ``weight O I [D] H W`` -> ``kernel [D] H W I O``
``BatchNorm1d/2d/3d``       ``BatchNorm_k``                 ``weight, bias`` -> params ``scale, bias``;
                                                            ``running_mean, running_var`` ->
                                                            batch_stats ``mean, var``
``Embedding``               ``Embed_k``                     ``weight`` -> ``embedding``
``LayerNorm``               ``LayerNorm_k``                 ``weight, bias`` -> ``scale, bias``
==========================  ==============================  ======================================

The k-th torch layer of a kind, in registration order, is flax's automatic name ``<Kind>_k``:
how flax names the layers declared in forward order inside one ``@nn.compact`` method. ``names=``
maps torch module paths to other flax paths (``{"encoder.0": "Encoder_0/Dense_0"}``).

Only weights are converted: the flax model must be built with the torch layers' settings (for
``Conv2d``'s default ``padding=0`` flax's ``padding="VALID"``; inputs NHWC instead of NCHW;
``LayerNorm(epsilon=1e-5)``, torch's eps, not flax's 1e-6; ``BatchNorm(momentum=1 - torch's
momentum)``, ``epsilon=1e-5`` in both). ``BatchNorm``'s ``num_batches_tracked`` has no flax
counterpart: :func:`from_flax` keeps the module's value.

**Flatten order.** Matching shapes do not make matching models. flax's arrays are NHWC, so a
flax ``x.reshape((n, -1))`` before a ``Dense`` flattens in (h, w, c) order; the obvious torch
twin, ``x.flatten(1)`` (or ``nn.Flatten()``) on NCHW, flattens in (c, h, w) order. Every shape
still matches and the weights load, but the outputs are wrong, with no error. In the torch twin
flatten as flax does: ``einops.rearrange(x, "n c h w -> n (h w c)")``. To verify a conversion,
``from_flax(variables, module, check=(flax_module, sample_nhwc))`` runs both models and, when
their outputs differ, names the first layer whose output differs.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections import Counter
from types import ModuleType
from typing import Any, Iterator, Mapping, Sequence

import einops
import numpy as np
import torch
from torch import nn

from .. import tree as _tree
from .._functional import Model

__all__ = ["to_jax", "from_jax", "to_flax", "from_flax", "flax_names"]

INSTALL_HINT = 'pip install "fnnet[jax]"'

Names = Mapping[str, str | Sequence[str]]


def _require(fn: str, module: str = "jax") -> ModuleType:
    """Import ``module`` now; without it, the ImportError that tells how to install the extra.

    Imported at every call (a dict lookup once loaded), never cached here, so that JAX stays
    out of ``import fnnet`` and a missing JAX is reported by the function the user called.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"fnnet.interop.{fn} needs the optional JAX extra (jax, flax, optax), and importing "
            f"{module!r} failed ({exc}). Install it with: {INSTALL_HINT}"
        ) from exc


# -- arrays through DLPack ------------------------------------------------------------------------

# Types that JAX holds as 32-bit unless 64-bit mode is on: DLPack import would then narrow
# them silently (float64 -> float32), which is not an exact map.
_NARROWED = {"float64": "float32", "int64": "int32", "uint64": "uint32", "complex128": "complex64"}

# numpy dtypes from ml_dtypes (what JAX hands to numpy for bfloat16 and float8), which numpy's
# DLPack does not export: they cross as same-width unsigned integers, then torch reinterprets.
_ML_DTYPES = {
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "float8_e4m3fnuz": torch.float8_e4m3fnuz,
    "float8_e5m2fnuz": torch.float8_e5m2fnuz,
}


def _dtype_name(x: torch.Tensor | np.ndarray) -> str:
    return str(x.dtype).replace("torch.", "")


def _check_x64(jax: ModuleType, fn: str, leaves: list[tuple[str, Any]]) -> None:
    """Every 64-bit leaf needs JAX's 64-bit mode; list them all in one ``TypeError`` if it is off."""
    if jax.config.jax_enable_x64:
        return
    bad = [f"{p} ({_dtype_name(x)} -> {_NARROWED[_dtype_name(x)]})" for p, x in leaves
           if isinstance(x, (torch.Tensor, np.ndarray)) and _dtype_name(x) in _NARROWED]
    if bad:
        raise TypeError(
            f"{fn}: JAX's 64-bit mode is off, so JAX would narrow these leaves: {', '.join(bad)}. "
            "Turn it on (jax.config.update('jax_enable_x64', True), or `with jax.enable_x64(True):`) "
            "or cast them first (t.float(), t.int())"
        )


def _jax_gpu(jax: ModuleType, device: torch.device, fn: str, path: str) -> Any:
    """The JAX device for the CUDA ``device``, or a ``ValueError`` saying what JAX has instead."""
    index = device.index if device.index is not None else 0
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:  # no GPU backend in this JAX (the CPU-only wheel)
        gpus = []
    for d in gpus:
        if getattr(d, "local_hardware_id", d.id) == index:
            return d
    seen = gpus or jax.devices()
    raise ValueError(
        f"{fn}: '{path}' is on {device}, but JAX sees no such GPU (its devices: {seen}). Install a JAX "
        "with CUDA (pip install -U \"jax[cuda12]\") or move the tree to the CPU first: fnnet.place(tree, 'cpu')"
    )


def _tensor_to_jax(jax: ModuleType, where: str, path: str, t: torch.Tensor, copy: bool) -> Any:
    t = t.detach()  # DLPack refuses tensors that require grad; JAX has no autograd graph to share
    if t.layout != torch.strided:  # DLPack describes dense buffers only
        kind = str(t.layout).removeprefix("torch.")
        raise TypeError(f"{where}: '{path}' is a torch.{kind} tensor; JAX reads dense (strided) tensors only: "
                        f"pass '{path}'.to_dense() (and build a jax.experimental.sparse array from it in JAX if "
                        "you need one)")
    if t.device.type == "cuda":
        _jax_gpu(jax, t.device, where, path)
    elif t.device.type != "cpu":
        raise ValueError(f"{where}: '{path}' is on {t.device}; JAX reads CPU and CUDA tensors: "
                         "fnnet.place(tree, 'cpu') first")
    if t.is_conj() or t.is_neg():  # lazy conjugation: a flag DLPack cannot carry
        t = t.resolve_conj().resolve_neg()
    if copy or not t.is_contiguous():
        # JAX reads only compact layouts; a strided view would be an error, or a wrong array.
        t = t.clone(memory_format=torch.contiguous_format)
    try:
        return jax.dlpack.from_dlpack(t)
    except Exception as exc:  # a dtype or device JAX lacks: say which leaf
        raise TypeError(f"{where}: '{path}' ({_dtype_name(t)}{list(t.shape)} on {t.device}) cannot cross "
                        f"DLPack into JAX: {exc}") from None


def _numpy_to_jax(jax: ModuleType, where: str, path: str, x: np.ndarray) -> Any:
    try:
        return jax.numpy.array(x, copy=True)  # numpy buffers are rarely aligned for JAX: a copy either way
    except Exception as exc:
        raise TypeError(f"{where}: '{path}' (numpy {x.dtype}{list(x.shape)}) cannot become a JAX array: {exc}") from None


def to_jax(tree: Any, *, copy: bool = False) -> Any:
    """Every tensor leaf of ``tree`` as a JAX array, through DLPack (``jax.dlpack.from_dlpack``).

    Walks ``tree`` as :mod:`fnnet.tree` does (dicts, lists, tuples, namedtuples, ``TrainState``
    and registered dataclasses). Tensors keep their dtype exactly and their device (a CUDA
    tensor becomes a JAX GPU array on the same GPU), and share memory with the result when
    they are row-major contiguous (see the module docstring: **never write in place into a
    shared tensor**; JAX arrays are immutable). Strided views are copied first. numpy arrays
    are copied into JAX arrays; every other leaf (numbers, strings, keys, ``None``) is returned
    as it is.

    Args:
        tree: any fnnet pytree.
        copy: copy every tensor, so that the result shares no memory with ``tree``.

    Raises:
        TypeError: 64-bit leaves while JAX's 64-bit mode is off (JAX would narrow them),
            listing every such key path; a dtype JAX has no type for, or a sparse tensor (JAX
            reads dense ones: ``t.to_dense()``), naming the key path.
        ValueError: a CUDA tensor while JAX has no GPU, or a tensor on another device type.
    """
    return _to_jax(tree, copy, "to_jax")


def _to_jax(tree: Any, copy: bool, where: str) -> Any:
    jax = _require(where)
    _check_x64(jax, where, _tree.leaves_with_path(tree))

    def convert(path: str, leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor):
            return _tensor_to_jax(jax, where, path, leaf, copy)
        if isinstance(leaf, np.ndarray):
            return _numpy_to_jax(jax, where, path, leaf)
        return leaf

    return _tree.map_with_path(convert, tree)


def _jax_path(key_path: Sequence[Any]) -> str:
    """A ``jax.tree_util`` key path in fnnet's dotted form (``params.Dense_0.kernel``)."""
    parts = []
    for k in key_path:
        for attr in ("key", "idx", "name"):  # DictKey, SequenceKey / FlattenedIndexKey, GetAttrKey
            if hasattr(k, attr):
                parts.append(getattr(k, attr))
                break
        else:
            parts.append(k)
    return _tree.path_str(parts)


def _numpy_to_torch(path: str, x: np.ndarray, copy: bool) -> torch.Tensor:
    if x.dtype.kind not in "biufc" and x.dtype.name not in _ML_DTYPES:
        raise TypeError(f"from_jax: '{path}' is a numpy array of {x.dtype}, which torch has no dtype for")
    if copy or not x.flags.writeable or any(s < 0 for s in x.strides):
        # torch tensors cannot have negative strides (torch.from_dlpack aborts the process on
        # them) and are always writable: a copy keeps a read-only buffer read-only.
        x = np.array(x, order="C", copy=True)
    reinterpret = _ML_DTYPES.get(x.dtype.name)
    if reinterpret is not None:
        return torch.from_dlpack(x.view(f"uint{8 * x.dtype.itemsize}")).view(reinterpret)
    return torch.from_dlpack(x)


def _jax_to_torch(jax: ModuleType, path: str, x: Any, copy: bool) -> torch.Tensor:
    if isinstance(x, jax.core.Tracer):
        raise TypeError(f"from_jax: '{path}' is a JAX tracer: call from_jax on concrete arrays, "
                        "outside jax.jit, jax.grad and jax.vmap")
    devices = x.sharding.device_set
    if len(devices) != 1:
        raise ValueError(f"from_jax: '{path}' is sharded over {len(devices)} devices; put it on one first "
                         "(jax.device_put(x, jax.devices()[0]))")
    device = next(iter(devices))
    if device.platform == "gpu" and not torch.cuda.is_available():
        raise ValueError(f"from_jax: '{path}' is on JAX's {device}, and this torch has no CUDA: "
                         "jax.device_get(tree) first, or install a CUDA build of torch")
    try:
        t = torch.from_dlpack(x)
    except Exception as exc:
        raise TypeError(f"from_jax: '{path}' ({x.dtype}{list(x.shape)} on {device}) cannot cross DLPack into "
                        f"torch: {exc}") from None
    return t.clone() if copy else t


def from_jax(tree: Any, *, copy: bool = False) -> Any:
    """Every JAX array leaf of ``tree`` as a torch tensor, through DLPack (``torch.from_dlpack``).

    Walks ``tree`` as ``jax.tree_util`` does, so flax ``FrozenDict`` s, ``flax.struct``
    dataclasses and optax states are containers (their types are kept). JAX arrays keep their
    dtype and device (a JAX GPU array becomes a tensor on the same CUDA device) and the tensor
    shares their memory: a JAX data pipeline feeds a torch step without copies. **Never write
    in place into such a tensor** (JAX arrays are immutable; see the module docstring): pass
    ``copy=True``, or ``clone()`` it. numpy arrays become tensors too, sharing memory when
    writable and not negatively strided (a copy otherwise); every other leaf is returned as it is.

    Raises:
        TypeError: a tracer (``from_jax`` inside ``jax.jit``), or a dtype torch lacks, naming the key path.
        ValueError: an array sharded over several devices, or a GPU array while torch has no CUDA.
    """
    jax = _require("from_jax")

    def convert(key_path: Any, leaf: Any) -> Any:
        if isinstance(leaf, jax.Array):
            return _jax_to_torch(jax, _jax_path(key_path), leaf, copy)
        if isinstance(leaf, np.ndarray):
            return _numpy_to_torch(_jax_path(key_path), leaf, copy)
        return leaf

    return jax.tree_util.tree_map_with_path(convert, tree)


# -- flax linen variables ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Slot:
    """Where one torch tensor lives in flax's variables, and the layout change on the way."""

    collection: str  # "params" or "batch_stats"
    name: str  # the variable's name inside the flax layer
    pattern: str | None = None  # einops pattern from torch's layout to flax's


_CONV = {nn.Conv1d: "o i w -> w i o", nn.Conv2d: "o i h w -> h w i o", nn.Conv3d: "o i d h w -> d h w i o"}
_NORM = {"weight": _Slot("params", "scale"), "bias": _Slot("params", "bias")}
_BATCHNORM = {**_NORM, "running_mean": _Slot("batch_stats", "mean"), "running_var": _Slot("batch_stats", "var"),
              "num_batches_tracked": None}  # None: no flax counterpart (kept from the module)

# torch layer -> (flax layer kind, {torch attribute: slot}); checked with isinstance, in order.
_LAYERS: list[tuple[type, str, dict[str, _Slot | None]]] = [
    (nn.Linear, "Dense", {"weight": _Slot("params", "kernel", "o i -> i o"), "bias": _Slot("params", "bias")}),
    *[(cls, "Conv", {"weight": _Slot("params", "kernel", p), "bias": _Slot("params", "bias")}) for cls, p in _CONV.items()],
    *[(cls, "BatchNorm", _BATCHNORM) for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)],
    (nn.Embedding, "Embed", {"weight": _Slot("params", "embedding")}),
    (nn.LayerNorm, "LayerNorm", _NORM),
]
_KNOWN = "Linear, Conv1d/2d/3d, BatchNorm1d/2d/3d, SyncBatchNorm, Embedding, LayerNorm"


def _inverse(pattern: str) -> str:
    left, right = pattern.split("->")
    return f"{right.strip()} -> {left.strip()}"


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One torch tensor of the module and its flax variable."""

    key: str  # the state_dict key
    is_param: bool
    flax_key: tuple[str, ...]  # (collection, *layer path, name)
    pattern: str | None
    torch_shape: tuple[int, ...]
    flax_shape: tuple[int, ...]

    @property
    def flax_str(self) -> str:
        return "/".join(self.flax_key)


@dataclasses.dataclass
class _Plan:
    """How a module's tensors map onto flax variables, and what stands in the way."""

    entries: list[_Entry]
    kept: dict[str, torch.Tensor]  # buffers with no flax counterpart: from_flax keeps the module's
    layers: dict[str, tuple[str, ...]]  # torch module path -> flax layer path
    problems: list[str]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _flax_path(torch_path: str, value: Any, problems: list[str]) -> tuple[str, ...] | None:
    parts = tuple(value.split("/")) if isinstance(value, str) else tuple(value) if isinstance(value, (tuple, list)) else ()
    if not parts or not all(isinstance(p, str) and p and "/" not in p for p in parts):
        problems.append(f"names['{torch_path}'] = {value!r}: give a flax path, 'Dense_0' or 'Block_0/Dense_1'")
        return None
    return parts


def _plan(where: str, module: nn.Module, names: Names | None) -> _Plan:
    if not isinstance(module, nn.Module):
        hint = (" (fnnet.functional keeps no module: pass the nn.Module it was made from, or model.to_module())"
                if isinstance(module, Model) else "")
        raise TypeError(f"{where}: module must be the torch.nn.Module twin of the flax model, "
                        f"got {type(module).__name__}{hint}")
    if names is not None and not isinstance(names, Mapping):
        raise TypeError(f"{where}: names must map torch module paths to flax paths, got {type(names).__name__}")
    names = dict(names or {})
    first_name = {id(p): k for k, p in module.named_parameters()}  # a tied weight counts once, as in fnnet params
    counts: Counter[str] = Counter()
    plan = _Plan([], {}, {}, [])
    for path, layer in module.named_modules():
        own = [(n, t, True) for n, t in layer.named_parameters(recurse=False)]
        own += [(n, t, False) for n, t in layer.named_buffers(recurse=False)]
        if not own:
            continue  # containers, activations, pooling, dropout: nothing to convert
        rule = next(((kind, slots) for cls, kind, slots in _LAYERS if isinstance(layer, cls)), None)
        shown = path or "<root>"
        if rule is None:
            plan.problems.append(f"unknown layer type: '{shown}' ({type(layer).__name__}) holds "
                                 f"{[n for n, _, _ in own]}; fnnet.interop converts {_KNOWN}")
            continue
        kind, slots = rule
        default = (f"{kind}_{counts[kind]}",)
        counts[kind] += 1
        layer_path = _flax_path(path, names.pop(path), plan.problems) if path in names else default
        if layer_path is None:
            continue
        plan.layers[path] = layer_path
        for attr, tensor, is_param in own:
            key = _join(path, attr)
            if is_param and first_name[id(tensor)] != key:
                continue  # tied to a weight converted under its first name (flax holds a tie once)
            if attr not in slots:
                plan.problems.append(f"unknown entry: '{key}' of {type(layer).__name__} '{shown}' has no flax "
                                     f"{kind} counterpart (it has {sorted(s for s in slots if slots[s])})")
                continue
            slot = slots[attr]
            if slot is None:
                plan.kept[key] = tensor
                continue
            shape = tuple(tensor.shape)
            flax_shape = shape if slot.pattern is None else tuple(
                einops.rearrange(torch.empty(shape, device="meta"), slot.pattern).shape)
            plan.entries.append(_Entry(key, is_param, (slot.collection, *layer_path, slot.name), slot.pattern,
                                       shape, flax_shape))
    for path in names:  # what is left in names named no convertible layer
        plan.problems.append(f"names: '{path}' is not a layer of {type(module).__name__} with weights; its layers "
                             f"are {sorted(plan.layers) or 'none'}")
    seen: dict[tuple[str, ...], str] = {}
    for path, layer_path in plan.layers.items():
        if layer_path in seen:
            plan.problems.append(f"names: '{seen[layer_path]}' and '{path}' both map to flax "
                                 f"'{'/'.join(layer_path)}'")
        seen.setdefault(layer_path, path)
    return plan


def _raise(where: str, header: str, problems: list[str]) -> None:
    if problems:
        raise ValueError("\n".join([f"{where}: {header}:", *(f"  {p}" for p in problems)]))


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape)


def flax_names(module: nn.Module, *, names: Names | None = None) -> dict[str, str]:
    """``{torch module path: flax layer path}`` for every layer :func:`to_flax` converts.

    The default is flax's automatic naming in a single ``@nn.compact`` method: the k-th torch
    layer of a kind, in registration order, is ``<Kind>_k``; for the chapter's CNN,
    ``{"layers.0": "Conv_0", "layers.2": "Conv_1", "layers.7": "Dense_0", "layers.9": "Dense_1"}``.
    ``names`` overrides the entries it lists (flax paths as ``"Block_0/Dense_1"`` or tuples).

    Raises:
        ValueError: layers of an unknown type, or ``names`` that name no layer or map two
            layers to one flax path, all listed by path.
    """
    _require("flax_names")
    plan = _plan("flax_names", module, names)
    _raise("flax_names", f"{type(module).__name__} has no flax twin", plan.problems)
    return {path: "/".join(p) for path, p in plan.layers.items()}


def _set(out: dict, key: tuple[str, ...], value: Any) -> None:
    for k in key[:-1]:
        out = out.setdefault(k, {})
    out[key[-1]] = value


def _check_dict(where: str, what: str, got: Any) -> None:
    if not isinstance(got, Mapping):
        raise TypeError(f"{where}: {what} must be a dict of tensors keyed like state_dict(), got {type(got).__name__}")


def to_flax(params: Mapping[str, torch.Tensor], module: nn.Module, *, buffers: Mapping[str, torch.Tensor] | None = None,
            names: Names | None = None) -> dict[str, Any]:
    """Flax linen variables ``{"params": ..., "batch_stats": ...}`` from fnnet params and buffers.

    The inverse of :func:`from_flax`: ``flax_model.apply(to_flax(params, module), x_nhwc)``
    equals ``fnnet.functional(module).apply(params, x_nchw)`` when ``flax_model`` is the
    module's flax twin (layout rules and names in the module docstring). Also converts
    anything keyed like params, gradients included. The result is a plain dict of new JAX
    arrays (``batch_stats`` only for modules with BatchNorm), sharing no memory with the inputs.

    Args:
        params: the module's parameters keyed like ``state_dict()`` (``model.params``,
            ``state.params``, gradients); dtypes are kept.
        module: the ``nn.Module`` whose structure gives the layers (its own values are not read).
        buffers: ``model.buffers`` / ``state.buffers``; needed for BatchNorm's running stats
            (``num_batches_tracked`` may be left out).
        names: ``{torch module path: flax layer path}`` for the layers that flax does not
            name ``<Kind>_k`` (see :func:`flax_names`).

    Raises:
        ValueError: unknown layer types, missing or unexpected keys and shape mismatches,
            all listed by key path in one error.
    """
    _require("to_flax")
    plan = _plan("to_flax", module, names)
    _check_dict("to_flax", "params", params)
    if buffers is not None:
        _check_dict("to_flax", "buffers", buffers)
    buffers = {} if buffers is None else buffers
    problems = list(plan.problems)
    buffer_keys = {e.key for e in plan.entries if not e.is_param} | plan.kept.keys()
    for given, is_param, what in ((params, True, "params"), (buffers, False, "buffers")):
        wanted = {e.key: e for e in plan.entries if e.is_param == is_param}
        missing = [k for k in wanted if k not in given]
        if missing:
            hint = "" if is_param else " (pass buffers=model.buffers or state.buffers)"
            problems.append(f"missing {what} (in the module, not given): {', '.join(missing)}{hint}")
        allowed = wanted.keys() | (set() if is_param else plan.kept.keys())
        unexpected = [k for k in given if k not in allowed]
        if unexpected:
            hint = " (buffers go in buffers=)" if is_param and any(k in buffer_keys for k in unexpected) else ""
            problems.append(f"unexpected {what} (given, not in the module): {', '.join(unexpected)}{hint}")
        for k, e in wanted.items():
            if k in given and not isinstance(given[k], torch.Tensor):
                problems.append(f"type mismatch: {what}['{k}'] is a {type(given[k]).__name__}, not a tensor")
            elif k in given and _shape(given[k]) != e.torch_shape:
                problems.append(f"shape mismatch: {what}['{k}'] is {_shape(given[k])}, the module has {e.torch_shape}")
    _raise("to_flax", f"params and buffers do not match {type(module).__name__}", problems)
    out: dict[str, Any] = {}
    for e in plan.entries:
        t = (params if e.is_param else buffers)[e.key].detach()
        _set(out, e.flax_key, t if e.pattern is None else einops.rearrange(t, e.pattern))
    return _to_jax(out, True, "to_flax")


def _flatten_variables(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for k, v in tree.items():
        if isinstance(v, Mapping):  # dicts and flax FrozenDicts
            yield from _flatten_variables(v, prefix + (str(k),))
        else:
            yield prefix + (str(k),), v


def _restore_msgpack(where: str, data: bytes) -> Mapping:
    """The state dict in ``flax.serialization.to_bytes`` bytes, or a ``ValueError`` saying they hold none.

    msgpack reports a truncated or damaged file as whatever its decoder tripped on (an empty
    ``FormatError``, ``max_map_len``, an unhashable key, a numpy reshape): every such failure,
    and bytes that decode to something other than a dict, is one error naming the cause.
    """
    serialization = _require(where, "flax.serialization")

    def refuse(why: str, cause: BaseException | None = None) -> ValueError:
        error = ValueError(
            f"{where}: these {len(data)} bytes are not a flax msgpack state dict ({why}): the file is truncated or "
            "damaged, or was not written by flax.serialization.to_bytes(variables). Write it again from the flax "
            "side with flax.serialization.to_bytes(variables), or pass the variables themselves")
        error.__cause__ = cause
        return error

    try:
        restored = serialization.msgpack_restore(data)
    except Exception as exc:  # msgpack, numpy and unicode errors alike: the bytes are not a state dict
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise refuse(f"msgpack cannot decode them, {detail}", exc) from exc
    if not isinstance(restored, Mapping):
        raise refuse(f"they decode to a {type(restored).__name__}, not a dict")
    return restored


def _variables(where: str, variables: Any) -> dict[tuple[str, ...], Any]:
    """``{(collection, *path, name): array}`` from nested variables, msgpack bytes or a flat checkpoint dict."""
    if isinstance(variables, (bytes, bytearray, memoryview)):
        variables = _restore_msgpack(where, bytes(variables))
    if not isinstance(variables, Mapping):
        raise TypeError(f"{where}: variables must be flax variables {{'params': ..., 'batch_stats': ...}}, the "
                        f"bytes of flax.serialization.to_bytes(variables), or a flat checkpoint dict; "
                        f"got {type(variables).__name__}")
    if variables and not any(isinstance(v, Mapping) for v in variables.values()):
        # A flat dict, as safetensors files hold them: "params.Dense_0.kernel" (fnnet.save of a
        # nested dict, flax.traverse_util.flatten_dict(sep=".")) or "params/Dense_0/kernel".
        sep = "/" if all("/" in str(k) for k in variables) else "."
        flat = {tuple(str(k).split(sep)): v for k, v in variables.items()}
    else:
        flat = dict(_flatten_variables(variables))
    collections = sorted({k[0] for k in flat})
    if flat and not {"params", "batch_stats"} & set(collections):
        raise ValueError(f"{where}: variables must hold a 'params' collection ({{'params': ..., 'batch_stats': "
                         f"...}}, as flax's init returns); got top-level keys {collections}. A params tree alone: "
                         "wrap it as {'params': params}")
    return flat


def from_flax(variables: Any, module: nn.Module, *, names: Names | None = None, check: tuple[Any, Any] | None = None
              ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """fnnet ``(params, buffers)`` for ``module`` from the variables of its flax linen twin.

    The inverse of :func:`to_flax`: ``fnnet.functional(module).apply(params, x_nchw,
    buffers=buffers)`` equals ``flax_model.apply(variables, x_nhwc)``. Both dicts are keyed
    like ``module.state_dict()`` (a tied weight once, as in ``model.params``), hold new
    tensors (no memory shared with ``variables``) with the variables' dtypes, on the device
    the arrays are on; BatchNorm's ``num_batches_tracked``, which flax does not keep, is the
    module's. ``module.load_state_dict({**params, **buffers})`` puts them into the module.

    Args:
        variables: ``{"params": ..., "batch_stats": ...}`` (``flax_model.init(...)`` or a
            trained state's), its ``flax.serialization.to_bytes`` msgpack bytes, or a flat
            checkpoint dict keyed ``"params.Dense_0.kernel"`` (``fnnet.load`` or
            ``safetensors.flax.load_file`` of a file written from either side). Leaves may be
            JAX arrays, numpy arrays or tensors.
        module: the torch twin (its structure and shapes are read, not its values).
        names: ``{torch module path: flax layer path}`` where flax's names differ from
            ``<Kind>_k`` (see :func:`flax_names`).
        check: ``(flax_module, sample)``: also run both models and compare (see below).

    **Matching shapes are not matching models.** The conversion checks names and shapes; it
    cannot see what the two forwards do between layers. The common trap is the flatten before
    the first ``Dense``: flax's arrays are NHWC, so ``x.reshape((n, -1))`` flattens in (h, w, c)
    order, while the obvious torch twin, ``x.flatten(1)`` on NCHW, flattens in (c, h, w)
    order. The shapes agree, the weights load, and the outputs are wrong with no error (flax's
    MNIST example's CNN: differences up to 0.4). Flatten in flax's order in the torch twin:
    ``einops.rearrange(x, "n c h w -> n (h w c)")``.

    ``check=(flax_module, sample)`` catches such a difference: it runs
    ``flax_module.apply(variables, sample)`` (``sample`` as flax takes it, NHWC images; a JAX,
    numpy or torch array) and the torch module, in eval mode, on the converted params and
    buffers with the same sample (a 4-D sample transposed to NCHW, any other as it is). When
    the outputs differ (beyond 1e-4 of the largest flax output in float32), the ``ValueError``
    names the first layer, in the torch forward's order, whose output differs, matched to its
    flax layer by the names above, and the layers before it that agree. So the flax module's
    ``__call__`` must run in inference mode with ``(variables, sample)`` alone (as a
    ``train=False`` default does). The module's train/eval modes are restored afterwards.

    Raises:
        ValueError: unknown layer types, missing or unexpected variables and shape
            mismatches, all listed by path (``params/Dense_0/kernel``) in one error; bytes
            that are not a flax msgpack state dict (truncated, damaged, another format); with
            ``check``, outputs that differ, naming the first layer that differs.
        TypeError: ``check`` that is not ``(flax_module, sample)``.
    """
    _require("from_flax")
    if check is not None:
        _check_check_arg(check)
    plan = _plan("from_flax", module, names)
    flat = _variables("from_flax", variables)
    problems = list(plan.problems)
    wanted = {e.flax_key: e for e in plan.entries}
    missing = [f"{e.flax_str} (for {e.key})" for k, e in wanted.items() if k not in flat]
    if missing:
        problems.append(f"missing (in the module, not in variables): {', '.join(missing)}")
    unexpected = ["/".join(k) for k in flat if k not in wanted]
    if unexpected:
        problems.append(f"unexpected (in variables, not in the module): {', '.join(unexpected)}")
    for k, e in wanted.items():
        if k not in flat:
            continue
        leaf = flat[k]
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            problems.append(f"type mismatch: {e.flax_str} is a {type(leaf).__name__}, not an array")
        elif _shape(leaf) != e.flax_shape:
            layout = f" ({e.key} {e.torch_shape} as {e.pattern})" if e.pattern else ""
            problems.append(f"shape mismatch: {e.flax_str} is {_shape(leaf)}, {type(module).__name__} needs "
                            f"{e.flax_shape}{layout}")
    _raise("from_flax", f"variables do not match {type(module).__name__}", problems)
    params: dict[str, torch.Tensor] = {}
    buffers: dict[str, torch.Tensor] = {}
    for e in plan.entries:
        leaf = flat[e.flax_key]
        t = leaf.detach() if isinstance(leaf, torch.Tensor) else from_jax({e.flax_str: leaf})[e.flax_str]
        if e.pattern is not None:
            t = einops.rearrange(t, _inverse(e.pattern))
        (params if e.is_param else buffers)[e.key] = t.clone(memory_format=torch.contiguous_format)
    # state_dict order, with what flax does not keep taken from the module
    order = [k for k, _ in module.named_parameters()]
    params = {k: params[k] for k in order if k in params}
    for k, t in plan.kept.items():
        near = next((v for b, v in buffers.items() if b.rpartition(".")[0] == k.rpartition(".")[0]), None)
        buffers[k] = t.detach().clone().to(near.device if near is not None else t.device)
    buffers = {k: buffers[k] for k, _ in module.named_buffers() if k in buffers}
    if check is not None:
        nested: dict[str, Any] = {}
        for key, leaf in flat.items():
            _set(nested, key, leaf)
        _compare_with_flax(module, params, buffers, _to_jax(nested, False, "from_flax"), plan, *check)
    return params, buffers


# -- from_flax(..., check=): run both models, find the first layer that differs ----------------------------

# Layers whose torch outputs put channels second (N C ...) where flax puts them last (N ... C).
_CHANNELS_FIRST = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_CHECK_TOLERANCE = {torch.float64: 1e-7, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def _check_check_arg(check: Any) -> None:
    flax_linen = _require("from_flax", "flax.linen")
    if not (isinstance(check, tuple) and len(check) == 2 and isinstance(check[0], flax_linen.Module)):
        got = f"a tuple of {len(check)}" if isinstance(check, tuple) else type(check).__name__
        if isinstance(check, tuple) and check:
            got += f" starting with a {type(check[0]).__name__}"
        raise TypeError(f"from_flax: check must be (flax_module, sample_input): the flax linen module the variables "
                        f"belong to and an input it takes (NHWC images), got {got}")


def _as_torch(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.array(x, copy=True))
    return from_jax(x, copy=True)


def _gap(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, float]:
    """The largest difference between two outputs and the tolerance for it (relative to flax's largest value)."""
    diff = float((ours.double() - theirs.double()).abs().max()) if theirs.numel() else 0.0
    scale = max(float(theirs.double().abs().max()) if theirs.numel() else 0.0, 1.0)
    return diff, _CHECK_TOLERANCE.get(theirs.dtype, 1e-4) * scale


def _differs(ours: Any, theirs: Any) -> str | None:
    """Why two outputs differ (shapes, or the largest difference), or ``None`` when they agree."""
    if not isinstance(ours, torch.Tensor) or not isinstance(theirs, torch.Tensor):
        return f"torch gave a {type(ours).__name__}, flax a {type(theirs).__name__}"
    if ours.shape != theirs.shape:
        return f"shapes differ: torch {tuple(ours.shape)}, flax {tuple(theirs.shape)}"
    diff, tol = _gap(ours.to(theirs.device), theirs)
    return f"largest difference {diff:.3g}" if not diff <= tol else None


def _compare_with_flax(module: nn.Module, params: dict, buffers: dict, variables: dict, plan: _Plan,
                       flax_module: Any, sample: Any) -> None:
    """Raise a ``ValueError`` naming the first layer whose output differs, if the two models' outputs do."""
    jax = _require("from_flax")
    flax_in = sample if isinstance(sample, jax.Array) else _to_jax(sample, False, "from_flax")
    torch_in = _as_torch(sample)
    if torch_in.ndim == 4:  # images: NHWC for flax, NCHW for torch
        torch_in = einops.rearrange(torch_in, "n h w c -> n c h w")
    torch_in = torch_in.to(next(iter(params.values())).device) if params else torch_in
    flax_out, state = flax_module.apply(variables, flax_in, capture_intermediates=True, mutable=["intermediates"])
    captured = dict(_flatten_variables(state["intermediates"]))

    layers = {path: module.get_submodule(path) for path in plan.layers}
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [layer.register_forward_hook(lambda _m, _a, out, path=path: seen.setdefault(path, []).append(out))
             for path, layer in layers.items()]
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        with torch.no_grad():
            torch_out = torch.func.functional_call(module, {**params, **buffers}, (torch_in,))
    finally:
        for hook in hooks:
            hook.remove()
        for m, training in modes:
            m.train(training)

    def flax_name(path: str) -> str:
        return "/".join(plan.layers[path])

    why = _differs(torch_out, _as_torch(flax_out))
    if why is None:
        return
    agree = []
    for path, outs in seen.items():  # in the order the torch forward ran them
        theirs = captured.get((*plan.layers[path], "__call__"))
        if theirs is None:
            continue  # called by flax through another method: not captured, not compared
        for ours, their in zip(outs, theirs):
            if isinstance(layers[path], _CHANNELS_FIRST) and isinstance(ours, torch.Tensor) and ours.ndim >= 3:
                ours = torch.movedim(ours, 1, -1)
            layer_why = _differs(ours, _as_torch(their))
            if layer_why is not None:
                break
        else:
            agree.append(f"'{path}' (flax '{flax_name(path)}')")
            continue
        before = (f"the layers before it agree: {', '.join(agree)}. So the weights are right and the two forwards "
                  "differ between those layers and this one" if agree else
                  "it is the first converted layer, so check the input (flax takes the sample as given, NHWC; "
                  "torch gets it as NCHW when it is 4-D) and this layer's settings")
        raise ValueError(
            f"from_flax: check: the torch module's output differs from the flax model's ({why}). The first layer "
            f"whose output differs is '{path}' ({type(layers[path]).__name__}, flax '{flax_name(path)}'): "
            f"{layer_why}; {before}. Likely causes: a flatten in another order (flax flattens NHWC arrays, so "
            "x.reshape((n, -1)) is einops.rearrange(x, \"n c h w -> n (h w c)\") in torch, not x.flatten(1)), or "
            "another activation, pooling, padding, stride or epsilon (LayerNorm: torch 1e-5, flax 1e-6)")
    raise ValueError(
        f"from_flax: check: the torch module's output differs from the flax model's ({why}), but every converted "
        f"layer's output agrees ({', '.join(agree) or 'none was compared'}): the difference comes after the last "
        "of them (a final activation, pooling or reshape that only one side has)")
