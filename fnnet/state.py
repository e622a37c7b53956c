"""Training state as data: :class:`TrainState`, :class:`DynamicScale`, and the update that moves them.

``TrainState`` is everything a training run changes, as one pytree (flax's
``train_state.TrainState``). :func:`apply_update` (on the state's fields) and
:meth:`TrainState.apply_gradients` (on a state) are the second half of every training step,
written once: the optimizer update, ``apply_updates``, the skipped-step logic (float16
overflow, non-finite gradients) and the loss scale. The first half, the gradients, is
:func:`fnnet.make_grad_fn`; :mod:`fnnet.step` composes the two, and the data-parallel and
distributed steps only change how the gradients are computed and reduced.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from . import optim as _optim
from . import random as _random
from . import tree as _tree
from .device import tree_device

__all__ = ["TrainState", "DynamicScale", "Accumulation", "all_finite", "host_finite", "grads_finite", "apply_update", "loss_scale_for",
           "nonfinite_paths"]


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
        """A fresh loss scale on ``device``: ``initial_scale``, multiplied by ``factor`` after ``period`` finite
        steps and divided by it on an overflow, never below ``min_scale`` (jmp's ``DynamicLossScale``)."""
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
class Accumulation:
    """A gradient-accumulation window in progress (``make_train_step(..., accumulate=k)``), as state.

    Attributes:
        grads: the sum of ``n_m * g_m`` over the window's micro-batches so far (``n_m`` samples,
            ``g_m`` their mean gradient, of the scaled loss under float16), in the layout of the
            step's gradient source: the params' tree on one device or one rank; one tree per
            device for a data-parallel step.
        samples: ``sum n_m``, a Python int (reading it never syncs).
        loss_sum: ``sum n_m * loss_m`` (float64): the window's mean loss is ``loss_sum / samples``.
        micro: how many micro-batches the window holds.
        buffers: the buffers (BatchNorm statistics) as they were when the window started: what
            the state keeps when the window's update is skipped (a non-finite gradient), as a
            skipped step without accumulation keeps its buffers.
    """

    grads: Any
    samples: int
    loss_sum: torch.Tensor
    micro: int = 0
    buffers: Any = None


def _float_leaves(tree: Any) -> list[torch.Tensor]:
    return [x for x in _tree.leaves(tree) if isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())]


def all_finite(tree: Any) -> torch.Tensor:
    """A 0-dim bool tensor: whether every floating-point tensor leaf of ``tree`` is finite.

    Computed on the leaves' device (on the first leaf's when there are several), with no host
    sync; nothing is modified. For fresh gradients :func:`grads_finite` is the faster check.
    """
    leaves = _float_leaves(tree)
    device = leaves[0].device if leaves else torch.device("cpu")
    if not leaves:
        return torch.ones((), dtype=torch.bool, device=device)
    return torch.stack([torch.isfinite(x).all().to(device) for x in leaves]).all()


def host_finite(tree: Any) -> bool:
    """Whether every floating-point tensor leaf of ``tree`` is finite, as a Python bool (syncs): one read-only
    sum per leaf (a nan or an inf anywhere makes the sum non-finite; about 10x faster on the CPU than
    ``isfinite(x).all()``, which writes a mask), and the exact :func:`all_finite` only when a sum is not
    finite (it may have overflowed). What a checkpoint save checks before writing."""
    leaves = [x for x in _float_leaves(tree) if x.numel()]
    if any(x.is_complex() for x in leaves):
        return bool(all_finite(tree))
    if not leaves:
        return True
    dev = leaves[0].device
    sums = torch.stack([(x.sum(dtype=torch.float32) if x.element_size() < 4 else x.sum()).to(dev, torch.float64)
                        for x in leaves])
    return bool(torch.isfinite(sums).all()) or bool(all_finite(tree))


def nonfinite_paths(tree: Any) -> list[str]:
    """The key paths of the floating-point leaves of ``tree`` that hold an inf or a nan (for messages; syncs)."""
    return [p for p, x in _tree.leaves_with_path(tree)
            if isinstance(x, torch.Tensor) and x.is_floating_point() and not bool(torch.isfinite(x).all())]


