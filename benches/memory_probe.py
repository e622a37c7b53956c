"""Peak memory of one training variant, measured in a fresh process (run by ``test_bench_memory.py``).

    python benches/memory_probe.py VARIANT [--device cpu|cuda] [--steps 4]

Prints one JSON object. The workload is 4 Adam steps on an MLP with 25.2 M parameters
(101 MB of float32 weights), batch 64. Peak memory counts from just after the imports, so
the model, its gradients, the optimizer state and every temporary are in it:

* CPU: the process's peak resident set size (``VmHWM``), reset after the imports through
  ``/proc/self/clear_refs``, minus the resident size at that moment. Run it with
  ``MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=131072`` (``test_bench_memory.py``
  does): large blocks are then mapped and unmapped as tensors come and go, so the resident
  size follows what is alive instead of glibc's adaptive heap, and repeated runs agree to the MB;
* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.

Variants: ``chapter`` (``nn.Module`` + ``torch.optim.Adam``, the chapter's loop),
``step-donate`` / ``step-pure`` (``make_train_step(donate=True/False)``, the module dropped
after ``fnnet.functional``), ``trainer`` (``Trainer`` with its default settings, over the
module), ``parallel-2`` (the data-parallel step over two shards of the device).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

import fnnet
from fnnet import optim

VARIANTS = ("chapter", "step-donate", "step-pure", "trainer", "parallel-2")
WIDTH, IN, OUT, BATCH, LR = 4096, 1024, 1024, 64, 1e-3


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak(device: torch.device) -> int:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current VmRSS (Linux)
    return _status("VmRSS")


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return _status("VmHWM")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, OUT))


def _warm_up(device: torch.device) -> None:
    """Run every code path once on a tiny model, so lazy imports and one-time set-up happen before
    the measured region (the variants differ in what they import otherwise)."""
    tiny = nn.Linear(2, 2).to(device)
    batch = (torch.zeros(4, 2, device=device), torch.zeros(4, 2, device=device))
    opt = torch.optim.Adam(tiny.parameters(), lr=LR)
    F.mse_loss(tiny(batch[0]), batch[1]).backward()
    opt.step()
    model = fnnet.functional(tiny)
    step = fnnet.make_train_step(lambda p, b: F.mse_loss(model.apply(p, b[0]), b[1]), optim.adam(LR), donate=True)
    step(fnnet.TrainState.create(model.params, optim.adam(LR)), batch)
    fnnet.Trainer(nn.Linear(2, 2), F.mse_loss, optim.adam(LR), devices=device).fit([batch], verbose=0)


def run(variant: str, device: torch.device, steps: int) -> dict:
    _warm_up(device)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(BATCH, IN, generator=g).to(device), torch.randn(BATCH, OUT, generator=g).to(device)
    base = _reset_peak(device)
    module = mlp().to(device)
    params = sum(p.numel() for p in module.parameters())
    if variant == "chapter":
        opt = torch.optim.Adam(module.parameters(), lr=LR)
        for _ in range(steps):
            opt.zero_grad()
            F.mse_loss(module(x), y).backward()
            opt.step()
    elif variant in ("step-donate", "step-pure", "parallel-2"):
        model = fnnet.functional(module)
        del module
        gc.collect()
        opt = optim.adam(LR)
        kwargs = {"devices": [device, device]} if variant == "parallel-2" else {}
        step = fnnet.make_train_step(lambda p, b: F.mse_loss(model.apply(p, b[0]), b[1]), opt,
                                     donate=variant != "step-pure", **kwargs)
        state = fnnet.TrainState.create(model.params, opt)
        model.params = None  # the state holds the only reference to the weights
        for _ in range(steps):
            state, _ = step(state, (x, y))
    elif variant == "trainer":
        trainer = fnnet.Trainer(module, F.mse_loss, optim.adam(LR), devices=device)
        trainer.fit([(x, y)] * steps, verbose=0)
    else:
        raise SystemExit(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    peak = _peak(device) - base
    return {"variant": variant, "device": str(device), "steps": steps, "parameters": params,
            "weights_mb": params * 4 / 2**20, "peak_mb": peak / 2**20}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variant", choices=VARIANTS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    print(json.dumps(run(args.variant, torch.device(args.device), args.steps)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
