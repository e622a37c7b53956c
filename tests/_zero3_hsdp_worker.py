"""HSDP with stage 3 (``fnnet.distributed.HSDP(mesh, stage=3)``) on 4 ranks, a 2 x 2 mesh
(``("replicate", "shard")``): the checks :func:`checks` runs on every rank, inside the 4-rank launch of
``tests/test_distributed.py`` (``_dist_worker.run_strategies``: one launch for every 4-rank check).

The model, batches and one-process reference are ``_zero3_worker``'s (a pre-LN transformer with a
tied embedding, a 1- and a 0-element parameter, uneven shards and batches). Every rank asserts; an
assertion error fails the launch.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import fnnet
from fnnet import distributed, optim

import _zero3_worker as base  # the model, batches and one-process reference of the ZeRO-3 tests



def train_hsdp(mesh, opt, steps: int, sizes: tuple[int, ...], m=None, counts: dict | None = None,
               other_start: bool = False):
    """``steps`` steps of ``HSDP(mesh, stage=3)``; ``counts``: filled with the second step's collectives
    (CommDebugMode), by kind; ``other_start``: every rank but 0 starts from other parameters (the first
    step starts every rank from rank 0's state, over the shard group and then the replicate group)."""
    from torch.distributed.tensor.debug import CommDebugMode

    m = m if m is not None else base.model()
    step = fnnet.make_train_step(base.loss_of(m), opt, strategy=distributed.HSDP(mesh, stage=3))
    whole = {k: v.clone() for k, v in m.params.items()}
    shift = float(distributed.rank()) if other_start else 0.0
    state = fnnet.TrainState.create({k: v + shift for k, v in m.params.items()} if shift else m.params, opt)
    losses = []
    for i in range(steps):
        mode = CommDebugMode() if counts is not None and i == 1 else None
        before = fnnet.tree.map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, state)
        with mode if mode is not None else contextlib.nullcontext():
            new, metrics = step(state, base.part(base.batch(i, sizes), sizes, distributed.rank()))
        if mode is not None:
            counts.update({str(k): v for k, v in mode.get_comm_counts().items()})
        # pure: the state passed in (whole on the first call, this rank's parts after) is left as it was
        for (path, a), b in zip(fnnet.tree.leaves_with_path(state), fnnet.tree.leaves(before)):
            assert not isinstance(a, torch.Tensor) or torch.equal(a, b), f"step {i} changed its input {path}"
        state = new
        losses.append(float(metrics["loss"]))
    assert all(torch.equal(m.params[k], v) for k, v in whole.items()), "the model's parameters changed"
    return step, state, losses


def one_process(opt, steps: int, sizes: tuple[int, ...]):
    m = base.model()
    step = fnnet.make_train_step(base.loss_of(m), opt)
    state = fnnet.TrainState.create(m.params, opt)
    losses = []
    for i in range(steps):
        state, metrics = step(state, base.batch(i, sizes))
        losses.append(float(metrics["loss"]))
    return state, losses


def against_one_process(mesh, name: str, opt) -> dict:
    """4 steps on uneven batches (2, 3, 4, 5 sequences per rank) against one process on their
    concatenation: parameters, optimizer state and losses, float64, 1e-10 (with Adam, ranks 1-3 start
    from other parameters: rank 0's reach every rank); the state stays in parts of ``1 / S`` (S = 2),
    equal on the two replicas of a part."""
    sizes = base.sizes_for(4)
    ref, ref_losses = one_process(opt, 4, sizes)
    counts: dict = {}
    step, state, losses = train_hsdp(mesh, opt, 4, sizes, counts=counts, other_start=name == "adam")
    whole = step.gather_state(state)
    base.same_state(whole, ref, name)
    assert max(abs(a - b) for a, b in zip(losses, ref_losses)) < 1e-10, (name, losses, ref_losses)
    mine = sum(x.numel() for x in state.params.values())
    assert abs(mine - sum(x.numel() for x in ref.params.values()) / 2) <= 8, mine  # a half, to the padding
    # the two replicas of this part (this rank and the other row's rank of the same column): bit-equal
    flat = torch.cat([x.reshape(-1) for x in state.params.values()])
    replicas = [torch.empty_like(flat) for _ in range(2)]
    dist.all_gather(replicas, flat, group=step.strategy.mesh.get_group("replicate"))
    assert torch.equal(replicas[0], replicas[1]), f"{name}: the replicas' parts differ"
    return {"case": name, "loss": losses[-1], "part_elements": mine, "counts": counts}


def against_fully_shard(mesh) -> dict:
    """torch's ``fully_shard(module, mesh=<2 x 2 mesh>)`` (per block and the root) + ``torch.optim.Adam``
    and fnnet's ``HSDP(mesh, stage=3)`` + ``fnnet.optim.adam``: parameters after 10 steps, and one step's
    collectives."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.debug import CommDebugMode

    torch.manual_seed(0)
    net = base.TinyGPT(empty=False).double()
    for block in net.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(net, mesh=mesh)
    topt = torch.optim.Adam(net.parameters(), lr=0.01)
    sizes = (3,) * 4  # fully_shard averages the ranks' gradients: equal batches
    for i in range(10):
        x, y = base.part(base.batch(i, sizes), sizes, distributed.rank())
        mode = CommDebugMode() if i == 1 else None
        with mode if mode is not None else contextlib.nullcontext():
            loss = F.cross_entropy(net(x).reshape(-1, base.VOCAB), y.reshape(-1))
            loss.backward()
        if mode is not None:
            theirs_counts = {str(k): v for k, v in mode.get_comm_counts().items()}
        topt.step()
        topt.zero_grad()
    theirs = {k: v.full_tensor() for k, v in net.state_dict().items()}
    step, state, _ = train_hsdp(mesh, optim.adam(0.01), 10, sizes, base.model(empty=False))
    mine = step.gather_state(state).params
    worst = max(float((mine[k] - theirs[k]).abs().max()) for k in mine)
    assert worst < 1e-9, worst
    return {"fully_shard_counts": theirs_counts, "fully_shard_max_diff": worst}


def checks(mesh) -> dict:
    """Every check above on ``mesh`` (2 x 2, ``("replicate", "shard")``), asserted on this rank; the
    collectives of a step next to ``fully_shard``'s; what each took (seconds)."""
    out: dict = {"seconds": {}}
    for name, fn in (("adam", lambda: against_one_process(mesh, "adam", optim.adam(0.01))),
                     ("clip", lambda: against_one_process(
                         mesh, "clip+adamw", optim.chain(optim.clip_by_global_norm(0.05), optim.adamw(0.01)))),
                     ("fully_shard", lambda: against_fully_shard(mesh))):
        t0 = time.perf_counter()
        out[name] = fn()
        out["seconds"][name] = round(time.perf_counter() - t0, 2)
    mine, theirs, units = out["adam"]["counts"], out["fully_shard"]["fully_shard_counts"], 4  # the root, 3 blocks
    assert mine["c10d._allgather_base_"] == theirs["c10d._allgather_base_"] == 2 * units - 1, (mine, theirs)
    assert mine["c10d._reduce_scatter_base_"] == theirs["c10d._reduce_scatter_base_"] == units, (mine, theirs)
    # one all-reduce of each unit's chunk across the replicas, as fully_shard; fnnet's sample count and loss
    # are summed over the shard group, then over the replicate group: 4 more
    assert theirs["c10d.allreduce_"] == units and mine["c10d.allreduce_"] == units + 4, (mine, theirs)
    return out
