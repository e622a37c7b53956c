"""Trainer callbacks: checkpoints, early stopping, learning-rate schedules, CSV and TensorBoard logs.

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

A ``torch.optim.lr_scheduler`` object in a callback list (Lightning's ``lr_scheduler``) is
turned into its fnnet callback by :func:`from_torch_scheduler`.
"""

from __future__ import annotations

import csv
import glob
import math
import os
import re
import shutil
import string
import warnings
from typing import Any, Callable

import torch

from . import distributed as _dist
from . import tree as _tree
from ._warnings import user_stacklevel
from .checkpoint.sharded import MANIFEST
from .state import host_finite

__all__ = ["Callback", "CallbackList", "HOOKS", "ModelCheckpoint", "EarlyStopping", "LearningRateSchedule",
           "ReduceLROnPlateau", "CSVLogger", "TensorBoardLogger", "from_torch_scheduler", "is_torch_scheduler"]

HOOKS = ("on_fit_start", "on_epoch_start", "on_train_batch_start", "on_train_batch_end", "on_validation_batch_start",
         "on_validation_batch_end", "on_epoch_end", "on_fit_end")


class Callback:
    """Base class with no-op hooks; see the module docstring for the protocol.

    Subclassing it is optional (any object with some of these methods is a callback); it spells
    the hook names, which are Keras' (``on_epoch_end(epoch, logs)``) with Lightning's
    ``on_fit_*`` / ``on_train_batch_*`` / ``on_validation_batch_*`` (Lightning's hooks take
    ``(trainer, pl_module, ...)``, fnnet's take ``(trainer, ...)``).
    """

    def on_fit_start(self, trainer: Any) -> None:
        """Before the first epoch of ``fit`` (after a resume has restored the state)."""

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        """At the start of epoch ``epoch`` (counted from 0 across ``fit`` calls)."""

    def on_train_batch_start(self, trainer: Any, step: int) -> None:
        """Before a training step; ``step`` is ``trainer.state.step`` before the update."""

    def on_train_batch_end(self, trainer: Any, step: int, metrics: dict) -> None:
        """After a training step; ``metrics`` are the step's device tensors (not synced: reading one is a sync)."""

    def on_validation_batch_start(self, trainer: Any, index: int) -> None:
        """Before a validation batch; ``index`` is its position in the validation data."""

    def on_validation_batch_end(self, trainer: Any, index: int, metrics: dict) -> None:
        """After a validation batch, with its eval step's metrics (device tensors)."""

    def on_epoch_end(self, trainer: Any, epoch: int, logs: dict) -> None:
        """After epoch ``epoch``'s training and validation; ``logs``: its floats (``loss``, ``val_loss``, ``lr``...)."""

    def on_fit_end(self, trainer: Any) -> None:
        """Always, when ``fit`` ends: after the last epoch, on a non-finite loss, and on KeyboardInterrupt."""


class CallbackList:
    """Calls one hook on every callback that has it, in order (what the ``Trainer`` holds).

    Any object with at least one of :data:`HOOKS` is a callback; a ``torch.optim.lr_scheduler``
    object becomes the callback :func:`from_torch_scheduler` makes of it; anything else is a
    ``TypeError`` naming the hooks.
    """

    def __init__(self, callbacks: Any = ()):
        self.callbacks = [from_torch_scheduler(cb) if is_torch_scheduler(cb) else cb for cb in callbacks]
        for cb in self.callbacks:
            if isinstance(cb, type) or not any(callable(getattr(cb, h, None)) for h in HOOKS):
                raise TypeError(f"a callback is an object with some of the methods {', '.join(HOOKS)}; "
                                f"got {cb!r}" + (" (a class: instantiate it)" if isinstance(cb, type) else ""))
        self._bound = {h: [getattr(cb, h) for cb in self.callbacks if callable(getattr(cb, h, None))] for h in HOOKS}
        # checkpoints last at an epoch's end: the file then records every other callback's book after
        # this epoch (EarlyStopping's wait, ReduceLROnPlateau's watch), as a resumed run needs them
        ends = [cb for cb in self.callbacks if callable(getattr(cb, "on_epoch_end", None))]
        ends.sort(key=lambda cb: isinstance(cb, ModelCheckpoint))
        self._bound["on_epoch_end"] = [cb.on_epoch_end for cb in ends]

    def __call__(self, hook: str, *args: Any) -> None:
        """Call ``hook`` (one of :data:`HOOKS`) with ``args`` on every callback that has it."""
        for fn in self._bound[hook]:
            fn(*args)

    def has(self, hook: str) -> bool:
        """Whether any callback has ``hook``."""
        return bool(self._bound[hook])


