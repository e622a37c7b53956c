"""Peak memory of training, side by side with the chapter's loop (each variant in a fresh process).

    pytest benches/test_bench_memory.py --benchmark-only          # CPU, and CUDA when present

Each case runs ``benches/memory_probe.py VARIANT`` in a new Python process (its docstring says
what is measured and how) and records ``peak_mb`` and ``ratio`` (over the chapter's loop on
the same device) in ``extra_info``; the run ends with a table. Targets (issue 17, CPU):
``trainer`` <= 1.1x and ``step-donate`` <= 1.05x the chapter's peak; ``step-pure`` holds one
more copy of the params and optimizer state by nature and is reported, not judged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = Path(__file__).with_name("memory_probe.py")
VARIANTS = ["chapter", "step-donate", "step-pure", "trainer", "parallel-2"]
# glibc: map large blocks and give them back at once, so the resident size follows live tensors
ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
_RESULTS: dict[tuple[str, str], dict] = {}


def probe(variant: str, device: str) -> dict:
    proc = subprocess.run([sys.executable, str(PROBE), variant, "--device", device], capture_output=True, text=True,
                          env=ENV, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"memory_probe {variant} on {device} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("variant", VARIANTS)
def test_peak_memory(benchmark, device, variant):
    if sys.platform != "linux" and device.type == "cpu":
        pytest.skip("the CPU peak is read from /proc (Linux)")
    dev = str(device)
    result = benchmark.pedantic(lambda: probe(variant, dev), rounds=1, iterations=1)
    _RESULTS[(variant, dev)] = result
    if ("chapter", dev) not in _RESULTS:  # the baseline, measured once (the chapter case is the first variant)
        _RESULTS[("chapter", dev)] = probe("chapter", dev)
    result["ratio"] = result["peak_mb"] / _RESULTS[("chapter", dev)]["peak_mb"]
    benchmark.group = f"peak memory, {device.type}"
    benchmark.extra_info.update(result)


def summary_rows() -> list[str]:
    """The table ``conftest.py`` prints at the end of the run."""
    rows = [f"{'variant':12s} {'device':7s} {'peak MB':>9s} {'vs chapter':>10s}"]
    for (variant, dev), r in sorted(_RESULTS.items(), key=lambda kv: (kv[0][1], VARIANTS.index(kv[0][0]))):
        rows.append(f"{variant:12s} {dev:7s} {r['peak_mb']:9.0f} {r['peak_mb'] / _RESULTS[('chapter', dev)]['peak_mb']:9.2f}x")
    return rows
