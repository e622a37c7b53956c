"""Past one machine: the same training step on ``torch.distributed``, launched with ``torchrun``.

fnnet does not bring a launcher or a communication engine of its own: it runs on
``torch.distributed`` (NCCL on GPUs, gloo on CPUs), started by ``torchrun`` or by anything
that sets its environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``: SLURM ``srun`` scripts, Kubernetes, Ray Train's ``TorchTrainer``)::

    torchrun --nproc-per-node 4 train.py          # in train.py:
    fnnet.distributed.init()                      # join the process group (NCCL or gloo)
    step = fnnet.make_train_step(loss_fn, optimizer, strategy="ddp")   # or DDP(group), ZeRO(2), HSDP(mesh)
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

The strategies (:class:`DDP`, :class:`ZeRO`, :class:`HSDP`) describe the layout; each builds a
rank step (``_RankStep``, ``_ShardedStep``: the gradient source, its caches as named fields, the
checks of a first call) around :func:`fnnet.step.build_train_step`. Every collective runs on the
strategy's process group or mesh dimension (:class:`Topology`).
"""

from __future__ import annotations

import datetime
import functools
import gc
import os
import socket
from typing import Any, Callable, Mapping, NamedTuple

import torch
import torch.distributed as dist

from . import comm as _comm
from . import shard as _shard
from . import random as _random
from . import zero3 as _zero3
from .sharded_init import init_parts as _init_parts
from . import tree as _tree
from .batch import batch_size_of
from .loss import GradResult
from .precision import Precision
from .state import Accumulation, TrainState, apply_update
from .step import (TrainStep, accumulate_tree, add_to_window, build_train_step, compile_step, step_parts,
                   traced_grad_fn)
from .strategy import StepOptions, Strategy

__all__ = ["init", "shutdown", "is_initialized", "rank", "world_size", "local_rank", "is_main", "barrier", "device",
           "shard", "broadcast", "broadcast_state", "all_reduce_sum", "all_reduce_max", "rank_zero_only", "make_train_step",
           "DDP", "ZeRO", "HSDP", "Topology", "check_same_settings", "DEFAULT_TIMEOUT", "BUCKET_MB"]

DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)
BUCKET_MB = 25.0
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# -- the process group ----------------------------------------------------------------------------


# What gloo and NCCL say when a peer's connection went away (gloo: "Connection reset by peer", "Connection
# closed by peer"; a write to it: "Broken pipe").
_PEER_GONE = ("connection reset", "connection closed", "broken pipe", "connection refused")


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
        if not torch.cuda.is_available() or not dist.is_nccl_available():
            why = "this torch has no CUDA" if not torch.cuda.is_available() else "this torch was built without NCCL"
            raise RuntimeError(f"fnnet.distributed.init: backend='nccl' needs CUDA GPUs and NCCL, but {why} "
                               f"(torch {torch.__version__}); use backend='gloo' (CPU) or init() to choose by itself")
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
    """Leave the process group (``destroy_process_group``); a no-op without one.

    Collects garbage first: a step's reference cycles (a ZeRO-3 step's gather and its hooks, an
    autograd graph kept by an exception) hold the process group's objects, and a gloo group freed
    only at interpreter exit, after ``destroy_process_group``, can abort the process
    ("terminate called without an active exception": seen in about 1 of 6 two-rank ZeRO-3 runs)."""
    if dist.is_initialized():
        gc.collect()
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


def broadcast(tree: Any, src: int = 0, *, donate: bool = False, group: Any = None) -> Any:
    """``tree`` as rank ``src`` of ``group`` (``None``: the default group) has it, on every rank of
    the group: tensors and plain leaves (keys, ints).

    Tensors are broadcast into copies, or into the tree's own tensors with ``donate=True``.
    """
    if not is_initialized() or dist.get_world_size(group) == 1:
        return tree
    src = dist.get_global_rank(group, src) if group is not None else src
    leaves, spec = _tree.flatten(tree)
    plain = [None if isinstance(x, torch.Tensor) else x for x in leaves]
    box = [plain]
    dist.broadcast_object_list(box, src=src, group=group)
    out = []
    for x, p in zip(leaves, box[0]):
        if isinstance(x, torch.Tensor):
            t = x if donate else x.clone()
            dist.broadcast(t, src=src, group=group)
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


def broadcast_state(state: Any, src: int = 0, *, donate: bool = False, group: Any = None) -> Any:
    """``state`` as rank ``src`` has it, on every rank, after checking that every rank's state has
    the same structure: key paths, shapes and dtypes.

    The distributed step calls this on a state's first step (``state.step == 0``, with
    ``sync_state=True``, the default), so every rank starts from rank 0's parameters,
    optimizer state, buffers and key; call it yourself to synchronise at another time (after
    loading a checkpoint on one rank, say). It costs one small gather of each rank's
    structure plus one broadcast per tensor.

    ``group``: the process group (``None``: the default one); ``src`` is a rank of it, and
    messages name global ranks.

    Raises:
        ValueError: on every rank, when some rank's state differs from ``src``'s, naming the
            rank and the first difference (a leaf, a shape, a dtype), instead of a collective
            that aborts the process or hangs.
    """
    if not is_initialized() or dist.get_world_size(group) == 1:
        return state
    mine = _signature(state)
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    reference = everyone[src]
    name = (lambda r: dist.get_global_rank(group, r)) if group is not None else (lambda r: r)
    for r, theirs in enumerate(everyone):
        problem = _first_difference(reference, theirs)
        if problem is not None:
            raise ValueError(f"fnnet.distributed.broadcast_state: rank {name(r)}'s state differs from rank "
                             f"{name(src)}'s: {problem}. Every rank must build the same model and optimizer (same "
                             "shapes, dtypes and parameter names) before training")
    return broadcast(state, src, donate=donate, group=group)


# -- the strategies ------------------------------------------------------------------------------------


def _global(group: Any, r: int) -> int:
    """The global rank of rank ``r`` of ``group``."""
    return dist.get_global_rank(group, r) if group is not dist.group.WORLD else r


