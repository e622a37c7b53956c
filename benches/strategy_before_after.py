"""Before/after the strategy rewrite (issue 29): the distributed step against DDP and the sharded step
against ZeroRedundancyOptimizer + DDP, with the old code and the new one in turns.

    git worktree add --detach /tmp/base <commit before the change>
    python benches/strategy_before_after.py --base /tmp/base --rounds 3 --out results.jsonl

Each round runs, for "before" (``PYTHONPATH=--base``) and "after" (this checkout) in an order that
alternates between rounds: ``distributed_probe.py mlp`` and ``cnn`` on 2 ranks (fnnet against DDP
in the same ranks, step by step) and ``shard_probe.py time`` on 2 ranks (sharded step against
ZeRO + DDP). The probes' own ratios are what compare: each is measured side by side within one
launch; the rounds give the spread. Every probe's JSON line is appended to ``--out`` with its
label and round; a summary (median and min-max of each ratio) is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROBES = {
    "ddp-mlp": (["distributed_probe.py", "mlp", "--steps", "12", "--warmup", "3"], "ratio"),
    "ddp-cnn": (["distributed_probe.py", "cnn", "--steps", "12", "--warmup", "3"], "ratio"),
    "zero": (["shard_probe.py", "time", "--steps", "8", "--warmup", "2"], "sharded_to_zero_ddp"),
}


def run(code: Path, probe: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(HERE / probe[0]), *probe[1:]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{cmd} with {code} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--probes", nargs="*", default=list(PROBES))
    parser.add_argument("--start", type=int, default=0, help="the first round's number (more rounds of a run)")
    args = parser.parse_args()
    codes = {"before": args.base.resolve(), "after": ROOT}
    ratios: dict[tuple[str, str], list[float]] = {}
    with args.out.open("a") as out:
        for r in range(args.start, args.start + args.rounds):
            for name in args.probes:
                order = ("before", "after") if r % 2 == 0 else ("after", "before")
                for label in order:
                    result = run(codes[label], PROBES[name][0])
                    out.write(json.dumps({"probe": name, "code": label, "round": r, **result}) + "\n")
                    out.flush()
                    ratios.setdefault((name, label), []).append(result[PROBES[name][1]])
                    print(name, label, r, round(result[PROBES[name][1]], 3), flush=True)
    for (name, label), values in sorted(ratios.items()):
        print(f"{name:8s} {label:6s} median {statistics.median(values):.3f} (min {min(values):.3f}, "
              f"max {max(values):.3f}, n={len(values)})")


if __name__ == "__main__":
    main()
