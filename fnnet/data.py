"""Data: batches from in-memory tensors, the embedded digits dataset, and MNIST from IDX files.

A *loader* is anything iterable whose items are batches, and a *batch* is any pytree of tensors
whose leaves share their first dimension: an :class:`ArrayLoader`, a ``torch.utils.data.DataLoader``,
a list of ``(x, y)`` tuples or a generator are all accepted wherever fnnet takes a loader.
:func:`batch_size_of`, :func:`num_batches` and :func:`set_epoch` are what fnnet's training code
asks of one, and they work on all of them.

:class:`ArrayLoader` is the fast path: the whole dataset sits on the device once and each
batch is one slice (a view) or one ``index_select`` per leaf -- no per-sample Python, no
collate, no worker processes. Its order is a pure function of ``(key, epoch)``, so a resumed
run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import gzip
import math
import numbers
import os
import shutil
import urllib.error
import urllib.request
import uuid
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import torch

from . import random as _random
from . import tree as _tree
from .device import DeviceLike, place, resolve_device

__all__ = [
    "ArrayLoader",
    "split_batch",
    "batch_size_of",
    "num_batches",
    "set_epoch",
    "as_arrays",
    "fit_loaders",
    "load_digits",
    "load_mnist",
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
    ) -> None:
        self.batch_size = _check_batch_size(batch_size)
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

    def _global_batch(self) -> int:
        return self.batch_size * (self.shard[1] if self.shard else 1)

    def __len__(self) -> int:
        """The number of batches per epoch (per rank, with ``shard``)."""
        b = self._global_batch()
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
        b, n = self._global_batch(), self.num_samples
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


# --------------------------------------------------------------------------------------
# What fnnet asks of any loader
# --------------------------------------------------------------------------------------
def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a supervised batch: ``(x, y)``, ``[x, y]`` or ``{"x": ..., "y": ...}``.

    A batch of inputs alone (a tensor, a 1-tuple, a dict without ``"y"``) gives ``targets=None``.
    Anything else is a ``ValueError`` saying which forms are accepted.
    """
    if isinstance(batch, Mapping):
        if "x" not in batch:
            raise ValueError(f"a dict batch needs keys 'x' (and 'y' for training), got {sorted(batch)}")
        return batch["x"], batch.get("y")
    if isinstance(batch, (tuple, list)):
        if len(batch) in (1, 2):
            return batch[0], (batch[1] if len(batch) == 2 else None)
        raise ValueError(f"a batch is (inputs, targets), (inputs,) or {{'x': ..., 'y': ...}}; got a {type(batch).__name__} "
                         f"of length {len(batch)}")
    if isinstance(batch, torch.Tensor):
        return batch, None
    raise ValueError(f"a batch is (inputs, targets), (inputs,), a tensor or {{'x': ..., 'y': ...}}; got {type(batch).__name__}")


def batch_size_of(batch: Any) -> int:
    """The number of samples in ``batch``: the first dimension of its first leaf."""
    leaves = _tree.leaves(batch)  # paths are built only for the error message (this runs every step)
    if not leaves:
        raise ValueError("batch_size_of: the batch has no leaves (an empty container or None)")
    first = leaves[0]
    shape = getattr(first, "shape", None)
    if shape is None or len(shape) == 0:
        p = _tree.leaves_with_path(batch)[0][0]
        raise ValueError(
            f"batch_size_of: the first leaf of the batch ('{p}', a {type(first).__name__}) has no first "
            "dimension; batches are trees of tensors with the samples along dimension 0"
        )
    return int(shape[0])


