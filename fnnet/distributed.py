"""Past one machine: the same training step on ``torch.distributed``, launched with ``torchrun``.

fnnet does not bring a launcher or a communication engine of its own: it runs on
``torch.distributed`` (NCCL on GPUs, gloo on CPUs), started by ``torchrun`` or by anything
that sets its environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``: SLURM ``srun`` scripts, Kubernetes, Ray Train's ``TorchTrainer``)::

    torchrun --nproc-per-node 4 train.py          # in train.py:
    fnnet.distributed.init()                      # join the process group (NCCL or gloo)
    step = fnnet.make_train_step(loss_fn, optimizer, distributed=True)
    loader = fnnet.ArrayLoader(data, 64, shuffle=True, key=key, shard=fnnet.distributed.shard())
    for batch in loader:                          # each rank gets its part of every batch
        state, metrics = step(state, batch)       # the same state on every rank

The step is the single-device step with one change between the gradients and the update:
the gradients are summed across ranks weighted by each rank's batch size, so ranks may hold
different batch sizes and the result equals single-process training on the concatenated
batch. Eager steps put the gradients into buckets of about 25 MB (as DDP) and start each
bucket's all-reduce as soon as its gradients are ready, while the backward pass goes on;
compiled steps (``jit=True``) use torch's traceable functional collectives, so the all-reduce
is part of the compiled graph.
"""

from __future__ import annotations

import datetime
import os
import socket
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist

from . import random as _random
from . import tree as _tree
from .state import TrainState, loss_scale_for, step_update
from .train import compile_step, split_step_key, step_parts

__all__ = ["init", "shutdown", "is_initialized", "rank", "world_size", "local_rank", "is_main", "barrier", "device",
           "shard", "broadcast", "all_reduce_sum", "make_train_step", "DEFAULT_TIMEOUT", "BUCKET_MB"]

DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)
BUCKET_MB = 25.0
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# -- the process group ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(backend: str | None = None, *, timeout: datetime.timedelta = DEFAULT_TIMEOUT,
         world_of_one: bool = False) -> None:
    """Join the process group a launcher (``torchrun``, ``srun``...) described in the environment.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; by default NCCL when CUDA is available, else gloo.
            With NCCL the process's CUDA device becomes ``cuda:LOCAL_RANK``.
        timeout: the limit of every collective: a rank that stops answering ends the run with
            an error after this long instead of hanging.
        world_of_one: without a launcher's environment, start a group of one process (rank
            0 of 1) on localhost instead of raising: the same script then runs unlaunched.

    Raises:
        RuntimeError: no launcher environment (naming the missing variables and how to
            launch) and ``world_of_one`` is False, or a process group already exists.
    """
    if dist.is_initialized():
        raise RuntimeError("fnnet.distributed.init: a process group is already initialised (call shutdown() first)")
    missing = [v for v in _LAUNCHER_VARS if v not in os.environ]
    if missing:
        if not world_of_one:
            raise RuntimeError(
                f"fnnet.distributed.init: no launcher environment ({', '.join(missing)} not set). Start the script "
                "with `torchrun --nproc-per-node N script.py` (or srun / another launcher that sets RANK, WORLD_SIZE, "
                "LOCAL_RANK, MASTER_ADDR, MASTER_PORT), or call init(world_of_one=True) to run as a group of one"
            )
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timeout, rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]))


def shutdown() -> None:
    """Leave the process group (``destroy_process_group``); a no-op without one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    """Whether this process is in a process group (after :func:`init`)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    """This process's rank on its machine (``LOCAL_RANK``; 0 without a launcher)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Whether this is rank 0: the process that prints and writes files."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    if is_initialized() and world_size() > 1:
        dist.barrier()


def device() -> torch.device:
    """The device this rank trains on: ``cuda:LOCAL_RANK`` with NCCL, else the CPU."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def shard() -> tuple[int, int] | None:
    """``(rank, world_size)`` for ``ArrayLoader(shard=...)``, or ``None`` without a process group."""
    return (rank(), world_size()) if is_initialized() and world_size() > 1 else None


