"""``fnnet.Trainer``: fit / evaluate / predict as a thin loop around the pure step.

The Trainer owns a :class:`~fnnet.train.TrainState` (``trainer.state``) and drives
``state, metrics = train_step(state, batch)`` over a loader, with metrics, a progress bar,
validation and callbacks around it: the torchkeras ``Model`` / Lightning ``Trainer``
convenience, without their hidden state. Nothing is clipped, scheduled or averaged behind
your back: gradient clipping and schedules are parts of the optimizer you pass in, and
epoch metrics are exact streaming metrics (``fnnet.metrics``).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
import warnings
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from . import metrics as _metrics
from . import random as _random
from .callbacks import Callback
from .data import batch_size_of, num_batches, set_epoch
from .device import device_count, existing_devices, place, resolve_device
from .functional import Model, functional
from .train import (
    PRECISIONS,
    DynamicScale,
    TrainState,
    _autocast,
    make_eval_step,
    make_train_step,
    split_batch,
    supervised_loss,
)
from . import tree as _tree

__all__ = ["Trainer", "History", "parse_devices", "seed_everything"]


def parse_devices(devices: Any) -> list[torch.device]:
    """The devices a ``devices=`` request names (the chapter's Lightning ``gpus=`` meanings).

    ``"auto"`` (a GPU when there is one, else the CPU), ``"cpu"``, ``"cuda"`` / ``"cuda:N"``, a
    ``torch.device``; an int count: ``0`` = CPU, ``1`` = one GPU, ``n`` = the first ``n`` GPUs,
    ``-1`` = every GPU; a list of GPU indices ``[0, 1]``. A request this machine cannot satisfy
    raises ``ValueError`` listing the devices that exist.
    """
    if isinstance(devices, bool):
        raise TypeError(f"devices must be 'auto', 'cpu', 'cuda', an int or a list of ints, not {devices!r}")
    if devices is None or isinstance(devices, (str, torch.device)):
        if isinstance(devices, str) and devices.lower() in ("gpu", "gpus"):
            devices = "cuda"
        try:
            return [resolve_device(devices)]
        except ValueError as exc:
            raise ValueError(f"devices={devices!r}: {exc}") from None
    n = device_count()
    if isinstance(devices, int):
        if devices == 0:
            return [torch.device("cpu")]
        if devices == -1:
            if n == 0:
                raise ValueError(f"devices=-1 asks for every GPU, but this machine has none; devices here: {existing_devices()}")
            return [torch.device("cuda", i) for i in range(n)]
        if devices < -1:
            raise ValueError(f"devices={devices} is not valid: use 0 (CPU), a GPU count >= 1, or -1 (all GPUs)")
        if devices > n:
            raise ValueError(f"devices={devices} asks for {devices} GPU(s) but this machine has {n}; devices here: {existing_devices()}")
        return [torch.device("cuda", i) for i in range(devices)]
    if isinstance(devices, (list, tuple)):
        if not devices:
            raise ValueError("devices=[] names no device; use 0 or 'cpu' for the CPU")
        out = []
        for i in devices:
            if not isinstance(i, int) or isinstance(i, bool):
                raise TypeError(f"devices list entries must be GPU indices (ints), got {i!r}")
            if not 0 <= i < n:
                raise ValueError(f"devices={list(devices)}: GPU {i} does not exist; devices here: {existing_devices()}")
            out.append(torch.device("cuda", i))
        if len(set(out)) != len(out):
            raise ValueError(f"devices={list(devices)} names a GPU twice")
        return out
    raise TypeError(f"devices must be 'auto', 'cpu', 'cuda', an int or a list of ints, not {type(devices).__name__}")


def seed_everything(seed: int) -> int:
    """Seed Python's, NumPy's and torch's global RNGs (Lightning's ``seed_everything``).

    fnnet itself never draws from global RNGs (it uses explicit keys); this is for the rest
    of a script: module constructors, torch ``DataLoader(shuffle=True)``, numpy code.
    """
    import random

    import numpy as np

    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return seed


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


def _tqdm_class() -> Any:
    """tqdm's notebook bar where Jupyter widgets exist, its text bar elsewhere (no IProgress warning)."""
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        from tqdm.std import tqdm

        return tqdm
    from tqdm.auto import tqdm

    return tqdm


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


