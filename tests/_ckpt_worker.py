"""One rank of the sharded-checkpoint tests (``test_sharded_checkpoint.py``), started by torch.distributed.run:

    python -m torch.distributed.run --nproc-per-node W tests/_ckpt_worker.py ACTION STRATEGY OUT_DIR

``save``: train with STRATEGY and a sharded ``ModelCheckpoint`` every step (async), stop after step 4.
``resume``: resume from OUT_DIR/ckpt with STRATEGY (resume="auto"), writing a sharded checkpoint every step,
and finish 2 epochs (``resume-stop``: stop after step 8 instead); rank 0 writes the whole final state to
OUT_DIR/final-STRATEGY-W.safetensors.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fnnet
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


def main() -> None:
    action, strategy, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    distributed.init()
    try:
        ckpt = fnnet.callbacks.ModelCheckpoint(out / "ckpt", monitor="loss", every_n_steps=1, sharded=True,
                                               async_save=True)
        t = trainer(strategy)
        if action == "save":
            t.fit(loader(), epochs=2, verbose=0, callbacks=[ckpt, StopAt(STOP)])
        else:
            stop = [StopAt(2 * STOP)] if action == "resume-stop" else []
            t.fit(loader(), epochs=2, verbose=0, resume="auto", callbacks=[ckpt, *stop])
            whole = t.checkpoint()["state"]
            if distributed.is_main():
                fnnet.save(out / f"final-{strategy}-{distributed.world_size()}.safetensors", whole)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
