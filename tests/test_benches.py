"""The benchmarks compare like with like: every variant of a workload computes the same thing.

A benchmark is only fair if its variants do the same work; these checks run with the tests
(in CI), not with ``--benchmark-only``.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest
import torch

import fnnet.optim as O
from fnnet import tree
from fnnet.bench import workloads as W

BENCHES = pathlib.Path(__file__).resolve().parent.parent / "benches"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_benches_{name}", BENCHES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_donated_loop_variant_computes_what_fnnet_computes():
    bench = _load("test_bench_optim")
    device = torch.device("cpu")
    small = {k: v[:8] for k, v in list(bench.make_tree(device, 0).items())[::20]}
    grads = {k: torch.cos(v) for k, v in small.items()}
    opt = O.adam(bench.LR)
    a_params, a_state = tree.map(torch.clone, small), opt.init(small)
    b_params, b_state = tree.map(torch.clone, small), opt.init(small)
    for _ in range(3):
        updates, a_state = opt.update(tree.map(torch.clone, grads), a_state, a_params, donate=True)
        a_params = O.apply_updates(a_params, updates, donate=True)
        b_params, b_state = bench._loop_adam_donated(b_params, tree.map(torch.clone, grads), b_state)
    for k in small:
        torch.testing.assert_close(a_params[k], b_params[k], rtol=1e-6, atol=1e-7)


def test_every_optimizer_variant_takes_the_same_step():
    """Each variant of the Adam micro-benchmark, run for four steps on the same gradients,
    leaves the same parameters (the variants differ in how, never in what)."""
    bench = _load("test_bench_optim")
    device = torch.device("cpu")
    finals = {}
    chunk = bench.F.CPU_CHUNK_BYTES
    for variant in bench.VARIANTS:
        run, fresh_grads, current = bench.build(variant, device)
        for scale in (1.0, 0.01, 2.0, 0.01):  # gradients that shrink and grow, as real ones do
            (grads,), _ = fresh_grads()
            run({k: g.mul_(scale) for k, g in grads.items()})
        finals[variant] = current()
        # a variant's setting (whole lists) must not leak into the next variant, or the tests after
        assert bench.F.CPU_CHUNK_BYTES == chunk, variant
    # Compare the distance moved (about 3e-3 here), not the parameters (about 1), so that a
    # step that is off by a fraction of a percent shows above float32 rounding.
    start = list(bench.make_tree(device, 0).values())
    reference = [p - p0 for p, p0 in zip(finals["torch-loop"], start)]
    for variant, params in finals.items():
        for a, b, p0 in zip(params, reference, start):
            torch.testing.assert_close(a - p0, b, rtol=1e-3, atol=3e-7, msg=lambda m: f"{variant}: {m}")


@pytest.mark.parametrize("variant", [v for v in W.variants("linreg") if W.runs_on(v, "cpu") and v != "chapter"])
def test_linreg_variants_train_what_the_chapter_trains(variant):
    """Same data, same initial weights, same Adam: the loss after the same number of steps agrees."""
    chapter = W.linreg_case("chapter", "cpu", n=2000, steps=5)
    ours = W.linreg_case(variant, "cpu", n=2000, steps=5)
    for _ in range(2):
        expected, got = chapter.run(), ours.run()
        torch.testing.assert_close(got.detach(), expected.detach(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("budget", [100.0, 300.0, 440.0])
def test_gpu_check_runs_the_cuda_tests_first_keeps_the_budget_and_every_steps_output(budget, tmp_path, monkeypatch):
    """The GPU check's plan, with recorded steps standing in for the subprocesses, each taking
    its whole time limit on a fake clock: the CUDA tests run first with at least
    MIN_TEST_SECONDS at any budget; the others never plan past the budget (or are reported out
    of budget); the .log file holds each step's complete output; stale outputs are removed."""
    import fnnet.bench

    check = _load("gpu_check")
    clock = {"now": 0.0}
    calls = []

    def fake_step(name, cmd, timeout, env):
        calls.append((name, cmd, timeout))
        clock["now"] += timeout  # the worst case: every step runs to its limit
        output = f"output of {name}\n" + "line\n" * 40
        return {"name": name, "command": " ".join(cmd), "status": "passed", "returncode": 0, "seconds": timeout,
                "tail": "line", "output": output}

    monkeypatch.setattr(check, "run_step", fake_step)
    monkeypatch.setattr(check.time, "perf_counter", lambda: clock["now"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H200")
    monkeypatch.setattr(fnnet.bench, "environment", lambda: {"date": "d", "gpus": ["NVIDIA H200"], "cpu": "c",
                                                             "cpu_count": 1, "torch_threads": 1, "torch": "t",
                                                             "cuda": "12", "python": "3", "fnnet": "0"})
    stale = tmp_path / f"gpu-check-{check.dt.date.today().isoformat()}-nvidia-h200-pytest-benchmark.json"
    stale.write_text('{"benchmarks": [{"name": "stale", "stats": {"median": 1.0}}]}')
    rc = check.gpu_check(str(tmp_path), budget_s=budget, scale=1.0)
    names = [c[0] for c in calls]
    assert names[0] == "cuda tests" and calls[0][1][1:5] == ["-m", "pytest", "-m", "cuda"]
    assert calls[0][2] >= check.MIN_TEST_SECONDS
    assert sum(c[2] for c in calls) <= max(budget, check.MIN_TEST_SECONDS) + 1e-6
    summary = json.loads(next(tmp_path.glob("gpu-check-*-nvidia-h200.json")).read_text())
    statuses = {s["name"]: s["status"] for s in summary["steps"]}
    if budget >= 300:  # room for everything
        assert names == ["cuda tests", "linreg interleaved", "matmul and cnn", "pytest benches"] and rc == 0
        linreg = calls[1][1]
        assert linreg[linreg.index("--workloads") + 1] == "linreg" and linreg[linreg.index("--repeats") + 1] == "15"
        assert linreg[linreg.index("--device") + 1] == "cuda"
    else:  # the tests took the budget: the rest is reported, not run, and the check fails
        assert names == ["cuda tests"] and rc == 1
        assert [statuses[n] for n in check.STEP_WEIGHTS] == ["out of budget"] * 3
    assert not stale.exists() or "stale" not in stale.read_text()
    assert summary["pytest_benches"] == []  # nothing from the earlier run reported as this run's
    log = next(tmp_path.glob("gpu-check-*-nvidia-h200.log")).read_text()
    for name in names:
        assert f"output of {name}\n" + "line\n" * 40 in log


def test_gpu_check_reports_matmul_against_the_spec_sheet_peak():
    check = _load("gpu_check")
    rows = [{"workload": "matmul", "device": "cuda:0", "variant": "bf16", "throughput": 494_700.0},
            {"workload": "matmul", "device": "cpu", "variant": "fp32", "throughput": 100.0}]
    (row,) = check.matmul_peak(rows, "NVIDIA H200")
    assert row == {"variant": "bf16", "tflops": 494.7, "peak_tflops": 989.4, "of_peak": 0.5}
    assert check.matmul_peak(rows, "Some other GPU")[0]["of_peak"] is None
    assert check.matmul_peak(rows, "NVIDIA H100 PCIe")[0]["of_peak"] is None  # lower peaks than the SXM board
    assert check.matmul_peak(rows, "NVIDIA H200 NVL")[0]["of_peak"] is None


def test_gpu_check_keeps_the_complete_lines_of_a_cut_short_results_file(tmp_path):
    check = _load("gpu_check")
    f = tmp_path / "partial.jsonl"
    f.write_text('{"name": "a", "stats": {"median": 1.0}}\n{"name": "b", "stats": {"med')
    assert check._json_lines(f) == [{"name": "a", "stats": {"median": 1.0}}]


def test_optim_interleaved_reports_every_variant_against_torch(tmp_path, capsys):
    script = _load("optim_interleaved")
    out = tmp_path / "optim.json"
    assert script.main(["--rounds", "2", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    bench = _load("test_bench_optim")
    assert set(data["median_s"]) == set(bench.VARIANTS) and all(t > 0 for t in data["median_s"].values())
    assert data["ratio_to_torch_default"]["torch-default"] == 1.0
    assert "fnnet-donated" in capsys.readouterr().out
