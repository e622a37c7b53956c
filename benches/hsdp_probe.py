"""One rank of the hybrid-sharding benchmark (issue 29): HSDP on a 2 x 2 mesh against ZeRO-2 on 4 ranks.

    torchrun --nproc-per-node 4 benches/hsdp_probe.py [--steps 10] [--warmup 2]

Both variants train the same MLP (``--width``, Adam, batch 64 per rank) in the same four ranks,
in turns, step by step (the order alternates every step), so load from elsewhere hits both alike:

* ``hsdp``: ``strategy=fnnet.distributed.HSDP(mesh)``, ``mesh`` 2 x 2 (``("replicate", "shard")``):
  the optimizer state cut in two within each row, gradients all-reduced across the rows;
* ``zero2``: ``strategy=fnnet.distributed.ZeRO(2)`` over all four ranks: the state cut in four.

Rank 0 prints one JSON line: median seconds per step with their spread, and the optimizer
state's bytes on every rank.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

import fnnet
from fnnet import distributed, optim

BATCH = 64


def mlp(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1024, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 1024), nn.ReLU(), nn.Linear(1024, 10))


def tensor_bytes(tree) -> int:
    return sum(x.numel() * x.element_size() for x in fnnet.tree.leaves(tree) if isinstance(x, torch.Tensor))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--width", type=int, default=4096)
    args = parser.parse_args()
    distributed.init()
    me, world = distributed.rank(), distributed.world_size()
    if world != 4:
        raise SystemExit("hsdp_probe runs on 4 ranks (a 2 x 2 mesh)")
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    g = torch.Generator().manual_seed(1 + me)
    x, y = torch.randn(BATCH, 1024, generator=g), torch.randint(0, 10, (BATCH,), generator=g)
    variants = {"hsdp": distributed.HSDP(mesh), "zero2": distributed.ZeRO(2)}
    built = {}
    for name, strategy in variants.items():
        model = fnnet.functional(mlp(args.width))
        loss_fn = fnnet.supervised_loss(model, F.cross_entropy, return_outputs=False)
        step = fnnet.make_train_step(loss_fn, optim.adam(1e-3), strategy=strategy, donate=True)
        built[name] = [step, fnnet.TrainState(model.params, None)]  # each rank initialises its part only
    times: dict[str, list[float]] = {v: [] for v in variants}
    for i in range(args.warmup + args.steps):
        for v in (tuple(variants) if i % 2 == 0 else tuple(reversed(tuple(variants)))):
            dist.barrier()
            t0 = time.perf_counter()
            built[v][1], _ = built[v][0](built[v][1], (x, y))
            if i >= args.warmup:
                times[v].append(time.perf_counter() - t0)
    mine = {v: tensor_bytes(built[v][1].opt_state) for v in variants}
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine)
    if me == 0:
        params = sum(p.numel() for p in mlp(args.width).parameters())
        med = {v: statistics.median(t) for v, t in times.items()}
        print(json.dumps({"world_size": world, "mesh": [2, 2], "parameters": params, "batch_per_rank": BATCH,
                          "median_s": med, "spread_s": {v: [min(t), max(t)] for v, t in times.items()},
                          "hsdp_to_zero2": med["hsdp"] / med["zero2"], "steps": args.steps,
                          "opt_state_bytes_per_rank": {v: [e[v] for e in everyone] for v in variants}}), flush=True)
    dist.barrier()
    os._exit(0)  # gloo's destroy_process_group can leave a rank waiting after another has gone (torch 2.13)


if __name__ == "__main__":
    main()
