"""Parameter sharding (ZeRO-3, FSDP): each rank keeps ``1 / W`` of every parameter, and a *unit*'s
parameters are gathered whole only around that unit's forward and again for its backward.

The parameters are grouped into *units* (:func:`unit_names`: by default every numbered child,
the elements of an ``nn.ModuleList`` or ``nn.Sequential``, as torch's ``fully_shard`` is applied
per transformer block, plus the rest of the model as the *root* unit). Each unit is one bucket of
the sharded layout of :mod:`fnnet.shard` (one flat buffer, padded to a multiple of ``W``, cut in
``W`` equal chunks): a rank's state holds its chunk of every unit as the 1-D part of each
parameter (:meth:`fnnet.shard.Layout.part`), so the optimizer, its state and the gradients are
those parts, exactly as under ZeRO-2.

The forward (:class:`UnitGather`, around the loss):

* the loss gets *placeholders* in place of the parameters (tensors of the right shape, all NaN,
  on a one-element storage each): the model's forward swaps them into its module slots
  (:func:`fnnet.functional`), and a module forward pre-hook (installed for the loss's call only)
  replaces a unit's placeholders with views of its gathered buffer when the unit's module starts,
  and puts them back when it returns; the root unit is gathered when the model starts and stays
  until it returns;
* the gather is an autograd function (:class:`GatherUnit`, torch's SimpleFSDP): an all-gather of
  the unit's chunk whose backward is a reduce-scatter of the unit's gradient, weighted by this
  rank's sample count, so a rank receives the sum over ranks of its part as soon as the unit's
  gradient is complete (autograd calls it when every use of the unit has been differentiated);
* a saved-tensor hook replaces every tensor a non-root unit's forward saves for the backward that
  lives in that unit's gathered buffer (a weight a matmul saves) by a handle; the backward's
  first use of the unit gathers it again (no autograd), and the buffer is dropped when the
  backward moves on to another unit. So between the forward and the backward only the shards,
  the activations and the root unit's buffer are alive (the root is used again at the end of the
  backward, as ``fully_shard`` keeps its root unsharded).
* prefetch: once the first forward has recorded the order in which it opens the units, opening a
  unit starts the next one's all-gather (asynchronously), and the backward's regather of a unit
  starts the previous one's: at most two units' buffers are alive at once.

It is exact: the gathered buffer holds the same numbers as the whole parameter, the forward and
backward are the one-process computations on them, and the reduce-scatter sums ``n_r g_r`` over
ranks exactly where one process sums the batch's gradients (the step divides by ``N``).
"""

from __future__ import annotations

import functools
import math
import threading
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .comm import ALL_GATHER, REDUCE_SCATTER
from .shard import finite_everywhere, whole_view
from .state import apply_update
from . import tree as _tree

__all__ = ["ROOT", "unit_names", "unit_buckets", "GatherUnit", "UnitGather", "sharded_loss", "sharded_params_update"]

ROOT = ""
"""The root unit's name: every parameter in no other unit."""


def _module_paths(keys: Iterable[str]) -> set[str]:
    out = set()
    for k in keys:
        parts = k.split(".")
        out.update(".".join(parts[:j]) for j in range(1, len(parts)))
    return out


def unit_names(keys: Sequence[str], units: Any = None) -> list[str]:
    """The unit of every parameter key: the outermost module path (a prefix of the key) that is a unit,
    or :data:`ROOT`.

    ``units``: ``None``: every numbered child (a path ending in an integer: ``blocks.3``, ``layers.0``);
    a name or a list of module paths; or a predicate ``fn(path) -> bool`` on module paths.
    """
    paths = _module_paths(keys)
    if units is None:
        chosen: Callable[[str], bool] = lambda p: p.rsplit(".", 1)[-1].isdigit()
    elif callable(units):
        chosen = units
    else:
        wanted = {units} if isinstance(units, str) else set(units)
        unknown = sorted(wanted - paths)
        if unknown:
            raise ValueError(f"ZeRO(stage=3, units=...): {unknown} name no module holding parameters; the module "
                             f"paths are {sorted(paths)[:12]}{' ...' if len(paths) > 12 else ''}")
        chosen = wanted.__contains__
    out = []
    for k in keys:
        parts = k.split(".")
        out.append(next((p for p in (".".join(parts[:j]) for j in range(1, len(parts))) if chosen(p)), ROOT))
    return out


