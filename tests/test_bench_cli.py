"""``fnnet bench`` at a tiny scale: the table, the JSON, the options and their errors."""

import argparse
import json
import statistics

import pytest
import torch

from fnnet import _workloads as W
from fnnet import bench

TINY = ["--device", "cpu", "--scale", "0.002", "--repeats", "2", "--warmup", "0", "--steps", "2", "--no-compile"]


def test_bench_main_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(TINY + ["--workloads", "matmul,linreg,cnn", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    for word in ("workload", "time/chapter", "matmul", "linreg", "cnn", "chapter-workers0"):
        assert word in table

    data = json.loads(out.read_text())
    assert data["schema"] == "fnnet-bench/1"
    assert data["environment"]["torch"] == torch.__version__
    assert data["settings"]["scale"] == 0.002
    rows = {(r["workload"], r["variant"]): r for r in data["results"]}
    # Every CPU variant is reported, measured or skipped with a reason; no CUDA-only rows on CPU.
    expected = {(w, v) for w in bench.WORKLOADS for v in W.variants(w) if v not in W.CUDA_ONLY}
    assert set(rows) == expected
    for (workload, variant), r in rows.items():
        assert r["device"] == "cpu"
        if variant in W.COMPILED:
            assert "no-compile" in r["skipped"]
        if r["skipped"] is None:
            assert len(r["times"]) == 2 and r["seconds"] == pytest.approx(statistics.median(r["times"]))
            assert r["throughput"] > 0 and r["unit"]
            assert r["ratio"] is not None and r["vs_cpu"] is None
    for workload in bench.WORKLOADS:
        base = rows[(workload, W.BASELINE[workload])]
        assert base["skipped"] is None and base["ratio"] == pytest.approx(1.0)
    assert rows[("linreg", "chapter")]["size"] == {"n": 2000, "steps": 2}
    assert rows[("cnn", "chapter-workers0")]["size"]["samples"] == 256


def test_timed_case_synchronises_and_reports_work():
    case = W.build("matmul", "fp32", "cpu", scale=0.01)
    assert case.work == pytest.approx(2 * 100 * 100 * 200 / 1e9)
    assert case.unit == "GFLOP/s" and case.first_call_s > 0
    times = bench.measure(case, repeats=3, warmup=1)
    assert len(times) == 3 and all(t > 0 for t in times)


def test_cuda_only_variants_and_missing_cuda_are_unavailable():
    with pytest.raises(W.Unavailable, match="CUDA-only"):
        W.build("matmul", "bf16", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(W.Unavailable, match="CUDA is not available"):
            W.build("matmul", "fp32", "cuda", scale=0.01)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_device_cuda_without_cuda_is_a_clear_error(capsys):
    assert bench.main(["--device", "cuda", "--scale", "0.002"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--scale", "0"], ["--workloads", "matmul,resnet"]])
def test_bad_arguments_exit_2(args, capsys):
    assert bench.main(["--device", "cpu"] + args) == 2
    assert "error" in capsys.readouterr().err


def test_register_adds_the_bench_subcommand():
    parser = argparse.ArgumentParser(prog="fnnet")
    sub = parser.add_subparsers(dest="command")
    bench.register(sub)
    args = parser.parse_args(["bench", "--device", "cpu", "--scale", "0.1", "--json", "x.json"])
    assert args.command == "bench" and args.func is bench._cmd
    assert (args.device, args.scale, args.json, args.compile) == ("cpu", 0.1, "x.json", True)
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--device", "tpu"])


def _result(workload, device, variant, seconds, work):
    return bench.Result(workload, device, variant, seconds, [seconds], work, "steps/s", work / seconds)


def test_ratios_are_to_the_chapters_way_on_the_same_device():
    rows = [_result("linreg", "cpu", "chapter", 2.0, 20), _result("linreg", "cpu", "fnnet-eager", 1.0, 20),
            _result("linreg", "cuda:0", "chapter", 0.5, 20), _result("linreg", "cuda:0", "fnnet-jit-donate", 0.1, 20),
            bench.Result("linreg", "cpu", "fnnet-jit-donate", skipped="compiled variants off (--no-compile)")]
    bench._add_ratios(rows)
    assert [r.ratio for r in rows[:4]] == [1.0, 0.5, 1.0, pytest.approx(0.2)]
    assert rows[0].vs_cpu is None and rows[2].vs_cpu == 4.0 and rows[3].vs_cpu == pytest.approx(20.0)
    table = bench.format_table(rows)
    assert "0.50x" in table and "skipped" in table and "--no-compile" in table
    assert bench.format_markdown(rows).count("\n") == len(rows) + 1


def test_results_from_pytest_benchmark_json():
    entry = {"name": "test_linreg[cpu-chapter]", "stats": {"median": 2.0},
             "extra_info": {"workload": "linreg", "variant": "chapter", "device": "cpu", "work": 20.0,
                            "unit": "steps/s", "size": {"n": 10}, "first_call_s": 0.1}}
    other = {**entry, "extra_info": {**entry["extra_info"], "variant": "fnnet-eager"}, "stats": {"median": 1.0}}
    rows = bench.results_from_pytest_benchmark({"benchmarks": [other, entry, {"name": "x", "stats": {"median": 1}}]})
    assert [r.variant for r in rows] == ["chapter", "fnnet-eager"]
    assert rows[1].ratio == 0.5 and rows[1].throughput == 20.0


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    bench.plot([_result("linreg", "cpu", "chapter", 2.0, 20), _result("cnn", "cpu", "chapter-workers4", 1.0, 256)], path)
    assert path.stat().st_size > 0
    with pytest.raises(RuntimeError, match="nothing to plot"):
        bench.plot([bench.Result("linreg", "cpu", "chapter", skipped="x")], tmp_path / "none.png")
