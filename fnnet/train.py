"""The functional training core: the pure step ``(state, batch) -> (state, metrics)`` and its two halves.

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

The loss function
-----------------
``loss_fn(params, batch, **extras)`` returns the scalar loss, or ``(loss, aux)`` where
``aux`` is a dict of extra metrics (tensors) merged into the step's ``metrics``. The extras
are keyword arguments the function *declares* (fnnet inspects its signature):

* ``buffers=`` -- the state's buffers (BatchNorm running stats). A loss function that takes
  buffers returns ``(loss, aux, new_buffers)`` (``aux`` may be ``None``).
* ``key=`` -- a fresh :class:`fnnet.random.Key` for this step (dropout), split from
  ``state.key`` (``None`` when the state has no key). Randomness drawn from torch's global
  RNG inside the loss is seeded from this key (and the caller's RNG state is restored).
* ``train=`` -- ``True`` in the train step, ``False`` in the eval step.

A state that holds buffers needs a loss function that declares ``buffers``; anything else
is a ``TypeError`` naming what is missing. :func:`supervised_loss` builds the usual one from a
:class:`fnnet.Model` and ``loss(outputs, targets)``.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Mapping, NamedTuple

import torch

from . import compiler as _compiler
from . import random as _random
from . import tree as _tree
from .data import split_batch
from ._functional import Model
from .state import DynamicScale, TrainState, loss_scale_for, step_update

__all__ = [
    "GradResult",
    "make_grad_fn",
    "make_train_step",
    "make_eval_step",
    "make_predict_step",
    "supervised_loss",
    "split_step_key",
    "step_parts",
    "StepParts",
    "compile_step",
    "autocast",
    "PRECISIONS",
]

PRECISIONS = {
    "32": None,
    "32-true": None,
    "bf16": torch.bfloat16,
    "bf16-mixed": torch.bfloat16,
    "16-mixed": torch.float16,
    "16": torch.float16,
}


# -- the loss function's calling convention ---------------------------------------------------
_EXTRAS = ("buffers", "key", "train")


def _declared(fn: Callable) -> frozenset[str]:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins: assume the plain form
        return frozenset()
    params = sig.parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return frozenset(_EXTRAS)
    return frozenset(p.name for p in params if p.name in _EXTRAS)


def _normalise(out: Any, with_buffers: bool) -> tuple[torch.Tensor, dict[str, Any], Any]:
    """``(loss, aux_dict, new_buffers)`` from any allowed return form."""
    if with_buffers:
        if not (isinstance(out, tuple) and len(out) == 3):
            raise TypeError(
                "a loss function that takes buffers= must return (loss, aux, new_buffers); "
                f"got {type(out).__name__}" + (f" of length {len(out)}" if isinstance(out, tuple) else "")
            )
        loss, aux, new_buffers = out
    elif isinstance(out, tuple):
        if len(out) != 2:
            raise TypeError(f"loss_fn must return loss or (loss, aux); got a tuple of length {len(out)}")
        loss, aux = out
        new_buffers = None
    else:
        loss, aux, new_buffers = out, None, None
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise TypeError(f"loss_fn must return a scalar (0-dim) tensor as the loss, got {shape}")
    if aux is None:
        aux = {}
    elif not isinstance(aux, Mapping):
        aux = {"aux": aux}
    for reserved in ("loss", "finite"):
        if reserved in aux:
            raise ValueError(f"loss_fn's aux dict must not use the key {reserved!r} (the step reports it itself)")
    return loss, dict(aux), new_buffers


def _call(fn: Callable, declared: frozenset[str], params: Any, batch: Any, buffers: Any, key: Any, train: bool) -> Any:
    extras: dict[str, Any] = {}
    if "buffers" in declared:
        extras["buffers"] = buffers
    if "key" in declared:
        extras["key"] = key
    if "train" in declared:
        extras["train"] = train
    return fn(params, batch, **extras)


def _check_buffers_declared(declared: frozenset[str], buffers: Any, fn: Callable) -> None:
    if buffers is not None and "buffers" not in declared:
        name = getattr(fn, "__name__", repr(fn))
        raise TypeError(
            f"the state holds buffers but {name}(params, batch, ...) does not declare a `buffers` keyword; "
            "declare it and return (loss, aux, new_buffers), or create the state without buffers"
        )


# -- precision --------------------------------------------------------------------------------


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")


def autocast(precision: str, params: Any) -> contextlib.AbstractContextManager:
    """The autocast context a step of ``precision`` runs its forward in, on the params' device type.

    ``"32"``: full precision; a caller's active autocast is switched off (one context, which
    ``torch.compile`` traces), and nothing is entered otherwise. ``"bf16"``/``"16-mixed"``:
    ``torch.autocast`` to bfloat16/float16.
    """
    _check_precision(precision)
    dtype = PRECISIONS[precision]
    if dtype is None:
        active = [d for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
        if not active:
            return contextlib.nullcontext()
        if len(active) == 1:
            return torch.autocast(active[0], enabled=False)
        return _both_autocasts_off()
    leaves = [x for x in _tree.leaves(params) if isinstance(x, torch.Tensor)]
    device_type = leaves[0].device.type if leaves else "cpu"
    return torch.autocast(device_type, dtype=dtype)


@contextlib.contextmanager
def _both_autocasts_off():
    with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
        yield


def _detached(x: Any) -> Any:
    if isinstance(x, dict) and not x:
        return {}
    return _tree.map(lambda t: t.detach() if isinstance(t, torch.Tensor) else torch.as_tensor(t), x)


def _cuda_devices(params: Any) -> list[torch.device]:
    return sorted({x.device for x in _tree.leaves(params) if isinstance(x, torch.Tensor) and x.device.type == "cuda"},
                  key=str)


def _rng_scope(declared: frozenset[str], key: Any, params: Any) -> contextlib.AbstractContextManager:
    """Seed torch's global RNG from ``key`` around a loss that takes one (eager mode; real keys only)."""
    if "key" not in declared or not isinstance(key, _random.Key) or key is _random.TRACING_KEY:
        return contextlib.nullcontext()
    return _random.rng_scope(key, _cuda_devices(params))


