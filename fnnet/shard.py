"""Optimizer-state sharding across ranks (ZeRO-2): each rank owns a part of the parameters, keeps
the optimizer state of that part only, receives only its part of the gradients, updates it, and
the parameters are all-gathered.

The layout (:class:`Layout`) is fixed by the parameters' structure, the world size and the
bucket size: the leaves, in reverse order (about the order the backward pass makes their
gradients), are packed into buckets of about ``bucket_mb``; each bucket, padded to a multiple
of the world size ``W``, is cut into ``W`` equal chunks, and rank ``r`` owns chunk ``r`` of every
bucket. So every rank owns about ``1 / W`` of every bucket (balanced by elements, parameters split
where a chunk boundary falls), and a leaf's part on a rank is one contiguous range of its
flattened elements (possibly empty).

A rank's *part* of a tree with the params' structure is the same tree with each leaf replaced
by the 1-D range of it this rank owns (:meth:`Layout.part`): the optimizer runs on it as on any
tree (``optimizer.init(part)``, ``optimizer.update(part_grads, state, part)``), so masks by key
path work; the update gets the whole tree's view explicitly, ``shards=``:class:`fnnet.optim.Shards`
(a sum over the shard group: ``clip_by_global_norm``'s norm; the whole shapes: a mask function).
The ranks are those of a shard group (:class:`fnnet.distributed.ZeRO`'s group, or
:class:`fnnet.distributed.HSDP`'s mesh dimension, whose replicas then all-reduce each part). A step:

* the backward pass fills buckets (weighted by ``n_r / N``) and each full bucket is
  reduce-scattered at once (:func:`fnnet.comm.reduce_scatter`): a rank receives only its chunk;
* the update runs on the rank's part (every rank skips the same non-finite steps: the finite
  flag is all-reduced);
* every bucket's chunks are all-gathered into the parameters.

That is the NCCL path. On gloo, whose ``reduce_scatter`` and ``all_gather`` take 2-3 times as
long as its ``all_reduce`` and broadcasts (``benches/gloo_collectives.py``), the buckets are
all-reduced (each rank keeps its chunk of the result) and each rank broadcasts its updated
chunk: the same state and numbers, with whole buckets in flight. The step refuses a torch
without the tensor collectives (``reduce_scatter_tensor``/``all_gather_into_tensor`` or their
2.13 names).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import torch
import torch.distributed as dist

from .comm import ALL_GATHER, REDUCE_SCATTER, Bucket, all_reduce, pack, reduce_scatter
from .optim import Shards
from . import tree as _tree
from .state import apply_update, grads_finite

__all__ = ["Layout", "layout", "shard_opt_state", "unshard_opt_state", "sharded_update", "check_backend"]


class LeafPart(NamedTuple):
    bucket: int  # the bucket holding the leaf
    offset: int  # the leaf's first element in the bucket
    lo: int  # this rank's range of the leaf's flattened elements: [lo, hi)
    hi: int


class Layout:
    """Which elements of every parameter this rank owns (see the module docstring)."""

    def __init__(self, leaves: list[torch.Tensor], spec: Any, world: int, rank: int, limit: int, *,
                 group: Any = None, replicate: Any = None, reduce_scatter: bool | None = None,
                 buckets: list[list[int]] | None = None):
        self.spec, self.world, self.rank = spec, world, rank
        self.group, self.replicate = group, replicate  # the shard group; HSDP's replicate group (or None)
        # gloo's reduce_scatter and all_gather are 2-3x slower than its all_reduce and broadcasts
        # (measured: benches/results/2026-12-03-cpu-xeon-2core-gloo-collectives.json): there the
        # gradients are all-reduced (each rank keeps its chunk) and each rank broadcasts its chunk
        if reduce_scatter is None:
            reduce_scatter = not (dist.is_initialized() and dist.get_backend(group) == "gloo")
        self.scatter = reduce_scatter
        # the whole params' shapes on the meta device: what the optimizer sees of the whole tree (Shards.whole)
        self.whole = _tree.unflatten(spec, [torch.empty(x.shape, dtype=x.dtype, device="meta") for x in leaves])
        self.shapes = [tuple(x.shape) for x in leaves]
        self.order = list(reversed(range(len(leaves))))
        self.limit = limit
        # what GradBuckets makes of the same order and limit; or given (ZeRO-3: one bucket per unit)
        self.buckets = pack(leaves, self.order, limit) if buckets is None else [list(b) for b in buckets]
        self.totals = [sum(leaves[i].numel() for i in idx) for idx in self.buckets]
        # chunk size per bucket (a unit's chunk is never empty: its collectives then carry one pad element)
        self.chunks = [max(-(-t // world), 0 if buckets is None else 1) for t in self.totals]
        self.parts: list[LeafPart] = [LeafPart(0, 0, 0, 0)] * len(leaves)
        for b, idx in enumerate(self.buckets):
            offset, c = 0, self.chunks[b]
            mine_lo, mine_hi = rank * c, (rank + 1) * c
            for i in idx:
                n = leaves[i].numel()
                lo, hi = max(offset, mine_lo) - offset, min(offset + n, mine_hi) - offset
                self.parts[i] = LeafPart(b, offset, lo, max(lo, hi))
                offset += n
        self.owned = sum(p.hi - p.lo for p in self.parts)

    def part(self, tree: Any) -> Any:
        """The tree with each leaf replaced by the 1-D range this rank owns (a view of a contiguous leaf)."""
        leaves = _tree.leaves(tree)
        return _tree.unflatten(self.spec, [x.reshape(-1)[p.lo:p.hi] for x, p in zip(leaves, self.parts)])

    def chunk(self, b: int, part_leaves: list[torch.Tensor]) -> torch.Tensor:
        """This rank's chunk of bucket ``b`` from its part of each leaf (zero-padded at the end)."""
        c = self.chunks[b]
        first = part_leaves[self.buckets[b][0]]
        out = torch.zeros(c, dtype=first.dtype, device=first.device)
        base = self.rank * c
        for i in self.buckets[b]:
            p = self.parts[i]
            if p.hi > p.lo:
                start = p.offset + p.lo - base
                out[start:start + p.hi - p.lo].copy_(part_leaves[i])
        return out

    def home(self, params: Any) -> Any:
        """``params`` copied into one flat buffer per bucket (padded, kept by the layout), as views: the
        donated step's parameters from then on, so the all-gather lands in them directly (no copy out)."""
        leaves = _tree.leaves(params)
        self.homes = []
        for b, idx in enumerate(self.buckets):
            first = leaves[idx[0]]
            self.homes.append(torch.zeros(self.chunks[b] * self.world, dtype=first.dtype, device=first.device))
        self.sends = [h[:self.chunks[b]].clone() for b, h in enumerate(self.homes)]
        out: list[Any] = [None] * len(leaves)
        for b, idx in enumerate(self.buckets):
            for i in idx:
                p = self.parts[i]
                n = leaves[i].numel()
                view = self.homes[b][p.offset:p.offset + n].view(self.shapes[i])
                with torch.no_grad():
                    view.copy_(leaves[i])
                out[i] = view
        return _tree.unflatten(self.spec, out)

    def at_home(self, params: Any) -> bool:
        """Whether ``params`` are the views :meth:`home` made (the state was not replaced since)."""
        homes = getattr(self, "homes", None)
        if homes is None:
            return False
        ptrs = [h.untyped_storage().data_ptr() for h in homes]
        return all(x.untyped_storage().data_ptr() == ptrs[p.bucket]
                   for x, p in zip(_tree.leaves(params), self.parts))

    def gather_home(self) -> None:
        """Every rank's chunk of every bucket into the home buffers (this rank's was updated in place)."""
        self._sync(self.homes, self.sends)

    def _sync(self, flats: list[torch.Tensor], sends: list[torch.Tensor] | None = None) -> None:
        """Fill every bucket's flat buffer from the ranks' chunks, this rank's being in place already:
        broadcasts from each chunk's owner on gloo, an all-gather elsewhere (its input is a copy of this
        rank's chunk: a collective's input and output do not overlap)."""
        works = []
        for b, flat in enumerate(flats):
            c = self.chunks[b]
            if not self.scatter:
                works += [dist.broadcast(flat[k * c:(k + 1) * c], src=self._global(k), group=self.group, async_op=True)
                          for k in range(self.world)]
            else:
                send = sends[b] if sends is not None else torch.empty(c, dtype=flat.dtype, device=flat.device)
                send.copy_(flat[self.rank * c:(self.rank + 1) * c])
                works.append(ALL_GATHER(flat, send, group=self.group, async_op=True))
        for work in works:
            work.wait()

    def gather(self, part: Any) -> Any:
        """The whole tree (new tensors, views into one buffer per bucket) from every rank's part."""
        part_leaves = _tree.leaves(part)
        flats = []
        for b in range(len(self.buckets)):
            mine = self.chunk(b, part_leaves)
            flat = torch.empty(mine.numel() * self.world, dtype=mine.dtype, device=mine.device)
            flat[self.rank * mine.numel():(self.rank + 1) * mine.numel()].copy_(mine)
            flats.append(flat)
        self._sync(flats)
        out: list[Any] = [None] * len(self.parts)
        for b, idx in enumerate(self.buckets):
            for i in idx:
                p = self.parts[i]
                n = 1
                for s in self.shapes[i]:
                    n *= s
                out[i] = flats[b][p.offset:p.offset + n].view(self.shapes[i])
        return _tree.unflatten(self.spec, out)

    def _global(self, k: int) -> int:
        return k if self.group is None or self.group is dist.group.WORLD else dist.get_global_rank(self.group, k)

    def reduction(self) -> Callable[[Bucket], Callable[[], torch.Tensor]]:
        """How the step reduces a bucket on the shard group: reduce-scatter (a chunk back), or all-reduce
        (gloo, ZeRO-1); with a replicate group (HSDP), this rank's chunk is then all-reduced across it."""
        base = functools.partial(reduce_scatter if self.scatter else all_reduce, group=self.group)
        if self.replicate is None:
            return base

        def hierarchical(bucket: Bucket) -> Callable[[], torch.Tensor]:
            within = base(bucket)

            def across() -> torch.Tensor:
                chunk = self.my_chunk(bucket.index, within())
                dist.all_reduce(chunk, group=self.replicate)
                return chunk

            return across

        return hierarchical

    def my_chunk(self, b: int, reduced: torch.Tensor) -> torch.Tensor:
        """This rank's chunk of bucket ``b`` from what the reduction returned (a chunk, or the whole bucket)."""
        c = self.chunks[b]
        return reduced if reduced.numel() == c else reduced[self.rank * c:(self.rank + 1) * c]

    def gradient(self, chunks: list[torch.Tensor]) -> Any:
        """This rank's part of the gradients, as views into the reduce-scattered chunks."""
        out = []
        for i, p in enumerate(self.parts):
            base = self.rank * self.chunks[p.bucket]
            start = p.offset + p.lo - base
            out.append(chunks[p.bucket][start:start + p.hi - p.lo])
        return _tree.unflatten(self.spec, out)


