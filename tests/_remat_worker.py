"""A small GPT-like transformer for the remat and precision tests (and ``benches/remat_probe.py``), and one
rank of their multi-process checks (started by ``torch.distributed.run``).

    python -m torch.distributed.run --nproc-per-node 2 tests/_remat_worker.py OUT_DIR

One launch: remat against no remat under ``distributed=True`` (with accumulation) and
``shard_optimizer=True`` (float64, dropout under a key), and float32 master weights sharded under
``shard_optimizer=True``. Results go to OUT_DIR.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fnnet
from fnnet import optim


class Block(nn.Module):
    """A pre-norm transformer block: causal self-attention (``scaled_dot_product_attention``) and a GELU MLP."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc, self.out = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for z in self.qkv(self.ln1(x)).split(d, -1))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.out(F.gelu(self.fc(self.ln2(x)))))


class TinyGPT(nn.Module):
    """Token and position embeddings, ``depth`` blocks in ``self.blocks``, a final norm and the head."""

    def __init__(self, vocab: int = 32, dim: int = 16, heads: int = 2, depth: int = 3, seq: int = 8,
                 dropout: float = 0.1):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(seq, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout) for _ in range(depth))
        self.ln, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def gpt(dtype: torch.dtype = torch.float64, **kwargs) -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT(**kwargs).to(dtype)


def with_remat(net: nn.Module, policy: str) -> nn.Module:
    net = copy.deepcopy(net)
    for i, block in enumerate(net.blocks):
        net.blocks[i] = fnnet.remat(block, policy)
    return net


def tokens(step: int, n: int = 6, seq: int = 8, vocab: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(500 + step)
    idx = torch.randint(0, vocab, (n, seq + 1), generator=g)
    return idx[:, :-1], idx[:, 1:]


def lm_loss(model: fnnet.Model):
    def loss_fn(params, batch, *, key=None):
        x, y = batch
        logits = model.apply(params, x, train=key is not None, key=key)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))

    return loss_fn


def train(net: nn.Module, steps: int, batch_of, opt=None, **step_options) -> fnnet.TrainState:
    model = fnnet.functional(net)
    opt = opt or optim.adamw(1e-2)
    step = fnnet.make_train_step(lm_loss(model), opt, **step_options)
    state = fnnet.TrainState.create(model.params, opt, key=fnnet.random.key(7))
    for i in range(steps):
        state, _ = step(state, batch_of(i))
    return state


def precision_checks(part) -> dict:
    """bfloat16 params with float32 master weights: ZeRO-2 shards the master weights and equals DDP;
    a bfloat16 reduction on gloo is refused."""
    bf16 = fnnet.Precision(param_dtype=torch.bfloat16, compute_dtype=torch.bfloat16)
    seen = set()

    def reduction(bucket):  # the default all-reduce, noting the dtype the gradients travel in
        seen.add(str(bucket.buffer.dtype))
        return fnnet.comm.all_reduce(bucket)

    ddp = train(gpt(torch.float32, dropout=0.0, depth=1), 2, part, distributed=True, precision=bf16,
                reduction=reduction)
    zero = train(gpt(torch.float32, dropout=0.0, depth=1), 2, part, distributed=True, shard_optimizer=True,
                 precision=bf16)
    master = fnnet.tree.leaves(zero.opt_state.master)
    report = {"master_dtypes": sorted({str(m.dtype) for m in master}), "master_ndim": sorted({m.dim() for m in master}),
              "master_numel": sum(m.numel() for m in master), "params_numel": sum(p.numel() for p in zero.params.values()),
              "param_dtypes": sorted({str(p.dtype) for p in zero.params.values()}), "reduced_in": sorted(seen),
              "zero2_equals_ddp": all(torch.equal(zero.params[k], ddp.params[k]) for k in ddp.params),
              "moved": any(not torch.equal(ddp.params[k], v.to(torch.bfloat16))
                           for k, v in gpt(torch.float32, depth=1).state_dict().items())}
    try:
        model = fnnet.functional(gpt())
        fnnet.make_train_step(lm_loss(model), optim.adamw(1e-2), distributed=True,
                              precision=fnnet.Precision(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16))
        report["refused"] = None
    except ValueError as err:
        report["refused"] = str(err)
    return report


def main() -> None:
    out = Path(sys.argv[1])
    fnnet.distributed.init()
    rank, world = fnnet.distributed.rank(), fnnet.distributed.world_size()

    def part(i):
        x, y = tokens(i, n=4 * world)
        return x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4]

    report = {}
    # distributed=True with accumulate=2 runs both halves of the DDP path (a window's no_sync
    # micro-batch, then the bucketed all-reduce); shard_optimizer=True the ZeRO-2 path
    for name, options in {"ddp-accumulate": dict(distributed=True, accumulate=2),
                          "zero2": dict(distributed=True, shard_optimizer=True)}.items():
        steps = 2 * options.get("accumulate", 1)
        plain = train(gpt(depth=2), steps, part, **options)
        remat = train(with_remat(gpt(depth=2), "nothing_saveable"), steps, part, **options)
        dots = train(with_remat(gpt(depth=2), "dots_saveable"), steps, part, **options)
        report[name] = {policy: all(torch.equal(s.params[k], plain.params[k]) for k in plain.params)
                        for policy, s in (("nothing_saveable", remat), ("dots_saveable", dots))}
        report[name]["moved"] = any(not torch.equal(plain.params[k], gpt(depth=2).state_dict()[k])
                                    for k in plain.params)
    (out / f"remat{rank}.json").write_text(json.dumps(report))
    (out / f"precision{rank}.json").write_text(json.dumps(precision_checks(part)))
    fnnet.distributed.shutdown()


if __name__ == "__main__":
    main()
