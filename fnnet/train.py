"""The functional training core: ``TrainState`` and the pure step ``(state, batch) -> (state, metrics)``.

Everything that trains in fnnet (a user's own loop, the ``Trainer``, data parallelism)
drives a step built here::

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
  ``state.key`` (``None`` when the state has no key).
* ``train=`` -- ``True`` in the train step, ``False`` in the eval step.

A state that holds buffers needs a loss function that declares ``buffers``; anything else
is a ``TypeError`` naming what is missing. :func:`supervised_loss` builds the usual one from a
:class:`fnnet.Model` and ``loss(outputs, targets)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
from typing import Any, Callable, Mapping

import torch

from . import compiler as _compiler
from . import random as _random
from . import tree as _tree
from .functional import Model
from .optim._foreach import tree_device

__all__ = [
    "TrainState",
    "DynamicScale",
    "make_train_step",
    "make_eval_step",
    "supervised_loss",
    "split_batch",
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


@_tree.register_dataclass(static=("period", "factor", "min_scale"))
@dataclasses.dataclass(frozen=True)
class DynamicScale:
    """Dynamic loss scaling for float16 training, as explicit state (JAX's ``jmp.DynamicLossScale``).

    The loss is multiplied by ``scale`` before the backward pass and the gradients divided by
    it. When any gradient is non-finite the update is skipped and ``scale`` is divided by
    ``factor`` (not below ``min_scale``); after ``period`` consecutive finite steps it is
    multiplied by ``factor``. ``scale`` and ``good_steps`` are tensors on the params' device,
    so none of this waits for the device.
    """

    scale: torch.Tensor
    good_steps: torch.Tensor
    period: int = 2000
    factor: float = 2.0
    min_scale: float = 1.0

    @classmethod
    def create(cls, device: torch.device | str = "cpu", *, initial_scale: float = 2.0**15, period: int = 2000,
               factor: float = 2.0, min_scale: float = 1.0) -> "DynamicScale":
        if not (initial_scale > 0 and math.isfinite(initial_scale)):
            raise ValueError(f"initial_scale must be a positive finite number, got {initial_scale}")
        if period < 1 or factor <= 1.0:
            raise ValueError(f"need period >= 1 and factor > 1, got period={period}, factor={factor}")
        dev = torch.device(device)
        return cls(
            torch.tensor(float(initial_scale), dtype=torch.float32, device=dev),
            torch.zeros((), dtype=torch.int64, device=dev),
            period,
            factor,
            min_scale,
        )

    def adjust(self, finite: torch.Tensor) -> "DynamicScale":
        """The next scale after a step whose gradients were all finite (``finite``) or not."""
        good = torch.where(finite, self.good_steps + 1, torch.zeros_like(self.good_steps))
        grow = good >= self.period
        scale = torch.where(
            finite,
            torch.where(grow, self.scale * self.factor, self.scale),
            torch.clamp(self.scale / self.factor, min=self.min_scale),
        )
        good = torch.where(grow, torch.zeros_like(good), good)
        return dataclasses.replace(self, scale=scale, good_steps=good)


@_tree.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a training run changes, as one pytree (``flax.training.train_state.TrainState``).

    Attributes:
        params: the parameters (a dict of tensors, or any pytree).
        opt_state: the optimizer's state (``optimizer.init(params)``).
        step: how many times the training step ran (a Python int, so reading it never syncs;
            float16 steps skipped for overflow count too, the optimizer's own count does not).
        buffers: non-trainable model state (BatchNorm running stats) or ``None``.
        key: an :class:`fnnet.random.Key` split once per step for dropout, or ``None``.
        loss_scale: a :class:`DynamicScale` for float16 training, or ``None``.

    States are immutable: ``state.replace(params=...)`` returns a new one.
    """

    params: Any
    opt_state: Any
    step: int = 0
    buffers: Any = None
    key: Any = None
    loss_scale: Any = None

    @classmethod
    def create(cls, params: Any, optimizer: Any, *, buffers: Any = None, key: _random.Key | None = None,
               loss_scale: DynamicScale | None = None) -> "TrainState":
        """A fresh state: ``opt_state = optimizer.init(params)``, ``step = 0``.

        Args:
            params: parameters (e.g. ``model.params``), already on the device to train on.
            optimizer: an ``fnnet.optim`` ``GradientTransformation``.
            buffers: model buffers (e.g. ``model.buffers``) when the model has any that train.
            key: a random key when the loss uses dropout or other randomness.
            loss_scale: a :class:`DynamicScale` for ``precision="16-mixed"`` (the step makes one
                itself if this is ``None``).
        """
        if not hasattr(optimizer, "init") or not hasattr(optimizer, "update"):
            raise TypeError(f"optimizer must be an fnnet.optim GradientTransformation, got {type(optimizer).__name__}")
        if key is not None and not isinstance(key, _random.Key):
            raise TypeError(f"key must be an fnnet.random.Key (fnnet.random.key(seed)), got {type(key).__name__}")
        return cls(params, optimizer.init(params), 0, buffers, key, loss_scale)

    def replace(self, **changes: Any) -> "TrainState":
        """A copy with some fields replaced (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)


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
    if "loss" in aux:
        raise ValueError("loss_fn's aux dict must not use the key 'loss' (the step reports the loss itself)")
    return loss, dict(aux), new_buffers


def _call_loss(loss_fn: Callable, declared: frozenset[str], params: Any, batch: Any, buffers: Any,
               key: Any, train: bool) -> tuple[torch.Tensor, dict[str, Any], Any]:
    extras: dict[str, Any] = {}
    if "buffers" in declared:
        extras["buffers"] = buffers
    if "key" in declared:
        extras["key"] = key
    if "train" in declared:
        extras["train"] = train
    return _normalise(loss_fn(params, batch, **extras), "buffers" in declared)


def _check_signature(declared: frozenset[str], state: TrainState, loss_fn: Callable) -> None:
    if state.buffers is not None and "buffers" not in declared:
        name = getattr(loss_fn, "__name__", repr(loss_fn))
        raise TypeError(
            f"the state holds buffers but {name}(params, batch, ...) does not declare a `buffers` keyword; "
            "declare it and return (loss, aux, new_buffers), or create the state without buffers"
        )


def _autocast(precision: str, params: Any):
    dtype = PRECISIONS[precision]
    if dtype is None:
        # Full precision: switch a caller's autocast off if one is active, else enter nothing
        # (a single context either way, which torch.compile traces).
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


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")


def _all_finite(grads: Any) -> torch.Tensor:
    leaves = [g for g in _tree.leaves(grads) if isinstance(g, torch.Tensor)]
    if not leaves:
        return torch.tensor(True)
    return torch.stack([torch.isfinite(g).all() for g in leaves]).all()


def _select(pred: torch.Tensor, new: Any, old: Any) -> Any:
    return _tree.map(lambda a, b: torch.where(pred, a, b) if isinstance(a, torch.Tensor) else a, new, old)


def _detached(x: Any) -> Any:
    if isinstance(x, dict) and not x:
        return {}
    return _tree.map(lambda t: t.detach() if isinstance(t, torch.Tensor) else torch.as_tensor(t), x)


def _grad_fn(loss_fn: Callable, declared: frozenset[str], precision: str, scaled: bool, jit: bool) -> Callable:
    """``(params, batch, buffers, key, scale) -> (grads, (loss, aux, new_buffers))``.

    Compiled steps use ``torch.func.grad``, which (unlike ``torch.autograd.grad``) traces into
    ``torch.compile`` without a graph break; its aux output must hold tensors only, so ``None``
    entries are left out and Python numbers in ``aux`` become tensors. Eager steps run the same
    objective through ``torch.autograd.grad`` on detached aliases of the parameters: the same
    math with less per-call Python than functorch's wrappers, which matters for small models.
    """

    def objective(params, batch, buffers, key, scale):
        with _autocast(precision, params):
            loss, aux, new_buffers = _call_loss(loss_fn, declared, params, batch, buffers, key, True)
        loss = loss.float()
        payload = {"loss": loss.detach(), "aux": _detached(aux)}
        if new_buffers is not None:
            payload["buffers"] = _detached(new_buffers)
        return (loss * scale if scaled else loss), payload

    if jit:
        grad = torch.func.grad(objective, has_aux=True)
    else:

        def grad(params, batch, buffers, key, scale):
            leaves, spec = _tree.flatten(params)
            trainable = [isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex()) for x in leaves]
            with torch.enable_grad():
                inputs = [x.detach().requires_grad_(True) if t else x for x, t in zip(leaves, trainable)]
                target, payload = objective(_tree.unflatten(spec, inputs), batch, buffers, key, scale)
                wrt = [x for x, t in zip(inputs, trainable) if t]
                found = torch.autograd.grad(target, wrt, allow_unused=True) if wrt else ()
            found = iter(found)
            grads = []
            for x, t in zip(leaves, trainable):
                g = next(found) if t else None
                grads.append(torch.zeros_like(x) if g is None else g)  # unused params: zero gradient
            return _tree.unflatten(spec, grads), payload

    def run(params, batch, buffers, key, scale):
        grads, payload = grad(params, batch, buffers, key, scale)
        return grads, (payload["loss"], payload["aux"], payload.get("buffers"))

    return run


def make_train_step(
    loss_fn: Callable,
    optimizer: Any,
    *,
    jit: bool = False,
    donate: bool = False,
    precision: str = "32",
    compile_options: Mapping[str, Any] | None = None,
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, torch.Tensor]]]:
    """Build the pure training step ``step(state, batch) -> (new_state, metrics)``.

    One call computes the loss and its gradient (``torch.func.grad`` over ``loss_fn``), runs
    the optimizer's ``update`` and applies it, splits the state's key and counts the step.
    ``metrics`` holds ``"loss"`` (a 0-dim float32 tensor on the device, never synced to the
    host: a non-finite loss shows up there, and stopping on it is the caller's call) and the
    loss function's aux dict.

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
    """
    _check_precision(precision)
    if compile_options and not jit:
        raise ValueError("compile_options only apply with jit=True")
    declared = _declared(loss_fn)
    scaled = PRECISIONS[precision] is torch.float16
    grad_fn = _grad_fn(loss_fn, declared, precision, scaled, jit)
    # A loss-scaled step may have to be undone: it cannot update its inputs in place.
    donate_update = donate and not scaled

    def inner(params, opt_state, buffers, loss_scale, batch, key):
        scale = loss_scale.scale if scaled else None
        grads, (loss, aux, new_buffers) = grad_fn(params, batch, buffers, key, scale)
        if scaled:
            grads = _tree.map(lambda g: g / scale.to(g.dtype), grads)
        updates, new_opt_state = optimizer.update(grads, opt_state, params, donate=donate_update)
        new_params = _apply(params, updates, donate_update)
        if scaled:
            finite = _all_finite(grads)
            new_params = _select(finite, new_params, params)
            new_opt_state = _select(finite, new_opt_state, opt_state)
            loss_scale = loss_scale.adjust(finite)
        if new_buffers is None:
            new_buffers = buffers
        return new_params, new_opt_state, new_buffers, loss_scale, {"loss": loss, **aux}

    compiled = _compile_step(inner, compile_options) if jit else inner

    def step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, torch.Tensor]]:
        if not isinstance(state, TrainState):
            raise TypeError(f"step expects a TrainState as its first argument, got {type(state).__name__}")
        _check_signature(declared, state, loss_fn)
        loss_scale = state.loss_scale
        if scaled and loss_scale is None:
            loss_scale = DynamicScale.create(tree_device(state.params))
        if state.key is not None:
            next_key, step_key = _random.split(state.key)
        else:
            next_key, step_key = None, None
        inner_key = _random.TRACING_KEY if (jit and step_key is not None) else step_key
        # Randomness inside the step (dropout) is seeded from the step's key; a loss that takes
        # no key draws none, and then torch's RNG is not touched at all.
        scope_key = step_key if "key" in declared else None
        with _random.rng_scope(scope_key, _cuda_devices(state.params) if scope_key is not None else ()):
            params, opt_state, buffers, loss_scale, metrics = compiled(
                state.params, state.opt_state, state.buffers, loss_scale, batch, inner_key
            )
        new_state = TrainState(params, opt_state, state.step + 1, buffers, next_key,
                               loss_scale if scaled else state.loss_scale)
        return new_state, metrics

    step.jit = jit  # type: ignore[attr-defined]
    step.donate = donate  # type: ignore[attr-defined]
    step.precision = precision  # type: ignore[attr-defined]
    return step


def _compile_step(fn: Callable, compile_options: Mapping[str, Any] | None) -> Callable:
    """``fn`` through :func:`fnnet.compiler.compile`, shapes specialised unless the options say otherwise."""
    return _compiler.compile(fn, **{"dynamic": False, **dict(compile_options or {})})


def _apply(params: Any, updates: Any, donate: bool) -> Any:
    from .optim import apply_updates

    return apply_updates(params, updates, donate=donate)


def _cuda_devices(params: Any) -> list[torch.device]:
    dev = tree_device(params)
    return [dev] if dev.type == "cuda" else []


def make_eval_step(
    loss_fn: Callable, *, jit: bool = False, precision: str = "32", compile_options: Mapping[str, Any] | None = None
) -> Callable[[TrainState, Any], dict[str, torch.Tensor]]:
    """Build ``eval_step(state, batch) -> metrics``: the loss (and aux) with no update.

    ``loss_fn`` is called with ``train=False`` (if it declares ``train``), the state's
    buffers (if it declares ``buffers``; any new buffers it returns are ignored) and
    ``key=None``. Runs under ``torch.no_grad``.
    """
    _check_precision(precision)
    if compile_options and not jit:
        raise ValueError("compile_options only apply with jit=True")
    declared = _declared(loss_fn)

    def inner(params, buffers, batch):
        with torch.no_grad(), _autocast(precision, params):
            loss, aux, _ = _call_loss(loss_fn, declared, params, batch, buffers, None, False)
        return {"loss": loss.float(), **aux}

    compiled = _compile_step(inner, compile_options) if jit else inner

    def eval_step(state: TrainState, batch: Any) -> dict[str, torch.Tensor]:
        if not isinstance(state, TrainState):
            raise TypeError(f"eval_step expects a TrainState as its first argument, got {type(state).__name__}")
        _check_signature(declared, state, loss_fn)
        return compiled(state.params, state.buffers, batch)

    return eval_step


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a supervised batch: ``(x, y)``, ``[x, y]`` or ``{"x": ..., "y": ...}``.

    A batch of inputs alone (a tensor, a 1-tuple, a dict without ``"y"``) gives ``targets=None``.
    Anything else is a ``ValueError`` saying which forms are accepted.
    """
    if isinstance(batch, Mapping):
        if "x" not in batch:
            raise ValueError(f"a dict batch needs keys 'x' (and 'y' for training), got {sorted(batch)}")
        return batch["x"], batch.get("y")
    if isinstance(batch, (tuple, list)):
        if len(batch) in (1, 2):
            return batch[0], (batch[1] if len(batch) == 2 else None)
        raise ValueError(f"a batch is (inputs, targets), (inputs,) or {{'x': ..., 'y': ...}}; got a {type(batch).__name__} of length {len(batch)}")
    if isinstance(batch, torch.Tensor):
        return batch, None
    raise ValueError(f"a batch is (inputs, targets), (inputs,), a tensor or {{'x': ..., 'y': ...}}; got {type(batch).__name__}")


def supervised_loss(model: Model, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *,
                    with_buffers: bool | None = None, return_outputs: bool = True) -> Callable:
    """The usual loss function for ``batch = (inputs, targets)``: ``loss(model(inputs), targets)``.

    Returns ``loss_fn(params, batch, *, buffers=None, key=None, train=True)`` that runs
    ``model.apply`` in train or eval mode and, with ``return_outputs``, reports the (detached)
    outputs as ``aux["outputs"]`` so a caller can update metrics. ``with_buffers`` (default:
    whether the model has buffers) makes it take and return buffers (BatchNorm).
    """
    if not isinstance(model, Model):
        raise TypeError(f"supervised_loss expects an fnnet.Model (fnnet.functional(module)), got {type(model).__name__}")
    uses_buffers = bool(model.buffers) if with_buffers is None else with_buffers

    def _supervised(batch: Any) -> tuple[Any, Any]:
        x, y = split_batch(batch)
        if y is None:
            raise ValueError("supervised_loss needs batches with targets: (inputs, targets) or {'x': ..., 'y': ...}")
        return x, y

    if uses_buffers:

        def loss_fn(params, batch, *, buffers=None, key=None, train=True):
            x, y = _supervised(batch)
            out, new_buffers = model.apply(params, x, buffers=buffers, train=train, key=key, return_buffers=True)
            value = loss(out, y)
            return value, ({"outputs": out} if return_outputs else None), new_buffers

    else:

        def loss_fn(params, batch, *, key=None, train=True):
            x, y = _supervised(batch)
            out = model.apply(params, x, train=train, key=key)
            value = loss(out, y)
            return (value, {"outputs": out}) if return_outputs else value

    loss_fn.__name__ = f"supervised_loss[{model.module_type}]"
    return loss_fn
