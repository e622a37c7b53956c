"""What the Trainer decides once, before its loop: the optimizer it trains with, where it trains, its
three steps, and its first state. Each is a plain function of the Trainer's arguments.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Mapping, NamedTuple

import torch
from torch import nn

from . import distributed as _dist
from . import tree as _tree
from ._functional import Model
from .batch import split_batch
from .device import parse_devices, place
from .layout import choose_memory_format
from .state import DynamicScale, TrainState
from .parallel import Replicate
from .precision import Precision
from .strategy import Strategy
from .train import make_eval_step, make_predict_step, make_train_step, resolve_strategy, supervised_loss

__all__ = ["resolve_optimizer", "resolve_devices", "Steps", "build_steps", "initial_state", "sync_module",
           "on_meta_device", "parts_state", "INIT_SALT"]

INIT_SALT = 0x1217
"""A ZeRO-3 Trainer given a module on the ``meta`` device draws its parameters under
``fnnet.random.fold_in(trainer_key, INIT_SALT)``."""


def resolve_optimizer(optimizer: Any, model: Model, module: nn.Module | None) -> Any:
    """An fnnet transform from what the user passed (a torch.optim optimizer is converted with the
    module's parameter names), with frozen parameters masked out."""
    if isinstance(optimizer, torch.optim.Optimizer):  # the chapter's torch.optim.Adam(net.parameters(), lr=0.02)
        from .optim import from_torch

        optimizer = from_torch(optimizer, module=module)
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(f"optimizer must be an fnnet.optim transform (e.g. fnnet.optim.adam(1e-3)) or a torch.optim "
                        f"optimizer, got {type(optimizer).__name__}")
    if not all(model.trainable.values()):  # frozen parameters: no update, no optimizer state
        from .optim import masked

        optimizer = masked(optimizer, model.trainable)
    return optimizer


def resolve_devices(devices: Any, distributed: bool | None, strategy: Strategy | None = None
                    ) -> tuple[bool, list[torch.device]]:
    """``(distributed, devices)``: whether this is one rank of a process group (``None``: when a group
    of several ranks exists, or the ``strategy`` is a rank strategy), and the devices to train on (the
    first holds the state; a :class:`fnnet.parallel.Replicate` strategy's)."""
    if strategy is not None:
        if distributed is not None:
            raise ValueError(f"Trainer: strategy={strategy!r} says how to train; distributed= is the old flag for the "
                             "same choice: pass one or the other")
        distributed = isinstance(strategy, _dist.DDP)
        if isinstance(strategy, Replicate):
            if devices != "auto":
                raise ValueError(f"Trainer: strategy={strategy!r} names its devices; leave devices= out")
            return False, list(strategy.devices)
    distributed = _dist.is_initialized() and _dist.world_size() > 1 if distributed is None else distributed
    if distributed and not _dist.is_initialized():
        raise RuntimeError("Trainer(distributed=True) needs a process group: call fnnet.distributed.init() first")
    if distributed and devices == "auto":
        devices = _dist.device()  # one device per process: cuda:LOCAL_RANK under NCCL, else the CPU
    parsed = parse_devices(devices)
    if distributed and len(parsed) > 1:
        raise ValueError(f"Trainer(distributed=True) trains one device per process; devices={devices!r} names "
                         f"{len(parsed)}")
    return distributed, parsed


class Steps(NamedTuple):
    train: Callable
    eval: Callable
    predict: Callable


def build_steps(model: Model, loss: Callable, optimizer: Any, devices: list[torch.device], *, distributed: bool,
                jit: bool, precision: str, donate: bool, compile_options: Mapping[str, Any] | None, accumulate: int = 1,
                shard_optimizer: bool = False, strategy: Strategy | None = None) -> Steps:
    """The Trainer's train, eval and predict steps: ``supervised_loss(model, loss)`` through
    :func:`fnnet.make_train_step` and friends (``strategy``, or: data parallel over several devices,
    one rank of a process group with ``distributed``), non-finite updates skipped."""
    loss_fn = supervised_loss(model, loss)
    options = dict(jit=jit, precision=precision, compile_options=compile_options,
                   devices=devices if len(devices) > 1 else None)
    if shard_optimizer and (not distributed or strategy is not None):
        raise ValueError("shard_optimizer=True splits the optimizer state over the ranks of a torch.distributed run "
                         "(the old flag for strategy='zero2'): start the script with torchrun (and "
                         "fnnet.distributed.init()), or drop shard_optimizer; with strategy=, pass ZeRO() instead")
    if strategy is None:
        strategy = resolve_strategy(distributed=distributed, devices=options["devices"],
                                    **({"shard_optimizer": True} if shard_optimizer else {}))
    train = make_train_step(loss_fn, optimizer, donate=donate, skip_nonfinite=True, accumulate=accumulate,
                            strategy=strategy, jit=jit, precision=precision, compile_options=compile_options)
    predict_fn = lambda p, batch, buffers=None: model.apply(p, split_batch(batch)[0], buffers=buffers)  # noqa: E731
    on_parts = getattr(train, "on_parts", None)  # ZeRO-3: eval and predict gather the units on the fly
    if on_parts is not None:
        loss_fn, predict_fn = on_parts(loss_fn), on_parts(predict_fn)
    evaluate = make_eval_step(loss_fn, **options)  # per rank: the metric states are summed at the end
    predict = make_predict_step(predict_fn, **options)
    return Steps(train, evaluate, predict)


def initial_state(model: Model, module: nn.Module | None, params: Any, optimizer: Any, key: Any, *,
                  precision: str, device: torch.device, memory_format: Any) -> tuple[TrainState, Any]:
    """``(state, memory format)``: the first state, on ``device`` in the chosen layout.

    A module's own tensors are the params (trained in place, Lightning's way) unless ``params``
    is given; an ``fnnet.Model``'s or the given params are copied, so the caller's stay
    untouched. float16 keeps its loss scale in the state from the start, so checkpoints always
    hold it.
    """
    start = model.params if params is None else params
    model.check_params(start)
    fmt = choose_memory_format(memory_format, start, device)
    own = module is not None and params is None
    if not own:
        start = _tree.map(lambda t: t.detach().clone(memory_format=torch.preserve_format),
                          place(start, device, memory_format=fmt))
    buffers = model.buffers or None
    if buffers is not None and module is None:
        buffers = _tree.map(torch.clone, place(buffers, device, memory_format=fmt))
    loss_scale = DynamicScale.create(device) if Precision.resolve(precision).loss_scaled else None
    state = TrainState.create(start, optimizer, buffers=buffers, key=key, loss_scale=loss_scale)
    if own and fmt is not None:  # the module's own tensors, laid out
        state = place(state, device, memory_format=fmt)
    return state, fmt


def on_meta_device(model: Any, sharded: bool = True, strategy: Any = None) -> bool:
    """Whether any of ``model``'s parameters is on the ``meta`` device (shapes only, no values), for a ZeRO-3
    Trainer (``sharded``) to initialise per part; a ``ValueError`` where that cannot be done (not ZeRO-3
    (``strategy``: what was asked): the whole model would need values; an ``fnnet.Model``: no module to run
    ``reset_parameters`` on; buffers on ``meta``: they are whole on every rank)."""
    params = (model.named_parameters() if isinstance(model, nn.Module)
              else getattr(model, "params", {}).items())
    meta = [k for k, p in params if p.device.type == "meta"]
    if not meta:
        return False
    if not sharded:
        raise ValueError(f"Trainer(strategy={strategy!r}): the model's parameters {meta[:5]} are on the meta device "
                         "(shapes, no values); a meta-built model is initialised per part only under "
                         "strategy='zero3' (each rank draws its own parts, the model is never whole). Under another "
                         "strategy build it with real tensors, or materialise it first: module.to_empty(device='cpu'), "
                         "then fill every parameter (its modules' reset_parameters)")
    if not isinstance(model, nn.Module):
        raise ValueError("Trainer(strategy='zero3'): an fnnet.Model on the meta device has no reset_parameters to run "
                         "per part: pass the nn.Module built on the meta device (with torch.device('meta'): ...)")
    meta_buffers = [k for k, b in model.named_buffers() if b.device.type == "meta"]
    if meta_buffers:
        raise ValueError(f"Trainer(strategy='zero3'): the module's buffers {meta_buffers[:5]} are on the meta device; "
                         "parameters are initialised per part, buffers (whole on every rank) are not: give them values "
                         "(module.to_empty is not enough: fill them, e.g. BatchNorm's reset_running_stats())")
    return True


def parts_state(model: nn.Module, state: TrainState, train_step: Any, key: Any, device: torch.device) -> TrainState:
    """``state`` (made from ``model``'s meta tensors) with this rank's parts of the parameters drawn by the
    ZeRO-3 step's ``init_parts`` under ``key`` and no optimizer state yet (the first step makes it on the
    parts): the model is never whole on this rank."""
    return state.replace(params=train_step.init_parts(model, key, device=device), opt_state=None)


def sync_module(module: nn.Module, state: TrainState) -> None:
    """Point ``module``'s parameters and buffers at the state's tensors (no copy), so ``module(x)``
    computes with what training holds."""
    tensors = {**state.params, **(state.buffers or {})}
    with torch.no_grad():
        for name, t in itertools.chain(module.named_parameters(), module.named_buffers()):
            new = tensors.get(name)
            if new is not None and not _same_storage(new, t):
                t.data = new


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and a.storage_offset() == b.storage_offset() and a.stride() == b.stride() and a.shape == b.shape)
