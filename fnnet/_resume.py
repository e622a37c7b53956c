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

import glob
import json
import os
import warnings
from typing import Any, Iterable, Iterator

from ._warnings import user_stacklevel
from .data import ArrayLoader, num_batches

__all__ = ["position", "global_batch_of", "callback_states", "restore_callbacks", "find_latest", "rest_of_epoch",
           "load_checkpoint", "resume_fit"]


def global_batch_of(loader: Any) -> int:
    """The samples one step covers over all ranks (an ArrayLoader's), or -1 where the loader does not say."""
    return loader._global_batch() if isinstance(loader, ArrayLoader) else -1


def position(batch: int, world_size: int, global_batch: int, callbacks: Iterable[Any]) -> dict[str, Any]:
    return {"batch": int(batch), "world_size": int(world_size), "global_batch": int(global_batch),
            "callbacks": callback_states(callbacks)}


def callback_states(callbacks: Iterable[Any]) -> str:
    """The state of every callback that has ``state_dict()`` (JSON, keyed by position and class)."""
    out = {}
    for i, cb in enumerate(callbacks):
        if callable(getattr(cb, "state_dict", None)):
            out[f"{i}:{type(cb).__name__}"] = cb.state_dict()
    return json.dumps(out)


def restore_callbacks(callbacks: Iterable[Any], text: str) -> None:
    """Give each callback its saved state back (the same callbacks, in the same order, as when saved)."""
    saved = json.loads(text) if text else {}
    for i, cb in enumerate(callbacks):
        name = f"{i}:{type(cb).__name__}"
        if name in saved and callable(getattr(cb, "load_state_dict", None)):
            cb.load_state_dict(saved[name])


def find_latest(callbacks: Iterable[Any]) -> str | None:
    """The newest checkpoint in the folders of ``fit``'s ``ModelCheckpoint`` callbacks (writes are atomic:
    every file there is complete), or ``None`` when there is none yet."""
    folders = [cb.dirpath for cb in callbacks if isinstance(getattr(cb, "dirpath", None), str)]
    if not folders:
        raise ValueError("fit(resume='auto') looks for checkpoints in the folder of a ModelCheckpoint callback; "
                         "pass one in callbacks=, or resume=<path of a checkpoint>")
    files = [f for folder in folders for f in glob.glob(os.path.join(glob.escape(folder), "*.safetensors"))]
    stamps = {f: os.path.getmtime(f) for f in files}
    stamps.update(complete_sharded(folders))
    return max(stamps, key=lambda f: stamps[f]) if stamps else None


def complete_sharded(folders: Iterable[str]) -> dict[str, float]:
    """The complete sharded checkpoints in ``folders`` (those with their manifest, written last: hidden ones
    left by a save interrupted between its last two renames included) and when each completed."""
    from .checkpoint.sharded import MANIFEST

    out = {}
    for folder in folders:
        for entry in os.listdir(folder) if os.path.isdir(folder) else ():
            manifest = os.path.join(folder, entry, MANIFEST)
            if os.path.isfile(manifest):
                out[os.path.join(folder, entry)] = os.path.getmtime(manifest)
    return out


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
    ``Trainer.checkpoint()`` gives now). A file of an older fnnet (``{"state", "epoch"}``, no
    position) resumes at the start of the next epoch, with a warning; a bare ``TrainState`` file
    gives ``epoch=None``."""
    from .checkpoint import load

    forms = (like, {"state": like["state"], "epoch": like["epoch"]}, like["state"])
    first_error = None
    for i, form in enumerate(forms):
        try:
            saved = load(path, like=form, device=device)
        except ValueError as err:
            first_error = first_error or err
            continue
        if i == 2:
            return saved, None, None
        if i == 1:
            warnings.warn(f"'{path}' was written by an older fnnet, without the position inside its epoch: training "
                          f"resumes at the start of epoch {int(saved['epoch']) + 1}", UserWarning,
                          stacklevel=user_stacklevel())
        return saved["state"], int(saved["epoch"]), saved.get("position")
    raise first_error  # type: ignore[misc]


def resume_fit(trainer: Any, resume: Any, callbacks: list[Any], epochs: int) -> int:
    """Load ``resume`` (a path, or ``"auto"``: the newest checkpoint of the ``ModelCheckpoint`` folders,
    none on a first run) into ``trainer`` with its callbacks' state; returns the epochs left of ``epochs``
    (the total)."""
    path = find_latest(callbacks) if resume == "auto" else resume
    if path is not None:
        trainer.load(path)
        restore_callbacks(callbacks, (trainer._position or {}).get("callbacks", ""))
    return max(0, epochs - trainer.epoch)
