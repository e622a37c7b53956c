"""The optimizer protocol: a gradient transformation is a pair of pure functions.

``state = opt.init(params)`` builds the optimizer state (a pytree of NamedTuples whose
counters are 0-dim tensors on the params' device); ``updates, state = opt.update(grads,
state, params)`` turns gradients into parameter updates; :func:`apply_updates` adds them.
This is optax's ``GradientTransformation`` protocol (``optax/_src/base.py``), on torch
tensors, with one addition: ``donate=True`` lets the update reuse the buffers of the grads
and state the caller hands over, the way ``jax.jit(donate_argnums=...)`` does.
"""

from __future__ import annotations

import functools
import inspect

from typing import Any, Callable, NamedTuple, Protocol, Union

import optree
import torch

from .. import tree as _tree
from . import _foreach
from ._common import EmptyState, check_learning_rate, init_empty

__all__ = [
    "Shards",
    "global_sum",
    "update_with",
    "Params",
    "Updates",
    "OptState",
    "Schedule",
    "ScalarOrSchedule",
    "GradientTransformation",
    "EmptyState",
    "ScaleByLearningRateState",
    "ScaleByScheduleState",
    "identity",
    "chain",
    "apply_updates",
    "get_learning_rate",
    "set_learning_rate",
]

Params = Any  # a pytree of tensors
Updates = Any  # a pytree of tensors with the params' structure
OptState = Any  # a pytree of NamedTuples of tensors
Schedule = Callable[[Any], Any]  # step (int or 0-dim tensor) -> value (float or 0-dim tensor)
ScalarOrSchedule = Union[float, torch.Tensor, Schedule]


class InitFn(Protocol):
    def __call__(self, params: Params) -> OptState: ...


class UpdateFn(Protocol):
    def __call__(
        self, updates: Updates, state: OptState, params: Params | None = None, *, donate: bool = False
    ) -> tuple[Updates, OptState]: ...


class GradientTransformation(NamedTuple):
    """A pair of pure functions ``(init, update)``: optax's ``GradientTransformation``.

    - ``init(params) -> state``: every piece of state, step counts included, is in ``state``.
    - ``update(updates, state, params=None, *, donate=False) -> (updates, new_state)``.
      With ``donate=False`` (the default) no input is modified. With ``donate=True`` the
      caller promises never to use ``updates`` or ``state`` again, so their buffers may be
      overwritten in place (``torch._foreach_*_`` ops); ``params`` is never modified.
      Any other keyword is a ``TypeError``.

    Counterpart of a ``torch.optim.Optimizer``, minus the hidden state: ``step()`` is
    ``update`` followed by :func:`apply_updates`.
    """

    init: InitFn
    update: UpdateFn


class ScaleByLearningRateState(NamedTuple):
    """State of ``scale_by_learning_rate`` with a constant learning rate.

    Attributes:
        count: 0-dim int64 tensor, the number of updates done.
        learning_rate: 0-dim float tensor, the learning rate every update uses; change it
            with :func:`set_learning_rate`.
    """

    count: torch.Tensor
    learning_rate: torch.Tensor


class ScaleByScheduleState(NamedTuple):
    """State of ``scale_by_learning_rate`` with a schedule (optax's ``ScaleByScheduleState``).

    Attributes:
        count: 0-dim int64 tensor; the next update uses ``schedule(count)``.
        learning_rate: 0-dim float tensor, the learning rate of the last update
            (``schedule(0)`` before the first one), kept so a trainer can log it.
    """

    count: torch.Tensor
    learning_rate: torch.Tensor


class Shards(NamedTuple):
    """What an update on one rank's *part* of the parameters needs to know of the whole (ZeRO, HSDP).

    A sharded training step (:class:`fnnet.distributed.ZeRO`, :class:`fnnet.distributed.HSDP`)
    runs the optimizer on this rank's part of every parameter (1-D ranges) and passes this to
    ``optimizer.update(..., shards=...)``, as optax passes ``axis_name`` to the transforms that
    reduce across devices: nothing reaches a transform by a hidden channel.

    Attributes:
        sum: ``sum(x) -> x`` summed over every part of the parameters (an all-reduce on the
            strategy's shard group). :func:`clip_by_global_norm` sums its squared norm with it.
        whole: the whole parameters' tree (the part's structure, the whole shapes) on the
            ``meta`` device: :func:`masked` evaluates a mask given as a function on it, so a
            mask that looks at shapes (``lambda p: tree.map(lambda x: x.ndim > 1, p)``) selects
            what it selects on one process.
    """

    sum: Callable[[torch.Tensor], torch.Tensor]
    whole: Any


