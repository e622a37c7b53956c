"""What the Trainer's loop needs around the step and is no part of training: a progress bar, a deferred
Ctrl-C, and errors that say where they happened (the epoch, the batch, its shapes) and how to fix them."""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch

from . import distributed as _dist
from . import metrics as _metrics
from . import tree as _tree
from .batch import batch_size_of, is_array, split_batch

__all__ = ["together", "EpochMetrics", "Throughput", "check_step_options", "check_fit_options", "check_reiterable", "check_same_batch_count", "input_batches",
           "report_nonfinite", "learning_rate", "epoch_line", "banner", "with_context", "Bar", "deferred_interrupt"]


_STALLED = ("timed out", "timeout", "connection reset", "connection closed", "broken pipe")


@contextlib.contextmanager
def together(what: str, distributed: bool) -> Iterator[None]:
    """Run ``what`` (a Trainer call that holds collectives: a sharded save, an evaluation) and turn a collective
    that timed out, or a peer that went away, into an error naming this rank and what every rank must do."""
    try:
        yield
    except RuntimeError as err:
        text = str(err).lower()
        if not distributed or not any(s in text for s in _STALLED):
            raise
        why = ("a peer rank exited (its connection closed)" if "timeout" not in text and "timed out" not in text
               else "the other ranks did not join it within the process group's timeout")
        raise RuntimeError(
            f"fnnet.Trainer: rank {_dist.rank()} of {_dist.world_size()} stopped in {what}: {why}. {what} holds "
            "collectives, so every rank must call it at the same point (a callback that saves or evaluates on rank "
            "0 alone waits for the others until the timeout); let every rank call it, and only the writing rank "
            "writes. A rank that exited: see its own error above") from err


class EpochMetrics:
    """The streaming metric states of one pass (an epoch, an evaluation): the loss weighted by
    samples and the user's metrics, exact over the pass (:mod:`fnnet.metrics`).

    Under ``torch.distributed`` the states hold sums, so :meth:`logs` adds every rank's (one
    all-reduce) for the exact global values; ``all_ranks=False`` reads this rank's alone, for the
    progress bar, and labels those values ``(rank 0)`` so they are never taken for the epoch's.
    """

    def __init__(self, metrics: Mapping[str, Any] | None, device: torch.device, distributed: bool):
        if metrics is not None and not isinstance(metrics, Mapping):
            raise TypeError(f"metrics must be a dict of name -> metric, e.g. {{'accuracy': fnnet.metrics.accuracy}}, "
                            f"got a {type(metrics).__name__}")
        self.metrics = {name: _metrics.as_metric(m) for name, m in (metrics or {}).items()}
        for name in self.metrics:
            if name == "loss" or name.startswith("val_"):
                raise ValueError(f"metric name {name!r} is reserved (loss and val_* are the Trainer's own)")
        # torchmetrics objects sync across ranks in compute(): the progress bar (rank 0) shows the others
        self.bar_names = [name for name, m in (metrics or {}).items() if not _metrics.is_torchmetrics(m)]
        self.device, self.distributed = device, distributed

    def init(self) -> dict[str, Any]:
        return {"loss": _metrics.mean_metric().init(self.device), **{n: m.init(self.device) for n, m in self.metrics.items()}}

    def update(self, states: dict[str, Any], out: Mapping[str, Any]) -> dict[str, Any]:
        outputs, targets = out.get("outputs"), out.get("targets")
        loss = out.get("batch_loss", out["loss"])  # accumulating steps: the micro-batch's own loss
        new = {"loss": _metrics.mean_metric().update(states["loss"], loss, _metrics.batch_size(outputs, targets))}
        for name, m in self.metrics.items():
            new[name] = m.update(states[name], outputs, targets)
        return new

    def logs(self, states: Mapping[str, Any], prefix: str = "", *, all_ranks: bool = True) -> dict[str, float]:
        if self.distributed and all_ranks:  # states hold sums: adding every rank's gives the exact global values
            states = _dist.all_reduce_sum(states)
        label = " (rank 0)" if self.distributed and not all_ranks else ""
        logs = {f"{prefix}loss{label}": float(_metrics.mean_metric().compute(states["loss"]))}
        for name, m in self.metrics.items():
            if all_ranks or name in self.bar_names:
                logs[f"{prefix}{name}{label}"] = float(m.compute(states[name]))
        return logs


