"""One rank of the sharded-checkpoint tests (``test_sharded_checkpoint.py``), started by torch.distributed.run:

    python -m torch.distributed.run --nproc-per-node W tests/_ckpt_worker.py ACTION STRATEGY OUT_DIR

``save``: train with STRATEGY and a sharded ``ModelCheckpoint`` every step (async), stop after step 4.
``resume``: resume from OUT_DIR/ckpt with STRATEGY (resume="auto"), writing a sharded checkpoint every step,
and finish 2 epochs (``resume-stop``: stop after step 8 instead); rank 0 writes the whole final state to
OUT_DIR/final-STRATEGY-W.safetensors.
``kill``: under ``torchrun --max-restarts K`` with ``KILL_POINTS=p1,p2,...`` (K of them): attempt ``k`` resumes
(resume="auto"), and one rank SIGKILLs itself during the async sharded save of step ``2k + 3`` at point ``pk``
(:func:`arm`); attempt ``k >= 1`` first writes what it finds (OUT_DIR/attempt-k.json); the last one finishes
2 epochs and writes the final state, then runs the own-loop phases of ``THEN_PHASES`` (space-separated,
:mod:`_ckpt_loop_worker`'s), sharing the launch.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fnnet
import fnnet._saving
from fnnet import distributed, optim
from _dist_worker import StopAt, resume_data

STOP = 4


def trainer(strategy: str):
    """_dist_worker.resume_trainer's model and optimizer, under ``strategy``."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).double()
    return fnnet.Trainer(net, F.cross_entropy, optim.adam(0.05), key=7, strategy=strategy)


def loader():
    return fnnet.ArrayLoader(resume_data(), 8, shuffle=True, key=fnnet.random.key(1), shard=distributed.shard(),
                             global_batch=True)


def arm(point: str) -> None:
    """Make this rank SIGKILL itself in its background save at ``point``: ``part`` (rank 1, while writing
    its part), ``confirm`` (rank 1, its part durable, before the ranks' confirmation), ``manifest`` (rank 0,
    every part confirmed, before the manifest: the data are durable and the marker is not)."""
    from fnnet.checkpoint import sharded

    die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731
    victim = {"part": 1, "confirm": 1, "manifest": 0}[point]
    if distributed.rank() == victim:
        name = {"part": "write", "confirm": "_file_digest", "manifest": "_write_json"}[point]
        setattr(sharded._file if name == "write" else sharded, name, die)


class Kill(fnnet.callbacks.Callback):
    def __init__(self, point: str, at: int):
        self.point, self.at = point, at

    def on_train_batch_start(self, trainer, step):
        if trainer.state.step == self.at:
            fnnet._saving.wait_pending(trainer)  # the save of step `at` completes; the next one is killed
            arm(self.point)


def found(folder: Path, ckpt) -> dict:
    """What a restarted attempt finds before it resumes: the entries, the one resume="auto" picks, its step."""
    from fnnet._resume import find_latest
    from fnnet.checkpoint import sharded

    picked = find_latest([ckpt])
    hidden = {e: sorted(os.listdir(folder / e)) for e in os.listdir(folder) if e.startswith(".")}
    refused = {}
    for e in hidden:
        try:
            fnnet.load(folder / e)
        except ValueError as exc:
            refused[e] = str(exc)
    return {"entries": sorted(os.listdir(folder)), "hidden": hidden, "refused": refused,
            "picked": os.path.basename(picked), "step": int(sharded.load_sharded(picked)["state"].step)}


def nonfinite_refused(t, out: Path) -> None:
    """A nan in one element of rank 1's part of the optimizer state: trainer.save(sharded=True) is refused on
    every rank, naming it (each rank checks its own parts); the message goes to OUT_DIR/nonfinite-RANK.txt."""
    state, parts = t.train_step.local_parts(t.state)
    leaves, spec = fnnet.tree.flatten_with_path(state)
    victim = min(p for p, r in parts.items() if r[1] > r[0]) if distributed.rank() == 1 else None
    t.state = fnnet.tree.unflatten(spec, [x.clone().fill_(float("nan")) if p == victim else x for p, x in leaves])
    try:
        t.save(out / "nan", sharded=True)
        text = "saved"
    except ValueError as exc:
        text = f"{exc}\nwritten: {sorted(e for e in os.listdir(out) if 'nan' in e)}"
    (out / f"nonfinite-{distributed.rank()}.txt").write_text(text)


def kill(strategy: str, out: Path, ckpt) -> None:
    points = os.environ["KILL_POINTS"].split(",")
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt and distributed.is_main():
        (out / f"attempt-{attempt}.json").write_text(json.dumps(found(out / "ckpt", ckpt)))
    distributed.barrier()  # the others resume only after rank 0 has looked
    t = trainer(strategy)
    more = [Kill(points[attempt], 2 * attempt + 2)] if attempt < len(points) else []
    t.fit(loader(), epochs=2, verbose=0, resume="auto" if attempt else None, callbacks=[ckpt, *more])
    whole = t.checkpoint()["state"]
    if distributed.is_main():
        fnnet.save(out / f"final-{strategy}-{distributed.world_size()}.safetensors", whole)
        (out / "after.json").write_text(json.dumps(sorted(os.listdir(out / "ckpt"))))
    if os.environ.get("NONFINITE"):
        nonfinite_refused(t, out)
    from _ckpt_loop_worker import phase

    for spec in os.environ.get("THEN_PHASES", "").split():  # own-loop phases sharing this launch
        strategy, start, stop, src, dst = spec.split(":")
        phase(strategy, int(start), int(stop), None if src == "-" else src, None if dst == "-" else dst)


def main() -> None:
    action, strategy, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    distributed.init()
    try:
        ckpt = fnnet.callbacks.ModelCheckpoint(out / "ckpt", monitor="loss", every_n_steps=1, sharded=True,
                                               async_save=True)
        t = trainer(strategy)
        if action == "kill":
            kill(strategy, out, ckpt)
        elif action == "save":
            t.fit(loader(), epochs=2, verbose=0, callbacks=[ckpt, StopAt(STOP)])
        else:
            stop = [StopAt(2 * STOP)] if action == "resume-stop" else []
            t.fit(loader(), epochs=2, verbose=0, resume="auto", callbacks=[ckpt, *stop])
            whole = t.checkpoint()["state"]
            if distributed.is_main():
                fnnet.save(out / f"final-{strategy}-{distributed.world_size()}.safetensors", whole)
        distributed.barrier()  # no rank leaves the group while another still uses it
        gc.collect()  # the steps (reference cycles) hold the process group: freed before it is destroyed
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
