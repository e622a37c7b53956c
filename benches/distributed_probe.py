"""One rank of the distributed benchmark: fnnet's distributed step against DDP, side by side.

    torchrun --nproc-per-node N benches/distributed_probe.py MODEL [--steps 20] [--warmup 5]

MODEL is ``cnn`` (the chapter's CNN, batch 64 per rank) or ``mlp`` (an MLP with 21.0 M
parameters, batch 64 per rank: communication matters). Every rank builds both variants from
the same weights and runs them in turns, step by step, so load from elsewhere hits both alike:

* ``fnnet``: ``fnnet.make_train_step(loss, adam, distributed=True, donate=True)`` (eager:
  ~25 MB buckets all-reduced during the backward pass);
* ``ddp``: ``DistributedDataParallel(module)`` + ``torch.optim.Adam`` (its default buckets).

Rank 0 prints one JSON line: the median seconds per step of each variant, and the ratio; and each
rank's median CPU time per step (``time.process_time``: the process's threads, gloo's included) of
both variants and their ratio. The order of the two variants alternates from step to step.
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

import fnnet
from fnnet import distributed, optim
from fnnet.models import CnnModel

BATCH = 64


def build(model: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor, str]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1 + distributed.rank())
    if model == "cnn":
        net = CnnModel()
        x, y = torch.rand(BATCH, 1, 28, 28, generator=g), torch.randint(0, 10, (BATCH,), generator=g)
        return net, x, y, "cross_entropy"
    net = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 10))
    x, y = torch.randn(BATCH, 1024, generator=g), torch.randint(0, 10, (BATCH,), generator=g)
    return net, x, y, "cross_entropy"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", choices=["cnn", "mlp"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    distributed.init()
    net, x, y, _ = build(args.model)
    params = sum(p.numel() for p in net.parameters())

    # fnnet: the chapter's CNN has dropout, so the loss takes the step's key
    model = fnnet.functional(net)
    loss_fn = fnnet.supervised_loss(model, F.cross_entropy, return_outputs=False)
    opt = optim.adam(1e-3)
    step = fnnet.make_train_step(loss_fn, opt, distributed=True, donate=True)
    box = [fnnet.TrainState.create(model.params, opt, key=fnnet.random.key(0))]

    def fnnet_step() -> None:
        box[0], _ = step(box[0], (x, y))

    # DDP, the reference
    torch.manual_seed(0)
    ddp_net = nn.parallel.DistributedDataParallel(build(args.model)[0])
    ddp_opt = torch.optim.Adam(ddp_net.parameters(), lr=1e-3)

    def ddp_step() -> None:
        ddp_opt.zero_grad()
        F.cross_entropy(ddp_net(x), y).backward()
        ddp_opt.step()

    times: dict[str, list[float]] = {"fnnet": [], "ddp": []}
    cpu: dict[str, list[float]] = {"fnnet": [], "ddp": []}  # this process's CPU time (gloo's threads included)
    for i in range(args.warmup + args.steps):
        # the order alternates step by step, so neither variant always runs right after the barrier
        for name, fn in (("fnnet", fnnet_step), ("ddp", ddp_step))[::1 if i % 2 == 0 else -1]:
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            elapsed, used = time.perf_counter() - t0, time.process_time() - c0
            if i >= args.warmup:
                times[name].append(elapsed)
                cpu[name].append(used)
    medians = {k: statistics.median(v) for k, v in times.items()}
    cpu_medians = {k: statistics.median(v) for k, v in cpu.items()}
    per_rank = [None] * distributed.world_size()
    dist.all_gather_object(per_rank, {"rank": distributed.rank(), "cpu_ratio": cpu_medians["fnnet"] / cpu_medians["ddp"],
                                      "fnnet_cpu_s": cpu_medians["fnnet"], "ddp_cpu_s": cpu_medians["ddp"]})
    if distributed.is_main():
        print(json.dumps({"model": args.model, "parameters": params, "world_size": distributed.world_size(),
                          "batch_per_rank": BATCH, "fnnet_s": medians["fnnet"], "ddp_s": medians["ddp"],
                          "ratio": medians["fnnet"] / medians["ddp"], "steps": args.steps,
                          "cpu_ratio_per_rank": [r["cpu_ratio"] for r in per_rank], "cpu_per_rank": per_rank,
                          "load": os.getloadavg()[0]}), flush=True)
    # gloo's destroy_process_group sometimes leaves one rank waiting after the other has gone (torch
    # 2.13): every rank is done after this barrier, and nothing is left to clean up but the process
    dist.barrier()
    os._exit(0)


if __name__ == "__main__":
    main()