class Throughput:
    """Samples, and tokens for sequence batches, per second of training time (what the bar and the history show).

    A batch's samples are :func:`fnnet.batch.batch_size_of`; its tokens are the elements of its
    targets when they have two or more dimensions (``(B, T)`` next-token targets: ``B * T``),
    otherwise it counts no tokens. Only shapes are read (no device sync); the clock runs while
    :meth:`resume` d and stops at :meth:`pause` (validation is not training time). Read a rate
    right after a sync with the device (a loss read), or it measures the launches, not the work.
    """

    def __init__(self) -> None:
        self.samples = self.tokens = 0
        self.seconds, self._since = 0.0, None

    def resume(self) -> None:
        self._since = time.perf_counter()

    def pause(self) -> None:
        if self._since is not None:
            self.seconds += time.perf_counter() - self._since
            self._since = None

    def count(self, batch: Any) -> None:
        try:
            _, targets = split_batch(batch)
        except ValueError:  # a batch of another form: its samples only
            targets = None
        self.samples += batch_size_of(batch)
        if isinstance(targets, torch.Tensor) and targets.ndim >= 2:
            self.tokens += targets.numel()

    def snapshot(self) -> tuple[int, int, float]:
        """``(samples, tokens, seconds)`` so far, for :meth:`rates` over a later stretch."""
        running = time.perf_counter() - self._since if self._since is not None else 0.0
        return self.samples, self.tokens, self.seconds + running

    def rates(self, since: tuple[int, int, float] = (0, 0, 0.0)) -> dict[str, float]:
        """``{"samples_per_sec"}``, and ``"tokens_per_sec"`` when sequence batches were counted, since ``since``."""
        samples, tokens, seconds = (now - then for now, then in zip(self.snapshot(), since))
        if seconds <= 0:
            return {}
        out = {"samples_per_sec": samples / seconds}
        if tokens:
            out["tokens_per_sec"] = tokens / seconds
        return out