def grads_finite(grads: Any) -> torch.Tensor:
    """:func:`all_finite` for gradients the caller owns (what the training steps check).

    One multi-tensor check per device and dtype, the op ``torch.amp.GradScaler`` uses
    (several times faster than a reduction per leaf on CPU). It multiplies the tensors by 1.0
    in place, so values stay bit for bit but version counters move: use it on fresh
    gradients, not on tensors an autograd graph still needs. Under ``torch.compile``, and for
    tensors that require grad, it is :func:`all_finite`.
    """
    leaves = _float_leaves(grads)
    if not leaves or torch.compiler.is_compiling() or any(x.requires_grad for x in leaves):
        return all_finite(grads)
    device = leaves[0].device
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for x in leaves:
        groups.setdefault((x.device, x.dtype), []).append(x)
    found = torch.zeros(1, dtype=torch.float32, device=device)
    for (dev, _), group in groups.items():
        here = found if dev == device else torch.zeros(1, dtype=torch.float32, device=dev)
        # Sets `here` when anything is inf/nan (and multiplies by 1.0: values unchanged).
        torch._amp_foreach_non_finite_check_and_unscale_(group, here, torch.ones(1, dtype=torch.float32, device=dev))
        if here is not found:
            found = found + here.to(device)
    return found[0] == 0


def _select(pred: torch.Tensor, new: Any, old: Any) -> Any:
    return _tree.map(lambda a, b: torch.where(pred, a, b) if isinstance(a, torch.Tensor) else a, new, old)


def _copy_into(old: Any, new: Any) -> Any:
    """Write ``new``'s values into ``old``'s tensors (a donated state keeps its buffers); returns ``old``."""
    olds = [x for x in _tree.leaves(old) if isinstance(x, torch.Tensor)]
    news = [x for x in _tree.leaves(new) if isinstance(x, torch.Tensor)]
    with torch.no_grad():
        for o, n in zip(olds, news):
            o.copy_(n)
    return old


def apply_update(optimizer: Any, grads: Any, params: Any, opt_state: Any, *, buffers: Any = None,
                 new_buffers: Any = None, loss_scale: "DynamicScale | None" = None, check_finite: bool = False,
                 finite: torch.Tensor | None = None, donate: bool = False,
                 shards: Any = None) -> tuple[Any, Any, Any, Any, Any]:
    """The one update every training step ends with, on the state's fields (what
    :meth:`TrainState.apply_gradients` and every step builder call).

    ``optimizer.update`` turns ``grads`` into updates and :func:`fnnet.optim.apply_updates`
    adds them. One rule decides whether the gradients are checked: when ``finite`` is given,
    when ``check_finite`` is set, or when there is a ``loss_scale`` (float16); a check that
    finds a non-finite gradient skips the update (params, optimizer state and buffers stay
    as they were, donated or not) and the loss scale shrinks. On CPU outside
    ``torch.compile`` the flag is read in Python (free there, and a skipped donated update
    never starts); elsewhere the choice is made on the device, with no host sync.

    ``shards`` (an :class:`fnnet.optim.Shards`: ``params`` are one rank's part of the whole) is
    handed to the optimizer's update (:func:`fnnet.optim.update_with`), for the transforms that
    need the whole tree's view.

    Returns ``(params, opt_state, buffers, loss_scale, finite)``: ``buffers`` is
    ``new_buffers`` (or ``buffers`` when that is ``None``) where the update applied, and
    ``finite`` is the 0-dim bool tensor checked, or ``None`` when nothing was checked.
    """
    if finite is None and (check_finite or loss_scale is not None):
        finite = grads_finite(grads)
    new_buffers = buffers if new_buffers is None else new_buffers
    if finite is None:
        updates, opt_state = _update(optimizer, grads, opt_state, params, donate, shards)
        return _apply_updates(params, updates, donate, opt_state), opt_state, new_buffers, loss_scale, None
    if loss_scale is not None:
        loss_scale = loss_scale.adjust(finite)
    if finite.is_cpu and not torch.compiler.is_compiling():
        if not bool(finite):
            return params, opt_state, buffers, loss_scale, finite
        updates, opt_state = _update(optimizer, grads, opt_state, params, donate, shards)
        return _apply_updates(params, updates, donate, opt_state), opt_state, new_buffers, loss_scale, finite
    # On an accelerator (or inside torch.compile) the choice is made on the device: compute the
    # update out of place, keep it where `finite`. Compiled, inductor fuses the select into the
    # update's kernels; in eager mode this costs one state-sized temporary.
    updates, new_opt = _update(optimizer, grads, opt_state, params, False, shards)
    new_params = _apply_updates(params, updates, False, new_opt)
    chosen = _select(finite, (new_params, new_opt, new_buffers), (params, opt_state, buffers))
    if donate:
        chosen = _copy_into((params, opt_state, buffers), chosen)
    return (*chosen, loss_scale, finite)