def layout(params: Any, world: int, rank: int, bucket_mb: float, *, group: Any = None, replicate: Any = None,
           reduce_scatter: bool | None = None, buckets: list[list[int]] | None = None) -> Layout:
    """The :class:`Layout` of ``params`` over the ``world`` ranks of ``group`` (this one: ``rank``), in
    buckets of about ``bucket_mb``; ``replicate``: HSDP's group of replicas; ``reduce_scatter``: the
    collectives (``None``: by the backend, all-reduce and broadcasts on gloo); ``buckets``: the leaf
    indices of each bucket, given (ZeRO-3's units) instead of packed by size."""
    leaves, spec = _tree.flatten(params)
    return Layout(leaves, spec, world, rank, int(bucket_mb * 2**20), group=group, replicate=replicate,
                  reduce_scatter=reduce_scatter, buckets=buckets)


def check_backend() -> None:
    """A clear error where the process group's backend lacks reduce-scatter or all-gather."""
    backend = dist.get_backend()
    if REDUCE_SCATTER is None or ALL_GATHER is None:
        raise RuntimeError(f"the ZeRO and HSDP strategies (shard_optimizer=True) need "
                           f"torch.distributed.reduce_scatter_tensor and all_gather_into_tensor (torch >= 2.13 with "
                           f"gloo, or NCCL); backend {backend!r} here has neither: train with strategy='ddp'")