def as_arrays(data: Any) -> tuple | None:
    """``data`` as a tuple of tensors when it is the data itself (a tuple or list of tensors or
    NumPy arrays), else ``None`` (a loader, or any other iterable of batches)."""
    if isinstance(data, (tuple, list)) and data and all(isinstance(a, (torch.Tensor, np.ndarray)) for a in data):
        return tuple(torch.as_tensor(a) if isinstance(a, np.ndarray) else a for a in data)
    return None


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
    if not (isinstance(validation_split, (int, float)) and not isinstance(validation_split, bool)
            and 0 <= validation_split < 1):
        raise ValueError(f"validation_split must be a fraction in [0, 1), got {validation_split!r}")
    arrays = as_arrays(train)
    if arrays is None:
        if batch_size is not None or validation_split:
            raise ValueError("batch_size and validation_split apply when fit gets the data itself, (X, y) as tensors "
                             "or NumPy arrays; a loader brings its own batches")
        return train, val
    if len(arrays) != 2:
        raise ValueError(f"fit((X, y)) takes inputs and targets; got {len(arrays)} arrays")
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


# --------------------------------------------------------------------------------------
# Digits (embedded, no network)
# --------------------------------------------------------------------------------------
DIGITS_TRAIN_SIZE = 1500


def load_digits(size: int = 28) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), as MNIST-like tensors.

    The images are scaled from [0, 16] to [0, 1] and resized to ``size`` x ``size`` with
    ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` (no resize when
    ``size == 8``; values are clamped to [0, 1]). The split is fixed: the first 1,500 images in
    scikit-learn's order are the training set, the last 297 the test set. That order groups
    images by writer, so the test set is (mostly) writers the model has not seen.

    Returns:
        ``(X_train, y_train), (X_test, y_test)``: float32 ``N x 1 x size x size`` and int64 ``N``.
    """
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError:
        raise ImportError(
            "fnnet.data.load_digits reads the digits that ship with scikit-learn; install it with "
            "`pip install scikit-learn` (no network is needed after that)"
        ) from None
    digits = _sk_load_digits()
    x = torch.from_numpy(np.asarray(digits.images, dtype=np.float32) / 16.0).unsqueeze(1)
    if size != 8:
        x = torch.nn.functional.interpolate(x, size=(int(size), int(size)), mode="bilinear", align_corners=False)
        x = x.clamp_(0.0, 1.0)
    y = torch.from_numpy(np.asarray(digits.target, dtype=np.int64))
    x = x.contiguous()
    t = DIGITS_TRAIN_SIZE
    return (x[:t].clone(), y[:t].clone()), (x[t:].clone(), y[t:].clone())


# --------------------------------------------------------------------------------------
# MNIST from IDX files
# --------------------------------------------------------------------------------------
DEFAULT_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"

_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension


def _mnist_names(train: bool) -> tuple[str, str]:
    prefix = "train" if train else "t10k"
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _candidates(root: Path, name: str) -> list[Path]:
    # root itself, then torchvision's layout (root/MNIST/raw), each raw then gzipped
    return [folder / f for folder in (root, root / "MNIST" / "raw") for f in (name, name + ".gz")]


def _read_idx(path: Path, magic: int, *, gz: bool | None = None, shown: Path | None = None) -> tuple[tuple[int, ...], bytes, int]:
    """``(dims, data, header_size)`` of an IDX file of unsigned bytes, validated."""
    shown = shown or path
    gz = path.name.endswith(".gz") if gz is None else gz
    if gz:
        try:
            with gzip.open(path, "rb") as f:
                data = f.read()
        except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
            raise ValueError(f"{shown}: not a valid gzip file ({exc}); delete it and download it again") from None
    else:
        data = path.read_bytes()  # an OSError (permissions, ...) passes through as it is
    ndim = magic & 0xFF
    kind = "images" if magic == _IMAGES_MAGIC else "labels"
    if len(data) < 4:
        raise ValueError(f"{shown}: {len(data)} bytes, too short for an IDX header (expected an IDX {kind} file)")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        hint = " It looks gzip-compressed: name it with a .gz suffix." if data[:2] == b"\x1f\x8b" else ""
        raise ValueError(
            f"{shown}: magic number {found} (0x{found:08x}), expected {magic} (0x{magic:08x}, an IDX "
            f"{kind} file of unsigned bytes with {ndim} dimension(s)).{hint}"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{shown}: {len(data)} bytes, truncated inside the {header}-byte IDX header")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(dims)
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        raise ValueError(
            f"{shown}: {len(data)} bytes{' after gunzip' if gz else ''}, expected {expected} "
            f"({header}-byte header + {' x '.join(map(str, dims))} values): the file is {what}"
        )
    return dims, data, header


def _fetch(url: str, dest: Path, magic: int, timeout: float) -> None:
    """Download ``url`` to ``dest`` atomically, checking it is a gzipped IDX file before the rename."""
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:12]}.part")
    try:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
                shutil.copyfileobj(response, f)
                f.flush()
                os.fsync(f.fileno())
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ConnectionError(f"could not download {url} ({reason})") from None
        _read_idx(tmp, magic, gz=True, shown=Path(url))
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def load_mnist(
    root: str | os.PathLike[str],
    train: bool = True,
    *,
    download: bool = False,
    mirror: str = DEFAULT_MIRROR,
    timeout: float = 60.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST's training (``train=True``, 60,000) or test (10,000) images from the standard IDX files.

    Looks in ``root`` and in ``root/MNIST/raw`` (torchvision's layout) for
    ``{train,t10k}-images-idx3-ubyte`` and ``{train,t10k}-labels-idx1-ubyte``, each raw or
    ``.gz``. Both files are validated: magic numbers (2051 images, 2049 labels), file sizes
    against the dimensions in their headers, and equal image and label counts.
    With ``download=True`` missing files are fetched as ``<mirror><name>.gz`` into ``root``
    (written atomically and validated before they are renamed into place). Any format that
    ``urllib`` opens works as a mirror, ``file://`` included.

    Returns:
        ``(X, y)``: float32 ``N x 1 x 28 x 28`` (``N x 1 x rows x cols`` as the header says) in
        [0, 1] (the bytes divided by 255) and int64 ``N``.

    Raises:
        FileNotFoundError: a file is missing, naming every path searched and where to get it.
        ValueError: a corrupt or truncated file, or a label outside 0-9, naming the file with the
            expected and found values.
        ConnectionError: ``download=True`` and the mirror cannot be reached.
    """
    root = Path(root)
    names = _mnist_names(train)
    magics = (_IMAGES_MAGIC, _LABELS_MAGIC)
    found: list[Path] = []
    for name, magic in zip(names, magics):
        hit = next((p for p in _candidates(root, name) if p.is_file()), None)
        if hit is None and download:
            root.mkdir(parents=True, exist_ok=True)
            hit = root / (name + ".gz")
            try:
                _fetch(mirror + name + ".gz", hit, magic, timeout)
            except ConnectionError as exc:
                raise ConnectionError(
                    f"{exc}. Without a network, download {name}.gz for both files of the "
                    f"{'training' if train else 'test'} set from {mirror} (or another MNIST mirror) on "
                    f"another machine and copy them into {root}"
                ) from None
        if hit is None:
            searched = ", ".join(str(p) for p in _candidates(root, name))
            raise FileNotFoundError(
                f"MNIST file {name} not found; searched {searched}. Download {name}.gz from {mirror} into "
                f"{root}, or call load_mnist(root, train={train}, download=True)"
            )
        found.append(hit)
    (n, rows, cols), images, img_header = _read_idx(found[0], _IMAGES_MAGIC)
    (n_labels,), labels, lab_header = _read_idx(found[1], _LABELS_MAGIC)
    if n != n_labels:
        raise ValueError(f"{found[0]} holds {n} images but {found[1]} holds {n_labels} labels; they must agree")
    x = np.frombuffer(images, dtype=np.uint8, offset=img_header).reshape(n, 1, rows, cols)
    y = np.frombuffer(labels, dtype=np.uint8, offset=lab_header)
    if n and int(y.max()) > 9:
        bad = int(np.argmax(y > 9))
        raise ValueError(f"{found[1]}: label {int(y[bad])} at index {bad} is not a digit; MNIST labels are 0-9 "
                         "(the file is corrupted, or it is not an MNIST labels file)")
    return torch.from_numpy(x.astype(np.float32) / np.float32(255.0)), torch.from_numpy(y.astype(np.int64))
