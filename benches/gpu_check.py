"""The prepared GPU check: one short run on a CUDA machine that measures what the README reports.

Run from a checkout (``bash benches/gpu_check.sh`` sets the paths up and calls this)::

    python benches/gpu_check.py [--out DIR] [--budget SECONDS] [--scale 1] [--cuda-only]

Steps, each a subprocess with its own time limit inside one budget, so that a slow step
never takes the others' time:

1. ``pytest -m cuda tests``: every CUDA test (compiled steps on the GPU included). It always
   runs, with at least ``MIN_TEST_SECONDS``, whatever the budget.
2. ``pytest benches --benchmark-only``: CPU and CUDA cases side by side (``--cuda-only``:
   the CUDA ones), each result appended to a JSON-lines file as soon as it is measured, so
   a step stopped at its limit keeps what it measured.
3. ``fnnet bench --device all --no-compile``: the newcomer's table.

It writes ``gpu-check-<date>-<gpu>.json`` (the summary), ``.md`` (tables) and ``.log`` (the
real, complete output of every step) plus the raw JSON of steps 2 and 3 into ``--out``,
``$OUT`` or ``benches/results/``. Without CUDA it is a dry run: step 1 is skipped with a
message and the CPU cases run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MIN_TEST_SECONDS = 90.0  # the CUDA tests always get this long, even from a small budget
BENCH_ORDER = {"test_bench_matmul.py": 0, "test_bench_linreg.py": 1, "test_bench_optim.py": 2, "test_bench_cnn.py": 3}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "unknown"


def run_step(name: str, cmd: list[str], timeout: float, env: dict[str, str]) -> dict[str, Any]:
    """Run one step; never raises. The step's whole output is kept in the result (``output``)."""
    print(f"[gpu-check] {name}: {' '.join(cmd)} (limit {timeout:.0f} s)", flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                              env=env, cwd=ROOT)
        output, rc = proc.stdout, proc.returncode
        status = "passed" if rc == 0 else "failed"
    except subprocess.TimeoutExpired as e:
        raw = e.stdout or b""
        output = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        rc, status = None, "timed out"
    seconds = time.perf_counter() - t0
    tail = "\n".join(output.strip().splitlines()[-15:])
    print(f"[gpu-check] {name}: {status} in {seconds:.0f} s\n{tail}\n", flush=True)
    return {"name": name, "command": " ".join(cmd), "status": status, "returncode": rc, "seconds": round(seconds, 1),
            "tail": tail, "output": output}


def results_from_pytest_benchmark(data: dict[str, Any]) -> list[Any]:
    """fnnet.bench rows from a ``pytest --benchmark-json`` file written by ``benches/`` (ratios recomputed)."""
    from fnnet.bench import Result, add_ratios, sort_results

    rows = []
    for b in data.get("benchmarks", []):
        x = b.get("extra_info", {})
        if "workload" not in x:
            continue  # not one of the chapter workloads (e.g. the optimizer's own benchmark)
        median = b["stats"]["median"]
        rows.append(Result(x["workload"], x["device"], x["variant"], median, [median], x.get("work"), x.get("unit", ""),
                           x["work"] / median if x.get("work") else None, first_call_s=x.get("first_call_s"),
                           size=x.get("size", {})))
    add_ratios(rows)
    return sort_results(rows)


def gpu_check(out_dir: str | None, *, budget_s: float, scale: float, cuda_only: bool) -> int:
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
        limit = max(MIN_TEST_SECONDS, 0.3 * left())
        steps.append(run_step("cuda tests", [py, "-m", "pytest", "-m", "cuda", "tests", "-q", "-rs", "-p",
                                             "no:cacheprovider"], limit, env))
    else:
        msg = "no CUDA device here (torch.cuda.is_available() is False): skipping `pytest -m cuda tests`"
        print(f"[gpu-check] {msg}", flush=True)
        steps.append({"name": "cuda tests", "status": "skipped", "reason": msg, "seconds": 0.0, "output": msg})

    bench_json = out / f"{stem}-pytest-benchmark.json"
    partial = out / f"{stem}-partial.jsonl"
    partial.unlink(missing_ok=True)
    env["FNNET_BENCH_LOG"] = str(partial)
    files = sorted((ROOT / "benches").glob("test_bench_*.py"), key=lambda f: (BENCH_ORDER.get(f.name, 50), f.name))
    steps.append(run_step("pytest benches", [py, "-m", "pytest", *(str(f.relative_to(ROOT)) for f in files),
                                             *(["-m", "cuda"] if cuda_only and cuda else []), "--benchmark-only", "-q",
                                             "-rs", f"--benchmark-json={bench_json}", "-p", "no:cacheprovider"],
                          max(60.0, left() - 60), env))
    cli_json = out / f"{stem}-bench.json"
    steps.append(run_step("fnnet bench", [py, "-m", "fnnet", "bench", "--device", "all", "--no-compile",
                                          "--json", str(cli_json)], max(30.0, left()), env))

    raw = json.loads(bench_json.read_text()) if bench_json.exists() else {}
    if not raw and partial.exists():  # the step ran out of time: keep what it measured
        raw = {"benchmarks": [json.loads(line) for line in partial.read_text().splitlines() if line.strip()]}
    summary = {
        "schema": "fnnet-gpu-check/2",
        "environment": environment(),
        "cuda_available": cuda,
        "scale": scale,
        "steps": [{k: v for k, v in s.items() if k != "output"} for s in steps],
        "benches": [dataclasses.asdict(r) for r in results_from_pytest_benchmark(raw)],
        "other_benches": [{"name": b["name"], "median_s": b["stats"]["median"], "extra_info": b.get("extra_info", {})}
                          for b in raw.get("benchmarks", []) if "workload" not in b.get("extra_info", {})],
        "bench": json.loads(cli_json.read_text())["results"] if cli_json.exists() else [],
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    (out / f"{stem}.json").write_text(json.dumps(summary, indent=2))
    (out / f"{stem}.md").write_text(markdown(summary))
    (out / f"{stem}.log").write_text("\n".join(f"===== {s['name']}: {s.get('command', '')}\n{s['output']}" for s in steps))
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
    lines += ["", f"## pytest benches (scale {summary['scale']} of the chapter's sizes; median of rounds)", ""]
    rows = [Result(**r) for r in summary["benches"]]
    lines.append(format_markdown(rows) if rows else "(no pytest-benchmark results)")
    if summary["other_benches"]:
        lines += ["", "Other benchmarks in `benches/` (median of rounds):", "", "| benchmark | median s | extra_info |",
                  "|---|---|---|"]
        for b in summary["other_benches"]:
            lines.append(f"| {b['name']} | {b['median_s']:.6f} | {json.dumps(b['extra_info'])} |")
    lines += ["", "## fnnet bench --device all --no-compile", ""]
    rows = [Result(**r) for r in summary["bench"]]
    lines.append(format_markdown(rows) if rows else "(no results)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="where the results go (default $OUT, else benches/results)")
    parser.add_argument("--budget", type=float, default=440.0, help="seconds for all steps together (default 440)")
    parser.add_argument("--scale", type=float, default=1.0, help="benchmark sizes as a fraction of the chapter's")
    parser.add_argument("--cuda-only", action="store_true", help="time only the CUDA cases in the pytest step")
    args = parser.parse_args(argv)
    return gpu_check(args.out, budget_s=args.budget, scale=args.scale, cuda_only=args.cuda_only)


if __name__ == "__main__":
    sys.exit(main())
