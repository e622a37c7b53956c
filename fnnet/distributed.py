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
import functools
import os
import socket
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist

from . import comm as _comm
from . import shard as _shard
from . import random as _random
from . import tree as _tree
from .batch import batch_size_of
from .loss import GradResult
from .precision import Precision
from .state import Accumulation, TrainState
from .step import add_to_window, build_train_step, compile_step, step_parts, traced_grad_fn

__all__ = ["init", "shutdown", "is_initialized", "rank", "world_size", "local_rank", "is_main", "barrier", "device",
           "shard", "broadcast", "broadcast_state", "all_reduce_sum", "all_reduce_max", "rank_zero_only", "make_train_step",
           "DEFAULT_TIMEOUT", "BUCKET_MB"]

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
    rank_, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        dist.init_process_group(backend, timeout=timeout, rank=rank_, world_size=world)
        return
    # Under torchrun, a restarted group meets in a store that may still hold the dead ranks' addresses
    # (seen here: the new ranks connected to them and hung in gloo's connectFullMesh): every attempt
    # gets keys of its own.
    from torch.distributed.rendezvous import _create_c10d_store

    store = _create_c10d_store(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), rank_, world, timeout)
    store = dist.PrefixStore(f"fnnet/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/attempt{attempt}", store)
    dist.init_process_group(backend, timeout=timeout, rank=rank_, world_size=world, store=store)


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
    """Whether this process prints and writes files: rank 0 of the process group, or the only process.

    fnnet's one policy for "which rank writes": the Trainer's progress bar and ``save``, and
    every callback that touches a file (``ModelCheckpoint``, ``CSVLogger``,
    ``TensorBoardLogger``) ask this (or use :func:`rank_zero_only`). Every rank holds the same
    state and the same epoch logs, so nothing is lost by writing once.
    """
    return rank() == 0


