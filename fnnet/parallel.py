"""Data parallelism across the devices of one machine, by hand: scatter, replicate, per-shard
gradients, a weighted reduction, one update.

The chapter wraps its model in ``nn.DataParallel``. fnnet does the same job in the open, the
way ``jax.pmap`` users think about it::

    shards  = scatter(batch, devices)                    # contiguous chunks, sizes differ by <= 1
    params  = replicate(state.params, devices)           # one copy per device (none where it lives)
    grads_i = grad_fn(params_i, shard_i, ...)            # per shard, one thread per device
    grads   = reduce_mean(grads_i, sizes, devices[0])    # weighted by shard size: exact
    state   = state.apply_gradients(grads, optimizer)    # once, on the first device

:func:`make_train_step` builds exactly that, with the ``step(state, batch) -> (state,
metrics)`` contract of :func:`fnnet.make_train_step`. Unlike ``nn.DataParallel`` nothing but the
update (and the reduction) happens on the first device, saved state has no ``module.``
prefix, and no module is replicated per call; unlike ``pmap``, shards need not be equal:
an uneven batch is split as evenly as possible and every shard weighs by its size, so for a
mean-reduced loss the step equals the single-device step on the whole batch.

What is not the same as one device: a layer that mixes samples (BatchNorm in training)
sees one shard at a time, as under ``nn.DataParallel`` and DDP without ``SyncBatchNorm``.
Its running mean still comes out as the whole batch's (the shards' means, weighted); its
running variance is the weighted mean of the shards' variances.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
from typing import Any, Callable, Mapping, Sequence

import torch

from . import random as _random
from . import tree as _tree
from .batch import batch_size_of
from .device import DeviceLike, place, resolve_device, tree_device
from .loss import GradResult
from .state import Accumulation, TrainState
from .step import (TrainStep, add_to_window, build_train_step, check_state, compile_step, eval_step, predict_step,
                   step_parts, window_mean)
from .strategy import StepOptions, Strategy

__all__ = ["Replicate", "shard_sizes", "scatter", "replicate", "gather", "reduce_mean", "make_train_step",
           "make_eval_step", "make_predict_step"]


def shard_sizes(n: int, k: int) -> list[int]:
    """How ``n`` samples split over ``k`` devices: ``min(k, n)`` sizes that differ by at most one."""
    if n < 1:
        raise ValueError(f"cannot split a batch of {n} samples")
    k = min(k, n)
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def _batch_length(batch: Any) -> int:
    """:func:`fnnet.batch.batch_size_of`, checked against every other tensor with a first dimension."""
    n = batch_size_of(batch)
    if any(x.shape[0] != n for x in _tree.leaves(batch) if isinstance(x, torch.Tensor) and x.ndim > 0):
        # key paths are built for the message only (this runs every step)
        sizes = {p: x.shape[0] for p, x in _tree.leaves_with_path(batch) if isinstance(x, torch.Tensor) and x.ndim > 0}
        listed = ", ".join(f"'{p}': {n}" for p, n in sizes.items())
        raise ValueError(f"scatter: every tensor in a batch needs the same first dimension (samples), got {listed}")
    if n == 0:
        raise ValueError("scatter: the batch is empty (first dimension 0)")
    return n


def scatter(batch: Any, devices: Sequence[DeviceLike], *, non_blocking: bool = False) -> list[Any]:
    """Split ``batch`` along dim 0 into one shard per device, each placed on its device.

    Shards are contiguous chunks whose sizes differ by at most one (:func:`shard_sizes`); a
    batch smaller than the number of devices uses fewer devices (shards are never empty).
    Tensors without a first dimension and other leaves go to every shard as they are.

    Raises:
        ValueError: tensors whose first dimensions disagree (naming every key path and
            size), or an empty batch.
    """
    devs = [resolve_device(d) for d in devices]
    if not devs:
        raise ValueError("scatter: no devices given")
    return _scatter(batch, devs, non_blocking)[0]


def _scatter(batch: Any, devs: list[torch.device], non_blocking: bool) -> tuple[list[Any], list[int]]:
    """:func:`scatter`, and the shard sizes (the steps' weights)."""
    sizes = shard_sizes(_batch_length(batch), len(devs))
    shards, start = [], 0
    for dev, size in zip(devs, sizes):
        lo, hi = start, start + size
        shards.append(_tree.map(lambda x: x[lo:hi] if isinstance(x, torch.Tensor) and x.ndim > 0 else x, batch))
        shards[-1] = place(shards[-1], dev, non_blocking=non_blocking)
        start = hi
    return shards, sizes


def replicate(tree: Any, devices: Sequence[DeviceLike]) -> list[Any]:
    """One copy of ``tree`` per device; a device that already holds a leaf gets that leaf (no copy)."""
    return [place(tree, d) for d in devices]


def gather(trees: Sequence[Any], device: DeviceLike) -> Any:
    """Concatenate per-shard trees (outputs) along dim 0 on ``device``, in shard order."""
    dev = resolve_device(device)
    if not trees:
        raise ValueError("gather: no trees given")
    return _tree.map(lambda *xs: torch.cat([x.to(dev) for x in xs]), *trees)


def reduce_mean(trees: Sequence[Any], weights: Sequence[float], device: DeviceLike, *, donate: bool = False) -> Any:
    """The weighted mean ``sum_i w_i * tree_i / sum_i w_i`` of trees (gradients) on ``device``.

    Floating-point leaves are averaged (computed in each leaf's dtype on ``device``); any
    other leaf (an integer counter) comes from the first tree. With ``donate=True`` the first
    tree's tensors that are already on ``device`` hold the result (no new tree: the training
    step donates its own per-shard gradients); otherwise no input is modified.
    """
    dev = resolve_device(device)
    if len(trees) != len(weights) or not trees:
        raise ValueError(f"reduce_mean: {len(trees)} trees and {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"reduce_mean: the weights must add up to a positive number, got {list(weights)}")
    fractions = [float(w) / total for w in weights]

    def mean(*xs: Any) -> Any:
        first = xs[0]
        if not (isinstance(first, torch.Tensor) and (first.is_floating_point() or first.is_complex())):
            return first.to(dev) if isinstance(first, torch.Tensor) else first
        acc = first.to(dev)
        acc = acc.mul_(fractions[0]) if donate and acc is first else acc * fractions[0]
        for f, x in zip(fractions[1:], xs[1:]):
            acc.add_(x.to(dev, non_blocking=True), alpha=f)
        return acc

    return _tree.map(mean, *trees)


# -- the steps ---------------------------------------------------------------------------------------


def _devices(devices: Sequence[DeviceLike]) -> list[torch.device]:
    if isinstance(devices, (str, torch.device, int)) or not devices:
        raise ValueError(f"devices must be a non-empty list of devices (e.g. ['cuda:0', 'cuda:1']), got {devices!r}")
    return [resolve_device(d) for d in devices]


class _Replicas:
    """Copies of the params (and buffers) on every device, refreshed only when the state changed.

    The copy on a device is kept between steps and written in place (``copy_``) after every
    update; a device equal to the state's own uses the state's tensors. Before a step, the
    state's tensors are compared (identity and version counter) with the ones the copies were
    made from, so a state changed elsewhere is never paired with stale copies.
    """

    def __init__(self, devices: list[torch.device]):
        self.devices = devices
        self.copies: dict[torch.device, Any] = {}
        self.signature: tuple | None = None

    @staticmethod
    def _signature(tree: Any) -> tuple:
        return tuple((id(x), x._version) if isinstance(x, torch.Tensor) else x for x in _tree.leaves(tree))

    def get(self, tree: Any, devices: list[torch.device]) -> list[Any]:
        primary = tree_device(tree)
        if self.signature != self._signature(tree) or any(d not in self.copies for d in devices if d != primary):
            self.refresh(tree)
        return [tree if d == primary else self.copies[d] for d in devices]

    def refresh(self, tree: Any) -> None:
        primary = tree_device(tree)
        for d in dict.fromkeys(self.devices):
            if d == primary:
                continue
            old = self.copies.get(d)
            if old is not None and _tree.structure(old) == _tree.structure(tree):
                with torch.no_grad():
                    _tree.map(lambda o, n: o.copy_(n, non_blocking=True) if isinstance(o, torch.Tensor) else o, old, tree)
            else:
                self.copies[d] = _tree.map(lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x,
                                           place(tree, d))
        self.signature = self._signature(tree)


def _reduce_aux(auxes: Sequence[Mapping[str, Any]], sizes: Sequence[int], device: torch.device) -> dict[str, Any]:
    """Per-sample aux leaves (first dimension = the shard's size: outputs, targets) are gathered in
    batch order; everything else (per-batch means) is averaged with the shard weights."""
    per_sample = _tree.map(lambda *xs: all(isinstance(x, torch.Tensor) and x.ndim > 0 and x.shape[0] == n
                                           for x, n in zip(xs, sizes)), *auxes)
    flags = _tree.leaves(per_sample)
    leaves = [_tree.leaves(a) for a in auxes]
    spec = _tree.structure(auxes[0])
    out = []
    for i, gathered in enumerate(flags):
        column = [ls[i] for ls in leaves]
        out.append(torch.cat([x.to(device) for x in column]) if gathered else reduce_mean(column, sizes, device))
    return _tree.unflatten(spec, out)


class _Runner:
    """Runs one function per shard, in one thread per device, or in order when it must."""

    def __init__(self, n: int):
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=n, thread_name_prefix="fnnet-shard") if n > 1 else None

    def map(self, fn: Callable[..., Any], jobs: list[tuple], concurrent_ok: bool) -> list[Any]:
        if self.pool is None or not concurrent_ok or len(jobs) == 1:
            return [fn(*job) for job in jobs]
        futures = [self.pool.submit(fn, *job) for job in jobs]
        return [f.result() for f in futures]


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class Replicate(Strategy):
    """Data parallelism over the devices of one process: ``make_train_step(..., strategy=Replicate(devices))``.

    The state lives on ``devices[0]``; each call scatters the batch (:func:`scatter`), runs the
    gradient function (:func:`fnnet.make_grad_fn`) on every shard with the params' copy on that
    shard's device, brings the gradients to ``devices[0]`` and averages them weighted by shard
    size (:func:`reduce_mean`), and applies the update there once. The loss, the aux metrics and
    the buffers (BatchNorm) are combined the same way: per-sample aux values (outputs, targets)
    are gathered in batch order, per-batch values averaged. Dropout keys differ per shard
    (``fold_in(step key, shard index)``); the same key gives the same run. ``nn.DataParallel``
    and ``jax.pmap`` do the same job.

    Shards run in one thread per device, so GPUs overlap (on CPU the replicas share the cores).
    A loss that draws randomness (it declares ``key``) or a compiled step (``jit``) runs its
    shards one after the other instead, in the calling thread: torch's global RNG state and
    torch.compile's caches are shared by all threads. On GPUs the shards still overlap: kernel
    launches are asynchronous.

    Devices may repeat (``["cpu", "cpu"]``, ``["cuda:0", "cuda:0"]``): several shards on one
    device, which shares the params instead of copying them.

    With ``accumulate=k`` each device keeps its own sum of its shards' gradients over a window
    (:func:`fnnet.step.add_to_window` with one sum per device), and only the window's last
    micro-batch adds them up across devices.

    Args:
        devices: a non-empty list of devices (``["cuda:0", "cuda:1"]``).
    """

    name = "replicate"

    def __init__(self, devices: Sequence[DeviceLike]):
        self.devices = _devices(devices)

    def __repr__(self) -> str:
        return f"Replicate({[str(d) for d in self.devices]})"

    def build(self, loss_fn: Callable, optimizer: Any, options: StepOptions) -> TrainStep:
        return _build_replicated(loss_fn, optimizer, self, options.checked())


def make_train_step(loss_fn: Callable, optimizer: Any, devices: Sequence[DeviceLike], *, jit: bool = False,
                    donate: bool = False, precision: str = "32", compile_options: Mapping[str, Any] | None = None,
                    skip_nonfinite: bool = False, accumulate: int = 1) -> TrainStep:
    """The data-parallel training step over ``devices``: ``Replicate(devices).build(...)`` (the same
    contract and arguments as :func:`fnnet.make_train_step`; a shorthand kept for one release)."""
    return Replicate(devices).build(loss_fn, optimizer, StepOptions(jit, donate, precision, compile_options,
                                                                    skip_nonfinite, accumulate))


def _build_replicated(loss_fn: Callable, optimizer: Any, strategy: Replicate, o: StepOptions) -> TrainStep:
    """:meth:`Replicate.build`: the gradient source over ``strategy.devices`` in the one skeleton."""
    devs = strategy.devices
    jit, precision, compile_options = o.jit, o.precision, o.compile_options
    parts = step_parts(loss_fn, precision=precision, skip_nonfinite=o.skip_nonfinite, jit=jit,
                       compile_options=compile_options)
    shard_grad = compile_step(parts.grad_fn, compile_options) if jit else parts.grad_fn
    params_copies, buffer_copies = _Replicas(devs), _Replicas(devs)
    runner = _Runner(len(devs))
    concurrent_ok = not jit and "key" not in parts.declared

    def one_shard(params: Any, shard: Any, buffers: Any, key: Any, loss_scale: Any, device: torch.device,
                  unscale: bool) -> GradResult:
        with _on(device):
            if jit and key is not None:
                with _random.rng_scope(key, [device] if device.type == "cuda" else []):
                    return shard_grad(params, shard, buffers, _random.TRACING_KEY, loss_scale=loss_scale,
                                      unscale=unscale)
            return shard_grad(params, shard, buffers, key, loss_scale=loss_scale, unscale=unscale)

    def per_shard(params: Any, batch: Any, buffers: Any, key: Any, loss_scale: Any, unscale: bool = True
                  ) -> tuple[list[GradResult], list[int], torch.device, torch.Tensor, dict, Any]:
        """The batch scattered and a gradient per shard; the loss, aux and buffers combined."""
        shards, sizes = _scatter(batch, devs, True)
        used = devs[:len(shards)]
        primary = tree_device(params)
        copies = params_copies.get(params, used)  # refreshed only when the params changed (after an update)
        buffer_sets = buffer_copies.get(buffers, used) if buffers is not None else [None] * len(used)
        scales = [place(loss_scale, d) if loss_scale is not None else None for d in used]
        keys = [_random.fold_in(key, i) if key is not None else None for i in range(len(used))]
        jobs = [(*job, unscale) for job in zip(copies, shards, buffer_sets, keys, scales, used)]
        results = runner.map(one_shard, jobs, concurrent_ok)
        loss = reduce_mean([r.loss for r in results], sizes, primary)
        aux = _reduce_aux([r.aux for r in results], sizes, primary)
        new_buffers = reduce_mean([r.buffers for r in results], sizes, primary) if results[0].buffers is not None else None
        return results, sizes, primary, loss, aux, new_buffers

    def accumulate_shards(params: Any, batch: Any, buffers: Any, key: Any, loss_scale: Any, carry: Any,
                          donate_carry: bool) -> tuple[Accumulation, torch.Tensor, dict, Any]:
        """A micro-batch added to the window, one sum per device: nothing crosses devices but the loss."""
        results, sizes, _, loss, aux, new_buffers = per_shard(params, batch, buffers, key, loss_scale, unscale=False)
        grads = [r.grads for r in results] + [None] * (len(devs) - len(results))  # a small batch: fewer shards
        sizes = list(sizes) + [0] * (len(devs) - len(results))
        window = add_to_window(carry, grads, sum(sizes), loss, donate_carry, sizes=sizes)
        return window, loss, aux, new_buffers

    def shard_gradients(params: Any, batch: Any, buffers: Any, key: Any, loss_scale: Any,
                        carry: Accumulation | None = None, donate_carry: bool = False) -> GradResult:
        """The gradient source: the batch scattered, a gradient per shard, their mean weighted by shard
        size; with ``carry``, the window's per-device sums added up on the first device (the one
        reduction across devices of an accumulating step)."""
        if carry is None:
            results, sizes, primary, loss, aux, new_buffers = per_shard(params, batch, buffers, key, loss_scale)
            grads = reduce_mean([r.grads for r in results], sizes, primary, donate=True)  # the shards' own gradients
            return GradResult(grads, loss, aux, new_buffers)
        aux, new_buffers, owned = {}, None, donate_carry or batch is not None
        if batch is not None:
            carry, batch_loss, aux, new_buffers = accumulate_shards(params, batch, buffers, key, loss_scale, carry,
                                                                    donate_carry)
            aux = {**aux, "batch_loss": batch_loss}
        sums = [t for t in carry.grads if t is not None]
        k = len(sums)
        mean_of_sums = reduce_mean(sums, [1.0] * k, tree_device(params), donate=owned)
        grads, loss = window_mean(Accumulation(mean_of_sums, carry.samples / k, carry.loss_sum / k, carry.micro),
                                  loss_scale, owned=True)
        return GradResult(grads, loss, aux, new_buffers)

    return build_train_step(shard_gradients, optimizer, parts, donate=o.donate, jit=jit,
                            compile_options=compile_options, name="data_parallel_train_step",
                            accumulate=o.accumulate, accumulate_fn=accumulate_shards, strategy=strategy,
                            precision=precision)


def _per_shard(single_step: Callable[[TrainState, Any], Any], devices: Sequence[DeviceLike], combine: Callable,
               concurrent_ok: bool, what: str) -> Callable[[TrainState, Any], Any]:
    """``single_step`` (an eval or predict step) on every shard, with the state's copy on its device."""
    devs = _devices(devices)
    params_copies, buffer_copies = _Replicas(devs), _Replicas(devs)
    runner = _Runner(len(devs))

    def one_shard(params: Any, buffers: Any, shard: Any, device: torch.device) -> Any:
        with _on(device):
            return single_step(TrainState(params, None, 0, buffers), shard)

    def step(state: TrainState, batch: Any) -> Any:
        check_state(state, what)
        shards, sizes = _scatter(batch, devs, True)
        used = devs[:len(shards)]
        params = params_copies.get(state.params, used)
        buffers = buffer_copies.get(state.buffers, used) if state.buffers is not None else [None] * len(used)
        outs = runner.map(one_shard, list(zip(params, buffers, shards, used)), concurrent_ok)
        return combine(outs, sizes, tree_device(state.params))

    return step


def make_eval_step(loss_fn: Callable, devices: Sequence[DeviceLike], *, jit: bool = False, precision: str = "32",
                   compile_options: Mapping[str, Any] | None = None) -> Callable[[TrainState, Any], dict[str, Any]]:
    """:func:`fnnet.make_eval_step` on every shard; the loss is averaged with the shard weights,
    per-sample aux values (outputs, targets) are gathered in batch order."""
    single = eval_step(loss_fn, jit=jit, precision=precision, compile_options=compile_options)

    def combine(outs: list[dict[str, Any]], sizes: list[int], device: torch.device) -> dict[str, Any]:
        loss = reduce_mean([o["loss"] for o in outs], sizes, device)
        return {"loss": loss, **_reduce_aux([{k: v for k, v in o.items() if k != "loss"} for o in outs], sizes, device)}

    return _per_shard(single, devices, combine, not jit, "eval_step")


def make_predict_step(predict_fn: Callable, devices: Sequence[DeviceLike], *, jit: bool = False, precision: str = "32",
                      compile_options: Mapping[str, Any] | None = None) -> Callable[[TrainState, Any], Any]:
    """:func:`fnnet.make_predict_step` on every shard; the outputs gathered in batch order."""
    single = predict_step(predict_fn, jit=jit, precision=precision, compile_options=compile_options)
    return _per_shard(single, devices, lambda outs, sizes, device: gather(outs, device), not jit, "predict_step")
