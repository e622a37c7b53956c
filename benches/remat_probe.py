"""Rematerialisation and precision on CPU (issue 32): saved-activation bytes and time per step.

    python benches/remat_probe.py [--rounds 5] [--steps 3] [--depth 8] [--dim 128] [--threads 1 --clock cpu]
                                  [--skip-precision] [--out PATH] [--model tiny|gpt]

The model is the tests' small GPT (``tests/_remat_worker.py``: pre-norm blocks with
``scaled_dot_product_attention``, a GELU MLP, dropout 0.1), ``--depth`` blocks of width 128,
4 heads, vocabulary 256, batch 8 x 64 tokens, float32, AdamW. ``--model gpt``: ``fnnet.models.GPT``
(issue 30) with ``--depth`` blocks of width ``--dim`` (heads ``dim // 64``), block_size 128,
vocabulary 96, dropout 0.1, batch ``--batch`` x 128 tokens. Variants, each timed in turns
(one measurement of ``--steps`` steps per variant per round, rounds interleaved):

* ``fnnet/<policy>``: ``fnnet.make_train_step`` (eager) with ``fnnet.remat(block, policy)`` on every
  block, policy one of none, nothing_saveable, dots_saveable, everything_saveable;
* ``torch/<policy>``: the plain PyTorch loop (``zero_grad``, ``backward``, ``torch.optim.AdamW``)
  with ``torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)`` around every block
  (dots_saveable: ``create_selective_checkpoint_contexts`` with the same op list).

Bytes are counted by :func:`fnnet.memory_report` (the torch loop through an adapter step), so
both sides are measured alike. Then bfloat16 params with float32 master weights against float32
params: parameter, optimizer-state and activation bytes, and time per step. Prints a table and
writes the raw figures as JSON.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

import fnnet
from fnnet import optim

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import _remat_worker as W  # noqa: E402

POLICIES = ("none", "nothing_saveable", "dots_saveable", "everything_saveable")
SHAPE = dict(vocab=256, dim=128, heads=4, seq=64)
BATCH = 8
MODEL = "tiny"  # --model: "tiny" (the tests' transformer) or "gpt" (fnnet.models.GPT)


def build(depth: int):
    """The benchmarked model, float32, seeded: the tests' transformer or ``fnnet.models.GPT``."""
    if MODEL == "tiny":
        return W.gpt(torch.float32, depth=depth, **SHAPE)
    torch.manual_seed(0)
    return fnnet.models.GPT(SHAPE["vocab"], block_size=SHAPE["seq"], n_layer=depth, n_head=SHAPE["heads"],
                            n_embd=SHAPE["dim"], dropout=0.1)


def embed(net, idx):
    """The plain loop's forward up to the first block, for either model."""
    if MODEL == "tiny":
        return net.tok(idx) + net.pos(torch.arange(idx.shape[1]))
    return net.drop(net.wte(idx) + net.wpe(torch.arange(idx.shape[1])))


def head(net, x):
    if MODEL == "tiny":
        return net.head(net.ln(x))
    return F.linear(net.ln_f(x), net.wte.weight)


def batch(i: int):
    return W.tokens(i, n=BATCH, seq=SHAPE["seq"], vocab=SHAPE["vocab"])


def fnnet_variant(depth: int, policy: str, precision="32"):
    net = build(depth)
    if policy != "none":
        net = W.with_remat(net, policy)
    model = fnnet.functional(net)
    opt = optim.adamw(1e-3)
    state = fnnet.Precision.resolve(precision).prepare(fnnet.TrainState.create(model.params, opt,
                                                                                key=fnnet.random.key(0)))
    step = fnnet.make_train_step(W.lm_loss(model), opt, precision=precision)
    box = [state]

    def run(b):
        box[0], metrics = step(box[0], b)
        return metrics["loss"]

    return run, (lambda: fnnet.memory_report(step, box[0], batch(0)))