# -- 1. the gradient function -------------------------------------------------------------------


class GradResult(NamedTuple):
    """What a gradient function returns: ``(grads, loss, aux, buffers)``.

    Attributes:
        grads: the gradients, with the params' structure (unscaled, float32 master dtype).
        loss: the loss, a detached 0-dim float32 tensor on the device.
        aux: the loss function's aux dict (detached tensors).
        buffers: the buffers after the forward, or ``None`` when the loss takes none.
    """

    grads: Any
    loss: torch.Tensor
    aux: dict[str, Any]
    buffers: Any


def make_grad_fn(loss_fn: Callable, *, precision: str = "32") -> Callable[..., GradResult]:
    """Build ``grad_fn(params, batch, buffers=None, key=None, *, loss_scale=None) -> GradResult``.

    The first half of every training step (``jax.value_and_grad`` with fnnet's loss
    convention): the loss and its gradient with respect to ``params``, in the step's
    precision. The second half is :meth:`fnnet.TrainState.apply_gradients`.

    Args:
        loss_fn: see the module docstring for the calling convention.
        precision: ``"32"``, ``"bf16"`` (autocast to bfloat16) or ``"16-mixed"`` (float16
            autocast; pass ``loss_scale``). Gradients come back in the params' dtype.

    The returned function takes ``loss_scale=``, a :class:`DynamicScale`: the loss is
    multiplied by its scale before the backward pass and the gradients divided by it, so
    ``grads`` are always the true gradients (non-finite where float16 overflowed). And
    ``grad_hook=``, a function ``(leaf index, gradient) -> None`` called during the backward
    pass as each parameter's gradient becomes ready (eager mode; the index is the leaf's in
    ``fnnet.tree.leaves(params)`` order, the gradient still scaled by the loss scale): how the
    distributed step starts its all-reduces while the backward pass goes on. Eager
    calls differentiate with ``torch.autograd.grad`` on detached aliases of the params;
    inside ``torch.compile`` with ``torch.func.grad``, which traces without a graph break.
    Parameters the loss does not use get zero gradients. Nothing passed in is modified.
    """
    _check_precision(precision)
    declared = _declared(loss_fn)

    def objective(params: Any, batch: Any, buffers: Any, key: Any, scale: Any) -> tuple[torch.Tensor, dict]:
        with autocast(precision, params):
            loss, aux, new_buffers = _normalise(_call(loss_fn, declared, params, batch, buffers, key, True),
                                                "buffers" in declared)
        loss = loss.float()
        payload = {"loss": loss.detach(), "aux": _detached(aux)}
        if new_buffers is not None:
            payload["buffers"] = _detached(new_buffers)
        return (loss * scale if scale is not None else loss), payload

    def eager_grad(params: Any, batch: Any, buffers: Any, key: Any, scale: Any, hook: Any) -> tuple[Any, dict]:
        leaves, spec = _tree.flatten(params)
        trainable = [isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex()) for x in leaves]
        with torch.enable_grad():
            inputs = [x.detach().requires_grad_(True) if t else x for x, t in zip(leaves, trainable)]
            if hook is not None:
                for i, (x, t) in enumerate(zip(inputs, trainable)):
                    if t:
                        x.register_hook(lambda g, i=i: hook(i, g))
            target, payload = objective(_tree.unflatten(spec, inputs), batch, buffers, key, scale)
            wrt = [x for x, t in zip(inputs, trainable) if t]
            found = iter(torch.autograd.grad(target, wrt, allow_unused=True) if wrt else ())
        grads = []
        for x, t in zip(leaves, trainable):
            g = next(found) if t else None
            grads.append(torch.zeros_like(x) if g is None else g)  # unused or frozen params: zero gradient
        return _tree.unflatten(spec, grads), payload

    def grad_fn(params: Any, batch: Any, buffers: Any = None, key: Any = None, *,
                loss_scale: DynamicScale | None = None, grad_hook: Callable[[int, torch.Tensor], None] | None = None
                ) -> GradResult:
        _check_buffers_declared(declared, buffers, loss_fn)
        scale = loss_scale.scale if loss_scale is not None else None
        if torch.compiler.is_compiling():
            grads, payload = torch.func.grad(objective, has_aux=True)(params, batch, buffers, key, scale)
        else:
            with _rng_scope(declared, key, params):
                grads, payload = eager_grad(params, batch, buffers, key, scale, grad_hook)
        if scale is not None:
            grads = _tree.map(lambda g: g / scale.to(g.dtype), grads)
        return GradResult(grads, payload["loss"], payload["aux"], payload.get("buffers"))

    grad_fn.declared = declared  # type: ignore[attr-defined]
    grad_fn.loss_fn = loss_fn  # type: ignore[attr-defined]
    return grad_fn


