"""Models as pure functions over parameter dicts (``torch.func.functional_call``'s semantics).

``model = fnnet.functional(module)`` splits any ``nn.Module`` into data (``model.params``,
``model.buffers``: dicts keyed like ``module.state_dict()``; a tied weight appears once, under
its first name) and a weight-free function (``model.apply``). The module is copied to the
``meta`` device, so the function holds no weights, and nothing it does can change the caller's
tensors. The forward swaps the given tensors into the template's parameter and buffer slots
for the call, as ``torch.func.functional_call`` does (which fnnet calls under
``torch.compile``), with the slots resolved once instead of at every call.
"""

from __future__ import annotations

import copy
import threading
from typing import Any, Callable, Mapping

import torch
from torch import nn

from . import random as _random

__all__ = ["Model", "functional", "grad", "value_and_grad", "vmap", "jit"]

Params = dict[str, torch.Tensor]

_STOCHASTIC = (nn.modules.dropout._DropoutNd,)


def _meta_copy(module: nn.Module, train: bool) -> nn.Module:
    """A weight-free copy of ``module`` on the meta device, ties included.

    Every parameter and buffer is swapped for a meta tensor of its shape and dtype through
    ``deepcopy``'s memo, so no weights are copied and a tensor shared by two submodules (tied
    weights) stays shared in the copy (``module.to("meta")`` would untie it).
    """
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    template = copy.deepcopy(module, memo)
    template.train(train)
    return template


def _materialize(template: nn.Module, device: torch.device, params: Mapping[str, torch.Tensor],
                 buffers: Mapping[str, torch.Tensor]) -> nn.Module:
    """A real module on ``device`` holding copies of ``params`` and ``buffers`` (ties kept, as in :func:`_meta_copy`)."""
    memo: dict[int, Any] = {}
    for name, p in template.named_parameters():
        memo[id(p)] = nn.Parameter(params[name].detach().to(device, copy=True))
    for name, b in template.named_buffers():
        memo[id(b)] = buffers[name].detach().to(device, copy=True)
    return copy.deepcopy(template, memo)


def _slots(template: nn.Module) -> list[tuple[str, dict, str]]:
    """``(key, owner's _parameters or _buffers dict, attribute)`` for every tensor slot of ``template``.

    Tied tensors (one parameter under two names) get one slot per name, all keyed by the
    name ``named_parameters()`` reports (the ``state_dict`` key): ``functional_call``'s
    ``tie_weights=True``, resolved once instead of at every call.
    """
    key_of: dict[int, str] = {}
    out = []
    for store, named in (("_parameters", template.named_parameters(remove_duplicate=False)),
                         ("_buffers", template.named_buffers(remove_duplicate=False))):
        for path, tensor in named:
            prefix, _, attr = path.rpartition(".")
            key = key_of.setdefault(id(tensor), path)
            out.append((key, getattr(template.get_submodule(prefix), store), attr))
    return out


def _swapped_call(template: nn.Module, slots: list[tuple[str, dict, str]], tensors: Mapping[str, torch.Tensor],
                  args: tuple, kwargs: dict) -> Any:
    """``template(*args, **kwargs)`` with ``tensors`` in its parameter and buffer slots, then put back.

    What ``torch.func.functional_call`` does (it swaps the same dict entries), minus its
    per-call path resolution and tie analysis: the eager step's forward runs with less Python.
    """
    saved = []
    try:
        for key, store, attr in slots:
            saved.append((store, attr, store[attr]))
            store[attr] = tensors[key]
        return template(*args, **kwargs)
    finally:
        for store, attr, old in reversed(saved):
            store[attr] = old


def _check_tensor_dict(what: str, module_type: str, got: Any, shapes: Mapping[str, torch.Size]) -> None:
    """``got`` must be a dict with exactly ``shapes``' keys, holding tensors of those shapes."""
    if not isinstance(got, Mapping):
        raise TypeError(f"{what} must be a dict of tensors keyed like state_dict(), got {type(got).__name__}")
    if got.keys() != shapes.keys():
        missing, extra = sorted(shapes.keys() - got.keys()), sorted(got.keys() - shapes.keys())
        raise ValueError(f"{module_type} {what}: missing keys {missing}, unexpected keys {extra}")
    for name, shape in shapes.items():
        t = got[name]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}['{name}'] must be a tensor, got {type(t).__name__}")
        if t.shape != shape:
            raise ValueError(f"{what}['{name}'] has shape {tuple(t.shape)}, the module expects {tuple(shape)}")


