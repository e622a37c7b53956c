"""How gradients travel between ranks: flat buckets filled during the backward pass, and the
:class:`Reduction` that combines each bucket across ranks (DDP's communication hook).

The distributed step (:mod:`fnnet.distributed`) flattens the gradients into buckets of about
25 MB in the order the backward pass produces them, multiplying each rank's gradients by its
share of the samples (``n_r / N``) as it copies them. A bucket is then handed to the step's
*reduction*, a function ``reduction(bucket) -> wait`` that starts combining ``bucket.buffer``
across ranks and returns a function that waits for the result (DDP's
``register_comm_hook(state, hook)`` returns a future; this is the same seam, without a
future's overhead):

* :func:`all_reduce` (the default): the sum over ranks, which is the weighted mean gradient
  because every rank weighted its part;
* :func:`reduce_scatter`: the sum over ranks, each rank receiving only the chunk it owns (the
  sharded optimizer step, :mod:`fnnet.shard`);
* :func:`local`: no communication; each rank keeps its own weighted gradient (``n_r / N``
  times its local mean). What a micro-batch that does not synchronise needs, and a baseline
  for measuring what communication costs;
* your own: any callable with this signature (count calls, compress, reduce-scatter to an
  owner). It must start collectives in the order it is called: buckets are handed over in the
  same order on every rank.

This module talks to ``torch.distributed`` directly and imports nothing of fnnet's above
:mod:`fnnet.tree`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Protocol

import torch
import torch.distributed as dist

# torch 2.13 renamed the tensor-in, tensor-out collectives (the old names warn): use what this torch has
REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or getattr(dist, "reduce_scatter_tensor", None)
ALL_GATHER = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)

__all__ = ["REDUCE_SCATTER", "ALL_GATHER", "Bucket", "Reduction", "all_reduce", "reduce_scatter", "local", "GradBuckets", "pack"]


class Bucket(NamedTuple):
    """One bucket of gradients handed to a :class:`Reduction`.

    Attributes:
        index: the bucket's number; buckets are reduced in index order on every rank.
        buffer: the flat gradients, each multiplied by this rank's share of the samples
            (``n_r / N``): their sum over ranks is the mean gradient of the whole batch.
            The reduction may write into it.
        leaves: the indices (in ``fnnet.tree.leaves(params)`` order) of the parameters the
            buffer holds, one after the other.
        sizes: the number of elements of each of those parameters.
    """

    index: int
    buffer: torch.Tensor
    leaves: tuple[int, ...]
    sizes: tuple[int, ...]


class Reduction(Protocol):
    """``reduction(bucket) -> wait``: start combining ``bucket.buffer`` across ranks; ``wait()``
    returns the combined flat tensor (the same size as the buffer)."""

    def __call__(self, bucket: Bucket) -> Callable[[], torch.Tensor]:
        """Start combining ``bucket``; return the function that waits for the combined flat tensor."""
        ...


def all_reduce(bucket: Bucket, group: Any = None) -> Callable[[], torch.Tensor]:
    """The default :class:`Reduction`: an asynchronous sum over the ranks of ``group`` (a
    ``torch.distributed`` process group; ``None``: the default one), in place. A strategy on a
    group binds it: ``functools.partial(all_reduce, group=group)``."""
    work = dist.all_reduce(bucket.buffer, group=group, async_op=True)

    def wait() -> torch.Tensor:
        work.wait()
        return bucket.buffer

    return wait


def reduce_scatter(bucket: Bucket, group: Any = None) -> Callable[[], torch.Tensor]:
    """The sharded step's reduction (ZeRO-2): the sum over the ranks of ``group`` (``None``: the
    default group), of which this rank receives its chunk only (``bucket.buffer``, padded to a
    multiple of the group's size, split in equal parts). ``wait()`` returns that chunk, not a
    bucket-sized tensor."""
    world = dist.get_world_size(group)
    chunk = torch.empty(bucket.buffer.numel() // world, dtype=bucket.buffer.dtype, device=bucket.buffer.device)
    work = REDUCE_SCATTER(chunk, bucket.buffer, group=group, async_op=True)

    def wait() -> torch.Tensor:
        work.wait()
        return chunk

    return wait


def local(bucket: Bucket) -> Callable[[], torch.Tensor]:
    """A :class:`Reduction` that communicates nothing: each rank keeps ``(n_r / N) * g_r``."""
    return lambda: bucket.buffer


def pack(leaves: list[torch.Tensor], order: list[int], limit: int) -> list[list[int]]:
    """Leaf indices in ``order``, packed into buckets of at most ``limit`` bytes (a larger leaf
    alone) and of one dtype each."""
    buckets: list[list[int]] = []
    size, current, dtype = 0, [], None
    for i in order:
        x = leaves[i]
        nbytes = x.numel() * x.element_size()
        if current and (size + nbytes > limit or x.dtype != dtype):
            buckets.append(current)
            size, current = 0, []
        current.append(i)
        size, dtype = size + nbytes, x.dtype
    if current:
        buckets.append(current)
    return buckets


class GradBuckets:
    """Gradients gathered into flat buckets, each handed to ``reduction`` once complete.

    Each rank multiplies its gradients by ``weight`` (its share of the samples, over the loss
    scale: the hooks see gradients of the scaled loss) while flattening them into a bucket.
    Buckets follow ``order``, the order in which gradients became ready in the previous step
    (the backward pass's order), as DDP rebuilds its buckets after the first iteration.
    ``weight`` may be a function: it is called when the first bucket is filled, so the
    sample count's all-reduce can run during the backward pass. ``cache`` (a dict the step keeps)
    reuses the last step's bucket buffers: the reduced gradients are views into them, consumed by
    the update before the next step fills them again.
    """

    def __init__(self, leaves: list[torch.Tensor], order: list[int], limit: int, reduction: Reduction,
                 pad_to: int = 1, cache: dict[int, torch.Tensor] | None = None, dtype: torch.dtype | None = None):
        self.leaves = leaves
        self.dtype = dtype  # the buckets' dtype, the reduction's (a precision's reduce_dtype); None: the leaves'
        self.cache = cache  # bucket buffers kept from the last step (fresh memory costs page faults every step)
        self.pad_to = pad_to  # a bucket's buffer is a multiple of this (reduce-scatter: the world size)
        self.reduction = reduction
        self.buckets = pack(leaves, order, limit)
        self.bucket_of = {i: b for b, idx in enumerate(self.buckets) for i in idx}
        self.sizes = [tuple(leaves[i].numel() for i in idx) for idx in self.buckets]
        self.waiting = [len(b) for b in self.buckets]
        self.grads: list[torch.Tensor | None] = [None] * len(leaves)
        self.pending: list[Callable[[], torch.Tensor] | None] = [None] * len(self.buckets)
        self.ready: list[int] = []
        self.launched = 0  # buckets start in index order on every rank: collectives must match
        self.weight: Any = 1.0  # a number, a 0-dim tensor, or a function giving one (resolved once)
        self.scale_back: Any = 1.0  # the loss scale, to put it back on gradients that were unscaled
        self.addend: list[torch.Tensor] | None = None  # an accumulated window's sums, added as the bucket fills
        self.addend_weight: Any = 1.0  # their weight (a function, like weight, resolved once)

    def hook(self, i: int, g: torch.Tensor) -> None:
        """The gradient hook: record leaf ``i``'s gradient, start every bucket now complete."""
        if i not in self.bucket_of or self.grads[i] is not None:
            return
        self.grads[i] = g
        self.ready.append(i)
        self.waiting[self.bucket_of[i]] -= 1
        while self.launched < len(self.buckets) and self.waiting[self.launched] == 0:
            self._launch(self.launched)
            self.launched += 1

    def _launch(self, b: int) -> None:
        if callable(self.weight):
            self.weight = self.weight()
        if callable(self.addend_weight):
            self.addend_weight = self.addend_weight()
        idx, sizes = self.buckets[b], self.sizes[b]
        first = self.leaves[idx[0]]
        dtype = self.dtype or first.dtype
        total = sum(sizes)
        padded = -(-total // self.pad_to) * self.pad_to
        flat = self.cache.get(b) if self.cache is not None else None
        if flat is None or flat.numel() != padded or flat.dtype != dtype or flat.device != first.device:
            flat = torch.empty(padded, dtype=dtype, device=first.device)
            if self.cache is not None:
                self.cache[b] = flat
        flat[total:].zero_()
        offset = 0
        for i, n in zip(idx, sizes):  # weighted and flattened in one pass: the bucket is the scaled gradients
            g, part = self.grads[i], flat[offset:offset + n]
            if g is None:
                part.zero_()
            else:
                torch.mul(g.reshape(-1), self.weight, out=part)
            if self.addend is not None:  # the window's earlier micro-batches, weighted alike
                part.addcmul_(self.addend[i].reshape(-1), torch.as_tensor(self.addend_weight, dtype=part.dtype))
            offset += n
        self.pending[b] = self.reduction(Bucket(b, flat, tuple(idx), sizes))

    def launch_rest(self, grads: list[torch.Tensor | None]) -> None:
        """Launch the buckets the hooks did not (unused params; ``None`` where there is no gradient)."""
        for i, g in enumerate(grads):
            if self.grads[i] is None and i in self.bucket_of and g is not None:  # unused or frozen: no hook ran
                self.grads[i] = g * self.scale_back
        for b in range(self.launched, len(self.buckets)):
            self._launch(b)
        self.launched = len(self.buckets)

    def finish(self, grads: list[torch.Tensor]) -> Callable[[], list[torch.Tensor]]:
        """Launch what the hooks did not (unused params; ``None`` where there is no gradient, only an
        addend); returns ``wait() -> the reduced gradients`` (``sum_r (n_r / N) g_r`` under
        :func:`all_reduce`), views into the reduced buckets."""
        self.launch_rest(grads)

        def wait() -> list[torch.Tensor]:
            out = list(grads)
            for b, (idx, sizes) in enumerate(zip(self.buckets, self.sizes)):
                flat = self.pending[b]()  # type: ignore[misc]
                if not isinstance(flat, torch.Tensor) or flat.numel() != sum(sizes):
                    got = f"{flat.numel()} elements" if isinstance(flat, torch.Tensor) else type(flat).__name__
                    raise ValueError(f"the reduction returned {got} for bucket {b}, which holds {sum(sizes)}; a "
                                     "Reduction's wait() returns a tensor the size of bucket.buffer")
                offset = 0
                for i, n in zip(idx, sizes):
                    out[i] = flat[offset:offset + n].view_as(self.leaves[i])
                    offset += n
            return out

        return wait
