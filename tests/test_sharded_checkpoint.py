"""Sharded checkpoints (fnnet/checkpoint/sharded.py, the Trainer's sharded and async saves): the load
matrix across strategies and world sizes against the uninterrupted run, kill points, bad folders."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fnnet
from fnnet.checkpoint import sharded
from _ckpt_worker import STOP, loader as rank_loader, trainer  # noqa: F401
from _dist_worker import StopAt, resume_data

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("_ckpt_worker.py")
TIMEOUT = 240


def launch(action: str, strategy: str, out: Path, nproc: int) -> subprocess.CompletedProcess:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(port), str(WORKER), action, strategy, str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def one_loader():
    return fnnet.ArrayLoader(resume_data(), 8, shuffle=True, key=fnnet.random.key(1), global_batch=True)


@pytest.fixture(scope="module")
def uninterrupted():
    t = trainer("single")
    t.fit(one_loader(), epochs=2, verbose=0)
    return t.state


def close(a, b, tol=1e-10):
    la, lb = fnnet.tree.leaves(a), fnnet.tree.leaves(b)
    return len(la) == len(lb) and all(
        torch.allclose(x, y, rtol=0, atol=tol) if isinstance(x, torch.Tensor) else x == y for x, y in zip(la, lb))


def resume_here(folder: Path):
    """W = 1: this process resumes from the sharded folder (resume="auto") and finishes the run."""
    t = trainer("single")
    t.fit(one_loader(), epochs=2, verbose=0, resume="auto",
          callbacks=[fnnet.callbacks.ModelCheckpoint(folder, monitor="loss", every_n_steps=1, sharded=True)])
    return t.state


def saved_by(tmp_path_factory, strategy: str, world: int) -> Path:
    out = tmp_path_factory.mktemp(f"save-{strategy}-{world}")
    launch("save", strategy, out, world)
    assert sharded.is_complete(out / "ckpt" / "step.ckpt")
    return out / "ckpt"


def resumed_by(src: Path, tmp_path: Path, strategy: str, world: int):
    shutil.copytree(src, tmp_path / "ckpt")
    launch("resume", strategy, tmp_path, world)
    return fnnet.load(tmp_path / f"final-{strategy}-{world}.safetensors")


def saved_here(folder: Path, stop: int = STOP) -> Path:
    """W = 1: this process trains with sharded checkpoints every step and stops after step ``stop``."""
    t = trainer("single")
    t.fit(one_loader(), epochs=2, verbose=0, callbacks=[
        fnnet.callbacks.ModelCheckpoint(folder, monitor="loss", every_n_steps=1, sharded=True), StopAt(stop)])
    return folder


def test_one_process_to_zero2_on_two_ranks_and_back_equals_the_uninterrupted_run(tmp_path, uninterrupted):
    # one launch: W=1 (step 4) -> ZeRO-2 on 2 ranks (async sharded saves, stops after step 8) -> W=1 to the end
    saved_here(tmp_path / "ckpt")
    launch("resume-stop", "zero2", tmp_path, 2)
    folder = tmp_path / "ckpt" / "step.ckpt"
    assert sorted(os.listdir(folder)) == ["fnnet-checkpoint.json", "part-00000-of-00002.safetensors",
                                          "part-00001-of-00002.safetensors"]
    whole = sharded.load_sharded(folder)  # the whole tree, the optimizer state read from both ranks' ranges
    assert whole["state"].step == 2 * STOP and whole["epoch"] == 1
    final = resume_here(tmp_path / "ckpt")
    assert final.step == uninterrupted.step and close(final, uninterrupted)


@pytest.mark.extended
@pytest.mark.parametrize("save,load", [(("zero2", 2), ("ddp", 3)), (("zero2", 2), ("single", 1)), (("zero2", 2), ("zero2", 3)), (("zero2", 2), ("zero2", 4)),
                                       (("ddp", 3), ("zero2", 2)), (("zero2", 3), ("zero2", 2)),
                                       (("single", 1), ("zero2", 2)), (("zero2", 4), ("ddp", 2))])
def test_the_load_matrix_equals_the_uninterrupted_run(tmp_path_factory, tmp_path, uninterrupted, save, load):
    src = saved_here(tmp_path / "single") if save == ("single", 1) else saved_by(tmp_path_factory, *save)
    final = resume_here(src) if load == ("single", 1) else resumed_by(src, tmp_path, *load)
    assert final.step == uninterrupted.step and close(final, uninterrupted)
