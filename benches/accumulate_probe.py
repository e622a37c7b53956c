"""Gradient accumulation on the 25 M-parameter MLP: peak memory and time per sample (issue 22).

    python benches/accumulate_probe.py memory [--updates 3]          # fresh process per variant
    python benches/accumulate_probe.py time [--updates 8]            # one device, interleaved
    torchrun --nproc-per-node 2 benches/accumulate_probe.py time     # two gloo ranks, interleaved

``memory`` runs each variant in a fresh process (``--variant`` internally) and reads its peak
resident memory (``ru_maxrss``): ``batch256`` (one step per batch of 256, no accumulation)
against ``micro64x4`` (micro-batches of 64, ``accumulate=4``: the same 256 samples per update).
Both use Adam with ``donate=True``, as the Trainer does.

``time`` compares ``accumulate=1`` and ``accumulate=4`` at the same micro-batch of 64, one update
of each in turn (k=4: four calls), and reports the median seconds per sample; under torchrun the
step is ``distributed=True`` (gloo) and rank 0 prints. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import fnnet
from fnnet import optim


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
                         nn.Linear(4096, 1024), nn.ReLU(), nn.Linear(1024, 10))


def setup(accumulate: int, distributed: bool):
    model = fnnet.functional(mlp())
    loss_fn = fnnet.supervised_loss(model, F.cross_entropy, return_outputs=False)
    opt = optim.adam(1e-3)
    step = fnnet.make_train_step(loss_fn, opt, donate=True, accumulate=accumulate, distributed=distributed)
    return step, fnnet.TrainState.create(model.params, opt), sum(p.numel() for p in model.params.values())


def batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1024, generator=g), torch.randint(0, 10, (n,), generator=g)


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_variant(variant: str, updates: int) -> dict:
    micro, k = {"batch256": (256, 1), "micro64x4": (64, 4)}[variant]
    step, state, params = setup(k, False)
    data = [batch(micro, i) for i in range(k)]
    built = peak_mb()
    for _ in range(updates):
        for b in data:
            state, _ = step(state, b)
    return {"variant": variant, "parameters": params, "peak_mb": peak_mb(), "peak_before_training_mb": built,
            "training_mb": peak_mb() - built}


def memory(updates: int) -> dict:
    out = {}
    for variant in ("batch256", "micro64x4"):
        proc = subprocess.run([sys.executable, __file__, "memory", "--variant", variant, "--updates", str(updates)],
                              capture_output=True, text=True, timeout=600, check=True)
        out[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["peak_ratio"] = out["micro64x4"]["peak_mb"] / out["batch256"]["peak_mb"]
    return out


def timing(updates: int, warmup: int = 2) -> dict | None:
    distributed = "RANK" in os.environ
    if distributed:
        fnnet.distributed.init()
    steps = {k: setup(k, distributed)[:2] for k in (1, 4)}
    states = {k: s for k, (_, s) in steps.items()}
    me = fnnet.distributed.rank()
    data = [batch(64, 10 * me + i) for i in range(4)]
    times: dict[int, list[float]] = {1: [], 4: []}
    for r in range(warmup + updates):
        for k in (1, 4) if r % 2 == 0 else (4, 1):
            step = steps[k][0]
            fnnet.distributed.barrier()
            t0 = time.perf_counter()
            for b in data[:k]:
                states[k], _ = step(states[k], b)
            if r >= warmup:
                times[k].append((time.perf_counter() - t0) / (64 * k))
    medians = {k: statistics.median(v) for k, v in times.items()}
    spread = {k: [min(v), max(v)] for k, v in times.items()}
    result = {"world_size": fnnet.distributed.world_size(), "micro_batch": 64, "s_per_sample_k1": medians[1],
              "s_per_sample_k4": medians[4], "ratio_k4_to_k1": medians[4] / medians[1], "spread": spread,
              "updates": updates}
    if distributed:
        if me == 0:
            print(json.dumps(result), flush=True)
        fnnet.distributed.barrier()
        os._exit(0)  # gloo's destroy_process_group can leave a rank waiting after another has gone (torch 2.13)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["memory", "time"])
    parser.add_argument("--updates", type=int, default=None)
    parser.add_argument("--variant", choices=["batch256", "micro64x4"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode == "memory":
        result = run_variant(args.variant, args.updates or 3) if args.variant else memory(args.updates or 3)
    else:
        result = timing(args.updates or 8)
    if result is not None:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