def _sum_async(t: torch.Tensor, groups: tuple[Any, ...], op: Any = None) -> Callable[[], torch.Tensor]:
    """Start ``t``'s in-place all-reduce over ``groups[0]``; ``wait()`` finishes it and reduces over the
    other groups in turn (a mesh: its shard group, then its replicate group), returning ``t``.
    ``wait()`` reduces once: a later call returns ``t`` as it is (the step waits for its sample
    count in the first bucket's weight and again after the backward; reducing over HSDP's
    replicate group on each call multiplied ``N`` by the replicas, halving the loss and buffers)."""
    op = dist.ReduceOp.SUM if op is None else op
    work = dist.all_reduce(t, op=op, group=groups[0], async_op=True)
    done = False

    def wait() -> torch.Tensor:
        nonlocal done
        if not done:
            work.wait()
            for g in groups[1:]:
                dist.all_reduce(t, op=op, group=g)
            done = True
        return t

    return wait


class Topology(NamedTuple):
    """The process groups a rank strategy talks on (every collective of its step is on one of them).

    Attributes:
        groups: the sum over every rank of the strategy is an all-reduce over each of these in
            turn: ``(group,)`` for DDP and ZeRO, ``(shard group, replicate group)`` for HSDP.
        rank: this process's index among the strategy's ranks (dropout keys fold it in).
        world: how many ranks the strategy spans.
        shard: the group the optimizer state is cut over (ZeRO, HSDP), or ``None``.
        replicate: HSDP's group of replicas of this rank's part, or ``None``.
    """

    groups: tuple[Any, ...]
    rank: int
    world: int
    shard: Any = None
    replicate: Any = None


def _process_group(group: Any, what: str) -> Any:
    if not is_initialized():
        raise RuntimeError(f"{what} needs a process group: call fnnet.distributed.init() first (in a process started "
                           "by torchrun)")
    return dist.group.WORLD if group is None else group


class DDP(Strategy):
    """Data parallelism over the ranks of a process group (``torch.nn.parallel.DistributedDataParallel``).

    Each rank passes its own part of every batch; the step computes its gradients, sums
    ``n_r * g_r`` over the group's ranks in buckets of about ``bucket_mb`` MB started during the
    backward pass, divides by ``sum_r n_r`` (so ranks may hold different batch sizes: the result
    equals one process on the concatenated batch), and applies the same update on every rank.
    With ``jit=True`` the gradients and their all-reduce are one compiled graph (torch's
    functional collectives); with a custom ``reduction`` the gradient function is compiled and
    the buckets are reduced eagerly after it.

    Args:
        group: the ``torch.distributed`` process group (``dist.new_group(ranks)``, a mesh
            dimension's group); ``None``: the default group. Every collective of the step runs
            on it, so steps on disjoint groups train side by side in one world.
        bucket_mb: the bucket size (DDP's ``bucket_cap_mb``).
        reduction: how a bucket is reduced (:class:`fnnet.comm.Reduction`, DDP's comm hook);
            ``None``: :func:`fnnet.comm.all_reduce` on ``group``. A custom reduction talks on the
            group it chooses.
        sync_state: a state's first step (``state.step == 0``) starts from the group's rank 0's
            state (:func:`broadcast_state`), after checking every rank's has its structure.
    """

    name = "ddp"

    def __init__(self, group: Any = None, *, bucket_mb: float = BUCKET_MB, reduction: Any = None,
                 sync_state: bool = True):
        if reduction is not None and not callable(reduction):
            raise TypeError(f"reduction must be a callable reduction(bucket) -> wait (fnnet.comm.all_reduce, "
                            f"fnnet.comm.local, or your own), got {type(reduction).__name__}")
        self.group, self.bucket_mb, self.reduction, self.sync_state = group, bucket_mb, reduction, sync_state

    def __repr__(self) -> str:
        return f"{type(self).__name__}(group={'default' if self.group is None else self.group})"

    def topology(self) -> Topology:
        """The groups this strategy's collectives run on (needs a process group)."""
        g = _process_group(self.group, f"the {self.name} strategy")
        return Topology((g,), dist.get_rank(g), dist.get_world_size(g))

    def build(self, loss_fn: Callable, optimizer: Any, options: StepOptions) -> TrainStep:
        return _RankStep(self, loss_fn, optimizer, options.checked()).step


class ZeRO(DDP):
    """DDP with the optimizer state sharded over the group's ranks (ZeRO, DeepSpeed's stages 1-2;
    ``ZeroRedundancyOptimizer`` with DDP).

    Each rank keeps the optimizer state of its part of the parameters only (:mod:`fnnet.shard`:
    about ``1 / W`` of every bucket); ``state.opt_state`` holds those 1-D parts (a whole state
    passed in is cut on the first call; ``TrainState(params, None)`` makes the step initialise
    the part alone). The update runs on the part, with the whole gradient's view handed to the
    optimizer explicitly (:class:`fnnet.optim.Shards`: ``clip_by_global_norm`` sums across the
    group, a mask function sees the whole shapes), then the parameters are all-gathered.
    ``step.gather_state(state)`` (every rank) is the whole state, for a checkpoint that loads
    anywhere. With ``jit=True`` the gradient function is compiled; the bucket reductions, the
    update and the all-gather run eagerly after it.

    ``ZeRO(3)`` (``"zero3"``, ``"fsdp"``; torch's ``fully_shard``, DeepSpeed's stage 3) shards the
    parameters too: ``state.params`` holds this rank's 1-D part of each parameter (a unit's flat
    buffer cut in ``W`` chunks, :mod:`fnnet.zero3`), and each unit is all-gathered around its
    module's forward and again in the backward, its gradient reduce-scattered as soon as it is
    complete (every micro-batch under accumulation: the window then holds parts, ``1 / W``).

    Args:
        stage: 2 (default): the gradients are reduce-scattered, a rank receives its part only;
            1: they are all-reduced and each rank keeps its part (what stage 2 does on gloo
            anyway); 3: the parameters are sharded too.
        group, bucket_mb, sync_state: as :class:`DDP`.
        units: stage 3's units (:func:`fnnet.zero3.unit_names`): ``None``, every numbered child
            (each element of an ``nn.ModuleList``) plus the root; module paths; or a predicate
            on module paths.
        reduce_scatter: ``True``: reduce-scatter the gradients and all-gather the parameters
            (NCCL's path); ``False``: all-reduce and broadcast each part (gloo's, where those
            collectives are 2-3x faster); ``None``: by the group's backend.
    """

    name = "zero"

    def __init__(self, stage: int = 2, group: Any = None, units: Any = None, *, bucket_mb: float = BUCKET_MB,
                 sync_state: bool = True, reduce_scatter: bool | None = None):
        if isinstance(stage, bool) or stage not in (1, 2, 3):
            raise ValueError(f"ZeRO(stage=...) takes 1, 2 or 3, got {stage!r}")
        if stage == 1 and reduce_scatter:
            raise ValueError("ZeRO(stage=1) all-reduces the gradients; reduce_scatter=True is stage 2")
        if units is not None and stage != 3:
            raise ValueError(f"ZeRO(stage={stage}, units=...): units are stage 3's (the parameters gathered per unit)")
        super().__init__(group, bucket_mb=bucket_mb, sync_state=sync_state)
        self.stage, self.reduce_scatter = stage, (False if stage == 1 else reduce_scatter)
        self.units = units

    def __repr__(self) -> str:
        units = "" if self.units is None else f", units={self.units!r}"
        return f"ZeRO(stage={self.stage}, group={'default' if self.group is None else self.group}{units})"

    def topology(self) -> Topology:
        g = _process_group(self.group, "the ZeRO strategy")
        return Topology((g,), dist.get_rank(g), dist.get_world_size(g), shard=g)

    def build(self, loss_fn: Callable, optimizer: Any, options: StepOptions) -> TrainStep:
        self.topology()  # a clear error without a process group
        _shard.check_backend()
        if self.stage == 3:
            if options.jit:
                raise ValueError("ZeRO(stage=3) gathers the units in module forward hooks, eagerly: jit=True is not "
                                 "supported with it (use ZeRO(2) with jit=True, or jit=False)")
            return _ParamShardedStep(self, loss_fn, optimizer, options.checked()).step
        return _ShardedStep(self, loss_fn, optimizer, options.checked()).step


