"""The prepared GPU check: one short run on a CUDA machine that measures what docs/performance.md reports.

Run from a checkout (``bash benches/gpu_check.sh`` sets the paths up and calls this)::

    python benches/gpu_check.py [--out DIR] [--budget SECONDS] [--scale 1]

Steps, each a subprocess (its own process group, killed whole at its time limit) inside one
budget, so that a slow step never takes the others' time (issue 16 lists what each answers):

1. ``pytest -m cuda tests``: every CUDA test (compiled steps and the compiled Trainer checked
   against eager on the GPU included). It always runs, with ``MIN_TEST_SECONDS`` or
   ``TEST_SHARE`` of the budget, whichever is more, and its complete output is saved. The
   later steps share what is left (``STEP_WEIGHTS``); one with less than ``MIN_STEP_SECONDS``
   left is reported "out of budget" and the check exits 1.
2. ``fnnet bench --workloads linreg --repeats 15``: the linear regression's variants timed
   round-robin (interleaved), medians, at the chapter's size: eager and donated steps
   against the chapter's loop, compiled and CUDA-graph steps.
3. ``fnnet bench --workloads matmul,cnn --repeats 5``: the matmul in fp32/TF32/bf16 against
   the GPU's spec-sheet peak, and one 60,000-sample epoch of the chapter's CNN per run
   (chapter loops, eager and compiled Trainer, channels-last and bf16 as options).
4. ``pytest benches/test_bench_parallel.py benches/test_bench_memory.py
   benches/test_bench_optim.py -m cuda --benchmark-only``: data parallel on the GPU (two
   shards on one GPU, a mixed CUDA+CPU pair), peak memory, the optimizer step.

It writes ``gpu-check-<date>-<gpu>.json`` (the summary), ``.md`` (tables) and ``.log`` (the
real, complete output of every step) plus each step's raw JSON into ``--out``, ``$OUT`` or
``benches/results/``; a step's outputs from an earlier run are removed before it starts, so a
step that writes nothing reports nothing. Without CUDA it is a dry run on the CPU (step 1 is skipped with a
message): use it to check the script, never for numbers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MIN_TEST_SECONDS = 150.0  # the CUDA tests always get this long, even from a small budget
TEST_SHARE = 0.35  # of the budget, when that is more
MIN_STEP_SECONDS = 20.0  # a later step with less than this left is not started ("out of budget")
# The later steps share what is left in these proportions (the CNN epochs are the long ones).
STEP_WEIGHTS = {"linreg interleaved": 0.25, "matmul and cnn": 0.45, "pytest benches": 0.30}
PYTEST_BENCHES = ("test_bench_parallel.py", "test_bench_memory.py", "test_bench_optim.py")
# Dense spec-sheet peaks in TFLOP/s, SXM boards only (NVIDIA's H100/H200 SXM data sheets; the
# sparse figures are twice these). PCIe and NVL boards have lower peaks: reported as unknown.
PEAK_TFLOPS = {"H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4}, "H100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4}}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "unknown"


def run_step(name: str, cmd: list[str], timeout: float, env: dict[str, str]) -> dict[str, Any]:
    """Run one step; never raises. The step's whole output is kept in the result (``output``).

    The step runs in a session of its own: at its time limit the whole process group is
    killed (DataLoader workers and compile workers included), so nothing runs on into the
    next step's timings.
    """
    print(f"[gpu-check] {name}: {' '.join(cmd)} (limit {timeout:.0f} s)", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        rc = proc.returncode
        status = "passed" if rc == 0 else "failed"
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        output, _ = proc.communicate()
        rc, status = None, "timed out"
    output = output or ""
    seconds = time.perf_counter() - t0
    tail = "\n".join(output.strip().splitlines()[-15:])
    print(f"[gpu-check] {name}: {status} in {seconds:.0f} s\n{tail}\n", flush=True)
    return {"name": name, "command": " ".join(cmd), "status": status, "returncode": rc, "seconds": round(seconds, 1),
            "tail": tail, "output": output}


def _json_lines(path: Path) -> list[dict[str, Any]]:
    """The complete JSON lines of ``path`` (a line cut short by a killed writer is dropped)."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def matmul_peak(rows: list[dict[str, Any]], gpu: str) -> list[dict[str, Any]]:
    """Each CUDA matmul variant's measured TFLOP/s and its share of the GPU's dense spec-sheet peak."""
    sxm = not any(board in gpu for board in ("PCIe", "NVL"))
    peaks = next((p for name, p in PEAK_TFLOPS.items() if name in gpu and sxm), None)
    out = []
    for r in rows:
        if r["workload"] == "matmul" and r["device"].startswith("cuda") and r.get("throughput"):
            tflops = r["throughput"] / 1000  # GFLOP/s -> TFLOP/s
            peak = peaks.get(r["variant"]) if peaks else None
            out.append({"variant": r["variant"], "tflops": round(tflops, 1), "peak_tflops": peak,
                        "of_peak": round(tflops / peak, 3) if peak else None})
    return out


