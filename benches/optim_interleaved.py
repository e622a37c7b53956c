"""The Adam step of ``test_bench_optim.py``, every variant timed round-robin (interleaved).

pytest-benchmark times one variant's rounds after another's, so a slow drift of a shared
machine (other tenants, frequency changes) lands on whichever variant ran then: two runs of
the same torch code path (``torch-default`` and ``torch-loop`` on CPU) have come out 7 % apart.
Here each round runs every variant once, in an order shuffled per round (seeded), on fresh
gradients (untimed), so drift slows all of them alike, no variant always follows the same
one, and the ratios stay fair::

    python benches/optim_interleaved.py [--rounds 60] [--device cpu] [--json FILE]

It prints each variant's median and its ratio to ``torch-default`` (the target, issue 3: on
CPU, fnnet-donated <= 1.1x and fnnet-pure <= 1.5x).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch


def _bench_module():
    spec = importlib.util.spec_from_file_location("_bench_optim", Path(__file__).with_name("test_bench_optim.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure(device: torch.device, rounds: int, warmup: int = 5) -> dict[str, float]:
    """Median seconds per step of every variant, timed round-robin."""
    bench = _bench_module()
    built = {v: bench.build(v, device) for v in bench.VARIANTS}
    times: dict[str, list[float]] = {v: [] for v in bench.VARIANTS}
    order = list(built)
    shuffle = random.Random(0).shuffle
    for r in range(warmup + rounds):
        shuffle(order)
        for variant in order:
            run, fresh_grads, _ = built[variant]
            (grads,), _ = fresh_grads()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            run(grads)  # synchronises on CUDA itself
            elapsed = time.perf_counter() - t0
            if r >= warmup:
                times[variant].append(elapsed)
    return {v: statistics.median(t) for v, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="write the medians and ratios here")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    device = torch.device(args.device)
    medians = measure(device, args.rounds)
    base = medians["torch-default"]
    print(f"Adam step, 200 tensors (6.6 M params), {device}, {args.rounds} interleaved rounds, medians")
    for variant, m in medians.items():
        print(f"  {variant:28s} {m * 1e3:8.2f} ms  {m / base:5.2f}x torch-default")
    if args.json:
        from fnnet.bench import environment

        Path(args.json).write_text(json.dumps({"environment": environment(), "device": str(device), "rounds": args.rounds,
                                               "median_s": medians, "ratio_to_torch_default":
                                               {v: m / base for v, m in medians.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
