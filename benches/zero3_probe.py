"""One rank of the parameter-sharding benchmark (issue 31): fnnet's ZeRO-3 against torch's
``fully_shard`` + ``torch.optim.AdamW``, fnnet's ZeRO-2 and fnnet's DDP, on a GPT-like model.

    torchrun --nproc-per-node 2 benches/zero3_probe.py [--rounds 5] [--layers 8] [--dim 512] [--out FILE]
        [--variants fully_shard,zero3,...] [--label TEXT]

The model: a pre-LN transformer (``--layers`` blocks in an ``nn.ModuleList``, ``--dim`` wide,
vocabulary 8192, context 64, the output tied to the embedding; 29.4 M parameters at the
defaults), float32, AdamW, batch ``--batch`` sequences per rank. The four variants train in the
same ranks in turns, one step each per round, the order rotating every round (interleaved), after
one warm-up step each (at 4 ranks a fifth variant, ``hsdp3``: ``HSDP(mesh 2 x 2, stage=3)``);
fnnet's steps are donated (``--donate 1``, in place, as ``torch.optim``
updates; ``--donate 0``: pure steps, which hold the old and the new state at once). Rank 0 writes one JSON object: the median seconds per step of each variant
with min and max, the ratios to ``fully_shard`` per round (median, min-max), and per rank the
*persistent* bytes (parameters + optimizer state kept between steps, counted tensor by tensor)
and the *peak* bytes during one step (:class:`LiveBytes`: the persistent state's storages plus
every storage an op makes during the step, each until it is freed: gradients, activations,
gathered units, temporaries; torch's ``MemTracker`` registers hooks on module parameters and
cannot follow fnnet's meta templates, so it is not used), the median CPU seconds per step of each rank
(``time.process_time``: all of the process's threads, gloo's included) and the load average (1, 5, 15 min)
at the start and the end: the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import weakref
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fnnet
from fnnet import distributed, optim

VOCAB, SEQ = 8192, 64


class Block(nn.Module):
    def __init__(self, d: int, heads: int = 8):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).transpose(1, 3).unbind(2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, layers: int, d: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, d), nn.Embedding(SEQ, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def mesh_2x2():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))


def nbytes(tensors) -> int:
    seen, total = set(), 0
    for x in tensors:
        if isinstance(x, torch.Tensor) and x.untyped_storage().data_ptr() not in seen:
            seen.add(x.untyped_storage().data_ptr())
            total += x.untyped_storage().nbytes()
    return total


def fnnet_variant(strategy, net: nn.Module, lr: float, donate: bool):
    model = fnnet.functional(net)
    opt = optim.adamw(lr, weight_decay=0.01)

    def loss_fn(params, b):
        return F.cross_entropy(model.apply(params, b[0]).reshape(-1, VOCAB), b[1].reshape(-1))

    step = fnnet.make_train_step(loss_fn, opt, strategy=strategy, donate=donate)
    box = {"state": fnnet.TrainState.create(model.params, opt)}

    def run(b):
        box["state"], m = step(box["state"], b)
        return m["loss"]

    kept = lambda: fnnet.tree.leaves((box["state"].params, box["state"].opt_state))  # noqa: E731
    return run, kept


def torch_variant(net: nn.Module, lr: float):
    from torch.distributed.fsdp import fully_shard

    for block in net.blocks:
        fully_shard(block)
    fully_shard(net)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)

    def run(b):
        loss = F.cross_entropy(net(b[0]).reshape(-1, VOCAB), b[1].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def kept():
        local = [p.to_local() for p in net.parameters()]
        return local + [t.to_local() if hasattr(t, "to_local") else t for s in opt.state.values() for t in s.values()]

    return run, kept


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the storages alive: those given at the start (the persistent state) and every
    storage an op makes while the mode is on (activations, gradients, gathered units, temporaries),
    each counted until it is freed (a weak reference to the storage); ``peak`` is the most at once."""

    def __init__(self, start):
        super().__init__()
        self.live: dict[int, object] = {}
        self.current = self.peak = 0
        for t in start:
            self.track(t)

    def track(self, t) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        try:
            st = t.untyped_storage()
            key = st.data_ptr()
        except (RuntimeError, NotImplementedError):  # a tensor subclass (DTensor) or a storage resized away
            return
        if key == 0 or key in self.live:
            return
        n = st.nbytes()
        self.current += n
        self.peak = max(self.peak, self.current)
        self.live[key] = weakref.ref(st, lambda _, key=key, n=n: self.free(key, n))

    def free(self, key: int, n: int) -> None:
        if self.live.pop(key, None) is not None:
            self.current -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            self.track(t)
        return out