class HSDP(ZeRO):
    """Hybrid sharding on a 2-D device mesh: the optimizer state sharded within each shard group,
    the gradients all-reduced across the replicate groups (torch FSDP2's HSDP for the optimizer
    state, ZeRO++'s hierarchical partitioning).

    ``mesh`` is a ``torch.distributed.device_mesh.DeviceMesh`` of shape ``(R, S)`` with
    dimensions named ``("replicate", "shard")``: typically ``S`` ranks of one node share the
    optimizer state, and ``R`` nodes hold a replica each. A bucket is reduce-scattered within
    the shard group (all-reduced on gloo) and this rank's part is all-reduced across its
    replicate group, so each rank holds ``1 / S`` of the optimizer state; sample counts, the
    loss and buffers are summed over both dimensions. Equal to one process on the concatenated
    batch up to the order of float additions.

    ``HSDP(mesh, stage=3)`` (torch's ``fully_shard(module, mesh=mesh)`` with a 2-D mesh) shards the
    parameters too, as ``ZeRO(3)`` within each shard group: a rank keeps ``1 / S`` of every
    parameter, gradient and optimizer state; a unit is all-gathered within the shard group, its
    gradient reduce-scattered within it and this rank's chunk then all-reduced across the replicate
    group (one all-reduce per unit in the backward).

    Args:
        mesh: the 2-D mesh (``init_device_mesh("cpu", (R, S), mesh_dim_names=("replicate", "shard"))``).
        stage: 2 (default): the optimizer state sharded; 3: the parameters too.
        units: stage 3's units, as :class:`ZeRO`.
        bucket_mb, sync_state, reduce_scatter: as :class:`ZeRO`.
    """

    name = "hsdp"

    def __init__(self, mesh: Any, *, stage: int = 2, units: Any = None, bucket_mb: float = BUCKET_MB,
                 sync_state: bool = True, reduce_scatter: bool | None = None):
        names = getattr(mesh, "mesh_dim_names", None)
        if getattr(mesh, "ndim", None) != 2 or tuple(names or ()) != ("replicate", "shard"):
            raise ValueError(f"HSDP(mesh) takes a 2-D DeviceMesh with mesh_dim_names=('replicate', 'shard'), got "
                             f"{type(mesh).__name__} with {getattr(mesh, 'ndim', '?')} dimension(s) named {names}")
        if isinstance(stage, bool) or stage not in (2, 3):
            raise ValueError(f"HSDP(mesh, stage=...) takes 2 (the optimizer state sharded within the shard groups) "
                             f"or 3 (the parameters too), got {stage!r}")
        super().__init__(stage, None, units, bucket_mb=bucket_mb, sync_state=sync_state, reduce_scatter=reduce_scatter)
        self.mesh = mesh

    def __repr__(self) -> str:
        units = "" if self.units is None else f", units={self.units!r}"
        return f"HSDP(mesh shape {tuple(self.mesh.shape)}{', stage=3' if self.stage == 3 else ''}{units})"

    def topology(self) -> Topology:
        shard, replicate = self.mesh.get_group("shard"), self.mesh.get_group("replicate")
        s, size = dist.get_rank(shard), dist.get_world_size(shard)
        r, replicas = dist.get_rank(replicate), dist.get_world_size(replicate)
        return Topology((shard, replicate), r * size + s, replicas * size, shard=shard, replicate=replicate)


def make_train_step(loss_fn: Callable, optimizer: Any, *, jit: bool = False, donate: bool = False,
                    precision: str = "32", compile_options: Mapping[str, Any] | None = None,
                    skip_nonfinite: bool = False, bucket_mb: float = BUCKET_MB,
                    reduction: _comm.Reduction | None = None, sync_state: bool = True, accumulate: int = 1,
                    shard_optimizer: bool = False) -> TrainStep:
    """The multi-process training step on the default group: ``DDP(...).build(...)``, or with
    ``shard_optimizer=True`` ``ZeRO(2, ...).build(...)``. The arguments mean what they mean in
    :func:`fnnet.make_train_step` and :class:`DDP`; a shorthand kept for one release (pass
    ``strategy=`` to :func:`fnnet.make_train_step` instead)."""
    if shard_optimizer and reduction is not None:
        raise ValueError("shard_optimizer=True (ZeRO) reduces with its own layout (reduce-scatter within the group): "
                         "pass no reduction=")
    strategy = ZeRO(2, bucket_mb=bucket_mb, sync_state=sync_state) if shard_optimizer else \
        DDP(bucket_mb=bucket_mb, reduction=reduction, sync_state=sync_state)
    return strategy.build(loss_fn, optimizer, StepOptions(jit, donate, precision, compile_options, skip_nonfinite,
                                                          accumulate))


# -- one rank's step: the gradient source, its caches, the checks of a first call ------------------------------


