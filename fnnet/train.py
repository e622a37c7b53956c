"""Training steps: ``make_train_step`` / ``make_eval_step`` / ``make_predict_step``, whichever way you train.

Everything that trains in fnnet (a user's own loop, the ``Trainer``, data parallelism,
multi-process training) is built from two public pieces::

    grad_fn = fnnet.make_grad_fn(loss_fn, precision="32")
    grads, loss, aux, buffers = grad_fn(state.params, batch, state.buffers, key)   # 1. gradients
    state = state.apply_gradients(grads, optimizer, buffers=buffers)              # 2. the update

:func:`make_train_step` is their composition (plus the key split and, with ``jit=True``,
``torch.compile`` over both)::

    state = fnnet.TrainState.create(model.params, optimizer, key=fnnet.random.key(0))
    step = fnnet.make_train_step(loss_fn, optimizer)
    for batch in loader:
        state, metrics = step(state, batch)

This module is the level above the ways to train: it resolves the strategy
(:mod:`fnnet.strategy`: one device, :class:`fnnet.parallel.Replicate`,
:class:`fnnet.distributed.DDP`, ``ZeRO``, ``HSDP``; a string shorthand or the old flags), whose
``build`` hands its gradient source to the one skeleton, :func:`fnnet.step.build_train_step`. The loss function's calling convention is described in
:mod:`fnnet.loss` (re-exported here: ``make_grad_fn``, ``supervised_loss``, ``GradResult``).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from . import distributed as _distributed
from . import parallel as _parallel
from .loss import PRECISIONS, GradResult, autocast, make_grad_fn, supervised_loss
from .precision import Precision
from .state import TrainState
from .step import TrainStep, check_accumulate, eval_step, predict_step
from .strategy import SingleDevice, StepOptions, Strategy

__all__ = [
    "GradResult",
    "make_grad_fn",
    "make_train_step",
    "resolve_strategy",
    "make_eval_step",
    "make_predict_step",
    "supervised_loss",
    "autocast",
    "PRECISIONS",
]


def make_train_step(
    loss_fn: Callable,
    optimizer: Any,
    *,
    jit: bool = False,
    donate: bool = False,
    precision: str | Precision = "32",
    compile_options: Mapping[str, Any] | None = None,
    skip_nonfinite: bool = False,
    devices: Any = None,
    distributed: bool = False,
    accumulate: int = 1,
    strategy: Strategy | str | None = None,
    **distributed_options: Any,
) -> TrainStep:
    """Build the pure training step ``step(state, batch) -> (new_state, metrics)``.

    One call splits the state's key, computes the loss and its gradient
    (:func:`make_grad_fn`) and applies the update (:meth:`TrainState.apply_gradients`):
    the skeleton of :func:`fnnet.step.build_train_step`.
    ``metrics`` holds ``"loss"`` (a 0-dim float32 tensor on the device, never synced to the
    host: a non-finite loss shows up there, and stopping on it is the caller's call), the
    loss function's aux dict and, when the step checks gradients (``skip_nonfinite`` or
    float16), ``"finite"``: a 0-dim bool tensor, False for a skipped update.

    Args:
        loss_fn: see the module docstring for the calling convention.
        optimizer: an ``fnnet.optim`` ``GradientTransformation`` (the same one the state was
            created with).
        jit: compile the whole step (gradient + update + apply) with ``torch.compile``
            (through :func:`fnnet.compiler.compile`: on CPU, memory-bound skinny matmuls are
            rewritten into code that fuses with the rest of the step).
            Shapes are specialised (``dynamic=False``): the first call compiles, a batch of
            another shape (the last, smaller batch of an epoch) compiles once more, and later
            calls with either shape reuse the compiled code. Dropout draws inside the compiled
            step come from torch's RNG seeded from ``state.key`` around the call, so results
            are reproducible under a key but not bit-identical to eager mode.
        donate: the caller promises never to touch the input state again, so the optimizer
            and parameter update may reuse its buffers in place (JAX's buffer donation).
            With ``donate=False`` the input state is left bit-identical.
        precision: ``"32"`` (default), ``"bf16"`` / ``"bf16-mixed"`` (autocast to bfloat16 for
            forward and backward) or ``"16-mixed"`` (float16 autocast with dynamic loss scaling
            kept in ``state.loss_scale``: a step with non-finite gradients is skipped and the
            scale shrinks). Master params and optimizer state stay in their own dtype. Or an
            :class:`fnnet.Precision` (the strings are its named policies): with
            ``param_dtype=torch.bfloat16`` the step keeps the params in bfloat16 and float32
            master weights in the optimizer state (:func:`fnnet.optim.master_weights` around
            ``optimizer``); a state made by ``TrainState.create(params, optimizer)`` from
            float32 params is converted on its first step (:meth:`fnnet.Precision.prepare`:
            the float32 params become the master weights, exactly).
        compile_options: extra keyword arguments for ``torch.compile`` when ``jit=True``
            (``mode="reduce-overhead"`` for CUDA graphs, ``fullgraph=True``, inductor
            ``options``, ...; see :func:`fnnet.compiler.compile`).
        skip_nonfinite: check that every gradient is finite and skip the update when one is
            not (params, optimizer state and buffers stay as they were, donated or not), with
            no host sync (see :meth:`TrainState.apply_gradients`); reported as
            ``metrics["finite"]``. The ``Trainer`` turns this on.
        devices: a list of devices (``["cuda:0", "cuda:1"]``; repeats allowed) for data
            parallelism: :func:`fnnet.parallel.make_train_step`, the same step over shards of
            each batch. ``None``: one device, the state's.
        distributed: the step of one rank of a ``torch.distributed`` run
            (:func:`fnnet.distributed.make_train_step`): gradients are all-reduced across
            processes, each rank passing its own part of the batch.
        accumulate: gradient accumulation over this many micro-batches per update (Lightning's
            ``accumulate_grad_batches``, optax's ``MultiSteps``): the first ``accumulate - 1``
            calls of a window only add their micro-batch's gradient to ``state.accum`` (weighted
            by its samples; no update, no communication across devices or ranks), the last one
            reduces the window and updates once. The update equals one step on the
            concatenated micro-batches for a mean-reduced loss, uneven sizes included;
            ``clip_by_global_norm`` and the finite check see the accumulated gradient, float16
            unscales it once and a non-finite window's update is skipped whole (buffers such as
            BatchNorm statistics stay as they were at the window's start). ``metrics["updated"]``
            says whether a call updated, ``metrics["loss"]`` is the window's mean loss so far
            (the true mean over the window on the updating call), ``metrics["batch_loss"]`` the
            micro-batch's; ``state.step`` counts updates. ``step.flush(state)`` applies an
            unfinished window (e.g. at the end of an epoch).
        strategy: how the step is laid out over devices or ranks (:mod:`fnnet.strategy`): a
            :class:`fnnet.strategy.Strategy` (:class:`fnnet.parallel.Replicate`,
            :class:`fnnet.distributed.DDP`, :class:`~fnnet.distributed.ZeRO`,
            :class:`~fnnet.distributed.HSDP`) or a shorthand: ``"single"``, ``"ddp"``,
            ``"zero1"``, ``"zero2"`` (Lightning's ``strategy="ddp"``; on the default process
            group). ``None``: one device, or what the old flags below say.
        devices, distributed, **distributed_options: the old flags, kept as shorthands for one
            release: ``devices=[...]`` is ``strategy=Replicate(devices)``; ``distributed=True``
            is ``DDP(**distributed_options)`` (``reduction=``, ``bucket_mb=``, ``sync_state=``),
            and with ``shard_optimizer=True`` ``ZeRO(2, ...)``. Not with ``strategy=``.

    Returns:
        A :class:`fnnet.step.TrainStep`: call it as ``step(state, batch)``; it also has
        ``flush``, ``gather_state``, ``shard_state`` and ``strategy``.
    """
    policy = Precision.resolve(precision)  # resolved once, passed down
    options = StepOptions(jit, donate, policy, compile_options, skip_nonfinite, check_accumulate(accumulate))
    chosen = resolve_strategy(strategy, devices=devices, distributed=distributed, **distributed_options)
    # float32 master weights under 16-bit params: the optimizer wrapped, every state prepared, whatever the strategy
    return _with_master_weights(chosen.build(loss_fn, policy.optimizer(optimizer), options), policy)


def _with_master_weights(step: TrainStep, policy: Precision) -> TrainStep:
    """``step`` taking states not yet on master weights (:meth:`Precision.prepare`: the call, ``flush``
    and ``shard_state``), under 16-bit params; the same :class:`TrainStep` otherwise."""
    if not policy.keeps_master:
        return step

    def ready(state: TrainState) -> TrainState:
        if getattr(state, "opt_state", 0) is None and hasattr(step, "init_parts"):
            # ZeRO-3's TrainState(step.init_parts(...), None): full-precision parts; the step initialises the
            # master weights on them (float32 copies), then the params are cast down, as prepare does for a whole state
            state = step.shard_state(state)
            return state.replace(params=policy.cast_params(state.params))
        return policy.prepare(state)

    def call(state: TrainState, batch: Any, *, end_window: bool = False) -> tuple[TrainState, dict[str, Any]]:
        return step(ready(state), batch, end_window=end_window)

    wrapped = TrainStep(call, lambda state: step.flush(ready(state)), strategy=step.strategy,
                        name=step.__name__, precision=step.precision, jit=step.jit, donate=step.donate,
                        accumulate=step.accumulate, gather_state=lambda state: step.gather_state(ready(state)),
                        shard_state=lambda state: step.shard_state(ready(state)),
                        local_parts=lambda state: step.local_parts(ready(state)))
    for extra in ("on_parts", "init_parts"):  # ZeRO-3's ways to run and initialise the model on parts
        if hasattr(step, extra):
            setattr(wrapped, extra, getattr(step, extra))
    return wrapped


SHORTHANDS = {"single": lambda: SingleDevice(), "ddp": lambda: _distributed.DDP(),
              "zero1": lambda: _distributed.ZeRO(1), "zero2": lambda: _distributed.ZeRO(2),
              "zero": lambda: _distributed.ZeRO(2), "zero3": lambda: _distributed.ZeRO(3),
              "fsdp": lambda: _distributed.ZeRO(3)}
"""The strategies a string names (on the default process group); HSDP needs a mesh, so it has none."""


def resolve_strategy(strategy: Strategy | str | None = None, *, devices: Any = None, distributed: bool = False,
                     **distributed_options: Any) -> Strategy:
    """The :class:`fnnet.strategy.Strategy` that ``strategy`` names, or that the old flags describe
    (``devices=``: :class:`fnnet.parallel.Replicate`; ``distributed=True``: :class:`fnnet.distributed.DDP`,
    with ``shard_optimizer=True`` :class:`fnnet.distributed.ZeRO`; nothing: :class:`fnnet.strategy.SingleDevice`)."""
    if strategy is not None:
        if devices is not None or distributed or distributed_options:
            given = [k for k, v in (("devices", devices), ("distributed", distributed)) if v] + sorted(distributed_options)
            raise ValueError(f"make_train_step: strategy={strategy!r} says how to train; {given} are the old flags for "
                             "the same choice: pass one or the other (options go in the strategy: DDP(bucket_mb=...))")
        if isinstance(strategy, str):
            if strategy not in SHORTHANDS:
                raise ValueError(f"unknown strategy {strategy!r}: the shorthands are {sorted(SHORTHANDS)}; HSDP needs a "
                                 "mesh: strategy=fnnet.distributed.HSDP(mesh)")
            return SHORTHANDS[strategy]()
        if not isinstance(strategy, Strategy):
            raise TypeError(f"strategy must be an fnnet.strategy.Strategy (fnnet.distributed.DDP(), ...) or one of "
                            f"{sorted(SHORTHANDS)}, got {type(strategy).__name__}")
        return strategy
    if distributed_options and not distributed:
        raise TypeError(f"make_train_step: {sorted(distributed_options)} apply with distributed=True only")
    if distributed:
        if devices is not None:
            raise ValueError("make_train_step: distributed=True runs one device per process; devices= does not apply")
        unknown = set(distributed_options) - {"reduction", "bucket_mb", "sync_state", "shard_optimizer"}
        if unknown:
            raise TypeError(f"make_train_step: unexpected keyword argument(s) {sorted(unknown)}")
        options = dict(distributed_options)
        if options.pop("shard_optimizer", False):
            if options.get("reduction") is not None:
                raise ValueError("shard_optimizer=True (ZeRO) reduces with its own layout (reduce-scatter within the "
                                 "group): pass no reduction=")
            options.pop("reduction", None)
            return _distributed.ZeRO(2, **options)
        return _distributed.DDP(**options)
    if devices is not None:
        return _parallel.Replicate(devices)
    return SingleDevice()


def make_eval_step(
    loss_fn: Callable, *, jit: bool = False, precision: str = "32", compile_options: Mapping[str, Any] | None = None,
    devices: Any = None,
) -> Callable[[TrainState, Any], dict[str, torch.Tensor]]:
    """Build ``eval_step(state, batch) -> metrics``: the loss (and aux) with no update.

    ``loss_fn`` is called with ``train=False`` (if it declares ``train``), the state's
    buffers (if it declares ``buffers``; any new buffers it returns are ignored) and
    ``key=None``. Runs under ``torch.no_grad`` in the step's precision. With ``devices``, over
    shards of each batch (:func:`fnnet.parallel.make_eval_step`).
    """
    if devices is not None:
        return _parallel.make_eval_step(loss_fn, devices, jit=jit, precision=precision, compile_options=compile_options)
    return eval_step(loss_fn, jit=jit, precision=precision, compile_options=compile_options)


def make_predict_step(
    predict_fn: Callable, *, jit: bool = False, precision: str = "32", compile_options: Mapping[str, Any] | None = None,
    devices: Any = None,
) -> Callable[[TrainState, Any], Any]:
    """Build ``predict_step(state, batch) -> outputs``: ``predict_fn(params, batch, [buffers=])`` in eval mode.

    Runs under ``torch.no_grad`` in the step's precision; floating-point outputs computed in
    a lower precision come back as float32. ``predict_fn`` receives ``buffers=`` when it
    declares it (as a loss function does). :func:`supervised_loss`'s companion for a
    :class:`fnnet.Model` is ``lambda params, batch, buffers=None: model.apply(params,
    inputs_of(batch), buffers=buffers)``, which is what ``Trainer.predict`` runs. With
    ``devices``, over shards of each batch, gathered in batch order
    (:func:`fnnet.parallel.make_predict_step`).
    """
    if devices is not None:
        return _parallel.make_predict_step(predict_fn, devices, jit=jit, precision=precision,
                                           compile_options=compile_options)
    return predict_step(predict_fn, jit=jit, precision=precision, compile_options=compile_options)