class Model:
    """A pure function over parameters, made from an ``nn.Module`` by :func:`functional`.

    Attributes:
        params: ``dict[str, Tensor]`` of detached parameters, keyed like ``state_dict()``
            (a weight tied to several modules appears once, under the first name
            ``named_parameters()`` gives it; ``to_module`` restores the tie). Copies of the
            module's tensors, or the module's own storage with ``functional(module, copy=False)``.
        buffers: ``dict[str, Tensor]`` of buffers (BatchNorm running stats, ...), likewise.
        trainable: ``dict[str, bool]`` keyed like ``params``: ``False`` for the parameters
            that had ``requires_grad=False`` (frozen). ``apply`` detaches frozen parameters,
            so they get zero gradients and cost no backward work; use it as an optimizer mask
            (``optim.masked(opt, model.trainable)``) so that nothing, weight decay included,
            moves them (the ``Trainer`` does this).
        stochastic: whether the module holds dropout layers (then ``train=True`` needs a key).

    ``apply`` is the forward; ``init`` draws fresh parameters from a key.
    """

    def __init__(self, module: nn.Module, init_fn: Callable[[_random.Key, Params], Params] | None = None, *,
                 copy: bool = True):
        if not isinstance(module, nn.Module):
            raise TypeError(f"fnnet.functional expects a torch.nn.Module, got {type(module).__name__}")
        take = (lambda v: v.detach().clone()) if copy else (lambda v: v.detach())
        self.params: Params = {k: take(v) for k, v in module.named_parameters()}
        self.buffers: Params = {k: take(v) for k, v in module.named_buffers()}
        self.trainable: dict[str, bool] = {k: v.requires_grad for k, v in module.named_parameters()}
        self._frozen = [k for k, t in self.trainable.items() if not t]
        self._train_template = _meta_copy(module, True)
        self._eval_template = _meta_copy(module, False)
        # Plain attributes (not keyed by id) so deepcopy and pickle carry them with the templates.
        self._train_slots = _slots(self._train_template)
        self._eval_slots = _slots(self._eval_template)
        self._thread_templates: dict[int, tuple] = {}  # per-thread copies: the forward swaps slots
        self._owner = threading.get_ident()
        self._shapes = {k: v.shape for k, v in self.params.items()}
        self._buffer_shapes = {k: v.shape for k, v in self.buffers.items()}
        self._init_fn = init_fn
        self.stochastic = any(isinstance(m, _STOCHASTIC) for m in module.modules())
        self.module_type = type(module).__name__

    # -- the forward ---------------------------------------------------------------------
    def check_params(self, params: Any) -> None:
        """Raise ``TypeError``/``ValueError`` unless ``params`` is a dict with this model's keys and shapes."""
        _check_tensor_dict("params", self.module_type, params, self._shapes)

    def check_buffers(self, buffers: Any) -> None:
        """Raise ``TypeError``/``ValueError`` unless ``buffers`` has this model's buffer keys and shapes."""
        _check_tensor_dict("buffers", self.module_type, buffers, self._buffer_shapes)

    def apply(
        self,
        params: Mapping[str, torch.Tensor],
        *args: Any,
        buffers: Mapping[str, torch.Tensor] | None = None,
        train: bool = False,
        key: _random.Key | None = None,
        return_buffers: bool = False,
        **kwargs: Any,
    ) -> Any:
        """The module's forward with ``params``: ``module(*args, **kwargs)`` as a pure function.

        Args:
            params: parameters keyed like ``state_dict()`` (``model.params`` or a trained copy).
            *args, **kwargs: the module's forward inputs.
            buffers: buffer values; defaults to ``model.buffers``.
            train: training mode (dropout active, BatchNorm uses and updates batch statistics).
                Eval mode by default, unlike ``nn.Module``: randomness is never implicit.
            key: an :class:`fnnet.random.Key`. With ``train=True`` the forward runs under it
                (:func:`fnnet.random.rng_scope`): every draw from torch's global RNG (dropout
                layers, ``F.dropout``, ``nn.RReLU``, ``torch.rand``) comes from the key, and the
                caller's RNG state is restored afterwards.
            return_buffers: also return the buffers after the forward, as
                ``(outputs, new_buffers)``. BatchNorm's running stats (and anything else the
                forward writes into a buffer) come back in the returned dict.

        Returns:
            The module's outputs, or ``(outputs, new_buffers)`` with ``return_buffers=True``.

        Raises:
            ValueError: ``train=True`` without a key for a module that draws randomness (a
                dropout layer, or, found after the forward, any draw from torch's global RNG;
                the global state is then restored); or a forward that wrote in place into a
                tensor passed in (params, or buffers outside train mode and without
                ``return_buffers``), found through the tensors' version counters, naming the
                key. fnnet models never change the tensors they are given: buffers that
                change go through ``return_buffers=True``.
        """
        self.check_params(params)
        if train and self.stochastic and key is None:
            raise ValueError(self._needs_key("has dropout layers"))
        bufs = self.buffers if buffers is None else buffers
        if buffers is not None:
            self.check_buffers(buffers)
        if train or return_buffers:
            # The forward may write into buffers (BatchNorm's running stats): give it copies, so
            # the caller's stay untouched and the new values come back with return_buffers.
            bufs = {k: v.clone() for k, v in bufs.items()}
        if self._frozen:
            params = {k: (v.detach() if not self.trainable[k] else v) for k, v in params.items()}
        tensors = {**params, **bufs}
        if torch.compiler.is_compiling():  # dynamo traces torch.func.functional_call natively
            template = self._train_template if train else self._eval_template
            out = torch.func.functional_call(template, tensors, args, kwargs, tie_weights=True, strict=True)
        else:
            template, slots = self._template(train)
            watched = {**params, **({} if (train or return_buffers) else bufs)}
            versions = [t._version for t in watched.values()]
            if train and key is not None:
                devices = sorted({t.device for t in params.values() if t.device.type == "cuda"}, key=str)
                with _random.rng_scope(key, devices):
                    out = _swapped_call(template, slots, tensors, args, kwargs)
            elif train:
                out = self._call_checking_rng(template, slots, tensors, args, kwargs)
            else:
                out = _swapped_call(template, slots, tensors, args, kwargs)
            for (name, t), before in zip(watched.items(), versions):
                if t._version != before:
                    kind = "params" if name in params else "buffers"
                    raise ValueError(
                        f"{self.module_type}'s forward wrote in place into {kind}['{name}'] (the tensor passed to "
                        "Model.apply has been changed). fnnet models are pure functions of their inputs: compute "
                        "new values out of place (w = w.clamp(...) instead of w.clamp_(...)), and keep state that "
                        "the forward updates in a buffer, read back with apply(..., return_buffers=True)"
                    )
        if return_buffers:
            return out, dict(bufs)
        return out

    __call__ = apply

    def _template(self, train: bool) -> tuple[nn.Module, list]:
        """The meta template (and its slots) this thread swaps tensors into.

        A forward swaps the given tensors into the template's slots for the duration of the
        call, so two threads must never share a template: every thread but the one that made
        the model gets its own copy (meta tensors, no weights), made on its first call.
        """
        ident = threading.get_ident()
        if ident == self._owner:
            return (self._train_template, self._train_slots) if train else (self._eval_template, self._eval_slots)
        mine = self._thread_templates.get(ident)
        if mine is None:
            train_t, eval_t = copy.deepcopy(self._train_template), copy.deepcopy(self._eval_template)
            mine = self._thread_templates[ident] = (train_t, _slots(train_t), eval_t, _slots(eval_t))
        return (mine[0], mine[1]) if train else (mine[2], mine[3])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_thread_templates"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._owner = threading.get_ident()

    def _needs_key(self, why: str) -> str:
        return (f"{self.module_type} {why}: apply(..., train=True) needs key=fnnet.random.key(...) "
                "(fnnet never draws from torch's global RNG implicitly)")

    def _call_checking_rng(self, template: nn.Module, slots: Any, tensors: Mapping[str, torch.Tensor],
                           args: tuple, kwargs: dict) -> Any:
        """The train-mode forward without a key: an error if it drew from torch's global RNG."""
        devices = sorted({t.device for t in tensors.values() if t.device.type == "cuda"}, key=str)
        before = _rng_states(devices)
        out = _swapped_call(template, slots, tensors, args, kwargs)
        after = _rng_states(devices)
        if any(not torch.equal(a, b) for a, b in zip(before, after)):
            _restore_rng_states(devices, before)
            raise ValueError(self._needs_key("drew random numbers from torch's global RNG in its forward "
                                             "(F.dropout, nn.RReLU, torch.rand, ...)"))
        return out

    # -- initialisation ------------------------------------------------------------------
    def init(self, key: _random.Key, *, device: torch.device | str | None = None) -> Params:
        """Fresh parameters drawn under ``key``: the same key gives the same params.

        Runs ``init_fn(key, params)`` when one was given to :func:`functional`; otherwise
        re-runs ``reset_parameters()`` of every submodule that has one (what ``nn.Linear``,
        ``nn.Conv2d``, ``nn.BatchNorm2d``... do in their constructors), under the key.
        Parameters owned by modules without ``reset_parameters`` keep their current values:
        pass ``init_fn`` for those. ``model.params`` is not changed.
        """
        if not isinstance(key, _random.Key):
            raise TypeError(f"init expects an fnnet.random.Key, got {type(key).__name__}")
        dev = torch.device(device) if device is not None else next(
            (p.device for p in self.params.values()), torch.device("cpu")
        )
        if self._init_fn is not None:
            return dict(self._init_fn(key, {k: v.to(dev) for k, v in self.params.items()}))
        module = _materialize(self._eval_template, dev, self.params, self.buffers)
        with _random.rng_scope(key, [dev]), torch.no_grad():
            for m in module.modules():
                reset = getattr(m, "reset_parameters", None)
                if callable(reset):
                    reset()
        return {k: v.detach() for k, v in module.named_parameters()}

    def to_module(self, params: Mapping[str, torch.Tensor] | None = None,
                  buffers: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
        """A real ``nn.Module`` holding ``params`` (default ``model.params``): the way back to torch."""
        params = self.params if params is None else params
        buffers = self.buffers if buffers is None else buffers
        self.check_params(params)
        self.check_buffers(buffers)
        dev = next((p.device for p in params.values()), torch.device("cpu"))
        return _materialize(self._eval_template, dev, params, buffers)

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.params.values())
        return f"fnnet.Model({self.module_type}, {len(self.params)} params tensors, {n} parameters)"