def _counted(n: int, dev: torch.device, groups: tuple[Any, ...]) -> tuple[torch.Tensor, Callable[[], torch.Tensor]]:
    """``N``, the samples of this step over all ranks: an asynchronous all-reduce, waited for only
    when the first bucket needs its weight (so it runs during the backward pass)."""
    t = torch.tensor([float(n)], dtype=torch.float64, device=dev)
    return t, _sum_async(t, groups)


def _reduce_extras(loss_sum: torch.Tensor, n: float, total: float, buffers: Any, groups: tuple[Any, ...]
                   ) -> Callable[[], tuple[torch.Tensor, Any]]:
    """Start one all-reduce for the loss (``loss_sum``: this rank's samples times their mean loss)
    and the float buffers (weights ``n / total``); returns ``wait() -> (mean loss, buffers)``.
    Integer buffers are the strategy's rank 0's."""
    buf_leaves, buf_spec = _tree.flatten(buffers) if buffers is not None else ([], None)
    floats = [i for i, b in enumerate(buf_leaves) if isinstance(b, torch.Tensor) and b.is_floating_point()]
    flat = torch.cat([loss_sum.double().reshape(1)] + [buf_leaves[i].double().reshape(-1) * n for i in floats])
    summed = _sum_async(flat, groups)
    ints = {i: b.clone() for i, b in enumerate(buf_leaves) if isinstance(b, torch.Tensor) and i not in floats}
    # rank 0 of each group in turn (the first group's broadcasts start now): the strategy's rank 0's everywhere
    int_works = [dist.broadcast(t, src=_global(groups[0], 0), group=groups[0], async_op=True) for t in ints.values()]

    def wait() -> tuple[torch.Tensor, Any]:
        summed()
        for w in int_works:
            w.wait()
        for g in groups[1:]:
            for t in ints.values():
                dist.broadcast(t, src=_global(g, 0), group=g)
        out, offset = list(buf_leaves), 1
        for i in floats:
            k = buf_leaves[i].numel()
            out[i] = (flat[offset:offset + k] / total).view_as(buf_leaves[i]).to(buf_leaves[i].dtype)
            offset += k
        out = [ints.get(i, x) for i, x in enumerate(out)]
        return (flat[0] / total).float(), (_tree.unflatten(buf_spec, out) if buf_spec is not None else None)

    return wait


def _rank_batch_size(batch: Any, me: int) -> int:
    n = batch_size_of(batch)
    if n == 0:
        raise ValueError(f"rank {me} got an empty batch; every rank needs at least one sample per step "
                         "(fnnet.ArrayLoader(..., shard=fnnet.distributed.shard()) never makes empty shards)")
    return n


def check_same_settings(settings: Mapping[str, Any], groups: tuple[Any, ...], what: str) -> None:
    """A ``ValueError`` on every rank when some rank of ``groups`` built its step with other
    ``settings`` (accumulate, jit, precision...), naming the setting and the ranks, instead of a
    collective mismatch that aborts gloo or pairs different windows silently."""
    for g in groups:
        everyone: list[Any] = [None] * dist.get_world_size(g)
        dist.all_gather_object(everyone, dict(settings), group=g)
        for r, theirs in enumerate(everyone):
            for key, value in everyone[0].items():
                if theirs.get(key) != value:
                    raise ValueError(f"fnnet.distributed: the ranks built {what} with different settings: {key}="
                                     f"{value!r} on rank {_global(g, 0)}, {key}={theirs.get(key)!r} on rank "
                                     f"{_global(g, r)}. Every rank must build the same step (the same "
                                     f"{key} on every rank)")


