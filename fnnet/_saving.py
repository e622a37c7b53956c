"""The Trainer's sharded and asynchronous checkpoints: what each rank writes of the Trainer's
checkpoint, the save in flight, and the load of a sharded folder into the Trainer's own layout.

A sharded Trainer checkpoint is :func:`fnnet.checkpoint.sharded.save_sharded` of
``{"state": this rank's state, "epoch", "position"}``, the state in the step's layout
(:meth:`fnnet.step.TrainStep.local_parts`: ZeRO-2's optimizer state, ZeRO-3's parameters and optimizer
state as this rank's ranges; whatever the strategy, through that one method), so nothing is gathered;
it loads into any strategy and world size, each rank reading its own ranges.
An asynchronous save (whole or sharded) keeps one :class:`~fnnet.checkpoint.sharded.SaveHandle` on
the Trainer: the next save, :meth:`Trainer.load` and the end of ``fit`` wait for it and raise its
error.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import torch

from . import distributed as _dist
from . import tree as _tree
from .checkpoint.sharded import SaveHandle, load_sharded, save_sharded
from .state import host_finite, nonfinite_paths

__all__ = ["save_trainer", "wait_pending", "load_sharded_trainer", "check_finite"]


def wait_pending(trainer: Any) -> None:
    """Wait for the trainer's save in flight, if any; raise its background error."""
    handle = getattr(trainer, "_pending_save", None)
    trainer._pending_save = None
    if handle is not None:
        handle.wait()


def local_checkpoint(trainer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """This rank's part of :meth:`Trainer.checkpoint` (nothing gathered) and its parts' ranges."""
    state, parts = trainer.train_step.local_parts(trainer.state)
    tree = {**trainer.checkpoint(gather=False), "state": state}
    return tree, {"state." + p: r for p, r in parts.items()}


def save_trainer(trainer: Any, path: Any, *, sharded: bool, async_save: bool) -> SaveHandle:
    """:meth:`Trainer.save` with ``sharded`` or ``async_save`` (every rank calls it)."""
    wait_pending(trainer)
    if sharded:
        tree, parts = local_checkpoint(trainer)
        check_finite(tree["state"], path)
        handle = save_sharded(path, tree, parts=parts, async_save=async_save)
    else:
        handle = _save_whole_async(trainer, path)
    trainer._pending_save = handle if async_save else None
    return handle


def check_finite(state: Any, path: Any) -> None:
    """Refuse (``ValueError`` on every rank, nothing written) a state that holds non-finite values on any rank:
    each rank checks its own parts and one all-reduce of a flag decides (nothing gathered); only when a rank
    found some are the key paths gathered, to name them with their ranks."""
    import torch.distributed as dist

    bad = torch.tensor([0 if host_finite(state) else 1], dtype=torch.int32, device=_dist.device())
    if not int(_dist.all_reduce_max(bad)[0]):
        return
    everyone = [nonfinite_paths(state)]
    if _dist.is_initialized() and _dist.world_size() > 1:
        everyone = [None] * _dist.world_size()
        dist.all_gather_object(everyone, nonfinite_paths(state))
    where = "; ".join(f"rank {r}: {paths}" for r, paths in enumerate(everyone) if paths)
    raise ValueError(f"Trainer.save(sharded=True): the state holds non-finite values at {where}; not written to "
                     f"'{os.fspath(path)}' (a checkpoint is always a state training can resume from)")


def _save_whole_async(trainer: Any, path: Any) -> SaveHandle:
    """Today's gather-to-rank-0 file, written by a background thread on rank 0 from a host copy."""
    from .checkpoint import save

    checkpoint = trainer.checkpoint()
    if not host_finite(checkpoint["state"]):
        raise ValueError(f"Trainer.save: the state holds non-finite values at {nonfinite_paths(checkpoint['state'])}"
                         f"; not written to '{path}'")
    handle = SaveHandle(os.fspath(path))
    if not _dist.is_main():
        return handle
    copy = _tree.map(lambda x: x.detach().to("cpu", copy=True) if isinstance(x, torch.Tensor) else x, checkpoint)

    def background() -> None:
        try:
            save(path, copy)
        except BaseException as exc:  # noqa: BLE001 - raised by wait()
            handle.error = exc

    handle._thread = threading.Thread(target=background, name="fnnet-save", daemon=True)
    handle._thread.start()
    return handle


def load_sharded_trainer(trainer: Any, path: Any) -> tuple[Any, int, dict | None]:
    """``(state, epoch, position)`` from a sharded folder, the state in this rank's layout."""
    like, parts = local_checkpoint(trainer)
    saved = load_sharded(path, like=like, parts=parts, device=trainer.device)
    return saved["state"], int(saved["epoch"]), saved.get("position")