def check_step_options(epochs: Any, max_steps: Any, val_check_interval: Any) -> int:
    """The epochs ``fit`` runs: ``epochs``, or without it one (no ``max_steps``) or as many as ``max_steps`` needs."""
    for name, value in (("max_steps", max_steps), ("val_check_interval", val_check_interval)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int (optimizer updates) or None, got {value!r}")
    if epochs is None:
        return 1 if max_steps is None else sys.maxsize  # max_steps ends it
    return epochs


def check_fit_options(epochs: Any, on_nonfinite: Any, log_every: Any) -> None:
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
        raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
    if on_nonfinite not in ("stop", "raise"):
        raise ValueError(f"on_nonfinite must be 'stop' or 'raise', got {on_nonfinite!r}")
    if log_every is not None and (not isinstance(log_every, int) or log_every < 1):
        raise ValueError(f"log_every must be a positive int or None, got {log_every!r}")


def check_reiterable(epochs: int, **loaders: Any) -> None:
    """A one-shot iterator cannot feed a second epoch: say so before the first."""
    for name, data in loaders.items():
        if data is not None and epochs > 1 and iter(data) is data:
            raise TypeError(f"{name} is a one-shot iterator ({type(data).__name__}), which cannot be iterated again "
                            f"for epoch 2; pass a list, an fnnet.ArrayLoader or a torch DataLoader")


def check_same_batch_count(count: int | None, epoch: int, distributed: bool, where: str | None = None) -> None:
    """Every rank of a distributed run must take the same number of steps in an epoch: one more step
    on one rank would wait for a collective the others never start. One small all-reduce checks it
    (``None``, a loader without a length, is checked as -1); nothing to check outside a run. ``where``: what
    is counted, for the message (default: ``epoch``'s batches)."""
    if not distributed:
        return
    n = -1 if count is None else int(count)
    t = torch.tensor([n, -n], dtype=torch.int64)
    dist_t = _dist.all_reduce_max(t)
    most, fewest = int(dist_t[0]), -int(dist_t[1])
    if most != fewest:
        raise ValueError(f"fnnet.Trainer: the ranks' loaders give different numbers of batches in "
                         f"{where or f'epoch {epoch + 1}'} "
                         f"(rank {_dist.rank()} has {n}; between {fewest} and {most} over the ranks; -1: no len()). "
                         "Every rank must take the same steps: shard one loader over the ranks "
                         "(fnnet.ArrayLoader(..., shard=fnnet.distributed.shard()) or a DistributedSampler with "
                         "drop_last=True)")


def input_batches(data: Any, batch_size: Any) -> Any:
    """``predict``'s data as batches: a tensor or NumPy array of inputs in batches of ``batch_size``;
    any other iterable of batches as it is. A tuple (not a list: a list of two batches is batches) of
    exactly two tensors or arrays of the same length is Keras' ``(X, y)`` given to the wrong method: a
    ``TypeError`` saying so."""
    if (isinstance(data, tuple) and len(data) == 2
            and all(is_array(a) and a.ndim > 0 for a in data)
            and len(data[0]) == len(data[1])):
        shapes = ", ".join(str(tuple(a.shape)) for a in data)
        raise TypeError(f"predict takes the inputs only, got a {type(data).__name__} of two arrays of the same length "
                        f"({shapes}), read as (X, y): call predict(X_test); evaluate((X_test, y_test)) computes the "
                        "loss and metrics against targets. (Two batches of inputs: pass a list, [x1, x2].)")
    if isinstance(data, np.ndarray):
        data = torch.as_tensor(data)
    if isinstance(data, torch.Tensor):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        return [(data[i:i + batch_size],) for i in range(0, len(data), batch_size)]
    return data


def report_nonfinite(epoch: int, skipped: int, step: int, on_nonfinite: str) -> None:
    """Say (or raise, with ``"raise"``) why training stops after a non-finite epoch."""
    what = (f"{skipped} update(s) with non-finite gradients were skipped" if skipped
            else "the training loss became non-finite")
    message = (f"fnnet.Trainer: {what} in epoch {epoch + 1}; stopping at step {step}. trainer.state holds finite "
               "parameters (non-finite updates are never applied) and the last good checkpoint is kept.")
    if on_nonfinite == "raise":
        raise FloatingPointError(message)
    print(message, file=sys.stderr)


def learning_rate(opt_state: Any) -> float:
    """The learning rate the optimizer state holds (``nan`` when it holds none), as the history logs it."""
    from .optim import get_learning_rate

    lr = get_learning_rate(opt_state)
    return float(lr) if lr is not None else math.nan


def epoch_line(epoch: int, i: int, epochs: int, logs: Mapping[str, float]) -> str:
    shown = "  ".join(f"{k}={v:.4g}" for k, v in logs.items() if k != "time")
    return f"Epoch {epoch + 1} ({i + 1}/{epochs})  {shown}  [{logs['time']:.1f}s]"


def banner(devices: list[torch.device], precision: str, jit: bool, strategy: Any = None, world: int = 1) -> str:
    """The line a Trainer prints before its first epoch: where it trains (every replica of a
    data-parallel run named), the precision, whether compiled; in a ``torch.distributed`` run
    (``world`` ranks), the strategy's name (``ZeRO``'s with its stage) and the number of ranks."""
    def name(d: torch.device) -> str:
        return str(d) + (f" ({torch.cuda.get_device_name(d)})" if d.type == "cuda" else "")

    where = name(devices[0]) if len(devices) == 1 else (
        f"{len(devices)} data-parallel replicas ({', '.join(name(d) for d in devices)})")
    line = f"fnnet.Trainer: training on {where}, precision {precision}, jit {'on' if jit else 'off'}"
    if strategy is not None and world > 1:
        label = getattr(strategy, "name", type(strategy).__name__)
        stage = getattr(strategy, "stage", None)
        line += f", strategy {label}{stage if label == 'zero' and stage else ''} over {world} ranks"
    return line


_SHOWN_LEAVES = 8  # an error names this many leaves of a batch at most: a message never embeds the data
_SHOWN_CHARS = 2000  # and quotes at most this much of torch's own message


def _describe_batch(batch: Any) -> str:
    leaves = _tree.leaves_with_path(batch)
    parts = [f"{p}: {str(x.dtype).removeprefix('torch.')}{list(x.shape)}" if isinstance(x, torch.Tensor)
             else f"{p}: {type(x).__name__}" for p, x in leaves[:_SHOWN_LEAVES]]
    if len(leaves) > _SHOWN_LEAVES:
        parts.append(f"... {len(leaves) - _SHOWN_LEAVES} more leaves (a batch is a few tensors: is this the data "
                     "itself where a loader of batches was expected?)")
    return ", ".join(parts)


_HINTS = (
    ("Expected more than 1 value per channel", "a BatchNorm layer got a batch of one sample in training; drop the "
     "last, smaller batch (ArrayLoader(..., drop_last=True) or DataLoader(..., drop_last=True)). With several devices "
     "or ranks a shard can be that one sample: a batch of 3 on 2 devices is split into shards of 2 and 1"),
    ("positional argument", "a Trainer loss is called as loss(outputs, targets), e.g. F.cross_entropy"),
    ("not implemented for 'Long'", "a floating-point op got int64 data: a Trainer loss is called as "
     "loss(outputs, targets) (check the order), and inputs must be floating point (x.float())"),
    ("out of bounds", "the targets must be class indices in [0, number of classes)"),
    ("expected scalar type Long", "class-index targets must be int64: pass y.long() (and a Trainer loss is called "
     "as loss(outputs, targets): check the order)"),
    ("Expected floating point type for target", "class-index targets must be int64: pass y.long() (and a Trainer "
     "loss is called as loss(outputs, targets): check the order)"),
    ("expected target dtype to be Long", "class-index targets must be int64: pass y.long() (and a Trainer loss is "
     "called as loss(outputs, targets): check the order)"),
    ("shapes cannot be multiplied", "the inputs' feature size does not match the model's first layer"),
    ("to match target batch_size", "the inputs and the targets hold different numbers of samples"),
)


def with_context(err: Exception, what: str, epoch: int | None, index: int, batch: Any) -> Exception:
    """``err`` (the same type) with fnnet's context: where (``epoch`` None: outside ``fit``, no epoch), the batch's
    shapes and dtypes, the fix."""
    text = str(err)
    hint = next((h for pattern, h in _HINTS if pattern in text), None)
    if len(text) > _SHOWN_CHARS:
        text = text[:_SHOWN_CHARS] + f" ... ({len(text) - _SHOWN_CHARS} more characters)"
    message = (f"{text}\n\nfnnet.Trainer: {what} failed{'' if epoch is None else f' in epoch {epoch + 1}'} at batch {index} "
               f"({_describe_batch(batch)})" + (f": {hint}" if hint else ""))
    try:
        return type(err)(message)
    except TypeError:  # an exception type with another constructor
        return RuntimeError(message)


class Bar:
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

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[Callable[[], bool]]:
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