def global_sum(x: torch.Tensor, shards: Shards | None = None) -> torch.Tensor:
    """``x`` summed over every part of the parameters: ``shards.sum(x)``, or ``x`` itself when the
    update sees the whole tree (``shards=None``). How a transform that reduces over leaves gets
    the global value under optimizer-state sharding (``clip_by_global_norm`` does)."""
    return x if shards is None else shards.sum(x)


@functools.lru_cache(maxsize=None)
def _takes_shards(update: Callable) -> bool:
    try:
        return "shards" in inspect.signature(update).parameters
    except (TypeError, ValueError):  # a builtin or an object without a signature: it does not declare it
        return False


def update_with(transform: GradientTransformation, updates: Updates, state: OptState, params: Params | None = None,
                *, donate: bool = False, shards: Shards | None = None) -> tuple[Updates, OptState]:
    """``transform.update(updates, state, params, donate=donate)``, with ``shards=shards`` passed to an
    update that declares a ``shards`` keyword (:class:`Shards`; ``None``: the tree is whole).

    Transforms that need the whole tree's view (a global norm, a mask computed from shapes)
    declare ``shards``; every other transform keeps optax's signature, so a transformation of
    your own works unchanged. :func:`chain` and :func:`masked` hand it on this way.
    """
    if shards is not None and _takes_shards(transform.update):
        return transform.update(updates, state, params, donate=donate, shards=shards)
    return transform.update(updates, state, params, donate=donate)


