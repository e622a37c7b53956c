"""One rank of the optimizer-state sharding benchmark (issue 23): the 25 M-parameter MLP with Adam.

    torchrun --nproc-per-node W benches/shard_probe.py time [--steps 10]        # interleaved
    torchrun --nproc-per-node W benches/shard_probe.py memory VARIANT [--steps 3]

VARIANT (``time`` runs all three in turns, step by step, in the same ranks):

* ``allreduce``: ``fnnet.make_train_step(..., distributed=True, donate=True)``;
* ``sharded``: the same with ``shard_optimizer=True`` (ZeRO-2: reduce-scatter, part update,
  all-gather);
* ``zero-ddp``: ``DistributedDataParallel`` + ``torch.distributed.optim.ZeroRedundancyOptimizer``
  over ``torch.optim.Adam``.

Batch 64 per rank. ``memory`` builds one variant only and reports, per rank, the optimizer
state's bytes and the process's peak resident memory. Rank 0 prints one JSON line (a list of
every rank's figures for ``memory``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import fnnet
from fnnet import distributed, optim

BATCH = 64
VARIANTS = ("allreduce", "sharded", "zero-ddp")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
                         nn.Linear(4096, 1024), nn.ReLU(), nn.Linear(1024, 10))


def tensor_bytes(tree) -> int:
    return sum(x.numel() * x.element_size() for x in fnnet.tree.leaves(tree) if isinstance(x, torch.Tensor))


def build(variant: str, x: torch.Tensor, y: torch.Tensor):
    """``(run one step, optimizer-state bytes)`` of ``variant``."""
    if variant == "zero-ddp":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        net = nn.parallel.DistributedDataParallel(mlp())
        opt = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=torch.optim.Adam, lr=1e-3)

        def run() -> None:
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()

        def state_bytes() -> int:
            return sum(tensor_bytes(list(s.values())) for s in opt.optim.state.values())

        return run, state_bytes
    model = fnnet.functional(mlp())
    loss_fn = fnnet.supervised_loss(model, F.cross_entropy, return_outputs=False)
    adam = optim.adam(1e-3)
    step = fnnet.make_train_step(loss_fn, adam, distributed=True, donate=True, shard_optimizer=variant == "sharded")
    # sharded: TrainState(params, None) lets the step initialise this rank's part only (never the whole state)
    box = [fnnet.TrainState(model.params, None) if variant == "sharded" else fnnet.TrainState.create(model.params, adam)]

    def run() -> None:
        box[0], _ = step(box[0], (x, y))

    return run, lambda: tensor_bytes(box[0].opt_state)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["time", "memory"])
    parser.add_argument("variant", nargs="?", choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    distributed.init()
    me, world = distributed.rank(), distributed.world_size()
    g = torch.Generator().manual_seed(1 + me)
    x, y = torch.randn(BATCH, 1024, generator=g), torch.randint(0, 10, (BATCH,), generator=g)
    if args.mode == "memory":
        run, state_bytes = build(args.variant, x, y)
        for _ in range(args.steps or 3):
            run()
        mine = {"rank": me, "opt_state_mb": state_bytes() / 2**20,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
        if me == 0:
            print(json.dumps({"variant": args.variant, "world_size": world, "ranks": everyone}))
    else:
        built = {v: build(v, x, y) for v in VARIANTS}
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for i in range(args.warmup + (args.steps or 10)):
            order = VARIANTS if i % 2 == 0 else tuple(reversed(VARIANTS))
            for v in order:
                dist.barrier()
                t0 = time.perf_counter()
                built[v][0]()
                if i >= args.warmup:
                    times[v].append(time.perf_counter() - t0)
        med = {v: statistics.median(t) for v, t in times.items()}
        if me == 0:
            print(json.dumps({"world_size": world, "batch_per_rank": BATCH, "median_s": med,
                              "spread_s": {v: [min(t), max(t)] for v, t in times.items()},
                              "sharded_to_allreduce": med["sharded"] / med["allreduce"],
                              "sharded_to_zero_ddp": med["sharded"] / med["zero-ddp"],
                              "opt_state_mb": {v: built[v][1]() / 2**20 for v in VARIANTS}}), flush=True)
    dist.barrier()
    os._exit(0)  # gloo's destroy_process_group can leave a rank waiting after another has gone (torch 2.13)


if __name__ == "__main__":
    main()
