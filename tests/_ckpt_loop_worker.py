"""Sharded checkpoints from your own loop (``make_train_step`` + ``fnnet.save(..., sharded=True)`` /
``fnnet.load(folder, like=, parts=)``), one rank; started by torch.distributed.run, or imported (W = 1):

    python -m torch.distributed.run --nproc-per-node W tests/_ckpt_loop_worker.py PHASE [PHASE ...]

A PHASE is ``STRATEGY:START:STOP:SRC:DST``: build the step (``zero3``, ``zero2``, ``ddp``, ``hsdp`` on a
``(2, W/2)`` mesh, ``single``), load the sharded folder SRC into this rank's layout (``-``: a fresh state),
take steps START ... STOP-1 on the global batches of :func:`global_batch` (the same 12 samples whatever W
is, split unevenly over the ranks) and save this rank's parts to the folder DST. ``zero3/window`` and
``zero2/window`` (START, STOP, SRC ignored): :func:`window_refused`.
"""

from __future__ import annotations

import gc
import sys

import torch

import fnnet
from fnnet import distributed, optim
from _zero3_worker import batch, loss_of, model, part

SIZES = {1: (12,), 2: (5, 7), 3: (3, 4, 5), 4: (2, 3, 3, 4)}  # 12 samples per step, uneven per rank


def optimizer():
    return optim.adamw(0.01, weight_decay=0.1)


def make_step(strategy: str, loss_fn):
    if strategy == "single":
        return fnnet.make_train_step(loss_fn, optimizer())
    if strategy == "hsdp":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (2, distributed.world_size() // 2), mesh_dim_names=("replicate", "shard"))
        return fnnet.make_train_step(loss_fn, optimizer(), strategy=distributed.HSDP(mesh))
    return fnnet.make_train_step(loss_fn, optimizer(), strategy=strategy)


def window_refused(strategy: str, dst: str) -> None:
    """``STRATEGY/window``: ``accumulate=2``, one micro-batch taken (``state.accum`` holds this rank's own
    partial window), then ``step.local_parts`` and ``fnnet.save(sharded=True)`` of the state must refuse;
    what each said, what was written then (nothing), and whether the flushed state's folder loads equal to
    it, go to ``DST-RANK.txt``."""
    import os

    m = model()
    step = fnnet.make_train_step(loss_of(m), optimizer(), strategy=strategy, accumulate=2)
    world, rank = distributed.world_size(), distributed.rank()
    state, _ = step(fnnet.TrainState.create(m.params, optimizer()), part(batch(0, SIZES[world]), SIZES[world], rank))
    said = []
    for attempt in (lambda: step.local_parts(state), lambda: fnnet.save(dst, state, sharded=True).wait()):
        try:
            attempt()
            said.append("no error")
        except ValueError as exc:
            said.append(str(exc))
    said.append(str(sorted(e for e in os.listdir(os.path.dirname(dst)) if os.path.basename(dst) in e)))
    flushed, _ = step.flush(state)
    local, parts = step.local_parts(flushed)  # after the window's update: saved as usual
    fnnet.save(dst, local, sharded=True, parts=parts).wait()
    said.append(str(fnnet.tree.all_equal(fnnet.load(dst), step.gather_state(flushed))))
    with open(f"{dst}-{rank}.txt", "w") as f:
        f.write("\n".join(said))


def phase(strategy: str, start: int, stop: int, src: str | None, dst: str | None):
    """One phase (see the module docstring); returns the step and this rank's state."""
    if strategy.endswith("/window"):
        return window_refused(strategy.split("/")[0], dst)
    m = model()
    step = make_step(strategy, loss_of(m))
    whole = fnnet.TrainState.create(m.params, optimizer())
    copy = lambda t: fnnet.tree.map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, t)  # noqa: E731
    before = copy(whole)
    like, parts = step.local_parts(whole)
    kept = copy(like)
    state = fnnet.load(src, like=like, parts=parts) if src else like
    assert fnnet.tree.all_equal(whole, before) and fnnet.tree.all_equal(like, kept)  # pure: inputs untouched
    assert state.step == start, (src, state.step, start)
    world, rank = distributed.world_size(), distributed.rank()
    for i in range(start, stop):
        b = batch(i, SIZES[world])
        state, _ = step(state, part(b, SIZES[world], rank) if world > 1 else b)
    if dst:
        local, parts = step.local_parts(state)
        fnnet.save(dst, local, sharded=True, parts=parts).wait()
    return step, state


def main() -> None:
    distributed.init()
    try:
        for spec in sys.argv[1:]:
            strategy, start, stop, src, dst = spec.split(":")
            phase(strategy, int(start), int(stop), None if src == "-" else src, None if dst == "-" else dst)
        torch.distributed.barrier()  # no rank leaves the group while another still uses it
        gc.collect()  # the steps (reference cycles) hold the process group: freed before it is destroyed
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
