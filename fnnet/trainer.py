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

**Optimizers.** An ``fnnet.optim`` transform, or a ``torch.optim`` optimizer (``Adam``,
``SGD``, ``AdamW``, ``RMSprop``, ``Adagrad``), turned into the fnnet alias with the same numbers
(:func:`fnnet.optim.from_torch`, which says which, once). Clipping and schedules belong in it
(``chain(clip_by_global_norm(1.0), adam(...))``); a torch ``lr_scheduler`` goes in
``fit(callbacks=[...])``. Frozen parameters (``requires_grad=False`` in the module) are masked
out of it: nothing moves them.

**Devices and processes.** Several devices train data-parallel (:mod:`fnnet.parallel`): every
batch is split into one shard per device, the gradients are averaged by shard size, and the
update runs once on the first device, where the state, callbacks and checkpoints live (a
checkpoint loads into a run on any number of devices). Under ``torch.distributed``
(``fnnet.distributed.init()`` under ``torchrun``) each rank passes its own part of the data
(``ArrayLoader(..., shard=fnnet.distributed.shard())``, or ``fit((X, y))``, which shards
itself); the gradients are all-reduced, epoch metrics summed over ranks, and only the writing
rank (:func:`fnnet.distributed.is_main`) prints and writes checkpoints. ``devices="auto"`` is
then this rank's device.

**Gradient accumulation.** ``accumulate_grad_batches=k`` makes one optimizer update per
``k`` batches (``make_train_step(accumulate=k)``: exact for uneven batches, one reduction
across devices or ranks per update). ``trainer.state.step``, schedules, per-step
``LearningRateSchedule`` callbacks and the progress bar count optimizer updates; epoch losses
and metrics average over every sample. An epoch whose batches do not fill its last window
applies that partial window as one update, weighted by its samples (Lightning updates there too, but
divides each micro-batch's loss by ``k``, so its numbers differ: see docs/guides/accumulation.md), so no
window spans two epochs and a checkpoint at an epoch's end holds no unfinished window.

**Sharded optimizer state.** ``Trainer(..., shard_optimizer=True)`` under ``torchrun`` builds
``make_train_step(..., distributed=True, shard_optimizer=True)`` (:mod:`fnnet.shard`):
``trainer.state.opt_state`` holds this rank's part; :meth:`checkpoint`, :meth:`save` and
``ModelCheckpoint`` gather the whole optimizer state first, so the file loads into a run on any
number of ranks, sharded or not, or into one process; after :meth:`load` the next step cuts it again.

**Sharded parameters.** ``Trainer(..., strategy="zero3")`` (``ZeRO(3)``, :mod:`fnnet.zero3`): from the
first step ``trainer.state.params`` hold this rank's 1-D part of every parameter; ``evaluate`` and
``predict`` gather the units on the fly (``step.on_parts``), so every rank must run as many batches
(checked first when the data has a length: a ``ValueError``, not a hang; a loader without ``len()``
with more batches on one rank waits in a gather until the process group's timeout, which then
raises); checkpoints hold the gathered whole state, as above.
The ``nn.Module`` given is not trained in place (its whole weights on every rank would undo the
sharding): ``trainer.checkpoint()["state"].params`` (every rank calls it) are the trained weights. A
module built on the ``meta`` device is never made whole: each rank draws its parts
(``step.init_parts``) under ``fnnet.random.fold_in(key, 0x1217)``, as ``Model.init`` would draw the
whole model under that key.

**Fault tolerance.** A checkpoint (``Trainer.save``, ``ModelCheckpoint``, also every ``N``
optimizer steps with ``ModelCheckpoint(every_n_steps=N)``) records the state, the epoch, the
batches done in it, the world size, the loader's global batch and the callbacks' state.
``fit(..., epochs=E, resume="auto")`` (or a path) loads the newest one and continues from the
next batch of that epoch until epoch ``E``: the loader's order is a pure function of its key and
the epoch, so the rest of training is the uninterrupted run's (bit for bit on the same number
of CPU processes). With ``ArrayLoader(..., global_batch=True)`` a step covers the same samples on
any number of ranks, so a checkpoint of ``N`` ranks resumes on ``M`` (to the order of float
additions); another global batch is refused mid-epoch. A file of an older fnnet (no position)
resumes at the start of the next epoch, with a warning. Under ``torchrun --max-restarts R`` a
script with ``resume="auto"`` picks up after a killed rank by itself.

**Memory layout.** ``memory_format="auto"`` picks channels-last on CPU for conv models;
``"contiguous"`` (NCHW) is bit-comparable with the chapter's loop. It is chosen when the trainer
is built (:func:`fnnet.layout.choose_memory_format`) and checked once, on the first batch
(:func:`fnnet.layout.verify_memory_format`): a forward that cannot run channels-last falls
back to NCHW with a warning.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from . import distributed as _dist
from . import random as _random
from ._loop import (Bar, EpochMetrics, Throughput, banner, check_fit_options, check_reiterable, check_same_batch_count,
                    check_step_options, deferred_interrupt, epoch_line, input_batches, learning_rate, report_nonfinite,
                    together, with_context)