def torch_variant(depth: int, policy: str):
    net = build(depth).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    options = {}
    if policy == "dots_saveable":
        from fnnet._remat import dots_saveable  # the same op list as fnnet's policy

        options["context_fn"] = functools.partial(create_selective_checkpoint_contexts, dots_saveable)

    def forward(idx):
        x = embed(net, idx)
        for block in net.blocks:
            if policy in ("none", "everything_saveable"):
                x = block(x)
            else:
                x = checkpoint(block, x, use_reentrant=False, **options)
        return head(net, x)

    def run(b):
        x, y = b
        opt.zero_grad(set_to_none=True)
        logits = forward(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        opt.step()
        return loss.detach()

    def report():
        params = dict(net.named_parameters())
        state = fnnet.TrainState(params, [s for s in opt.state.values()])
        return fnnet.memory_report(lambda st, b: run(b), state, batch(0))

    return run, report


CLOCK = time.perf_counter  # --clock cpu: time.process_time, the process's own CPU time


def timed(run, steps: int, start: int) -> float:
    t0 = CLOCK()
    for i in range(steps):
        run(batch(start + i))
    return (CLOCK() - t0) / steps


def interleaved(variants: dict, rounds: int, steps: int) -> dict[str, list[float]]:
    for run, _ in variants.values():  # warm-up
        run(batch(0))
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        for name, (run, _) in variants.items():
            times[name].append(timed(run, steps, 1 + r * steps))
    return times


def summary(times: dict[str, list[float]], base: str, name: str) -> dict:
    ratios = [a / b for a, b in zip(times[name], times[base])]
    return {"median_s": statistics.median(times[name]), "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios), "raw_s": times[name]}


def main() -> None:
    global CLOCK, MODEL, BATCH
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--out", default="benches/results/2026-12-06-cpu-2core-remat.json")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: the process's CPU time (time.process_time), steadier on a shared machine; "
                        "meaningful with --threads 1")
    p.add_argument("--skip-precision", action="store_true")
    p.add_argument("--dim", type=int, default=None, help="block width (heads: dim // 32; gpt: dim // 64)")
    p.add_argument("--model", choices=["tiny", "gpt"], default="tiny")
    p.add_argument("--batch", type=int, default=8, help="sequences per batch")
    args = p.parse_args()
    MODEL, BATCH = args.model, args.batch
    if MODEL == "gpt":
        dim = args.dim or 256
        SHAPE.update(vocab=96, dim=dim, heads=max(1, dim // 64), seq=128)
    else:
        dim = args.dim or SHAPE["dim"]
        SHAPE.update(dim=dim, heads=max(1, dim // 32))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        CLOCK = time.process_time
    variants = {}
    for policy in POLICIES:
        variants[f"fnnet/{policy}"] = fnnet_variant(args.depth, policy)
        if policy != "everything_saveable":
            variants[f"torch/{policy}"] = torch_variant(args.depth, policy)
    times = interleaved(variants, args.rounds, args.steps)
    reports = {name: report() for name, (_, report) in variants.items()}  # optimizer states made
    bytes_ = {name: r._asdict() for name, r in reports.items()}
    print(f"{MODEL}, fnnet/none:\n{reports['fnnet/none']}\nfnnet/nothing_saveable:\n{reports['fnnet/nothing_saveable']}")
    result = {"model": MODEL, "torch": torch.__version__, "threads": torch.get_num_threads(), "clock": args.clock,
              "depth": args.depth, **SHAPE,
              "batch": BATCH, "rounds": args.rounds, "steps_per_measurement": args.steps, "remat": {}}
    print(f"{'variant':<28}{'activations':>14}{'x none':>8}{'time/step':>11}{'x none (min-max)':>22}")
    for name in variants:
        side = name.split("/")[0]
        base = f"{side}/none"
        row = {"activation_bytes": bytes_[name]["activations"], "memory": bytes_[name],
               "activation_ratio": bytes_[name]["activations"] / bytes_[base]["activations"],
               **summary(times, base, name)}
        result["remat"][name] = row
        print(f"{name:<28}{row['activation_bytes']:>14,}{row['activation_ratio']:>8.3f}"
              f"{row['median_s'] * 1e3:>9.1f}ms{row['ratio_median']:>9.3f} ({row['ratio_min']:.3f}-{row['ratio_max']:.3f})")
    for policy in ("nothing_saveable", "dots_saveable"):  # fnnet against torch's checkpoint, same policy
        vs = summary(times, f"torch/{policy}", f"fnnet/{policy}")
        result["remat"][f"fnnet/{policy}"]["time_vs_torch"] = {k: vs[k] for k in ("ratio_median", "ratio_min",
                                                                                   "ratio_max")}
        print(f"fnnet/{policy} time vs torch/{policy}: {vs['ratio_median']:.3f} "
              f"({vs['ratio_min']:.3f}-{vs['ratio_max']:.3f})")
    if not args.skip_precision:
        result["precision"] = precision_bench(args)
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    print("wrote", args.out)


def precision_bench(args) -> dict:
    bf16 = fnnet.Precision(param_dtype=torch.bfloat16, compute_dtype=torch.bfloat16)
    variants = {"float32": fnnet_variant(args.depth, "none"),
                "bf16-mixed": fnnet_variant(args.depth, "none", "bf16-mixed"),
                "bf16-params+fp32-master": fnnet_variant(args.depth, "none", bf16)}
    times = interleaved(variants, args.rounds, args.steps)
    reports = {name: report() for name, (_, report) in variants.items()}
    out = {}
    print(f"\n{'precision':<26}{'params':>12}{'grads':>12}{'opt state':>12}{'activations':>13}{'time x fp32':>22}")
    for name, r in reports.items():
        row = {"memory": r._asdict(), "param_ratio": r.params / reports["float32"].params,
               **summary(times, "float32", name)}
        out[name] = row
        print(f"{name:<26}{r.params:>12,}{r.grads:>12,}{r.opt_state:>12,}{r.activations:>13,}"
              f"{row['ratio_median']:>9.3f} ({row['ratio_min']:.3f}-{row['ratio_max']:.3f})")
    print(reports["bf16-params+fp32-master"])
    return out


if __name__ == "__main__":
    main()
