"""Rematerialisation (``jax.checkpoint``): a module whose backward pass recomputes its forward.

``fnnet.remat(block)`` returns the same module, parameters shared and ``state_dict`` keys
unchanged, whose activations are not kept for the backward pass but recomputed from its
inputs when the backward pass reaches it: memory for time. A *policy* says what is kept
anyway, with JAX's names (``jax.checkpoint_policies``):

* ``"nothing_saveable"``: only the block's inputs (``torch.utils.checkpoint`` as is);
* ``"dots_saveable"``: the outputs of matrix products and attention (``mm``, ``addmm``,
  ``bmm``, ``baddbmm``, the ``scaled_dot_product_attention`` kernels), so the backward pass
  recomputes only the cheap element-wise work (norms, activations, dropout);
* ``"everything_saveable"``: everything (no recomputation: the block as it was);
* a callable ``policy(ctx, op, *args, **kwargs) -> bool | CheckpointPolicy``: torch's selective
  activation checkpoint ``policy_fn`` (``True`` keeps the op's output).

The recomputation runs through ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``, with
the selective policies as ``create_selective_checkpoint_contexts``. What fnnet adds is that it
works inside :func:`fnnet.functional`'s parameter swap: ``Model.apply`` puts the given tensors
into the module's parameter slots for the forward and puts the weightless ``meta`` tensors back
when it returns, so a plain ``checkpoint`` inside the module recomputes, during the backward
pass, with ``meta`` weights ("Tensor on device meta is not on the expected device"). A remat
module records the tensors in its slots when its forward runs and swaps those same tensors back
in for the recomputation. Dropout draws under the step's key (:func:`fnnet.random.rng_scope`)
are reproduced: the recomputation restores torch's RNG state as it was when the forward ran
(``preserve_rng_state``), so it draws the same mask.

Like ``torch.distributed.fsdp.fully_shard``, the returned module's class is a subclass of the
original (``Remat<Block>``), made once per class, so ``isinstance`` and attribute access behave
as before.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from typing import Any, Callable, Union

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

__all__ = ["remat", "is_remat", "dots_saveable", "POLICIES", "DOTS"]

Policy = Union[str, Callable[..., Any]]

_aten = torch.ops.aten
DOTS = tuple(
    getattr(_aten, name) for name in (
        "mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_fused_attention_overrideable")
    if hasattr(_aten, name)
)
"""The aten ops (overload packets) ``"dots_saveable"`` keeps: matrix products and the attention kernels (``linear``
and ``matmul`` reach the dispatcher as ``mm``/``addmm``/``bmm``)."""

POLICIES = ("nothing_saveable", "dots_saveable", "everything_saveable")


def dots_saveable(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """The ``"dots_saveable"`` policy as torch's selective-checkpoint ``policy_fn`` (keep :data:`DOTS`)."""
    dot = getattr(op, "overloadpacket", op) in DOTS
    return CheckpointPolicy.MUST_SAVE if dot else CheckpointPolicy.PREFER_RECOMPUTE


def _user_policy(fn: Callable[..., Any]) -> Callable[..., CheckpointPolicy]:
    """A policy returning ``bool`` (keep?) or a ``CheckpointPolicy``, as torch's ``policy_fn``."""

    @functools.wraps(fn)
    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        out = fn(ctx, op, *args, **kwargs)
        if isinstance(out, CheckpointPolicy):
            return out
        return CheckpointPolicy.MUST_SAVE if out else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def _context_fn(policy: Policy) -> Callable[[], Any] | None:
    """``checkpoint``'s ``context_fn`` for ``policy``; ``None`` for plain checkpointing."""
    if policy == "nothing_saveable":
        return None
    fn = dots_saveable if policy == "dots_saveable" else _user_policy(policy)  # type: ignore[arg-type]
    return functools.partial(create_selective_checkpoint_contexts, fn)


def _check_policy(policy: Any) -> None:
    if callable(policy) or policy in POLICIES:
        return
    raise ValueError(f"fnnet.remat: policy must be one of {list(POLICIES)} or a callable "
                     f"policy(ctx, op, *args, **kwargs) -> bool (torch's selective checkpoint policy_fn), "
                     f"got {policy!r}")


def _slot_tensors(module: nn.Module) -> list[tuple[dict, str, torch.Tensor]]:
    """``(owner's _parameters/_buffers dict, attribute, tensor)`` for every tensor slot under ``module``."""
    out = []
    for sub in module.modules():
        for store in (sub._parameters, sub._buffers):
            for attr, t in store.items():
                if t is not None:
                    out.append((store, attr, t))
    return out


