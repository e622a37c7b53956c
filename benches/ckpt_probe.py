"""One rank of the checkpoint benchmark (issue 33): sharded against gather-to-rank-0, sync and async, and DCP.

    torchrun --nproc-per-node W benches/ckpt_probe.py --out DIR [--rounds 3] [--json FILE]

``fnnet.models.GPT`` at 27.3 M parameters (vocab 16384, 6 layers, width 512, 8 heads, context 64),
float32, AdamW, ``strategy="zero2"`` on gloo. Each round takes one training step, then saves once in
each of six ways, in an order that rotates every round (so load from elsewhere on the machine hits
all alike):

* ``whole-sync``: ``trainer.save(path)``: the optimizer state all-gathered, rank 0 writes one file;
* ``whole-async``: the same gather, rank 0 copies to host memory and writes in a thread;
* ``sharded-sync``: ``trainer.save(dir, sharded=True)``: each rank writes its own part;
* ``sharded-async``: the same, after a copy of each rank's pieces, in a thread;
* ``dcp-gathered``: ``torch.distributed.checkpoint.save`` of the same whole state (the optimizer state
  gathered first, as a DCP user of ZeRO-2's uneven flat ranges must: they are no DTensor placement);
  DCP deduplicates the replicated tensors, each rank writes its share;
* ``dcp-local``: ``dcp.save`` of each rank's own part (its optimizer ranges under rank-named keys, the
  parameters replicated): DCP's writer on exactly what fnnet's sharded save writes (no resharding
  possible from it: a write-speed reference only).

Per save: ``stall`` (seconds the call blocks the training loop) and ``total`` (until the checkpoint
is complete on every rank). Peak extra bytes on rank 0 counted from the tensors the save allocates
(the gathered optimizer state, host copies), not measured by an allocator. Resume: ``trainer.load`` of
the sharded folder (each rank its own ranges) and of the whole file, against
``torch.distributed.checkpoint.load`` (DCP) of the same whole state written by ``dcp.save``. Rank 0
prints one JSON object (and writes ``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F

import fnnet
from fnnet import distributed, optim


def nbytes(tree) -> int:
    return sum(x.numel() * x.element_size() for x in fnnet.tree.leaves(tree) if isinstance(x, torch.Tensor))


def timed(fn):
    dist.barrier()
    t0 = time.perf_counter()
    out = fn()
    t1 = time.perf_counter()
    return out, t1 - t0


def dcp_save(trainer, mode: str, path: str) -> None:
    if mode == "dcp-gathered":
        state = trainer.checkpoint()["state"]
        sd = {k: v for k, v in fnnet.tree.leaves_with_path(state) if isinstance(v, torch.Tensor)}
    else:
        local, parts = fnnet._saving.local_checkpoint(trainer)
        rank = distributed.rank()
        sd = {(f"{k}@rank{rank}" if k in parts else k): v for k, v in fnnet.tree.leaves_with_path(local)
              if isinstance(v, torch.Tensor)}
    dcp.save(sd, checkpoint_id=path)


def save_once(trainer, mode: str, out: str):
    path = os.path.join(out, mode + ("" if mode.startswith(("sharded", "dcp")) else ".safetensors"))
    if mode.startswith("dcp"):
        _, stall = timed(lambda: dcp_save(trainer, mode, path))
        dist.barrier()
        return stall, stall
    kw = {"sharded": mode.startswith("sharded"), "async_save": mode.endswith("async")}
    _, stall = timed(lambda: trainer.save(path, **kw))
    t0 = time.perf_counter()
    fnnet._saving.wait_pending(trainer)
    dist.barrier()
    return stall, stall + time.perf_counter() - t0


def spread(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    distributed.init()
    rank, world = distributed.rank(), distributed.world_size()
    torch.manual_seed(0)
    vocab = 16384
    net = fnnet.models.GPT(vocab, block_size=64, n_layer=6, n_head=8, n_embd=512)
    loss = lambda logits, y: F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))  # noqa: E731
    trainer = fnnet.Trainer(net, loss, optim.adamw(1e-3), key=0, strategy="zero2")
    g = torch.Generator().manual_seed(rank)
    idx = torch.randint(0, vocab, (2, 65), generator=g)
    batch = (idx[:, :-1], idx[:, 1:])
    modes = ["whole-sync", "sharded-sync", "dcp-gathered", "whole-async", "sharded-async", "dcp-local"]
    times = {m: {"stall": [], "total": []} for m in modes}
    step_s = []
    for r in range(args.rounds):
        for m in modes[r % len(modes):] + modes[:r % len(modes)]:
            (trainer.state, _), dt = timed(lambda: trainer.train_step(trainer.state, batch))
            step_s.append(dt)
            stall, total = save_once(trainer, m, args.out)
            times[m]["stall"].append(stall)
            times[m]["total"].append(total)
    params = nbytes(trainer.state.params)
    local, parts = fnnet._saving.local_checkpoint(trainer)
    whole_state = trainer.checkpoint()["state"]
    whole_bytes = nbytes(whole_state)
    gathered_opt = nbytes(whole_state.opt_state)
    manifest = json.load(open(os.path.join(args.out, "sharded-sync", "fnnet-checkpoint.json")))
    def rank0(names):  # bytes of the pieces rank 0 writes of these leaves
        size = {n: torch.empty(0, dtype=getattr(torch, v["dtype"])).element_size() for n, v in manifest["leaves"].items()}
        return sum(size[n] * (hi - lo) for n in names for r, lo, hi in manifest["leaves"][n]["pieces"] if r == 0)

    replicated = [n for n in manifest["leaves"] if n not in parts]
    # sync: only its ranges of the replicated leaves are copied (views sharing storage); async: all it writes.
    # whole: the gathered optimizer state (the encoder's copies of ZeRO's parameter views not counted)
    # DCP: the gathered optimizer state (dcp-gathered); dcp-local writes the tensors as they are (its CPU
    # writer's own copies, if any, are not counted here: None)
    extra = {"whole-sync": gathered_opt, "whole-async": gathered_opt + whole_bytes,
             "sharded-sync": rank0(replicated), "sharded-async": rank0(list(manifest["leaves"])),
             "dcp-gathered": gathered_opt, "dcp-local": None}
    # resume: fnnet's sharded load (own ranges), the whole file, and DCP's load of the same whole state
    res = {"fnnet-sharded": [], "fnnet-whole": [], "dcp": [], "fnnet-sharded-whole-tree": []}
    dcp_dir = os.path.join(args.out, "dcp")
    sd = {"state": {k: v for k, v in fnnet.tree.leaves_with_path(whole_state) if isinstance(v, torch.Tensor)}}
    if rank == 0:
        shutil.rmtree(dcp_dir, ignore_errors=True)
    dist.barrier()
    dcp.save(sd, checkpoint_id=dcp_dir)
    tree_dir = os.path.join(args.out, "sharded-whole-tree")
    fnnet.checkpoint.sharded.save_sharded(tree_dir, sd)
    for r in range(args.rounds):
        _, t = timed(lambda: trainer.load(os.path.join(args.out, "sharded-sync")))
        res["fnnet-sharded"].append(t)
        _, t = timed(lambda: trainer.load(os.path.join(args.out, "whole-sync.safetensors")))
        res["fnnet-whole"].append(t)
        target = {"state": {k: torch.empty_like(v) for k, v in sd["state"].items()}}
        _, t = timed(lambda: dcp.load(target, checkpoint_id=dcp_dir))
        res["dcp"].append(t)
        _, t = timed(lambda: fnnet.checkpoint.sharded.load_sharded(tree_dir, like=target))
        res["fnnet-sharded-whole-tree"].append(t)
    if rank == 0:
        base = statistics.median(times["whole-sync"]["stall"])
        base_stalls = times["whole-sync"]["stall"]
        result = {
            "world": world, "params": sum(p.numel() for p in net.parameters()), "param_bytes": params,
            "whole_state_bytes": whole_bytes, "machine": "2-core shared CPU, torch " + torch.__version__,
            "step_seconds": spread(step_s),
            "save": {m: {k: spread(v) for k, v in t.items()} for m, t in times.items()},
            "stall_vs_whole_sync": {m: statistics.median(times[m]["stall"]) / base for m in modes},
            # each save's stall over the whole-file sync save of the same round (paired), median and min-max
            "stall_ratio_per_round": {m: spread([a / b for a, b in zip(times[m]["stall"], base_stalls)]) for m in modes},
            "raw": {"save": times, "resume": res, "step": step_s},
            "rank0_extra_bytes": extra, "load_average": os.getloadavg(),
            "resume_seconds": {k: spread(v) for k, v in res.items()},
        }
        print(json.dumps(result))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    distributed.shutdown()


if __name__ == "__main__":
    main()
