"""fnnet's distributed step against DDP, gloo on this machine, 1 and 2 processes (``distributed_probe.py``).

    pytest benches/test_bench_distributed.py --benchmark-only

Each case launches ``torchrun --nproc-per-node N benches/distributed_probe.py MODEL``, in which
every rank runs fnnet's step and DDP's in turns; ``extra_info`` holds both medians (seconds
per step) and ``ratio`` (fnnet / DDP: target <= 1.1). The table at the end adds the scaling
from 1 to 2 processes: global samples per second with 2 ranks over 1 rank (on a 2-core
machine each rank has one core, and gloo's all-reduce competes with the compute for them).
On a machine with one GPU, NCCL with one GPU per rank cannot be measured (two ranks would
share the GPU): these are CPU numbers.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = Path(__file__).with_name("distributed_probe.py")
ROOT = PROBE.parent.parent
_RESULTS: dict[tuple[str, int], dict] = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def probe(model: str, nproc: int) -> dict:
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(PROBE), model]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"distributed_probe {model} x{nproc} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("model", ["cnn", "mlp"])
def test_distributed_step_against_ddp(benchmark, model, nproc):
    result = benchmark.pedantic(lambda: probe(model, nproc), rounds=1, iterations=1)
    _RESULTS[(model, nproc)] = result
    benchmark.group = "distributed step vs DDP (gloo)"
    benchmark.extra_info.update(result)


def summary_rows() -> list[str]:
    rows = [f"{'model':5s} {'ranks':>5s} {'fnnet ms':>9s} {'DDP ms':>8s} {'fnnet/DDP':>9s} {'scaling 1->2':>12s}"]
    for (model, nproc), r in sorted(_RESULTS.items()):
        one = _RESULTS.get((model, 1))
        scaling = (f"{2 * one['fnnet_s'] / r['fnnet_s']:.2f}x" if nproc == 2 and one else "")
        rows.append(f"{model:5s} {nproc:5d} {r['fnnet_s'] * 1e3:9.1f} {r['ddp_s'] * 1e3:8.1f} {r['ratio']:8.2f}x "
                    f"{scaling:>12s}")
    return rows