def _update(optimizer: Any, grads: Any, opt_state: Any, params: Any, donate: bool, shards: Any) -> tuple[Any, Any]:
    if shards is None:
        return optimizer.update(grads, opt_state, params, donate=donate)
    return _optim.update_with(optimizer, grads, opt_state, params, donate=donate, shards=shards)


def _apply_updates(params: Any, updates: Any, donate: bool, opt_state: Any = None) -> Any:
    """``params + updates``; under float32 master weights (:func:`fnnet.optim.master_weights`), the new
    master weights cast to the params' dtype instead (exact, where adding the difference may round)."""
    if isinstance(opt_state, _optim.MasterWeightsState):
        return _optim.master_params(opt_state, params, donate=donate)
    return _optim.apply_updates(params, updates, donate=donate)


@_tree.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a training run changes, as one pytree (``flax.training.train_state.TrainState``).

    Attributes:
        params: the parameters (a dict of tensors, or any pytree).
        opt_state: the optimizer's state (``optimizer.init(params)``).
        step: how many times the training step ran (a Python int, so reading it never syncs;
            skipped steps count too, the optimizer's own count does not).
        buffers: non-trainable model state (BatchNorm running stats) or ``None``.
        key: an :class:`fnnet.random.Key` split once per step for dropout, or ``None``.
        loss_scale: a :class:`DynamicScale` for float16 training, or ``None``.
        accum: the :class:`Accumulation` of a gradient-accumulation window in progress, or
            ``None`` (always ``None`` between windows and without accumulation).

    States are immutable: ``state.replace(params=...)`` returns a new one.
    """

    params: Any
    opt_state: Any
    step: int = 0
    buffers: Any = None
    key: Any = None
    loss_scale: Any = None
    accum: Any = None

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
        _check_optimizer(optimizer)
        if key is not None and not isinstance(key, _random.Key):
            raise TypeError(f"key must be an fnnet.random.Key (fnnet.random.key(seed)), got {type(key).__name__}")
        return cls(params, optimizer.init(params), 0, buffers, key, loss_scale)

    def replace(self, **changes: Any) -> "TrainState":
        """A copy with some fields replaced (``dataclasses.replace``)."""
        if type(self) is TrainState:  # every step calls this: the fields are known, skip replace's walk over them
            return TrainState(**{**self.__dict__, **changes})
        return dataclasses.replace(self, **changes)

    def apply_gradients(self, grads: Any, optimizer: Any, *, buffers: Any = None, finite: torch.Tensor | None = None,
                        check_finite: bool = False, donate: bool = False) -> "TrainState":
        """The state after one optimizer update with ``grads`` (flax's ``TrainState.apply_gradients``).

        :func:`apply_update` on the state's fields, then ``self.replace(...)`` with ``step``
        counting one more (skipped updates count too), so a subclass of ``TrainState`` stays
        its own class. Every training step ends with this update.

        Args:
            grads: gradients with the params' structure (already unscaled when a loss scale
                was used: :func:`fnnet.make_grad_fn` does it).
            optimizer: the ``GradientTransformation`` the state was created with.
            buffers: the buffers after the forward (``None``: keep the state's).
            finite: a 0-dim bool tensor (:func:`grads_finite` of the gradients); ``None`` checks
                the gradients here when ``check_finite`` is set or the state has a
                ``loss_scale``. When it is False the update is skipped -- params, optimizer
                state and buffers stay as they are -- and ``step`` still counts; a loss scale
                shrinks.
            check_finite: check the gradients (the steps' ``skip_nonfinite``).
            donate: update the state's tensors in place (the caller drops this state).

        Returns:
            The new state (``type(self)``).
        """
        params, opt_state, new_buffers, loss_scale, _ = apply_update(
            optimizer, grads, self.params, self.opt_state, buffers=self.buffers, new_buffers=buffers,
            loss_scale=self.loss_scale, check_finite=check_finite, finite=finite, donate=donate)
        return self.replace(params=params, opt_state=opt_state, step=self.step + 1, buffers=new_buffers,
                            loss_scale=loss_scale)


def _check_optimizer(optimizer: Any) -> None:
    if not (callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))):
        raise TypeError(
            f"optimizer must be an fnnet.optim GradientTransformation (e.g. fnnet.optim.adam(1e-3)), "
            f"got {type(optimizer).__name__}"
        )


def loss_scale_for(state: TrainState, scaled: bool) -> DynamicScale | None:
    """The state's loss scale, or a fresh one on the params' device for a float16 step."""
    if scaled and state.loss_scale is None:
        return DynamicScale.create(tree_device(state.params))
    return state.loss_scale if scaled else None
