"""One rank of the multi-process tests in ``test_distributed.py`` (started by ``torch.distributed.run``).

    python -m torch.distributed.run --nproc-per-node 2 tests/_dist_worker.py SCENARIO OUT_DIR

Scenarios: ``step`` / ``step-jit`` (the distributed step on uneven shards), ``trainer`` (the
Trainer under torchrun), ``seam`` (the reduction seam, broadcast_state and cross-rank checks,
several in one launch), ``fail`` (rank 1 raises at step 3). Results go to OUT_DIR.
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


def bn_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()


def run_seam(out: Path) -> None:
    """Several checks of the step's seams in one launch: a counting reduction, the local reduction,
    the explicit broadcast_state and its mismatch error, the Trainer's batch-count check, BatchNorm
    buffers and float16 loss scaling across ranks."""
    from fnnet import comm

    me = distributed.rank()
    result: dict = {}
    model = fnnet.functional(mlp())
    loss_fn = lambda p, b: F.mse_loss(model.apply(p, b[0]), b[1])  # noqa: E731

    # 1. a reduction that counts its calls (and otherwise is the default all-reduce)
    calls: list[int] = []

    def counting(bucket):
        calls.append(bucket.index)
        return comm.all_reduce(bucket)

    opt = optim.adam(0.01)
    step = fnnet.make_train_step(loss_fn, opt, distributed=True, reduction=counting, bucket_mb=0.0005)
    state = fnnet.TrainState.create(model.params, opt)
    per_step = []
    for i in range(STEPS):
        before = len(calls)
        state, _ = step(state, my_part(data(i), me))
        per_step.append(len(calls) - before)
    result["counting_calls"] = per_step
    fnnet.save(out / f"counting{me}.safetensors", state.params)

    # 2. the local reduction: no communication, each rank keeps (n_r / N) * its own gradient
    sgd = optim.sgd(0.1)
    step = fnnet.make_train_step(loss_fn, sgd, distributed=True, reduction=comm.local, sync_state=False)
    state, _ = step(fnnet.TrainState.create(model.params, sgd), my_part(data(0), me))
    fnnet.save(out / f"local{me}.safetensors", state.params)

    # 3. broadcast_state, called explicitly: rank 1's different params become rank 0's
    params = model.params if me == 0 else fnnet.tree.map(lambda t: t * 0 + 3.0, model.params)
    synced = distributed.broadcast_state(fnnet.TrainState.create(params, opt))
    fnnet.save(out / f"broadcast{me}.safetensors", synced.params)
    assert synced.params is not params

    # 4. ranks whose models differ in shape: a clear error on every rank, naming the rank and the leaf
    other = fnnet.functional(nn.Sequential(nn.Linear(3, 16 + me), nn.Tanh(), nn.Linear(16 + me, 2)).double())
    try:
        distributed.broadcast_state(fnnet.TrainState.create(other.params, opt))
        result["mismatch"] = None
    except ValueError as err:
        result["mismatch"] = str(err)

    # 5. the Trainer refuses loaders that give the ranks different numbers of batches
    x, y = torch.randn(12, 3, dtype=torch.float64), torch.randint(0, 2, (12,))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2)).double()
    trainer = fnnet.Trainer(net, F.cross_entropy, optim.sgd(0.1), devices="cpu")
    try:
        trainer.fit(fnnet.ArrayLoader((x, y), 4 if me == 0 else 3), epochs=1, verbose=0)
        result["batches"] = None
    except ValueError as err:
        result["batches"] = str(err)

    # 6. BatchNorm: float buffers are the sample-weighted average over ranks, integer ones rank 0's
    bn = fnnet.functional(bn_model())
    loss_bn = fnnet.supervised_loss(bn, F.mse_loss, return_outputs=False)
    step = fnnet.make_train_step(loss_bn, sgd, distributed=True)
    state = fnnet.TrainState.create(bn.params, sgd, buffers=bn.buffers)
    state, _ = step(state, my_part(data(0), me))
    fnnet.save(out / f"bn{me}.safetensors", {"params": state.params, "buffers": state.buffers})

    # 7. float16 loss scaling across ranks (CPU autocast): the scale never reaches the update
    step = fnnet.make_train_step(loss_fn, sgd, distributed=True, precision="16-mixed")
    state = fnnet.TrainState.create(model.params, sgd)
    for i in range(2):
        state, metrics = step(state, my_part(data(i), me))
    result["fp16_finite"] = bool(metrics["finite"])
    fnnet.save(out / f"fp16{me}.safetensors", state.params)

    # 8. accumulation over 4 micro-batches: collectives only on the last one, one reduction per update
    import torch.distributed as tdist

    seen = {"all_reduce": 0, "reductions": 0}
    real_all_reduce = tdist.all_reduce

    def counted_all_reduce(*args, **kwargs):
        seen["all_reduce"] += 1
        return real_all_reduce(*args, **kwargs)

    def one_reduction(bucket):
        seen["reductions"] += 1
        return comm.all_reduce(bucket)

    tdist.all_reduce = counted_all_reduce
    try:
        step = fnnet.make_train_step(loss_fn, opt, distributed=True, accumulate=4, reduction=one_reduction)
        state = fnnet.TrainState.create(model.params, opt)
        per_call = []
        for m in range(4):
            before = dict(seen)
            state, metrics = step(state, my_part(data(m), me))
            per_call.append({k: seen[k] - before[k] for k in seen} | {"updated": metrics["updated"]})
        result["accumulate_calls"] = per_call
        result["accumulate_loss"] = float(metrics["loss"])
        fnnet.save(out / f"accumulate{me}.safetensors", state.params)
        # an unfinished window (3 of 4 micro-batches), applied by flush at the end of an epoch
        state = fnnet.TrainState.create(model.params, opt)
        for m in range(3):
            state, _ = step(state, my_part(data(m), me))
        state, _ = step.flush(state)
        fnnet.save(out / f"flush{me}.safetensors", state.params)
    finally:
        tdist.all_reduce = real_all_reduce
    (out / f"seam{me}.json").write_text(json.dumps(result))


class ShardNet(nn.Module):
    """Parameters that test a sharding's edges: 99 trainable elements (a count no world size of 2 or 4
    divides), a zero-size and a one-element parameter, and a frozen one."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.fc1, self.fc2 = nn.Linear(3, 16), nn.Linear(16, 2)
        self.empty = nn.Parameter(torch.zeros(0))
        self.one = nn.Parameter(torch.ones(1))
        self.frozen = nn.Parameter(torch.randn(2), requires_grad=False)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)) * self.one + self.empty.sum()) + self.frozen


