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

from typing import Any, Callable, Mapping, NamedTuple

import torch

from . import compiler as _compiler
from . import random as _random
from . import tree as _tree
from .loss import (GradResult, _call, _check_buffers_declared, _check_precision, _declared, _normalise, _rng_scope,
                   autocast, make_grad_fn, PRECISIONS)
from .state import TrainState, apply_update, loss_scale_for

__all__ = ["StepParts", "step_parts", "split_step_key", "compile_step", "check_state", "local_gradients",
           "build_train_step", "eval_step", "predict_step", "Gradients"]

Gradients = Callable[[Any, Any, Any, Any, Any], GradResult]
"""A gradient source: ``(params, batch, buffers, key, loss_scale) -> GradResult`` (reduced, unscaled)."""


class StepParts(NamedTuple):
    """What every training step is built from: the checked options and the gradient function."""

    grad_fn: Callable  # make_grad_fn(loss_fn, precision=precision)
    declared: frozenset  # the keywords the loss takes (buffers, key, train)
    scaled: bool  # float16: a dynamic loss scale
    checks: bool  # the update is skipped where the gradients are not finite


def step_parts(loss_fn: Callable, *, precision: str, skip_nonfinite: bool, jit: bool,
               compile_options: Mapping[str, Any] | None) -> StepParts:
    """The checked arguments and the gradient function a training step is built from."""
    _check_step_options(precision, jit, compile_options)
    grad_fn = make_grad_fn(loss_fn, precision=precision)
    scaled = PRECISIONS[precision] is torch.float16
    return StepParts(grad_fn, grad_fn.declared, scaled, skip_nonfinite or scaled)  # type: ignore[attr-defined]


def _check_step_options(precision: str, jit: bool, compile_options: Mapping[str, Any] | None) -> None:
    _check_precision(precision)
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


def local_gradients(parts: StepParts) -> Gradients:
    """The one-device gradient source: :func:`fnnet.make_grad_fn` on the whole batch."""
    grad_fn = parts.grad_fn

    def local_gradients(params: Any, batch: Any, buffers: Any, key: Any, loss_scale: Any) -> GradResult:
        return grad_fn(params, batch, buffers, key, loss_scale=loss_scale)

    return local_gradients


def build_train_step(gradients: Gradients, optimizer: Any, parts: StepParts, *, donate: bool, jit: bool = False,
                     compile_options: Mapping[str, Any] | None = None, compile_whole: bool = False,
                     name: str = "train_step") -> Callable[[TrainState, Any], tuple[TrainState, dict[str, Any]]]:
    """The training step ``train_step(state, batch) -> (state, metrics)`` around a gradient source.

    The skeleton every step shares: the state's type checked, its key split once, the loss
    scale taken (float16), ``gradients`` called, the one update (:func:`fnnet.state.apply_update`:
    skipped where ``parts.checks`` finds a non-finite gradient), ``metrics = {"loss", **aux,
    "finite"}`` and the new state by ``state.replace`` (a subclass of ``TrainState`` survives).

    ``compile_whole`` (with ``jit``) compiles gradients and update as one graph (the
    one-device step); other sources compile their own part. ``name`` names the returned
    function (``data_parallel_train_step``, ``distributed_train_step``), so a traceback or a
    profiler says which step ran.
    """
    declared, scaled, checks = parts.declared, parts.scaled, parts.checks

    def body(params, opt_state, buffers, loss_scale, batch, key):
        grads, loss, aux, new_buffers = gradients(params, batch, buffers, key, loss_scale)
        params, opt_state, new_buffers, loss_scale, finite = apply_update(
            optimizer, grads, params, opt_state, buffers=buffers, new_buffers=new_buffers, loss_scale=loss_scale,
            check_finite=checks, donate=donate)
        metrics = {"loss": loss, **aux}
        if finite is not None:
            metrics["finite"] = finite
        return params, opt_state, new_buffers, loss_scale, metrics

    whole = jit and compile_whole
    compiled = compile_step(body, compile_options) if whole else body

    def train_step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, Any]]:
        check_state(state, name)
        _check_buffers_declared(declared, state.buffers, parts.grad_fn.loss_fn)
        next_key, step_key = split_step_key(state.key)
        loss_scale = loss_scale_for(state, scaled)
        if whole:
            # Inside torch.compile randomness comes from torch's RNG ops, seeded here from the key.
            with _rng_scope(declared, step_key, state.params):
                inner_key = _random.TRACING_KEY if step_key is not None else None
                out = compiled(state.params, state.opt_state, state.buffers, loss_scale, batch, inner_key)
        else:
            out = body(state.params, state.opt_state, state.buffers, loss_scale, batch, step_key)
        params, opt_state, buffers, loss_scale, metrics = out
        return state.replace(params=params, opt_state=opt_state, step=state.step + 1, buffers=buffers, key=next_key,
                             loss_scale=loss_scale if scaled else state.loss_scale), metrics

    train_step.__name__ = train_step.__qualname__ = name
    train_step.jit, train_step.donate = jit, donate  # type: ignore[attr-defined]
    return train_step


# -- the steps that do not train (one device; fnnet.parallel runs them per shard) -----------------------


def _no_grad_step(fn: Callable, what: str, *, jit: bool, precision: str,
                  compile_options: Mapping[str, Any] | None) -> Callable[[TrainState, Any], Any]:
    """``step(state, batch) -> fn(params, batch, buffers)`` under ``no_grad`` and the precision's autocast."""
    _check_step_options(precision, jit, compile_options)

    def inner(params, buffers, batch):
        with torch.no_grad(), autocast(precision, params):
            return fn(params, batch, buffers)

    compiled = compile_step(inner, compile_options) if jit else inner

    def step(state: TrainState, batch: Any) -> Any:
        check_state(state, what)
        return compiled(state.params, state.buffers, batch)

    step.__name__ = step.__qualname__ = what
    return step


def eval_step(loss_fn: Callable, *, jit: bool = False, precision: str = "32",
              compile_options: Mapping[str, Any] | None = None) -> Callable[[TrainState, Any], dict[str, torch.Tensor]]:
    """The one-device ``eval_step(state, batch) -> metrics`` (see :func:`fnnet.make_eval_step`)."""
    declared = _declared(loss_fn)

    def evaluate(params: Any, batch: Any, buffers: Any) -> dict[str, torch.Tensor]:
        _check_buffers_declared(declared, buffers, loss_fn)
        loss, aux, _ = _normalise(_call(loss_fn, declared, params, batch, buffers, None, False), "buffers" in declared)
        return {"loss": loss.float(), **aux}

    return _no_grad_step(evaluate, "eval_step", jit=jit, precision=precision, compile_options=compile_options)


def predict_step(predict_fn: Callable, *, jit: bool = False, precision: str = "32",
                 compile_options: Mapping[str, Any] | None = None) -> Callable[[TrainState, Any], Any]:
    """The one-device ``predict_step(state, batch) -> outputs`` (see :func:`fnnet.make_predict_step`)."""
    declared = _declared(predict_fn)

    def predict(params: Any, batch: Any, buffers: Any) -> Any:
        out = _call(predict_fn, declared, params, batch, buffers, None, False)
        return _tree.map(lambda t: t.float() if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16)
                         else t, out)

    return _no_grad_step(predict, "predict_step", jit=jit, precision=precision, compile_options=compile_options)
