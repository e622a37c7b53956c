"""pytest-benchmark set-up for fnnet's benchmarks: devices, synchronised timing, ratios.

Run from the repository root (``pytest`` alone never collects ``benches/``)::

    pytest benches --benchmark-only                       # CPU, and CUDA when present
    FNNET_BENCH_SCALE=0.1 pytest benches --benchmark-only # a quick pass at 1/10 of the sizes
    pytest benches --benchmark-only -m cuda               # the CUDA cases alone

The pattern every benchmark here follows::

    @pytest.mark.parametrize("variant", W.LINREG_VARIANTS)
    def test_linreg(benchmark, device, build_case, run_case, variant):
        case = build_case("linreg", variant, device)  # set-up + first (compiling) call, untimed
        run_case(benchmark, case, rounds=10, warmup_rounds=2)

* ``device`` is parametrised over ``cpu`` and ``cuda``; the CUDA case carries the ``cuda``
  mark and skips with the reason when this machine has no CUDA device, so one run on a GPU
  machine puts CPU and CUDA side by side.
* ``build_case`` calls the shared workload definitions in ``fnnet.bench.workloads`` (also behind
  ``fnnet bench``) and turns "cannot run here" (a CUDA-only variant on CPU) into a skip with the reason.
* ``run_case`` times ``case.run`` with ``benchmark.pedantic`` after ``warmup_rounds``
  untimed rounds. ``case.run`` is built with :func:`timed`, which synchronises CUDA *inside*
  the timed function, so the clock stops after the GPU has finished. It records workload,
  variant, device, throughput and the first call (compilation) in ``extra_info``, and the
  session ends with a table of every case's ratio to the chapter's way (``time/chapter``)
  and to the CPU (``vs cpu``).

Data-parallel and distributed benchmarks (issue 6, item 5) will live in
``test_bench_parallel.py`` and take the ``device_group`` fixture below: a list of devices,
parametrised over one CPU, one GPU, two GPUs and all GPUs, each group skipping with the
reason when the machine has too few GPUs.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, Iterator

import pytest
import torch

from fnnet.bench import Result, add_ratios, format_table, sort_results
from fnnet.bench import workloads as W
from fnnet.bench.workloads import timed  # noqa: F401  (the timing pattern; re-exported for benchmarks)

os.environ.setdefault("MPLBACKEND", "Agg")

CUDA = torch.cuda.is_available()
GPUS = torch.cuda.device_count() if CUDA else 0
NO_CUDA = "no CUDA device here (torch.cuda.is_available() is False); the CUDA case runs on a GPU machine, see benches/gpu_check.sh"

# FNNET_BENCH_SCALE shrinks every problem (1 = the chapter's sizes); fnnet bench's --scale.
SCALE = float(os.environ.get("FNNET_BENCH_SCALE", "1"))
# FNNET_BENCH_LOG: also append every result to this JSON-lines file as soon as it is measured.
LOG = os.environ.get("FNNET_BENCH_LOG")

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason=NO_CUDA)]),
]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """``cpu``, then ``cuda:0`` (skipped without CUDA)."""
    return torch.device("cuda", 0) if request.param == "cuda" else torch.device("cpu")


def _group(kind: str, count: int | None) -> Any:
    need = count or 1
    marks = [] if kind == "cpu" else [pytest.mark.cuda, pytest.mark.skipif(
        GPUS < need, reason=f"needs {need} CUDA device(s), this machine has {GPUS}")]
    name = f"{kind}x{count if count else 'all'}"
    return pytest.param((kind, count), id=name, marks=marks)


DEVICE_GROUPS = [_group("cpu", 1), _group("cuda", 1), _group("cuda", 2), _group("cuda", None)]


@pytest.fixture(params=DEVICE_GROUPS)
def device_group(request: pytest.FixtureRequest) -> list[torch.device]:
    """A list of devices for data-parallel benchmarks: ``[cpu]``, ``[cuda:0]``, two GPUs, all GPUs."""
    kind, count = request.param
    if kind == "cpu":
        return [torch.device("cpu")]
    return [torch.device("cuda", i) for i in range(count or GPUS)]


@pytest.fixture
def build_case() -> Callable[..., W.Case]:
    """``build_case(workload, variant, device, **kw)``: the shared case, or a skip with the reason."""

    def build(workload: str, variant: str, device: torch.device, **kw: Any) -> W.Case:
        if variant in W.COMPILED:
            W.reset_compiler()  # the first call then holds this variant's whole compilation
        try:
            return W.build(workload, variant, device, scale=SCALE, **kw)
        except W.Unavailable as e:
            pytest.skip(str(e))

    return build


_RESULTS: list[Result] = []


@pytest.fixture
def run_case() -> Callable[..., None]:
    """``run_case(benchmark, case, rounds=5, warmup_rounds=1)``: time ``case.run`` and record it."""

    def run(benchmark: Any, case: W.Case, *, rounds: int = 5, warmup_rounds: int = 1) -> None:
        benchmark.group = f"{case.workload} {case.device.type}"
        benchmark.pedantic(case.run, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
        benchmark.extra_info.update(
            workload=case.workload, variant=case.variant, device=str(case.device), unit=case.unit,
            work=case.work, size=case.size, first_call_s=case.first_call_s,
        )
        stats = getattr(benchmark, "stats", None)
        if stats is None:  # --benchmark-disable: ran once, untimed
            return
        median = stats.stats.median
        benchmark.extra_info["throughput"] = case.throughput(median)
        _RESULTS.append(Result(case.workload, str(case.device), case.variant, median, list(stats.stats.data),
                               case.work, case.unit, case.throughput(median), first_call_s=case.first_call_s,
                               size=case.size))

    return run


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for module, title in (("test_bench_memory", "peak memory, 4 Adam steps, MLP of 25.2 M parameters (96 MB), batch 64"),
                          ("test_bench_distributed", "distributed step vs DDP, gloo, batch 64 per rank (median s/step)")):
        mod = sys.modules.get(module)
        if mod is not None and mod._RESULTS:
            terminalreporter.write_sep("-", title)
            for row in mod.summary_rows():
                terminalreporter.write_line(row)
    if not _RESULTS:
        return
    add_ratios(_RESULTS)
    terminalreporter.write_sep("-", "fnnet: ratios to the chapter's way (time/chapter < 1 is faster)")
    terminalreporter.write_line(format_table(sort_results(_RESULTS)))
    if SCALE != 1:
        terminalreporter.write_line(f"(FNNET_BENCH_SCALE={SCALE}: sizes are {SCALE} of the chapter's)")


@pytest.fixture(autouse=True)
def _log_each_result(request: pytest.FixtureRequest) -> Iterator[None]:
    """With ``FNNET_BENCH_LOG`` set, append every benchmark's result to it as soon as it is
    measured (one JSON line), so the GPU check keeps what a step measured if it is stopped."""
    # Taken before the test runs, so this fixture is torn down before the benchmark fixture.
    benchmark = request.getfixturevalue("benchmark") if LOG and "benchmark" in request.fixturenames else None
    yield
    if benchmark is None:
        return
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable, or skipped
        return
    with open(LOG, "a") as f:
        f.write(json.dumps({"name": benchmark.name, "stats": {"median": stats.stats.median},
                            "extra_info": benchmark.extra_info}, default=str) + "\n")