SHARD_OPTIMIZERS = {
    "adam": lambda: optim.adam(0.01),
    "sgd": lambda: optim.sgd(0.05, momentum=0.9, nesterov=True),
    "rmsprop": lambda: optim.rmsprop(0.01),
    "adagrad": lambda: optim.adagrad(0.1),
    "clip+adamw": lambda: optim.chain(optim.clip_by_global_norm(0.05), optim.adamw(0.01, weight_decay=0.1)),
}
SHARD_STEPS = 12


def shard_sizes(world: int) -> tuple[int, ...]:
    return (5, 7, 4, 6)[:world]


def shard_data(step: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(200 + step)
    n = sum(shard_sizes(world))
    return torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randn(n, 2, generator=g, dtype=torch.float64)


def shard_part(batch, rank: int, world: int):
    sizes = shard_sizes(world)
    lo = sum(sizes[:rank])
    return tuple(t[lo:lo + sizes[rank]] for t in batch)


def shard_setup(name: str):
    model = fnnet.functional(ShardNet().double())
    opt = optim.masked(SHARD_OPTIMIZERS[name](), model.trainable)
    return model, opt, (lambda p, b: F.mse_loss(model.apply(p, b[0]), b[1]))


def run_shard(out: Path) -> None:
    """The sharded optimizer step (W = this launch's ranks) for every optimizer of SHARD_OPTIMIZERS,
    and a checkpoint written halfway (adam) through gather_state."""
    me, world = distributed.rank(), distributed.world_size()
    result = {}
    for name in SHARD_OPTIMIZERS:
        model, opt, loss_fn = shard_setup(name)
        step = fnnet.make_train_step(loss_fn, opt, distributed=True, shard_optimizer=True, bucket_mb=0.0003,
                                     donate=name == "adam")
        state = fnnet.TrainState.create(model.params, opt)
        full_bytes = sum(x.numel() * x.element_size() for x in fnnet.tree.leaves(state.opt_state)
                         if isinstance(x, torch.Tensor))
        if name == "sgd":  # no whole state at all: the step initialises this rank's part
            state = fnnet.TrainState(model.params, None)
        for i in range(SHARD_STEPS):
            state, metrics = step(state, shard_part(shard_data(i, world), me, world))
            if name == "adam" and i == SHARD_STEPS // 2 - 1:
                whole = step.gather_state(state)
                if me == 0:
                    fnnet.save(out / "sharded-half.safetensors", whole)
        part_bytes = sum(x.numel() * x.element_size() for x in fnnet.tree.leaves(state.opt_state)
                         if isinstance(x, torch.Tensor))
        result[name] = {"full_bytes": full_bytes, "part_bytes": part_bytes}
        fnnet.save(out / f"shard-{name}-{me}.safetensors", state.params)
    (out / f"shard{me}.json").write_text(json.dumps(result))
    if world == 2:  # the Trainer with a sharded optimizer state, and its checkpoint
        g = torch.Generator().manual_seed(3)
        x, y = torch.randn(45, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (45,), generator=g)
        loader = fnnet.ArrayLoader((x, y), 4, shuffle=True, key=fnnet.random.key(1), shard=distributed.shard())
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).double()
        trainer = fnnet.Trainer(net, F.cross_entropy, optim.adam(0.05), strategy="zero2")
        trainer.fit(loader, epochs=2, verbose=0)
        trainer.save(out / "sharded-trainer.safetensors")
        fnnet.save(out / f"sharded-trainer-params{me}.safetensors", trainer.state.params)