def _state_param_map(opt_state: Any, params: Any) -> list[int | None]:
    """For each leaf of ``opt_state``: the index of the parameter it mirrors (its key path ends with
    that parameter's, its shape is the parameter's), or ``None`` (a count, a learning rate)."""
    names = [p for p, _ in _tree.leaves_with_path(params)]
    shapes = [tuple(x.shape) for x in _tree.leaves(params)]
    by_length = sorted(range(len(names)), key=lambda i: -len(names[i]))
    out: list[int | None] = []
    for path, x in _tree.leaves_with_path(opt_state):
        found = None
        if isinstance(x, torch.Tensor):
            for i in by_length:
                if (path == names[i] or path.endswith("." + names[i])) and x.dim() > 0 and tuple(x.shape) == shapes[i]:
                    found = i
                    break
        out.append(found)
    return out


def shard_opt_state(opt_state: Any, params: Any, lay: Layout) -> Any:
    """A whole optimizer state (``optimizer.init(params)``, or loaded from a file) cut to this rank's
    part: every leaf that mirrors a parameter becomes its owned range (a copy); the rest is kept."""
    mapping = _state_param_map(opt_state, params)
    leaves, spec = _tree.flatten(opt_state)
    out = []
    for x, i in zip(leaves, mapping):
        if i is None:
            out.append(x)
        else:
            p = lay.parts[i]
            out.append(x.reshape(-1)[p.lo:p.hi].clone())
    return _tree.unflatten(spec, out)