# -- 2. the step: gradients, then the update ------------------------------------------------------


def make_train_step(
    loss_fn: Callable,
    optimizer: Any,
    *,
    jit: bool = False,
    donate: bool = False,
    precision: str = "32",
    compile_options: Mapping[str, Any] | None = None,
    skip_nonfinite: bool = False,
    devices: Any = None,
    distributed: bool = False,
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, torch.Tensor]]]:
    """Build the pure training step ``step(state, batch) -> (new_state, metrics)``.

    One call splits the state's key, computes the loss and its gradient
    (:func:`make_grad_fn`) and applies the update (:meth:`TrainState.apply_gradients`).
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
            scale shrinks). Master params and optimizer state stay in their own dtype.
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
    """
    if distributed:
        if devices is not None:
            raise ValueError("make_train_step: distributed=True runs one device per process; devices= does not apply")
        from .distributed import make_train_step as distributed_step

        return distributed_step(loss_fn, optimizer, jit=jit, donate=donate, precision=precision,
                                compile_options=compile_options, skip_nonfinite=skip_nonfinite)
    if devices is not None:
        from .parallel import make_train_step as parallel_step

        return parallel_step(loss_fn, optimizer, devices, jit=jit, donate=donate, precision=precision,
                             compile_options=compile_options, skip_nonfinite=skip_nonfinite)
    grad_fn, declared, scaled, checks = step_parts(loss_fn, precision=precision, skip_nonfinite=skip_nonfinite,
                                                   jit=jit, compile_options=compile_options)

    def inner(params, opt_state, buffers, loss_scale, batch, key):
        grads, loss, aux, new_buffers = grad_fn(params, batch, buffers, key, loss_scale=loss_scale)
        return step_update(optimizer, grads, loss, aux, params, opt_state, buffers=buffers, new_buffers=new_buffers,
                           loss_scale=loss_scale, check_finite=checks, donate=donate)

    compiled = compile_step(inner, compile_options) if jit else inner

    def step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, torch.Tensor]]:
        if not isinstance(state, TrainState):
            raise TypeError(f"step expects a TrainState as its first argument, got {type(state).__name__}")
        _check_buffers_declared(declared, state.buffers, loss_fn)
        next_key, step_key = split_step_key(state.key)
        loss_scale = loss_scale_for(state, scaled)
        if jit:
            # Inside torch.compile randomness comes from torch's RNG ops, seeded here from the key.
            with _rng_scope(declared, step_key, state.params):
                inner_key = _random.TRACING_KEY if step_key is not None else None
                out = compiled(state.params, state.opt_state, state.buffers, loss_scale, batch, inner_key)
        else:
            out = inner(state.params, state.opt_state, state.buffers, loss_scale, batch, step_key)
        params, opt_state, buffers, loss_scale, metrics = out
        return TrainState(params, opt_state, state.step + 1, buffers, next_key,
                          loss_scale if scaled else state.loss_scale), metrics

    step.jit = jit  # type: ignore[attr-defined]
    step.donate = donate  # type: ignore[attr-defined]
    step.precision = precision  # type: ignore[attr-defined]
    return step


