"""Float32 master weights for low-precision parameters: :func:`master_weights`.

Parameters stored in bfloat16 lose updates smaller than their last bit (``1 + 1e-3`` is ``1``
in bfloat16). The usual cure (Micikevicius et al. 2018, FSDP2's ``MixedPrecisionPolicy``,
jmp) keeps a float32 copy of the parameters, the *master weights*, applies every update to
that copy, and casts it back. Here the copy lives in the optimizer state, keyed like the
params, so everything that handles optimizer state handles it too: ZeRO-2
(``shard_optimizer=True``) shards it with the moments, checkpoints save it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from .. import tree as _tree
from .base import GradientTransformation, Params, Shards, Updates, apply_updates, update_with

__all__ = ["MasterWeightsState", "master_weights", "master_params"]


class MasterWeightsState(NamedTuple):
    """State of :func:`master_weights`.

    Attributes:
        master: the float32 master copy of the params (the params' structure, float32 leaves).
        inner: the wrapped transformation's state, made from and applied to ``master``.
    """

    master: Any
    inner: Any


def _to(x: Any, dtype: torch.dtype) -> Any:
    return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != dtype else x


def master_weights(inner: GradientTransformation, dtype: torch.dtype = torch.float32) -> GradientTransformation:
    """``inner`` run on a ``dtype`` (float32) master copy of the parameters, kept in the state.

    ``init(params)`` copies the params to ``dtype`` (give it the full-precision params, before
    they are cast down: :class:`fnnet.Precision` does) and initialises ``inner`` on the copy.
    ``update(grads, state, params)`` casts the gradients to ``dtype``, runs ``inner`` against
    the master weights, adds its updates to them, and returns as updates the step from the
    current params to the new master weights cast to the params' dtype (computed in ``dtype``).
    ``shards=`` (a sharded step's :class:`Shards`) is handed on to ``inner``
    (:func:`fnnet.optim.update_with`).

    The training steps (:func:`fnnet.state.apply_update`, hence ``make_train_step``,
    ``TrainState.apply_gradients``, the sharded update) do not add those updates: they set
    the params to the master weights cast down (:func:`master_params`), which is exact. Added
    with :func:`apply_updates` by hand they give the same params except where the params and
    the master weights are far apart in magnitude (a rounding of the difference).

    Returns:
        A :class:`GradientTransformation` with state :class:`MasterWeightsState`.
    """

    def init(params: Params) -> MasterWeightsState:
        master = _tree.map(lambda x: _to(x, dtype).clone() if isinstance(x, torch.Tensor) else x, params)
        return MasterWeightsState(master, inner.init(master))

    def update(updates: Updates, state: MasterWeightsState, params: Params | None = None, *,
               donate: bool = False, shards: Shards | None = None) -> tuple[Updates, MasterWeightsState]:
        grads = _tree.map(lambda g: _to(g, dtype), updates)
        steps, inner_state = update_with(inner, grads, state.inner, state.master, donate=donate, shards=shards)
        master = apply_updates(state.master, steps, donate=donate)
        new = MasterWeightsState(master, inner_state)
        if params is None:
            return steps, new
        out = _tree.map(lambda m, p: _to(m, p.dtype).to(dtype) - _to(p, dtype)
                        if isinstance(p, torch.Tensor) else m, master, params)
        return out, new

    return GradientTransformation(init, update)


def master_params(state: MasterWeightsState, params: Params, *, donate: bool = False) -> Params:
    """The params after an update: ``state.master`` cast to each param's dtype (written into
    ``params`` with ``donate``)."""
    if not donate:
        return _tree.map(lambda m, p: m.to(p.dtype, copy=True) if isinstance(p, torch.Tensor) else p,
                         state.master, params)
    with torch.no_grad():
        for m, p in zip(_tree.leaves(state.master), _tree.leaves(params)):
            if isinstance(p, torch.Tensor):
                p.copy_(m)
    return params
