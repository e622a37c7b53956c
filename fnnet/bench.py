"""``fnnet bench``: how much a GPU helps, and what fnnet costs over plain PyTorch, on this machine.

Runs the chapter's workloads (matmul, linear regression, CNN; defined once in
``fnnet._workloads``, which ``benches/`` times with pytest-benchmark too) at ``--scale`` times
the chapter's sizes and prints one row per workload, device and variant::

    fnnet bench                          # CPU, and CUDA when present
    fnnet bench --device cuda --scale 1  # the chapter's full sizes on the GPU
    fnnet bench --json out.json --plot out.png
    python -m fnnet.bench --gpu-check    # CUDA tests + benches + this table, into $OUT

Every timing waits for the device inside the timed call, follows a warm-up, and is the
median of ``--repeats`` runs; the variants of a workload take turns run by run, so load from
elsewhere on a shared machine hits them all alike. ``time/chapter`` is this variant's time over the chapter's way
on the same device (below 1 is faster); ``vs cpu`` is its throughput over the chapter's way
on the CPU (the GPU speed-up a newcomer asks about). Compiled variants report their first
call (the compilation) apart from the steady state.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from . import _workloads as W

__all__ = [
    "Result", "measure", "run", "format_table", "format_markdown", "to_json", "results_from_pytest_benchmark", "sort_results", "plot",
    "gpu_check", "add_arguments", "register", "main",
]

WORKLOADS = ("matmul", "linreg", "cnn")
DEFAULT_SCALE = 0.05  # about a minute for everything on a 2-core CPU, compilation included


@dataclasses.dataclass
class Result:
    """One row of the table: the median time of one variant, or why it did not run."""

    workload: str
    device: str
    variant: str
    seconds: float | None = None  # median of `times`
    times: list[float] = dataclasses.field(default_factory=list)
    work: float | None = None
    unit: str = ""
    throughput: float | None = None
    ratio: float | None = None  # seconds / seconds of the chapter's way on this device
    vs_cpu: float | None = None  # throughput / throughput of the chapter's way on the CPU
    first_call_s: float | None = None
    size: dict[str, Any] = dataclasses.field(default_factory=dict)
    skipped: str | None = None


def _log(msg: str, verbose: bool) -> None:
    if verbose:
        print(msg, file=sys.stderr, flush=True)


def measure(case: W.Case, *, repeats: int = 3, warmup: int = 1) -> list[float]:
    """Wall-clock times of ``repeats`` runs of ``case`` after ``warmup`` untimed runs."""
    for _ in range(warmup):
        case.run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        case.run()
        times.append(time.perf_counter() - t0)
    return times


def _devices(which: str) -> tuple[list[torch.device], list[str]]:
    """The devices ``--device`` names here, and notes about the ones that are missing."""
    if which not in ("cpu", "cuda", "all"):
        raise ValueError(f"--device must be cpu, cuda or all, got {which!r}")
    devs, notes = [], []
    if which in ("cpu", "all"):
        devs.append(torch.device("cpu"))
    if which in ("cuda", "all"):
        if torch.cuda.is_available():
            devs.append(torch.device("cuda", 0))
        else:
            notes.append("CUDA: not available here (torch.cuda.is_available() is False); CUDA rows skipped")
    return devs, notes


def run(
    workloads: Sequence[str] = WORKLOADS,
    devices: Sequence[torch.device | str] = ("cpu",),
    *,
    scale: float = DEFAULT_SCALE,
    repeats: int = 3,
    warmup: int = 1,
    compile: bool = True,
    steps: int = 20,
    verbose: bool = False,
) -> list[Result]:
    """Measure every variant of ``workloads`` on ``devices``; returns one :class:`Result` each.

    Variants that cannot run here (CUDA-only ones on CPU, fnnet modules not present, compiled
    ones with ``compile=False``) come back with ``skipped`` set rather than raising.
    """
    for w in workloads:
        if w not in WORKLOADS:
            raise ValueError(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    results: list[Result] = []
    for workload in workloads:
        for dev in map(torch.device, devices):
            results += _run_group(workload, dev, scale=scale, repeats=repeats, warmup=warmup, compile=compile,
                                  steps=steps, verbose=verbose)
    _add_ratios(results)
    return results


def _run_group(workload: str, dev: torch.device, *, scale: float, repeats: int, warmup: int, compile: bool,
               steps: int, verbose: bool) -> list[Result]:
    """All variants of one workload on one device, timed round-robin.

    Each repeat runs every variant once in turn, so a burst of load from elsewhere on a
    shared machine slows all of them rather than whichever happened to be running: the
    ratios stay fair even when the absolute numbers move.
    """
    rows: list[Result] = []
    cases: dict[str, W.Case] = {}
    W.reset_compiler()
    for variant in W.variants(workload):
        if variant in W.CUDA_ONLY and dev.type != "cuda":
            continue  # not a result: the variant does not exist on this device
        row = Result(workload, str(dev), variant)
        rows.append(row)
        if variant in W.COMPILED and not compile:
            row.skipped = "compiled variants off (--no-compile)"
            continue
        _log(f"{workload:7s} {str(dev):7s} {variant:22s} setting up", verbose)
        try:
            cases[variant] = W.build(workload, variant, dev, scale=scale, steps=steps)
        except W.Unavailable as e:
            row.skipped = str(e)
        except Exception as e:  # noqa: BLE001 - one broken variant must not hide the rest
            row.skipped = f"failed: {type(e).__name__}: {e}"
            _log(f"  {row.skipped}", verbose)
    by_variant = {r.variant: r for r in rows}
    for i in range(warmup + repeats):
        for variant, case in list(cases.items()):
            try:
                t0 = time.perf_counter()
                case.run()
                elapsed = time.perf_counter() - t0
            except Exception as e:  # noqa: BLE001
                by_variant[variant].skipped = f"failed: {type(e).__name__}: {e}"
                del cases[variant]
                continue
            if i >= warmup:
                by_variant[variant].times.append(elapsed)
    for variant, case in cases.items():
        row = by_variant[variant]
        row.seconds = statistics.median(row.times)
        row.work, row.unit, row.size, row.first_call_s = case.work, case.unit, case.size, case.first_call_s
        row.throughput = case.throughput(row.seconds)
        _log(f"{workload:7s} {str(dev):7s} {variant:22s} {_fmt_time(row.seconds)} per run, "
             f"{_fmt_rate(row.throughput, row.unit)}", verbose)
    return rows


def _add_ratios(results: list[Result]) -> None:
    by_key = {(r.workload, r.device, r.variant): r for r in results if r.seconds}
    for r in results:
        if not r.seconds:
            continue
        base = by_key.get((r.workload, r.device, W.BASELINE[r.workload]))
        if base is not None and base.work == r.work:
            r.ratio = r.seconds / base.seconds
        cpu = by_key.get((r.workload, "cpu", W.BASELINE[r.workload]))
        if r.device != "cpu" and cpu is not None and cpu.throughput and r.throughput:
            r.vs_cpu = r.throughput / cpu.throughput


# -- output ---------------------------------------------------------------------------------
def _fmt_time(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def _fmt_rate(x: float | None, unit: str) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:,.0f} {unit}" if x >= 100 else f"{x:.3g} {unit}"


def _size_text(size: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in size.items() if k != "dtype")


def _rows(results: Sequence[Result]) -> list[list[str]]:
    rows = []
    for r in results:
        if r.skipped:
            rows.append([r.workload, r.device, r.variant, "skipped", r.skipped, "", "", "", ""])
            continue
        rows.append([
            r.workload, r.device, r.variant, _fmt_time(r.seconds), _fmt_rate(r.throughput, r.unit),
            "-" if r.ratio is None else f"{r.ratio:.2f}x",
            "-" if r.vs_cpu is None else f"{r.vs_cpu:.2f}x",
            _fmt_time(r.first_call_s), _size_text(r.size),
        ])
    return rows


HEADER = ["workload", "device", "variant", "time", "throughput", "time/chapter", "vs cpu", "first call", "size"]


def format_table(results: Sequence[Result]) -> str:
    """The results as an aligned text table (what ``fnnet bench`` prints)."""
    rows = _rows(results)
    timed_rows = [row for row in rows if row[3] != "skipped"]  # a skip's reason runs past the columns
    widths = [max([len(h)] + [len(row[i]) for row in timed_rows] + [len(row[i]) for row in rows if i < 4])
              for i, h in enumerate(HEADER)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(HEADER, widths)), "  ".join("-" * w for w in widths)]
    for row in rows:
        if row[3] == "skipped":
            lines.append("  ".join(c.ljust(w) for c, w in zip(row[:4], widths[:4])) + "  " + row[4])
        else:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def format_markdown(results: Sequence[Result]) -> str:
    """The results as a markdown table (for the GPU check's summary and the README)."""
    out = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for row in _rows(results):
        out.append("| " + " | ".join(c.replace("|", "/") for c in row) + " |")
    return "\n".join(out)


def environment() -> dict[str, Any]:
    """What the numbers were measured on: versions, CPU threads, GPUs."""
    import fnnet

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "fnnet": getattr(fnnet, "__version__", "?"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpus": gpus,
    }


def to_json(results: Sequence[Result], **settings: Any) -> dict[str, Any]:
    """A JSON-ready dict: ``{"schema", "environment", "settings", "results": [...]}``."""
    return {
        "schema": "fnnet-bench/1",
        "environment": environment(),
        "settings": settings,
        "results": [dataclasses.asdict(r) for r in results],
    }


def plot(results: Sequence[Result], path: str | os.PathLike) -> None:
    """A bar chart of throughput per variant, one panel per workload (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib (or fnnet[plot])") from None
    done = [r for r in results if r.throughput]
    workloads = [w for w in WORKLOADS if any(r.workload == w for r in done)]
    if not workloads:
        raise RuntimeError("nothing to plot: no variant produced a timing")
    fig, axes = plt.subplots(1, len(workloads), figsize=(5 * len(workloads), 4), squeeze=False)
    for ax, w in zip(axes[0], workloads):
        rows = [r for r in done if r.workload == w]
        labels = [f"{r.variant}\n{r.device}" for r in rows]
        colors = ["tab:orange" if r.device.startswith("cuda") else "tab:blue" for r in rows]
        ax.bar(range(len(rows)), [r.throughput for r in rows], color=colors)
        ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_title(w)
        ax.set_ylabel(rows[0].unit)
    fig.suptitle("fnnet bench (blue: CPU, orange: CUDA; higher is faster)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- the GPU check ----------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "unknown"


def _run_step(name: str, cmd: list[str], timeout: float, log: list[str], env: dict[str, str], cwd: Path) -> dict[str, Any]:
    """Run one step of the GPU check as a subprocess; never raises, always reports."""
    print(f"[gpu-check] {name}: {' '.join(cmd)} (timeout {timeout:.0f} s)", flush=True)
    if timeout < 10:
        return {"name": name, "command": " ".join(cmd), "status": "skipped", "reason": "out of time", "seconds": 0.0}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                              env=env, cwd=cwd)
        output, rc = proc.stdout, proc.returncode
        # pytest: 0 passed, 5 nothing collected/selected (e.g. no CUDA tests yet)
        status = "passed" if rc == 0 or (rc == 5 and "pytest" in cmd) else "failed"
    except subprocess.TimeoutExpired as e:
        raw = e.stdout or b""
        output = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        rc, status = None, "timed out"
    seconds = time.perf_counter() - t0
    log.append(f"===== {name}: {' '.join(cmd)}\n{output}")
    tail = "\n".join(output.strip().splitlines()[-15:])
    print(f"[gpu-check] {name}: {status} in {seconds:.0f} s\n{tail}\n", flush=True)
    return {"name": name, "command": " ".join(cmd), "status": status, "returncode": rc,
            "seconds": round(seconds, 1), "tail": tail}


def results_from_pytest_benchmark(data: dict[str, Any]) -> list[Result]:
    """Rows from a ``pytest --benchmark-json`` file written by ``benches/`` (ratios recomputed)."""
    rows = []
    for b in data.get("benchmarks", []):
        x = b.get("extra_info", {})
        if "workload" not in x:
            continue  # not one of the chapter workloads (e.g. the optimizer's own benchmark)
        median = b["stats"]["median"]
        rows.append(Result(x["workload"], x["device"], x["variant"], median, [median], x.get("work"), x.get("unit", ""),
                           x["work"] / median if x.get("work") else None, first_call_s=x.get("first_call_s"),
                           size=x.get("size", {})))
    _add_ratios(rows)
    return sort_results(rows)


def sort_results(results: Sequence[Result]) -> list[Result]:
    """Workloads in the chapter's order, then device, then each workload's variant order."""
    def key(r: Result) -> tuple:
        order = W.variants(r.workload) if r.workload in WORKLOADS else ()
        return (WORKLOADS.index(r.workload) if r.workload in WORKLOADS else 99, r.device,
                order.index(r.variant) if r.variant in order else 99)
    return sorted(results, key=key)


_BENCH_ORDER = {"test_bench_matmul.py": 0, "test_bench_linreg.py": 1, "test_bench_optim.py": 2, "test_bench_cnn.py": 3}


def gpu_check(out_dir: str | os.PathLike | None = None, *, budget_s: float = 450, scale: float = 1.0,
              cuda_only: bool = False) -> int:
    """The prepared GPU check: CUDA tests, ``pytest benches``, ``fnnet bench --device all --no-compile``.

    Writes ``gpu-check-<date>-<gpu>.json`` and ``.md`` (plus the raw pytest-benchmark JSON,
    the bench JSON and a full log) into ``out_dir`` (default ``$OUT``, else
    ``benches/results``). Steps share ``budget_s`` seconds; a step that runs out of time is
    recorded as timed out and the summary is still written. ``cuda_only`` times only the CUDA
    benchmark cases in the pytest step (CPU numbers then come from the ``fnnet bench`` table,
    at its small default scale), for a short device lease. Without CUDA the CUDA steps are
    skipped with a message and the CPU benchmarks still run (a dry run). Returns 0 when no
    step failed.
    """
    t_start = time.perf_counter()
    root = Path(__file__).resolve().parent.parent
    out = Path(out_dir or os.environ.get("OUT") or root / "benches" / "results").resolve()
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    gpu = torch.cuda.get_device_name(0) if cuda else "no-gpu"
    stem = f"gpu-check-{_dt.date.today().isoformat()}-{_slug(gpu)}"
    py = sys.executable
    env = {**os.environ, "FNNET_BENCH_SCALE": str(scale), "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    log: list[str] = []
    steps: list[dict[str, Any]] = []

    def left(reserve: float = 0.0) -> float:
        return budget_s - (time.perf_counter() - t_start) - reserve

    print(f"[gpu-check] device: {gpu}; torch {torch.__version__}; writing {out / stem}.*", flush=True)
    if cuda:
        steps.append(_run_step("cuda tests", [py, "-m", "pytest", "-m", "cuda", "tests", "-q", "-p", "no:cacheprovider"],
                               min(120.0, left(300)), log, env, root))
    else:
        msg = "no CUDA device here (torch.cuda.is_available() is False): skipping `pytest -m cuda tests`"
        print(f"[gpu-check] {msg}", flush=True)
        steps.append({"name": "cuda tests", "status": "skipped", "reason": msg, "seconds": 0.0})

    bench_json = out / f"{stem}-pytest-benchmark.json"
    # Each result is also appended to a JSON-lines file as it is measured, so a step stopped
    # at its time limit still leaves what it measured; the cheap files run first.
    partial = out / f"{stem}-partial.jsonl"
    partial.unlink(missing_ok=True)
    env["FNNET_BENCH_LOG"] = str(partial)
    files = sorted((root / "benches").glob("test_bench_*.py"), key=lambda f: (_BENCH_ORDER.get(f.name, 50), f.name))
    steps.append(_run_step("pytest benches", [py, "-m", "pytest", *(str(f.relative_to(root)) for f in files),
                                              *(["-m", "cuda"] if cuda_only and cuda else []),
                                              "--benchmark-only", "-q", "-rs", f"--benchmark-json={bench_json}",
                                              "-p", "no:cacheprovider"],
                           left(60), log, env, root))
    if not cuda:
        print("[gpu-check] (CUDA benchmark parameters were skipped: no CUDA device)", flush=True)

    # The newcomer's table at its default size; the compiled variants were timed (at
    # `scale`) by the step above, and compiling them again would not fit the budget.
    cli_json = out / f"{stem}-bench.json"
    steps.append(_run_step("fnnet bench", [py, "-m", "fnnet.bench", "--device", "all", "--no-compile",
                                           "--json", str(cli_json)], left(10), log, env, root))

    raw = json.loads(bench_json.read_text()) if bench_json.exists() else {}
    if not raw and partial.exists():  # the step ran out of time: keep what it measured
        raw = {"benchmarks": [json.loads(line) for line in partial.read_text().splitlines() if line.strip()]}
    summary = {
        "schema": "fnnet-gpu-check/1",
        "environment": environment(),
        "cuda_available": cuda,
        "scale": scale,
        "steps": steps,
        "benches": [dataclasses.asdict(r) for r in results_from_pytest_benchmark(raw)],
        "other_benches": [{"name": b["name"], "median_s": b["stats"]["median"], "extra_info": b.get("extra_info", {})}
                          for b in raw.get("benchmarks", []) if "workload" not in b.get("extra_info", {})],
        "bench": json.loads(cli_json.read_text())["results"] if cli_json.exists() else [],
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    (out / f"{stem}.json").write_text(json.dumps(summary, indent=2))
    (out / f"{stem}.md").write_text(_gpu_check_markdown(summary))
    (out / f"{stem}.log").write_text("\n".join(log))
    print((out / f"{stem}.md").read_text(), flush=True)
    print(f"[gpu-check] wrote {out / stem}.json and .md in {summary['seconds']:.0f} s", flush=True)
    return 0 if all(s["status"] in ("passed", "skipped") for s in steps) else 1


def _gpu_check_markdown(summary: dict[str, Any]) -> str:
    env = summary["environment"]
    lines = [
        f"# fnnet GPU check, {env['date']}",
        "",
        f"- GPU: {', '.join(env['gpus']) or 'none (dry run: CUDA parts skipped)'}",
        f"- CPU: {env['cpu']}, {env['cpu_count']} cores, torch threads {env['torch_threads']}",
        f"- torch {env['torch']} (CUDA {env['cuda']}), Python {env['python']}, fnnet {env['fnnet']}",
        f"- scale {summary['scale']}, total {summary['seconds']} s",
        "",
        "## Steps",
        "",
        "| step | status | seconds |",
        "|---|---|---|",
    ]
    for s in summary["steps"]:
        lines.append(f"| {s['name']} | {s['status']}{' (' + s['reason'] + ')' if s.get('reason') else ''} | {s['seconds']} |")
    lines += ["", f"## pytest benches (scale {summary['scale']} of the chapter's sizes; median of rounds)", ""]
    rows = [Result(**r) for r in summary["benches"]]
    lines.append(format_markdown(rows) if rows else "(no pytest-benchmark results)")
    if summary["other_benches"]:
        lines += ["", "Other benchmarks in `benches/` (median of rounds):", "", "| benchmark | median | extra_info |",
                  "|---|---|---|"]
        for b in summary["other_benches"]:
            lines.append(f"| {b['name']} | {_fmt_time(b['median_s'])} | {json.dumps(b['extra_info'])} |")
    lines += ["", "## fnnet bench --device all", ""]
    rows = [Result(**r) for r in summary["bench"]]
    lines.append(format_markdown(rows) if rows else "(no results)")
    failed = [s for s in summary["steps"] if s["status"] in ("failed", "timed out")]
    for s in failed:
        lines += ["", f"## {s['name']}: {s['status']} (last lines)", "", "```", s.get("tail", ""), "```"]
    return "\n".join(lines) + "\n"


# -- command line -----------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` options, for ``fnnet bench`` and ``python -m fnnet.bench``."""
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all",
                        help="where to run: cpu, cuda, or all (CPU plus CUDA when present; default)")
    parser.add_argument("--scale", type=float, default=None,
                        help=f"problem size as a fraction of the chapter's (default {DEFAULT_SCALE}; 1 = full size; "
                             "--gpu-check defaults to 1)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help="comma-separated subset of matmul,linreg,cnn (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant; the median is reported (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing (default 1)")
    parser.add_argument("--steps", type=int, default=20, help="linear-regression steps per timed run (default 20)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip the torch.compile variants (each compiles for tens of seconds on a CPU)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--plot", metavar="FILE", help="also draw a bar chart (needs matplotlib)")
    parser.add_argument("--gpu-check", action="store_true",
                        help="run the prepared GPU check (CUDA tests, pytest benches, this table) and write a "
                             "JSON + markdown summary into --out, $OUT or benches/results")
    parser.add_argument("--out", metavar="DIR", help="--gpu-check: where the summary goes")
    parser.add_argument("--budget", type=float, default=450.0, help="--gpu-check: total seconds for all steps (default 450)")
    parser.add_argument("--cuda-only", action="store_true",
                        help="--gpu-check: time only the CUDA cases in the pytest step (a short lease)")


def _cmd(args: argparse.Namespace) -> int:
    if args.gpu_check:
        return gpu_check(args.out, budget_s=args.budget, scale=1.0 if args.scale is None else args.scale,
                         cuda_only=args.cuda_only)
    scale = DEFAULT_SCALE if args.scale is None else args.scale
    if not scale > 0:
        print(f"fnnet bench: error: --scale must be positive, got {scale}", file=sys.stderr)
        return 2
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    bad = [w for w in workloads if w not in WORKLOADS]
    if bad or not workloads:
        print(f"fnnet bench: error: --workloads takes {','.join(WORKLOADS)}, got {args.workloads!r}", file=sys.stderr)
        return 2
    devices, notes = _devices(args.device)
    for note in notes:
        print(note, file=sys.stderr)
    if not devices:
        print("fnnet bench: error: --device cuda asked for, but this machine has no CUDA device", file=sys.stderr)
        return 2
    print(f"fnnet bench: scale {scale}, {args.repeats} repeats (median), devices {', '.join(map(str, devices))}",
          file=sys.stderr)
    results = run(workloads, devices, scale=scale, repeats=args.repeats, warmup=args.warmup,
                  compile=args.compile, steps=args.steps, verbose=True)
    print(format_table(results))
    print("time/chapter: time over the chapter's way on the same device (<1 is faster); "
          "vs cpu: throughput over the chapter's way on the CPU.")
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(results, scale=scale, repeats=args.repeats, warmup=args.warmup,
                                                      steps=args.steps, devices=[str(d) for d in devices]), indent=2))
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        try:
            plot(results, args.plot)
            print(f"wrote {args.plot}", file=sys.stderr)
        except RuntimeError as e:
            print(f"fnnet bench: {e}", file=sys.stderr)
            return 1
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to an argparse ``subparsers`` object (``fnnet/cli.py``)."""
    parser = subparsers.add_parser("bench", help="time the chapter's workloads on CPU and GPU, fnnet vs plain PyTorch",
                                   description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=_cmd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fnnet.bench [options]``: the same as ``fnnet bench``."""
    parser = argparse.ArgumentParser(prog="fnnet bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return _cmd(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
