"""The step skeleton: what every training step shares, written once, with the gradients as the part that varies.

Every way fnnet trains (one device, shards on several devices, ranks of a process group) is
this one function with a different *gradient source* plugged in::

    def train_step(state, batch):
        next_key, key = split_step_key(state.key)              # one split per step
        loss_scale = loss_scale_for(state, scaled)             # float16's dynamic scale
        grads, loss, aux, buffers = gradients(state.params, batch, state.buffers, key, loss_scale)
        params, opt_state, buffers, loss_scale, finite = apply_update(...)    # the one update path
        return state.replace(params=..., step=state.step + 1, key=next_key, ...), {"loss": loss, **aux}

The gradient source is ``gradients(params, batch, buffers, key, loss_scale) -> GradResult``
holding the *reduced* gradients (the mean over the whole batch, unscaled):

* one device: :func:`fnnet.make_grad_fn` itself (:func:`local_gradients`);
* several devices: per-shard gradients averaged by shard size (:mod:`fnnet.parallel`);
* several processes: per-rank gradients reduced across ranks in buckets by a
  :class:`fnnet.comm.Reduction` (:mod:`fnnet.distributed`).

:func:`fnnet.make_train_step` (in :mod:`fnnet.train`) picks the source; this module imports
none of them. The single-device eval and predict steps live here too: the data-parallel ones
run them per shard.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch

from . import compiler as _compiler
from . import random as _random
from . import tree as _tree
from .loss import (GradResult, call_loss, check_buffers_declared, check_precision, declared_keywords, make_grad_fn,
                   normalise_output, rng_scope)
from .batch import batch_size_of
from .state import Accumulation, TrainState, apply_update, loss_scale_for

__all__ = ["StepParts", "step_parts", "split_step_key", "compile_step", "check_state", "local_gradients",
           "build_train_step", "TrainStep", "eval_step", "predict_step", "Gradients", "Accumulate", "add_to_window",
           "window_mean", "check_accumulate", "traced_grad_fn",
           "accumulate_tree"]

Gradients = Callable[..., GradResult]
"""A gradient source: ``(params, batch, buffers, key, loss_scale, carry) -> GradResult``: the mean
gradient (unscaled) of the batch, reduced; with ``carry``, an :class:`fnnet.state.Accumulation`,
of the whole window (its micro-batches and this batch; ``batch=None``: the window alone)."""

Accumulate = Callable[..., tuple[Accumulation, torch.Tensor, dict, Any]]
"""A source's accumulating half: ``(params, batch, buffers, key, loss_scale, carry, donate) ->
(window, loss, aux, buffers)``: this batch added to the window, with no communication."""


class StepParts(NamedTuple):
    """What every training step is built from: the checked options and the gradient function."""

    grad_fn: Callable  # make_grad_fn(loss_fn, precision=precision)
    declared: frozenset  # the keywords the loss takes (buffers, key, train)
    scaled: bool  # float16: a dynamic loss scale
    checks: bool  # the update is skipped where the gradients are not finite
    loss_fn: Callable  # the user's loss function (named in messages)


def step_parts(loss_fn: Callable, *, precision: Any, skip_nonfinite: bool, jit: bool,
               compile_options: Mapping[str, Any] | None) -> StepParts:
    """The checked arguments and the gradient function a training step is built from."""
    _check_step_options(precision, jit, compile_options)
    grad_fn = make_grad_fn(loss_fn, precision=precision)
    scaled = check_precision(precision).loss_scaled
    return StepParts(grad_fn, declared_keywords(loss_fn), scaled, skip_nonfinite or scaled, loss_fn)


def _check_step_options(precision: Any, jit: bool, compile_options: Mapping[str, Any] | None) -> None:
    check_precision(precision)
    if compile_options and not jit:
        raise ValueError("compile_options only apply with jit=True")


def split_step_key(key: _random.Key | None) -> tuple[_random.Key | None, _random.Key | None]:
    """``(next state key, this step's key)``: one ``split`` per step, ``(None, None)`` without a key."""
    if key is None:
        return None, None
    return _random.split(key)


def compile_step(fn: Callable, compile_options: Mapping[str, Any] | None) -> Callable:
    """``fn`` through :func:`fnnet.compiler.compile`, shapes specialised unless the options say otherwise
    (how every ``jit=True`` step is compiled)."""
    return _compiler.compile(fn, **{"dynamic": False, **dict(compile_options or {})})


def check_state(state: Any, what: str) -> None:
    """A ``TypeError`` unless ``state`` is a :class:`TrainState` (or a subclass)."""
    if not isinstance(state, TrainState):
        raise TypeError(f"{what} expects a TrainState as its first argument, got {type(state).__name__}")


def local_gradients(parts: StepParts, grad_fn: Callable | None = None) -> tuple[Gradients, Accumulate]:
    """The one-device gradient source (:func:`fnnet.make_grad_fn` on the whole batch) and its
    accumulating half. ``grad_fn``: a compiled one, when the step compiles per micro-batch."""
    grad_fn = parts.grad_fn if grad_fn is None else grad_fn

    def accumulate(params: Any, batch: Any, buffers: Any, key: Any, loss_scale: Any, carry: Any,
                   donate: bool) -> tuple[Accumulation, torch.Tensor, dict, Any]:
        grads, loss, aux, new_buffers = grad_fn(params, batch, buffers, key, loss_scale=loss_scale, unscale=False)
        return add_to_window(carry, grads, batch_size_of(batch), loss, donate), loss, aux, new_buffers

    def local_gradients(params: Any, batch: Any, buffers: Any, key: Any, loss_scale: Any,
                        carry: Accumulation | None = None, donate: bool = False) -> GradResult:
        if carry is None:
            return grad_fn(params, batch, buffers, key, loss_scale=loss_scale)
        aux, new_buffers, owned = {}, None, donate or batch is not None  # may the window hold the mean?
        if batch is not None:
            carry, batch_loss, aux, new_buffers = accumulate(params, batch, buffers, key, loss_scale, carry, donate)
            aux = {**aux, "batch_loss": batch_loss}  # the micro-batch's own loss, for epoch means
        grads, loss = window_mean(carry, loss_scale, owned=owned)
        return GradResult(grads, loss, aux, new_buffers)

    return local_gradients, accumulate


def traced_grad_fn(parts: StepParts, compile_options: Mapping[str, Any] | None) -> Callable[..., GradResult]:
    """``parts.grad_fn`` compiled on its own (a step that compiles per micro-batch), with the key's
    randomness seeded around the call as the compiled whole step does."""
    compiled = compile_step(parts.grad_fn, compile_options)

    def traced(params: Any, batch: Any, buffers: Any = None, key: Any = None, **kwargs: Any) -> GradResult:
        with rng_scope(parts.declared, key, params):
            return compiled(params, batch, buffers, _random.TRACING_KEY if key is not None else None, **kwargs)

    return traced


def check_accumulate(accumulate: Any) -> int:
    """``accumulate`` as a positive int (micro-batches per update); a ``ValueError`` otherwise (bools too)."""
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
        raise ValueError(f"accumulate must be a positive int (micro-batches per update), got {accumulate!r}")
    return accumulate


def accumulate_tree(acc: Any, grads: Any, n: int, donate: bool) -> Any:
    """``acc + n * grads``: in ``grads``' own tensors when there is no ``acc`` yet (fresh gradients
    the caller owns), in ``acc``'s with ``donate``, else in new tensors."""
    if acc is None:
        # in place where the gradient owns its memory (an expanded one, stride 0, does not)
        return _tree.map(lambda g: (g.mul_(n) if g.is_contiguous() else g * n) if isinstance(g, torch.Tensor) else g,
                         grads)
    if donate:
        torch._foreach_add_([a for a in _tree.leaves(acc) if isinstance(a, torch.Tensor)],
                            [g for g in _tree.leaves(grads) if isinstance(g, torch.Tensor)], alpha=n)
        return acc
    return _tree.map(lambda a, g: torch.add(a, g, alpha=n) if isinstance(a, torch.Tensor) else a, acc, grads)


def add_to_window(carry: Accumulation | None, grads: Any, n: int, loss: torch.Tensor, donate: bool, *,
                  sizes: Sequence[int] | None = None) -> Accumulation:
    """The window after one more micro-batch of ``n`` samples with mean gradient ``grads`` (fresh
    tensors this function may reuse) and mean ``loss``: ``sum n_m g_m`` grows by ``n * grads``
    (:func:`accumulate_tree`). The one window every gradient source keeps.

    ``sizes``: ``grads`` is one gradient tree per device (a data-parallel step, shard ``i`` of
    ``sizes[i]`` samples) and the window keeps one sum per device, so nothing crosses devices
    before the window's last micro-batch; ``n`` is then ``sum(sizes)``.
    """
    before = carry if carry is not None else Accumulation(None, 0, 0.0, 0)
    if sizes is None:
        sums = accumulate_tree(before.grads, grads, n, donate)
    else:
        old = list(before.grads) if before.grads is not None else [None] * len(grads)
        sums = tuple(acc if g is None else accumulate_tree(acc, g, m, donate) for acc, g, m in zip(old, grads, sizes))
    return Accumulation(sums, before.samples + n, before.loss_sum + loss.double() * n, before.micro + 1,
                        before.buffers)


def window_mean(window: Accumulation, loss_scale: Any, *, owned: bool) -> tuple[Any, torch.Tensor]:
    """``(sum n_m g_m / (N * scale), sum n_m loss_m / N)``: the window's mean gradient, unscaled once,
    and its mean loss. ``owned``: the window's gradient tensors may hold the result."""
    divisor: Any = float(window.samples)
    if loss_scale is not None:
        divisor = loss_scale.scale * divisor
    if owned:
        grads = _tree.map(lambda g: g.div_(divisor) if isinstance(g, torch.Tensor) else g, window.grads)
    else:
        grads = _tree.map(lambda g: g / divisor if isinstance(g, torch.Tensor) else g, window.grads)
    return grads, (window.loss_sum / window.samples).float()


class TrainStep:
    """A training step: ``step(state, batch, *, end_window=False) -> (state, metrics)``, and what it
    was built with. What :func:`fnnet.make_train_step` returns, whatever the strategy.

    Call it like a function (``jax.jit``'s compiled function is the model): it is pure in
    ``state`` unless it was built with ``donate=True``.

    Attributes:
        strategy: the :class:`fnnet.strategy.Strategy` that built it (its layout of the state
            over devices or ranks, its reduction of the gradients).
        precision, jit, donate, accumulate: the options it was built with.
    """

    def __init__(self, call: Callable[..., tuple[TrainState, dict[str, Any]]],
                 flush: Callable[[TrainState], tuple[TrainState, dict[str, Any]] | None], *, strategy: Any,
                 name: str, precision: Any, jit: bool, donate: bool, accumulate: int,
                 gather_state: Callable[[TrainState], TrainState] | None = None,
                 shard_state: Callable[[TrainState], TrainState] | None = None,
                 local_parts: Callable[[TrainState], tuple[TrainState, dict[str, Any]]] | None = None):
        self._call, self._flush = call, flush
        self._gather, self._shard, self._local = gather_state, shard_state, local_parts
        self.strategy, self.precision, self.jit, self.donate, self.accumulate = strategy, precision, jit, donate, accumulate
        self.__name__ = self.__qualname__ = name

    def __call__(self, state: TrainState, batch: Any, *, end_window: bool = False) -> tuple[TrainState, dict[str, Any]]:
        """One micro-batch (``accumulate > 1``) or one update.

        Args:
            state: the :class:`fnnet.TrainState` (not changed unless the step was built with ``donate=True``).
            batch: what the loss function takes as its ``batch`` (on the state's device).
            end_window: make ``batch`` the last micro-batch of its accumulation window, however short.

        Returns:
            ``(new_state, metrics)``: ``metrics["loss"]`` is a device tensor (no sync), with the loss
                function's aux values; ``"finite"`` when non-finite updates are skipped; ``"updated"`` and
                ``"batch_loss"`` with ``accumulate > 1``.
        """
        return self._call(state, batch, end_window=end_window)

    def flush(self, state: TrainState) -> tuple[TrainState, dict[str, Any]] | None:
        """Apply the unfinished accumulation window of ``state`` as one update (weighted by its
        samples). Under ``torch.distributed`` every rank calls it.

        Returns:
            ``(state, metrics)`` as a call of the step returns them, or ``None`` when ``state`` holds no
                unfinished window (nothing to apply).
        """
        return self._flush(state)

    def gather_state(self, state: TrainState) -> TrainState:
        """``state`` whole, as one process would hold it: a sharded strategy gathers the optimizer
        state from every rank's part (every rank calls it); others return ``state``.

        Returns:
            A :class:`fnnet.TrainState`: what a checkpoint holds, so it loads into any strategy and
                any number of ranks.
        """
        return state if self._gather is None else self._gather(state)

    def shard_state(self, state: TrainState) -> TrainState:
        """``state`` in the strategy's layout (a sharded strategy cuts a whole optimizer state to this
        rank's part; others return ``state``). The step does it itself on a whole state.

        Returns:
            A :class:`fnnet.TrainState` in this rank's layout.
        """
        return state if self._shard is None else self._shard(state)

    def local_parts(self, state: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """``(state in this rank's layout, {key path: (lo, hi, whole shape)})``: each listed leaf of the
        returned state is the range ``[lo, hi)`` of the flattened whole leaf; every other leaf is whole
        (and the same on every rank). What a sharded checkpoint writes per rank
        (:func:`fnnet.checkpoint.sharded.save_sharded`); a strategy that shards parameters plugs its own
        layout in here. Not collective.

        Returns:
            ``(state, parts)``: the state in this rank's layout and ``{key path: (lo, hi, whole shape)}``.

        Raises:
            ValueError: ``state.accum`` holds an unfinished accumulation window (each rank's own partial
                gradients and loss: no layout of ranges describes them); call ``state, _ =
                step.flush(state)`` first, or take the parts after an update (``metrics["updated"]``).
        """
        if getattr(state, "accum", None) is not None:
            raise ValueError(f"{self.__name__}.local_parts: state.accum holds an unfinished gradient-accumulation "
                             f"window ({state.accum.micro} of {self.accumulate} micro-batches: each rank's own "
                             "partial gradients, which a sharded checkpoint cannot hold); call "
                             "`state, _ = step.flush(state)` first, or save after an update (metrics['updated'])")
        return (state, {}) if self._local is None else self._local(state)

    def __repr__(self) -> str:
        return f"<{self.__name__}: {self.strategy!r}, precision={self.precision!r}, jit={self.jit}, " \
               f"accumulate={self.accumulate}>"


def build_train_step(gradients: Gradients, optimizer: Any, parts: StepParts, *, donate: bool, jit: bool = False,
                     compile_options: Mapping[str, Any] | None = None, compile_whole: bool = False,
                     name: str = "train_step", accumulate: int = 1, accumulate_fn: Accumulate | None = None,
                     update: Callable[..., tuple[Any, Any, Any, Any, Any]] = apply_update, strategy: Any = None,
                     precision: Any = "32") -> TrainStep:
    """The training step ``train_step(state, batch) -> (state, metrics)`` around a gradient source.

    The skeleton every step shares: the state's type checked, its key split once, the loss
    scale taken (float16), ``gradients`` called, the one update (:func:`fnnet.state.apply_update`:
    skipped where ``parts.checks`` finds a non-finite gradient), ``metrics = {"loss", **aux,
    "finite"}`` and the new state by ``state.replace`` (a subclass of ``TrainState`` survives).

    With ``accumulate=k`` (and the source's ``accumulate_fn``) the first ``k - 1`` calls of a
    window only add their micro-batch to ``state.accum`` (no communication, no update:
    ``metrics["updated"]`` is False) and the ``k``-th reduces the window and updates
    (``updated`` True); ``metrics["loss"]`` is the window's mean loss so far and
    ``metrics["batch_loss"]`` this micro-batch's (a gradient source adds it to the aux of a
    window's last micro-batch). Every micro-batch gets its own key (one split per call). A
    window whose update is skipped (a non-finite gradient) leaves the buffers as they were at
    its start. ``train_step.flush(state)`` applies an unfinished window as one update,
    weighted by its samples, and ``train_step(state, batch, end_window=True)`` makes ``batch``
    the last micro-batch of its window however short the window is (the last batch of an epoch).

    ``update`` replaces :func:`fnnet.state.apply_update` where the update itself is distributed
    (the sharded optimizer step: :func:`fnnet.shard.sharded_update`).

    ``compile_whole`` (with ``jit``) compiles gradients and update as one graph (the
    one-device step without accumulation); other sources compile their own part. ``name``
    names the returned :class:`TrainStep`, so a traceback or a profiler says which step ran.
    """
    declared, scaled, checks = parts.declared, parts.scaled, parts.checks
    accumulate = check_accumulate(accumulate)
    if accumulate > 1 and accumulate_fn is None:
        raise ValueError(f"{name} cannot accumulate gradients")

    def body(params, opt_state, buffers, loss_scale, batch, key, carry=None, keep_buffers=None):
        grads, loss, aux, new_buffers = gradients(params, batch, buffers, key, loss_scale, carry, donate) \
            if carry is not None else gradients(params, batch, buffers, key, loss_scale)
        params, opt_state, new_buffers, loss_scale, finite = update(
            optimizer, grads, params, opt_state, buffers=buffers if keep_buffers is None else keep_buffers,
            new_buffers=new_buffers, loss_scale=loss_scale, check_finite=checks, donate=donate)
        metrics = {"loss": loss, **aux}
        if finite is not None:
            metrics["finite"] = finite
        return params, opt_state, new_buffers, loss_scale, metrics

    whole = jit and compile_whole and accumulate == 1
    compiled = compile_step(body, compile_options) if whole else body

    def finish(state: TrainState, batch: Any, next_key: Any, step_key: Any, loss_scale: Any, carry: Any):
        if whole:
            # Inside torch.compile randomness comes from torch's RNG ops, seeded here from the key.
            with rng_scope(declared, step_key, state.params):
                inner_key = _random.TRACING_KEY if step_key is not None else None
                out = compiled(state.params, state.opt_state, state.buffers, loss_scale, batch, inner_key)
        else:  # a skipped window keeps the buffers of its start
            keep = carry.buffers if carry is not None and carry.buffers is not None else None
            out = body(state.params, state.opt_state, state.buffers, loss_scale, batch, step_key, carry, keep)
        params, opt_state, buffers, loss_scale, metrics = out
        if accumulate > 1:
            if carry is None:  # a window of one micro-batch (accumulate > 1, flushed at once): its loss is the batch's
                metrics["batch_loss"] = metrics["loss"]
            metrics["updated"] = True
        return state.replace(params=params, opt_state=opt_state, step=state.step + 1, buffers=buffers, key=next_key,
                             loss_scale=loss_scale if scaled else state.loss_scale, accum=None), metrics

    def add(state: TrainState, batch: Any, next_key: Any, step_key: Any, loss_scale: Any):
        """A micro-batch that does not end its window: added to ``state.accum``, no update."""
        assert accumulate_fn is not None
        carry = state.accum
        window, loss, aux, buffers = accumulate_fn(state.params, batch, state.buffers, step_key, loss_scale, carry,
                                                   donate)
        start = state.buffers if carry is None else carry.buffers  # the buffers a skipped window keeps
        window = dataclasses.replace(window, buffers=start)
        running = (window.loss_sum / window.samples).float()
        metrics = {"loss": running, "batch_loss": loss, **aux, "updated": False}
        return state.replace(key=next_key, accum=window, loss_scale=loss_scale if scaled else state.loss_scale,
                             buffers=state.buffers if buffers is None else buffers), metrics

    def train_step(state: TrainState, batch: Any, *, end_window: bool = False) -> tuple[TrainState, dict[str, Any]]:
        check_state(state, name)
        check_buffers_declared(declared, state.buffers, parts.loss_fn)
        next_key, step_key = split_step_key(state.key)
        loss_scale = loss_scale_for(state, scaled)
        carry = state.accum
        if accumulate > 1 and not end_window and (carry.micro if carry is not None else 0) + 1 < accumulate:
            return add(state, batch, next_key, step_key, loss_scale)
        return finish(state, batch, next_key, step_key, loss_scale, carry)

    def flush(state: TrainState) -> tuple[TrainState, dict[str, Any]] | None:
        check_state(state, name)
        if state.accum is None:
            return None
        return finish(state, None, state.key, None, loss_scale_for(state, scaled), state.accum)

    train_step.__name__ = train_step.__qualname__ = name
    return TrainStep(train_step, flush, strategy=strategy, name=name, precision=precision, jit=jit, donate=donate,
                     accumulate=accumulate)


# -- the steps that do not train (one device; fnnet.parallel runs them per shard) -----------------------


def _no_grad_step(fn: Callable, what: str, *, jit: bool, precision: Any,
                  compile_options: Mapping[str, Any] | None) -> Callable[[TrainState, Any], Any]:
    """``step(state, batch) -> fn(params, batch, buffers)`` under ``no_grad`` and the precision's autocast."""
    _check_step_options(precision, jit, compile_options)
    policy = check_precision(precision)

    def inner(params, buffers, batch):
        with torch.no_grad(), policy.autocast(params):
            return fn(params, policy.cast_inputs(batch), buffers)

    compiled = compile_step(inner, compile_options) if jit else inner

    def step(state: TrainState, batch: Any) -> Any:
        check_state(state, what)
        return compiled(state.params, state.buffers, batch)

    step.__name__ = step.__qualname__ = what
    return step


def eval_step(loss_fn: Callable, *, jit: bool = False, precision: Any = "32",
              compile_options: Mapping[str, Any] | None = None) -> Callable[[TrainState, Any], dict[str, torch.Tensor]]:
    """The one-device ``eval_step(state, batch) -> metrics`` (see :func:`fnnet.make_eval_step`)."""
    declared = declared_keywords(loss_fn)

    def evaluate(params: Any, batch: Any, buffers: Any) -> dict[str, torch.Tensor]:
        check_buffers_declared(declared, buffers, loss_fn)
        loss, aux, _ = normalise_output(call_loss(loss_fn, declared, params, batch, buffers, None, False), "buffers" in declared)
        return {"loss": loss.float(), **aux}

    return _no_grad_step(evaluate, "eval_step", jit=jit, precision=precision, compile_options=compile_options)


def predict_step(predict_fn: Callable, *, jit: bool = False, precision: Any = "32",
                 compile_options: Mapping[str, Any] | None = None) -> Callable[[TrainState, Any], Any]:
    """The one-device ``predict_step(state, batch) -> outputs`` (see :func:`fnnet.make_predict_step`)."""
    declared = declared_keywords(predict_fn)
    output_dtype = check_precision(precision).output_dtype

    def predict(params: Any, batch: Any, buffers: Any) -> Any:
        out = call_loss(predict_fn, declared, params, batch, buffers, None, False)
        return _tree.map(lambda t: t.to(output_dtype) if isinstance(t, torch.Tensor)
                         and t.dtype in (torch.float16, torch.bfloat16) else t, out)

    return _no_grad_step(predict, "predict_step", jit=jit, precision=precision, compile_options=compile_options)