class _Bar:
    """A tqdm progress bar, or nothing when verbose=0 or tqdm is missing."""

    def __init__(self, total: int | None, desc: str, enabled: bool):
        self.bar = None
        if enabled:
            try:
                tqdm = _tqdm_class()
                self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stdout)
            except ImportError:  # pragma: no cover - tqdm is a dependency
                self.bar = None

    def update(self, postfix: dict | None = None) -> None:
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


_MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format, "preserve": None}


def _memory_format(spec: Any, device: torch.device, params: Any) -> torch.memory_format | None:
    """The layout ``Trainer(memory_format=spec)`` places 4-D tensors in (``None``: leave them)."""
    if isinstance(spec, torch.memory_format):
        return None if spec is torch.preserve_format else spec
    if spec == "auto":
        conv = any(isinstance(t, torch.Tensor) and t.ndim == 4 for t in _tree.leaves(params))
        return torch.channels_last if (conv and device.type == "cpu") else None
    if spec not in _MEMORY_FORMATS:
        raise ValueError(f"memory_format must be 'auto', {', '.join(map(repr, _MEMORY_FORMATS))} or a torch.memory_format, "
                         f"got {spec!r}")
    return _MEMORY_FORMATS[spec]


class Trainer:
    """Keras-like ``fit`` / ``evaluate`` / ``predict`` around fnnet's pure training step.

    Args:
        model: an ``fnnet.functional(...)`` model or a plain ``nn.Module`` (converted; the
            module itself is never modified).
        loss: ``loss(outputs, targets) -> scalar`` (e.g. ``torch.nn.functional.cross_entropy``).
        optimizer: an ``fnnet.optim`` transform (``fnnet.optim.adam(0.01)``). Clipping and
            schedules belong in it (``chain(clip_by_global_norm(1.0), adam(...))``).
        metrics: ``{"accuracy": fnnet.metrics.accuracy, ...}``; values are ``fnnet.metrics.Metric``
            (exact over an epoch) or plain ``fn(outputs, targets)`` (averaged per sample).
        devices: see :func:`parse_devices`. More than one device needs data parallelism, which
            is not in this release: a valid multi-device request raises ``NotImplementedError``.
        jit: compile the train and eval steps with ``torch.compile``.
        key: an ``fnnet.random.Key`` or int seed for dropout (default ``key(0)``).
        precision: ``"32"``, ``"bf16"`` or ``"16-mixed"`` (see ``make_train_step``).
        donate: let each step update the state's buffers in place (faster for large models;
            then copy anything you keep from ``trainer.state`` with ``clone``). Off by default,
            so an interrupted step never leaves a half-updated state.
        params: initial parameters (default ``model.params``), e.g. ``model.init(key)``.
        compile_options: extra ``torch.compile`` arguments when ``jit=True``.
        memory_format: the layout of 4-D parameters and buffers (conv weights) and so of the
            activations computed from them: ``"auto"`` (default: ``"channels_last"`` on CPU
            for models with 4-D parameters, as they are on the device otherwise),
            ``"channels_last"`` (NHWC, flax's layout), ``"contiguous"`` (NCHW) or
            ``"preserve"``. 4-D batch tensors (images) are laid out the same way as they
            arrive, and so are loaded checkpoints. Values are the same in every layout; on CPU
            oneDNN's convolutions and pooling are much faster in NHWC. The first batch checks
            that the forward runs on channels-last tensors (``x.view(n, -1)`` after a conv
            does not; ``reshape``/``flatten`` do): if not, ``"auto"`` warns and trains NCHW,
            an explicit ``"channels_last"`` raises ``ValueError``.

    Attributes:
        state: the :class:`TrainState` (params, optimizer state, step, buffers, key).
        device: the device training runs on. ``history``: the :class:`History` of all fits.
        stop_training: set it to ``True`` (from a callback) to end ``fit`` after this epoch.
    """

    def __init__(self, model: Model | nn.Module, loss: Callable, optimizer: Any, *,
                 metrics: Mapping[str, Any] | None = None, devices: Any = "auto", jit: bool = False,
                 key: _random.Key | int | None = None, precision: str = "32", donate: bool = False,
                 params: Any = None, compile_options: Mapping[str, Any] | None = None,
                 memory_format: str | torch.memory_format = "auto"):
        if not callable(loss):
            raise TypeError(f"loss must be callable as loss(outputs, targets), got {type(loss).__name__}")
        if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
            raise TypeError(f"optimizer must be an fnnet.optim transform (e.g. fnnet.optim.adam(1e-3)), got {type(optimizer).__name__}")
        self.devices = parse_devices(devices)
        if len(self.devices) > 1:
            raise NotImplementedError(
                f"devices={devices!r} asks for {len(self.devices)} devices ({', '.join(map(str, self.devices))}); "
                "multi-device data parallelism is not in this release of fnnet. Use one device "
                "(devices=1 or 'cuda:0') for now."
            )
        self.device = self.devices[0]
        self.model = functional(model)
        self.loss = loss
        self.optimizer = optimizer
        self.metrics = {name: _metrics.as_metric(m) for name, m in (metrics or {}).items()}
        for name in self.metrics:
            if name == "loss" or name.startswith("val_"):
                raise ValueError(f"metric name {name!r} is reserved (loss and val_* are the Trainer's own)")
        if isinstance(key, int) and not isinstance(key, bool):
            key = _random.key(key)
        elif key is None:
            key = _random.key(0)
        elif not isinstance(key, _random.Key):
            raise TypeError(f"key must be an fnnet.random.Key or an int seed, got {type(key).__name__}")
        self.jit, self.precision, self.donate = jit, precision, donate
        self.loss_fn = supervised_loss(self.model, loss)
        self.train_step = make_train_step(self.loss_fn, optimizer, jit=jit, donate=donate, precision=precision,
                                          compile_options=compile_options)
        self.eval_step = make_eval_step(self.loss_fn, jit=jit, precision=precision, compile_options=compile_options)
        params = self.model.params if params is None else params
        self.model._check_params(params)
        self.memory_format = _memory_format(memory_format, self.device, params)
        self._layout_auto = isinstance(memory_format, str) and memory_format == "auto"
        self._layout_checked = self.memory_format not in (torch.channels_last, torch.channels_last_3d)
        fmt = self.memory_format
        # The trainer owns its state: copies, so donated steps never write into the caller's tensors
        # (clone keeps the layout place gave them).
        buffers = _tree.map(torch.clone, place(self.model.buffers, self.device, memory_format=fmt)) if self.model.buffers else None
        params = _tree.map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t,
                           place(params, self.device, memory_format=fmt))
        # float16 keeps its loss scale in the state from the start, so checkpoints always hold it
        loss_scale = DynamicScale.create(self.device) if PRECISIONS.get(precision) is torch.float16 else None
        self.state: TrainState = TrainState.create(params, optimizer,
                                                   buffers=buffers, key=key, loss_scale=loss_scale)
        self.history = History()
        self.epoch = 0
        self.stop_training = False
        self._announced = False

    # -- helpers ---------------------------------------------------------------------------
    def _place(self, batch: Any) -> Any:
        # non_blocking only for host-to-device copies: a device-to-host copy must be complete
        # before the CPU reads it.
        # Batches take the trainer's layout too: a conv picks its output layout from its input
        # as well as its weight, and an image batch in NHWC keeps the whole network in NHWC.
        placed = place(batch, self.device, non_blocking=self.device.type == "cuda", memory_format=self.memory_format)
        if not self._layout_checked:
            self._layout_checked = True
            try:
                takes = self._forward_takes_layout(placed)
            except ValueError:
                self._layout_checked = False  # an explicit layout the model cannot take: say so every time
                raise
            if not takes:
                placed = place(batch, self.device, non_blocking=self.device.type == "cuda", memory_format=self.memory_format)
        return placed

    def _forward_takes_layout(self, batch: Any) -> bool:
        """Check, once, that the model's forward runs on channels-last tensors.

        Code written for NCHW tensors can fail on them (``x.view(x.size(0), -1)`` after a conv
        needs ``reshape`` or ``flatten``). With ``memory_format="auto"`` the trainer then moves
        to the contiguous layout with a warning (and returns False); with an explicit
        ``"channels_last"`` it raises ``ValueError`` saying so. A forward that fails in both
        layouts is not a layout problem: the step will report it.
        """
        try:
            inputs, _ = split_batch(batch)
        except ValueError:
            return True
        buffers = self.state.buffers if self.model.buffers else None

        def forward(params: Any, x: Any) -> None:
            with torch.no_grad():
                self.model.apply(params, x, buffers=buffers)

        try:
            forward(self.state.params, inputs)
            return True
        except RuntimeError as err:
            error = err
        nchw = torch.contiguous_format
        try:
            forward(place(self.state.params, self.device, memory_format=nchw), place(inputs, self.device, memory_format=nchw))
        except RuntimeError:
            return True
        hint = (f"{self.model.module_type}'s forward fails on channels-last tensors ({str(error).splitlines()[0]}); "
                "write .reshape(...) or .flatten(1) instead of .view(...) to keep the faster layout")
        if not self._layout_auto:
            raise ValueError(f"Trainer(memory_format=channels_last): {hint}, or pass memory_format='contiguous'") from error
        warnings.warn(f"fnnet.Trainer: {hint}; training in the contiguous (NCHW) layout instead "
                      "(memory_format='contiguous' silences this)", stacklevel=4)
        self.memory_format = nchw
        self.state = self._relayout(self.state)
        return False

    def _metric_states(self) -> dict[str, Any]:
        return {name: m.init(self.device) for name, m in self.metrics.items()}

    def _announce(self, verbose: int) -> None:
        if verbose and not self._announced:
            name = str(self.device)
            if self.device.type == "cuda":
                name += f" ({torch.cuda.get_device_name(self.device)})"
            print(f"fnnet.Trainer: training on {name}, precision {self.precision}, jit {'on' if self.jit else 'off'}")
            self._announced = True

    def _logs(self, loss_state: Any, metric_states: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
        logs = {f"{prefix}loss": float(_metrics.mean_metric().compute(loss_state))}
        for name, m in self.metrics.items():
            logs[f"{prefix}{name}"] = float(m.compute(metric_states[name]))
        return logs

    def _learning_rate(self) -> float:
        from .optim import get_learning_rate

        lr = get_learning_rate(self.state.opt_state)
        return float(lr) if lr is not None else math.nan

    # -- fit ----------------------------------------------------------------------------------
    def fit(self, train_data: Iterable, val_data: Iterable | None = None, *, epochs: int = 1,
            callbacks: Sequence[Callback] = (), log_every: int | None = None, verbose: int = 1,
            on_nonfinite: str = "stop") -> History:
        """Train for ``epochs`` epochs, validating on ``val_data`` after each; returns the history.

        Args:
            train_data: any iterable of ``(inputs, targets)`` batches: an ``fnnet.data.ArrayLoader``
                (fastest: data already on the device), a torch ``DataLoader``, a list.
            val_data: the same for validation (logged as ``val_loss``, ``val_<metric>``).
            epochs: how many epochs to run in this call; calling ``fit`` again continues from the
                current state (epochs keep counting, and so does a loaded checkpoint's).
            callbacks: see ``fnnet.callbacks``.
            log_every: check the loss (and refresh the progress bar) every this many steps; each
                check reads the loss from the device, a sync. Default: about ten times per epoch.
            verbose: 0 silent, 1 progress bar and a line per epoch.
            on_nonfinite: ``"stop"`` (default) ends training with a message when the loss becomes
                NaN/inf: ``trainer.state`` goes back to the last state whose loss was checked finite
                (with ``donate=False``), and ``on_epoch_end`` is not run for the broken epoch, so
                no checkpoint of it is written and the last good one stays intact. ``"raise"``
                does the same, then raises ``FloatingPointError``.

        The logged ``lr`` is the learning rate of the epoch's last update. Ctrl-C (SIGINT) ends
        training after the current step: ``on_fit_end`` callbacks still run and the history so
        far is returned (``history.stop_reason == "interrupted"``); a second Ctrl-C interrupts
        at once.
        """
        if not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
        if on_nonfinite not in ("stop", "raise"):
            raise ValueError(f"on_nonfinite must be 'stop' or 'raise', got {on_nonfinite!r}")
        if log_every is not None and (not isinstance(log_every, int) or log_every < 1):
            raise ValueError(f"log_every must be a positive int or None, got {log_every!r}")
        callbacks = list(callbacks)
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks must be fnnet.callbacks.Callback instances, got {type(cb).__name__}")
        self._announce(verbose)
        self.stop_training = False
        self.history.stop_reason = ""
        for cb in callbacks:
            cb.on_fit_start(self)
        try:
            with _deferred_interrupt() as interrupted:
                for i in range(epochs):
                    epoch = self.epoch
                    set_epoch(train_data, epoch)
                    for cb in callbacks:
                        cb.on_epoch_start(self, epoch)
                    start = time.perf_counter()
                    logs = self._train_epoch(train_data, epoch, callbacks, log_every, verbose, interrupted)
                    if logs is None:  # non-finite loss
                        message = (f"fnnet.Trainer: the training loss became non-finite in epoch {epoch + 1}; "
                                   f"stopping at step {self.state.step} (the state before it was restored and the "
                                   "last good checkpoint is kept).")
                        self.history.stop_reason = "nonfinite"
                        if on_nonfinite == "raise":
                            raise FloatingPointError(message)
                        print(message, file=sys.stderr)
                        break
                    if val_data is not None:
                        logs.update(self.evaluate(val_data))
                    logs["lr"] = self._learning_rate()
                    logs["time"] = time.perf_counter() - start
                    self.epoch += 1
                    self.history.append({"epoch": epoch + 1, **logs})
                    if verbose:
                        shown = "  ".join(f"{k}={v:.4g}" for k, v in logs.items() if k != "time")
                        print(f"Epoch {epoch + 1} ({i + 1}/{epochs})  {shown}  [{logs['time']:.1f}s]")
                    for cb in callbacks:
                        cb.on_epoch_end(self, epoch, logs)
                    if self.stop_training:
                        self.history.stop_reason = "stopped by callback"
                        break
        except KeyboardInterrupt:
            self.history.stop_reason = "interrupted"
            print(f"fnnet.Trainer: interrupted at step {self.state.step}; returning the history so far.", file=sys.stderr)
        finally:
            for cb in callbacks:
                cb.on_fit_end(self)
        return self.history

    def _train_epoch(self, data: Iterable, epoch: int, callbacks: Sequence[Callback], log_every: int | None,
                     verbose: int, interrupted: Callable[[], bool]) -> dict[str, float] | None:
        total = num_batches(data)
        every = log_every or max(1, (total or 100) // 10)
        bar = _Bar(total, f"epoch {epoch + 1}", bool(verbose))
        loss_metric = _metrics.mean_metric()
        loss_state = loss_metric.init(self.device)
        metric_states = self._metric_states()
        good = self.state  # the last state known to give a finite loss
        count = 0
        try:
            for batch in data:
                batch = self._place(batch)
                _, targets = split_batch(batch)
                for cb in callbacks:
                    cb.on_train_batch_start(self, self.state.step)
                before = self.state
                self.state, step_metrics = self.train_step(self.state, batch)
                loss = step_metrics["loss"]
                loss_state = loss_metric.update(loss_state, loss, batch_size_of(batch))
                outputs = step_metrics.get("outputs")
                for name, m in self.metrics.items():
                    metric_states[name] = m.update(metric_states[name], outputs, targets)
                count += 1
                for cb in callbacks:
                    cb.on_train_batch_end(self, self.state.step, step_metrics)
                postfix = None
                if count % every == 0:
                    if not math.isfinite(float(loss)):  # one sync per `every` steps
                        self._restore(good)
                        return None
                    good = before  # its loss (the one just read) was finite
                    if verbose:
                        postfix = {"loss": float(loss_metric.compute(loss_state))}
                bar.update(postfix)
                if interrupted():
                    raise KeyboardInterrupt
        finally:
            bar.close()
        if count == 0:
            raise ValueError("train_data yielded no batches")
        logs = self._logs(loss_state, metric_states)
        if not math.isfinite(logs["loss"]):
            self._restore(good)
            return None
        return logs

    def _restore(self, good: TrainState) -> None:
        # A donated step wrote into the old state's buffers: nothing safe to go back to.
        if not self.donate:
            self.state = good

    # -- evaluate / predict -------------------------------------------------------------------
    def evaluate(self, data: Iterable, *, prefix: str = "val_") -> dict[str, float]:
        """Loss and metrics over ``data`` (exact over all samples): ``{"val_loss": ..., "val_accuracy": ...}``."""
        loss_metric = _metrics.mean_metric()
        loss_state = loss_metric.init(self.device)
        metric_states = self._metric_states()
        count = 0
        for batch in data:
            batch = self._place(batch)
            _, targets = split_batch(batch)
            out = self.eval_step(self.state, batch)
            loss_state = loss_metric.update(loss_state, out["loss"], batch_size_of(batch))
            for name, m in self.metrics.items():
                metric_states[name] = m.update(metric_states[name], out.get("outputs"), targets)
            count += 1
        if count == 0:
            raise ValueError("evaluate: data yielded no batches")
        return self._logs(loss_state, metric_states, prefix)

    def predict(self, data: Iterable | torch.Tensor, *, device: Any = "cpu", batch_size: int = 256) -> torch.Tensor:
        """The model's outputs (eval mode, the trainer's precision) for every batch of ``data``, concatenated.

        ``data``: a tensor of inputs (split into batches of ``batch_size``) or any iterable of
        batches (``(inputs, targets)``, ``(inputs,)`` or inputs alone). Returned on ``device``
        (CPU by default) in float32 when the trainer computes in a lower precision.
        """
        if isinstance(data, torch.Tensor):
            if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
                raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
            data = [(data[i:i + batch_size],) for i in range(0, len(data), batch_size)]
        outs = []
        with torch.no_grad(), _autocast(self.precision, self.state.params):
            for batch in data:
                inputs, _ = split_batch(self._place(batch))
                out = self.model.apply(self.state.params, inputs, buffers=self.state.buffers, train=False)
                outs.append(out.float() if out.is_floating_point() else out)
        if not outs:
            raise ValueError("predict: data yielded no batches")
        return place(torch.cat(outs), device)

    # -- checkpoints ---------------------------------------------------------------------------
    def checkpoint(self) -> dict[str, Any]:
        """What :meth:`save` writes: ``{"state": trainer.state, "epoch": epochs completed}``."""
        return {"state": self.state, "epoch": self.epoch}

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`checkpoint` to ``path`` (``fnnet.save``: one atomic safetensors file).

        ``fnnet.load(path)["state"]`` is the ``TrainState``; its ``params`` load into the
        ``nn.Module`` with ``load_state_dict``.
        """
        from .checkpoint import save

        save(path, self.checkpoint())

    def load(self, path: str | os.PathLike) -> "Trainer":
        """Restore the state and epoch count saved by :meth:`save` (or ``ModelCheckpoint``).

        The file is validated against the current state (structure, shapes, dtypes: every
        mismatch is named), lands on the trainer's device, and training resumes exactly where
        it stopped: the epoch count drives the loader's shuffling order and per-epoch schedules.
        A file holding a bare ``TrainState`` (``fnnet.save(path, state)``) loads too, without
        changing the epoch count.
        """
        from .checkpoint import load

        try:
            saved = load(path, like=self.checkpoint(), device=self.device)
        except ValueError as full_error:
            try:
                self.state = self._relayout(load(path, like=self.state, device=self.device))
            except ValueError:
                raise full_error from None
            return self
        self.state, self.epoch = self._relayout(saved["state"]), int(saved["epoch"])
        return self

    def _relayout(self, state: TrainState) -> TrainState:
        # Checkpoints hold contiguous tensors: put params, buffers and optimizer state back in
        # the trainer's layout (a no-op for "preserve").
        return place(state, self.device, memory_format=self.memory_format)

    def summary(self, input_shape: Sequence[int], **kwargs: Any) -> Any:
        """``fnnet.summary`` of the model (layer shapes and parameter counts; values do not matter)."""
        from .summary import summary

        return summary(self.model, input_shape, **kwargs)
