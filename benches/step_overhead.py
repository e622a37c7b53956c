"""The eager one-device step's per-call cost, call for call, and two checkouts of fnnet in turns.

    python benches/step_overhead.py probe [--threads 1] [--rounds 9]          # this checkout, one process
    git worktree add --detach /tmp/base 093d7fc
    python benches/step_overhead.py compare --base /tmp/base --rounds 6 --out results.jsonl

``probe`` measures, in one process (``PYTHONPATH`` picks the checkout), with the variants in turns
block by block so that load from elsewhere hits them alike:

* ``tiny``: the chapter's linear regression on 16 samples (the step is all overhead): CPU time
  (``time.process_time``) and wall time per call of the chapter's loop (``nn.Module`` +
  ``torch.optim.Adam`` + ``nn.MSELoss``), ``make_train_step`` eager and ``donate=True``;
* ``calls``: per step of the eager step, the Python functions entered and C functions called
  (``sys.setprofile``) and the aten ops dispatched (a ``TorchDispatchMode``): a count that load
  does not move;
* ``linreg``: the same at n = 1e6 (the ``fnnet bench`` workload), blocks of ``--steps`` steps;
  the ratio of each round's fnnet time to the chapter's in the same round.

``compare`` runs ``probe`` with the code of ``--base`` and of this checkout in turns (the order
alternates between rounds), records the load average around each run, appends every JSON line to
``--out`` and prints median (min-max) of each figure per checkout.

``count`` runs one variant's steps for valgrind's callgrind, which counts the instructions they
execute (deterministic: the load of a shared machine does not move it); the collection is switched
on around the steps only, through callgrind's client requests (a small C helper built with gcc)::

    valgrind --tool=callgrind --instr-atstart=no --collect-atstart=no \
        python benches/step_overhead.py count eager --steps 100     # then callgrind_annotate
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _variants(n: int):
    import torch
    import torch.nn.functional as F
    from torch import nn

    from fnnet import optim
    from fnnet._functional import functional
    from fnnet.models import LinearRegression, linreg_data
    from fnnet.state import TrainState
    from fnnet.train import make_train_step

    if n <= 16:
        torch.manual_seed(1)
        X, Y = torch.randn(n, 2), torch.randn(n, 1)
    else:
        X, Y = linreg_data(n)
    torch.manual_seed(0)
    linear = LinearRegression()
    torch_opt, mse = torch.optim.Adam(linear.parameters(), lr=0.1), nn.MSELoss()

    def chapter() -> None:
        torch_opt.zero_grad()
        loss = mse(linear(X), Y)
        loss.backward()
        torch_opt.step()

    torch.manual_seed(0)
    model = functional(LinearRegression())

    def loss_fn(params, batch):
        x, y = batch
        return F.mse_loss(model.apply(params, x), y)

    opt = optim.adam(0.1)
    out = {"chapter": chapter}
    for name, donate in (("eager", False), ("donate", True)):
        step, box = make_train_step(loss_fn, opt, donate=donate), [TrainState.create(model.params, opt)]

        def run(step=step, box=box) -> None:
            box[0], _ = step(box[0], (X, Y))

        out[name] = run
    return out


def _timed_rounds(variants: dict, rounds: int, calls: int) -> dict[str, list[tuple[float, float]]]:
    """Per round and variant: (CPU s, wall s) per call, the variants in a rotating order."""
    names = list(variants)
    for fn in variants.values():  # warm-up
        for _ in range(max(2, calls // 10)):
            fn()
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = variants[name]
            c0, w0 = time.process_time(), time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append(((time.process_time() - c0) / calls, (time.perf_counter() - w0) / calls))
    return times


def _counts(fn) -> dict[str, int]:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    counter: collections.Counter = collections.Counter()

    def profile(frame, event, arg):
        if event in ("call", "c_call"):
            counter[event] += 1

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counter["aten"] += 1
            return func(*args, **(kwargs or {}))

    fn()
    sys.setprofile(profile)
    fn()
    sys.setprofile(None)
    with Ops():
        fn()
    del torch
    return {"python_calls": counter["call"], "c_calls": counter["c_call"], "aten_ops": counter["aten"]}


def _summary(times: dict[str, list[tuple[float, float]]], scale: float) -> dict:
    out = {}
    for name, values in times.items():
        out[name] = {"cpu_median": statistics.median(c for c, _ in values) * scale,
                     "wall_median": statistics.median(w for _, w in values) * scale,
                     "cpu": [c * scale for c, _ in values], "wall": [w * scale for _, w in values]}
    for name in times:
        if name != "chapter":
            for i, what in enumerate(("cpu", "wall")):
                ratios = [v[i] / c[i] for v, c in zip(times[name], times["chapter"])]
                out[name][f"{what}_ratio_median"] = statistics.median(ratios)
                out[name][f"{what}_ratio_range"] = [min(ratios), max(ratios)]
    return out


def probe(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    tiny = _variants(16)
    result = {"threads": torch.get_num_threads(), "torch": torch.__version__,
              "calls": {k: _counts(v) for k, v in tiny.items()},
              "tiny_us": _summary(_timed_rounds(tiny, args.rounds, args.calls), 1e6)}
    if args.linreg:
        result["linreg_ms"] = _summary(_timed_rounds(_variants(1_000_000), args.rounds, args.steps), 1e3)
    print(json.dumps(result), flush=True)


_CALLGRIND_HELPER = """#include <valgrind/callgrind.h>
void start(void) { CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; CALLGRIND_TOGGLE_COLLECT; }
void stop(void) { CALLGRIND_TOGGLE_COLLECT; CALLGRIND_DUMP_STATS; CALLGRIND_STOP_INSTRUMENTATION; }
"""


def count(args: argparse.Namespace) -> None:
    import ctypes
    import tempfile

    import torch

    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp())
    (folder / "cg.c").write_text(_CALLGRIND_HELPER)
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(folder / "cg.so"), str(folder / "cg.c")], check=True)
    helper = ctypes.CDLL(str(folder / "cg.so"))
    run = _variants(16)[args.variant]
    for _ in range(20):
        run()
    helper.start()
    for _ in range(args.steps):
        run()
    helper.stop()


def _load() -> float:
    return os.getloadavg()[0]


def compare(args: argparse.Namespace) -> None:
    codes = {"before": args.base.resolve(), "after": ROOT}
    cmd = [sys.executable, str(Path(__file__).resolve()), "probe", "--threads", str(args.threads),
           "--rounds", str(args.probe_rounds), "--calls", str(args.calls), "--steps", str(args.steps)]
    cmd += [] if args.no_linreg else ["--linreg"]
    rows: list[dict] = []
    with args.out.open("a") as out:
        for r in range(args.rounds):
            for label in (("before", "after") if r % 2 == 0 else ("after", "before")):
                env = {**os.environ, "PYTHONPATH": str(codes[label]), "OMP_NUM_THREADS": str(args.threads or 2)}
                load0 = _load()
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800, cwd=codes[label])
                lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
                if proc.returncode != 0 or not lines:
                    raise SystemExit(f"probe with {codes[label]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
                row = {"code": label, "commit": _commit(codes[label]), "round": r, "load_before": load0,
                       "load_after": _load(), **json.loads(lines[-1])}
                rows.append(row)
                out.write(json.dumps(row) + "\n")
                out.flush()
                t = row["tiny_us"]
                print(label, r, f"load {load0:.1f}", "tiny cpu us", {k: round(v["cpu_median"]) for k, v in t.items()},
                      "linreg cpu ratio", {k: round(v["cpu_ratio_median"], 3) for k, v in row.get("linreg_ms", {}).items()
                                           if "cpu_ratio_median" in v}, flush=True)
    _print_summary(rows)


def _commit(path: Path) -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=path)
    return proc.stdout.strip()


def _print_summary(rows: list[dict]) -> None:
    def line(what: str, values: list[float]) -> str:
        return f"{what}: median {statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f}, n={len(values)})"

    for label in ("before", "after"):
        mine = [r for r in rows if r["code"] == label]
        for v in ("chapter", "eager", "donate"):
            print(label, line(f"tiny {v} CPU us/call", [r["tiny_us"][v]["cpu_median"] for r in mine]))
        for v in ("eager", "donate"):
            print(label, line(f"tiny {v}/chapter CPU", [r["tiny_us"][v]["cpu_ratio_median"] for r in mine]))
            if "linreg_ms" in mine[0]:
                print(label, line(f"linreg {v}/chapter CPU", [r["linreg_ms"][v]["cpu_ratio_median"] for r in mine]))
                print(label, line(f"linreg {v}/chapter wall", [r["linreg_ms"][v]["wall_ratio_median"] for r in mine]))
        print(label, "calls per step", mine[0]["calls"])
    before = [r for r in rows if r["code"] == "before"]
    after = [r for r in rows if r["code"] == "after"]
    for v in ("eager", "donate"):
        paired = [a["tiny_us"][v]["cpu_median"] / b["tiny_us"][v]["cpu_median"] for a, b in zip(after, before)]
        print(line(f"tiny {v} after/before CPU, paired by round", paired))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    counting = sub.add_parser("count")
    counting.add_argument("variant", choices=["chapter", "eager", "donate"])
    counting.add_argument("--steps", type=int, default=100)
    for name in ("probe", "compare"):
        p = sub.add_parser(name)
        p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
        p.add_argument("--calls", type=int, default=200, help="calls per block, tiny model")
        p.add_argument("--steps", type=int, default=5, help="steps per block, n = 1e6")
        if name == "probe":
            p.add_argument("--rounds", type=int, default=9)
            p.add_argument("--linreg", action="store_true")
        else:
            p.add_argument("--base", type=Path, required=True)
            p.add_argument("--rounds", type=int, default=6, help="launches per checkout")
            p.add_argument("--probe-rounds", type=int, default=9)
            p.add_argument("--no-linreg", action="store_true")
            p.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    {"probe": probe, "compare": compare, "count": count}[args.mode](args)


if __name__ == "__main__":
    main()
