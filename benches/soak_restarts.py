"""Soak: a ZeRO-2 run with gradient accumulation and a checkpoint every step, under ``torchrun --max-restarts``,
SIGKILLed at random points (a random rank, a random moment, some of them inside a save), must finish equal to the
same run left alone (float64, 1e-10). Not part of any test suite: it takes minutes.

    python benches/soak_restarts.py [--kills 20] [--seed 0] [--out DIR] [--json benches/results/....json]

The driver runs the uninterrupted reference (2 ranks, no kill), then the soak run (2 ranks, ``--max-restarts``
kills + 5), killing one worker per attempt: after a random delay from the moment both ranks of the attempt are up,
or (one kill in three) the moment a rank announces that it enters ``ModelCheckpoint``'s step save (the kill then
lands inside the gather or the write). Both runs call the same ``fit(..., resume="auto")``: the soak run's
restarted attempts resume from the newest ``step.safetensors`` by themselves. At the end it compares the final
``trainer.save`` files leaf by leaf (params, the whole gathered optimizer state, the step, the key).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EPOCHS, SAMPLES, BATCH, ACCUMULATE = 24, 200, 8, 2  # 25 batches an epoch: 13 updates (the last window of one batch)


# -- one rank (started by torchrun with --worker) -------------------------------------------------------------


def worker(out: Path) -> None:
    import torch
    import torch.nn.functional as F
    from torch import nn

    import fnnet
    from fnnet import distributed, optim

    distributed.init(timeout=datetime.timedelta(seconds=60))
    rank, attempt = distributed.rank(), os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    (out / "pids").mkdir(parents=True, exist_ok=True)
    (out / "pids" / f"{attempt}-{rank}").write_text(str(os.getpid()))

    class AnnouncedCheckpoint(fnnet.callbacks.ModelCheckpoint):
        """Says (a marker file) when it enters a step save, so the driver can kill a rank inside one."""

        def on_train_batch_end(self, trainer, step, metrics):
            if metrics.get("updated", True) and trainer.state.step % self.every_n_steps == 0:
                (out / f"saving-{rank}").write_text(str(trainer.state.step))
            super().on_train_batch_end(trainer, step, metrics)

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Dropout(0.1), nn.Linear(32, 3)).double()
    trainer = fnnet.Trainer(net, F.cross_entropy, optim.adamw(0.01, weight_decay=0.01), key=7, shard_optimizer=True,
                            accumulate_grad_batches=ACCUMULATE)
    g = torch.Generator().manual_seed(3)
    data = torch.randn(SAMPLES, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (SAMPLES,), generator=g)
    loader = fnnet.ArrayLoader(data, BATCH, shuffle=True, key=fnnet.random.key(1), shard=distributed.shard(),
                               global_batch=True)
    ckpt = AnnouncedCheckpoint(out / "ckpt", monitor="loss", every_n_steps=1)
    trainer.fit(loader, epochs=EPOCHS, verbose=0, resume="auto", callbacks=[ckpt])
    trainer.save(out / "final.safetensors")  # every rank: the sharded optimizer state is gathered
    (out / f"done-{rank}").write_text(json.dumps({"attempt": attempt, "step": trainer.state.step}))


# -- the driver -----------------------------------------------------------------------------------------------


def launch(out: Path, restarts: int) -> subprocess.Popen:
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", str(restarts), __file__, "--worker", str(out)]
    log = open(out.parent / f"{out.name}.log", "w")
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def newest_step(out: Path) -> int | None:
    import fnnet

    try:
        return int(fnnet.load(out / "ckpt" / "step.safetensors")["state"].step)
    except (OSError, ValueError):
        return None


def kill_one(proc: subprocess.Popen, out: Path, attempt: int, rng: random.Random) -> dict | None:
    """Wait for both ranks of ``attempt``, then SIGKILL one at a random moment (or as it enters a save)."""
    pids = [out / "pids" / f"{attempt}-{r}" for r in (0, 1)]
    while not all(p.exists() and p.read_text() for p in pids):
        if proc.poll() is not None:
            return None
        time.sleep(0.01)
    rank, in_save = rng.randrange(2), rng.random() < 1 / 3
    pid = int(pids[rank].read_text())
    start = time.monotonic()
    if in_save:
        marker = out / f"saving-{rank}"
        marker.unlink(missing_ok=True)
        while not marker.exists():
            if proc.poll() is not None or time.monotonic() - start > 120:
                return None
            time.sleep(0.001)
    else:
        time.sleep(rng.uniform(0.0, 2.0))
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:  # it ended meanwhile (the run finished)
        return None
    return {"attempt": attempt, "rank": rank, "moment": "entering a step save" if in_save else "random",
            "after_s": round(time.monotonic() - start, 3)}


def compare(a: Path, b: Path) -> dict:
    import torch

    import fnnet

    x, y = fnnet.load(a), fnnet.load(b)
    # the state and the epoch (the position's callbacks name each run's own folder, so they differ by design)
    px, py = fnnet.tree.leaves_with_path({"state": x["state"], "epoch": x["epoch"]}), fnnet.tree.leaves_with_path(
        {"state": y["state"], "epoch": y["epoch"]})
    if [p for p, _ in px] != [p for p, _ in py] or len(px) != len(py):
        raise SystemExit(f"the two files hold other trees: {[p for p, _ in px]} vs {[p for p, _ in py]}")
    worst, differ = 0.0, []
    for (path, u), (_, v) in zip(px, py):
        if isinstance(u, torch.Tensor):
            d = float((u.double() - v.double()).abs().max()) if u.numel() else 0.0
            worst = max(worst, d)
        elif u != v:
            differ.append(path)
    if x["position"]["batch"] != y["position"]["batch"]:
        differ.append("position.batch")
    return {"leaves": len(px), "max_abs_diff": worst, "other_leaves_that_differ": differ,
            "step": int(x["state"].step), "epoch": int(x["epoch"]), "position_batch": [x["position"]["batch"],
                                                                                     y["position"]["batch"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="/tmp/fnnet-soak")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker))
        return
    import shutil

    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    rng = random.Random(args.seed)
    t0 = time.monotonic()
    ref = launch(root / "reference", 0)
    ref_rc = ref.wait()
    ref_s = time.monotonic() - t0
    soak_dir = root / "soak"
    soak_dir.mkdir()
    proc = launch(soak_dir, args.kills + 5)
    kills = []
    for attempt in range(args.kills):
        kill = kill_one(proc, soak_dir, attempt, rng)
        if kill is None:
            break
        time.sleep(0.5)
        kill["checkpoint_step_after"] = newest_step(soak_dir)
        kills.append(kill)
        print(json.dumps(kill), flush=True)
    rc = proc.wait()
    import torch

    result = {"machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}", "kills": kills, "reference_rc": ref_rc, "soak_rc": rc, "reference_s": round(ref_s, 1),
              "soak_s": round(time.monotonic() - t0 - ref_s, 1),
              "setup": {"ranks": 2, "epochs": EPOCHS, "samples": SAMPLES, "global_batch": BATCH,
                        "accumulate_grad_batches": ACCUMULATE, "shard_optimizer": True, "every_n_steps": 1,
                        "dtype": "float64", "max_restarts": args.kills + 5, "seed": args.seed}}
    if ref_rc == 0 and rc == 0:
        result["comparison"] = compare(root / "reference" / "final.safetensors", soak_dir / "final.safetensors")
        result["finished_attempt"] = json.loads((soak_dir / "done-0").read_text())["attempt"]
        c = result["comparison"]
        result["equal_to_1e-10"] = c["max_abs_diff"] <= 1e-10 and not c["other_leaves_that_differ"]
    print(json.dumps({k: v for k, v in result.items() if k != "kills"}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