def part_ranges(opt_state: Any, params: Any, lay: Layout) -> dict[str, tuple[int, int, tuple[int, ...]]]:
    """``{key path: (lo, hi, whole shape)}`` for each leaf of a part state (cut by :func:`shard_opt_state`)
    that is this rank's range of a parameter-shaped leaf: the flattened elements ``[lo, hi)`` of the whole
    state's leaf of that shape. A sharded checkpoint writes these ranges with their offsets."""
    names = [p for p, _ in _tree.leaves_with_path(params)]
    by_length = sorted(range(len(names)), key=lambda i: -len(names[i]))
    out: dict[str, tuple[int, int, tuple[int, ...]]] = {}
    for path, x in _tree.leaves_with_path(opt_state):
        if not isinstance(x, torch.Tensor) or x.dim() != 1:
            continue
        for i in by_length:
            p = lay.parts[i]
            if (path == names[i] or path.endswith("." + names[i])) and x.shape[0] == p.hi - p.lo:
                out[path] = (p.lo, p.hi, lay.shapes[i]) if p.hi > p.lo else (0, 0, lay.shapes[i])
                break
    return out


def unshard_opt_state(part_state: Any, params: Any, lay: Layout, optimizer: Any) -> Any:
    """The whole optimizer state from every rank's part (collective: every rank calls it). The
    structure comes from ``optimizer.init`` on meta tensors, so nothing state-sized is allocated
    but the result. A state field that mirrors only some parameters (``masked``) works too."""
    template = optimizer.init(_tree.map(lambda x: torch.empty_like(x, device="meta"), params))
    mapping = _state_param_map(template, params)
    names = [p for p, _ in _tree.leaves_with_path(params)]
    t_paths = [p for p, _ in _tree.leaves_with_path(template)]
    spec = _tree.structure(template)
    p_leaves = _tree.leaves(part_state)
    if len(p_leaves) != len(t_paths):
        raise ValueError(f"the optimizer state has {len(p_leaves)} leaves where this optimizer's has "
                         f"{len(t_paths)}: not a state of this optimizer")
    fields: dict[str, dict[int, int]] = {}  # a state field (its key path's prefix) -> {param index: leaf index}
    for k, i in enumerate(mapping):
        if i is not None:
            fields.setdefault(t_paths[k][:len(t_paths[k]) - len(names[i])], {})[i] = k
    out: list[Any] = list(p_leaves)
    for members in fields.values():
        some = p_leaves[next(iter(members.values()))]
        parts = [p_leaves[members[i]] if i in members else
                 torch.zeros(p.hi - p.lo, dtype=some.dtype, device=some.device) for i, p in enumerate(lay.parts)]
        whole = _tree.leaves(lay.gather(_tree.unflatten(lay.spec, parts)))
        for i, k in members.items():
            out[k] = whole[i].clone()
    return _tree.unflatten(spec, out)