def identity() -> GradientTransformation:
    """Pass updates through unchanged (``optax.identity``)."""

    def update(updates: Updates, state: EmptyState, params: Params | None = None, *, donate: bool = False):
        del params, donate
        return updates, state

    return GradientTransformation(init_empty, update)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply transformations one after the other (``optax.chain``).

    The state is the tuple of the transformations' states, in order. ``donate`` is passed
    to every stage: each one may then reuse the buffers of the updates it receives and of
    its own state. ``shards`` (a sharded step's :class:`Shards`) goes to every stage that
    declares it (:func:`update_with`).

    Example: ``chain(clip_by_global_norm(1.0), scale_by_adam(), scale_by_learning_rate(1e-3))``
    is ``torch.nn.utils.clip_grad_norm_`` followed by ``torch.optim.Adam(lr=1e-3)``.
    """
    for i, t in enumerate(transforms):
        if not (callable(getattr(t, "init", None)) and callable(getattr(t, "update", None))):
            raise TypeError(
                f"chain: argument {i} is a {type(t).__name__}, not a GradientTransformation; "
                "pass transformations such as fnnet.optim.scale_by_adam() (note the call)"
            )

    def init(params: Params) -> tuple[OptState, ...]:
        return tuple(t.init(params) for t in transforms)

    def update(updates: Updates, state: tuple[OptState, ...], params: Params | None = None, *, donate: bool = False,
               shards: Shards | None = None):
        if not isinstance(state, tuple) or len(state) != len(transforms):
            got = f"a {type(state).__name__} of length {len(state)}" if isinstance(state, tuple) else type(state).__name__
            raise ValueError(
                f"chain of {len(transforms)} transformations: expected its state, a tuple of {len(transforms)} "
                f"states (what init returned), got {got}"
            )
        new_state = []
        for t, s in zip(transforms, state):
            updates, s = update_with(t, updates, s, params, donate=donate, shards=shards)
            new_state.append(s)
        return updates, tuple(new_state)

    return GradientTransformation(init, update)


def apply_updates(params: Params, updates: Updates, *, donate: bool = False) -> Params:
    """``params + updates``, leaf by leaf, in each parameter's dtype (``optax.apply_updates``).

    Args:
        params: a pytree of tensors.
        updates: the first output of ``update``, with ``params``' structure.
        donate: add in place into ``params`` and return them (what ``torch.optim`` does to its
            parameters); otherwise return new tensors and leave ``params`` untouched.

    Returns:
        The updated params, with ``params``' structure, dtypes and devices (bf16 params with
        fp32 updates: the sum is taken in fp32 and stored in bf16, as optax does).

    Raises:
        ValueError: ``updates`` does not have ``params``' structure or shapes (the key path
            is named).
        TypeError: a params leaf is not a floating-point tensor (naming its key path).

    The pure path is ordinary tensor math, so autograd can see through it (differentiating
    through an optimizer step, as with optax under ``jax.grad``); the donated path runs
    under ``torch.no_grad()``, like ``torch.optim``.
    """
    p_leaves, spec = _tree.flatten(params)
    u_leaves = _foreach.leaves_like(updates, spec, params, "apply_updates: params and updates", p_leaves)
    groups = _foreach.index_groups([p_leaves, u_leaves])
    for idx in groups:  # one check per (device, dtype) group, not per leaf
        if not (p_leaves[idx[0]].is_floating_point() or p_leaves[idx[0]].is_complex()):
            raise TypeError(
                f"apply_updates: the params leaf at '{_tree.paths(params)[idx[0]]}' is {p_leaves[idx[0]].dtype}; "
                "only floating-point parameters are updated (an integer parameter would be silently truncated)"
            )
    if donate:
        # In place, under no_grad as in torch.optim (params may be leaves that require grad).
        # Grouped by (device, dtype) without casting: each param keeps its dtype.
        with torch.no_grad():
            for idx in groups:
                torch._foreach_add_([p_leaves[i] for i in idx], [u_leaves[i] for i in idx])
        return params

    out = list(p_leaves)
    for idx in groups:
        ps = [p_leaves[i] for i in idx]
        new = torch._foreach_add(ps, [u_leaves[i] for i in idx])
        dtype = ps[0].dtype
        for i, t in zip(idx, new):
            out[i] = t if t.dtype == dtype else t.to(dtype)
    return _tree.unflatten(spec, out)


# -- the learning rate held in the state ---------------------------------------------------


def _is_lr_state(x: Any) -> bool:
    return isinstance(x, (ScaleByLearningRateState, ScaleByScheduleState))


def _lr_states(opt_state: OptState) -> list[Any]:
    nodes = optree.tree_leaves(opt_state, is_leaf=_is_lr_state, none_is_leaf=False, namespace=_tree.NAMESPACE)
    return [x for x in nodes if _is_lr_state(x)]


def get_learning_rate(opt_state: OptState) -> torch.Tensor | None:
    """The learning rate held in an optimizer state, for logging (optax: ``inject_hyperparams``).

    For a constant learning rate it is the one every update uses (the last
    :func:`set_learning_rate`, if any). For a schedule it is the value the most recent update
    used, ``schedule(count - 1)``; before the first update, ``schedule(0)``, the one the
    first update will use. With several learning-rate stages (e.g. under ``masked``), the
    first one in tree order.

    Returns:
        A 0-dim tensor on the params' device (call ``float()`` on it to log it, which waits
        for the device), or ``None`` if the state has no learning-rate stage (e.g. a bare
        ``scale_by_adam()``).
    """
    states = _lr_states(opt_state)
    return states[0].learning_rate if states else None


def set_learning_rate(opt_state: OptState, learning_rate: float | torch.Tensor) -> OptState:
    """A copy of ``opt_state`` whose constant learning rate is ``learning_rate``.

    What a per-epoch learning-rate callback does between epochs, the counterpart of writing
    ``param_group["lr"]`` in ``torch.optim``. Every constant learning-rate stage in the state
    is set; the input state is not modified. Under ``torch.compile`` the new value is a new
    tensor input, not a constant, so changing it does not recompile.

    Raises:
        ValueError: the state has no learning-rate stage; or its learning rate comes from a
            schedule (then the schedule decides: build the optimizer with the schedule you
            want, e.g. ``per_epoch(step_lr(...), steps_per_epoch)``, or with a float
            learning rate if a callback should set it); or ``learning_rate`` is negative or
            not finite.
    """
    states = _lr_states(opt_state)
    if not states:
        raise ValueError(
            "set_learning_rate: this optimizer state has no learning-rate stage "
            "(build the optimizer with fnnet.optim.scale_by_learning_rate or an alias such as adam)"
        )
    if any(isinstance(s, ScaleByScheduleState) for s in states):
        raise ValueError(
            "set_learning_rate: this optimizer's learning rate comes from a schedule, which decides it at "
            "every step; build it with the schedule you want (e.g. fnnet.optim.per_epoch(step_lr(...), "
            "steps_per_epoch)) or with a float learning rate if a callback should set it"
        )
    check_learning_rate(learning_rate, "set_learning_rate")

    def replace(x: Any) -> Any:
        if not isinstance(x, ScaleByLearningRateState):
            return x
        old = x.learning_rate
        if isinstance(learning_rate, torch.Tensor):
            new = learning_rate.to(device=old.device, dtype=old.dtype)
        else:
            # Straight to the state's dtype (a float32 detour would round 0.01), filled on the
            # device: torch.tensor(...) would be a blocking host-to-device copy on every call.
            new = torch.full((), float(learning_rate), device=old.device, dtype=old.dtype)
        return x._replace(learning_rate=new)

    return optree.tree_map(replace, opt_state, is_leaf=_is_lr_state, none_is_leaf=False, namespace=_tree.NAMESPACE)