def _finite_everywhere(trainer: Any) -> bool:
    """Whether the trainer's state is finite on every rank (one small all-reduce in a distributed run:
    every rank must take the same save decision, since a save gathers a sharded optimizer state)."""
    bad = torch.tensor([0.0 if host_finite(trainer.state) else 1.0])
    if getattr(trainer, "distributed", False):
        bad = _dist.all_reduce_max(bad)
    return float(bad[0]) == 0.0


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


def _same_settings(who: str, settings: dict[str, Any], state: Any) -> bool:
    """Whether a saved book was kept under ``settings`` (what the callback watches and how); if not, warn that
    the book starts fresh. A book of other settings means something else (a best ``loss`` is no best ``accuracy``)."""
    saved = state.get("settings") if isinstance(state, dict) else None
    if saved == settings:
        return True
    if not isinstance(saved, dict):
        why = "it records no settings (written by an older fnnet or crafted)"
    else:
        why = "it was kept with " + ", ".join(f"{k}={saved.get(k)!r}" for k in settings if saved.get(k) != settings[k])
        why += ", this callback has " + ", ".join(f"{k}={v!r}" for k, v in settings.items() if saved.get(k) != v)
    warnings.warn(f"{who}: the checkpoint's book of this callback is not restored, {why}; it starts fresh",
                  UserWarning, stacklevel=user_stacklevel())
    return False


