"""``fnnet.Trainer``: fit / evaluate / predict as a thin loop around the pure step.

The Trainer owns a :class:`~fnnet.TrainState` (``trainer.state``) and drives
``state, metrics = train_step(state, batch)`` over a loader, with metrics, a progress bar,
validation and callbacks around it: the torchkeras ``Model`` / Lightning ``Trainer``
convenience, without their hidden state. Nothing is clipped, scheduled or averaged behind
your back: gradient clipping and schedules are parts of the optimizer you pass in, and
epoch metrics are exact streaming metrics (``fnnet.metrics``).

Given an ``nn.Module``, the Trainer trains that module, as Keras, torchkeras and Lightning
do: the module is moved to the training device, ``trainer.state.params`` are its own tensors
(no second copy of the weights), and donated steps update them in place, so after ``fit``
``module(x)`` gives the trained outputs. Given an ``fnnet.Model`` (or ``params=``), it trains
its own copy and leaves the model's tensors alone.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from . import distributed as _dist
from . import metrics as _metrics
from . import random as _random
from . import tree as _tree
from .callbacks import CallbackList
from .data import ArrayLoader, as_arrays, fit_loaders, num_batches, set_epoch, split_batch
from .device import parse_devices, place
from ._functional import Model, functional
from .layout import choose_memory_format, verify_memory_format
from .state import DynamicScale, TrainState, all_finite
from .train import PRECISIONS, make_eval_step, make_predict_step, make_train_step, supervised_loss

__all__ = ["Trainer", "History"]


class History(dict):
    """Per-epoch lists: ``"epoch"`` (counted from 1, as the chapter's ``dfhistory``), ``"loss"``, ``"<metric>"``, ``"val_loss"``, ``"val_<metric>"``, ``"lr"``.

    A plain ``dict`` of lists (so ``plot_history`` and json work on it), plus :meth:`to_pandas`
    for the chapter's ``dfhistory`` table. ``stop_reason`` says why the last ``fit`` ended.
    """

    stop_reason: str = ""

    def append(self, logs: Mapping[str, float]) -> None:
        n = len(self.get("epoch", []))
        for key, value in logs.items():
            column = self.setdefault(key, [math.nan] * n)
            column.append(value)
        for key, column in self.items():
            if len(column) < n + 1:
                column.append(math.nan)

    def to_pandas(self) -> Any:
        """The history as a ``pandas.DataFrame`` (one row per epoch); needs pandas."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("History.to_pandas needs pandas: pip install pandas (or fnnet[pandas])") from None
        return pd.DataFrame(dict(self))

    def __repr__(self) -> str:
        return f"History({dict(self)!r})"


class Trainer:
    """Keras-like ``fit`` / ``evaluate`` / ``predict`` around fnnet's pure training step.

    Args:
        model: a plain ``nn.Module`` (trained in place: see the module docstring) or an
            ``fnnet.functional(...)`` model (its tensors are never written).
        loss: ``loss(outputs, targets) -> scalar`` (e.g. ``torch.nn.functional.cross_entropy``).
        optimizer: an ``fnnet.optim`` transform (``fnnet.optim.adam(0.01)``), or the chapter's
            ``torch.optim.Adam(net.parameters(), lr=0.02)`` (``SGD``, ``AdamW``, ``RMSprop``,
            ``Adagrad`` too), turned into the fnnet alias with the same numbers
            (:func:`fnnet.optim.from_torch`, which says which, once). Clipping and schedules
            belong in it (``chain(clip_by_global_norm(1.0), adam(...))``); a torch
            ``lr_scheduler`` goes in ``fit(callbacks=[...])``. Frozen parameters
            (``requires_grad=False`` in the module) are masked out of it: nothing moves them.
        metrics: ``{"accuracy": fnnet.metrics.accuracy, ...}``; values are ``fnnet.metrics.Metric``
            (exact over an epoch) or plain ``fn(outputs, targets)`` (averaged per sample).
        devices: see :func:`fnnet.parse_devices`. Several devices train data-parallel
            (:mod:`fnnet.parallel`): every batch is split into one shard per device, the
            gradients are averaged by shard size, and the update runs once on the first device,
            where the state, callbacks and checkpoints live (a checkpoint loads into a run on
            any number of devices). ``["cpu", "cpu"]`` runs two shards on the CPU.
        jit: compile the train, eval and predict steps with ``torch.compile``.
        key: an ``fnnet.random.Key`` or int seed for dropout (default ``key(0)``).
        precision: ``"32"``, ``"bf16"`` or ``"16-mixed"`` (see ``make_train_step``).
        donate: update the state in place at every step (default), like torch.optim: one copy
            of the weights and optimizer state, not two. ``False`` keeps every step's input
            state intact (then a module is brought up to date at the end of ``fit``).
        params: initial parameters (default: the model's), e.g. ``model.init(key)``; copied.
        compile_options: extra ``torch.compile`` arguments when ``jit=True``.
        distributed: train as one rank of a ``torch.distributed`` run (:mod:`fnnet.distributed`):
            ``None`` (default) does when a process group of several ranks exists
            (``fnnet.distributed.init()`` under ``torchrun``). Each rank passes its own part of
            the data (``ArrayLoader(..., shard=fnnet.distributed.shard())``); the gradients are
            all-reduced, epoch metrics summed over ranks, and only rank 0 prints and writes
            checkpoints. ``devices="auto"`` is then this rank's device.
        memory_format: the layout of 4-D parameters, optimizer state and image batches:
            ``"auto"`` (default: channels-last on CPU for conv models), ``"channels_last"``,
            ``"contiguous"`` (NCHW, bit-comparable with the chapter's loop) or
            ``"preserve"``; chosen when the trainer is built (:func:`fnnet.layout.choose_memory_format`)
            and checked once, on the first batch (:func:`fnnet.layout.verify_memory_format`):
            a forward that cannot run channels-last falls back to NCHW with a warning.

    Attributes:
        state: the :class:`TrainState` (params, optimizer state, step, buffers, key).
        module: the ``nn.Module`` being trained, or ``None`` for an ``fnnet.Model``.
        device: the device training runs on. ``history``: the :class:`History` of all fits.
        stop_training: set it to ``True`` (from a callback) to end ``fit`` after this epoch.
    """

    def __init__(self, model: Model | nn.Module, loss: Callable, optimizer: Any, *,
                 metrics: Mapping[str, Any] | None = None, devices: Any = "auto", jit: bool = False,
                 key: _random.Key | int | None = None, precision: str = "32", donate: bool = True,
                 params: Any = None, compile_options: Mapping[str, Any] | None = None,
                 memory_format: str | torch.memory_format = "auto", distributed: bool | None = None):
        if not callable(loss):
            raise TypeError(f"loss must be callable as loss(outputs, targets), got {type(loss).__name__}")
        if isinstance(optimizer, torch.optim.Optimizer):  # the chapter's torch.optim.Adam(net.parameters(), lr=0.02)
            from .optim import from_torch

            optimizer = from_torch(optimizer, module=model if isinstance(model, nn.Module) else None)
        if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
            raise TypeError(f"optimizer must be an fnnet.optim transform (e.g. fnnet.optim.adam(1e-3)) or a torch.optim "
                            f"optimizer, got {type(optimizer).__name__}")
        self.distributed = _dist.is_initialized() and _dist.world_size() > 1 if distributed is None else distributed
        if self.distributed and not _dist.is_initialized():
            raise RuntimeError("Trainer(distributed=True) needs a process group: call fnnet.distributed.init() first")
        if self.distributed and devices == "auto":
            devices = _dist.device()  # one device per process: cuda:LOCAL_RANK under NCCL, else the CPU
        self.devices = parse_devices(devices)
        if self.distributed and len(self.devices) > 1:
            raise ValueError(f"Trainer(distributed=True) trains one device per process; devices={devices!r} names "
                             f"{len(self.devices)}")
        self.device = self.devices[0]  # where the state lives; with several devices, the first
        self.module = model if isinstance(model, nn.Module) else None
        if self.module is not None and params is None:
            self.module.to(self.device)  # train the module's own storage, on the device (Lightning's way)
        self.model = functional(model, copy=False)
        # torchmetrics objects sync across ranks in compute(): the progress bar (rank 0) shows the others
        self._bar_metrics = [name for name, m in (metrics or {}).items() if not _metrics.is_torchmetrics(m)]
        self.metrics = {name: _metrics.as_metric(m) for name, m in (metrics or {}).items()}
        for name in self.metrics:
            if name == "loss" or name.startswith("val_"):
                raise ValueError(f"metric name {name!r} is reserved (loss and val_* are the Trainer's own)")
        self.key = _as_key(key)
        self.jit, self.precision, self.donate = jit, precision, donate
        self._stops_on_skips = PRECISIONS.get(precision) is not torch.float16
        self._layout_request = memory_format
        if not all(self.model.trainable.values()):  # frozen parameters: no update, no optimizer state
            from .optim import masked

            optimizer = masked(optimizer, self.model.trainable)
        self.optimizer = optimizer
        loss_fn = supervised_loss(self.model, loss)
        steps = dict(jit=jit, precision=precision, compile_options=compile_options,
                     devices=self.devices if len(self.devices) > 1 else None)
        self.train_step = make_train_step(loss_fn, optimizer, donate=donate, skip_nonfinite=True,
                                          distributed=self.distributed, **steps)
        self.eval_step = make_eval_step(loss_fn, **steps)  # per rank: the metric states are summed at the end
        self.predict_step = make_predict_step(
            lambda p, batch, buffers=None: self.model.apply(p, split_batch(batch)[0], buffers=buffers), **steps)
        start = self.model.params if params is None else params
        self.model.check_params(start)
        self.memory_format = choose_memory_format(memory_format, start, self.device)
        self._layout_verified = False
        fmt = self.memory_format
        if self.module is None or params is not None:  # a copy the trainer owns: the caller's stay untouched
            start = _tree.map(lambda t: t.detach().clone(memory_format=torch.preserve_format),
                              place(start, self.device, memory_format=fmt))
        buffers = self.model.buffers or None
        if buffers is not None and self.module is None:
            buffers = _tree.map(torch.clone, place(buffers, self.device, memory_format=fmt))
        # float16 keeps its loss scale in the state from the start, so checkpoints always hold it
        loss_scale = DynamicScale.create(self.device) if PRECISIONS.get(precision) is torch.float16 else None
        self.state: TrainState = TrainState.create(start, optimizer, buffers=buffers, key=self.key, loss_scale=loss_scale)
        if self.module is not None and params is None and fmt is not None:  # the module's own tensors, laid out
            self._adopt(place(self.state, self.device, memory_format=fmt))
        self.history = History()
        self.epoch = 0
        self.stop_training = False
        self._announced = False

    # -- the loop -------------------------------------------------------------------------------
    def _place(self, batch: Any) -> Any:
        # non_blocking only for host-to-device copies: a device-to-host copy must be complete
        # before the CPU reads it. Batches take the trainer's layout too: a conv picks its output
        # layout from its input as well as its weight.
        return place(batch, self.device, non_blocking=self.device.type == "cuda", memory_format=self.memory_format)

    def _batches(self, data: Iterable) -> Iterator[Any]:
        """``data``'s batches on the device; the first one a trainer sees checks the memory layout, once."""
        for batch in data:
            batch = self._place(batch)
            if not self._layout_verified:
                self._layout_verified = True
                fmt = verify_memory_format(self._layout_request, self.memory_format, self.model, self.state.params,
                                           self.state.buffers, batch, self.device)
                if fmt is not self.memory_format:  # the forward cannot take channels-last: back to NCHW (warned)
                    self.memory_format = fmt
                    self._adopt(place(self.state, self.device, memory_format=fmt))
                    batch = self._place(batch)
            yield batch

    def _run(self, data: Iterable, *, train: bool, callbacks: CallbackList, bar: "_Bar", every: int,
             interrupted: Callable[[], bool] = lambda: False) -> tuple[dict[str, Any], int]:
        """One pass over ``data`` (fit's epoch or evaluate): ``(metric states, skipped updates)``.

        Returns early, with ``skipped > 0`` or a non-finite loss in the states, when a check
        (every ``every`` steps: one host sync) finds a non-finite step.
        """
        states = {"loss": _metrics.mean_metric().init(self.device), **self._metric_init()}
        skipped = torch.zeros((), dtype=torch.int64, device=self.device)
        count = 0
        for index, batch in enumerate(self._batches(data)):
            try:
                if train:
                    callbacks("on_train_batch_start", self, self.state.step)
                    self.state, out = self.train_step(self.state, batch)
                    if self._stops_on_skips:  # float16 skips overflowing steps as a matter of course
                        skipped = skipped + (~out["finite"]).to(torch.int64)
                else:
                    callbacks("on_validation_batch_start", self, index)
                    out = self.eval_step(self.state, batch)
            except (RuntimeError, ValueError, IndexError, TypeError) as err:
                raise _with_context(err, "training" if train else "evaluation", self.epoch, index, batch) from err
            states = self._metric_update(states, out)
            callbacks("on_train_batch_end" if train else "on_validation_batch_end", self,
                      self.state.step if train else index, out)
            count += 1
            if count % every == 0:
                finite = int(skipped) == 0 and math.isfinite(float(out["loss"]))  # one sync per `every` steps
                if train and not finite:
                    return states, max(int(skipped), 1)
                bar.update(every, self._logs(states, all_ranks=False) if bar.enabled else None)  # this rank's view
            if interrupted():
                raise KeyboardInterrupt
        if count == 0:
            raise ValueError(f"{'train_data' if train else 'the evaluation data'} yielded no batches")
        bar.update(count % every)
        return states, int(skipped)

    def _metric_init(self) -> dict[str, Any]:
        return {name: m.init(self.device) for name, m in self.metrics.items()}

    def _metric_update(self, states: dict[str, Any], out: Mapping[str, Any]) -> dict[str, Any]:
        outputs, targets = out.get("outputs"), out.get("targets")
        new = {"loss": _metrics.mean_metric().update(states["loss"], out["loss"], _metrics.batch_size(outputs, targets))}
        for name, m in self.metrics.items():
            new[name] = m.update(states[name], outputs, targets)
        return new

    def _logs(self, states: Mapping[str, Any], prefix: str = "", *, all_ranks: bool = True) -> dict[str, float]:
        if self.distributed and all_ranks:  # states hold sums: adding every rank's gives the exact global values
            states = _dist.all_reduce_sum(states)
        logs = {f"{prefix}loss": float(_metrics.mean_metric().compute(states["loss"]))}
        for name, m in self.metrics.items():
            if all_ranks or name in self._bar_metrics:
                logs[f"{prefix}{name}"] = float(m.compute(states[name]))
        return logs

    # -- fit ----------------------------------------------------------------------------------------
    def fit(self, train_data: Iterable | tuple, val_data: Iterable | tuple | None = None, *, epochs: int = 1,
            callbacks: Sequence[Any] = (), log_every: int | None = None, verbose: int = 1,
            on_nonfinite: str = "stop", batch_size: int | None = None, validation_split: float = 0.0,
            shuffle: bool = True) -> History:
        """Train for ``epochs`` epochs, validating on ``val_data`` after each; returns the history.

        Args:
            train_data: any re-iterable of ``(inputs, targets)`` batches: an ``fnnet.ArrayLoader``
                (fastest: data already on the device), a torch ``DataLoader``, a list. Or the data
                itself, Keras' ``fit(x, y)``: ``(X, y)``, tensors or NumPy arrays, which become an
                ``ArrayLoader`` on the trainer's device (``batch_size``, default 32; shuffled each
                epoch under a key derived from the trainer's ``key`` with ``shuffle=True``; under
                ``torch.distributed``, this rank's shard).
            val_data: the same for validation (logged as ``val_loss``, ``val_<metric>``), as
                batches or as ``(X_val, y_val)``.
            validation_split: with ``(X, y)`` and no ``val_data``, the last fraction of the samples
                (taken before any shuffling, as Keras does) validates instead of training.
            epochs: how many epochs to run in this call; calling ``fit`` again continues from the
                current state (epochs keep counting, and so does a loaded checkpoint's).
            callbacks: objects with hook methods (see ``fnnet.callbacks``).
            log_every: check the loss and refresh the progress bar every this many steps; each
                check reads from the device, a sync. Default: about ten times per epoch.
            verbose: 0 silent, 1 progress bar and a line per epoch.
            on_nonfinite: every update whose gradients are not all finite is skipped on the
                device (no host sync; the state never takes a NaN, donated or not). At the next
                check ``"stop"`` (default) ends training with a message, without running
                ``on_epoch_end`` for the broken epoch, so no checkpoint of it is written;
                ``"raise"`` does the same, then raises ``FloatingPointError``. (With float16,
                skipped overflow steps are routine; there only a non-finite loss stops.)

        The logged ``lr`` is the learning rate of the epoch's last update. Ctrl-C (SIGINT) ends
        training after the current step: ``on_fit_end`` callbacks still run and the history so
        far is returned (``history.stop_reason == "interrupted"``); a second Ctrl-C interrupts
        at once.
        """
        if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
            raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
        if on_nonfinite not in ("stop", "raise"):
            raise ValueError(f"on_nonfinite must be 'stop' or 'raise', got {on_nonfinite!r}")
        if log_every is not None and (not isinstance(log_every, int) or log_every < 1):
            raise ValueError(f"log_every must be a positive int or None, got {log_every!r}")
        train_data, val_data = fit_loaders(train_data, val_data, batch_size=batch_size, validation_split=validation_split,
                                           shuffle=shuffle, key=_random.fold_in(self.key, 0x7A1A), device=self.device,
                                           shard=self._shard())
        for name, data in (("train_data", train_data), ("val_data", val_data)):
            if data is not None and epochs > 1 and iter(data) is data:
                raise TypeError(f"{name} is a one-shot iterator ({type(data).__name__}), which cannot be iterated again "
                                f"for epoch 2; pass a list, an fnnet.ArrayLoader or a torch DataLoader")
        cbs = CallbackList(callbacks)
        verbose = verbose if _dist.is_main() else 0  # one rank prints
        self._announce(verbose)
        self.stop_training = False
        self.history.stop_reason = ""
        cbs("on_fit_start", self)
        try:
            with _deferred_interrupt() as interrupted:
                for i in range(epochs):
                    epoch = self.epoch
                    set_epoch(train_data, epoch)
                    cbs("on_epoch_start", self, epoch)
                    start = time.perf_counter()
                    total = num_batches(train_data)
                    every = log_every or max(1, (total or 100) // 10)
                    with _Bar(total, f"epoch {epoch + 1}", bool(verbose)) as bar:
                        states, skipped = self._run(train_data, train=True, callbacks=cbs, bar=bar, every=every,
                                                    interrupted=interrupted)
                    logs = self._logs(states)
                    if skipped or not math.isfinite(logs["loss"]):
                        self._nonfinite(epoch, skipped, on_nonfinite)
                        break
                    if val_data is not None:
                        logs.update(self.evaluate(val_data, callbacks=cbs, verbose=verbose))
                    logs["lr"] = self._learning_rate()
                    logs["time"] = time.perf_counter() - start
                    self.epoch += 1
                    self.history.append({"epoch": epoch + 1, **logs})
                    if verbose:
                        shown = "  ".join(f"{k}={v:.4g}" for k, v in logs.items() if k != "time")
                        print(f"Epoch {epoch + 1} ({i + 1}/{epochs})  {shown}  [{logs['time']:.1f}s]")
                    cbs("on_epoch_end", self, epoch, logs)
                    if self.stop_training:
                        self.history.stop_reason = "stopped by callback"
                        break
        except KeyboardInterrupt:
            self.history.stop_reason = "interrupted"
            print(f"fnnet.Trainer: interrupted at step {self.state.step}; returning the history so far.", file=sys.stderr)
        finally:
            cbs("on_fit_end", self)
            self._sync_module()
        return self.history

    def _shard(self) -> tuple[int, int] | None:
        """This rank's part of arrays the trainer batches itself (``None`` outside a distributed run)."""
        return _dist.shard() if self.distributed else None

    def _nonfinite(self, epoch: int, skipped: int, on_nonfinite: str) -> None:
        what = (f"{skipped} update(s) with non-finite gradients were skipped" if skipped
                else "the training loss became non-finite")
        message = (f"fnnet.Trainer: {what} in epoch {epoch + 1}; stopping at step {self.state.step}. trainer.state "
                   "holds finite parameters (non-finite updates are never applied) and the last good checkpoint "
                   "is kept.")
        self.history.stop_reason = "nonfinite"
        if on_nonfinite == "raise":
            raise FloatingPointError(message)
        print(message, file=sys.stderr)

    # -- evaluate / predict ----------------------------------------------------------------------------
    def evaluate(self, data: Iterable | tuple, *, prefix: str = "val_", callbacks: Any = (), verbose: int = 0,
                 batch_size: int = 256) -> dict[str, float]:
        """Loss and metrics over ``data`` (exact over all samples): ``{"val_loss": ..., "val_accuracy": ...}``.

        ``data``: batches, as for ``fit``, or ``(X, y)`` (tensors or NumPy arrays) in batches of
        ``batch_size``.
        """
        arrays = as_arrays(data)
        if arrays is not None:
            data = ArrayLoader(arrays, batch_size, device=self.device, shard=self._shard())
        cbs = callbacks if isinstance(callbacks, CallbackList) else CallbackList(callbacks)
        total = num_batches(data)
        with _Bar(total, "validation", bool(verbose)) as bar:
            states, _ = self._run(data, train=False, callbacks=cbs, bar=bar, every=max(1, (total or 100) // 10))
        return self._logs(states, prefix)

    def predict(self, data: Iterable | torch.Tensor, *, device: Any = "cpu", batch_size: int = 256) -> torch.Tensor:
        """The model's outputs (eval mode, the trainer's precision) for every batch of ``data``, concatenated.

        ``data``: a tensor or NumPy array of inputs (split into batches of ``batch_size``) or any iterable of
        batches (``(inputs, targets)``, ``(inputs,)`` or inputs alone). Returned on ``device``
        (CPU by default) in float32 when the trainer computes in a lower precision.
        """
        if isinstance(data, np.ndarray):
            data = torch.as_tensor(data)
        if isinstance(data, torch.Tensor):
            if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
                raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
            data = [(data[i:i + batch_size],) for i in range(0, len(data), batch_size)]
        outs = [self.predict_step(self.state, batch) for batch in self._batches(data)]
        if not outs:
            raise ValueError("predict: data yielded no batches")
        return place(torch.cat(outs), device)

    # -- checkpoints and the module ------------------------------------------------------------------
    def checkpoint(self) -> dict[str, Any]:
        """What :meth:`save` writes: ``{"state": trainer.state, "epoch": epochs completed}``."""
        return {"state": self.state, "epoch": self.epoch}

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`checkpoint` to ``path`` (``fnnet.save``: one atomic, checksummed safetensors file).

        ``fnnet.load(path)["state"]`` is the ``TrainState``; its ``params`` load into the
        ``nn.Module`` with ``load_state_dict``. A state holding a non-finite value is refused
        (``ValueError``): a checkpoint is always a state training can resume from.
        """
        from .checkpoint import save

        if self.distributed and not _dist.is_main():
            return  # every rank holds the same state: rank 0 writes it
        if not bool(all_finite(self.state)):
            bad = [p for p, x in _tree.leaves_with_path(self.state)
                   if isinstance(x, torch.Tensor) and x.is_floating_point() and not bool(torch.isfinite(x).all())]
            raise ValueError(f"Trainer.save: the state holds non-finite values at {bad}; not written to '{path}'")
        save(path, self.checkpoint())

    def load(self, path: str | os.PathLike) -> "Trainer":
        """Restore the state and epoch count saved by :meth:`save` (or ``ModelCheckpoint``).

        The file is validated against the current state (structure, shapes, dtypes: every
        mismatch is named), lands on the trainer's device in its layout, and training resumes
        exactly where it stopped: the epoch count drives the loader's shuffling order and
        per-epoch schedules. A file holding a bare ``TrainState`` (``fnnet.save(path, state)``)
        loads too, without changing the epoch count. A trained module is brought up to date.
        """
        from .checkpoint import load

        try:
            saved = load(path, like=self.checkpoint(), device=self.device)
            state, self.epoch = saved["state"], int(saved["epoch"])
        except ValueError as full_error:
            try:
                state = load(path, like=self.state, device=self.device)
            except ValueError:
                raise full_error from None
        self._adopt(place(state, self.device, memory_format=self.memory_format))
        self._sync_module()
        return self

    def _adopt(self, state: TrainState) -> None:
        self.state = state
        self._sync_module()

    def _sync_module(self) -> None:
        """Point the trained module's parameters and buffers at the state's tensors (no copy)."""
        if self.module is None:
            return
        tensors = {**self.state.params, **(self.state.buffers or {})}
        with torch.no_grad():
            for name, t in itertools.chain(self.module.named_parameters(), self.module.named_buffers()):
                new = tensors.get(name)
                if new is not None and not _same_storage(new, t):
                    t.data = new
        self.model.params, self.model.buffers = dict(self.state.params), dict(self.state.buffers or {})

    def _learning_rate(self) -> float:
        from .optim import get_learning_rate

        lr = get_learning_rate(self.state.opt_state)
        return float(lr) if lr is not None else math.nan

    def _announce(self, verbose: int) -> None:
        if verbose and not self._announced:
            name = str(self.device) + (f" ({torch.cuda.get_device_name(self.device)})" if self.device.type == "cuda" else "")
            print(f"fnnet.Trainer: training on {name}, precision {self.precision}, jit {'on' if self.jit else 'off'}")
            self._announced = True

    def summary(self, input_shape: Sequence[int], **kwargs: Any) -> Any:
        """``fnnet.summary`` of the model (layer shapes and parameter counts; values do not matter)."""
        from ._summary import summary

        return summary(self.model, input_shape, **kwargs)


# -- private helpers of the loop ------------------------------------------------------------------------


def _as_key(key: Any) -> _random.Key:
    if key is None:
        return _random.key(0)
    if isinstance(key, int) and not isinstance(key, bool):
        return _random.key(key)
    if not isinstance(key, _random.Key):
        raise TypeError(f"key must be an fnnet.random.Key or an int seed, got {type(key).__name__}")
    return key


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and a.storage_offset() == b.storage_offset() and a.stride() == b.stride() and a.shape == b.shape)


def _describe_batch(batch: Any) -> str:
    parts = []
    for p, x in _tree.leaves_with_path(batch):
        parts.append(f"{p}: {str(x.dtype).removeprefix('torch.')}{list(x.shape)}" if isinstance(x, torch.Tensor)
                     else f"{p}: {type(x).__name__}")
    return ", ".join(parts)


_HINTS = (
    ("Expected more than 1 value per channel", "a BatchNorm layer got a batch of one sample in training; drop the "
     "last, smaller batch (ArrayLoader(..., drop_last=True) or DataLoader(..., drop_last=True))"),
    ("out of bounds", "the targets must be class indices in [0, number of classes)"),
    ("expected scalar type Long", "class-index targets must be int64: pass y.long()"),
    ("Expected floating point type for target", "class-index targets must be int64: pass y.long()"),
    ("expected target dtype to be Long", "class-index targets must be int64: pass y.long()"),
    ("shapes cannot be multiplied", "the inputs' feature size does not match the model's first layer"),
    ("to match target batch_size", "the inputs and the targets hold different numbers of samples"),
)


def _with_context(err: Exception, what: str, epoch: int, index: int, batch: Any) -> Exception:
    """``err`` (the same type) with fnnet's context: where, the batch's shapes and dtypes, the fix."""
    text = str(err)
    hint = next((h for pattern, h in _HINTS if pattern in text), None)
    message = (f"{text}\n\nfnnet.Trainer: {what} failed in epoch {epoch + 1} at batch {index} "
               f"({_describe_batch(batch)})" + (f": {hint}" if hint else ""))
    try:
        return type(err)(message)
    except TypeError:  # an exception type with another constructor
        return RuntimeError(message)


class _Bar:
    """A tqdm progress bar (a context manager), or nothing when verbose=0."""

    def __init__(self, total: int | None, desc: str, enabled: bool):
        self.enabled, self.bar = enabled, None
        if enabled:
            try:
                import ipywidgets  # noqa: F401
                from tqdm.auto import tqdm
            except ImportError:  # tqdm's text bar: no IProgress warning outside Jupyter
                from tqdm.std import tqdm
            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stdout)

    def update(self, n: int, postfix: dict | None = None) -> None:
        if self.bar is not None and n:
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
            self.bar.update(n)

    def __enter__(self) -> "_Bar":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def _deferred_interrupt() -> Iterator[Callable[[], bool]]:
    """Turn the first Ctrl-C into a flag the loop checks after each step (main thread only).

    A second Ctrl-C raises ``KeyboardInterrupt`` at once, as usual.
    """
    flag = {"set": False}
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def handler(signum: int, frame: Any) -> None:
        if flag["set"]:
            raise KeyboardInterrupt
        flag["set"] = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: flag["set"]
    finally:
        signal.signal(signal.SIGINT, previous)