def peak_of(run, b, state) -> int:
    """The most bytes alive at once during one step (:class:`LiveBytes`), the state's included."""
    mode = LiveBytes(state())
    with mode:
        run(b)
    return mode.peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--out", type=str, default="")
    parser.add_argument("--donate", type=int, default=1, help="fnnet's steps update in place (as torch.optim does)")
    parser.add_argument("--variants", type=str, default="",
                        help="comma-separated, of fully_shard (needed: the ratios' reference), zero3, zero2, ddp, hsdp3 "
                             "(4 ranks: HSDP(mesh 2 x 2, stage=3)); default: all that fit the world size")
    parser.add_argument("--label", type=str, default="", help="recorded in the output (e.g. which code ran)")
    args = parser.parse_args()
    distributed.init()
    me, world = distributed.rank(), distributed.world_size()
    g = torch.Generator().manual_seed(1 + me)
    idx = torch.randint(0, VOCAB, (args.batch, SEQ + 1), generator=g)
    b = (idx[:, :-1], idx[:, 1:])

    def fresh() -> nn.Module:
        torch.manual_seed(0)
        return GPT(args.layers, args.dim)

    n_params = sum(p.numel() for p in fresh().parameters())
    makers = {"fully_shard": lambda: torch_variant(fresh(), 1e-4),
              "zero3": lambda: fnnet_variant(distributed.ZeRO(3), fresh(), 1e-4, args.donate),
              "zero2": lambda: fnnet_variant(distributed.ZeRO(2), fresh(), 1e-4, args.donate),
              "ddp": lambda: fnnet_variant(distributed.DDP(), fresh(), 1e-4, args.donate),
              "hsdp3": lambda: fnnet_variant(distributed.HSDP(mesh_2x2(), stage=3), fresh(), 1e-4, args.donate)}
    wanted = args.variants.split(",") if args.variants else \
        ["fully_shard", "zero3", "zero2", "ddp"] + (["hsdp3"] if world == 4 else [])
    variants = {n: makers[n]() for n in wanted}
    names = list(variants)
    load = {"start": os.getloadavg()}
    peaks = {}
    for name in names:  # warm-up step, then one step measured for its peak
        variants[name][0](b)
        peaks[name] = peak_of(variants[name][0], b, variants[name][1])
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}  # this process's CPU seconds (all its threads) per step
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            variants[name][0](b)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    load["end"] = os.getloadavg()
    persistent = {n: nbytes(variants[n][1]()) for n in names}
    everyone: list = [None] * world
    dist.all_gather_object(everyone, {"persistent": persistent, "peak": peaks,
                                      "cpu_seconds_median": {n: statistics.median(v) for n, v in cpu.items()}})
    if me == 0:
        ratios = {n: sorted(a / t for a, t in zip(times[n], times["fully_shard"])) for n in names}
        out = {"world": world, "params": n_params, "layers": args.layers, "dim": args.dim, "batch_per_rank": args.batch, "donate": bool(args.donate),
               "rounds": args.rounds, "torch": torch.__version__, "loadavg_1_5_15min": load, "label": args.label,
               "seconds": {n: {"median": statistics.median(v), "min": min(v), "max": max(v)} for n, v in times.items()},
               "ratio_to_fully_shard": {n: {"median": statistics.median(v), "min": v[0], "max": v[-1]}
                                        for n, v in ratios.items()},
               "unsharded_param_adam_bytes": 3 * 4 * n_params, "ranks": everyone}
        print(json.dumps(out))
        if args.out:
            Path(args.out).write_text(json.dumps(out, indent=1))
    distributed.shutdown()


if __name__ == "__main__":
    main()