def _name_pattern(filename: str, monitor: str, ext: str = ".safetensors") -> re.Pattern:
    """The names ``ModelCheckpoint`` gives files (``ext``: ``".ckpt"`` for its sharded folders): ``filename``'s
    literal text, a field any text without a slash."""
    parts = []
    for literal, field, spec, _ in string.Formatter().parse(filename):
        parts.append(re.escape(literal))
        if field is not None:
            parts.append(re.escape(monitor) if field == "monitor" and not spec else r"[^/\\]+")
    return re.compile("".join(parts) + re.escape(ext))


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
        every_n_steps: also save ``step.safetensors`` (overwritten) every this many optimizer
            updates, inside epochs: what ``fit(resume="auto")`` continues from after a crash.
            Every rank calls ``trainer.save`` (a sharded optimizer state is gathered), the writing
            rank writes, and every rank waits until the file is complete.
        sharded: write each checkpoint as a sharded folder (``<name>.ckpt``, ``last.ckpt``, ``step.ckpt``;
            ``Trainer.save(path, sharded=True)``): every rank writes its own part, nothing is gathered.
            Such a folder counts as a checkpoint only once complete (its manifest, written last, present).
        async_save: write in a background thread after a copy to host memory (``Trainer.save(path,
            async_save=True)``); the next save and the end of ``fit`` wait for it.

    Attributes ``best_model_path`` and ``best_model_score`` name the best so far; a NaN score
    never counts as best. Files are ``trainer.save`` checkpoints (atomic safetensors holding the
    whole ``TrainState`` and the epoch count): ``trainer.load(path)`` resumes from them, and
    ``fnnet.load(path)["state"].params`` loads into the ``nn.Module``. ``epoch`` in ``filename``
    counts from 1.

    At the first ``on_fit_start`` that finds ``*.safetensors`` files in ``dirpath`` which this
    callback did not write (another run's), it warns once (a ``UserWarning``, as Lightning's
    "Checkpoint directory ... exists and is not empty"): they are left alone, but a file of
    this run with the same name replaces one of them. Give each run its own folder.

    A checkpoint records this callback's book (the best files and their scores) and the settings it
    was kept under. A resumed run takes the book back only with the same ``dirpath`` (absolute),
    ``monitor``, ``mode``, ``save_top_k`` and ``filename`` (Lightning keeps its book only in the
    same ``dirpath`` too); otherwise it starts a fresh book and warns. The book holds names, not
    paths, and the callback deletes only files it names as it names them, inside ``dirpath``: a book
    from another folder, a copied run or a crafted file never makes it delete anything else. With
    ``sharded=True`` the same holds of its folders: it removes (``shutil.rmtree``) only a real folder
    (not a link) in ``dirpath`` named as it names its folders, never a path a book spells out.
    """

    def __init__(self, dirpath: str | os.PathLike, monitor: str = "val_loss", mode: str = "min",
                 save_top_k: int = 1, save_last: bool = False, filename: str = "epoch={epoch:03d}-{monitor}={score:.4f}",
                 every_n_steps: int | None = None, sharded: bool = False, async_save: bool = False):
        _check_mode(mode)
        # sharded: each checkpoint is a folder (fnnet.checkpoint.sharded) named like the file, ".ckpt" for the suffix
        self._save_kw, self._ext = {"sharded": sharded, "async_save": async_save}, ".ckpt" if sharded else ".safetensors"
        if not isinstance(save_top_k, int) or save_top_k < -1:
            raise ValueError(f"save_top_k must be an int >= -1, got {save_top_k!r}")
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int)
                                          or every_n_steps < 1):
            raise ValueError(f"every_n_steps must be a positive int or None, got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.step_model_path: str | None = None
        self.dirpath = os.fspath(dirpath)
        self.monitor, self.mode, self.save_top_k, self.save_last = monitor, mode, save_top_k, save_last
        self.filename = filename
        self.best_k: list[tuple[float, str]] = []  # (score, path), best first
        self.last_model_path: str | None = None
        self._warned_foreign = False

    def on_fit_start(self, trainer: Any) -> None:
        if self._warned_foreign or not _dist.is_main():
            return
        own = {os.path.abspath(p) for _, p in self.best_k}
        for path in (self.last_model_path, self.step_model_path):
            if path is not None:
                own.add(os.path.abspath(path))
        foreign = sorted(os.path.basename(f) for f in glob.glob(os.path.join(glob.escape(self.dirpath), "*" + self._ext))
                         if os.path.abspath(f) not in own)
        if foreign:
            self._warned_foreign = True
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            warnings.warn(f"ModelCheckpoint: the folder '{self.dirpath}' already holds {len(foreign)} checkpoint(s) "
                          f"this callback did not write ({shown}), from another run; they are kept, but a checkpoint "
                          "of this run with the same name replaces its file. Use a new folder per run to keep them "
                          "apart", UserWarning, stacklevel=user_stacklevel())

    def on_train_batch_end(self, trainer: Any, step: int, metrics: dict) -> None:
        n = self.every_n_steps
        if n is None or not metrics.get("updated", True) or trainer.state.step % n:
            return
        if not _finite_everywhere(trainer):
            warnings.warn(f"ModelCheckpoint: the state after step {trainer.state.step} holds non-finite values; not "
                          "saved (the last good checkpoint is kept)", stacklevel=user_stacklevel())
            return
        if _dist.is_main():
            os.makedirs(self.dirpath, exist_ok=True)
        self.step_model_path = os.path.join(self.dirpath, "step" + self._ext)
        trainer.save(self.step_model_path, **self._save_kw)
        _dist.barrier()  # no rank goes on before the file is complete

    def _settings(self) -> dict[str, Any]:
        return {"dirpath": os.path.abspath(self.dirpath), "monitor": self.monitor, "mode": self.mode,
                "save_top_k": self.save_top_k, "filename": self.filename}

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint records of this callback, so a resumed run keeps its book: the settings it was
        kept under and the names (not paths) of its files in ``dirpath``."""
        def name(path: str | None) -> str | None:
            return None if path is None else os.path.relpath(path, self.dirpath)

        return {"settings": self._settings(), "best_k": [[score, name(path)] for score, path in self.best_k],
                "last_model_path": name(self.last_model_path), "step_model_path": name(self.step_model_path)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take a saved book back, only when it was kept under this callback's settings (``dirpath``, ``monitor``,
        ``mode``, ``save_top_k``, ``filename``), else start fresh with a warning. A book is never trusted as a
        list of paths: an entry is kept only when it is a name this callback gives its files (``filename``'s
        form, ``last.safetensors``, ``step.safetensors``; ``.ckpt`` for those of ``sharded=True``), and stands for
        that name in ``dirpath``; the callback deletes only such files (folders)."""
        if not _same_settings("ModelCheckpoint", self._settings(), state):
            self.best_k, self.last_model_path, self.step_model_path = [], None, None
            return
        pattern, dropped = _name_pattern(self.filename, self.monitor, self._ext), []

        def own(name: Any, fixed: str | None = None) -> str | None:
            ok = isinstance(name, str) and (name == fixed if fixed else (
                pattern.fullmatch(name) is not None and not os.path.isabs(name)
                and os.path.normpath(name) == name and ".." not in name.replace("\\", "/").split("/")))
            if not ok and name is not None:
                dropped.append(name)
            return os.path.join(self.dirpath, name) if ok else None

        book = [(float(score), own(name)) for score, name in state.get("best_k", [])]
        self.best_k = [(score, path) for score, path in book if path is not None]
        self.last_model_path = own(state.get("last_model_path"), "last" + self._ext)
        self.step_model_path = own(state.get("step_model_path"), "step" + self._ext)
        if dropped:
            warnings.warn(f"ModelCheckpoint: the checkpoint's book names {len(dropped)} file(s) this callback does not "
                          f"name its files ({', '.join(map(repr, dropped[:3]))}); they are left out of its book and "
                          f"never deleted (it deletes only its own files in '{self.dirpath}')", UserWarning,
                          stacklevel=user_stacklevel())

    def _own_name(self, name: str) -> bool:
        """Whether ``name`` is one this callback gives its files (folders when ``sharded``) in ``dirpath``."""
        return name in ("last" + self._ext, "step" + self._ext) or \
            _name_pattern(self.filename, self.monitor, self._ext).fullmatch(name) is not None

    def _is_own_checkpoint(self, path: str) -> bool:
        """A complete checkpoint of this callback's kind at ``path``: a regular file, or, when ``sharded``, a real
        folder (not a link) holding its manifest."""
        if self._ext != ".ckpt":
            return os.path.isfile(path)
        return os.path.isdir(path) and not os.path.islink(path) and os.path.isfile(os.path.join(path, MANIFEST))

    def checkpoint_files(self) -> list[str]:
        """The regular files in ``dirpath`` named as this callback names its files (``filename``'s form,
        ``last.safetensors``, ``step.safetensors``): what ``fit(resume="auto")`` chooses from. Another file there
        (pretrained weights, a broken link) is never one of them. With ``sharded=True``: its complete folders
        (``<name>.ckpt`` holding the manifest), and a complete folder of its own name that a save left hidden
        (``.<name>.ckpt.<run>.partial``: killed after its manifest, before the move into place)."""
        try:
            names = os.listdir(self.dirpath)
        except OSError:
            return []
        hidden = re.compile(r"\.(.+)\.[0-9a-f]{16}\.partial") if self._ext == ".ckpt" else None
        out = []
        for n in sorted(names):
            m = hidden.fullmatch(n) if hidden is not None else None
            if (self._own_name(n) or (m is not None and self._own_name(m.group(1)))) \
                    and self._is_own_checkpoint(os.path.join(self.dirpath, n)):
                out.append(os.path.join(self.dirpath, n))
        return out

    def _remove(self, path: str) -> None:
        """Delete ``path`` only when it is this callback's own: in ``dirpath``, named as it names its files, of its
        kind (a file; a real folder when ``sharded``, removed whole). Anything else is left alone."""
        folder, name = os.path.split(path)
        if os.path.abspath(folder) != os.path.abspath(self.dirpath) or not self._own_name(name):
            return
        if self._ext == ".ckpt":
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
        elif os.path.isfile(path):
            os.remove(path)

    @property
    def best_model_path(self) -> str | None:
        """The path of the best checkpoint kept so far (Lightning's name); ``None`` before the first."""
        return self.best_k[0][1] if self.best_k else None

    @property
    def best_model_score(self) -> float | None:
        """The monitored value of the best checkpoint kept so far; ``None`` before the first."""
        return self.best_k[0][0] if self.best_k else None

    def on_epoch_end(self, trainer: Any, epoch: int, logs: dict) -> None:
        # Every rank of a distributed run keeps the same book (the logs are global); rank 0
        # alone touches files (trainer.save writes on rank 0 only).
        main = _dist.is_main()
        if main:
            os.makedirs(self.dirpath, exist_ok=True)
        score = _monitored(logs, self.monitor, "ModelCheckpoint")
        if not _finite_everywhere(trainer):
            warnings.warn(f"ModelCheckpoint: epoch {epoch + 1}'s state holds non-finite values; not saved "
                          "(the last good checkpoint is kept)", stacklevel=user_stacklevel())
            return
        if self.save_top_k != 0 and not math.isnan(score):
            worst = self.best_k[-1][0] if self.best_k else None
            full = self.save_top_k != -1 and len(self.best_k) >= self.save_top_k
            if not full or _improves(score, worst, self.mode):
                name = self.filename.format(**{**logs, "epoch": epoch + 1, "monitor": self.monitor, "score": score}) + self._ext
                path = os.path.join(self.dirpath, name)
                # the book first, so the file records it as it stands after this epoch (a resume keeps it)
                book = sorted(self.best_k + [(score, path)], key=lambda sp: sp[0], reverse=self.mode == "max")
                keep = book if self.save_top_k == -1 else book[: self.save_top_k]
                drop, self.best_k = [p for _, p in book if (_, p) not in keep], keep
                trainer.save(path, **self._save_kw)
                kept = {p for _, p in keep}
                for stale in drop:
                    if main and stale not in kept:
                        self._remove(stale)
        if self.save_last:
            self.last_model_path = os.path.join(self.dirpath, "last" + self._ext)
            trainer.save(self.last_model_path, **self._save_kw)


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
        # Each fit is a fresh watch (Keras resets in on_train_begin too), but a resumed one goes on watching.
        if not getattr(self, "_restored", False):
            self.best, self.best_epoch, self.wait, self.stopped_epoch, self._best_state = None, None, 0, None, None
        self._restored = False

    def state_dict(self) -> dict[str, Any]:
        """The watch so far (the best state for ``restore_best`` is not kept: after a resume it is the best
        seen since)."""
        return {"settings": self._settings(), "best": self.best, "best_epoch": self.best_epoch, "wait": self.wait}

    def _settings(self) -> dict[str, Any]:
        return {"monitor": self.monitor, "mode": self.mode, "min_delta": float(self.min_delta)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the watch back when it was kept with this callback's ``monitor``, ``mode`` and ``min_delta``;
        otherwise the watch starts fresh, with a warning (``patience`` may change across a resume)."""
        if not _same_settings("EarlyStopping", self._settings(), state):
            return
        best = state.get("best")
        self.best = None if best is None else float(best)
        self.best_epoch, self.wait = state.get("best_epoch"), int(state.get("wait", 0))
        self._restored = True

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

    ``torch_scheduler`` is the torch scheduler :func:`from_torch_scheduler` made this callback
    of (``None`` otherwise): see there for the check it makes at ``on_fit_start``.
    """

    torch_scheduler: Any = None

    def __init__(self, schedule: Callable[[int], float], interval: str = "epoch"):
        if interval not in ("epoch", "step"):
            raise ValueError(f"interval must be 'epoch' or 'step', got {interval!r}")
        if not callable(schedule):
            raise TypeError("schedule must be callable: epoch or step -> learning rate")
        self.schedule, self.interval = schedule, interval

    def on_fit_start(self, trainer: Any) -> None:
        _check_torch_scheduler(self, trainer)

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


class ReduceLROnPlateau(Callback):
    """Multiply the learning rate by ``factor`` when ``monitor`` stops improving: torch's ``ReduceLROnPlateau``.

    The rule, arguments and defaults of ``torch.optim.lr_scheduler.ReduceLROnPlateau`` (Keras'
    ``ReduceLROnPlateau`` is ``threshold_mode="abs"`` with ``threshold=min_delta``). At the end
    of each epoch, the value ``logs[monitor]`` (torch: ``scheduler.step(val_loss)``):

    * improves on the best so far when it is below ``best * (1 - threshold)`` (``"rel"``) or
      ``best - threshold`` (``"abs"``) for ``mode="min"``, above ``best * (1 + threshold)`` or
      ``best + threshold`` for ``"max"``; a NaN never improves;
    * otherwise counts as a bad epoch, except during the ``cooldown`` epochs after a reduction;
    * after more than ``patience`` bad epochs in a row, the learning rate becomes
      ``max(lr * factor, min_lr)`` (left as it is when that changes it by ``eps`` or less),
      and the cooldown starts.

    The new value goes into the optimizer state with :func:`fnnet.optim.set_learning_rate`,
    so the optimizer must hold a constant learning rate (``fnnet.optim.adam(0.01)``, or
    ``fnnet.optim.from_torch(optimizer)``), not a schedule; this is checked at
    ``on_fit_start``. The next epoch trains with it (History's ``lr`` shows it).

    Attributes ``best``, ``num_bad_epochs`` and ``cooldown_counter`` are torch's. They are
    reset at every ``on_fit_start`` (as Keras does, and as :class:`EarlyStopping` does), where
    a torch scheduler object keeps its counters from one training loop to the next.

    ``torch_scheduler`` is the torch ``ReduceLROnPlateau`` :func:`from_torch_scheduler` made
    this callback of (``None`` otherwise): see there for the check it makes at ``on_fit_start``.
    """

    torch_scheduler: Any = None

    def __init__(self, monitor: str = "val_loss", factor: float = 0.1, patience: int = 10, min_lr: float = 0,
                 mode: str = "min", threshold: float = 1e-4, threshold_mode: str = "rel", cooldown: int = 0,
                 eps: float = 1e-8):
        _check_mode(mode)
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"ReduceLROnPlateau: threshold_mode must be 'rel' or 'abs', got {threshold_mode!r}")
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not 0 <= factor < 1:
            raise ValueError(f"ReduceLROnPlateau: factor must be a number in [0, 1), got {factor!r}")
        for name, value in (("patience", patience), ("cooldown", cooldown)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"ReduceLROnPlateau: {name} must be an int >= 0, got {value!r}")
        for name, value in (("min_lr", min_lr), ("threshold", threshold), ("eps", eps)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0 or math.isinf(value):
                raise ValueError(f"ReduceLROnPlateau: {name} must be a finite number >= 0, got {value!r}")
        self.monitor, self.factor, self.patience, self.min_lr = monitor, float(factor), patience, float(min_lr)
        self.mode, self.threshold, self.threshold_mode = mode, float(threshold), threshold_mode
        self.cooldown, self.eps = cooldown, float(eps)
        self._reset()

    def _reset(self) -> None:
        self.best = math.inf if self.mode == "min" else -math.inf
        self.num_bad_epochs = 0
        self.cooldown_counter = 0

    def state_dict(self) -> dict[str, Any]:
        """The plateau watch so far (the learning rate itself is in the optimizer state)."""
        return {"settings": self._settings(), "best": self.best, "num_bad_epochs": self.num_bad_epochs,
                "cooldown_counter": self.cooldown_counter}

    def _settings(self) -> dict[str, Any]:
        return {"monitor": self.monitor, "mode": self.mode, "threshold": self.threshold,
                "threshold_mode": self.threshold_mode}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the watch back when it was kept with this callback's ``monitor``, ``mode``, ``threshold`` and
        ``threshold_mode``; otherwise it starts fresh, with a warning."""
        if not _same_settings("ReduceLROnPlateau", self._settings(), state):
            return
        self.best = float(state["best"])
        self.num_bad_epochs, self.cooldown_counter = int(state["num_bad_epochs"]), int(state["cooldown_counter"])
        self._restored = True

    def _is_better(self, value: float) -> bool:
        if self.mode == "min":
            return value < (self.best * (1 - self.threshold) if self.threshold_mode == "rel" else self.best - self.threshold)
        return value > (self.best * (1 + self.threshold) if self.threshold_mode == "rel" else self.best + self.threshold)

    def on_fit_start(self, trainer: Any) -> None:
        from .optim import get_learning_rate, set_learning_rate

        if not getattr(self, "_restored", False):  # a resumed fit goes on watching
            self._reset()
        self._restored = False
        _check_torch_scheduler(self, trainer)
        lr = get_learning_rate(trainer.state.opt_state)
        if lr is None:
            raise ValueError("ReduceLROnPlateau: the optimizer state holds no learning rate; build the optimizer "
                             "with an alias such as fnnet.optim.adam(0.01) or with scale_by_learning_rate")
        try:
            set_learning_rate(trainer.state.opt_state, lr)  # a check only (the state is not kept): a schedule raises
        except ValueError as err:
            raise ValueError(f"ReduceLROnPlateau needs a constant learning rate in the optimizer state: {err}") from None

    def on_epoch_end(self, trainer: Any, epoch: int, logs: dict) -> None:
        value = _monitored(logs, self.monitor, "ReduceLROnPlateau")
        if self._is_better(value):
            self.best, self.num_bad_epochs = value, 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0  # bad epochs in cooldown do not count
        if self.num_bad_epochs > self.patience:
            self._reduce(trainer)
            self.cooldown_counter, self.num_bad_epochs = self.cooldown, 0

    def _reduce(self, trainer: Any) -> None:
        from .optim import get_learning_rate, set_learning_rate

        old = float(get_learning_rate(trainer.state.opt_state))
        new = max(old * self.factor, self.min_lr)
        if old - new > self.eps:
            trainer.state = trainer.state.replace(opt_state=set_learning_rate(trainer.state.opt_state, new))


class CSVLogger(Callback):
    """Append each epoch's logs as a row of a CSV file (the chapter's ``dfhistory``, on disk).

    In a distributed run only rank 0 writes (the logs are the same on every rank).
    """

    def __init__(self, path: str | os.PathLike, append: bool = False):
        self.path = os.fspath(path)
        self.append = append
        self._fields: list[str] | None = None

    @_dist.rank_zero_only
    def on_fit_start(self, trainer: Any) -> None:
        self._fields = None
        folder = os.path.dirname(self.path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        if os.path.exists(self.path):
            if not self.append:
                os.remove(self.path)
            else:
                with open(self.path, newline="") as f:
                    self._fields = next(csv.reader(f), None)

    @_dist.rank_zero_only
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


def _summary_writer() -> type:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ImportError("TensorBoardLogger needs the tensorboard package: pip install tensorboard "
                          "(or pip install fnnet[tensorboard])") from err
    return SummaryWriter


class TensorBoardLogger(Callback):
    """Write the epoch logs as TensorBoard scalars (Keras' ``TensorBoard``, Lightning's ``TensorBoardLogger``).

    Every key of each epoch's logs (``loss``, ``<metric>``, ``val_loss``, ``val_<metric>``,
    ``lr``, ``time``) becomes a scalar of that name, at the epoch number counted from 1 (as in
    ``History``); view them with ``tensorboard --logdir log_dir``. Each ``fit`` writes one event
    file through ``torch.utils.tensorboard.SummaryWriter`` (TensorBoard shows the files of one
    folder as one run) and closes it at ``on_fit_end``. In a ``torch.distributed`` run only
    rank 0 writes.

    Args:
        log_dir: the folder for the event files (created if missing).
        every_n_steps: also write the training loss of every ``n``-th step as ``loss_step``,
            at the step count (``trainer.state.step``). Reading a step's loss waits for the
            device, so this is one sync every ``n`` steps; ``None`` (default) writes epochs only.

    Raises:
        ImportError: tensorboard is not installed (the extra ``fnnet[tensorboard]``); checked
            when the logger is built, not in the middle of training.
    """

    def __init__(self, log_dir: str | os.PathLike, *, every_n_steps: int | None = None):
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int)
                                          or every_n_steps < 1):
            raise ValueError(f"TensorBoardLogger: every_n_steps must be a positive int or None, got {every_n_steps!r}")
        self._writer_class = _summary_writer()
        self.log_dir = os.fspath(log_dir)
        self.every_n_steps = every_n_steps
        self.writer: Any = None

    def _writer(self) -> Any:
        if self.writer is None:
            self.writer = self._writer_class(log_dir=self.log_dir)
        return self.writer

    # In a torch.distributed run every rank sees the same epoch logs: the writing rank writes them.
    @_dist.rank_zero_only
    def on_fit_start(self, trainer: Any) -> None:
        self._writer()

    @_dist.rank_zero_only
    def on_train_batch_end(self, trainer: Any, step: int, metrics: dict) -> None:
        if self.every_n_steps is not None and int(step) % self.every_n_steps == 0:
            self._writer().add_scalar("loss_step", float(metrics["loss"]), int(step))

    @_dist.rank_zero_only
    def on_epoch_end(self, trainer: Any, epoch: int, logs: dict) -> None:
        writer = self._writer()
        for key, value in logs.items():
            writer.add_scalar(key, float(value), epoch + 1)
        writer.flush()

    def on_fit_end(self, trainer: Any) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# -- torch.optim.lr_scheduler objects as callbacks -----------------------------------------------------


def is_torch_scheduler(obj: Any) -> bool:
    """Whether ``obj`` is a ``torch.optim.lr_scheduler`` object (an ``LRScheduler`` or ``ReduceLROnPlateau``)."""
    from torch.optim import lr_scheduler

    return isinstance(obj, (lr_scheduler.LRScheduler, lr_scheduler.ReduceLROnPlateau))


def _check_torch_scheduler(callback: Any, trainer: Any) -> None:
    """A callback made of a torch scheduler must be built on the torch optimizer the trainer's optimizer stands for."""
    scheduler = callback.torch_scheduler
    optimizer = getattr(trainer, "optimizer", None)
    if scheduler is None or optimizer is None:  # not from torch, or a trainer that does not show its optimizer
        return
    from .optim import torch_optimizers_of

    kind = type(scheduler).__name__
    sources = torch_optimizers_of(optimizer)
    if not sources:
        instead = ("fnnet.callbacks.ReduceLROnPlateau(...)" if isinstance(callback, ReduceLROnPlateau)
                   else "LearningRateSchedule(fnnet.optim.schedule_from_torch(scheduler))")
        raise ValueError(
            f"{kind} in callbacks=: the Trainer's optimizer was not converted from a torch optimizer (it is an fnnet "
            f"optimizer such as fnnet.optim.adam(...)), so the torch optimizer the {kind} was built on is not the "
            "Trainer's. Pass that torch optimizer to the Trainer (it converts it), or say what you mean explicitly: "
            f"{instead}"
        )
    if not any(scheduler.optimizer is s for s in sources):
        raise ValueError(
            f"{kind} in callbacks= was built on another torch optimizer than the one the Trainer's optimizer was "
            f"converted from (a torch.optim.{type(scheduler.optimizer).__name__}, where the Trainer's is a "
            f"torch.optim.{type(sources[0]).__name__}); build it on that one: "
            f"torch.optim.lr_scheduler.{kind}(optimizer, ...)"
        )


