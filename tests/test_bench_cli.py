"""``fnnet bench`` at the smallest scale: the table, the JSON, the plot, the options and their errors."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fnnet.bench import workloads as W
from fnnet import bench, cli

TINY = ["--device", "cpu", "--scale", "0.01", "--repeats", "2", "--warmup", "0", "--steps", "2", "--no-compile"]


def test_bench_main_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(TINY + ["--workloads", "matmul,linreg,cnn", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    for word in ("workload", "time/chapter", "matmul", "linreg", "cnn", "chapter-workers0"):
        assert word in table
    assert "chapter-workers4 (num_workers=4" in table and "a second baseline" in table  # the legend says so

    data = json.loads(out.read_text())
    assert data["schema"] == "fnnet-bench/1"
    assert data["environment"]["torch"] == torch.__version__
    assert data["settings"]["scale"] == 0.01
    rows = {(r["workload"], r["variant"]): r for r in data["results"]}
    # Every CPU variant is reported, measured or skipped with a reason; no CUDA-only rows on CPU.
    expected = {(w, v) for w in bench.WORKLOADS for v in W.variants(w) if W.runs_on(v, "cpu")}
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
    assert rows[("linreg", "chapter")]["size"] == {"n": 10000, "steps": 2}
    assert rows[("cnn", "chapter-workers0")]["size"]["samples"] == 256


def test_the_cnn_baseline_is_the_readmes_headline_num_workers_0():
    readme = (Path(__file__).resolve().parent.parent / "docs" / "performance.md").read_text()
    # the performance page's CNN rows at 1.00x (CPU and GPU tables): the headline baseline
    headline = [line for line in readme.splitlines() if "num_workers" in line and line.rstrip().endswith("| 1.00x |")]
    assert headline and all("num_workers=0" in line for line in headline), headline
    baseline = W.BASELINE["cnn"]
    assert W.variants("cnn")[0] == baseline  # the chapter's way first
    assert W.build("cnn", baseline, "cpu", scale=0.01).size["num_workers"] == 0
    second = W.build("cnn", W.SECOND_BASELINE["cnn"], "cpu", scale=0.01)
    assert second.size["num_workers"] == 4 and second.variant != baseline


def test_timed_case_reports_work():
    case = W.build("matmul", "fp32", "cpu", scale=0.01)
    assert case.work == pytest.approx(2 * 100 * 100 * 200 / 1e9)
    assert case.unit == "GFLOP/s" and case.first_call_s > 0
    times = bench.measure(case, repeats=3, warmup=1)
    assert len(times) == 3 and all(t > 0 for t in times)


def test_timed_waits_for_the_cuda_device_after_the_work(monkeypatch):
    # Recorded calls stand in for the GPU: the contract is "run the work, then wait for that
    # device, inside the timed function", which holds or fails the same way without one.
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("sync", device)))
    run = W.timed(lambda: calls.append(("work", None)) or 42, "cuda:1")
    assert calls == []
    assert run() == 42
    assert calls == [("work", None), ("sync", torch.device("cuda", 1))]
    cpu_fn = lambda: 1  # noqa: E731
    assert W.timed(cpu_fn, "cpu") is cpu_fn  # nothing to wait for on the CPU


def test_every_case_is_timed_through_timed(monkeypatch):
    """Every workload's ``run`` is a function ``timed`` made, for the case's own device (so on a
    GPU it waits for that device). Built here on the CPU: the CUDA-only variants are built by
    the same builders and checked on a GPU by the CUDA benchmarks."""
    made = {}
    real = W.timed

    def recording(fn, device):
        wrapped = real(fn, device)

        def run():
            return wrapped()

        made[run] = torch.device(device)
        return run

    monkeypatch.setattr(W, "timed", recording)
    built = 0
    for workload in bench.WORKLOADS:
        for variant in W.variants(workload):
            if not W.runs_on(variant, "cpu"):
                continue
            case = W.build(workload, variant, "cpu", scale=0.01)
            assert case.run in made, f"{workload}/{variant}: run is not wrapped by timed()"
            assert made[case.run] == case.device, f"{workload}/{variant}: timed for {made[case.run]}"
            built += 1
    assert built == sum(W.runs_on(v, "cpu") for w in bench.WORKLOADS for v in W.variants(w))


def test_cuda_only_variants_and_missing_cuda_are_unavailable():
    with pytest.raises(W.Unavailable, match="CUDA-only"):
        W.build("matmul", "bf16", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(W.Unavailable, match="CUDA is not available"):
            W.build("matmul", "fp32", "cuda", scale=0.01)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_device_cuda_without_cuda_is_a_clear_error(capsys):
    assert bench.main(["--device", "cuda", "--scale", "0.01"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--scale", "0"], "--scale"), (["--scale", "inf"], "--scale"), (["--scale", "0.002"], "below 0.01"),
    (["--workloads", "matmul,resnet"], "--workloads"), (["--repeats", "0"], "--repeats"),
    (["--warmup", "-1"], "--warmup"), (["--steps", "0"], "--steps"),
    (["--json", "/no/such/folder/out.json"], "does not exist"), (["--plot", "/no/such/folder/out.png"], "does not exist"),
])
def test_bad_arguments_exit_2_before_anything_runs(args, message, capsys):
    try:
        code = bench.main(["--device", "cpu", *args])
    except SystemExit as exit:  # argparse's own usage errors
        code = exit.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and "setting up" not in err  # nothing was measured


def test_a_failing_variant_makes_the_exit_status_nonzero(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(W, "matmul_case", broken)
    assert bench.main(TINY + ["--workloads", "matmul"]) == 1
    captured = capsys.readouterr()
    assert "failed: RuntimeError: boom" in captured.out and "1 variant(s) failed" in captured.err


def test_cli_help_answers_without_importing_torch():
    code = "import sys, fnnet.cli; fnnet.cli.build_parser().format_help(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    help_text = subprocess.run([sys.executable, "-m", "fnnet", "--help"], capture_output=True, text=True, check=True)
    assert "bench" in help_text.stdout and "train" in help_text.stdout


def test_import_fnnet_does_not_import_the_recipes_or_the_trainer():
    code = "import sys, fnnet; fnnet.TrainState; print(sorted(m for m in sys.modules if m.startswith('fnnet.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "fnnet.recipes" not in out and "fnnet.trainer" not in out and "fnnet.state" in out


def test_bench_parser_takes_the_documented_options():
    args = cli.build_parser().parse_args(["bench", "--device", "cpu", "--scale", "0.1", "--json", "x.json"])
    assert args.command == "bench"
    assert (args.device, args.scale, args.json, args.compile) == ("cpu", 0.1, "x.json", True)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["bench", "--device", "tpu"])


def _result(workload, device, variant, seconds, work):
    return bench.Result(workload, device, variant, seconds, [seconds], work, "steps/s", work / seconds)


def test_ratios_are_to_the_chapters_way_on_the_same_device():
    rows = [_result("linreg", "cpu", "chapter", 2.0, 20), _result("linreg", "cpu", "fnnet-eager", 1.0, 20),
            _result("linreg", "cuda:0", "chapter", 0.5, 20), _result("linreg", "cuda:0", "fnnet-jit-donate", 0.1, 20),
            bench.Result("linreg", "cpu", "fnnet-jit-donate", skipped="compiled variants off (--no-compile)")]
    bench.add_ratios(rows)
    assert [r.ratio for r in rows[:4]] == [1.0, 0.5, 1.0, pytest.approx(0.2)]
    assert rows[0].vs_cpu is None and rows[2].vs_cpu == 4.0 and rows[3].vs_cpu == pytest.approx(20.0)
    table = bench.format_table(rows)
    assert "0.50x" in table and "skipped" in table and "--no-compile" in table
    assert bench.format_markdown(rows).count("\n") == len(rows) + 1


def test_plot_draws_each_ratio_as_a_point_on_a_linear_axis_with_1_marked(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    rows = [_result("linreg", "cpu", "chapter", 2.0, 20), _result("linreg", "cpu", "fnnet-eager", 1.0, 20),
            _result("cnn", "cpu", W.BASELINE["cnn"], 1.0, 256)]
    bench.add_ratios(rows)
    drawn = []
    real_savefig = plt.Figure.savefig

    def keep(fig, *args, **kwargs):
        drawn.append(fig)
        return real_savefig(fig, *args, **kwargs)

    plt.Figure.savefig = keep
    try:
        path = tmp_path / "bench.png"
        bench.plot(rows, path)
    finally:
        plt.Figure.savefig = real_savefig
    assert path.stat().st_size > 0
    linreg, cnn = drawn[0].axes
    assert linreg.get_xscale() == "linear"
    points = linreg.collections[0].get_offsets()
    assert sorted(points[:, 0].tolist()) == [0.5, 1.0]  # the two ratios, where they are
    assert any(list(line.get_xdata()) == [1.0, 1.0] for line in linreg.lines)  # 1.0 marked
    assert [t.get_text() for t in linreg.get_yticklabels()] == ["chapter (cpu)", "fnnet-eager (cpu)"][::-1] or \
        {t.get_text() for t in linreg.get_yticklabels()} == {"chapter (cpu)", "fnnet-eager (cpu)"}
    with pytest.raises(RuntimeError, match="nothing to plot"):
        bench.plot([bench.Result("linreg", "cpu", "chapter", skipped="x")], tmp_path / "none.png")


def test_a_plot_with_nothing_to_draw_is_reported_not_a_traceback(monkeypatch, capsys, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(W, "matmul_case", broken)
    out = tmp_path / "plot.png"
    assert bench.main(TINY + ["--workloads", "matmul", "--plot", str(out)]) == 1
    err = capsys.readouterr().err
    assert "nothing to plot" in err and "not written" in err and "Traceback" not in err
    assert not out.exists()