def unit_buckets(params: Any, units: Any = None) -> tuple[list[str], list[list[int]]]:
    """``(unit names, leaf indices of each unit)`` of a params dict (root first, then the units in the
    order of their first leaf); a clear error for a unit mixing dtypes (one flat buffer each)."""
    if not isinstance(params, dict) or not all(isinstance(v, torch.Tensor) for v in params.values()):
        raise TypeError("ZeRO(stage=3) shards a flat dict of parameter tensors keyed like state_dict() "
                        f"(fnnet.functional(module).params), got {type(params).__name__}")
    paths = [p for p, _ in _tree.leaves_with_path(params)]
    leaves = _tree.leaves(params)
    names: list[str] = []
    buckets: dict[str, list[int]] = {}
    for i, u in enumerate(unit_names(paths, units)):
        if u not in buckets:
            names.append(u)
            buckets[u] = []
        buckets[u].append(i)
    names.sort(key=lambda u: u != ROOT)
    for u in names:
        dtypes = {leaves[i].dtype for i in buckets[u]}
        if len(dtypes) > 1:
            raise ValueError(f"ZeRO(stage=3): unit {u or '(root)'!r} mixes dtypes {sorted(map(str, dtypes))}; a unit "
                             "is one flat buffer: give its parameters one dtype, or units= that separate them")
    return names, [buckets[u] for u in names]