def broadcast(tree: Any, src: int = 0, *, donate: bool = False) -> Any:
    """``tree`` as rank ``src`` has it, on every rank: tensors and plain leaves (keys, ints).

    Tensors are broadcast into copies, or into the tree's own tensors with ``donate=True``.
    """
    if not is_initialized() or world_size() == 1:
        return tree
    leaves, spec = _tree.flatten(tree)
    plain = [None if isinstance(x, torch.Tensor) else x for x in leaves]
    box = [plain]
    dist.broadcast_object_list(box, src=src)
    out = []
    for x, p in zip(leaves, box[0]):
        if isinstance(x, torch.Tensor):
            t = x if donate else x.clone()
            dist.broadcast(t, src=src)
            out.append(t)
        else:
            out.append(p)
    return _tree.unflatten(spec, out)


def all_reduce_sum(tree: Any) -> Any:
    """The sum over ranks of every tensor leaf (new tensors; metric states merge this way)."""
    if not is_initialized() or world_size() == 1:
        return tree

    def reduce(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        t = x.clone()
        dist.all_reduce(t)
        return t

    return _tree.map(reduce, tree)


# -- the step -------------------------------------------------------------------------------------------


class _Buckets:
    """Gradients gathered into flat buckets, each all-reduced (asynchronously) once complete.

    Each rank multiplies its gradients by its share of the samples, ``n_r / N`` (``N``, the sum
    of the batch sizes, is all-reduced first), while flattening them into a bucket, so the
    reduced bucket is the weighted mean itself. Buckets follow the
    order in which gradients became ready in the previous step (the backward pass's order),
    as DDP rebuilds its buckets after the first iteration.
    """

    def __init__(self, leaves: list[torch.Tensor], order: list[int], limit: int):
        self.leaves = leaves
        self.buckets: list[list[int]] = []
        size, current, dtype = 0, [], None
        for i in order:
            x = leaves[i]
            nbytes = x.numel() * x.element_size()
            if current and (size + nbytes > limit or x.dtype != dtype):
                self.buckets.append(current)
                size, current = 0, []
            current.append(i)
            size, dtype = size + nbytes, x.dtype
        if current:
            self.buckets.append(current)
        self.bucket_of = {i: b for b, idx in enumerate(self.buckets) for i in idx}
        self.waiting = [len(b) for b in self.buckets]
        self.grads: list[torch.Tensor | None] = [None] * len(leaves)
        self.flat: list[torch.Tensor | None] = [None] * len(self.buckets)
        self.works: list[Any] = [None] * len(self.buckets)
        self.ready: list[int] = []
        self.launched = 0  # buckets start in index order on every rank: collectives must match
        self.weight: Any = 1.0  # n_r / N, over the loss scale: the hooks see gradients of the scaled loss
        self.scale_back: Any = 1.0  # the loss scale, to put it back on gradients that were unscaled

    def hook(self, i: int, g: torch.Tensor) -> None:
        if i not in self.bucket_of or self.grads[i] is not None:
            return
        self.grads[i] = g
        self.ready.append(i)
        self.waiting[self.bucket_of[i]] -= 1
        while self.launched < len(self.buckets) and self.waiting[self.launched] == 0:
            self._launch(self.launched)
            self.launched += 1

    def _launch(self, b: int) -> None:
        idx = self.buckets[b]
        first = self.leaves[idx[0]]
        flat = torch.empty(sum(self.leaves[i].numel() for i in idx), dtype=first.dtype, device=first.device)
        offset = 0
        for i in idx:  # weighted and flattened in one pass: the bucket is the scaled gradients
            n = self.leaves[i].numel()
            g = self.grads[i]
            if g is None:
                flat[offset:offset + n].zero_()
            else:
                torch.mul(g.reshape(-1), self.weight, out=flat[offset:offset + n])
            offset += n
        self.flat[b] = flat
        self.works[b] = dist.all_reduce(flat, async_op=True)

    def finish(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Launch what the hooks did not (unused params), wait, and return ``sum_r (n_r / N) g_r``."""
        for i, g in enumerate(grads):
            if self.grads[i] is None and i in self.bucket_of:  # unused or frozen: no hook ran
                self.grads[i] = g * self.scale_back
        for b in range(self.launched, len(self.buckets)):
            self._launch(b)
        self.launched = len(self.buckets)
        out = list(grads)
        for b, idx in enumerate(self.buckets):
            self.works[b].wait()
            flat = self.flat[b]
            offset = 0
            for i in idx:
                n = self.leaves[i].numel()
                out[i] = flat[offset:offset + n].view_as(self.leaves[i])
                offset += n
        return out


def _batch_size(batch: Any) -> int:
    for x in _tree.leaves(batch):
        if isinstance(x, torch.Tensor) and x.ndim > 0:
            return x.shape[0]
    raise ValueError("the distributed step needs a batch holding a tensor with a first (sample) dimension")


def make_train_step(loss_fn: Callable, optimizer: Any, *, jit: bool = False, donate: bool = False,
                    precision: str = "32", compile_options: Mapping[str, Any] | None = None,
                    skip_nonfinite: bool = False, bucket_mb: float = BUCKET_MB
                    ) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, Any]]]:
    """The multi-process training step ``step(state, batch) -> (state, metrics)``; each rank passes its shard.

    The arguments mean what they mean in :func:`fnnet.make_train_step` (``distributed=True``
    there builds this). Every rank:

    * on the state's first step (``state.step == 0``) takes rank 0's params, optimizer state,
      buffers and key (a broadcast), so every rank starts from one state;
    * computes the gradients of its own batch (dropout keys differ per rank:
      ``fold_in(step key, rank)``);
    * sums ``n_r * g_r`` over ranks and divides by ``sum_r n_r`` (``n_r``: this rank's batch
      size): the gradient of the concatenated batch for a mean-reduced loss. Eager steps
      reduce in buckets of about ``bucket_mb`` MB that start during the backward pass;
      compiled steps all-reduce inside the compiled graph;
    * applies the same update (the optimizer's state is the same on every rank).

    ``metrics["loss"]`` is the loss of the concatenated batch (a weighted mean over ranks);
    other aux values are this rank's own (the ``Trainer`` sums its metric states across ranks at
    the end of an epoch). Float buffers (BatchNorm's running statistics) are averaged over ranks
    with the same weights; other buffers are rank 0's. A rank with an empty batch is an error:
    every rank needs at least one sample per step (``ArrayLoader(shard=...)`` guarantees it).
    """
    if not is_initialized():
        raise RuntimeError("the distributed step needs a process group: call fnnet.distributed.init() first "
                           "(in a process started by torchrun)")
    grad_fn, declared, scaled, checks = step_parts(loss_fn, precision=precision, skip_nonfinite=skip_nonfinite,
                                                   jit=jit, compile_options=compile_options)
    limit = int(bucket_mb * 2**20)
    me = rank()
    order: list[int] = []  # the order gradients became ready last time: a performance cache only

    def count(n: int, dev: torch.device) -> float:
        """``N``, the samples of this step over all ranks (a tiny all-reduce before the backward)."""
        t = torch.tensor([float(n)], dtype=torch.float64, device=dev)
        dist.all_reduce(t)
        return float(t[0])

    def reduce_extras(n: int, total: float, loss: torch.Tensor, buffers: Any) -> tuple[torch.Tensor, Any]:
        """One all-reduce for the weighted loss and the float buffers (weights ``n / total``)."""
        buf_leaves, buf_spec = _tree.flatten(buffers) if buffers is not None else ([], None)
        floats = [i for i, b in enumerate(buf_leaves) if isinstance(b, torch.Tensor) and b.is_floating_point()]
        flat = torch.cat([loss.double().reshape(1) * n] + [buf_leaves[i].double().reshape(-1) * n for i in floats])
        dist.all_reduce(flat)
        out, offset = list(buf_leaves), 1
        for i in floats:
            k = buf_leaves[i].numel()
            out[i] = (flat[offset:offset + k] / total).view_as(buf_leaves[i]).to(buf_leaves[i].dtype)
            offset += k
        for i, b in enumerate(buf_leaves):
            if isinstance(b, torch.Tensor) and i not in floats:
                out[i] = b.clone()
                dist.broadcast(out[i], src=0)
        new_buffers = _tree.unflatten(buf_spec, out) if buf_spec is not None else None
        return (flat[0] / total).float(), new_buffers

    def eager_grads(state: TrainState, batch: Any, key: Any, loss_scale: Any, n: int):
        leaves, spec = _tree.flatten(state.params)
        first = not order
        if first:
            order.extend(reversed(range(len(leaves))))
        buckets = _Buckets(leaves, list(order), limit)
        total = count(n, leaves[0].device)
        buckets.weight = n / total if loss_scale is None else n / total / loss_scale.scale
        buckets.scale_back = 1.0 if loss_scale is None else loss_scale.scale
        grads, loss, aux, new_buffers = grad_fn(state.params, batch, state.buffers, key, loss_scale=loss_scale,
                                                grad_hook=buckets.hook)
        if first:  # later steps bucket in the order the gradients came, rank 0's (DDP's rebuild)
            box = [buckets.ready if len(buckets.ready) == len(leaves) else list(order)]
            dist.broadcast_object_list(box, src=0)
            order[:] = box[0]
        loss, new_buffers = reduce_extras(n, total, loss, new_buffers)
        reduced = buckets.finish(_tree.leaves(grads))
        return _tree.unflatten(spec, reduced), loss, aux, new_buffers

    def compiled_body(params, batch, buffers, key, loss_scale, n):
        from torch.distributed import _functional_collectives as fc

        grads, loss, aux, new_buffers = grad_fn(params, batch, buffers, key, loss_scale=loss_scale)
        leaves, spec = _tree.flatten(grads)
        flat = torch.cat([g.reshape(-1) for g in leaves] + [loss.reshape(1).to(leaves[0].dtype)]) * n
        flat = fc.all_reduce(torch.cat([flat, n.to(flat.dtype).reshape(1)]), "sum", dist.group.WORLD)
        total = flat[-1]
        flat = flat[:-1] / total
        out, offset = [], 0
        for g in leaves:
            out.append(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        return _tree.unflatten(spec, out), flat[-1].float(), aux, new_buffers

    if jit:
        compiled = compile_step(compiled_body, compile_options)

    def step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, Any]]:
        if not isinstance(state, TrainState):
            raise TypeError(f"step expects a TrainState as its first argument, got {type(state).__name__}")
        if state.step == 0:
            state = broadcast(state, donate=donate)
        n = _batch_size(batch)
        if n == 0:
            raise ValueError(f"rank {me} got an empty batch; every rank needs at least one sample per step "
                             "(fnnet.ArrayLoader(..., shard=fnnet.distributed.shard()) never makes empty shards)")
        next_key, step_key = split_step_key(state.key)
        key = _random.fold_in(step_key, me) if step_key is not None else None
        loss_scale = loss_scale_for(state, scaled)
        if jit:
            dev = _tree.leaves(state.params)[0].device
            with _random.rng_scope(key if "key" in declared else None,
                                   [dev] if dev.type == "cuda" and key is not None else []):
                inner_key = _random.TRACING_KEY if key is not None else None
                grads, loss, aux, new_buffers = compiled(state.params, batch, state.buffers, inner_key, loss_scale,
                                                         torch.tensor(float(n), device=dev))
            if new_buffers is not None:
                _, new_buffers = reduce_extras(n, count(n, dev), loss, new_buffers)
        else:
            grads, loss, aux, new_buffers = eager_grads(state, batch, key, loss_scale, n)
        params, opt_state, new_buffers, loss_scale, metrics = step_update(
            optimizer, grads, loss, aux, state.params, state.opt_state, buffers=state.buffers, new_buffers=new_buffers,
            loss_scale=loss_scale, check_finite=checks, donate=donate)
        return TrainState(params, opt_state, state.step + 1, new_buffers, next_key,
                          loss_scale if scaled else state.loss_scale), metrics

    step.jit, step.donate, step.precision, step.distributed = jit, donate, precision, True  # type: ignore[attr-defined]
    return step
