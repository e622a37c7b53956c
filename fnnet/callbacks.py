"""Trainer callbacks: checkpoints, early stopping, learning-rate schedules, CSV logs.

The protocol: a callback is any object with some of these methods (duck typing; subclassing
:class:`Callback`, whose hooks do nothing, is optional)::

    on_fit_start(trainer)                          # before the first epoch
    on_epoch_start(trainer, epoch)                 # epoch counts from 0 across fit() calls
    on_train_batch_start(trainer, step)            # step = trainer.state.step before the update
    on_train_batch_end(trainer, step, metrics)     # metrics: device tensors, not synced
    on_validation_batch_start(trainer, index)      # index: the batch's position in val_data
    on_validation_batch_end(trainer, index, metrics)
    on_epoch_end(trainer, epoch, logs)             # logs: this epoch's floats (loss, val_loss, lr...)
    on_fit_end(trainer)                            # always runs: after the last epoch, on a
                                                   # non-finite loss, and on KeyboardInterrupt

``epoch`` in the hooks is an index counted from 0; what users see (History, the console,
CSV rows, checkpoint file names) counts epochs from 1.

A callback changes training only through the trainer: ``trainer.stop_training = True``
ends ``fit`` after the current epoch; ``trainer.state = trainer.state.replace(...)``
replaces the state (a ``TrainState``: data, not hidden attributes).
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from typing import Any, Callable

import torch

from . import tree as _tree
from .state import all_finite

__all__ = ["Callback", "CallbackList", "HOOKS", "ModelCheckpoint", "EarlyStopping", "LearningRateSchedule", "CSVLogger"]

HOOKS = ("on_fit_start", "on_epoch_start", "on_train_batch_start", "on_train_batch_end", "on_validation_batch_start",
         "on_validation_batch_end", "on_epoch_end", "on_fit_end")


class Callback:
    """Base class with no-op hooks; see the module docstring for the protocol."""

    def on_fit_start(self, trainer: Any) -> None: ...

    def on_epoch_start(self, trainer: Any, epoch: int) -> None: ...

    def on_train_batch_start(self, trainer: Any, step: int) -> None: ...

    def on_train_batch_end(self, trainer: Any, step: int, metrics: dict) -> None: ...

    def on_validation_batch_start(self, trainer: Any, index: int) -> None: ...

    def on_validation_batch_end(self, trainer: Any, index: int, metrics: dict) -> None: ...

    def on_epoch_end(self, trainer: Any, epoch: int, logs: dict) -> None: ...

    def on_fit_end(self, trainer: Any) -> None: ...


class CallbackList:
    """Calls one hook on every callback that has it, in order (what the ``Trainer`` holds).

    Any object with at least one of :data:`HOOKS` is a callback; anything else is a
    ``TypeError`` naming the hooks.
    """

    def __init__(self, callbacks: Any = ()):
        self.callbacks = list(callbacks)
        for cb in self.callbacks:
            if isinstance(cb, type) or not any(callable(getattr(cb, h, None)) for h in HOOKS):
                raise TypeError(f"a callback is an object with some of the methods {', '.join(HOOKS)}; "
                                f"got {cb!r}" + (" (a class: instantiate it)" if isinstance(cb, type) else ""))
        self._bound = {h: [getattr(cb, h) for cb in self.callbacks if callable(getattr(cb, h, None))] for h in HOOKS}

    def __call__(self, hook: str, *args: Any) -> None:
        for fn in self._bound[hook]:
            fn(*args)

    def has(self, hook: str) -> bool:
        return bool(self._bound[hook])


def _check_mode(mode: str) -> None:
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")


def _monitored(logs: dict, monitor: str, who: str) -> float:
    if monitor not in logs:
        raise ValueError(f"{who}: monitor={monitor!r} is not among the epoch's logs {sorted(logs)}"
                       + (" (did you pass val_data to fit?)" if monitor.startswith("val_") else ""))
    return float(logs[monitor])


def _improves(score: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    if math.isnan(score):
        return False  # a NaN score never counts as best
    if best is None:
        return True
    return score < best - min_delta if mode == "min" else score > best + min_delta


def _clone(t: Any) -> Any:
    return _tree.map(lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, t)


class ModelCheckpoint(Callback):
    """Save the training state when the monitored value improves (Lightning's ``ModelCheckpoint``).

    Args:
        dirpath: folder for the checkpoints (created if missing).
        monitor: a key of the epoch logs (``"val_loss"``, ``"val_accuracy"``, ``"loss"``...).
        mode: ``"min"`` or ``"max"``.
        save_top_k: keep the best ``k`` checkpoints (``-1``: all, ``0``: none by score).
        save_last: also keep ``last.safetensors``, overwritten each epoch.
        filename: a format string over ``epoch`` and the logs.

    Attributes ``best_model_path`` and ``best_model_score`` name the best so far; a NaN score
    never counts as best. Files are ``trainer.save`` checkpoints (atomic safetensors holding the
    whole ``TrainState`` and the epoch count): ``trainer.load(path)`` resumes from them, and
    ``fnnet.load(path)["state"].params`` loads into the ``nn.Module``. ``epoch`` in ``filename``
    counts from 1.
    """

    def __init__(self, dirpath: str | os.PathLike, monitor: str = "val_loss", mode: str = "min",
                 save_top_k: int = 1, save_last: bool = False, filename: str = "epoch={epoch:03d}-{monitor}={score:.4f}"):
        _check_mode(mode)
        if not isinstance(save_top_k, int) or save_top_k < -1:
            raise ValueError(f"save_top_k must be an int >= -1, got {save_top_k!r}")
        self.dirpath = os.fspath(dirpath)
        self.monitor, self.mode, self.save_top_k, self.save_last = monitor, mode, save_top_k, save_last
        self.filename = filename
        self.best_k: list[tuple[float, str]] = []  # (score, path), best first
        self.last_model_path: str | None = None

    @property
    def best_model_path(self) -> str | None:
        return self.best_k[0][1] if self.best_k else None

    @property
    def best_model_score(self) -> float | None:
        return self.best_k[0][0] if self.best_k else None

    def on_epoch_end(self, trainer: Any, epoch: int, logs: dict) -> None:
        os.makedirs(self.dirpath, exist_ok=True)
        score = _monitored(logs, self.monitor, "ModelCheckpoint")
        if not bool(all_finite(trainer.state)):
            warnings.warn(f"ModelCheckpoint: epoch {epoch + 1}'s state holds non-finite values; not saved "
                          "(the last good checkpoint is kept)", stacklevel=2)
            return
        if self.save_top_k != 0 and not math.isnan(score):
            worst = self.best_k[-1][0] if self.best_k else None
            full = self.save_top_k != -1 and len(self.best_k) >= self.save_top_k
            if not full or _improves(score, worst, self.mode):
                name = self.filename.format(**{**logs, "epoch": epoch + 1, "monitor": self.monitor, "score": score}) + ".safetensors"
                path = os.path.join(self.dirpath, name)
                trainer.save(path)
                self.best_k.append((score, path))
                self.best_k.sort(key=lambda sp: sp[0], reverse=self.mode == "max")
                if self.save_top_k != -1:
                    keep, drop = self.best_k[: self.save_top_k], self.best_k[self.save_top_k:]
                    kept = {p for _, p in keep}
                    for _, stale in drop:
                        if stale not in kept and os.path.exists(stale):
                            os.remove(stale)
                    self.best_k = keep
        if self.save_last:
            self.last_model_path = os.path.join(self.dirpath, "last.safetensors")
            trainer.save(self.last_model_path)


class EarlyStopping(Callback):
    """Stop when the monitored value has not improved for ``patience`` epochs (Keras/Lightning).

    With ``restore_best=True`` the best epoch's state is put back into the trainer at the end
    of ``fit``. A NaN value counts as no improvement.
    """

    def __init__(self, monitor: str = "val_loss", patience: int = 5, mode: str = "min", min_delta: float = 0.0,
                 restore_best: bool = True):
        _check_mode(mode)
        if not isinstance(patience, int) or patience < 0:
            raise ValueError(f"patience must be an int >= 0, got {patience!r}")
        self.monitor, self.patience, self.mode, self.min_delta = monitor, patience, mode, min_delta
        self.restore_best = restore_best
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.wait = 0
        self.stopped_epoch: int | None = None
        self._best_state: Any = None

    def on_fit_start(self, trainer: Any) -> None:
        # Each fit is a fresh watch (Keras resets in on_train_begin too).
        self.best, self.best_epoch, self.wait, self.stopped_epoch, self._best_state = None, None, 0, None, None

    def on_epoch_end(self, trainer: Any, epoch: int, logs: dict) -> None:
        score = _monitored(logs, self.monitor, "EarlyStopping")
        if _improves(score, self.best, self.mode, self.min_delta):
            self.best, self.best_epoch, self.wait = score, epoch, 0
            if self.restore_best:
                self._best_state = _clone(trainer.state)
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = epoch
            trainer.stop_training = True

    def on_fit_end(self, trainer: Any) -> None:
        if self.restore_best and self._best_state is not None and self.stopped_epoch is not None:
            trainer.state = _clone(self._best_state)  # a copy: later donated steps must not write into ours


class LearningRateSchedule(Callback):
    """Set the learning rate from ``schedule`` once per epoch or once per step, explicitly.

    ``schedule(epoch) -> lr`` with ``interval="epoch"`` (Lightning's StepLR usage: call it with
    ``fnnet.optim.step_lr(0.01, 1, 0.5)`` for "halve every epoch"), or ``schedule(step) -> lr``
    with ``interval="step"``. The optimizer must hold its learning rate in its state (a constant
    learning rate, or ``inject_hyperparams``): the new value goes in through
    ``fnnet.optim.set_learning_rate``. For a schedule baked into the optimizer you need no
    callback at all.
    """

    def __init__(self, schedule: Callable[[int], float], interval: str = "epoch"):
        if interval not in ("epoch", "step"):
            raise ValueError(f"interval must be 'epoch' or 'step', got {interval!r}")
        if not callable(schedule):
            raise TypeError("schedule must be callable: epoch or step -> learning rate")
        self.schedule, self.interval = schedule, interval

    def _set(self, trainer: Any, count: int) -> None:
        from .optim import set_learning_rate

        lr = self.schedule(count)
        lr_value = float(lr)
        if not math.isfinite(lr_value) or lr_value < 0:
            raise ValueError(f"LearningRateSchedule: schedule({count}) = {lr_value}, expected a finite value >= 0")
        trainer.state = trainer.state.replace(opt_state=set_learning_rate(trainer.state.opt_state, lr_value))

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        if self.interval == "epoch":
            self._set(trainer, epoch)

    def on_train_batch_start(self, trainer: Any, step: int) -> None:
        if self.interval == "step":
            self._set(trainer, step)


class CSVLogger(Callback):
    """Append each epoch's logs as a row of a CSV file (the chapter's ``dfhistory``, on disk)."""

    def __init__(self, path: str | os.PathLike, append: bool = False):
        self.path = os.fspath(path)
        self.append = append
        self._fields: list[str] | None = None

    def on_fit_start(self, trainer: Any) -> None:
        folder = os.path.dirname(self.path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        self._fields = None
        if os.path.exists(self.path):
            if not self.append:
                os.remove(self.path)
            else:
                with open(self.path, newline="") as f:
                    self._fields = next(csv.reader(f), None)

    def on_epoch_end(self, trainer: Any, epoch: int, logs: dict) -> None:
        row = {"epoch": epoch + 1, **logs}
        rows: list[dict] = []
        if self._fields is None:
            self._fields = list(row)
        elif any(k not in self._fields for k in row):
            # a column appeared (e.g. val_* from the second fit on): rewrite with the wider header
            with open(self.path, newline="") as f:
                rows = list(csv.DictReader(f))
            self._fields += [k for k in row if k not in self._fields]
            os.remove(self.path)
        new_file = not os.path.exists(self.path)
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self._fields, restval="")
            if new_file:
                writer.writeheader()
            writer.writerows(rows)
            writer.writerow(row)
