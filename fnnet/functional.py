"""Models as pure functions over parameter dicts, through ``torch.func.functional_call``.

``model = fnnet.functional(module)`` splits any ``nn.Module`` into data (``model.params``,
``model.buffers``: dicts keyed exactly like ``module.state_dict()``) and a weight-free
function (``model.apply``). The module is copied to the ``meta`` device, so the function
holds no weights, and nothing it does can change the caller's tensors.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Mapping

import torch
from torch import nn

from . import random as _random

__all__ = ["Model", "functional", "grad", "value_and_grad", "vmap", "jit"]

Params = dict[str, torch.Tensor]

_STOCHASTIC = (nn.modules.dropout._DropoutNd,)


def _meta_copy(module: nn.Module, train: bool) -> nn.Module:
    template = copy.deepcopy(module).to("meta")
    template.train(train)
    for p in template.parameters():
        p.requires_grad_(False)
    return template


class Model:
    """A pure function over parameters, made from an ``nn.Module`` by :func:`functional`.

    Attributes:
        params: ``dict[str, Tensor]`` of detached parameter copies, keyed like ``state_dict()``.
        buffers: ``dict[str, Tensor]`` of buffer copies (BatchNorm running stats, ...).
        stochastic: whether the module holds dropout layers (then ``train=True`` needs a key).

    ``apply`` is the forward; ``init`` draws fresh parameters from a key.
    """

    def __init__(self, module: nn.Module, init_fn: Callable[[_random.Key, Params], Params] | None = None):
        if not isinstance(module, nn.Module):
            raise TypeError(f"fnnet.functional expects a torch.nn.Module, got {type(module).__name__}")
        self.params: Params = {k: v.detach().clone() for k, v in module.named_parameters()}
        self.buffers: Params = {k: v.detach().clone() for k, v in module.named_buffers()}
        self._train_template = _meta_copy(module, True)
        self._eval_template = _meta_copy(module, False)
        self._shapes = {k: v.shape for k, v in self.params.items()}
        self._init_fn = init_fn
        self.stochastic = any(isinstance(m, _STOCHASTIC) for m in module.modules())
        self.module_type = type(module).__name__

    # -- the forward ---------------------------------------------------------------------
    def _check_params(self, params: Mapping[str, torch.Tensor]) -> None:
        if not isinstance(params, Mapping):
            raise TypeError(f"params must be a dict of tensors keyed like state_dict(), got {type(params).__name__}")
        if params.keys() != self._shapes.keys():
            missing = sorted(self._shapes.keys() - params.keys())
            extra = sorted(params.keys() - self._shapes.keys())
            raise ValueError(f"{self.module_type} params: missing keys {missing}, unexpected keys {extra}")
        for name, shape in self._shapes.items():
            got = params[name]
            if not isinstance(got, torch.Tensor):
                raise TypeError(f"params['{name}'] must be a tensor, got {type(got).__name__}")
            if got.shape != shape:
                raise ValueError(f"params['{name}'] has shape {tuple(got.shape)}, the module expects {tuple(shape)}")

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
            key: an :class:`fnnet.random.Key` for dropout; required when ``train=True`` and the
                module has dropout layers.
            return_buffers: also return the buffers after the forward, as
                ``(outputs, new_buffers)``. In train mode BatchNorm updates its running stats in
                the returned dict; ``buffers`` itself is never modified.

        Returns:
            The module's outputs, or ``(outputs, new_buffers)`` with ``return_buffers=True``.
        """
        self._check_params(params)
        if train and self.stochastic and key is None:
            raise ValueError(
                f"{self.module_type} has dropout layers: apply(..., train=True) needs key=fnnet.random.key(...) "
                "(fnnet never draws from torch's global RNG implicitly)"
            )
        bufs = self.buffers if buffers is None else buffers
        if train:
            # BatchNorm updates buffers in place: give it copies so the caller's stay untouched.
            bufs = {k: v.clone() for k, v in bufs.items()}
        template = self._train_template if train else self._eval_template
        tensors = {**params, **bufs}
        # Only dropout layers draw from the RNG; without them the key changes nothing.
        if key is not None and self.stochastic and not torch.compiler.is_compiling():
            devices = {t.device for t in params.values() if t.device.type == "cuda"}
            with _random.rng_scope(key, sorted(devices, key=str)):
                out = torch.func.functional_call(template, tensors, args, kwargs, tie_weights=True, strict=True)
        else:
            out = torch.func.functional_call(template, tensors, args, kwargs, tie_weights=True, strict=True)
        if return_buffers:
            return out, dict(bufs)
        return out

    __call__ = apply

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
        module = copy.deepcopy(self._eval_template).to_empty(device=dev)
        with torch.no_grad():
            for name, p in module.named_parameters():
                p.copy_(self.params[name])
            for name, b in module.named_buffers():
                b.copy_(self.buffers[name])
        with _random.rng_scope(key, [dev]), torch.no_grad():
            for m in module.modules():
                reset = getattr(m, "reset_parameters", None)
                if callable(reset):
                    reset()
        return {k: v.detach() for k, v in module.named_parameters()}

    def to_module(self, params: Mapping[str, torch.Tensor] | None = None, buffers=None) -> nn.Module:
        """A real ``nn.Module`` holding ``params`` (default ``model.params``): the way back to torch."""
        params = self.params if params is None else params
        buffers = self.buffers if buffers is None else buffers
        self._check_params(params)
        dev = next((p.device for p in params.values()), torch.device("cpu"))
        module = copy.deepcopy(self._eval_template).to_empty(device=dev)
        module.load_state_dict({**params, **buffers}, strict=True)
        for p in module.parameters():
            p.requires_grad_(True)
        return module

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.params.values())
        return f"fnnet.Model({self.module_type}, {len(self.params)} params tensors, {n} parameters)"


def functional(module: nn.Module, *, init_fn: Callable[[_random.Key, Params], Params] | None = None) -> Model:
    """Turn any ``nn.Module`` into a pure :class:`Model` (``model.params``, ``model.apply``).

    ``init_fn(key, params) -> params``, if given, is what :meth:`Model.init` runs.
    A :class:`Model` passed in is returned as is.
    """
    if isinstance(module, Model):
        return module
    return Model(module, init_fn=init_fn)


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


def vmap(fn: Callable, in_dims: Any = 0, out_dims: Any = 0, randomness: str = "error", chunk_size=None) -> Callable:
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
