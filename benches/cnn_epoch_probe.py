"""The Trainer's CNN epoch against the chapter's loop, epoch by epoch in turns, CPU time and wall time.

    python benches/cnn_epoch_probe.py [--rounds 7] [--threads 0] [--variants chapter-workers0,fnnet-trainer]
    python benches/cnn_epoch_probe.py --compare /tmp/base --launches 2 --out results.jsonl

The workloads are ``fnnet bench``'s (:func:`fnnet.bench.workloads.cnn_case`: one epoch of 12,800
samples, batch 128), so ``PYTHONPATH`` may point at another checkout of fnnet. In one process
each round runs one epoch of every variant (the order rotates), timing the process's CPU time
(``time.process_time``, every thread) and the wall time. The ratio of a round is the variant's
time over ``chapter-workers0``'s in the same round (the chapter's faster loop, ``fnnet bench``'s
baseline); ``fnnet bench`` reports its inverse as the "x faster" figure. ``--compare`` launches
this probe with the code of another checkout and this one in turns and prints both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def probe(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from fnnet.bench import workloads as W

    names = args.variants.split(",")
    cases = {v: W.cnn_case(v, "cpu", samples=args.samples) for v in names}
    for case in cases.values():  # one more untimed epoch each (the first is in cnn_case)
        case.run()
    times: dict[str, list[tuple[float, float]]] = {v: [] for v in names}
    for r in range(args.rounds):
        for v in names[r % len(names):] + names[:r % len(names)]:
            c0, w0 = time.process_time(), time.perf_counter()
            cases[v].run()
            times[v].append((time.process_time() - c0, time.perf_counter() - w0))
    base = names[0]
    out = {"threads": torch.get_num_threads(), "samples": args.samples, "rounds": args.rounds,
           "load": os.getloadavg()[0], "times": times}
    for v in names[1:]:
        for i, what in enumerate(("cpu", "wall")):
            ratios = [t[i] / b[i] for t, b in zip(times[v], times[base])]
            out[f"{v}/{base} {what}"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    print(json.dumps(out), flush=True)


def compare(args: argparse.Namespace) -> None:
    codes = {"before": args.compare.resolve(), "after": ROOT}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--rounds", str(args.rounds), "--threads",
           str(args.threads), "--variants", args.variants, "--samples", str(args.samples)]
    with args.out.open("a") as out:
        for r in range(args.launches):
            for label in (("before", "after") if r % 2 == 0 else ("after", "before")):
                env = {**os.environ, "PYTHONPATH": str(codes[label])}
                load0 = os.getloadavg()[0]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600, cwd=codes[label])
                lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
                if proc.returncode != 0 or not lines:
                    raise SystemExit(f"probe with {codes[label]} failed:\n{proc.stderr[-3000:]}")
                row = {"code": label, "launch": r, "load_before": load0, **json.loads(lines[-1])}
                out.write(json.dumps(row) + "\n")
                out.flush()
                print(label, r, {k: round(v["median"], 3) for k, v in row.items() if isinstance(v, dict) and "median" in v},
                      flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--samples", type=int, default=12_800)
    parser.add_argument("--variants", default="chapter-workers0,fnnet-trainer")
    parser.add_argument("--compare", type=Path, default=None, help="another checkout, launched in turns with this one")
    parser.add_argument("--launches", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.compare is not None:
        if args.out is None:
            parser.error("--compare needs --out")
        compare(args)
    else:
        probe(args)


if __name__ == "__main__":
    main()