class _RankStep:
    """One rank's training step under :class:`DDP`: the gradient source of the one skeleton, with
    what it keeps between steps as named fields (a performance cache only: results never depend on it)."""

    def __init__(self, strategy: DDP, loss_fn: Callable, optimizer: Any, o: StepOptions):
        self.strategy, self.optimizer, self.o = strategy, optimizer, o
        self.topo = strategy.topology()
        self.parts = step_parts(loss_fn, precision=o.precision, skip_nonfinite=o.skip_nonfinite, jit=o.jit,
                                compile_options=o.compile_options)
        policy = Precision.resolve(o.precision)
        policy.check_backend(dist.get_backend(self.topo.groups[0]))  # no 16-bit reduction on gloo
        self.reduce_dtype = policy.reduce_dtype  # the gradients' reduction dtype (None: their own)
        self.limit = int(strategy.bucket_mb * 2**20)
        self.reduce_bucket = strategy.reduction or functools.partial(_comm.all_reduce, group=self.topo.groups[0])
        self.in_graph = o.jit and strategy.reduction is None and not isinstance(strategy, ZeRO)
        self.compiled = compile_step(self._compiled_body, o.compile_options) if self.in_graph else None
        self.local_grad = traced_grad_fn(self.parts, o.compile_options) if o.jit else self.parts.grad_fn
        self.order: list[int] = []  # the order gradients became ready last time
        self.bucket_cache: dict[int, torch.Tensor] = {}  # the bucket buffers, reused from step to step
        self.signature: Any = None  # the params' structure and shapes the caches were made for
        self.phase = "the step"  # the collective this rank waits for now: named when the group's timeout ends it
        self.checked = False  # the ranks' settings compared (the first call)
        self.inner = build_train_step(self.gradients, optimizer, self.parts, donate=o.donate, jit=o.jit,
                                      compile_options=o.compile_options, name="distributed_train_step",
                                      accumulate=o.accumulate, accumulate_fn=self.accumulate, update=self.update,
                                      strategy=strategy, precision=o.precision)
        self.step = TrainStep(self.call, self.inner.flush, strategy=strategy, name="distributed_train_step",
                              precision=o.precision, jit=o.jit, donate=o.donate, accumulate=o.accumulate,
                              gather_state=self.gather_state, shard_state=self.shard_state,
                              local_parts=self.local_parts)

    # -- the gradient source
    def gradients(self, params: Any, batch: Any, buffers: Any, key: Any, loss_scale: Any,
                  carry: Accumulation | None = None, donate_carry: bool = False) -> GradResult:
        """This rank's gradients (plus its window's, with ``carry``), reduced across the strategy's
        ranks weighted by samples; dropout keys differ per rank (``fold_in(key, rank)``)."""
        key = _random.fold_in(key, self.topo.rank) if key is not None else None
        if carry is None and self.in_graph:
            return self.traced(params, batch, buffers, key, loss_scale)
        return self.eager(params, batch, buffers, key, loss_scale, carry)

    def accumulate(self, params: Any, batch: Any, buffers: Any, key: Any, loss_scale: Any, carry: Any,
                   donate_carry: bool) -> tuple[Accumulation, torch.Tensor, dict, Any]:
        """A micro-batch added to this rank's window: no collective at all (DDP's ``no_sync``)."""
        key = _random.fold_in(key, self.topo.rank) if key is not None else None
        grads, loss, aux, new_buffers = self.local_grad(params, batch, buffers, key, loss_scale=loss_scale,
                                                        unscale=False)
        n = _rank_batch_size(batch, self.topo.rank)
        return add_to_window(carry, grads, n, loss, donate_carry), loss, aux, new_buffers

    def update(self, *args: Any, **kwargs: Any) -> tuple[Any, Any, Any, Any, Any]:
        """The update: the same on every rank (the state is replicated)."""
        return apply_update(*args, **kwargs)

    def buckets(self, leaves: list[torch.Tensor]) -> tuple[_comm.GradBuckets, bool]:
        """The step's buckets, and whether this is the first step (buckets in reverse order; the order
        the gradients came is then shared from rank 0, DDP's rebuild)."""
        first = not self.order
        if first:
            self.order.extend(reversed(range(len(leaves))))
        return _comm.GradBuckets(leaves, list(self.order), self.limit, self.reduce_bucket,
                                 cache=None if first else self.bucket_cache, dtype=self.reduce_dtype), first

    def launch(self, buckets: _comm.GradBuckets, grad_leaves: list[Any]) -> Any:
        """Start the buckets the hooks did not; returns what :meth:`collect` waits for."""
        return buckets.finish(grad_leaves)

    def collect(self, pending: Any, spec: Any, buckets: _comm.GradBuckets) -> Any:
        """The reduced gradients, with the params' structure."""
        return _tree.unflatten(spec, pending())

    def eager(self, params: Any, batch: Any, buffers: Any, key: Any, loss_scale: Any,
              carry: Accumulation | None = None) -> GradResult:
        """This rank's gradients flattened into buckets as the backward pass makes them, weighted by
        ``n_r / N``, each bucket handed to the reduction at once; with ``carry``, the window's sums
        are added to the buckets as they fill (``batch=None``: the window alone)."""
        n = _rank_batch_size(batch, self.topo.rank) if batch is not None else 0
        samples = n + (carry.samples if carry is not None else 0)
        leaves, spec = _tree.flatten(params)
        buckets, first = self.buckets(leaves)
        total, counting = _counted(samples, leaves[0].device, self.topo.groups)

        def per_sample() -> Any:  # 1 / N, over the loss scale: the hooks see gradients of the scaled loss
            self.phase = "the all-reduce of the step's sample count"
            counting()
            return 1.0 / float(total[0]) if loss_scale is None else 1.0 / float(total[0]) / loss_scale.scale

        buckets.weight = lambda: n * per_sample()
        buckets.scale_back = 1.0 if loss_scale is None else loss_scale.scale
        if carry is not None:
            buckets.addend, buckets.addend_weight = _tree.leaves(carry.grads), per_sample
        aux, new_buffers, loss_sum = {}, buffers, carry.loss_sum if carry is not None else 0.0
        grad_leaves: list[Any] = [None] * len(leaves)  # a flushed window: no batch, this rank's buffers
        if batch is not None:
            if self.o.jit:  # compiled: the buckets start after the gradient function
                grads, loss, aux, new_buffers = self.local_grad(params, batch, buffers, key, loss_scale=loss_scale)
            else:
                grads, loss, aux, new_buffers = self.parts.grad_fn(params, batch, buffers, key, loss_scale=loss_scale,
                                                                   grad_hook=buckets.hook)
            grad_leaves, loss_sum = _tree.leaves(grads), loss_sum + loss.double() * n
            if carry is not None:
                aux = {**aux, "batch_loss": loss}  # this rank's micro-batch, for epoch means
        pending = self.launch(buckets, grad_leaves)
        if first:  # after every bucket is launched, so a rank that skipped a parameter issues its collectives in order
            self.share_order(buckets, len(leaves))
        counting()
        extras = _reduce_extras(torch.as_tensor(loss_sum, dtype=torch.float64, device=leaves[0].device), samples,
                                float(total[0]), new_buffers, self.topo.groups)
        self.phase = f"the gradient reduction ({len(buckets.buckets)} bucket(s))"
        grads = self.collect(pending, spec, buckets)
        self.phase = "the all-reduce of the loss and buffers"
        loss, new_buffers = extras()
        self.phase = "the update"
        return GradResult(grads, loss, aux, new_buffers)

    def share_order(self, buckets: _comm.GradBuckets, count: int) -> None:
        """Later steps bucket in the order the gradients came on the group's rank 0."""
        g = self.topo.groups[0]
        box = [buckets.ready if len(buckets.ready) == count else list(self.order)]
        dist.broadcast_object_list(box, src=_global(g, 0), group=g)
        self.order[:] = box[0]

    def _compiled_body(self, params, batch, buffers, key, loss_scale, n):
        from torch.distributed import _functional_collectives as fc

        grads, loss, aux, new_buffers = self.parts.grad_fn(params, batch, buffers, key, loss_scale=loss_scale)
        leaves, spec = _tree.flatten(grads)
        rd = self.reduce_dtype or leaves[0].dtype
        flat = torch.cat([g.reshape(-1).to(rd) for g in leaves] + [loss.reshape(1).to(rd)]) * n
        flat = fc.all_reduce(torch.cat([flat, n.to(flat.dtype).reshape(1)]), "sum", self.topo.groups[0])
        total = flat[-1]
        flat = flat[:-1] / total
        out, offset = [], 0
        for g in leaves:
            out.append(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        return _tree.unflatten(spec, out), flat[-1].float(), aux, new_buffers

    def traced(self, params: Any, batch: Any, buffers: Any, key: Any, loss_scale: Any) -> GradResult:
        """The compiled step's gradients: gradient function and all-reduce in one graph."""
        n = _rank_batch_size(batch, self.topo.rank)
        dev = _tree.leaves(params)[0].device
        with _random.rng_scope(key if "key" in self.parts.declared else None,
                               [dev] if dev.type == "cuda" and key is not None else []):
            inner_key = _random.TRACING_KEY if key is not None else None
            assert self.compiled is not None
            grads, loss, aux, new_buffers = self.compiled(params, batch, buffers, inner_key, loss_scale,
                                                          torch.tensor(float(n), device=dev))
        if new_buffers is not None:
            total, counting = _counted(n, dev, self.topo.groups)
            counting()
            _, new_buffers = _reduce_extras(loss.double() * n, n, float(total[0]), new_buffers, self.topo.groups)()
        return GradResult(grads, loss, aux, new_buffers)

    # -- the state's layout (replicated: nothing to cut or gather)
    def shard_state(self, state: TrainState) -> TrainState:
        return state

    def gather_state(self, state: TrainState) -> TrainState:
        return state

    def local_parts(self, state: TrainState) -> tuple[TrainState, dict[str, Any]]:
        return state, {}

    def settings(self) -> dict[str, Any]:
        """What every rank's step must agree on (compared across ranks on the first call)."""
        return {"strategy": type(self.strategy).__name__, "accumulate": self.o.accumulate, "jit": self.o.jit,
                "precision": str(self.o.precision), "bucket_mb": self.strategy.bucket_mb,
                "skip_nonfinite": self.o.skip_nonfinite}

    def prepare(self, state: TrainState) -> TrainState:
        """Before a step: caches reset for another model, the ranks' settings compared (first call), the
        state broadcast from rank 0 (a state's first step, with ``sync_state``)."""
        leaves, spec = _tree.flatten(state.params)
        signature = (spec, tuple((x.shape, x.dtype, x.device) for x in leaves if isinstance(x, torch.Tensor)))
        if signature != self.signature:  # another model: nothing learned about the last one applies
            self.reset()
            self.signature = signature
        if not self.checked:
            self.phase = "the first call's comparison of the ranks' settings"
            check_same_settings(self.settings(), self.topo.groups, "their training steps")
            self.checked = True
        if self.strategy.sync_state and state.step == 0 and state.accum is None:
            self.phase = "broadcast_state (the first step's synchronisation)"
            for g in self.topo.groups:
                state = broadcast_state(state, donate=self.o.donate, group=g)
        return state

    def reset(self) -> None:
        self.order.clear()
        self.bucket_cache.clear()

    def call(self, state: TrainState, batch: Any, *, end_window: bool = False) -> tuple[TrainState, dict[str, Any]]:
        """The step: :meth:`prepare`, the skeleton, and a timeout named by the collective it ended."""
        self.phase = "the step"
        try:
            if isinstance(state, TrainState):
                state = self.shard_state(self.prepare(state))
            return self.inner(state, batch, end_window=end_window)
        except RuntimeError as err:
            text = str(err).lower()
            where = f"rank {self.topo.rank} of {self.topo.world}, in {self.phase} of step {getattr(state, 'step', '?')}"
            if "timed out" in text or "timeout" in text:
                raise RuntimeError(
                    f"fnnet.distributed: {where}, waited past the process group's timeout: another rank never started "
                    "that collective (it took fewer steps, or failed, or is far slower). Every rank must take the same "
                    "steps: shard one loader over the ranks (fnnet.ArrayLoader(..., shard=fnnet.distributed.shard())); "
                    "init(timeout=...) sets the limit") from err
            if any(s in text for s in _PEER_GONE):
                raise RuntimeError(
                    f"fnnet.distributed: {where}, lost its connection to a peer rank: that rank exited or crashed "
                    "(its own error, printed above or in its log, says why). This rank cannot continue the step; "
                    "under torchrun --max-restarts N the group restarts and fit(resume='auto') continues from the "
                    "last checkpoint") from err
            raise


class _ShardedStep(_RankStep):
    """One rank's training step under :class:`ZeRO` or :class:`HSDP`: buckets in the fixed layout of
    :mod:`fnnet.shard`, the update on this rank's part, the parameters all-gathered."""

    strategy: ZeRO

    def __init__(self, strategy: ZeRO, loss_fn: Callable, optimizer: Any, o: StepOptions):
        self.layout: _shard.Layout | None = None  # who owns which elements (fixed by the params' structure)
        self.updater: Callable[..., Any] | None = None  # the layout's sharded update
        self.part_shapes: list[tuple[int, ...]] | None = None  # the shapes of a part state's tensors
        self.last_opt_state: Any = None  # the part state the last step returned (already cut)
        super().__init__(strategy, loss_fn, optimizer, o)

    def reset(self) -> None:
        super().reset()
        self.layout = self.updater = self.part_shapes = self.last_opt_state = None

    def layout_of(self, params: Any) -> _shard.Layout:
        if self.layout is None:
            t = self.topo
            self.layout = _shard.layout(params, dist.get_world_size(t.shard), dist.get_rank(t.shard),
                                        self.strategy.bucket_mb, group=t.shard, replicate=t.replicate,
                                        reduce_scatter=self.strategy.reduce_scatter)
            self.updater = _shard.sharded_update(self.layout)
        return self.layout

    def update(self, *args: Any, **kwargs: Any) -> tuple[Any, Any, Any, Any, Any]:
        assert self.updater is not None
        return self.updater(*args, **kwargs)

    def buckets(self, leaves: list[torch.Tensor]) -> tuple[_comm.GradBuckets, bool]:
        lay = self.layout
        assert lay is not None  # made by shard_state, before the first step
        return _comm.GradBuckets(leaves, lay.order, lay.limit, lay.reduction(), pad_to=lay.world,
                                 cache=self.bucket_cache, dtype=self.reduce_dtype), False

    def launch(self, buckets: _comm.GradBuckets, grad_leaves: list[Any]) -> Any:
        buckets.launch_rest(grad_leaves)
        return buckets.pending

    def collect(self, pending: Any, spec: Any, buckets: _comm.GradBuckets) -> Any:
        lay = self.layout
        assert lay is not None
        self.phase = "the sharded update (finite flag, global norms, parameter all-gather)"
        return lay.gradient([lay.my_chunk(b, wait()) for b, wait in enumerate(pending)])

    def shard_state(self, state: TrainState) -> TrainState:
        """``state`` with its optimizer state cut to this rank's part (unless it is that already)."""
        lay = self.layout_of(state.params)
        if state.opt_state is None:  # TrainState(params, None): the part's state only, nothing whole allocated
            _shard.check_part_init(self.optimizer, state.params, lay)
            return state.replace(opt_state=self.optimizer.init(lay.part(state.params)))
        if state.opt_state is self.last_opt_state:
            return state
        if self.part_shapes is None:
            self.part_shapes = _shard.part_state_shapes(self.optimizer, state.params, lay)
        shapes = [tuple(x.shape) for x in _tree.leaves(state.opt_state) if isinstance(x, torch.Tensor)]
        if shapes == self.part_shapes:
            return state
        return state.replace(opt_state=_shard.shard_opt_state(state.opt_state, state.params, lay))

    def gather_state(self, state: TrainState) -> TrainState:
        """``state`` with its whole optimizer state, gathered from every rank's part (every rank calls
        it; a checkpoint of a sharded run loads into any number of ranks, sharded or not)."""
        state = self.shard_state(state)
        lay = self.layout_of(state.params)
        return state.replace(opt_state=_shard.unshard_opt_state(state.opt_state, state.params, lay, self.optimizer))

    def local_parts(self, state: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """``state`` with this rank's part of the optimizer state, and each part leaf's range of the whole."""
        state = self.shard_state(state)
        ranges = _shard.part_ranges(state.opt_state, state.params, self.layout_of(state.params))
        return state, {"opt_state." + p: r for p, r in ranges.items()}

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "stage": self.strategy.stage, "reduce_scatter": self.strategy.reduce_scatter}

    def call(self, state: TrainState, batch: Any, *, end_window: bool = False) -> tuple[TrainState, dict[str, Any]]:
        state, metrics = super().call(state, batch, end_window=end_window)
        self.last_opt_state = state.opt_state
        return state, metrics


class _ParamShardedStep(_RankStep):
    """One rank's training step under ``ZeRO(3)`` or ``HSDP(mesh, stage=3)``: the state's parameters are
    this rank's parts of the units (:mod:`fnnet.zero3`); the loss runs on placeholders filled unit by
    unit, the gradients come reduce-scattered out of the backward (HSDP: then all-reduced across the
    replicas), the update runs on the parts and nothing is gathered after it."""

    strategy: ZeRO

    def __init__(self, strategy: ZeRO, loss_fn: Callable, optimizer: Any, o: StepOptions):
        self.layout: _shard.Layout | None = None
        self.updater: Callable[..., Any] | None = None
        topo = strategy.topology()  # HSDP: units sharded over the mesh's shard group, replicated across the other
        self.gather = _zero3.UnitGather(topo.shard, replicate=topo.replicate)
        super().__init__(strategy, _zero3.sharded_loss(loss_fn, self.gather), optimizer, o)
        self.gather.reduce_dtype = self.reduce_dtype  # the gradients' reduce-scatter dtype (None: their own)
        self.step.on_parts = self.on_parts  # type: ignore[attr-defined]
        self.step.init_parts = self.init_parts  # type: ignore[attr-defined]

    def reset(self) -> None:
        super().reset()
        self.layout = self.updater = None

    def on_parts(self, fn: Callable) -> Callable:
        """``fn`` (a loss or predict function of whole params, running the model) made to take this
        rank's parts: the units are gathered around their modules' forward, one at a time (every rank
        calls it alike). What eval and predict run on the sharded state:
        ``fnnet.make_eval_step(step.on_parts(loss_fn))(state, batch)``."""
        gather = _zero3.UnitGather(self.gather.group, replicate=self.gather.replicate)
        wrapped = _zero3.sharded_loss(fn, gather)

        @functools.wraps(fn)
        def on_parts(params: Any, *args: Any, **kwargs: Any) -> Any:
            if self.is_whole(params):  # a whole state (before the first step, or gathered): nothing to gather
                return fn(params, *args, **kwargs)
            gather.set_layout(self.layout, self.gather.names)
            try:
                return wrapped(params, *args, **kwargs)
            finally:
                gather.release()

        return on_parts

    def init_parts(self, module: Any, key: Any, *, device: Any = None) -> dict[str, Any]:
        """This rank's part of every parameter of ``module`` (built on the ``meta`` device: nothing whole is
        allocated), initialised as ``fnnet.functional(module).init(key)`` initialises the whole model, one
        module at a time (:func:`fnnet.sharded_init.init_parts`). Not collective. Start training from
        ``fnnet.TrainState(params=step.init_parts(net, key), opt_state=None)``: the step initialises the
        optimizer state on the parts."""
        whole = {k: v.detach() for k, v in module.named_parameters()} if isinstance(module, torch.nn.Module) else module
        lay = self.layout_of(whole)
        if [tuple(v.shape) for v in _tree.leaves(whole)] != lay.shapes:
            raise ValueError(f"step.init_parts: {type(module).__name__}'s parameters have other shapes than the "
                             "model this step has trained (its layout is fixed by the first state it saw)")
        return _init_parts(module, key, lay, device=device)

    def layout_of(self, params: Any) -> _shard.Layout:
        """The units' layout, made from the whole params the first time (cached)."""
        if self.layout is None:
            names, buckets = _zero3.unit_buckets(params, self.strategy.units)
            g = self.topo.shard
            self.layout = _shard.layout(params, dist.get_world_size(g), dist.get_rank(g), 0.0, group=g,
                                        reduce_scatter=True, buckets=buckets)
            self.gather.set_layout(self.layout, names)
            self.updater = _zero3.sharded_params_update(self.layout)
        return self.layout

    def is_whole(self, params: Any) -> bool:
        leaves = [x for x in _tree.leaves(params) if isinstance(x, torch.Tensor)]
        if self.layout is not None and [tuple(x.shape) for x in leaves] == self.layout.shapes:
            return True
        return self.layout is None

    def check_not_parts(self, params: Any) -> None:
        """A ``ValueError`` (on every rank alike) when a step with no layout yet is given 1-D leaves whose
        shapes differ across the shard group: some rank's parts (of another step, or a checkpoint's), not
        whole parameters, which every rank holds alike. Collective only then (every leaf 1-D)."""
        shapes = [tuple(x.shape) for x in _tree.leaves(params) if isinstance(x, torch.Tensor)]
        if not shapes or any(len(s) != 1 for s in shapes):
            return
        seen: list[Any] = [None] * dist.get_world_size(self.topo.shard)
        dist.all_gather_object(seen, shapes, group=self.topo.shard)
        if any(s != shapes for s in seen):
            paths = [p for p, x in _tree.leaves_with_path(params) if isinstance(x, torch.Tensor)]
            i = next(j for j in range(len(shapes)) if any(s[j] != shapes[j] for s in seen))
            raise ValueError(
                f"ZeRO-3 step: the state holds 1-D parts (e.g. {paths[i]!r}: {[s[i][0] for s in seen]} elements on "
                "ranks 0..) but this step has no layout yet (it is made from whole parameters, on its first call "
                "or by step.init_parts): give this step the whole state (TrainState.create(params, optimizer), a "
                "gathered checkpoint) or TrainState(step.init_parts(module, key), None) made by this same step")

    def update(self, *args: Any, **kwargs: Any) -> tuple[Any, Any, Any, Any, Any]:
        assert self.updater is not None
        return self.updater(*args, **kwargs)

    def shard_state(self, state: TrainState) -> TrainState:
        """``state`` with whole parameters (and optimizer state) cut to this rank's parts; a state already
        in parts is returned as it is."""
        if not self.is_whole(state.params):
            if state.opt_state is None:  # TrainState(parts, None) (init_parts): the optimizer state of the parts
                assert self.layout is not None
                _shard.check_part_init(self.optimizer, self.layout.whole, self.layout)
                return state.replace(opt_state=self.optimizer.init(state.params))
            return state
        lay = self.layout_of(state.params)
        part = _tree.map(lambda x: x.clone(), lay.part(state.params))  # the whole may be dropped now
        if state.opt_state is None:
            _shard.check_part_init(self.optimizer, part, lay)
            return state.replace(params=part, opt_state=self.optimizer.init(part))
        return state.replace(params=part, opt_state=_shard.shard_opt_state(state.opt_state, state.params, lay))

    def gather_state(self, state: TrainState) -> TrainState:
        """``state`` whole (parameters and optimizer state gathered from every rank's parts; every rank
        calls it): what a checkpoint holds, loadable by any strategy and world size."""
        state = self.shard_state(state)
        lay = self.layout
        assert lay is not None
        whole = _tree.map(lambda x: x.clone(), lay.gather(state.params))
        return state.replace(params=whole,
                             opt_state=_shard.unshard_opt_state(state.opt_state, lay.whole, lay, self.optimizer))

    def local_parts(self, state: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """``state`` in this rank's parts (a whole state is cut first), and each part leaf's range of the
        whole leaf: every parameter (this rank's elements of its unit's chunk) and every optimizer-state
        leaf that mirrors one. Not collective. A sharded checkpoint writes these ranges per rank."""
        state = self.shard_state(state)
        lay = self.layout
        assert lay is not None  # made by shard_state from the whole params (a state in parts has one already)
        ranges = {"params." + path: (p.lo, p.hi, lay.shapes[i]) if p.hi > p.lo else (0, 0, lay.shapes[i])
                  for i, ((path, _), p) in enumerate(zip(_tree.leaves_with_path(lay.whole), lay.parts))}
        ranges.update({"opt_state." + p: r for p, r in _shard.part_ranges(state.opt_state, lay.whole, lay).items()})
        return state, ranges

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "stage": 3, "units": repr(self.strategy.units)}

    def prepare(self, state: TrainState) -> TrainState:
        if not self.checked:
            self.phase = "the first call's comparison of the ranks' settings"
            check_same_settings(self.settings(), self.topo.groups, "their training steps")
            self.checked = True
        if self.layout is None:
            self.check_not_parts(state.params)
        if self.strategy.sync_state and state.step == 0 and state.accum is None and self.is_whole(state.params):
            self.phase = "broadcast_state (the first step's synchronisation)"
            for g in self.topo.groups:
                state = broadcast_state(state, donate=self.o.donate, group=g)
        return state

    def local(self, params: Any, batch: Any, buffers: Any, key: Any, loss_scale: Any) -> tuple[Any, ...]:
        """This micro-batch's gradients of the scaled loss, weighted by its ``n_r`` and reduce-scattered:
        this rank's part of ``sum_r n_r g_r``."""
        n = _rank_batch_size(batch, self.topo.rank)
        self.gather.weight = float(n)
        try:
            self.phase = "the forward and backward (unit all-gathers, gradient reduce-scatters)"
            grads, loss, aux, new_buffers = self.parts.grad_fn(params, batch, buffers, key, loss_scale=loss_scale,
                                                               unscale=False)
        finally:
            self.gather.release()
        return grads, loss, aux, new_buffers, n

    def accumulate(self, params: Any, batch: Any, buffers: Any, key: Any, loss_scale: Any, carry: Any,
                   donate_carry: bool) -> tuple[Accumulation, torch.Tensor, dict, Any]:
        """A micro-batch added to the window: its reduce-scattered part added to the window's parts."""
        key = _random.fold_in(key, self.topo.rank) if key is not None else None
        grads, loss, aux, new_buffers, n = self.local(params, batch, buffers, key, loss_scale)
        before = carry if carry is not None else Accumulation(None, 0, 0.0, 0)
        window = Accumulation(accumulate_tree(before.grads, grads, 1, donate_carry), before.samples + n,
                              before.loss_sum + loss.double() * n, before.micro + 1, before.buffers)
        return window, loss, aux, new_buffers

    def gradients(self, params: Any, batch: Any, buffers: Any, key: Any, loss_scale: Any,
                  carry: Accumulation | None = None, donate_carry: bool = False) -> GradResult:
        """The mean gradient's part over every rank's batch (and window): ``sum_r n_r g_r / N``."""
        key = _random.fold_in(key, self.topo.rank) if key is not None else None
        dev = _tree.leaves(params)[0].device
        aux, new_buffers, samples = {}, buffers, 0
        grads, loss_sum = (carry.grads, carry.loss_sum) if carry is not None else (None, 0.0)
        if carry is not None:
            samples = carry.samples
        if batch is not None:
            local, loss, aux, new_buffers, n = self.local(params, batch, buffers, key, loss_scale)
            grads = local if grads is None else accumulate_tree(grads, local, 1, False)
            samples, loss_sum = samples + n, loss_sum + loss.double() * n
            if carry is not None:
                aux = {**aux, "batch_loss": loss}
        self.phase = "the all-reduce of the step's sample count"
        total, counting = _counted(samples, dev, self.topo.groups)
        counting()
        divisor = float(total[0]) * (1.0 if loss_scale is None else loss_scale.scale)
        grads = _tree.map(lambda g: g / divisor, grads)
        self.phase = "the all-reduce of the loss and buffers"
        loss, new_buffers = _reduce_extras(torch.as_tensor(loss_sum, dtype=torch.float64, device=dev), samples,
                                           float(total[0]), new_buffers, self.topo.groups)()
        self.phase = "the update"
        return GradResult(grads, loss, aux, new_buffers)