from .callbacks import CallbackList
from ._resume import global_batch_of, load_checkpoint, position, rest_of_epoch, resume_fit, samples_of
from ._setup import (INIT_SALT, build_steps, initial_state, on_meta_device, parts_state, resolve_devices,
                     resolve_optimizer, sync_module)
from .train import resolve_strategy
from .batch import as_arrays, is_array
from .data import ArrayLoader, fit_loaders, num_batches, set_epoch
from .device import place
from ._functional import Model, functional
from .precision import Precision
from .layout import verify_memory_format
from .state import TrainState, all_finite, nonfinite_paths

__all__ = ["Trainer", "History"]


class History(dict):
    """Per-epoch lists: ``"epoch"`` (counted from 1, as the chapter's ``dfhistory``), ``"loss"``, ``"<metric>"``, ``"val_loss"``, ``"val_<metric>"``, ``"lr"``.

    A plain ``dict`` of lists (so ``plot_history`` and json work on it), plus :meth:`to_pandas`
    for the chapter's ``dfhistory`` table. ``stop_reason`` says why the last ``fit`` ended.
    """

    stop_reason: str = ""

    def append(self, logs: Mapping[str, float]) -> None:
        """Add one row: every key of ``logs`` gets its value, every other column ``nan`` (so all stay one length)."""
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
            ``torch.optim.Adam(net.parameters(), lr=0.02)`` (see the module docstring).
        metrics: ``{"accuracy": fnnet.metrics.accuracy, ...}``; values are ``fnnet.metrics.Metric``
            (exact over an epoch) or plain ``fn(outputs, targets)`` (averaged per sample).
        devices: see :func:`fnnet.parse_devices`; several devices train data-parallel (see the
            module docstring). ``["cpu", "cpu"]`` runs two shards on the CPU.
        jit: compile the train, eval and predict steps with ``torch.compile``.
        key: an ``fnnet.random.Key`` or int seed for dropout (default ``key(0)``).
        precision: ``"32"``, ``"bf16"`` or ``"16-mixed"`` (see ``make_train_step``).
        donate: update the state in place at every step (default), like torch.optim: one copy
            of the weights and optimizer state, not two. ``False`` keeps every step's input
            state intact (then a module is brought up to date at the end of ``fit``).
        params: initial parameters (default: the model's), e.g. ``model.init(key)``; copied.
        compile_options: extra ``torch.compile`` arguments when ``jit=True``.
        distributed: train as one rank of a ``torch.distributed`` run (see the module
            docstring); ``None`` (default) does when a process group of several ranks exists.
        memory_format: the layout of 4-D parameters, optimizer state and image batches:
            ``"auto"`` (default), ``"channels_last"``, ``"contiguous"`` or ``"preserve"`` (see the
            module docstring).
        accumulate_grad_batches: one optimizer update per this many batches (Lightning's name).
        shard_optimizer: under torchrun, each rank keeps the optimizer state of its part of the
            parameters only (ZeRO-2; see the module docstring). The old flag for ``strategy="zero2"``,
            kept for one release.
        strategy: how training is laid out over devices or ranks: an :class:`fnnet.strategy.Strategy`
            (``fnnet.parallel.Replicate(devices)``, ``fnnet.distributed.DDP(group)``, ``ZeRO(2)``,
            ``ZeRO(3)``, ``HSDP(mesh)``) or a shorthand (``"ddp"``, ``"zero2"``, ``"zero3"``; see
            :func:`fnnet.make_train_step`). Under ``ZeRO(3)`` (see the module docstring) ``state.params``
            are this rank's parts from the first step on and the module is not trained in place.
            ``None``: what ``devices`` and ``distributed`` say (the old flags, kept for one release).

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
                 memory_format: str | torch.memory_format = "auto", distributed: bool | None = None,
                 accumulate_grad_batches: int = 1, shard_optimizer: bool = False, strategy: Any = None):
        if not callable(loss):
            raise TypeError(f"loss must be callable as loss(outputs, targets), got {type(loss).__name__}")
        if (isinstance(accumulate_grad_batches, bool) or not isinstance(accumulate_grad_batches, int)
                or accumulate_grad_batches < 1):
            raise ValueError(f"Trainer: accumulate_grad_batches must be an int >= 1 (one optimizer update per this many "
                             f"batches; 1: no accumulation), got {accumulate_grad_batches!r}")
        strategy = resolve_strategy(strategy) if strategy is not None else None
        self._params_sharded = getattr(strategy, "stage", None) == 3  # ZeRO-3: the state holds each rank's parts
        memory_format = _sharded_memory_format(memory_format) if self._params_sharded else memory_format
        self.distributed, self.devices = resolve_devices(devices, distributed, strategy)
        self._rank_shard = _dist.shard() if self.distributed else None  # this rank's part of arrays fit batches
        self.device = self.devices[0]  # where the state lives; with several devices, the first
        self.module = model if isinstance(model, nn.Module) else None
        # never whole: init per part (ZeRO-3); a ValueError for a meta model under any other strategy
        on_meta = params is None and on_meta_device(model, self._params_sharded, strategy)
        if self.module is not None and params is None and not on_meta:
            self.module.to(self.device)  # train the module's own storage, on the device (Lightning's way)
        self.model = functional(model, copy=False)
        self.optimizer = resolve_optimizer(optimizer, self.model, self.module)
        self._book = EpochMetrics(metrics, self.device, self.distributed)
        self.metrics = self._book.metrics
        self.key = _as_key(key)
        self.jit, self.precision, self.donate = jit, precision, donate
        self._stops_on_skips = not Precision.resolve(precision).loss_scaled
        self._layout_request = memory_format
        self.train_step, self.eval_step, self.predict_step = build_steps(
            self.model, loss, self.optimizer, self.devices, distributed=self.distributed, jit=jit, precision=precision,
            donate=donate, compile_options=compile_options, accumulate=accumulate_grad_batches,
            shard_optimizer=shard_optimizer, strategy=strategy)
        self.accumulate = accumulate_grad_batches
        state, self.memory_format = initial_state(self.model, self.module, params, self.optimizer, self.key,
                                                  precision=precision, device=self.device, memory_format=memory_format)
        if on_meta:  # this rank's parts drawn as Model.init would draw the whole (fnnet.sharded_init)
            state = parts_state(model, state, self.train_step, _random.fold_in(self.key, INIT_SALT), self.device)
        self._layout_verified = False
        self._adopt(state)
        self.history = History()
        self.epoch, self._batch_in_epoch, self._position, self._global_batch, self._callbacks = 0, 0, None, -1, []
        self._samples = -1
        self.stop_training = False
        self._announced = False
        self._fitting = False  # inside fit: an error names the epoch (a standalone evaluate has none)

    # -- the loop -------------------------------------------------------------------------------
    def _batches(self, data: Iterable) -> Iterator[Any]:
        """``data``'s batches on the device; the first one a trainer sees checks the memory layout, once."""
        for batch in data:
            batch = _on_device(batch, self.device, self.memory_format)
            if not self._layout_verified:
                self._layout_verified = True
                fmt = verify_memory_format(self._layout_request, self.memory_format, self.model, self.state.params,
                                           self.state.buffers, batch, self.device)
                if fmt is not self.memory_format:  # the forward cannot take channels-last: back to NCHW (warned)
                    self.memory_format = fmt
                    self._adopt(place(self.state, self.device, memory_format=fmt))
                    batch = _on_device(batch, self.device, fmt)
            yield batch

    def _run(self, data: Iterable, *, train: bool, callbacks: CallbackList, bar: "Bar", every: int,
             interrupted: Callable[[], bool] = lambda: False, meter: Throughput | None = None,
             after_step: Callable[[dict], bool] | None = None) -> tuple[dict[str, Any], int]:
        """One pass over ``data`` (fit's epoch or evaluate): ``(metric states, skipped updates)``; early, when a
        check (every ``every`` steps: one host sync) finds a non-finite step, or when ``after_step(out)``
        (called after every training batch: step-based validation, ``max_steps``) says stop."""
        states, skipped = self._book.init(), torch.zeros((), dtype=torch.int64, device=self.device)
        count = updates = shown = 0  # batches; optimizer updates (the bar's unit), and those the bar shows
        last = (num_batches(data) or 0) - 1  # an epoch's last batch ends its accumulation window
        for index, batch in enumerate(self._batches(data)):
            try:
                if train:
                    callbacks("on_train_batch_start", self, self.state.step)
                    self.state, out = self.train_step(self.state, batch, end_window=index == last)
                    self._batch_in_epoch += 1
                    if meter is not None:
                        meter.count(batch)
                    if self._stops_on_skips and "finite" in out:  # float16 skips overflow steps routinely
                        skipped = skipped + (~out["finite"]).to(torch.int64)
                else:
                    callbacks("on_validation_batch_start", self, index)
                    out = self.eval_step(self.state, batch)
            except (RuntimeError, ValueError, IndexError, TypeError) as err:
                what = "training" if train else "evaluation" if self._fitting else "evaluate"
                raise with_context(err, what, self.epoch if self._fitting else None, index, batch) from err
            states = self._book.update(states, out)
            callbacks("on_train_batch_end" if train else "on_validation_batch_end", self,
                      self.state.step if train else index, out)
            count, updates = count + 1, updates + bool(out.get("updated", True))
            if count % every == 0:
                finite = int(skipped) == 0 and math.isfinite(float(out["loss"]))  # one sync per `every` steps
                if train and not finite:
                    return states, max(int(skipped), 1)
                bar.update(updates - shown, _bar_logs(self._book.logs(states, all_ranks=False), meter)
                           if bar.enabled else None)
                shown = updates
            if interrupted():
                raise KeyboardInterrupt
            if after_step is not None and after_step(out):
                break
        if count == 0:
            raise ValueError(f"{'train_data' if train else 'the evaluation data'} yielded no batches")
        if train and self.state.accum is not None:  # a loader without len() ended inside a window: its update
            self.state, out = self.train_step.flush(self.state)
            skipped = skipped + (~out["finite"]).to(torch.int64) if self._stops_on_skips else skipped
            updates += 1
        bar.update(updates - shown)
        return states, int(skipped)

    # -- fit ----------------------------------------------------------------------------------------
    def fit(self, train_data: Iterable | tuple, val_data: Iterable | tuple | None = None, *, epochs: int | None = None,
            callbacks: Sequence[Any] = (), log_every: int | None = None, verbose: int = 1,
            on_nonfinite: str = "stop", batch_size: int | None = None, validation_split: float = 0.0,
            shuffle: bool = True, resume: str | os.PathLike | None = None, max_steps: int | None = None,
            val_check_interval: int | None = None, validation_data: Iterable | tuple | None = None) -> History:
        """Train for ``epochs`` epochs (or until ``max_steps`` updates), validating on ``val_data``; returns the history.

        Args:
            train_data: any re-iterable of ``(inputs, targets)`` batches: an ``fnnet.ArrayLoader``
                (fastest: data already on the device), a torch ``DataLoader``, a list. Or the data
                itself, Keras' ``fit(x, y)``: ``(X, y)``, tensors or NumPy arrays, which become an
                ``ArrayLoader`` on the trainer's device (``batch_size``, default 32; shuffled each
                epoch under a key derived from the trainer's ``key`` with ``shuffle=True``; under
                ``torch.distributed``, this rank's shard).
            val_data: the same for validation (logged as ``val_loss``, ``val_<metric>``), as
                batches or as ``(X_val, y_val)``.
            validation_data: Keras' name for ``val_data`` (``model.fit(x, y, validation_data=(x_val, y_val))``);
                giving both is a ``TypeError``.
            validation_split: with ``(X, y)`` and no ``val_data``, the last fraction of the samples
                (taken before any shuffling, as Keras does) validates instead of training.
            epochs: how many epochs to run in this call; calling ``fit`` again continues from the
                current state (epochs keep counting, and so does a loaded checkpoint's: after
                :meth:`load`, ``epochs`` more). With ``resume=`` it is the total instead (below). Default: 1,
                or, with ``max_steps``, as many as it takes.
            max_steps: stop once ``trainer.state.step`` (optimizer updates, counted over every ``fit``
                and a loaded checkpoint, as Lightning's ``max_steps``) reaches this. ``train_data`` may
                then be an endless iterator (a generator of batches, nanoGPT's ``get_batch`` loop). Stopping inside an
                epoch ends it as an epoch's end would (validation, a history row, ``on_epoch_end``), but
                the epoch counts as unfinished: a checkpoint then records the batches done, and a
                later ``fit`` (or ``resume``) continues with the epoch's next batch.
                ``history.stop_reason == "max_steps"``.
            val_check_interval: validate every this many optimizer updates (Lightning's int
                ``val_check_interval``; nanoGPT's ``eval_interval``), and once more at ``max_steps``.
                Each check appends a history row (``step``, ``epoch``, ``loss``: the training loss
                of the samples since the previous row, ``val_*``, ``lr``, the throughput, ``time``)
                and epochs' ends then append none and do not validate (their ``on_epoch_end`` logs
                carry the last check's ``val_*``).
            callbacks: objects with hook methods (see ``fnnet.callbacks``).
            log_every: check the loss and refresh the progress bar every this many steps; each
                check reads from the device, a sync. Default: about ten times per epoch.
            verbose: 0 silent, 1 progress bar and a line per epoch (per check with ``val_check_interval``).
            on_nonfinite: updates with non-finite gradients are always skipped (the state never
                takes a NaN). At the next check ``"stop"`` (default) ends training with a message
                and no ``on_epoch_end`` (no checkpoint of the broken epoch); ``"raise"`` then raises
                ``FloatingPointError``. (float16 skips overflow steps routinely: only a non-finite
                loss stops it.)
            resume: a checkpoint path, or ``"auto"``: the newest file in the ``ModelCheckpoint`` folders
                (none: start afresh), so a restarted script resumes by itself, from the next batch of
                the saved epoch; ``epochs`` then counts from the start of training (module docstring):
                Lightning's ``max_epochs``, so a restarted script runs as is. Below the epochs the file has
                done it is a ``ValueError``; equal, there is nothing to do (said with ``verbose``). With
                ``verbose``, says which file, epoch and batch it continues from.

        Every history row holds ``step`` (the updates so far) and the training throughput,
        ``samples_per_sec`` and, for batches whose targets have two or more dimensions (a language
        model's ``(B, T)``), ``tokens_per_sec`` (targets' elements), over training time only; the
        progress bar shows them too. The logged ``lr`` is the learning rate of the last update.
        Ctrl-C (SIGINT) ends training after the current step: ``on_fit_end`` callbacks still run
        and the history so far is returned (``history.stop_reason == "interrupted"``); a second
        Ctrl-C interrupts at once.
        """
        if validation_data is not None:  # Keras' keyword for the same argument
            if val_data is not None:
                raise TypeError("fit: got both val_data and validation_data (Keras' name for val_data); pass one")
            val_data = validation_data
        if is_array(train_data) and is_array(val_data):  # Keras' fit(x, y): y would become the validation data
            raise TypeError(f"fit(X, y): fnnet's fit takes the data as one argument, fit((X, y), ...) (Keras' "
                            f"fit(x, y)); its second argument is the validation data. Got a "
                            f"{type(train_data).__name__} of shape {tuple(train_data.shape)} and a "
                            f"{type(val_data).__name__} of shape {tuple(val_data.shape)}")
        epochs = check_step_options(epochs, max_steps, val_check_interval)
        check_fit_options(epochs, on_nonfinite, log_every)
        train_data, val_data = fit_loaders(train_data, val_data, batch_size=batch_size, validation_split=validation_split,
                                           shuffle=shuffle, key=_random.fold_in(self.key, 0x7A1A), device=self.device,
                                           shard=self._rank_shard)
        check_reiterable(epochs if max_steps is None else 1, train_data=train_data, val_data=val_data)  # a stream
        cbs = CallbackList(callbacks)
        self._global_batch, self._callbacks = global_batch_of(train_data), cbs.callbacks
        self._samples = samples_of(train_data)
        verbose = verbose if _dist.is_main() else 0  # one rank prints
        if resume is not None:  # epochs is then the total (Lightning's max_epochs): a restarted script runs as is
            epochs = resume_fit(self, resume, cbs.callbacks, epochs, train_data, verbose)
        if verbose and not self._announced:
            print(banner(self.devices, self.precision, self.jit, getattr(self.train_step, "strategy", None),
                         _dist.world_size() if self.distributed else 1))
            self._announced = True
        self.stop_training = False
        self.history.stop_reason = ""
        cbs("on_fit_start", self)
        checks = _StepChecks(self, val_data, cbs, verbose, val_check_interval, max_steps)
        self._fitting = True
        try:
            with deferred_interrupt() as interrupted:
                for i in range(epochs):
                    if max_steps is not None and self.state.step >= max_steps:
                        self.history.stop_reason = "max_steps"
                        break
                    if not self._fit_epoch(train_data, val_data, cbs, checks, i, epochs, verbose=verbose,
                                           log_every=log_every, on_nonfinite=on_nonfinite, interrupted=interrupted):
                        break
        except KeyboardInterrupt:
            self.history.stop_reason = "interrupted"
            print(f"fnnet.Trainer: interrupted at step {self.state.step}; returning the history so far.", file=sys.stderr)
        finally:
            self._fitting = False
            cbs("on_fit_end", self)
            self._sync_module()
        from ._saving import wait_pending

        wait_pending(self)  # a save still in flight completes (or raises) before fit returns
        return self.history

    def _fit_epoch(self, train_data: Any, val_data: Any, cbs: CallbackList, checks: "_StepChecks", i: int, epochs: int,
                   *, verbose: int, log_every: int | None, on_nonfinite: str, interrupted: Callable[[], bool]) -> bool:
        """One epoch of ``fit`` (the rest of it, after a resume); whether ``fit`` goes on."""
        epoch, skip = self.epoch, (self._position or {}).get("batch", 0)
        set_epoch(train_data, epoch)
        data = rest_of_epoch(train_data, epoch, skip, (self._position or {}).get("global_batch", -1))
        self._batch_in_epoch, self._position = skip, None
        if data is None:  # a checkpoint after the epoch's last step: its end did not happen, skip it
            self.epoch, self._batch_in_epoch = self.epoch + 1, 0  # a later file: the next epoch's start
            return True
        cbs("on_epoch_start", self, epoch)
        start = time.perf_counter()
        total = num_batches(data)
        check_same_batch_count(total, epoch, self.distributed)  # a rank with more steps would wait forever
        every = log_every or max(1, (total or 100) // 10)
        meter = checks.meter
        since = meter.snapshot()
        meter.resume()
        with Bar(total and -(-total // self.accumulate), f"epoch {epoch + 1}", bool(verbose)) as bar:
            states, skipped = self._run(data, train=True, callbacks=cbs, bar=bar, every=every,
                                        interrupted=interrupted, meter=meter, after_step=checks)
        logs = self._book.logs(states)
        meter.pause()
        if skipped or not math.isfinite(logs["loss"]):
            self.history.stop_reason = "nonfinite"
            report_nonfinite(epoch, skipped, self.state.step, on_nonfinite)
            return False
        if checks.interval is None and val_data is not None:
            logs.update(self.evaluate(val_data, prefix="val_", callbacks=cbs, verbose=verbose))
        logs.update(checks.last_val)
        logs["lr"] = learning_rate(self.state.opt_state)
        logs.update(meter.rates(since))
        logs["time"] = time.perf_counter() - start
        if not checks.stopped:
            self.epoch, self._batch_in_epoch = self.epoch + 1, 0
        else:  # max_steps inside an epoch leaves it unfinished: the next fit (or a checkpoint) goes on with its next batch
            self._position = {"batch": self._batch_in_epoch, "global_batch": self._global_batch}
        if checks.interval is None:
            self.history.append({"epoch": epoch + 1, "step": self.state.step, **logs})
            if verbose:
                print(epoch_line(epoch, i, epochs, logs))
        cbs("on_epoch_end", self, epoch, logs)
        if checks.stopped:
            self.history.stop_reason = "max_steps"
            return False
        if self.stop_training:
            self.history.stop_reason = "stopped by callback"
            return False
        return True

    # -- evaluate / predict ----------------------------------------------------------------------------
    def evaluate(self, data: Iterable | tuple, *, prefix: str = "", callbacks: Any = (), verbose: int = 0,
                 batch_size: int = 256) -> dict[str, float]:
        """Loss and metrics over ``data``, exact over all its samples (counts, not a mean of batch means).

        Args:
            data: batches, as for ``fit``, or ``(X, y)`` (tensors or arrays) in batches of ``batch_size``.
            prefix: put before every key, to name what was evaluated: ``prefix="test_"`` gives
                ``{"test_loss", "test_accuracy"}``; ``fit`` validates with ``prefix="val_"``.
            callbacks: their ``on_validation_batch_*`` hooks run on every batch.
            verbose: 1 shows a progress bar.
            batch_size: the batch size for ``(X, y)`` data.

        Returns:
            ``{"loss": ..., "<metric>": ...}`` (Keras' ``evaluate(..., return_dict=True)`` names), as floats.
                In fnnet 0.3.0 the keys were ``val_*`` whatever the data; reading such a key (``result[key]``,
                ``result.get(key)``) from a result without a prefix still works, with a ``FutureWarning``,
                until the next release.
        """
        arrays = as_arrays(data)
        if arrays is not None:
            data = ArrayLoader(arrays, batch_size, device=self.device, shard=self._rank_shard)
        cbs = callbacks if isinstance(callbacks, CallbackList) else CallbackList(callbacks)
        total = num_batches(data)
        if self._params_sharded:  # each batch's forward gathers the units: every rank runs as many
            check_same_batch_count(total, 0, self.distributed, "Trainer.evaluate (ZeRO-3 gathers per batch)")
        with Bar(total, "validation", bool(verbose)) as bar, together("Trainer.evaluate", self.distributed):
            states, _ = self._run(data, train=False, callbacks=cbs, bar=bar, every=max(1, (total or 100) // 10))
            logs = self._book.logs(states, prefix)  # sums every rank's: every rank evaluates
        return logs if prefix else _Evaluation(logs)

    def predict(self, data: Iterable | torch.Tensor, *, device: Any = "cpu", batch_size: int = 256) -> torch.Tensor:
        """The model's outputs (eval mode, the trainer's precision) for every batch of ``data``, concatenated.

        ``data``: a tensor or NumPy array of inputs (split into batches of ``batch_size``) or any iterable of
        batches (``(inputs, targets)``, ``(inputs,)`` or inputs alone). A tuple (not a list, which is batches) of
        exactly two tensors or arrays of the same length is taken for ``(X, y)`` and refused with a ``TypeError``
        (``predict(X)`` takes inputs only; ``evaluate((X, y))`` scores against targets). Returned on ``device``
        (CPU by default) in float32 when the trainer computes in a lower precision.
        """
        batches = input_batches(data, batch_size)
        if self._params_sharded:  # each batch's forward gathers the units: every rank runs as many
            batches = list(batches)
            check_same_batch_count(len(batches), 0, self.distributed, "Trainer.predict (ZeRO-3 gathers per batch)")
        with together("Trainer.predict", self.distributed and self._params_sharded):
            outs = [self.predict_step(self.state, batch) for batch in self._batches(batches)]
        if not outs:
            raise ValueError("predict: data yielded no batches")
        return place(torch.cat(outs), device)

    # -- checkpoints and the module ------------------------------------------------------------------
    def checkpoint(self, *, gather: bool = True) -> dict[str, Any]:
        """What :meth:`save` writes: ``{"state": trainer.state, "epoch": epochs completed}``, the optimizer
        state whole (gathered from every rank's part under ``shard_optimizer``: every rank calls this;
        ``gather=False``: the state as this rank holds it, nothing collective)."""
        if gather:
            with together("Trainer.checkpoint/save (gathering the sharded optimizer state)", self.distributed):
                state = self.train_step.gather_state(self.state)
        else:
            state = self.state
        return {"state": state, "epoch": self.epoch,
                "position": position(self._batch_in_epoch, _dist.world_size(), self._global_batch, self._callbacks,
                                     self._samples)}

    def save(self, path: str | os.PathLike, *, sharded: bool = False, async_save: bool = False) -> None:
        """Write :meth:`checkpoint` to ``path`` (``fnnet.save``: atomic, checksummed): ``fnnet.load(path)["state"]``
        is the ``TrainState`` (its ``params`` load into the module with ``load_state_dict``). A non-finite state
        is refused (``ValueError``): a checkpoint is always a state training can resume from.

        ``sharded=True`` writes a folder in which every rank writes the part it holds (nothing gathered;
        ``fnnet.checkpoint.sharded``, docs/guides/sharded-checkpoints.md); ``async_save=True`` copies to host memory
        and writes in a background thread: the next save, :meth:`load` and the end of ``fit`` wait for it
        and raise its error."""
        from .checkpoint import save
        from ._saving import save_trainer, wait_pending

        if sharded or async_save:
            save_trainer(self, path, sharded=sharded, async_save=async_save)
            return
        wait_pending(self)

        checkpoint = self.checkpoint()  # on every rank: a sharded optimizer state is gathered, the same everywhere
        if not bool(all_finite(checkpoint["state"])):  # so every rank decides alike
            raise ValueError(f"Trainer.save: the state holds non-finite values at {nonfinite_paths(checkpoint['state'])}"
                             f"; not written to '{path}'")
        if _dist.is_main():  # every rank holds the same state: the writing rank writes it
            save(path, checkpoint)

    @property
    def loaded_position(self) -> dict[str, Any] | None:
        """Where in an epoch the checkpoint last read by :meth:`load` stopped (``batch``, ``global_batch``,
        ``samples``, the callbacks' books), until ``fit`` continues from it; ``None`` otherwise."""
        return self._position

    def load(self, path: str | os.PathLike) -> "Trainer":
        """Restore the state and epoch count saved by :meth:`save` (or ``ModelCheckpoint``), validated against
        the current state (structure, shapes, dtypes: every mismatch named), on the trainer's device in its
        layout; the epoch count drives the loader's order and per-epoch schedules, so training resumes where
        it stopped. A bare ``TrainState`` file (``fnnet.save(path, state)``) loads too, keeping the epoch count.
        A later ``fit(epochs=n)`` runs ``n`` more epochs; ``fit(epochs=E, resume=path)`` instead loads the file
        and the callbacks' books and runs until epoch ``E`` in total.
        """
        from ._saving import load_sharded_trainer, wait_pending

        wait_pending(self)
        if os.path.isdir(path):  # a sharded checkpoint folder: each rank reads its own layout's ranges
            state, epoch, self._position = load_sharded_trainer(self, path)
        else:
            state, epoch, self._position = load_checkpoint(path, self.checkpoint(), self.device)  # every rank
        self.epoch = self.epoch if epoch is None else epoch
        self._adopt(place(state, self.device, memory_format=self.memory_format))
        return self

    def _adopt(self, state: TrainState) -> None:
        self.state = state
        self._sync_module()

    def _sync_module(self) -> None:  # the trained module computes with the state's tensors (no copy)
        if self.module is not None and not self._params_sharded:  # ZeRO-3's parts are not the module's shapes
            sync_module(self.module, self.state)
            self.model.params, self.model.buffers = dict(self.state.params), dict(self.state.buffers or {})

    def summary(self, input_shape: Sequence[int], **kwargs: Any) -> Any:
        """``fnnet.summary`` of the model (layer shapes and parameter counts; values do not matter)."""
        from ._summary import summary

        return summary(self.model, input_shape, **kwargs)


# -- private helpers of the loop ------------------------------------------------------------------------


class _Evaluation(dict):
    """``evaluate()``'s result without a prefix: a dict that still answers the old ``val_*`` keys with a
    ``FutureWarning`` (indexing, ``get``, ``in`` and ``pop``; iteration, ``==`` and ``keys()`` show the new names)."""

    def _renamed(self, key: Any) -> Any:
        """The new name of an old ``val_*`` key (with the warning), or ``key`` itself."""
        if isinstance(key, str) and key.startswith("val_") and not dict.__contains__(self, key) \
                and dict.__contains__(self, key[4:]):
            warnings.warn(f"Trainer.evaluate() names its keys for what it evaluated: {sorted(self)} (Keras' names); "
                          f"read {key[4:]!r}, or pass prefix='val_' for {key!r}. The old key works until the next "
                          "release.", FutureWarning, stacklevel=3)
            return key[4:]
        return key

    def __missing__(self, key: str) -> float:
        new = self._renamed(key)
        if new is key:
            raise KeyError(key)
        return dict.__getitem__(self, new)

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, self._renamed(key))

    def get(self, key: str, default: Any = None) -> Any:
        """``self[key]`` (an old ``val_*`` key included, with its warning), or ``default``."""
        return dict.get(self, self._renamed(key), default)

    def pop(self, key: str, *default: Any) -> Any:
        """``dict.pop``, an old ``val_*`` key included (with its warning)."""
        return dict.pop(self, self._renamed(key), *default)


def _bar_logs(logs: dict[str, float], meter: Throughput | None) -> dict[str, float]:
    """The progress bar's values: the running loss and metrics, and the throughput so far."""
    rates = meter.rates() if meter is not None else {}
    if "tokens_per_sec" in rates:
        logs["tok/s"] = rates["tokens_per_sec"]
    elif "samples_per_sec" in rates:
        logs["samples/s"] = rates["samples_per_sec"]
    return logs


class _StepChecks:
    """``fit``'s step-based part, called after every training batch: validation every ``interval`` updates (a
    history row each) and the stop at ``max_steps``; the throughput meter of the whole ``fit``. ``stopped`` says
    an epoch ended at ``max_steps``."""

    def __init__(self, trainer: "Trainer", val_data: Any, cbs: CallbackList, verbose: int, interval: int | None,
                 max_steps: int | None):
        self.trainer, self.val_data, self.cbs, self.verbose = trainer, val_data, cbs, verbose
        self.interval, self.max_steps = interval, max_steps
        self.stopped, self.last_val = False, {}
        self.meter = Throughput()  # over the whole fit; an epoch and a row take the stretch since their start
        self.states = trainer._book.init() if interval is not None else None
        self.row_start, self.row_time = self.meter.snapshot(), time.perf_counter()

    def __call__(self, out: dict) -> bool:
        t = self.trainer
        if self.states is not None:
            self.states = t._book.update(self.states, out)
        if not out.get("updated", True):
            return False
        step = t.state.step
        self.stopped = self.max_steps is not None and step >= self.max_steps
        if self.interval is not None and (step % self.interval == 0 or self.stopped):
            self._check(step)
        return self.stopped

    def _check(self, step: int) -> None:
        t = self.trainer
        logs = t._book.logs(self.states)  # a sync: the rates below measure finished work
        self.meter.pause()
        logs.update(self.meter.rates(self.row_start))
        if self.val_data is not None:
            self.last_val = t.evaluate(self.val_data, prefix="val_", callbacks=self.cbs, verbose=0)
            logs.update(self.last_val)
        logs["lr"] = learning_rate(t.state.opt_state)
        logs["time"] = time.perf_counter() - self.row_time
        t.history.append({"epoch": t.epoch + 1, "step": step, **logs})
        if self.verbose:
            shown = "  ".join(f"{k}={v:.4g}" for k, v in logs.items() if k != "time")
            print(f"step {step}  {shown}  [{logs['time']:.1f}s]")
        self.states, self.row_start, self.row_time = t._book.init(), self.meter.snapshot(), time.perf_counter()
        self.meter.resume()


def _sharded_memory_format(request: Any) -> Any:
    """ZeRO-3 keeps 1-D parts of every parameter: no 4-D tensor to lay out, so ``"auto"`` is ``"preserve"``."""
    if request == "auto":
        return "preserve"
    if request in ("channels_last", torch.channels_last):
        raise ValueError("Trainer(strategy=ZeRO(3), memory_format='channels_last'): the state holds each rank's 1-D "
                         "part of every parameter, which has no memory layout to choose: use memory_format='auto' "
                         "(or 'preserve')")
    return request


def _on_device(batch: Any, device: torch.device, memory_format: Any) -> Any:
    # non_blocking only host-to-device (the CPU must not read an unfinished copy); the trainer's layout, as a conv
    return place(batch, device, non_blocking=device.type == "cuda", memory_format=memory_format)


def _as_key(key: Any) -> _random.Key:
    if key is None:
        return _random.key(0)
    if isinstance(key, int) and not isinstance(key, bool):
        return _random.key(key)
    if not isinstance(key, _random.Key):
        raise TypeError(f"key must be an fnnet.random.Key or an int seed, got {type(key).__name__}")
    return key