STRATEGY_OPTIMIZERS = ("adam", "clip+adamw")


def _train(step, state, world: int, rank: int, offset: int = 0, steps: int = SHARD_STEPS):
    for i in range(steps):
        state, metrics = step(state, shard_part(shard_data(i + offset, world), rank, world))
    return state, metrics


def _part_bytes(state) -> int:
    return sum(x.numel() * x.element_size() for x in fnnet.tree.leaves(state.opt_state) if isinstance(x, torch.Tensor))


def run_strategies(out: Path) -> None:
    """Four ranks, several checks in one launch (each compared with one process in test_distributed.py):
    HSDP on a 2 x 2 mesh; two disjoint groups training two models side by side; the shorthands against
    the old flags; ZeRO's reduce-scatter path forced on gloo and ZeRO-1; the ranks' settings checked on
    the first call; the finite flag, dropout keys, a skipped window's buffers and a mask function."""
    import torch.distributed as tdist
    from torch.distributed.device_mesh import init_device_mesh

    me, world = distributed.rank(), distributed.world_size()
    assert world == 4
    result: dict = {}
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    pair = [tdist.new_group([0, 1]), tdist.new_group([2, 3])]  # every rank creates both
    mine, pair_rank = pair[me // 2], me % 2
    for name in STRATEGY_OPTIMIZERS:
        # 1. HSDP: the optimizer state cut in two within each row, the rows replicas of each other
        model, opt, loss_fn = shard_setup(name)
        step = fnnet.make_train_step(loss_fn, opt, strategy=distributed.HSDP(mesh, bucket_mb=0.0003))
        state, _ = _train(step, fnnet.TrainState.create(model.params, opt), 4, me)
        fnnet.save(out / f"hsdp-{name}-{me}.safetensors", state.params)
        result[f"hsdp-{name}-bytes"] = [_part_bytes(state), _part_bytes(fnnet.TrainState.create(model.params, opt))]
        # 2. two groups: ranks 0-1 train with ZeRO-2 on their data, ranks 2-3 with DDP on other data
        model, opt, loss_fn = shard_setup(name)
        strategy = distributed.ZeRO(2, mine, bucket_mb=0.0003) if me < 2 else distributed.DDP(mine, bucket_mb=0.0003)
        step = fnnet.make_train_step(loss_fn, opt, strategy=strategy)
        state, _ = _train(step, fnnet.TrainState.create(model.params, opt), 2, pair_rank, offset=50 * (me // 2))
        fnnet.save(out / f"groups-{name}-{me}.safetensors", state.params)
    # 3. shorthands and strategy objects give the old flags' results, bit for bit
    model, opt, loss_fn = shard_setup("adam")
    same = {}
    for label, new, old in (("ddp", dict(strategy="ddp"), dict(distributed=True)),
                            ("zero2", dict(strategy="zero2"), dict(distributed=True, shard_optimizer=True)),
                            ("ZeRO()", dict(strategy=distributed.ZeRO()), dict(distributed=True, shard_optimizer=True))):
        got = [_train(fnnet.make_train_step(loss_fn, opt, **kw), fnnet.TrainState.create(model.params, opt), 4, me,
                      steps=3)[0].params for kw in (new, old)]
        same[label] = all(torch.equal(got[0][k], got[1][k]) for k in got[0])
    result["same"] = same
    # 4. ZeRO-2 with NCCL's collectives (reduce-scatter, all-gather) forced on gloo, and ZeRO-1
    for label, strategy in (("scatter", distributed.ZeRO(2, bucket_mb=0.0003, reduce_scatter=True)),
                            ("zero1", distributed.ZeRO(1, bucket_mb=0.0003))):
        for donate in (False, True):
            step = fnnet.make_train_step(loss_fn, opt, strategy=strategy, donate=donate)
            state, _ = _train(step, fnnet.TrainState.create(fnnet.tree.map(torch.clone, model.params), opt), 4, me)
            fnnet.save(out / f"{label}-{donate}-{me}.safetensors", state.params)
    run_strategy_checks(out, me, result)
    import _zero3_hsdp_worker  # 10. HSDP with stage 3 on the same mesh (asserted on every rank)

    result["hsdp3"] = _zero3_hsdp_worker.checks(mesh)
    result["trainer_logs"] = trainer_logs(mesh)
    (out / f"strategies{me}.json").write_text(json.dumps(result))


def trainer_logs(mesh) -> dict:
    """11. What a Trainer logs under DDP and HSDP (stage 2 and 3; and stage 2 with 2 accumulated batches
    against DDP with 2) on the same sharded data: every step's ``metrics["loss"]``, the epochs' loss,
    accuracy, val_loss and val_accuracy, and each run's parameters and BatchNorm buffers' largest
    difference from its DDP run (test_distributed.py asserts they are equal, float64)."""
    g = torch.Generator().manual_seed(7)
    x, xv = torch.randn(64, 8, generator=g, dtype=torch.float64), torch.randn(32, 8, generator=g, dtype=torch.float64)
    y, yv = torch.randint(0, 3, (64,), generator=g), torch.randint(0, 3, (32,), generator=g)
    runs = {"ddp": ("ddp", 1), "hsdp2": (distributed.HSDP(mesh), 1), "hsdp3": (distributed.HSDP(mesh, stage=3), 1),
            "ddp-acc2": ("ddp", 2), "hsdp2-acc2": (distributed.HSDP(mesh), 2)}
    logs, ends = {}, {}
    for label, (strategy, accumulate) in runs.items():
        torch.manual_seed(3)
        net = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()
        steps: list[float] = []
        record = type("Record", (), {"on_train_batch_end": lambda self, t, i, m: steps.append(float(m["loss"]))})()
        trainer = fnnet.Trainer(net, F.cross_entropy, optim.adam(0.01), metrics={"accuracy": fnnet.metrics.accuracy},
                                strategy=strategy, accumulate_grad_batches=accumulate, key=fnnet.random.key(0))
        history = trainer.fit(fnnet.ArrayLoader((x, y), 4, shard=distributed.shard()),
                              fnnet.ArrayLoader((xv, yv), 4, shard=distributed.shard()), epochs=2, verbose=0,
                              shuffle=False, callbacks=[record])
        logs[label] = {"steps": steps, **{k: history[k] for k in ("loss", "accuracy", "val_loss", "val_accuracy")}}
        state = trainer.checkpoint()["state"]
        ends[label] = {**state.params, **{"buffer." + k: v for k, v in state.buffers.items() if v.is_floating_point()}}
    for label, end in ends.items():
        ddp = ends["ddp-acc2" if label.endswith("acc2") else "ddp"]
        logs[label]["max_diff"] = max((float((end[k] - ddp[k]).abs().max()), k) for k in ddp)  # (diff, its key)
    return logs


def run_strategy_checks(out: Path, me: int, result: dict) -> None:
    """Issue 34's checks of the rank steps (see run_strategies)."""
    # 5. ranks built with different accumulate settings: a clear error on the first call, on every rank
    model, opt, loss_fn = shard_setup("adam")
    step = fnnet.make_train_step(loss_fn, opt, strategy="ddp", accumulate=2 if me < 2 else 1)
    try:
        step(fnnet.TrainState.create(model.params, opt), shard_part(shard_data(0, 4), me, 4))
        result["accumulate_mismatch"] = None
    except ValueError as err:
        result["accumulate_mismatch"] = str(err)
    # 6. ZeRO-2: an inf gradient in one rank's batch, in a parameter one rank owns: every rank skips
    params = {"w": torch.linspace(-1, 1, 10, dtype=torch.float64), "c": torch.zeros(1, dtype=torch.float64)}
    tiny = lambda p, b: ((b[0] * p["w"]).sum(1) - b[1]).pow(2).mean() + (p["c"] * b[2]).mean()  # noqa: E731
    sgd = optim.sgd(0.1)
    step = fnnet.make_train_step(tiny, sgd, strategy=distributed.ZeRO(2, bucket_mb=0.0001), skip_nonfinite=True)
    g = torch.Generator().manual_seed(me)
    x, y, z = torch.randn(3, 10, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64), \
        torch.ones(3, dtype=torch.float64)
    if me == 3:
        z[1] = float("inf")
    state, metrics = step(fnnet.TrainState.create(params, sgd), (x, y, z))
    result["inf_finite"] = bool(metrics["finite"])
    result["inf_unchanged"] = all(torch.equal(state.params[k], params[k]) for k in params)
    # 7. dropout keys: each micro-batch of a window and each rank draws its own
    drawn = lambda p, b, key: (F.mse_loss(model.apply(p, b[0]), b[1]),  # noqa: E731
                               {"draw": fnnet.random.uniform(key, (1,), dtype=torch.float64)[0]})
    step = fnnet.make_train_step(drawn, opt, strategy="zero2", accumulate=3)
    state = fnnet.TrainState.create(model.params, opt, key=fnnet.random.key(5))
    draws = []
    for m in range(3):
        state, metrics = step(state, shard_part(shard_data(m, 4), me, 4))
        draws.append(float(metrics["draw"]))
    result["draws"] = draws
    # 8. a window whose update is skipped (NaN in its first micro-batch) keeps its buffers as at its start
    bn = fnnet.functional(bn_model())
    loss_bn = fnnet.supervised_loss(bn, F.mse_loss, return_outputs=False)
    for label, strategy in (("ddp", "ddp"), ("zero2", "zero2")):
        step = fnnet.make_train_step(loss_bn, sgd, strategy=strategy, accumulate=2, skip_nonfinite=True)
        state = fnnet.TrainState.create(bn.params, sgd, buffers=bn.buffers)
        x, y = shard_part(shard_data(0, 4), me, 4)
        if me == 0:
            x = x.clone()
            x[0, 0] = float("nan")
        state, _ = step(state, (x, y))
        state, metrics = step(state, shard_part(shard_data(1, 4), me, 4))
        result[f"bn-{label}"] = [bool(metrics["finite"]), all(torch.equal(state.buffers[k], bn.buffers[k])
                                                              for k in bn.buffers)]
    # 9. ZeRO-2 with adamw's mask given as a function of the shapes: equal to one process
    model = fnnet.functional(ShardNet().double())
    decay = lambda p: fnnet.tree.map(lambda x: x.ndim > 1, p)  # noqa: E731
    opt = optim.masked(optim.adamw(0.01, weight_decay=0.5, mask=decay), model.trainable)
    loss_fn = lambda p, b: F.mse_loss(model.apply(p, b[0]), b[1])  # noqa: E731
    step = fnnet.make_train_step(loss_fn, opt, strategy=distributed.ZeRO(2, bucket_mb=0.0003))
    state, _ = _train(step, fnnet.TrainState.create(model.params, opt), 4, me)
    fnnet.save(out / f"maskfn-{me}.safetensors", state.params)
    masked_adam = optim.masked(optim.adam(0.01), decay)
    try:
        step = fnnet.make_train_step(loss_fn, masked_adam, strategy="zero2")
        step(fnnet.TrainState(model.params, None), shard_part(shard_data(0, 4), me, 4))
        result["maskfn_part_init"] = None
    except ValueError as err:
        result["maskfn_part_init"] = str(err)


def run_jit_strategies(out: Path) -> None:
    """jit=True where it was refused before strategies: ZeRO-2 (compiled gradient function, eager
    reduce-scatter/update/all-gather) and DDP with a custom reduction (the same split)."""
    from fnnet import comm

    me, world = distributed.rank(), distributed.world_size()
    model, opt, loss_fn = shard_setup("clip+adamw")
    for label, strategy in (("zero2", distributed.ZeRO(2, bucket_mb=0.0003)),
                            ("reduction", distributed.DDP(bucket_mb=0.0003, reduction=comm.all_reduce))):
        step = fnnet.make_train_step(loss_fn, opt, strategy=strategy, jit=True)
        state, _ = _train(step, fnnet.TrainState.create(model.params, opt), world, me, steps=4)
        fnnet.save(out / f"jit-{label}-{me}.safetensors", state.params)


def run_shard_resume(out: Path) -> None:
    """Load the checkpoint a 2-rank sharded run wrote halfway and finish its training on this launch's ranks."""
    me, world = distributed.rank(), distributed.world_size()
    model, opt, loss_fn = shard_setup("adam")
    state = fnnet.load(out / "sharded-half.safetensors")
    step = fnnet.make_train_step(loss_fn, opt, distributed=True, shard_optimizer=True, bucket_mb=0.0003)
    for i in range(SHARD_STEPS // 2, SHARD_STEPS):
        state, _ = step(state, _resume_part(i, me, world))
    fnnet.save(out / f"resumed-{world}-{me}.safetensors", state.params)


def _resume_part(step: int, rank: int, world: int):
    """The 2-rank run's global batch of ``step``, split over this launch's ranks."""
    x, y = shard_data(step, 2)
    bounds = [len(x) * r // world for r in range(world + 1)]
    return x[bounds[rank]:bounds[rank + 1]], y[bounds[rank]:bounds[rank + 1]]


def run_timeout(out: Path, *, peer_exits: bool = False) -> None:
    """Rank 1 takes one step where rank 0 takes three, then waits (rank 0's second step times out) or,
    with ``peer_exits``, exits (rank 0's next step finds its connection gone)."""
    import os
    import time

    me = distributed.rank()
    model = fnnet.functional(mlp())
    opt = optim.sgd(0.1)
    step = fnnet.make_train_step(lambda p, b: F.mse_loss(model.apply(p, b[0]), b[1]), opt, distributed=True)
    state = fnnet.TrainState.create(model.params, opt)
    message = None
    try:
        for i in range(3 if me == 0 else 1):
            state, _ = step(state, my_part(data(i), me))
    except RuntimeError as err:
        message = str(err)
    (out / f"{'peer' if peer_exits else 'timeout'}{me}.json").write_text(json.dumps(message))
    if me == 1 and not peer_exits:
        time.sleep(12)  # alive but silent: rank 0 meets the timeout, not a closed connection
    os._exit(0)


def run_lone_save(out: Path) -> None:
    """A sharded Trainer whose rank 1 alone calls trainer.save (a callback on one rank would): the gather waits
    for rank 0, which never joins, until the (short) timeout; rank 0 stays alive and silent meanwhile."""
    import os
    import time

    torch.manual_seed(0)
    trainer = fnnet.Trainer(mlp(), F.mse_loss, optim.adam(0.01), shard_optimizer=True)
    trainer.fit(my_part(data(0), distributed.rank()), epochs=1, batch_size=4, verbose=0)
    message = None
    if distributed.rank() == 1:
        try:
            trainer.save(out / "lone.safetensors")
        except RuntimeError as err:
            message = str(err)
        (out / "lone1.json").write_text(json.dumps(message))
    else:
        time.sleep(7)  # past rank 1's 4 s timeout: it meets the timeout, not a closed connection
    os._exit(0)


def resume_trainer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).double()
    return fnnet.Trainer(net, F.cross_entropy, optim.adam(0.05), key=7)


def resume_data():
    g = torch.Generator().manual_seed(3)
    return torch.randn(45, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (45,), generator=g)


def resume_loader():
    """Global batches of 8 (6 per epoch, the last of 5) split over however many ranks there are."""
    return fnnet.ArrayLoader(resume_data(), 8, shuffle=True, key=fnnet.random.key(1), shard=distributed.shard(),
                             global_batch=True)


class StopAt(fnnet.callbacks.Callback):
    """Ends fit after ``steps`` optimizer steps, as a crash would (after that step's checkpoint)."""

    def __init__(self, steps):
        self.steps = steps

    def on_train_batch_end(self, trainer, step, metrics):
        if trainer.state.step == self.steps:
            raise KeyboardInterrupt


def run_resume(out: Path, world: int) -> None:
    """2 ranks: train until step 4 of epoch 1 with a checkpoint every step, then stop. Other worlds:
    resume from that checkpoint and finish 2 epochs."""
    trainer = resume_trainer()
    ckpt = fnnet.callbacks.ModelCheckpoint(out / "ckpt", monitor="loss", every_n_steps=1)
    if world == 2:
        trainer.fit(resume_loader(), epochs=2, verbose=0, callbacks=[ckpt, StopAt(4)])
    else:
        trainer.fit(resume_loader(), epochs=2, verbose=0, resume=out / "ckpt" / "step.safetensors", callbacks=[ckpt])
        fnnet.save(out / f"resumed-{world}-{distributed.rank()}.safetensors", trainer.state.params)


def run_restart(out: Path) -> None:
    """Under torchrun --max-restarts 1: rank 1 kills itself in step 8 of the first attempt; the restarted
    group resumes from the newest checkpoint by itself."""
    import os
    import signal

    class KillOnce(fnnet.callbacks.Callback):
        def on_train_batch_start(self, trainer, step):
            if step == 8 and distributed.rank() == 1 and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
                os.kill(os.getpid(), signal.SIGKILL)

    trainer = resume_trainer()
    ckpt = fnnet.callbacks.ModelCheckpoint(out / "ckpt", monitor="loss", every_n_steps=3)
    trainer.fit(resume_loader(), epochs=2, verbose=0, resume="auto", callbacks=[ckpt, KillOnce()])
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    fnnet.save(out / f"restart-{distributed.rank()}.safetensors", trainer.state.params)
    (out / f"restart-{distributed.rank()}.json").write_text(json.dumps({"attempt": attempt,
                                                                         "step": trainer.state.step}))


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    import datetime

    distributed.init(timeout=datetime.timedelta(seconds=4 if scenario in ("timeout", "lone-save") else 30 if scenario == "peer-exit" else 60))
    try:
        if scenario in ("step", "step-jit"):
            run_step(out, jit=scenario == "step-jit")
        elif scenario == "trainer":
            run_trainer(out)
        elif scenario == "resume":
            run_resume(out, distributed.world_size())
        elif scenario == "restart":
            run_restart(out)
        elif scenario == "timeout":
            run_timeout(out)
        elif scenario == "peer-exit":
            run_timeout(out, peer_exits=True)
        elif scenario == "lone-save":
            run_lone_save(out)
        elif scenario == "shard":
            run_shard(out)
        elif scenario == "jit-strategies":
            run_jit_strategies(out)
        elif scenario == "strategies":
            run_strategies(out)
        elif scenario == "shard-resume":
            run_shard_resume(out)
        elif scenario == "seam":
            run_seam(out)
        elif scenario == "fail":
            run_fail()
        else:
            raise SystemExit(f"unknown scenario {scenario}")
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