def _rng_states(devices: list[torch.device]) -> list[torch.Tensor]:
    """The global RNG states of the CPU and of ``devices`` (CUDA)."""
    return [torch.random.get_rng_state()] + [torch.cuda.get_rng_state(d) for d in devices]


def _restore_rng_states(devices: list[torch.device], states: list[torch.Tensor]) -> None:
    torch.random.set_rng_state(states[0])
    for d, st in zip(devices, states[1:]):
        torch.cuda.set_rng_state(st, d)


def functional(module: nn.Module, *, init_fn: Callable[[_random.Key, Params], Params] | None = None,
               copy: bool = True) -> Model:
    """Turn any ``nn.Module`` into a pure :class:`Model` (``model.params``, ``model.apply``).

    ``init_fn(key, params) -> params``, if given, is what :meth:`Model.init` runs. With
    ``copy=True`` (default) ``model.params`` and ``model.buffers`` are copies: nothing done
    with the model touches the module. ``copy=False`` makes them detached aliases of the
    module's own tensors (no second copy of the weights): then a donated step that updates
    them in place trains the module too. A :class:`Model` passed in is returned as is.
    """
    if isinstance(module, Model):
        return module
    return Model(module, init_fn=init_fn, copy=copy)


# -- transforms, JAX spelling -------------------------------------------------------------
def grad(fn: Callable, argnums: int | tuple[int, ...] = 0, has_aux: bool = False) -> Callable:
    """Gradient of a scalar function (``jax.grad``; ``torch.func.grad``). Works over dicts/trees."""
    return torch.func.grad(fn, argnums=argnums, has_aux=has_aux)