class GatherUnit(torch.autograd.Function):
    """``all_gather(chunk)`` over ``gather.group``, returned as one view per parameter of the unit (in
    the unit's order); its backward is the reduce-scatter of ``weight * grad`` (a rank gets the sum over
    ranks of its chunk's gradient): torch's SimpleFSDP. With ``gather.replicate`` (HSDP) the reduced
    chunk is then all-reduced across the replicas.

    One output per parameter, not one for the buffer: the backward copies each parameter's gradient
    into one send buffer once (``fully_shard``'s copy-in), where a buffer sliced outside would make
    autograd build a buffer-sized gradient per parameter (each slice's backward) and add them up.
    The reduce-scatter runs in ``gather.reduce_dtype`` when set (the precision policy's: float32
    under 16-bit parameters, as gloo's 16-bit reductions are unreliable)."""

    @staticmethod
    def forward(ctx: Any, chunk: torch.Tensor, gather: "UnitGather", unit: int) -> tuple[torch.Tensor, ...]:
        ctx.gather, ctx.unit = gather, unit
        ctx.set_materialize_grads(False)  # an unused parameter's gradient: None, its place zeroed once below
        full = gather.take(unit, gather.pending)
        lay = gather.lay
        return tuple(full[lay.parts[i].offset:lay.parts[i].offset + math.prod(lay.shapes[i])].view(lay.shapes[i])
                     for i in lay.buckets[unit])

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor, None, None]:
        g: UnitGather = ctx.gather
        lay, u = g.lay, ctx.unit
        some = next((x for x in grads if x is not None), None)
        dtype = g.reduce_dtype or (some.dtype if some is not None else g.chunks[u].dtype)
        send = torch.empty(lay.chunks[u] * g.world, dtype=dtype, device=g.chunks[u].device)
        end = 0
        for i, grad in zip(lay.buckets[u], grads):
            p, n = lay.parts[i], math.prod(lay.shapes[i])
            into = send[p.offset:p.offset + n]
            if grad is None:
                into.zero_()
            elif grad.dtype == dtype:  # the rank's sample count folded into the copy-in
                torch.mul(grad, g.weight, out=into.view(lay.shapes[i]))
            else:  # a 16-bit gradient reduced in float32: widened first, then weighted in float32
                into.view(lay.shapes[i]).copy_(grad).mul_(g.weight)
            end = p.offset + n
        send[end:].zero_()
        out = torch.empty(lay.chunks[u], dtype=dtype, device=send.device)
        REDUCE_SCATTER(out, send, group=g.group)
        if g.replicate is not None:  # HSDP: the replicas of this chunk sum theirs
            dist.all_reduce(out, group=g.replicate)
        return out, None, None


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class UnitGather:
    """The forward's gathering of units (see the module docstring): set up once per step by
    :func:`sharded_loss`; ``weight`` is this rank's sample count (the reduce-scatter's weight).
    ``group``: the ranks a unit is sharded over; ``replicate``: HSDP's group of this rank's replicas
    (each holds the same chunk; a chunk's gradient is all-reduced across it), or ``None``."""

    def __init__(self, group: Any, replicate: Any = None):
        self.group, self.world, self.replicate = group, dist.get_world_size(group), replicate
        self.lay: Any = None
        self.names: list[str] = []
        self.weight: float = 1.0
        self.reduce_dtype: torch.dtype | None = None  # the reduce-scatter's dtype (float32 under 16-bit params)
        self.thread = threading.get_ident()
        self.release()

    def set_layout(self, lay: Any, names: list[str]) -> None:
        if lay is not self.lay:
            self.order: list[int] = []  # the non-root units in the order the forward opened them (the first step's)
        self.lay, self.names = lay, names
        self.key_unit = {i: b for b, idx in enumerate(lay.buckets) for i in idx}
        self.position = {i: k for idx in lay.buckets for k, i in enumerate(idx)}  # a leaf's place among its unit's

    def release(self) -> None:
        """Forget the step's buffers (after its backward), waiting for any gather still in flight."""
        for pending in (getattr(self, "pending", {}), getattr(self, "back_pending", {})):
            for _, work in pending.values():
                work.wait()
        self.pending: dict[int, tuple[torch.Tensor, Any]] = {}  # unit -> a prefetched forward gather in flight
        self.back_pending: dict[int, tuple[torch.Tensor, Any]] = {}  # the same for the backward
        self.seen: list[int] = []  # the units this forward opened, in order
        self.chunks: list[torch.Tensor] = []
        self.placeholders: dict[int, int] = {}  # storage pointer -> leaf index
        self.slots: dict[int, list[tuple[dict, str]]] = {}  # unit -> its module slots (owner's _parameters, attr)
        self.unit_modules: dict[int, int] = {}  # id(module) -> unit
        self.open: dict[int, list[Any]] = {}  # unit -> [depth, a view of its buffer, saved slot values]
        self.live: dict[int, int] = {}  # storage pointer of an open unit's buffer -> unit
        self.back: tuple[int, torch.Tensor] | None = None  # the unit the backward gathered last
        self.entered = False

    def all_gather(self, chunk: torch.Tensor, async_op: bool = False) -> Any:
        full = torch.empty(chunk.numel() * self.world, dtype=chunk.dtype, device=chunk.device)
        work = ALL_GATHER(full, chunk.detach().contiguous(), group=self.group, async_op=async_op)
        return (full, work) if async_op else full

    def take(self, u: int, pending: dict[int, tuple[torch.Tensor, Any]]) -> torch.Tensor:
        """Unit ``u``'s gathered buffer: the prefetched one (waited for), or gathered now."""
        if u in pending:
            full, work = pending.pop(u)
            work.wait()
            return full
        return self.all_gather(self.chunks[u])

    def prefetch(self, u: int, step: int, pending: dict[int, tuple[torch.Tensor, Any]]) -> None:
        """Start the gather of the unit after (``step=1``) or before (``-1``) ``u`` in the forward's order,
        so it travels while ``u`` computes (at most two units' buffers at once)."""
        if not self.order:
            return
        k = self.order.index(u) + step if u in self.order else (0 if step > 0 else -1)
        if 0 <= k < len(self.order) and self.order[k] not in pending and self.order[k] not in self.open:
            pending[self.order[k]] = self.all_gather(self.chunks[self.order[k]], async_op=True)

    # -- the forward
    def enter(self, part: Any) -> Any:
        """The placeholders the loss gets, with this rank's chunk of every unit made (differentiably)."""
        self.release()
        self.thread = threading.get_ident()
        lay, leaves = self.lay, _tree.leaves(part)
        for b, idx in enumerate(lay.buckets):
            pieces = [leaves[i].reshape(-1) for i in idx]
            pad = lay.chunks[b] - sum(p.numel() for p in pieces)
            pieces.append(torch.zeros(pad, dtype=leaves[idx[0]].dtype, device=leaves[idx[0]].device))
            self.chunks.append(torch.cat(pieces))
        out = []
        for i, x in enumerate(leaves):
            base = torch.full((), float("nan"), dtype=x.dtype, device=x.device, requires_grad=True)
            self.placeholders[_ptr(base)] = i
            out.append(base.expand(lay.shapes[i]))
        return _tree.unflatten(lay.spec, out)

    def record(self, root: nn.Module) -> None:
        """The model's slots holding placeholders, by unit; the unit modules (``root``: the model)."""
        where: dict[int, str] = {}
        for name, mod in root.named_modules():
            for attr, t in mod._parameters.items():
                if t is None or _ptr(t) not in self.placeholders:
                    continue
                i = self.placeholders[_ptr(t)]
                u = self.key_unit[i]
                self.slots.setdefault(u, []).append((mod._parameters, attr))
                where.setdefault(id(mod), name)
                unit = self.names[u]
                if unit != ROOT and not (name == unit or name.startswith(unit + ".")):
                    raise ValueError(f"ZeRO(stage=3): parameter {self.lay_path(i)!r} of unit {unit!r} is used by module "
                                     f"{name!r} outside that unit (a weight tied across units): give "
                                     "units= that put both in one unit, or keep it in the root unit")
        for u, unit in enumerate(self.names):
            if unit != ROOT and u in self.slots:
                self.unit_modules[id(root.get_submodule(unit))] = u
        self.unit_modules[id(root)] = 0 if self.names[0] == ROOT else -1

    def lay_path(self, i: int) -> str:
        return [p for p, _ in _tree.leaves_with_path(self.lay.whole)][i]

    def open_unit(self, u: int) -> None:
        if u < 0:
            return
        if u in self.open:
            self.open[u][0] += 1
            return
        views = GatherUnit.apply(self.chunks[u], self, u)
        views = (views,) if isinstance(views, torch.Tensor) else views
        if self.names[u] != ROOT:
            self.seen.append(u)
        self.prefetch(u, 1, self.pending)
        saved = []
        for store, attr in self.slots.get(u, []):
            ph = store[attr]
            view = views[self.position[self.placeholders[_ptr(ph)]]]
            store[attr] = view if ph.requires_grad else view.detach()
            saved.append((store, attr, ph))
        self.open[u] = [1, views[0], saved]
        if self.names[u] != ROOT:
            self.live[_ptr(views[0])] = u

    def close_unit(self, u: int) -> None:
        if u < 0 or u not in self.open:
            return
        entry = self.open[u]
        entry[0] -= 1
        if entry[0] == 0:
            for store, attr, ph in entry[2]:
                store[attr] = ph
            self.live.pop(_ptr(entry[1]), None)
            del self.open[u]

    def pre_hook(self, module: nn.Module, args: Any) -> None:
        if threading.get_ident() != self.thread:
            return
        if not self.entered and any(t is not None and _ptr(t) in self.placeholders
                                    for m in module.modules() for t in m._parameters.values()):
            self.record(module)
            self.entered = True
        u = self.unit_modules.get(id(module))
        if u is not None:
            self.open_unit(u)

    def post_hook(self, module: nn.Module, args: Any, out: Any) -> None:
        if threading.get_ident() == self.thread:
            u = self.unit_modules.get(id(module))
            if u is not None:
                self.close_unit(u)

    # -- what the backward keeps
    def pack(self, t: torch.Tensor) -> Any:
        try:
            u = self.live.get(_ptr(t)) if t.device.type != "meta" else None
        except (RuntimeError, NotImplementedError):  # a tensor without a plain storage: not a unit's buffer
            u = None
        if u is None:
            return t
        return (u, t.storage_offset(), tuple(t.shape), t.stride(), t.requires_grad)

    def unpack(self, saved: Any) -> torch.Tensor:
        if isinstance(saved, torch.Tensor):
            return saved
        u, offset, shape, stride, _ = saved
        if self.back is None or self.back[0] != u:
            self.back = None  # the last unit's buffer goes before the next one comes
            with torch.no_grad():
                self.back = (u, self.take(u, self.back_pending))
                self.prefetch(u, -1, self.back_pending)
        return self.back[1].as_strided(shape, stride, offset)


