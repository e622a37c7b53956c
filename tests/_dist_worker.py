"""One rank of the multi-process tests in ``test_distributed.py`` (started by ``torch.distributed.run``).

    python -m torch.distributed.run --nproc-per-node 2 tests/_dist_worker.py SCENARIO OUT_DIR

Scenarios: ``step`` / ``step-jit`` (the distributed step on uneven shards), ``trainer`` (the
Trainer under torchrun), ``fail`` (rank 1 raises at step 3). Results go to OUT_DIR.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fnnet
from fnnet import distributed, optim

SIZES = (5, 7)  # rows per rank: uneven on purpose
STEPS = 4


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).double()


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole (concatenated) batch of ``step``: what a single process trains on."""
    g = torch.Generator().manual_seed(100 + step)
    n = sum(SIZES)
    return torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randn(n, 2, generator=g, dtype=torch.float64)


def my_part(batch: tuple[torch.Tensor, torch.Tensor], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    lo = sum(SIZES[:rank])
    return tuple(t[lo:lo + SIZES[rank]] for t in batch)


def run_step(out: Path, jit: bool) -> None:
    model = fnnet.functional(mlp())
    loss_fn = lambda p, b: F.mse_loss(model.apply(p, b[0]), b[1])  # noqa: E731
    opt = optim.adam(0.01)
    # every rank starts from different params: the first step must broadcast rank 0's
    params = model.params if distributed.rank() == 0 else fnnet.tree.map(lambda t: t * 0 + 7.0, model.params)
    state = fnnet.TrainState.create(params, opt)
    # tiny buckets: the gradients of one step go out in several all-reduces, started during the backward pass
    step = distributed.make_train_step(loss_fn, opt, jit=jit, bucket_mb=0.0005)
    losses = []
    for i in range(STEPS):
        state, metrics = step(state, my_part(data(i), distributed.rank()))
        losses.append(float(metrics["loss"]))
    fnnet.save(out / f"rank{distributed.rank()}.safetensors", state.params)
    (out / f"rank{distributed.rank()}.json").write_text(json.dumps(losses))


def run_trainer(out: Path) -> None:
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(45, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (45,), generator=g)
    loader = fnnet.ArrayLoader((x, y), 4, shuffle=True, key=fnnet.random.key(1), shard=distributed.shard())
    val = fnnet.ArrayLoader((x[:21], y[:21]), 4, shard=distributed.shard())
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).double()
    trainer = fnnet.Trainer(net, F.cross_entropy, optim.adam(0.05), metrics={"accuracy": fnnet.metrics.accuracy})
    ckpt = fnnet.callbacks.ModelCheckpoint(out / "ckpt", monitor="val_loss", save_last=True)
    history = trainer.fit(loader, val, epochs=2, callbacks=[ckpt])
    result = {k: v for k, v in history.items() if k != "time"}
    (out / f"history{distributed.rank()}.json").write_text(json.dumps(result))
    fnnet.save(out / f"trainer{distributed.rank()}.safetensors", trainer.state.params)


def run_fail() -> None:
    model = fnnet.functional(mlp())
    opt = optim.sgd(0.1)

    def loss_fn(p, b):
        if distributed.rank() == 1 and b[0].shape[0] == 99:
            raise RuntimeError("rank 1 fails on purpose at step 3")
        return F.mse_loss(model.apply(p, b[0]), b[1])

    step = fnnet.make_train_step(loss_fn, opt, distributed=True)
    state = fnnet.TrainState.create(model.params, opt)
    for i in range(6):
        n = 99 if i == 2 else 4
        state, _ = step(state, (torch.randn(n, 3, dtype=torch.float64), torch.randn(n, 2, dtype=torch.float64)))


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    import datetime

    distributed.init(timeout=datetime.timedelta(seconds=60))
    try:
        if scenario in ("step", "step-jit"):
            run_step(out, jit=scenario == "step-jit")
        elif scenario == "trainer":
            run_trainer(out)
        elif scenario == "fail":
            run_fail()
        else:
            raise SystemExit(f"unknown scenario {scenario}")
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