def value_and_grad(fn: Callable, argnums: int | tuple[int, ...] = 0, has_aux: bool = False) -> Callable:
    """``jax.value_and_grad``: returns ``(value, grads)``, or ``((value, aux), grads)`` with ``has_aux``.

    (``torch.func.grad_and_value`` returns the pair the other way round.)
    """
    inner = torch.func.grad_and_value(fn, argnums=argnums, has_aux=has_aux)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        g, v = inner(*args, **kwargs)
        return v, g

    return wrapped


def vmap(fn: Callable, in_dims: Any = 0, out_dims: Any = 0, randomness: str = "error",
         chunk_size: int | None = None) -> Callable:
    """Vectorising map (``jax.vmap``; ``torch.func.vmap``)."""
    return torch.func.vmap(fn, in_dims=in_dims, out_dims=out_dims, randomness=randomness, chunk_size=chunk_size)


def jit(fn: Callable | None = None, **compile_kwargs: Any) -> Callable:
    """Opt-in compilation (``jax.jit`` in spirit): a thin wrapper over ``torch.compile``.

    Unlike ``jax.jit`` it does not require purity or static shapes: torch.compile guards on
    shapes and dtypes and recompiles when they change. Keyword arguments go to
    ``torch.compile`` (``mode="reduce-overhead"`` for CUDA graphs, ``dynamic=...``, ...),
    through :func:`fnnet.compiler.compile` (which adds fnnet's CPU pass for skinny matmuls).
    """
    from .compiler import compile as _compile

    if fn is None:
        return lambda f: _compile(f, **compile_kwargs)
    return _compile(fn, **compile_kwargs)