def sharded_loss(loss_fn: Callable, gather: UnitGather) -> Callable:
    """``loss_fn`` on this rank's parts of the parameters: it gets the placeholders, and the units are
    gathered around their modules' forward (:class:`UnitGather`). The signature is ``loss_fn``'s."""

    @functools.wraps(loss_fn)
    def loss(params: Any, *args: Any, **kwargs: Any) -> Any:
        placeholders = gather.enter(params)
        pre = nn.modules.module.register_module_forward_pre_hook(gather.pre_hook)
        post = nn.modules.module.register_module_forward_hook(gather.post_hook)
        try:
            with torch.autograd.graph.saved_tensors_hooks(gather.pack, gather.unpack):
                out = loss_fn(placeholders, *args, **kwargs)
        finally:
            pre.remove()
            post.remove()
        if not gather.order:
            gather.order = list(gather.seen)
        if not gather.entered:
            raise ValueError(f"ZeRO(stage=3): the loss {getattr(loss_fn, '__name__', loss_fn)!r} called no module "
                             "holding the parameters it was given: the units are gathered in module forward hooks, "
                             "so the loss must run the model (model.apply(params, ...) with "
                             "model = fnnet.functional(module)), not compute with the parameter tensors directly")
        return out

    return loss


def sharded_params_update(lay: Any) -> Callable[..., tuple[Any, Any, Any, Any, Any]]:
    """The update of a ZeRO-3 step: the optimizer on this rank's parts (the state's parameters, already
    parts: nothing is gathered), the same skip decision on every rank, the whole tree's view in
    ``shards=`` (:class:`fnnet.optim.Shards`, as ZeRO-2)."""

    shards = whole_view(lay)

    def update(optimizer: Any, grads: Any, params: Any, opt_state: Any, *, buffers: Any = None,
               new_buffers: Any = None, loss_scale: Any = None, check_finite: bool = False, donate: bool = False):
        finite = finite_everywhere(grads, lay.group) if check_finite or loss_scale is not None else None
        return apply_update(optimizer, grads, params, opt_state, buffers=buffers, new_buffers=new_buffers,
                            loss_scale=loss_scale, finite=finite, donate=donate, shards=shards)

    return update