class StepParts(NamedTuple):
    """What every training-step builder (one device, several, several processes) starts from."""

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


def _no_grad_step(fn: Callable, what: str, *, jit: bool, precision: str,
                  compile_options: Mapping[str, Any] | None) -> Callable[[TrainState, Any], Any]:
    """``step(state, batch) -> fn(params, batch, buffers)`` under ``no_grad`` and the precision's autocast."""
    _check_step_options(precision, jit, compile_options)

    def inner(params, buffers, batch):
        with torch.no_grad(), autocast(precision, params):
            return fn(params, batch, buffers)

    compiled = compile_step(inner, compile_options) if jit else inner

    def step(state: TrainState, batch: Any) -> Any:
        if not isinstance(state, TrainState):
            raise TypeError(f"{what} expects a TrainState as its first argument, got {type(state).__name__}")
        return compiled(state.params, state.buffers, batch)

    return step


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
        from .parallel import make_eval_step as parallel_step

        return parallel_step(loss_fn, devices, jit=jit, precision=precision, compile_options=compile_options)
    declared = _declared(loss_fn)

    def evaluate(params: Any, batch: Any, buffers: Any) -> dict[str, torch.Tensor]:
        _check_buffers_declared(declared, buffers, loss_fn)
        loss, aux, _ = _normalise(_call(loss_fn, declared, params, batch, buffers, None, False), "buffers" in declared)
        return {"loss": loss.float(), **aux}

    return _no_grad_step(evaluate, "eval_step", jit=jit, precision=precision, compile_options=compile_options)


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
        from .parallel import make_predict_step as parallel_step

        return parallel_step(predict_fn, devices, jit=jit, precision=precision, compile_options=compile_options)
    declared = _declared(predict_fn)

    def predict(params: Any, batch: Any, buffers: Any) -> Any:
        out = _call(predict_fn, declared, params, batch, buffers, None, False)
        return _tree.map(lambda t: t.float() if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16)
                         else t, out)

    return _no_grad_step(predict, "predict_step", jit=jit, precision=precision, compile_options=compile_options)


# -- the usual loss -----------------------------------------------------------------------------


def supervised_loss(model: Model, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *,
                    with_buffers: bool | None = None, return_outputs: bool = True) -> Callable:
    """The usual loss function for ``batch = (inputs, targets)``: ``loss(model(inputs), targets)``.

    Returns ``loss_fn(params, batch, *, buffers=None, key=None, train=True)`` that runs
    ``model.apply`` in train or eval mode and, with ``return_outputs``, reports the (detached)
    outputs and the targets as ``aux["outputs"]`` and ``aux["targets"]``, so a caller updates
    its metrics from what the step returns. ``with_buffers`` (default: whether the model has
    buffers) makes it take and return buffers (BatchNorm).
    """
    if not isinstance(model, Model):
        raise TypeError(f"supervised_loss expects an fnnet.Model (fnnet.functional(module)), got {type(model).__name__}")
    uses_buffers = bool(model.buffers) if with_buffers is None else with_buffers

    def _supervised(batch: Any) -> tuple[Any, Any]:
        x, y = split_batch(batch)
        if y is None:
            raise ValueError("supervised_loss needs batches with targets: (inputs, targets) or {'x': ..., 'y': ...}")
        return x, y

    def report(out: Any, y: Any) -> dict[str, Any] | None:
        return {"outputs": out, "targets": y} if return_outputs else None

    if uses_buffers:

        def loss_fn(params, batch, *, buffers=None, key=None, train=True):
            x, y = _supervised(batch)
            out, new_buffers = model.apply(params, x, buffers=buffers, train=train, key=key, return_buffers=True)
            return loss(out, y), report(out, y), new_buffers

    else:

        def loss_fn(params, batch, *, key=None, train=True):
            x, y = _supervised(batch)
            out = model.apply(params, x, train=train, key=key)
            value = loss(out, y)
            return (value, report(out, y)) if return_outputs else value

    loss_fn.__name__ = f"supervised_loss[{model.module_type}]"
    return loss_fn
