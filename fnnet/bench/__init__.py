"""``fnnet bench``: how much a GPU helps, and what fnnet costs over plain PyTorch, on this machine.

Runs the chapter's workloads (matmul, linear regression, CNN; defined in
:mod:`fnnet.bench.workloads`, which the checkout's ``benches/`` times with pytest-benchmark
too) at ``--scale`` times the chapter's sizes and prints one row per workload, device and
variant. It needs nothing but an installed fnnet::

    fnnet bench                          # CPU, and CUDA when present
    fnnet bench --device cuda --scale 1  # the chapter's full sizes on the GPU
    fnnet bench --json out.json --plot out.png

Every timing waits for the device inside the timed call, follows a warm-up, and is the
median of ``--repeats`` runs; the variants of a workload take turns run by run, so load from
elsewhere on a shared machine hits them all alike. ``time/chapter`` is this variant's time over the chapter's way
on the same device (below 1 is faster); ``vs cpu`` is its throughput over the chapter's way
on the CPU (the GPU speed-up a newcomer asks about). Compiled variants report their first
call (the compilation) apart from the steady state.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from . import workloads as W

__all__ = ["Result", "measure", "run", "add_ratios", "format_table", "format_markdown", "environment", "to_json",
           "sort_results", "plot", "legend", "command", "main"]

WORKLOADS = ("matmul", "linreg", "cnn")
DEFAULT_SCALE = 0.05  # about a minute for everything on a 2-core CPU, compilation included
MIN_SCALE = 0.01  # below it the sizes stop following --scale (each has a floor): the ratios would mean nothing


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

    Variants that do not exist on a device (``W.runs_on``) are left out; compiled ones with ``compile=False`` come back
    with ``skipped`` set; a variant that raises comes back with ``skipped = "failed: ..."``
    (so one broken variant does not hide the others' numbers), and ``fnnet bench`` then
    exits with status 1.
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
    add_ratios(results)
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
        if not W.runs_on(variant, dev):
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


def add_ratios(results: list[Result]) -> None:
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


def sort_results(results: Sequence[Result]) -> list[Result]:
    """Workloads in the chapter's order, then device, then each workload's variant order."""
    def key(r: Result) -> tuple:
        order = W.variants(r.workload) if r.workload in WORKLOADS else ()
        return (WORKLOADS.index(r.workload) if r.workload in WORKLOADS else 99, r.device,
                order.index(r.variant) if r.variant in order else 99)
    return sorted(results, key=key)


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


def legend(workloads: Sequence[str] = WORKLOADS) -> str:
    """What the ratio columns compare with: printed under the table."""
    lines = ["time/chapter: time over the chapter's way on the same device (<1 is faster); "
             "vs cpu: throughput over the chapter's way on the CPU."]
    if "cnn" in workloads:
        lines.append(f"cnn: the chapter's way is {W.BASELINE['cnn']} (its loop with num_workers=0, the docs' performance page's "
                     f"headline); {W.SECOND_BASELINE['cnn']} (num_workers=4, the chapter's DataLoader set-up) is a "
                     f"second baseline, its time/chapter also against {W.BASELINE['cnn']}.")
    return "\n".join(lines)


def format_markdown(results: Sequence[Result]) -> str:
    """The results as a markdown table (for the GPU check's summary and docs/performance.md)."""
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
    """One panel per workload: each variant's time over the chapter's way, as a point on a linear axis.

    A ratio reads as it is (1.0, the chapter's way, is marked; left of it is faster); CUDA
    points are orange, CPU points blue. Needs matplotlib.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib (or fnnet[plot])") from None
    done = [r for r in results if r.ratio is not None]
    workloads = [w for w in WORKLOADS if any(r.workload == w for r in done)]
    if not workloads:
        raise RuntimeError("nothing to plot: no variant has a ratio to the chapter's way")
    fig, axes = plt.subplots(len(workloads), 1, figsize=(7, 1.2 + 0.45 * len(done)), squeeze=False)
    for ax, w in zip(axes[:, 0], workloads):
        rows = [r for r in done if r.workload == w]
        ys = list(range(len(rows)))[::-1]
        colors = ["tab:orange" if r.device.startswith("cuda") else "tab:blue" for r in rows]
        ax.scatter([r.ratio for r in rows], ys, color=colors, zorder=3)
        for r, y in zip(rows, ys):
            ax.annotate(f"{r.ratio:.2f}x", (r.ratio, y), textcoords="offset points", xytext=(6, -3), fontsize=8)
        ax.axvline(1.0, color="gray", linestyle="--", linewidth=1)
        ax.set_yticks(ys, [f"{r.variant} ({r.device})" for r in rows], fontsize=8)
        ax.set_xlim(0, max(1.2, max(r.ratio for r in rows) * 1.2))
        ax.set_title(f"{w}: time / the chapter's way (1.0, dashed; left is faster)", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- the command ---------------------------------------------------------------------------------


def _writable_file(path: str | None, flag: str) -> str | None:
    """An error message when ``path`` cannot be written (checked before anything is measured)."""
    if path is None:
        return None
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return f"{flag} {path!r} is a folder; give a file name"
    if not os.path.isdir(folder):
        return f"{flag} {path!r}: the folder {folder!r} does not exist"
    if not os.access(folder, os.W_OK):
        return f"{flag} {path!r}: the folder {folder!r} is not writable"
    return None


def command(args: Any) -> int:
    """``fnnet bench`` with parsed arguments (see ``fnnet bench --help``); returns the exit status.

    Every argument is checked before anything runs (exit 2 with a one-line error). A variant
    that fails while running is reported in the table and makes the exit status 1.
    """
    def error(message: str) -> int:
        print(f"fnnet bench: error: {message}", file=sys.stderr)
        return 2

    # The parser (fnnet.cli) has checked the numbers' types and signs; what it cannot know is here.
    scale = DEFAULT_SCALE if args.scale is None else args.scale
    if scale < MIN_SCALE:
        return error(f"--scale {scale} is below {MIN_SCALE}: the sizes stop following --scale there (each workload has "
                     "a floor) and a CNN epoch is two batches, so the ratios would mean nothing")
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    bad = [w for w in workloads if w not in WORKLOADS]
    if bad or not workloads:
        return error(f"--workloads takes {','.join(WORKLOADS)}, got {args.workloads!r}")
    for message in (_writable_file(args.json, "--json"), _writable_file(args.plot, "--plot")):
        if message:
            return error(message)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return error("--plot needs matplotlib: pip install matplotlib (or fnnet[plot])")
    devices, notes = _devices(args.device)
    for note in notes:
        print(note, file=sys.stderr)
    if not devices:
        return error("--device cuda asked for, but this machine has no CUDA device")
    print(f"fnnet bench: scale {scale}, {args.repeats} repeats (median), devices {', '.join(map(str, devices))}",
          file=sys.stderr)
    results = run(workloads, devices, scale=scale, repeats=args.repeats, warmup=args.warmup,
                  compile=args.compile, steps=args.steps, verbose=True)
    print(format_table(results))
    print(legend(workloads))
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(results, scale=scale, repeats=args.repeats, warmup=args.warmup,
                                                      steps=args.steps, devices=[str(d) for d in devices]), indent=2))
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        try:
            plot(results, args.plot)
            print(f"wrote {args.plot}", file=sys.stderr)
        except RuntimeError as e:  # every baseline failed: no ratio to draw (the failures are reported below)
            print(f"fnnet bench: {e}; {args.plot} not written", file=sys.stderr)
    failed = [r for r in results if r.skipped and r.skipped.startswith("failed")]
    if failed:
        print(f"fnnet bench: {len(failed)} variant(s) failed: " + "; ".join(f"{r.workload}/{r.variant} on {r.device}: "
              f"{r.skipped}" for r in failed), file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fnnet.bench [options]``: the same as ``fnnet bench``."""
    from ..cli import main as cli_main

    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
