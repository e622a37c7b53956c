"""Loaders: batches from in-memory tensors (:class:`ArrayLoader`), and Keras' ``fit((X, y))`` as loaders.

A *loader* is anything iterable whose items are batches (:mod:`fnnet.batch`): an
:class:`ArrayLoader`, a ``torch.utils.data.DataLoader``, a list of ``(x, y)`` tuples or a
generator are all accepted wherever fnnet takes a loader. :func:`num_batches` and
:func:`set_epoch` are what fnnet's training code asks of one, and they work on all of them.

:class:`ArrayLoader` is the fast path: the whole dataset sits on the device once and each
batch is one slice (a view) or one ``index_select`` per leaf -- no per-sample Python, no
collate, no worker processes. Its order is a pure function of ``(key, epoch)``, so a resumed
run sees exactly the batches the uninterrupted run would have seen. The datasets themselves
(digits, MNIST) are in :mod:`fnnet.datasets`; this module re-exports them, and the batch
conventions of :mod:`fnnet.batch`, under their old names.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import torch

from . import random as _random
from . import tree as _tree
from .batch import as_arrays, batch_size_of, split_batch
from .datasets import DEFAULT_MIRROR, DIGITS_TRAIN_SIZE, load_digits, load_mnist, load_text
from .device import DeviceLike, place, resolve_device

__all__ = [
    "ArrayLoader",
    "WindowLoader",
    "num_batches",
    "set_epoch",
    "fit_loaders",
    # re-exported: the batch conventions (fnnet.batch) and the datasets (fnnet.datasets)
    "split_batch",
    "batch_size_of",
    "as_arrays",
    "load_digits",
    "load_mnist",
    "load_text",
    "DEFAULT_MIRROR",
    "DIGITS_TRAIN_SIZE",
]


# --------------------------------------------------------------------------------------
# ArrayLoader
# --------------------------------------------------------------------------------------
def _check_shard(shard: Any, n: int) -> tuple[int, int] | None:
    if shard is None:
        return None
    if (not isinstance(shard, tuple) or len(shard) != 2 or not all(isinstance(v, int) and not isinstance(v, bool)
                                                                   for v in shard)):
        raise TypeError(f"ArrayLoader: shard must be (rank, world_size) ints (fnnet.distributed.shard()), got {shard!r}")
    rank, world = shard
    if not 0 <= rank < world:
        raise ValueError(f"ArrayLoader: shard=({rank}, {world}): the rank must be in [0, {world})")
    if n < world:
        raise ValueError(f"ArrayLoader: {n} samples cannot give each of {world} ranks a sample")
    return (rank, world)


def _check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return int(batch_size)


def _as_tensor(path: str, x: Any) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.as_tensor(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"ArrayLoader: the leaf at '{path}' is a {type(x).__name__}; every leaf must be a tensor or "
            "numpy array (convert lists with torch.tensor)"
        )
    if x.ndim == 0:
        raise ValueError(f"ArrayLoader: the leaf at '{path}' is a 0-d tensor; it has no first (sample) dimension")
    return x


class ArrayLoader:
    """Batches of an in-memory dataset by index slicing (``torch.utils.data.DataLoader`` for tensors).

    Args:
        arrays: a tensor, a tuple ``(X, y)``, a dict, or any fnnet pytree of tensors (numpy
            arrays are converted with ``torch.as_tensor``, dtype kept) whose leaves all have the
            same first dimension, the number of samples.
        batch_size: samples per batch, a positive int.
        shuffle: visit the samples in a new random order each epoch. The order of epoch ``e``
            is ``fnnet.random.permutation(fold_in(key, e), n)``, drawn on the CPU, so it is the
            same whatever the device. torch's global RNG is never used.
        drop_last: drop the last batch when it is smaller than ``batch_size``.
        key: an :class:`fnnet.random.Key`; required when ``shuffle=True``, unused otherwise.
        device: where batches are delivered. Without ``stream`` the whole tree is placed there
            once (``fnnet.place``), so every batch is a view or a gather on that device (the
            fastest way, when the dataset fits). ``None`` keeps it where it is.
        stream: keep the dataset in host memory and copy each batch to ``device`` one batch
            ahead of use: for datasets larger than the device. On CUDA the data is pinned once
            and every batch is gathered into one of two pinned staging buffers and copied on a
            side stream: the step waits for its batch's copy on the device (an event), the host
            never waits for the step. Elsewhere the same code runs without a stream.
        shard: ``(rank, world_size)`` in a multi-process run (``fnnet.distributed.shard()``):
            this rank's part of every batch. Every rank draws the same epoch order (the same
            key); each global batch of ``batch_size * world_size`` samples is split into
            ``world_size`` contiguous parts whose sizes differ by at most one, and this rank
            gets part ``rank``. The parts are disjoint and cover the data, every rank gets the
            same number of batches, and no part is empty (a last global batch smaller than
            ``world_size`` joins the one before it).
        global_batch: ``batch_size`` is the batch of all ranks together, split over them by
            ``shard`` (default: ``batch_size`` per rank, a global batch of ``batch_size *
            world_size``). With a global batch, every step covers the same samples whatever the
            number of ranks, so a run can resume on another number of processes with the same
            data order (:meth:`fnnet.Trainer.fit`'s ``resume``); a global batch smaller than the
            number of ranks is a ``ValueError``.

    Iterating yields batches with the structure of ``arrays``. Each ``iter(loader)`` runs the
    next epoch: the first gives epoch 0, the second epoch 1, and so on; :attr:`epoch` is the
    epoch the next ``iter`` will run and :meth:`set_epoch` changes it (as
    ``DistributedSampler.set_epoch``), which is how a resumed run reproduces the shuffling.
    :meth:`batches` gives any epoch from any batch on without touching :attr:`epoch`.

    Raises:
        ValueError: leaves of different lengths (naming every key path and length), no
            samples, a bad ``batch_size``, ``shuffle=True`` without ``key``, or ``drop_last=True``
            with fewer samples than one batch.
        TypeError: a leaf that is not a tensor or numpy array, or a ``key`` that is not a Key.
    """

    def __init__(
        self,
        arrays: Any,
        batch_size: int,
        *,
        shuffle: bool = False,
        drop_last: bool = False,
        key: _random.Key | None = None,
        device: DeviceLike | None = None,
        stream: bool = False,
        shard: tuple[int, int] | None = None,
        global_batch: bool = False,
    ) -> None:
        self.batch_size = _check_batch_size(batch_size)
        self.global_batch = bool(global_batch)
        if shuffle and key is None:
            raise ValueError(
                "ArrayLoader(shuffle=True) needs key=fnnet.random.key(seed): fnnet never shuffles from "
                "torch's global RNG, so that every run (and every resumed run) sees the same order"
            )
        if key is not None and not isinstance(key, _random.Key):
            raise TypeError(f"key must be an fnnet.random.Key (fnnet.random.key(seed)), got {type(key).__name__}")
        arrays = _tree.map_with_path(_as_tensor, arrays)
        leaves = _tree.leaves_with_path(arrays)
        if not leaves:
            raise ValueError("ArrayLoader: arrays has no tensors; pass a tensor, a tuple (X, y) or a dict of tensors")
        lengths = {p: x.shape[0] for p, x in leaves}
        if len(set(lengths.values())) > 1:
            listed = ", ".join(f"'{p}': {n}" for p, n in lengths.items())
            raise ValueError(
                f"ArrayLoader: every array needs the same first dimension (number of samples), got {listed}"
            )
        n = next(iter(lengths.values()))
        if n == 0:
            raise ValueError("ArrayLoader: the dataset is empty (first dimension 0)")
        if drop_last and n < self.batch_size:
            raise ValueError(
                f"ArrayLoader: drop_last=True with {n} samples and batch_size={self.batch_size} gives no batch; "
                f"use batch_size <= {n} or drop_last=False"
            )
        self.device = resolve_device(device) if device is not None else None
        self.stream = bool(stream)
        if self.stream:
            if self.device is None:
                raise ValueError("ArrayLoader(stream=True) streams batches to a device: give device=...")
            arrays = _tree.map(lambda x: x.cpu(), arrays)
            if self.device.type == "cuda":
                arrays = _tree.map(lambda x: x if x.is_pinned() else x.pin_memory(), arrays)
            self.arrays = arrays
        else:
            self.arrays = place(arrays, self.device) if self.device is not None else arrays
        self.shard = _check_shard(shard, n)
        if self.global_batch and self.shard and self.batch_size < self.shard[1]:
            raise ValueError(f"ArrayLoader: a global batch of {self.batch_size} cannot give each of {self.shard[1]} "
                             f"ranks a sample; use batch_size >= {self.shard[1]} (global_batch=True: batch_size is "
                             "the batch of all ranks together)")
        self.num_samples = n
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.key = key
        self._epoch = 0

    # -- epochs ---------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The epoch the next ``iter(loader)`` runs (0 for a new loader)."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter(loader)`` run ``epoch`` (to resume a run; ``DistributedSampler.set_epoch``)."""
        if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        self._epoch = int(epoch)

    def global_batch_size(self) -> int:
        """The samples of one step over every rank: ``batch_size`` with ``global_batch=True``, else
        ``batch_size`` times the ranks of ``shard`` (a checkpoint records it, so that a resume on
        another number of ranks takes the same samples per step or says why not)."""
        if self.global_batch:
            return self.batch_size
        return self.batch_size * (self.shard[1] if self.shard else 1)

    def __len__(self) -> int:
        """The number of batches per epoch (per rank, with ``shard``)."""
        b = self.global_batch_size()
        if self.drop_last:
            return self.num_samples // b
        count = math.ceil(self.num_samples / b)
        if self.shard and count > 1 and self.num_samples - (count - 1) * b < self.shard[1]:
            count -= 1  # a last global batch too small to give every rank a sample joins the previous one
        return count

    def indices(self, epoch: int) -> torch.Tensor:
        """The sample order of ``epoch``: an int64 CPU tensor, ``arange(n)`` when not shuffling."""
        if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        if not self.shuffle:
            return torch.arange(self.num_samples)
        return _random.permutation(_random.fold_in(self.key, int(epoch)), self.num_samples)

    def batches(self, epoch: int, *, start: int = 0) -> Iterator[Any]:
        """The batches of ``epoch`` from batch index ``start`` on; :attr:`epoch` is not changed.

        To resume after ``s`` steps of a run that iterates the loader once per epoch:
        ``loader.batches(s // len(loader), start=s % len(loader))``.
        """
        order = self.indices(epoch)
        count = len(self)
        if isinstance(start, bool) or not isinstance(start, numbers.Integral) or not 0 <= start <= count:
            raise ValueError(f"start must be an int in [0, {count}] (the batches per epoch), got {start!r}")
        return self._iterate(order, int(start), count)

    def _bounds(self, i: int, count: int) -> tuple[int, int]:
        """The sample range (in the epoch's order) of batch ``i``: this rank's part with ``shard``."""
        b, n = self.global_batch_size(), self.num_samples
        lo, hi = i * b, (n if (i == count - 1 and not self.drop_last) else min((i + 1) * b, n))
        if self.shard:
            rank, world = self.shard  # parts that differ by at most one, the larger ones first
            q, r = divmod(hi - lo, world)
            lo += rank * q + min(rank, r)
            hi = lo + q + (1 if rank < r else 0)
        return lo, hi

    def _iterate(self, order: torch.Tensor, start: int, count: int) -> Iterator[Any]:
        if self.stream:
            bounds = [self._bounds(i, count) for i in range(start, count)]
            yield from _Streamer(self.arrays, self.device, max((hi - lo for lo, hi in bounds), default=1)).batches(
                None if not self.shuffle else order, bounds)
            return
        if not self.shuffle:
            for i in range(start, count):
                lo, hi = self._bounds(i, count)
                yield _tree.map(lambda x: x[lo:hi], self.arrays)
            return
        # one host-to-device copy of the order per epoch and device, then gathers on the device
        on_device: dict[torch.device, torch.Tensor] = {}
        for x in _tree.leaves(self.arrays):
            if x.device not in on_device:
                on_device[x.device] = order.to(x.device)
        for i in range(start, count):
            lo, hi = self._bounds(i, count)
            yield _tree.map(lambda x: x.index_select(0, on_device[x.device][lo:hi]), self.arrays)

    def __iter__(self) -> Iterator[Any]:
        epoch = self._epoch
        self._epoch += 1
        return self.batches(epoch)

    def __repr__(self) -> str:
        return (
            f"ArrayLoader(num_samples={self.num_samples}, batch_size={self.batch_size}, batches={len(self)}, "
            f"shuffle={self.shuffle}, drop_last={self.drop_last}, device={self.device}, stream={self.stream}, "
            f"epoch={self._epoch})"
        )


class _Streamer:
    """Host-resident data to a device, one batch ahead, double-buffered (``ArrayLoader(stream=True)``).

    Batch ``i + 1`` is gathered into a staging buffer and its copy to the device is issued
    (on a side CUDA stream, from pinned memory) before batch ``i`` is handed out, so the copy
    overlaps the step that consumes batch ``i``. The consumer's stream waits for the copy on
    the device (an event), never on the host. A staging buffer is reused two batches later,
    after the copy that read it has finished.
    """

    def __init__(self, arrays: Any, device: torch.device, batch_size: int):
        self.arrays, self.device = arrays, device
        self.cuda = device.type == "cuda"
        self.leaves, self.spec = _tree.flatten(arrays)
        self.staging = [[torch.empty((batch_size, *x.shape[1:]), dtype=x.dtype, pin_memory=self.cuda)
                         for x in self.leaves] for _ in range(2)]
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.copied: list[Any] = [None, None]  # the event of the last copy out of each staging buffer

    def _issue(self, slot: int, index: torch.Tensor | None, lo: int, hi: int) -> tuple[Any, Any]:
        """Gather rows ``lo:hi`` (of ``index``, or in order) into staging ``slot`` and start the copy."""
        if self.copied[slot] is not None:
            self.copied[slot].synchronize()  # the copy two batches ago has read this buffer
        staged = []
        for x, buf in zip(self.leaves, self.staging[slot]):
            part = buf[: hi - lo]
            if index is None:
                part.copy_(x[lo:hi])
            else:
                torch.index_select(x, 0, index[lo:hi], out=part)
            staged.append(part)
        if not self.cuda:
            return _tree.unflatten(self.spec, [t.to(self.device, copy=True) for t in staged]), None
        with torch.cuda.stream(self.copy_stream):
            out = [t.to(self.device, non_blocking=True) for t in staged]
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        self.copied[slot] = event
        return _tree.unflatten(self.spec, out), event

    def batches(self, order: torch.Tensor | None, bounds: list[tuple[int, int]]) -> Iterator[Any]:
        if not bounds:
            return
        ahead = self._issue(0, order, *bounds[0])
        for i in range(len(bounds)):
            current, event = ahead
            if i + 1 < len(bounds):
                ahead = self._issue((i + 1) % 2, order, *bounds[i + 1])
            if event is not None:
                consumer = torch.cuda.current_stream(self.device)
                consumer.wait_event(event)
                for t in _tree.leaves(current):  # allocated on the copy stream, used on the consumer's
                    t.record_stream(consumer)
            yield current



class WindowLoader(ArrayLoader):
    """Random windows of a token sequence, for a language model: batches of ``(x, y)``, ``y`` = ``x`` shifted by one.

    Each sample is a window of ``block_size + 1`` consecutive tokens starting at a random
    offset (nanoGPT's ``get_batch``): ``x`` its first ``block_size`` tokens, ``y`` its last
    ``block_size``, both ``(batch, block_size)`` int64. An epoch is ``windows_per_epoch``
    windows (default: as many as the text holds without overlap); the offsets of epoch ``e`` are
    ``fnnet.random.randint(fold_in(key, e), ...)``, drawn on the CPU: a pure function of the key
    and the epoch, never of torch's global RNG.

    It is an :class:`ArrayLoader` whose samples are windows, so everything else is
    ``ArrayLoader``'s: ``shard=`` / ``global_batch=True`` (a step covers the same windows on any
    number of ranks), ``set_epoch``, ``batches(epoch, start=)``, ``len()``, and the Trainer's exact
    mid-epoch resume. For a loop of your own, :meth:`state_dict` / :meth:`load_state_dict` save
    and restore the position (the epoch and the batches done in it; the same on every rank).

    Args:
        tokens: a 1-D integer tensor of token ids (``load_text().train``).
        block_size: the context length ``T``.
        batch_size: windows per batch (per rank; all ranks together with ``global_batch=True``).
        key: an :class:`fnnet.random.Key`, required.
        windows_per_epoch: the windows one epoch draws (default ``(len(tokens) - 1) // block_size``).
        device, shard, global_batch: as :class:`ArrayLoader`. The tokens are placed on ``device`` once.
        drop_last: drop an epoch's last, smaller batch (default ``True``: every batch has one shape,
            which a compiled step likes).

    Raises:
        ValueError: a non-1-D or non-integer ``tokens``, or fewer than ``block_size + 1`` tokens.
    """

    def __init__(self, tokens: torch.Tensor, block_size: int, batch_size: int, *, key: _random.Key,
                 windows_per_epoch: int | None = None, device: DeviceLike | None = None,
                 shard: tuple[int, int] | None = None, global_batch: bool = False, drop_last: bool = True) -> None:
        if (not isinstance(tokens, torch.Tensor) or tokens.ndim != 1 or tokens.is_floating_point()
                or tokens.is_complex() or tokens.dtype == torch.bool):
            raise ValueError(f"WindowLoader: tokens must be a 1-D integer tensor of token ids, got "
                             f"{getattr(tokens, 'dtype', type(tokens).__name__)} {tuple(getattr(tokens, 'shape', ()))}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"WindowLoader: block_size must be a positive int, got {block_size!r}")
        if len(tokens) < block_size + 1:
            raise ValueError(f"WindowLoader: {len(tokens)} tokens hold no window of block_size + 1 = {block_size + 1}")
        if key is None:
            raise ValueError("WindowLoader needs key=fnnet.random.key(seed): the window offsets are drawn under it")
        windows = (len(tokens) - 1) // block_size if windows_per_epoch is None else windows_per_epoch
        if isinstance(windows, bool) or not isinstance(windows, int) or windows < 1:
            raise ValueError(f"WindowLoader: windows_per_epoch must be a positive int, got {windows_per_epoch!r}")
        if drop_last and windows < _check_batch_size(batch_size):
            raise ValueError(f"WindowLoader: {windows} windows per epoch give no full batch of {batch_size}; "
                             f"raise windows_per_epoch or pass drop_last=False")
        super().__init__(tokens.long(), batch_size, shuffle=True, key=key, device=device, shard=shard,
                         global_batch=global_batch)
        self.num_samples, self.drop_last, self.block_size = windows, bool(drop_last), block_size
        self._offsets = torch.arange(block_size + 1, device=self.arrays.device)
        self._start = 0  # where the next iter() starts in its epoch (load_state_dict)
        self._done: tuple[int, int] | None = None  # (epoch, batches done) of the iteration in progress

    def indices(self, epoch: int) -> torch.Tensor:
        """The window offsets of ``epoch``: ``windows_per_epoch`` int64 starts in ``[0, len(tokens) - block_size)``."""
        if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        high = len(self.arrays) - self.block_size
        return _random.randint(_random.fold_in(self.key, int(epoch)), (self.num_samples,), 0, high)

    def _iterate(self, order: torch.Tensor, start: int, count: int) -> Iterator[Any]:
        order = order.to(self.arrays.device)
        for i in range(start, count):
            lo, hi = self._bounds(i, count)
            window = self.arrays[order[lo:hi, None] + self._offsets]
            yield window[:, :-1].contiguous(), window[:, 1:].contiguous()

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter(loader)`` run ``epoch`` from its first batch."""
        super().set_epoch(epoch)
        self._start, self._done = 0, None

    def __iter__(self) -> Iterator[Any]:
        epoch, start = self._epoch, self._start
        self._epoch, self._start = epoch + 1, 0
        return self._tracked(epoch, start)

    def _tracked(self, epoch: int, start: int) -> Iterator[Any]:
        self._done = (epoch, start)
        for i, batch in enumerate(self.batches(epoch, start=start), start + 1):
            self._done = (epoch, i)
            yield batch

    def state_dict(self) -> dict[str, int]:
        """Where the next batch comes from: ``{"epoch", "batch", "global_batch"}`` (batches counted per step,
        the same on every rank and, with ``global_batch=True``, on any number of ranks)."""
        epoch, batch = (self._epoch, self._start) if self._done is None else self._done
        if batch >= len(self):
            epoch, batch = epoch + 1, 0
        return {"epoch": int(epoch), "batch": int(batch), "global_batch": self.global_batch_size()}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue from :meth:`state_dict`'s position: the next ``iter()`` gives the batches the saved run had next.

        Raises:
            ValueError: another global batch (its batch ``b`` would hold other windows), or a position past the epoch.
        """
        if state.get("global_batch") != self.global_batch_size():
            raise ValueError(f"WindowLoader.load_state_dict: saved with a global batch of {state.get('global_batch')} "
                             f"windows, this loader's is {self.global_batch_size()}: the same position would be other "
                             "windows. Use the same global batch (global_batch=True keeps it on any number of ranks)")
        if not 0 <= int(state["batch"]) < len(self):
            raise ValueError(f"WindowLoader.load_state_dict: batch {state['batch']} is outside [0, {len(self)})")
        self.set_epoch(int(state["epoch"]))
        self._start = int(state["batch"])

    def __repr__(self) -> str:
        return (f"WindowLoader(tokens={len(self.arrays)}, block_size={self.block_size}, batch_size={self.batch_size}, "
                f"windows_per_epoch={self.num_samples}, batches={len(self)}, epoch={self._epoch})")


def fit_loaders(train: Any, val: Any = None, *, batch_size: int | None = None, validation_split: float = 0.0,
                shuffle: bool = True, key: Any = None, device: Any = "cpu",
                shard: tuple[int, int] | None = None) -> tuple[Any, Any]:
    """Keras' ``fit((X, y), validation_split=...)``: ``(train, val)`` as loaders.

    ``(X, y)`` (tensors or NumPy arrays) becomes an :class:`ArrayLoader` of ``batch_size``
    (default 32), shuffled each epoch under ``key``; with ``validation_split`` the last
    fraction of the samples (before shuffling, as Keras) becomes the validation data. ``val``
    given as ``(X_val, y_val)`` becomes a loader of the same batch size, in order. Loaders (and
    any other iterable of batches) pass through unchanged; ``batch_size`` and
    ``validation_split`` are then an error, since a loader brings its own batches.
    """
    if not (isinstance(validation_split, numbers.Real) and not isinstance(validation_split, bool)
            and 0 <= validation_split < 1):
        raise ValueError(f"validation_split must be a fraction in [0, 1), got {validation_split!r}")
    validation_split = float(validation_split)  # np.float32(0.2) as 0.2
    arrays = as_arrays(train)
    if arrays is None:
        if batch_size is not None or validation_split:
            raise ValueError("batch_size and validation_split apply when fit gets the data itself, (X, y) as tensors "
                             "or NumPy arrays; a loader brings its own batches")
        return train, val
    if len(arrays) != 2:
        raise ValueError(f"fit((X, y)) takes inputs and targets; got {len(arrays)} arrays")
    if len(arrays[0]) != len(arrays[1]):  # before any split: the lengths the caller passed
        raise ValueError(f"fit((X, y)): X holds {len(arrays[0])} samples and y {len(arrays[1])}; they must match")
    size = 32 if batch_size is None else batch_size
    if validation_split:
        if val is not None:
            raise ValueError("pass either val_data or validation_split, not both")
        n = len(arrays[0])
        cut = n - int(round(n * validation_split))
        if not 0 < cut < n:
            raise ValueError(f"validation_split={validation_split} leaves no samples to train or to validate on (of {n})")
        val = tuple(a[cut:] for a in arrays)
        arrays = tuple(a[:cut] for a in arrays)
    train_loader = ArrayLoader(arrays, size, shuffle=shuffle, key=key if shuffle else None, device=device, shard=shard)
    val_arrays = as_arrays(val)
    if val_arrays is not None:
        val = ArrayLoader(val_arrays, size, device=device, shard=shard)
    return train_loader, val


def num_batches(loader: Iterable[Any]) -> int | None:
    """``len(loader)`` when the loader has a length (ArrayLoader, DataLoader, list), else ``None``."""
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def set_epoch(loader: Iterable[Any], epoch: int) -> None:
    """Tell ``loader`` which epoch comes next, where it can be told (for exact resumes).

    Calls ``loader.set_epoch(epoch)`` (ArrayLoader) or ``loader.sampler.set_epoch(epoch)`` (a
    ``DataLoader`` over a ``DistributedSampler``); anything else is left alone.
    """
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    elif hasattr(getattr(loader, "sampler", None), "set_epoch"):
        loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
