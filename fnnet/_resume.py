"""Where a run stands, and how the Trainer comes back to it: the position a checkpoint records, the
checkpoint ``fit(resume="auto")`` takes, and the rest of an epoch from a given batch on.

A checkpoint of the Trainer is ``{"state", "epoch", "position"}``; ``position`` holds the batches
done in the current epoch, the world size, the loader's global batch and the callbacks' own
state (JSON). fnnet's epoch order is a pure function of the loader's key and the epoch, and a
global batch (``ArrayLoader(..., global_batch=True)``) covers the same samples on any number of
ranks, so "the next batch of the same epoch" is the same samples after a restart, on the same
number of processes or another.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Iterable, Iterator

from ._warnings import user_stacklevel
from .checkpoint.sharded import MANIFEST
from .data import ArrayLoader, num_batches

__all__ = ["position", "samples_of", "check_world", "global_batch_of", "callback_states", "restore_callbacks", "find_latest", "rest_of_epoch",
           "load_checkpoint", "resume_fit"]


def global_batch_of(loader: Any) -> int:
    """The samples one step covers over all ranks (an ArrayLoader's), or -1 where the loader does not say."""
    return loader.global_batch_size() if isinstance(loader, ArrayLoader) else -1


def samples_of(loader: Any) -> int:
    """The samples an epoch of ``loader`` draws from (an ArrayLoader's, a DataLoader's dataset's), or -1 where the
    loader does not say: a resume checks it, since another dataset length gives other batches."""
    if isinstance(loader, ArrayLoader):
        return loader.num_samples
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return -1


def position(batch: int, world_size: int, global_batch: int, callbacks: Iterable[Any],
             samples: int = -1) -> dict[str, Any]:
    return {"batch": int(batch), "world_size": int(world_size), "global_batch": int(global_batch),
            "callbacks": callback_states(callbacks), "samples": int(samples)}


def callback_states(callbacks: Iterable[Any]) -> str:
    """The state of every callback that has ``state_dict()`` (JSON, keyed by position and class)."""
    out = {}
    for i, cb in enumerate(callbacks):
        if callable(getattr(cb, "state_dict", None)):
            out[f"{i}:{type(cb).__name__}"] = cb.state_dict()
    return json.dumps(out)


def restore_callbacks(callbacks: Iterable[Any], text: str, source: Any = "the checkpoint") -> None:
    """Give each callback its saved state back (the same callbacks, in the same order, as when saved); each
    callback decides whether the book it is given fits its settings. ``source`` (the file) names errors.

    Raises:
        ValueError: the books are not the JSON fnnet writes (a damaged or crafted ``position.callbacks``),
            naming ``source`` and the callback.
    """
    try:
        saved = json.loads(text) if text else {}
    except ValueError as err:
        raise ValueError(f"'{source}': the callbacks' books (position.callbacks) are not valid JSON ({err}); the file "
                         "is damaged or was not written by fnnet. Resume from another checkpoint, or load its state "
                         "alone with trainer.load") from None
    if not isinstance(saved, dict):
        raise ValueError(f"'{source}': the callbacks' books (position.callbacks) are a JSON {type(saved).__name__}, "
                         "not the object fnnet writes; the file is damaged or crafted")
    for i, cb in enumerate(callbacks):
        name = f"{i}:{type(cb).__name__}"
        if name in saved and callable(getattr(cb, "load_state_dict", None)):
            try:
                cb.load_state_dict(saved[name])
            except (TypeError, ValueError, KeyError, AttributeError, IndexError) as err:
                raise ValueError(f"'{source}': the book of callback {name} is malformed ({type(err).__name__}: {err}); "
                                 "the file is damaged or crafted. Resume from another checkpoint") from None


def find_latest(callbacks: Iterable[Any]) -> str | None:
    """The newest checkpoint among the files the ``ModelCheckpoint`` callbacks of ``fit`` name as theirs in their
    folders (:meth:`~fnnet.callbacks.ModelCheckpoint.checkpoint_files`: writes are atomic, so every such file is
    complete; other files there, pretrained weights or broken links, are never taken), or ``None`` when there is
    none yet. A sharded checkpoint (a folder) counts as written when its manifest was (written last)."""
    owners = [cb for cb in callbacks if callable(getattr(cb, "checkpoint_files", None))]
    if not owners:
        raise ValueError("fit(resume='auto') looks for checkpoints in the folder of a ModelCheckpoint callback; "
                         "pass one in callbacks=, or resume=<path of a checkpoint>")
    dated = []
    for path in (f for cb in owners for f in cb.checkpoint_files()):
        try:
            dated.append((os.path.getmtime(os.path.join(path, MANIFEST) if os.path.isdir(path) else path), path))
        except OSError:  # removed meanwhile
            continue
    return max(dated)[1] if dated else None


def _batches_on(loader: ArrayLoader, world: int) -> int:
    """How many batches an epoch of a ``global_batch`` loader has on ``world`` ranks (``ArrayLoader.__len__``'s rule:
    a last global batch smaller than the world joins the one before it)."""
    n, b = loader.num_samples, loader.batch_size
    if loader.drop_last:
        return n // b
    count = -(-n // b)
    return count - 1 if world > 1 and count > 1 and n - (count - 1) * b < world else count


def check_world(loader: Any, saved: dict[str, Any] | None, path: Any) -> None:
    """Refuse to resume a ``global_batch`` run on a number of ranks where an epoch has another number of batches
    than on the ranks that wrote the checkpoint: the rest of training would be another run's.

    Raises:
        ValueError: naming the file, both worlds, both batch counts and what would resume exactly.
    """
    if not (isinstance(loader, ArrayLoader) and loader.global_batch and saved):
        return
    then, now = int(saved.get("world_size", 0)), loader.shard[1] if loader.shard else 1
    if then < 1 or then == now or _batches_on(loader, then) == _batches_on(loader, now):
        return
    last = loader.num_samples - (-(-loader.num_samples // loader.batch_size) - 1) * loader.batch_size
    raise ValueError(
        f"'{path}' was written by {then} rank(s), where an epoch of this loader has {_batches_on(loader, then)} batches; "
        f"on {now} ranks it has {_batches_on(loader, now)}: its last global batch ({last} samples) "
        f"{'is smaller than' if last < now else 'covers'} the {now} ranks, and a last global batch smaller than the "
        "ranks joins the batch before it (no rank can take an empty part). Resuming would run other steps than the "
        f"uninterrupted run. Resume on {then} ranks (any number of ranks {'<=' if then <= last else '>'} {last} "
        "gives the same batches), or start a run whose "
        "loader drops the short batch (ArrayLoader(..., drop_last=True)) or whose batch_size divides the samples")


class _Rest:
    """The batches of ``epoch`` from batch ``start`` on, with a length (the Trainer counts on it)."""

    def __init__(self, loader: Any, epoch: int, start: int):
        self.loader, self.epoch, self.start = loader, epoch, start
        total = num_batches(loader)
        self.total = None if total is None else total - start

    def __len__(self) -> int:
        if self.total is None:
            raise TypeError("this loader has no len()")
        return self.total

    def __iter__(self) -> Iterator[Any]:
        if isinstance(self.loader, ArrayLoader):
            yield from self.loader.batches(self.epoch, start=self.start)
            return
        for i, batch in enumerate(self.loader):  # replays the first batches unused: the loader's order is
            if i >= self.start:                   # its own (set_epoch was called), so these are the ones done
                yield batch


def rest_of_epoch(loader: Any, epoch: int, start: int, saved_global_batch: int) -> Any:
    """``loader``'s batches of ``epoch`` from ``start`` on (the loader itself when ``start`` is 0;
    ``None`` when ``start`` is past its last batch: the epoch's steps are done, its end was not:
    the Trainer goes on with the next epoch, without that epoch's validation and logs).

    Raises:
        ValueError: the loader's global batch is not the one the checkpoint was written with,
            so batch ``start`` would not be the same samples.
    """
    if start == 0:
        return loader
    now = global_batch_of(loader)
    if saved_global_batch > 0 and now > 0 and now != saved_global_batch:
        raise ValueError(f"the checkpoint stopped after batch {start} of epoch {epoch + 1} with a global batch of "
                         f"{saved_global_batch} samples; this loader's global batch is {now}, so its batch {start} "
                         "holds other samples. Resume with the same global batch (ArrayLoader(..., "
                         "global_batch=True) keeps it whatever the number of ranks)")
    total = num_batches(loader)
    if total is not None and start >= total:
        return None
    if not isinstance(loader, ArrayLoader):
        warnings.warn(f"resuming inside epoch {epoch + 1}: the loader is no fnnet.ArrayLoader, so its first {start} "
                      "batches are drawn again and skipped; this is the same data only if its order depends on the "
                      "epoch alone (DistributedSampler.set_epoch, a seeded sampler)", UserWarning,
                      stacklevel=user_stacklevel())
    return _Rest(loader, epoch, start)


def load_checkpoint(path: Any, like: dict[str, Any], device: Any) -> tuple[Any, int | None, dict | None]:
    """``(state, epoch, position)`` from a Trainer checkpoint, validated against ``like`` (what
    ``Trainer.checkpoint()`` gives now). A position without ``samples`` (fnnet 0.3) loads as it is; a file of an
    older fnnet (``{"state", "epoch"}``, no position) resumes at the start of the next epoch, with a warning; a
    bare ``TrainState`` file gives ``epoch=None``.

    Raises:
        ValueError: the file does not match ``like`` (every mismatch named), or it was saved inside a
            gradient-accumulation window (``state.accum`` holds a partial window), which is said so.
    """
    from .checkpoint import load

    older = {k: v for k, v in like["position"].items() if k != "samples"}
    forms = (like, {**like, "position": older}, {"state": like["state"], "epoch": like["epoch"]}, like["state"])
    first_error = None
    for i, form in enumerate(forms):
        try:
            saved = load(path, like=form, device=device)
        except ValueError as err:
            first_error = first_error or err
            continue
        if i == 3:
            return saved, None, None
        if i == 2:
            warnings.warn(f"'{path}' was written by an older fnnet, without the position inside its epoch: training "
                          f"resumes at the start of epoch {int(saved['epoch']) + 1}", UserWarning,
                          stacklevel=user_stacklevel())
        return saved["state"], int(saved["epoch"]), saved.get("position")
    if "state.accum" in str(first_error) and like["state"].accum is None:
        raise ValueError(
            f"'{path}' was saved inside a gradient-accumulation window (trainer.save between the batches of a window: "
            "Ctrl-C or a callback with accumulate_grad_batches > 1): it holds that window's partial gradients "
            "(state.accum), which a Trainer does not resume into. Resume from a checkpoint written after an update "
            "(ModelCheckpoint(every_n_steps=...) or at an epoch's end); its parameters alone load with "
            f"fnnet.load('{path}')['state'].params") from None
    raise first_error  # type: ignore[misc]


def _check_resume(path: Any, trainer: Any, loader: Any, epochs: int) -> None:
    """Refuse a resume that would not continue the saved run: fewer epochs than done, another dataset length."""
    done, saved = trainer.epoch, trainer.loaded_position or {}
    if epochs < done:
        raise ValueError(f"fit(epochs={epochs}, resume=...): '{path}' has already completed {done} epochs; with resume=, "
                         f"epochs is the total to reach (Lightning's max_epochs), not a count of more: pass epochs >= "
                         f"{done} (epochs={done + epochs} for {epochs} more)")
    then, now = int(saved.get("samples", -1)), samples_of(loader)
    if then > 0 and now > 0 and then != now:
        where = f"after batch {saved.get('batch', 0)} of epoch {done + 1}"
        if saved.get("batch", 0):
            raise ValueError(f"'{path}' stopped {where} of a dataset of {then} samples; train_data has {now}, so its "
                             "batches are other samples and resuming would not continue that run. Resume with the same "
                             "data, or load the state alone (trainer.load) and start a new epoch")
        warnings.warn(f"resuming '{path}' with train_data of {now} samples where the saved run had {then}: the epochs "
                      "from here are not those of the saved run", UserWarning, stacklevel=user_stacklevel())


def resume_fit(trainer: Any, resume: Any, callbacks: list[Any], epochs: int, loader: Any = None,
               verbose: int = 0) -> int:
    """Load ``resume`` (a path, or ``"auto"``: the newest checkpoint of the ``ModelCheckpoint`` folders,
    none on a first run) into ``trainer`` with its callbacks' state; returns the epochs left of ``epochs``
    (the total). With ``verbose``, says which file, epoch and batch it continues from, or that nothing is left.

    Raises:
        TypeError: ``resume`` is neither a path nor ``"auto"`` (``resume=True`` included).
        ValueError: see :func:`check_world`, :func:`load_checkpoint`; ``epochs`` below the epochs the file
            has done; a changed dataset length in the middle of an epoch.
    """
    if isinstance(resume, bool) or not isinstance(resume, (str, os.PathLike)):
        raise TypeError(f"fit(resume=...) takes the path of a checkpoint or 'auto' (the newest checkpoint of the "
                        f"ModelCheckpoint callbacks' folders), got {resume!r}"
                        + (": for 'resume if there is a checkpoint', pass resume='auto'" if resume is True else ""))
    path = find_latest(callbacks) if resume == "auto" else resume
    if path is None:
        if verbose:
            print("fnnet.Trainer: resume='auto' found no checkpoint of this run's ModelCheckpoint; starting afresh")
        return epochs
    trainer.load(path)
    check_world(loader, trainer.loaded_position, path)
    _check_resume(path, trainer, loader, epochs)
    restore_callbacks(callbacks, (trainer.loaded_position or {}).get("callbacks", ""), path)
    if verbose:
        batch, total = (trainer.loaded_position or {}).get("batch", 0), num_batches(loader) if loader is not None else None
        where = (f"epoch {trainer.epoch + 1} after batch {batch}" + (f" of {total}" if total else "") if batch
                 else f"the start of epoch {trainer.epoch + 1}")
        done = trainer.epoch + (1 if batch and total and batch >= total else 0)  # an epoch's steps all done
        print(f"fnnet.Trainer: resuming from '{path}' (step {trainer.state.step}): " + (
            f"{done} of {epochs} epochs done, nothing to do" if done == epochs and (not batch or done > trainer.epoch)
            else f"continuing at {where}, until epoch {epochs}"))
    return epochs - trainer.epoch