def gpu_check(out_dir: str | None, *, budget_s: float, scale: float) -> int:
    import torch
    from fnnet.bench import environment

    t_start = time.perf_counter()
    out = Path(out_dir or os.environ.get("OUT") or ROOT / "benches" / "results").resolve()
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    gpu = torch.cuda.get_device_name(0) if cuda else "no-gpu"
    stem = f"gpu-check-{dt.date.today().isoformat()}-{_slug(gpu)}"
    py = sys.executable
    env = {**os.environ, "FNNET_BENCH_SCALE": str(scale), "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    steps: list[dict[str, Any]] = []

    def left() -> float:
        return budget_s - (time.perf_counter() - t_start)

    print(f"[gpu-check] device: {gpu}; torch {torch.__version__}; writing {out / stem}.*", flush=True)
    if cuda:
        limit = max(MIN_TEST_SECONDS, TEST_SHARE * budget_s)
        steps.append(run_step("cuda tests", [py, "-m", "pytest", "-m", "cuda", "tests", "-q", "-rs", "-p",
                                             "no:cacheprovider"], limit, env))
    else:
        msg = "no CUDA device here (torch.cuda.is_available() is False): skipping `pytest -m cuda tests`"
        print(f"[gpu-check] {msg}", flush=True)
        steps.append({"name": "cuda tests", "status": "skipped", "reason": msg, "seconds": 0.0, "output": msg})

    def later_step(name: str, cmd: list[str], outputs: list[Path]) -> None:
        """Run ``name`` with its share of what is left, after removing its outputs of any earlier run."""
        for f in outputs:
            f.unlink(missing_ok=True)
        weights = list(STEP_WEIGHTS)
        remaining = sum(STEP_WEIGHTS[n] for n in weights[weights.index(name):])
        limit = left() * STEP_WEIGHTS[name] / remaining
        if limit < MIN_STEP_SECONDS:
            msg = f"not started: {left():.0f} s of the {budget_s:.0f} s budget left"
            print(f"[gpu-check] {name}: {msg}", flush=True)
            steps.append({"name": name, "command": " ".join(cmd), "status": "out of budget", "reason": msg,
                          "seconds": 0.0, "output": msg})
        else:
            steps.append(run_step(name, cmd, limit, env))

    device = "cuda" if cuda else "cpu"
    cli_files = []
    # In the second step matmul runs before the CNN: fnnet bench writes its JSON only at the end,
    # but prints each variant's time as it finishes, and the .log keeps that output; the quick
    # workload first is then kept even if the CNN epochs run past the step's limit.
    for name, workloads, repeats in [("linreg interleaved", "linreg", 15), ("matmul and cnn", "matmul,cnn", 5)]:
        cli_json = out / f"{stem}-bench-{workloads.replace(',', '-')}.json"
        cli_files.append(cli_json)
        later_step(name, [py, "-m", "fnnet", "bench", "--device", device, "--workloads", workloads, "--scale",
                          str(scale), "--repeats", str(repeats), "--json", str(cli_json)], [cli_json])

    bench_json = out / f"{stem}-pytest-benchmark.json"
    partial = out / f"{stem}-partial.jsonl"  # benches/conftest.py appends each result as it is measured
    env["FNNET_BENCH_LOG"] = str(partial)
    later_step("pytest benches", [py, "-m", "pytest", *(f"benches/{f}" for f in PYTEST_BENCHES),
                                  *(["-m", "cuda"] if cuda else []), "--benchmark-only", "-q", "-rs",
                                  f"--benchmark-json={bench_json}", "-p", "no:cacheprovider"], [bench_json, partial])

    raw = json.loads(bench_json.read_text()) if bench_json.exists() else {}
    if not raw and partial.exists():  # the step ran out of time: keep what it measured
        raw = {"benchmarks": _json_lines(partial)}
    bench_rows = [r for f in cli_files if f.exists() for r in json.loads(f.read_text())["results"]]
    summary = {
        "schema": "fnnet-gpu-check/3",
        "environment": environment(),
        "cuda_available": cuda,
        "scale": scale,
        "steps": [{k: v for k, v in s.items() if k != "output"} for s in steps],
        "bench": bench_rows,
        "matmul_peak": matmul_peak(bench_rows, gpu),
        "pytest_benches": [{"name": b["name"], "median_s": b["stats"]["median"], "extra_info": b.get("extra_info", {})}
                           for b in raw.get("benchmarks", [])],
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    # the complete output first: it is what matters most when anything after it fails
    (out / f"{stem}.log").write_text("\n".join(f"===== {s['name']}: {s.get('command', '')}\n{s['output']}" for s in steps))
    (out / f"{stem}.json").write_text(json.dumps(summary, indent=2))
    (out / f"{stem}.md").write_text(markdown(summary))
    print((out / f"{stem}.md").read_text(), flush=True)
    print(f"[gpu-check] wrote {out / stem}.json, .md and .log in {summary['seconds']:.0f} s", flush=True)
    return 0 if all(s["status"] in ("passed", "skipped") for s in steps) else 1


def markdown(summary: dict[str, Any]) -> str:
    from fnnet.bench import Result, format_markdown

    env = summary["environment"]
    lines = [
        f"# fnnet GPU check, {env['date']}",
        "",
        f"- GPU: {', '.join(env['gpus']) or 'none (dry run: CUDA parts skipped)'}",
        f"- CPU: {env['cpu']}, {env['cpu_count']} cores, torch threads {env['torch_threads']}",
        f"- torch {env['torch']} (CUDA {env['cuda']}), Python {env['python']}, fnnet {env['fnnet']}",
        f"- scale {summary['scale']}, total {summary['seconds']} s",
        "",
        "## Steps (the complete output of each is in the .log file)",
        "",
        "| step | status | seconds | last line |",
        "|---|---|---|---|",
    ]
    for s in summary["steps"]:
        last = (s.get("tail") or s.get("reason") or "").strip().splitlines()[-1:] or [""]
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']} | {last[0].replace('|', '/')} |")
    lines += ["", f"## fnnet bench (scale {summary['scale']}: the chapter's sizes at 1; interleaved rounds, medians)", ""]
    rows = [Result(**r) for r in summary["bench"]]
    lines.append(format_markdown(rows) if rows else "(no results)")
    if summary["matmul_peak"]:
        lines += ["", "Matmul against the dense spec-sheet peak:", "", "| variant | TFLOP/s | peak | share |",
                  "|---|---|---|---|"]
        for m in summary["matmul_peak"]:
            share = f"{m['of_peak']:.0%}" if m["of_peak"] is not None else "n/a"
            lines.append(f"| {m['variant']} | {m['tflops']} | {m['peak_tflops'] or 'unknown GPU'} | {share} |")
    lines += ["", "## pytest benches (data parallel, memory, optimizer; median of rounds)", "",
              "| benchmark | median s | extra_info |", "|---|---|---|"]
    for b in summary["pytest_benches"]:
        lines.append(f"| {b['name']} | {b['median_s']:.6f} | {json.dumps(b['extra_info'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="where the results go (default $OUT, else benches/results)")
    parser.add_argument("--budget", type=float, default=440.0, help="seconds for all steps together (default 440)")
    parser.add_argument("--scale", type=float, default=1.0, help="benchmark sizes as a fraction of the chapter's")
    args = parser.parse_args(argv)
    return gpu_check(args.out, budget_s=args.budget, scale=args.scale)


if __name__ == "__main__":
    sys.exit(main())