def part_state_shapes(optimizer: Any, params: Any, lay: Layout) -> list[tuple[int, ...]]:
    """The shapes of the tensors of a part state (a whole state cut by :func:`shard_opt_state`), found on
    the ``meta`` device (nothing allocated)."""
    whole = optimizer.init(lay.whole)
    return [tuple(x.shape) for x in _tree.leaves(shard_opt_state(whole, lay.whole, lay)) if isinstance(x, torch.Tensor)]


def check_part_init(optimizer: Any, params: Any, lay: Layout) -> None:
    """A ``ValueError`` when ``optimizer.init`` on this rank's part makes a state of another structure than
    the whole state cut to the part: a ``masked`` mask given as a function that looks at shapes selects
    other leaves on 1-D parts. (A whole state cut to parts is exact: the update sees the whole shapes.)"""
    want = [(p, tuple(x.shape)) for p, x in _tree.leaves_with_path(shard_opt_state(optimizer.init(lay.whole),
                                                                                     lay.whole, lay))]
    part = _tree.map(lambda x: torch.empty(x.shape, dtype=x.dtype, device="meta"), lay.part(params))
    got = [(p, tuple(x.shape)) for p, x in _tree.leaves_with_path(optimizer.init(part))]
    if want != got:
        raise ValueError(
            "a sharded step cannot initialise this optimizer on a rank's part of the parameters "
            "(TrainState(params, None)): its state there has another structure than the whole state cut to the "
            f"part (first difference: {next((w, g) for w, g in zip(want + [None], got + [None]) if w != g)}); a "
            "mask given as a function (masked(..., mask=fn), adamw(mask=fn)) sees 1-D parts there. Create the "
            "state whole (TrainState.create(params, optimizer)): the step cuts it and evaluates the mask on the "
            "whole shapes")


def whole_view(lay: Layout) -> Shards:
    """What the optimizer sees of the whole tree from one rank's part (:class:`fnnet.optim.Shards`): a sum
    over the layout's shard group and the whole shapes."""

    def sum_across(x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        dist.all_reduce(y, group=lay.group)
        return y

    return Shards(sum_across, lay.whole)


def finite_everywhere(grads: Any, group: Any) -> torch.Tensor:
    """Whether every rank of ``group`` holds finite gradients (a 0-dim bool): each rank checks its part
    and a MAX all-reduce makes every rank skip the same steps."""
    bad = (~grads_finite(grads)).to(torch.float32).reshape(1)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=group)
    return bad[0] == 0


def sharded_update(lay: Layout) -> Callable[..., tuple[Any, Any, Any, Any, Any]]:
    """The update of a sharded step (in place of :func:`fnnet.state.apply_update`): the optimizer on
    this rank's part, the same skip decision on every rank, then the parameters all-gathered. The
    optimizer gets the whole tree's view explicitly (:class:`fnnet.optim.Shards`: a sum over the
    shard group, the whole shapes)."""

    shards = whole_view(lay)

    def update(optimizer: Any, grads: Any, params: Any, opt_state: Any, *, buffers: Any = None,
               new_buffers: Any = None, loss_scale: Any = None, check_finite: bool = False, donate: bool = False):
        if donate and not lay.at_home(params):
            params = lay.home(params)  # once: the donated params move into the all-gather's buffers
        part = lay.part(params)
        finite = finite_everywhere(grads, lay.group) if check_finite or loss_scale is not None else None
        new_part, opt_state, new_buffers, loss_scale, finite = apply_update(
            optimizer, grads, part, opt_state, buffers=buffers, new_buffers=new_buffers, loss_scale=loss_scale,
            finite=finite, donate=donate, shards=shards)
        if donate:  # the part was updated in place, inside the home buffers
            lay.gather_home()
            return params, opt_state, new_buffers, loss_scale, finite
        return lay.gather(new_part), opt_state, new_buffers, loss_scale, finite

    return update