@contextlib.contextmanager
def _slots_holding(slots: list[tuple[dict, str, torch.Tensor]]):
    """The slots hold the recorded tensors for the block; what was there before is put back after."""
    before = [(store, attr, store[attr]) for store, attr, _ in slots]
    try:
        for store, attr, t in slots:
            store[attr] = t
        yield
    finally:
        for store, attr, old in reversed(before):
            store[attr] = old


def _in_functorch_transform() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vjp``, ``vmap``) is active around this call."""
    return torch._C._functorch.peek_interpreter_stack() is not None


class _RematMixin:
    """The forward of a remat module: its class's forward, recomputed in the backward pass."""

    _remat_policy: Policy
    _remat_base: type

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        inner = functools.partial(self._remat_base.forward, self)
        policy = self._remat_policy
        if policy == "everything_saveable" or not torch.is_grad_enabled():
            return inner(*args, **kwargs)
        context_fn = _context_fn(policy)
        options = {} if context_fn is None else {"context_fn": context_fn}
        if torch.compiler.is_compiling():
            if _in_functorch_transform():
                # fnnet's jit=True step: forward and backward are one graph (torch.func.grad inside
                # torch.compile), which torch's checkpoint cannot enter and inductor does not recompute in.
                return inner(*args, **kwargs)
            # Traced with autograd outside: the partitioner recomputes what the tags say.
            return checkpoint(inner, *args, use_reentrant=False, **options, **kwargs)
        if _in_functorch_transform():
            raise RuntimeError(
                f"fnnet.remat({self._remat_base.__name__}) cannot run under torch.func.grad/vjp (fnnet.grad, "
                "fnnet.value_and_grad): torch's activation checkpointing uses saved-tensor hooks, which "
                "torch.func does not support. Differentiate with fnnet.make_grad_fn or make_train_step "
                "(torch.autograd), or remove remat for this call")
        slots = _slot_tensors(self)  # the tensors in the slots now (those Model.apply swapped in)
        tensors = [t for _, _, t in slots]

        def run(*inputs: Any) -> Any:
            with _slots_holding(slots):  # the recomputation sees this forward's weights, not meta ones
                return inner(*inputs[len(tensors):], **kwargs)

        # The weights ride along as inputs so checkpoint sees their devices (RNG state to keep).
        return checkpoint(run, *tensors, *args, use_reentrant=False, preserve_rng_state=True, **options)


_CLASSES: dict[type, type] = {}


def _remat_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Remat{cls.__name__}", (_RematMixin, cls),
                             {"__module__": cls.__module__, "_remat_base": cls})
    return _CLASSES[cls]


def is_remat(module: nn.Module) -> bool:
    """Whether ``module`` was made by :func:`remat`."""
    return isinstance(module, _RematMixin)


def remat(module: nn.Module, policy: Policy = "nothing_saveable") -> nn.Module:
    """``module`` with its forward recomputed in the backward pass (``jax.checkpoint`` / ``jax.remat``).

    Args:
        module: any ``nn.Module`` (a transformer block, an MLP stage). It is not changed.
        policy: what the backward pass may keep instead of recomputing: ``"nothing_saveable"``
            (default: only the inputs), ``"dots_saveable"`` (matrix-product and attention
            outputs), ``"everything_saveable"`` (all: no recomputation), or a callable
            ``policy(ctx, op, *args, **kwargs) -> bool`` deciding per aten op (``True``: keep),
            as ``torch.utils.checkpoint.create_selective_checkpoint_contexts``' ``policy_fn``
            (a ``CheckpointPolicy`` may be returned too).

    Returns:
        A module sharing ``module``'s parameters, buffers and submodules (the same tensors, the
        same ``state_dict`` keys: a checkpoint saved with or without remat loads in the other),
        whose class is a subclass of ``module``'s. Its gradients equal the plain module's
        bit for bit (the recomputation runs the same ops on the same values, dropout masks
        included). Remat applied to a remat module replaces the policy.

    Works in eager mode, inside :func:`fnnet.functional` (``Model.apply``), under ``jit=True``
    (``torch.compile`` plans the recomputation), with accumulation and on every rank of a
    distributed step. Typical use, one line per model::

        for i, block in enumerate(net.blocks):
            net.blocks[i] = fnnet.remat(block)
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"fnnet.remat expects a torch.nn.Module (a block of the model), got {type(module).__name__}"
                        + (" (an fnnet.Model: apply remat to the module before fnnet.functional)"
                           if type(module).__name__ == "Model" else ""))
    _check_policy(policy)
    base = module._remat_base if is_remat(module) else type(module)  # type: ignore[attr-defined]
    out = _remat_class(base).__new__(_remat_class(base))
    for name, value in module.__dict__.items():  # its own dicts (slots, hooks), the same tensors and submodules
        out.__dict__[name] = copy.copy(value) if isinstance(value, dict) else value
    out.__dict__["_remat_policy"] = policy
    return out
