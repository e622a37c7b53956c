"""``fnnet train charlm`` with its defaults against nanoGPT's loop written in plain PyTorch, same protocol.

    python benches/charlm_vs_plain.py plain|fnnet|fnnet-jit [--steps 2000] [--jsonl FILE]

One variant per process (run them back to back, alternating; the machine is shared). Both
sides use the same text (``load_text()``), initial weights, training windows (the recipe's
``WindowLoader`` keys), held-out windows (20 batches of 12, the same at every check), schedule
and optimizer numbers, and evaluate every 250 updates. ``plain`` is ``benches/gpt_probe.py``'s
``Plain`` (``nn.Module``, ``torch.optim.AdamW``, ``clip_grad_norm_``, eager); ``fnnet`` and
``fnnet-jit`` call :func:`fnnet.recipes.train_charlm` (``--jit``). Wall time: the training loop
with its evaluations (and, for ``fnnet-jit``, the compilation); the held-out loss after the last
update; also the process's CPU time over the whole job (text loading included on both sides: on a
shared, oversubscribed machine the wall time mostly measures the others). One JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))

import fnnet  # noqa: E402
from fnnet.data import WindowLoader  # noqa: E402
from fnnet.models import GPT  # noqa: E402
from gpt_probe import CONFIG, Plain  # noqa: E402
import gpt_probe  # noqa: E402


def plain_run(steps: int, eval_interval: int, eval_iters: int = 20, seed: int = 0) -> dict:
    train_ids, val_ids, vocab = fnnet.datasets.load_text()
    init_key, data_key, val_key, _, _ = fnnet.random.split(fnnet.random.key(seed), 5)
    params = fnnet.functional(GPT(len(vocab), **CONFIG)).init(init_key)
    gpt_probe.DECAY, gpt_probe.WARMUP = steps, min(100, steps // 10)
    run = Plain(len(vocab), params)
    loader = WindowLoader(train_ids, CONFIG["block_size"], 12, key=data_key, global_batch=True)
    x_val, y_val = next(iter(WindowLoader(val_ids, CONFIG["block_size"], eval_iters * 12, key=val_key,
                                          windows_per_epoch=eval_iters * 12)))
    history = []
    start = time.perf_counter()
    while run.t < steps:
        for batch in loader:
            loss = run.step(batch)
            if run.t % eval_interval == 0 or run.t == steps:
                run.net.eval()
                with torch.no_grad():
                    val = sum(float(F.cross_entropy(run.net(x).flatten(0, 1), y.flatten()))
                              for x, y in zip(x_val.split(12), y_val.split(12))) / eval_iters
                run.net.train()
                history.append({"step": run.t, "loss": float(loss), "val_loss": val})
            if run.t >= steps:
                break
    return {"seconds": time.perf_counter() - start, "val_loss": history[-1]["val_loss"], "history": history}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("variant", choices=["plain", "fnnet", "fnnet-jit"])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--eval-interval", type=int, default=250)
    ap.add_argument("--jsonl", default=None)
    args = ap.parse_args()
    begin, cpu = time.perf_counter(), time.process_time()
    if args.variant == "plain":
        out = plain_run(args.steps, args.eval_interval)
    else:
        _, res = fnnet.recipes.train_charlm(steps=args.steps, eval_interval=args.eval_interval,
                                            jit=args.variant == "fnnet-jit", device="cpu", verbose=0)
        h = res["history"]
        out = {"seconds": res["seconds"], "val_loss": res["val_loss"], "sample": res["sample"],
               "history": [{"step": s, "loss": l, "val_loss": v, "tokens_per_sec": t}
                           for s, l, v, t in zip(h["step"], h["loss"], h["val_loss"], h["tokens_per_sec"])]}
    out.update(variant=args.variant, steps=args.steps, process_seconds=time.perf_counter() - begin,
               cpu_seconds=time.process_time() - cpu, load_average=os.getloadavg(),
               torch=torch.__version__, threads=torch.get_num_threads(), finished=time.strftime("%H:%M:%S"))
    line = json.dumps(out)
    print(line)
    if args.jsonl:
        with open(args.jsonl, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
