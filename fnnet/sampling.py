"""Text from a language model: :func:`generate`, autoregressive sampling under an explicit key.

``generate(model, params, idx, n, key=k)`` appends ``n`` tokens to ``idx``, one at a time:
the model's logits at the last position, divided by ``temperature``, cut to the ``top_k``
most likely, and one draw of :func:`fnnet.random.categorical` under ``fold_in(key, i)`` for the
``i``-th new token. The same key gives the same text; torch's global RNG is never touched.
This is nanoGPT's ``GPT.generate`` with keys instead of ``torch.multinomial``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import nn

from . import random as _random
from ._functional import Model, functional

__all__ = ["generate"]


def _block_size(model: Any, params: Mapping[str, torch.Tensor], block_size: int | None) -> int | None:
    if block_size is not None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"generate: block_size must be a positive int, got {block_size!r}")
        return block_size
    if isinstance(getattr(model, "block_size", None), int):
        return model.block_size
    wpe = params.get("wpe.weight")  # fnnet.models.GPT's position embedding: one row per position
    return int(wpe.shape[0]) if isinstance(wpe, torch.Tensor) else None


@torch.no_grad()
def generate(model: Model | nn.Module, params: Mapping[str, torch.Tensor] | None, idx: torch.Tensor,
             max_new_tokens: int, *, key: _random.Key, temperature: float = 1.0, top_k: int | None = None,
             block_size: int | None = None, forward: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """Continue each row of ``idx`` by ``max_new_tokens`` sampled tokens (nanoGPT's ``generate``, with keys).

    Args:
        model: an ``fnnet.functional(...)`` model or an ``nn.Module`` (such as
            :class:`fnnet.models.GPT`) mapping ``(B, T)`` token ids to ``(B, T, V)`` logits.
        params: the parameters (``state.params``); ``None`` with a module uses its own.
        idx: ``(B, T)`` int64 token ids, the prompt (not changed).
        max_new_tokens: how many tokens to append (>= 0).
        key: an :class:`fnnet.random.Key`; the ``i``-th new token is drawn under ``fold_in(key, i)``.
        temperature: the logits are divided by it (> 0; below 1 sharper, above 1 flatter).
        top_k: keep only the ``top_k`` largest logits of each row (others get probability 0).
        block_size: the longest context the model takes; the prompt is cropped to its last
            ``block_size`` tokens. Default: the module's ``block_size`` attribute, or for an
            ``fnnet.Model`` of a GPT the rows of its ``wpe.weight``; none found: no crop.
        forward: what computes the logits, ``forward(params, idx)``, in place of ``model.apply``. On a
            ZeRO-3 state (``params`` are this rank's parts) pass ``forward=step.on_parts(model.apply)``
            (``step`` the ``ZeRO(3)`` training step): each forward gathers the units one at a time, as
            training does, and gives the whole-state logits; every rank calls ``generate`` with the same
            ``max_new_tokens`` (each forward holds collectives), with prompts of its own.

    Returns:
        ``(B, T + max_new_tokens)`` int64: ``idx`` followed by the new tokens. The forward runs in
        eval mode (no dropout), under ``torch.no_grad``.

    Raises:
        ValueError: a non-2-D or non-integer ``idx``, a negative ``max_new_tokens``, a
            ``temperature`` <= 0 or a ``top_k`` outside ``[1, vocabulary]``.
    """
    if not isinstance(key, _random.Key):
        raise TypeError(f"generate: key must be an fnnet.random.Key (fnnet.random.key(seed)), got {type(key).__name__}")
    if not isinstance(idx, torch.Tensor) or idx.ndim != 2 or idx.is_floating_point() or idx.is_complex():
        raise ValueError(f"generate: idx must be a (batch, time) tensor of token ids, got "
                         f"{getattr(idx, 'dtype', type(idx).__name__)} {tuple(getattr(idx, 'shape', ()))}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not temperature > 0:
        raise ValueError(f"generate: temperature must be > 0, got {temperature!r}")
    if isinstance(model, nn.Module):
        fn = functional(model, copy=False)
        params = fn.params if params is None else params
    elif isinstance(model, Model):
        fn = model
        params = model.params if params is None else params
    else:
        raise TypeError(f"generate: model must be an nn.Module or an fnnet.functional(...) model, got "
                        f"{type(model).__name__}")
    if forward is not None and not callable(forward):
        raise TypeError(f"generate: forward must be callable as forward(params, idx), got {type(forward).__name__}")
    apply = fn.apply if forward is None else forward
    context = _block_size(model, fn.params, block_size)  # the model's own shapes (params may be a rank's parts)
    for i in range(max_new_tokens):
        logits = apply(params, idx if context is None else idx[:, -context:])[:, -1, :].float() / temperature
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= logits.shape[-1]:
                raise ValueError(f"generate: top_k must be an int in [1, {logits.shape[-1]}] (the vocabulary), "
                                 f"got {top_k!r}")
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        nxt = _random.categorical(_random.fold_in(key, i), logits, axis=-1)
        idx = torch.cat([idx, nxt.unsqueeze(1).to(idx.dtype)], dim=1)
    return idx
