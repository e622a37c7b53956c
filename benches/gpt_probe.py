"""The character GPT, side by side: a plain PyTorch loop against fnnet's step and Trainer.

    python benches/gpt_probe.py [--rounds 30] [--chunk 10] [--json FILE]

Workload: ``fnnet.models.GPT`` in nanoGPT's ``shakespeare_char`` CPU configuration (4 layers,
4 heads, 128 wide, context 64, batch 12; 0.81 M parameters) on windows of
``fnnet.datasets.load_text()``; nanoGPT's optimizer (AdamW, betas 0.9/0.99, weight decay 0.1 on
2-D parameters, warmup 100 + cosine to 1e-4 at 2,000, gradient norm clipped to 1). Every
variant starts from the same initial weights and sees the same batches:

* ``plain``: ``nn.Module`` + ``torch.optim.AdamW`` (defaults: foreach, not fused), the learning rate
  set per group each step (nanoGPT's way), ``loss.backward()``, ``clip_grad_norm_``, eager;
* ``plain-compiled``: the same with ``torch.compile(module)``;
* ``fnnet``: ``make_train_step(loss_fn, opt, donate=True)``, eager;
* ``fnnet-jit``: the same with ``jit=True`` (gradient, clip and update in one compiled graph);
* ``trainer``: ``fnnet.Trainer`` over the module (default settings), ``fit`` on each chunk.

Time: ``--rounds`` rounds; in each, every variant (in a shuffled order) runs the next ``--chunk``
batches and is timed (per step). Ratios are taken per round against ``plain`` (the compiled step
against ``plain-compiled``): median and min-max. The first round is a warm-up (compilation) and is
reported apart. Each chunk's process CPU time is recorded too (``cpu_ratios``): on a shared,
oversubscribed machine it moves less with the other jobs than wall time does. The rounds make one 300-step training run per variant: the loss curves, whose
largest difference to ``plain`` is reported.

Memory (eager variants): the peak of live tensor bytes over 3 steps from a fresh state, counted by
a ``TorchDispatchMode`` that adds each new storage when an op creates it and drops it when the
last tensor on it dies (params, optimizer state, gradients, saved activations and temporaries),
plus the tensors that exist before the first step (params; fnnet's optimizer state). Not RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import random as pyrandom
import statistics
import sys
import time
import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import fnnet
from fnnet.data import WindowLoader
from fnnet.loss import cross_entropy
from fnnet.models import GPT
from fnnet.recipes import charlm_optimizer

CONFIG = dict(block_size=64, n_layer=4, n_head=4, n_embd=128)
BATCH, LR, MIN_LR, WARMUP, DECAY, BETA2, WD, CLIP = 12, 1e-3, 1e-4, 100, 2000, 0.99, 0.1, 1.0


def schedule():
    return fnnet.optim.warmup_cosine_decay_schedule(0.0, LR, WARMUP, DECAY, MIN_LR)


class Plain:
    """nanoGPT's training loop body (train.py), on an ``nn.Module`` holding ``params``."""

    def __init__(self, vocab: int, params: dict, compiled: bool = False):
        self.net = GPT(vocab, **CONFIG)
        self.net.load_state_dict({k: v.clone() for k, v in params.items()})
        named = list(self.net.named_parameters())
        groups = [{"params": [p for _, p in named if p.ndim >= 2], "weight_decay": WD},
                  {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW(groups, lr=LR, betas=(0.9, BETA2))
        self.forward = torch.compile(self.net) if compiled else self.net
        self.lr, self.t = schedule(), 0

    def step(self, batch):
        x, y = batch
        lr = float(self.lr(self.t))
        for group in self.opt.param_groups:
            group["lr"] = lr
        logits = self.forward(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), CLIP)
        self.opt.step()
        self.t += 1
        return loss.detach()


class FnnetStep:
    def __init__(self, vocab: int, params: dict, jit: bool = False):
        self.model = fnnet.functional(GPT(vocab, **CONFIG))
        opt = charlm_optimizer(params, lr=LR, min_lr=MIN_LR, warmup=WARMUP, decay_steps=DECAY, beta2=BETA2,
                               weight_decay=WD, grad_clip=CLIP)
        model = self.model

        def loss_fn(p, batch):
            x, y = batch
            return cross_entropy(model.apply(p, x), y)

        self.train_step = fnnet.make_train_step(loss_fn, opt, donate=True, jit=jit)
        self.state = fnnet.TrainState.create({k: v.clone() for k, v in params.items()}, opt)

    def step(self, batch):
        self.state, metrics = self.train_step(self.state, batch)
        return metrics["loss"]


class TrainerRun:
    def __init__(self, vocab: int, params: dict):
        opt = charlm_optimizer(params, lr=LR, min_lr=MIN_LR, warmup=WARMUP, decay_steps=DECAY, beta2=BETA2,
                               weight_decay=WD, grad_clip=CLIP)
        net = GPT(vocab, **CONFIG)
        net.load_state_dict({k: v.clone() for k, v in params.items()})
        self.trainer = fnnet.Trainer(net, cross_entropy, opt, devices="cpu")
        self.losses: list = []
        outer = self

        class Keep:
            def on_train_batch_end(self, trainer, step, metrics):
                outer.losses.append(metrics["loss"])

        self.keep = Keep()

    def run(self, batches):
        self.trainer.fit(batches, epochs=1, verbose=0, callbacks=[self.keep])
        out, self.losses = self.losses, []
        return out


def run_chunk(variant, batches):
    if isinstance(variant, TrainerRun):
        return variant.run(batches)
    return [variant.step(b) for b in batches]


class LiveBytes(TorchDispatchMode):
    """Live tensor bytes (one count per storage) of what ops create while active, and their peak."""

    def __init__(self, base: int):
        super().__init__()
        self.refs: dict[int, list] = {}
        self.live = self.peak = base

    def _track(self, t):
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        st = t.untyped_storage()
        key = st.data_ptr()
        if key == 0:
            return
        if key in self.refs:
            self.refs[key][0] += 1
        else:
            self.refs[key] = [1, st.nbytes()]
            self.live += st.nbytes()
            self.peak = max(self.peak, self.live)
        weakref.finalize(t, self._drop, key)

    def _drop(self, key):
        entry = self.refs.get(key)
        if entry is not None:
            entry[0] -= 1
            if entry[0] == 0:
                del self.refs[key]
                self.live -= entry[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            self._track(t)
        return out


def _bytes(*trees) -> int:
    seen = {}
    for tree in trees:
        for t in fnnet.tree.leaves(tree):
            if isinstance(t, torch.Tensor):
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def peak_memory(name, vocab, params, batches):
    if name == "plain":
        v = Plain(vocab, params)
        base = _bytes(dict(v.net.named_parameters()))
    elif name == "fnnet":
        v = FnnetStep(vocab, params)
        base = _bytes(v.state)
    else:
        v = TrainerRun(vocab, params)
        base = _bytes(v.trainer.state)
    with LiveBytes(base) as mode:
        run_chunk(v, batches[:3])
    return {"peak_bytes": mode.peak, "before_bytes": base}


def summarise(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--chunk", type=int, default=10)
    ap.add_argument("--variants", default="plain,plain-compiled,fnnet,fnnet-jit,trainer")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    train_ids, _, vocab = fnnet.datasets.load_text()
    loader = WindowLoader(train_ids, CONFIG["block_size"], BATCH, key=fnnet.random.key(1))
    it = iter(loader)
    batches = [tuple(t.clone() for t in next(it)) for _ in range(args.rounds * args.chunk)]
    params = fnnet.functional(GPT(len(vocab), **CONFIG)).init(fnnet.random.key(0))
    names = args.variants.split(",")
    make = {"plain": lambda: Plain(len(vocab), params), "plain-compiled": lambda: Plain(len(vocab), params, True),
            "fnnet": lambda: FnnetStep(len(vocab), params), "fnnet-jit": lambda: FnnetStep(len(vocab), params, True),
            "trainer": lambda: TrainerRun(len(vocab), params)}
    variants = {n: make[n]() for n in names}
    times = {n: [] for n in names}
    cpu = {n: [] for n in names}  # process CPU time: less moved by the other jobs on a shared machine than wall time
    losses = {n: [] for n in names}
    order_rng = pyrandom.Random(0)
    for r in range(args.rounds):
        chunk = batches[r * args.chunk:(r + 1) * args.chunk]
        order = names[:]
        order_rng.shuffle(order)
        for n in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            out = run_chunk(variants[n], chunk)
            out = [float(v) for v in out]  # the last read syncs (CPU: already done)
            times[n].append((time.perf_counter() - start) / len(chunk))
            cpu[n].append((time.process_time() - start_cpu) / len(chunk))
            losses[n].extend(out)
        print(f"round {r + 1}/{args.rounds}: " + "  ".join(f"{n} {times[n][-1] * 1e3:.1f} ms" for n in names),
              file=sys.stderr, flush=True)
    result = {"config": {**CONFIG, "batch": BATCH, "rounds": args.rounds, "chunk": args.chunk,
                         "torch": torch.__version__, "threads": torch.get_num_threads(),
                         "machine": "2-core shared CPU VM"},
              "first_round_ms": {n: times[n][0] * 1e3 for n in names},
              "ms_per_step": {n: summarise([t * 1e3 for t in times[n][1:]]) for n in names}, "ratios": {},
              "cpu_ms_per_step": {n: summarise([t * 1e3 for t in cpu[n][1:]]) for n in names}, "cpu_ratios": {},
              "loss_max_abs_diff_vs_plain": {}, "final_loss": {n: losses[n][-1] for n in names}}
    for n, ref in (("fnnet", "plain"), ("trainer", "plain"), ("fnnet-jit", "plain-compiled"), ("fnnet-jit", "plain"),
                   ("plain-compiled", "plain")):
        if n in times and ref in times:
            result["ratios"][f"{n} / {ref}"] = summarise([a / b for a, b in zip(times[n][1:], times[ref][1:])])
            result["cpu_ratios"][f"{n} / {ref}"] = summarise([a / b for a, b in zip(cpu[n][1:], cpu[ref][1:])])
    for n in names:
        if n != "plain" and "plain" in losses:
            result["loss_max_abs_diff_vs_plain"][n] = max(abs(a - b) for a, b in zip(losses[n], losses["plain"]))
    result["memory"] = {}
    for n in ("plain", "fnnet", "trainer"):
        if n in names:
            result["memory"][n] = peak_memory(n, len(vocab), params, batches)
    if "plain" in result["memory"]:
        for n, m in result["memory"].items():
            m["vs_plain"] = m["peak_bytes"] / result["memory"]["plain"]["peak_bytes"]
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