def from_torch_scheduler(scheduler: Any, *, monitor: str = "val_loss", interval: str | None = None) -> Callback:
    """The fnnet callback that does what a ``torch.optim.lr_scheduler`` object does in Lightning.

    * ``ReduceLROnPlateau`` -> :class:`ReduceLROnPlateau` with its arguments, watching
      ``monitor`` (Lightning's ``"monitor"`` key of the scheduler config).
    * ``StepLR``, ``ExponentialLR``, ``MultiStepLR``, ``CosineAnnealingLR``, ``LambdaLR``, and
      the ``SequentialLR`` and ``ChainedScheduler`` that schedule converts ->
      :class:`LearningRateSchedule` of :func:`fnnet.optim.schedule_from_torch`, stepped once
      per epoch: epoch ``e`` trains with the learning rate torch has after ``e`` calls of
      ``scheduler.step()`` (the chapter's loop and Lightning's default ``interval="epoch"``).
    * ``OneCycleLR`` -> the same, stepped before every update (torch steps it after every one).

    ``interval`` (``"epoch"`` or ``"step"``) overrides that choice, as Lightning's
    ``"interval"`` key does. The scheduler is read once and never stepped; learning rates go
    into the optimizer state with :func:`fnnet.optim.set_learning_rate`, so the trainer's
    optimizer must hold a constant learning rate: ``fnnet.optim.from_torch(optimizer)``
    without ``scheduler=`` (the scheduler's optimizer). Epochs are the trainer's own count
    (``trainer.epoch``), so a trainer resumed from a checkpoint continues the schedule.

    This is what :class:`CallbackList` (hence ``Trainer.fit(callbacks=[...])``) does with a
    torch scheduler it is given. At ``on_fit_start`` the callback checks that ``scheduler`` was
    built on the torch optimizer the trainer's optimizer was converted from
    (:func:`fnnet.optim.torch_optimizers_of`), as ``fnnet.optim.from_torch(..., scheduler=)``
    does: a scheduler of another optimizer would set learning rates from that one's.

    Raises:
        TypeError: not a torch scheduler, or one with no conversion (see
            :func:`fnnet.optim.schedule_from_torch`).
        ValueError: from :func:`fnnet.optim.schedule_from_torch`; a ``ReduceLROnPlateau`` with
            different ``min_lr`` per param group; a bad ``interval``. At ``on_fit_start``: the
            trainer's optimizer was not converted from ``scheduler.optimizer`` (another torch
            optimizer, or an fnnet one).
    """
    from torch.optim import lr_scheduler

    if interval not in (None, "epoch", "step"):
        raise ValueError(f"from_torch_scheduler: interval must be None, 'epoch' or 'step', got {interval!r}")
    if isinstance(scheduler, lr_scheduler.ReduceLROnPlateau):
        if len(set(scheduler.min_lrs)) > 1:
            raise ValueError(f"from_torch_scheduler: the ReduceLROnPlateau has a different min_lr per param group "
                             f"({scheduler.min_lrs}); an fnnet optimizer has one learning rate: pass one min_lr")
        callback: Callback = ReduceLROnPlateau(
            monitor, factor=scheduler.factor, patience=scheduler.patience,
            min_lr=scheduler.min_lrs[0] if scheduler.min_lrs else 0, mode=scheduler.mode, threshold=scheduler.threshold,
            threshold_mode=scheduler.threshold_mode, cooldown=scheduler.cooldown, eps=scheduler.eps)
        callback.torch_scheduler = scheduler
        return callback
    if not is_torch_scheduler(scheduler):
        raise TypeError(f"from_torch_scheduler: expected a torch.optim.lr_scheduler object, got {type(scheduler).__name__}")
    from .optim import schedule_from_torch

    schedule = schedule_from_torch(scheduler)  # counted in scheduler.step() calls
    if interval is None:
        interval = "step" if isinstance(scheduler, lr_scheduler.OneCycleLR) else "epoch"
    callback = LearningRateSchedule(schedule, interval)
    callback.torch_scheduler = scheduler
    return callback