def rank_zero_only(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run on the writing rank only (:func:`is_main`); elsewhere the call returns ``None``
    (Lightning's ``rank_zero_only``)."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs) if is_main() else None

    return wrapped


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


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """The elementwise maximum over ranks of a tensor (a copy; the tensor itself without a group)."""
    if not is_initialized() or world_size() == 1:
        return t
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


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


def _signature(tree: Any) -> list[tuple[str, Any, Any]]:
    """``(key path, shape, dtype)`` of every leaf (plain leaves: their type), for comparing ranks."""
    return [(p, tuple(x.shape), str(x.dtype).removeprefix("torch.")) if isinstance(x, torch.Tensor)
            else (p, None, type(x).__name__) for p, x in _tree.leaves_with_path(tree)]


def _first_difference(mine: list, theirs: list) -> str | None:
    for (p, shape, dtype), (q, shape2, dtype2) in zip(mine, theirs):
        if p != q:
            return f"leaf '{q}' where rank 0 has '{p}'"
        if (shape, dtype) != (shape2, dtype2):
            what = "shape" if shape != shape2 else "dtype"
            return f"'{p}' has {what} {shape2 if what == 'shape' else dtype2}, rank 0's has {shape if what == 'shape' else dtype}"
    if len(mine) != len(theirs):
        extra = theirs[len(mine)] if len(theirs) > len(mine) else mine[len(theirs)]
        return f"{len(theirs)} leaves where rank 0 has {len(mine)} (first unmatched: '{extra[0]}')"
    return None


def broadcast_state(state: Any, src: int = 0, *, donate: bool = False) -> Any:
    """``state`` as rank ``src`` has it, on every rank, after checking that every rank's state has
    the same structure: key paths, shapes and dtypes.

    The distributed step calls this on a state's first step (``state.step == 0``, with
    ``sync_state=True``, the default), so every rank starts from rank 0's parameters,
    optimizer state, buffers and key; call it yourself to synchronise at another time (after
    loading a checkpoint on one rank, say). It costs one small gather of each rank's
    structure plus one broadcast per tensor.

    Raises:
        ValueError: on every rank, when some rank's state differs from ``src``'s, naming the
            rank and the first difference (a leaf, a shape, a dtype), instead of a collective
            that aborts the process or hangs.
    """
    if not is_initialized() or world_size() == 1:
        return state
    mine = _signature(state)
    everyone: list[Any] = [None] * world_size()
    dist.all_gather_object(everyone, mine)
    reference = everyone[src]
    for r, theirs in enumerate(everyone):
        problem = _first_difference(reference, theirs)
        if problem is not None:
            raise ValueError(f"fnnet.distributed.broadcast_state: rank {r}'s state differs from rank {src}'s: "
                             f"{problem}. Every rank must build the same model and optimizer (same shapes, dtypes "
                             "and parameter names) before training")
    return broadcast(state, src, donate=donate)


# -- the step -------------------------------------------------------------------------------------------


def _counted(n: int, dev: torch.device) -> tuple[torch.Tensor, Any]:
    """``N``, the samples of this step over all ranks: an asynchronous all-reduce, waited for only
    when the first bucket needs its weight (so it runs during the backward pass)."""
    t = torch.tensor([float(n)], dtype=torch.float64, device=dev)
    return t, dist.all_reduce(t, async_op=True)


def _reduce_extras(loss_sum: torch.Tensor, n: float, total: float, buffers: Any
                   ) -> Callable[[], tuple[torch.Tensor, Any]]:
    """Start one all-reduce for the loss (``loss_sum``: this rank's samples times their mean loss)
    and the float buffers (weights ``n / total``); returns ``wait() -> (mean loss, buffers)``.
    Integer buffers are rank 0's."""
    buf_leaves, buf_spec = _tree.flatten(buffers) if buffers is not None else ([], None)
    floats = [i for i, b in enumerate(buf_leaves) if isinstance(b, torch.Tensor) and b.is_floating_point()]
    flat = torch.cat([loss_sum.double().reshape(1)] + [buf_leaves[i].double().reshape(-1) * n for i in floats])
    work = dist.all_reduce(flat, async_op=True)
    ints = {i: b.clone() for i, b in enumerate(buf_leaves) if isinstance(b, torch.Tensor) and i not in floats}
    int_works = [dist.broadcast(t, src=0, async_op=True) for t in ints.values()]

    def wait() -> tuple[torch.Tensor, Any]:
        work.wait()
        for w in int_works:
            w.wait()
        out, offset = list(buf_leaves), 1
        for i in floats:
            k = buf_leaves[i].numel()
            out[i] = (flat[offset:offset + k] / total).view_as(buf_leaves[i]).to(buf_leaves[i].dtype)
            offset += k
        out = [ints.get(i, x) for i, x in enumerate(out)]
        new_buffers = _tree.unflatten(buf_spec, out) if buf_spec is not None else None
        return (flat[0] / total).float(), new_buffers

    return wait


def _rank_batch_size(batch: Any, me: int) -> int:
    n = batch_size_of(batch)
    if n == 0:
        raise ValueError(f"rank {me} got an empty batch; every rank needs at least one sample per step "
                         "(fnnet.ArrayLoader(..., shard=fnnet.distributed.shard()) never makes empty shards)")
    return n


def make_train_step(loss_fn: Callable, optimizer: Any, *, jit: bool = False, donate: bool = False,
                    precision: str = "32", compile_options: Mapping[str, Any] | None = None,
                    skip_nonfinite: bool = False, bucket_mb: float = BUCKET_MB,
                    reduction: _comm.Reduction | None = None, sync_state: bool = True, accumulate: int = 1,
                    shard_optimizer: bool = False) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, Any]]]:
    """The multi-process training step ``step(state, batch) -> (state, metrics)``; each rank passes its shard.

    The arguments mean what they mean in :func:`fnnet.make_train_step` (``distributed=True``
    there builds this). It is the one skeleton (:func:`fnnet.step.build_train_step`) with a
    gradient source that, on every rank:

    * computes the gradients of its own batch (dropout keys differ per rank:
      ``fold_in(step key, rank)``);
    * sums ``n_r * g_r`` over ranks and divides by ``sum_r n_r`` (``n_r``: this rank's batch
      size): the gradient of the concatenated batch for a mean-reduced loss. Eager steps
      flatten the gradients, already weighted, into buckets of about ``bucket_mb`` MB that
      are handed to ``reduction`` during the backward pass (:mod:`fnnet.comm`: the default
      :func:`fnnet.comm.all_reduce`; :func:`fnnet.comm.local` communicates nothing; any
      callable ``reduction(bucket) -> wait``, DDP's comm hook). Compiled steps all-reduce
      inside the compiled graph (a custom ``reduction`` needs ``jit=False``);
    * applies the same update (the optimizer's state is the same on every rank).

    With ``accumulate=k`` the window's first ``k - 1`` micro-batches start no collective at all
    (each rank adds ``n_r * g_r`` to its own window, DDP's ``no_sync``); the last one adds the
    window to its buckets as they fill, so an update costs one reduction of the gradients (plus
    the sample count and the loss), as without accumulation. With ``jit=True`` the window's
    first micro-batches run a compiled gradient function and its last one runs eagerly (its
    buckets fill during the eager backward pass).

    With ``shard_optimizer=True`` (ZeRO-2, :mod:`fnnet.shard`) each rank keeps the optimizer
    state of its part of the parameters only (``state.opt_state`` holds 1-D parts; a whole state
    passed in is cut on the first call; ``TrainState(params, None)`` makes the step initialise
    the part alone, never the whole), the buckets are reduce-scattered so a rank receives its
    part of the gradients only, the update runs on that part and the parameters are
    all-gathered. ``step.gather_state(state)`` (every rank) gives the state with its whole
    optimizer state, for a checkpoint that loads anywhere. Equal to the unsharded step up to
    the order of float additions.

    With ``sync_state`` (default) a state's first step (``state.step == 0``) first calls
    :func:`broadcast_state`: every rank checks that its state has rank 0's structure and takes
    rank 0's values, so every rank starts from one state.

    ``metrics["loss"]`` is the loss of the concatenated batch (a weighted mean over ranks);
    other aux values are this rank's own (the ``Trainer`` sums its metric states across ranks at
    the end of an epoch). Float buffers (BatchNorm's running statistics) are averaged over ranks
    with the same weights; other buffers are rank 0's. A rank with an empty batch is an error:
    every rank needs at least one sample per step (``ArrayLoader(shard=...)`` guarantees it).
    """
    if not is_initialized():
        raise RuntimeError("the distributed step needs a process group: call fnnet.distributed.init() first "
                           "(in a process started by torchrun)")
    if reduction is not None and not callable(reduction):
        raise TypeError(f"reduction must be a callable reduction(bucket) -> wait (fnnet.comm.all_reduce, "
                        f"fnnet.comm.local, or your own), got {type(reduction).__name__}")
    if shard_optimizer:
        _shard.check_backend()
        if jit or reduction is not None:
            raise ValueError("shard_optimizer=True runs eager steps with its own reduction (fnnet.shard: the "
                             "gradients reduced to each part's owner, the params gathered): pass jit=False and no "
                             "reduction=")
    if reduction is not None and jit:
        raise ValueError("a custom reduction runs in eager steps; jit=True all-reduces inside the compiled graph "
                         "(pass jit=False to use reduction=)")
    parts = step_parts(loss_fn, precision=precision, skip_nonfinite=skip_nonfinite, jit=jit,
                       compile_options=compile_options)
    grad_fn, declared = parts.grad_fn, parts.declared
    policy = Precision.resolve(precision)
    policy.check_backend(dist.get_backend())  # no 16-bit reduction on gloo
    reduce_dtype = policy.reduce_dtype  # None: the gradients' own dtype
    reduce_bucket = _comm.all_reduce if reduction is None else reduction
    limit = int(bucket_mb * 2**20)
    me = rank()
    order: list[int] = []  # the order gradients became ready last time: a performance cache only
    bucket_cache: dict[int, torch.Tensor] = {}  # the bucket buffers, reused from step to step
    cached: dict[str, Any] = {"signature": None}  # the params' structure and shapes the caches were made for
    phase = ["the step"]  # the collective this rank waits for now: named when the process group's timeout ends it

    def eager(params: Any, batch: Any, buffers: Any, key: Any, loss_scale: Any,
              carry: Accumulation | None = None) -> GradResult:
        """This rank's gradients flattened into buckets as the backward pass makes them, weighted by
        ``n_r / N``, each bucket handed to the reduction at once; with ``carry``, the window's sums
        are added to the buckets as they fill (``batch=None``: the window alone). Sharded: the
        buckets follow the fixed layout and the layout's reduction (reduce-scatter; all-reduce on
        gloo); this rank's part comes back."""
        n = _rank_batch_size(batch, me) if batch is not None else 0
        samples = n + (carry.samples if carry is not None else 0)
        leaves, spec = _tree.flatten(params)
        lay = layout_of(params) if shard_optimizer else None
        first = not order and lay is None
        if first:
            order.extend(reversed(range(len(leaves))))
        if lay is not None:
            buckets = _comm.GradBuckets(leaves, lay.order, lay.limit, lay.reduction(), pad_to=lay.world,
                                        cache=bucket_cache, dtype=reduce_dtype)
        else:
            buckets = _comm.GradBuckets(leaves, list(order), limit, reduce_bucket,
                                        cache=None if first else bucket_cache, dtype=reduce_dtype)
        total, counting = _counted(samples, leaves[0].device)

        def per_sample() -> Any:  # 1 / N, over the loss scale: the hooks see gradients of the scaled loss
            phase[0] = "the all-reduce of the step's sample count"
            counting.wait()
            return 1.0 / float(total[0]) if loss_scale is None else 1.0 / float(total[0]) / loss_scale.scale

        buckets.weight = lambda: n * per_sample()
        buckets.scale_back = 1.0 if loss_scale is None else loss_scale.scale
        if carry is not None:
            buckets.addend, buckets.addend_weight = _tree.leaves(carry.grads), per_sample
        aux, new_buffers, loss_sum = {}, None, carry.loss_sum if carry is not None else 0.0
        if batch is not None:
            grads, loss, aux, new_buffers = grad_fn(params, batch, buffers, key, loss_scale=loss_scale,
                                                    grad_hook=buckets.hook)
            grad_leaves, loss_sum = _tree.leaves(grads), loss_sum + loss.double() * n
            if carry is not None:
                aux = {**aux, "batch_loss": loss}  # this rank's micro-batch, for epoch means
        else:
            grad_leaves, new_buffers = [None] * len(leaves), buffers  # a flushed window: average this rank's
        if lay is not None:
            buckets.launch_rest(grad_leaves)
        else:
            reduced = buckets.finish(grad_leaves)
        if first:  # later steps bucket in the order the gradients came, rank 0's (DDP's rebuild); after every
            # bucket is launched, so a rank whose forward skipped a parameter issues its collectives in order too
            box = [buckets.ready if len(buckets.ready) == len(leaves) else list(order)]
            dist.broadcast_object_list(box, src=0)
            order[:] = box[0]
        counting.wait()
        # after every bucket: the same order of collectives on all ranks
        extras = _reduce_extras(torch.as_tensor(loss_sum, dtype=torch.float64, device=leaves[0].device), samples,
                                float(total[0]), new_buffers)
        phase[0] = f"the gradient reduction ({len(buckets.buckets)} bucket(s))"
        if lay is not None:
            grads = lay.gradient([lay.my_chunk(b, wait()) for b, wait in enumerate(buckets.pending)])  # type: ignore
        else:
            grads = _tree.unflatten(spec, reduced())
        phase[0] = "the all-reduce of the loss and buffers"
        loss, new_buffers = extras()
        phase[0] = "the sharded update (finite flag, global norms, parameter all-gather)" if lay is not None else \
            "the update"
        return GradResult(grads, loss, aux, new_buffers)

    def accumulate_rank(params: Any, batch: Any, buffers: Any, key: Any, loss_scale: Any, carry: Any,
                        donate_carry: bool) -> tuple[Accumulation, torch.Tensor, dict, Any]:
        """A micro-batch added to this rank's window: no collective at all (DDP's ``no_sync``)."""
        key = _random.fold_in(key, me) if key is not None else None
        grads, loss, aux, new_buffers = local_grad(params, batch, buffers, key, loss_scale=loss_scale, unscale=False)
        return add_to_window(carry, grads, _rank_batch_size(batch, me), loss, donate_carry), loss, aux, new_buffers

    def compiled_body(params, batch, buffers, key, loss_scale, n):
        from torch.distributed import _functional_collectives as fc

        grads, loss, aux, new_buffers = grad_fn(params, batch, buffers, key, loss_scale=loss_scale)
        leaves, spec = _tree.flatten(grads)
        rd = reduce_dtype or leaves[0].dtype
        flat = torch.cat([g.reshape(-1).to(rd) for g in leaves] + [loss.reshape(1).to(rd)]) * n
        flat = fc.all_reduce(torch.cat([flat, n.to(flat.dtype).reshape(1)]), "sum", dist.group.WORLD)
        total = flat[-1]
        flat = flat[:-1] / total
        out, offset = [], 0
        for g in leaves:
            out.append(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        return _tree.unflatten(spec, out), flat[-1].float(), aux, new_buffers

    compiled = compile_step(compiled_body, compile_options) if jit else None
    local_grad = traced_grad_fn(parts, compile_options) if jit and accumulate > 1 else grad_fn

    def traced(params: Any, batch: Any, buffers: Any, key: Any, loss_scale: Any) -> GradResult:
        n = _rank_batch_size(batch, me)
        dev = _tree.leaves(params)[0].device
        with _random.rng_scope(key if "key" in declared else None,
                               [dev] if dev.type == "cuda" and key is not None else []):
            inner_key = _random.TRACING_KEY if key is not None else None
            grads, loss, aux, new_buffers = compiled(params, batch, buffers, inner_key, loss_scale,  # type: ignore[misc]
                                                     torch.tensor(float(n), device=dev))
        if new_buffers is not None:
            total, counting = _counted(n, dev)
            counting.wait()
            _, new_buffers = _reduce_extras(loss.double() * n, n, float(total[0]), new_buffers)()
        return GradResult(grads, loss, aux, new_buffers)

    def rank_gradients(params: Any, batch: Any, buffers: Any, key: Any, loss_scale: Any,
                       carry: Accumulation | None = None, donate_carry: bool = False) -> GradResult:
        """The gradient source: this rank's gradients (plus its window's, with ``carry``), reduced
        across ranks weighted by samples."""
        key = _random.fold_in(key, me) if key is not None else None
        if carry is not None:
            return eager(params, batch, buffers, key, loss_scale, carry)
        return (traced if jit else eager)(params, batch, buffers, key, loss_scale)

    shards: dict[str, Any] = {}  # the sharded step's layout, its update, and the part state's shapes

    def layout_of(params: Any) -> Any:
        if "layout" not in shards:
            shards["layout"] = _shard.layout(params, world_size(), me, bucket_mb)
            shards["update"] = _shard.sharded_update(shards["layout"])
        return shards["layout"]

    def sharded_update(*args: Any, **kwargs: Any) -> Any:
        return shards["update"](*args, **kwargs)

    step = build_train_step(rank_gradients, optimizer, parts, donate=donate, jit=jit,
                            compile_options=compile_options, name="distributed_train_step",
                            accumulate=accumulate, accumulate_fn=accumulate_rank,
                            **({"update": sharded_update} if shard_optimizer else {}))

    def shard_state(state: TrainState) -> TrainState:
        """``state`` with its optimizer state cut to this rank's part (unless it is that already)."""
        if state.opt_state is None:  # TrainState(params, None): the part's state only, nothing whole allocated
            return state.replace(opt_state=optimizer.init(layout_of(state.params).part(state.params)))
        if state.opt_state is shards.get("last"):
            return state
        lay = layout_of(state.params)
        if "shapes" not in shards:
            shards["shapes"] = [tuple(x.shape) for x in _tree.leaves(optimizer.init(lay.part(state.params)))
                                if isinstance(x, torch.Tensor)]
        shapes = [tuple(x.shape) for x in _tree.leaves(state.opt_state) if isinstance(x, torch.Tensor)]
        if shapes == shards["shapes"]:
            return state
        return state.replace(opt_state=_shard.shard_opt_state(state.opt_state, state.params, lay))

    def gather_state(state: TrainState) -> TrainState:
        """``state`` with its whole optimizer state, gathered from every rank's part (every rank
        calls it; a checkpoint of a sharded run loads into any number of ranks, sharded or not)."""
        if not shard_optimizer:
            return state
        state = shard_state(state)
        lay = layout_of(state.params)
        return state.replace(opt_state=_shard.unshard_opt_state(state.opt_state, state.params, lay, optimizer))

    def run(state: TrainState, batch: Any, **options: Any) -> tuple[TrainState, dict[str, Any]]:
        if isinstance(state, TrainState):
            leaves, spec = _tree.flatten(state.params)
            signature = (spec, tuple((x.shape, x.dtype, x.device) for x in leaves if isinstance(x, torch.Tensor)))
            if signature != cached["signature"]:  # another model: nothing learned about the last one applies
                order.clear(), bucket_cache.clear(), shards.clear()
                cached["signature"] = signature
        if sync_state and isinstance(state, TrainState) and state.step == 0 and state.accum is None:
            phase[0] = "broadcast_state (the first step's synchronisation)"
            state = broadcast_state(state, donate=donate)
        if shard_optimizer and isinstance(state, TrainState):
            state = shard_state(state)
            state, metrics = step(state, batch, **options)
            shards["last"] = state.opt_state
            return state, metrics
        return step(state, batch, **options)

    @functools.wraps(step)
    def distributed_train_step(state: TrainState, batch: Any, **options: Any) -> tuple[TrainState, dict[str, Any]]:
        phase[0] = "the step"
        try:
            return run(state, batch, **options)
        except RuntimeError as err:
            if "timed out" not in str(err).lower() and "timeout" not in str(err).lower():
                raise
            raise RuntimeError(
                f"fnnet.distributed: rank {me} waited past the process group's timeout in {phase[0]} of step "
                f"{getattr(state, 'step', '?')}: another rank never started that collective (it took fewer steps, "
                "or failed, or is far slower). Every rank must take the same steps: shard one loader over the "
                "ranks (fnnet.ArrayLoader(..., shard=fnnet.distributed.shard())); init(timeout=...) sets the limit"
            ) from err

    distributed_train_step.gather_state = gather_state  # type: ignore[attr-defined]
    distributed_train_step.shard_state = shard_state  # type: ignore[attr-defined]

    distributed_train_step.precision, distributed_train_step.distributed = precision, True  # type: ignore[attr-defined]
    distributed_train_step.flush = step.flush  # type: ignore[attr-defined]
    distributed_train_step.reduction = reduce_bucket  # type: ignore[attr-defined]
    return distributed_train_step
