"""The loss function's calling convention and its gradient: :func:`make_grad_fn`, the first half of every step.

``grads, loss, aux, buffers = make_grad_fn(loss_fn)(params, batch, buffers, key)`` is
``jax.value_and_grad`` with fnnet's loss convention and the step's precision; the second
half, the update, is :meth:`fnnet.TrainState.apply_gradients`. :mod:`fnnet.step` composes them.

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

from . import random as _random
from . import tree as _tree
from ._functional import Model
from .batch import split_batch
from .precision import POLICIES, Precision
from .state import DynamicScale

__all__ = ["GradResult", "make_grad_fn", "supervised_loss", "cross_entropy", "autocast", "PRECISIONS"]

PRECISIONS = {name: policy.compute_dtype for name, policy in POLICIES.items()}
"""The named precisions and their autocast dtypes (``None``: none); the policies are :data:`fnnet.precision.POLICIES`."""


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
    for reserved in ("loss", "finite", "batch_loss", "updated"):
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


def _check_precision(precision: "str | Precision") -> Precision:
    """The policy ``precision`` names (a ``ValueError`` listing the names otherwise)."""
    return Precision.resolve(precision)


def autocast(precision: "str | Precision", params: Any) -> contextlib.AbstractContextManager:
    """The autocast context a step of ``precision`` runs its forward in, on the params' device type.

    ``"32"``: full precision; a caller's active autocast is switched off (one context, which
    ``torch.compile`` traces), and nothing is entered otherwise. ``"bf16"``/``"16-mixed"``:
    ``torch.autocast`` to bfloat16/float16. A :class:`fnnet.Precision`: its ``compute_dtype``
    (:meth:`fnnet.Precision.autocast`).
    """
    return Precision.resolve(precision).autocast(params)


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


def make_grad_fn(loss_fn: Callable, *, precision: "str | Precision" = "32") -> Callable[..., GradResult]:
    """Build ``grad_fn(params, batch, buffers=None, key=None, *, loss_scale=None) -> GradResult``.

    The first half of every training step (``jax.value_and_grad`` with fnnet's loss
    convention): the loss and its gradient with respect to ``params``, in the step's
    precision. The second half is :meth:`fnnet.TrainState.apply_gradients`.

    Args:
        loss_fn: see the module docstring for the calling convention.
        precision: ``"32"``, ``"bf16"`` (autocast to bfloat16) or ``"16-mixed"`` (float16
            autocast; pass ``loss_scale``), or an :class:`fnnet.Precision` (its
            ``compute_dtype``). Gradients come back in the params' dtype.

    The returned function takes ``loss_scale=``, a :class:`DynamicScale`: the loss is
    multiplied by its scale before the backward pass and the gradients divided by it, so
    ``grads`` are always the true gradients (non-finite where float16 overflowed). And
    ``grad_hook=``, a function ``(leaf index, gradient) -> None`` called during the backward
    pass as each parameter's gradient becomes ready (eager mode; the index is the leaf's in
    ``fnnet.tree.leaves(params)`` order, the gradient still scaled by the loss scale): how the
    distributed step starts its all-reduces while the backward pass goes on. ``unscale=False``
    returns the gradients of the scaled loss (an accumulating step unscales its window's sum
    once). Eager
    calls differentiate with ``torch.autograd.grad`` on detached aliases of the params;
    inside ``torch.compile`` with ``torch.func.grad``, which traces without a graph break.
    Parameters the loss does not use get zero gradients. Nothing passed in is modified.
    """
    policy = _check_precision(precision)
    declared = _declared(loss_fn)

    def objective(params: Any, batch: Any, buffers: Any, key: Any, scale: Any) -> tuple[torch.Tensor, dict]:
        batch = policy.cast_inputs(batch)  # under 16-bit params, float inputs in their dtype
        with policy.autocast(params):
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
                loss_scale: DynamicScale | None = None, grad_hook: Callable[[int, torch.Tensor], None] | None = None,
                unscale: bool = True) -> GradResult:
        _check_buffers_declared(declared, buffers, loss_fn)
        scale = loss_scale.scale if loss_scale is not None else None
        if torch.compiler.is_compiling():
            grads, payload = torch.func.grad(objective, has_aux=True)(params, batch, buffers, key, scale)
        else:
            with _rng_scope(declared, key, params):
                grads, payload = eager_grad(params, batch, buffers, key, scale, grad_hook)
        if scale is not None and unscale:
            grads = _tree.map(lambda g: g / scale.to(g.dtype), grads)
        return GradResult(grads, payload["loss"], payload["aux"], payload.get("buffers"))

    grad_fn.declared = declared  # type: ignore[attr-defined]
    grad_fn.loss_fn = loss_fn  # type: ignore[attr-defined]
    return grad_fn


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


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100) -> torch.Tensor:
    """The mean cross-entropy of every position: ``logits (..., V)`` against integer ``targets (...)``.

    A language model's loss: ``(B, T, V)`` logits and ``(B, T)`` targets give the mean over all
    ``B * T`` tokens, ``F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))`` (nanoGPT's
    line; equal to ``optax.softmax_cross_entropy_with_integer_labels(...).mean()``). With ``(B, V)``
    and ``(B,)`` it is ``F.cross_entropy``. Targets equal to ``ignore_index`` count for nothing.
    Use it as a Trainer loss: ``Trainer(gpt, fnnet.loss.cross_entropy, ...)``.

    Raises:
        ValueError: ``targets``' shape is not ``logits``' without the last dimension.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"cross_entropy: logits {tuple(logits.shape)} need targets of shape "
                         f"{tuple(logits.shape[:-1])} (logits without the class dimension), got {tuple(targets.shape)}")
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=ignore_index)


# Package-internal names (not in __all__) for the step skeleton, fnnet.step, which calls a loss function
# the way make_grad_fn does: the convention lives here, once.
declared_keywords = _declared
normalise_output = _normalise
call_loss = _call
check_buffers_declared = _check_buffers_declared
check_precision = _check_precision
rng_scope = _rng_scope
