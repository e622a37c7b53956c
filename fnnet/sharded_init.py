"""A model initialised straight into one rank's parts: :func:`init_parts`, for ``ZeRO(3)`` models too
large to build whole on one rank.

Build the module on the ``meta`` device (``with torch.device("meta"): net = GPT(...)``: shapes, no
memory), then ``step.init_parts(net, key)`` (``step`` a ``ZeRO(3)`` training step) gives this
rank's part of every parameter, equal to ``fnnet.functional(net_built_whole).init(key)`` cut to
the part. How: torch's layers draw their initial values in ``reset_parameters``, and
:meth:`fnnet.Model.init` runs every module's ``reset_parameters`` in ``module.modules()`` order
under ``fnnet.random.rng_scope(key)``. Here the same modules run in the same order under the same
key, so the same numbers are drawn, but each module is materialised alone (a copy of it, and of
what is under it, with real tensors) just before its ``reset_parameters`` and dropped after it,
once this rank's range of every parameter it wrote has been copied out. Every rank draws every
number (the time is the whole initialisation's); what is alive at once is the parts (``1 / W``)
plus one module with ``reset_parameters`` (for a transformer: one layer, never more than one
unit). What a ``reset_parameters`` wrote is found by value, whatever way it writes (in place,
through ``p.data``, rebinding ``p.data`` or the attribute): on ``meta`` each parameter starts as NaN
and counts as written once it is not all NaN; a real parameter starts as its value and counts as
written once that changed. A ``reset_parameters`` that reads its parameters' earlier values (rather
than writing them whole, as torch's layers do) sees those NaN on ``meta`` (a ``ValueError`` where
some are left) and the module's own values otherwise.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from . import random as _random
from . import tree as _tree

__all__ = ["init_parts"]


def _slots(module: nn.Module) -> list[tuple[dict, str, nn.Parameter]]:
    """``(owner's _parameters, attribute, parameter)`` of every parameter slot under ``module`` (ties repeated)."""
    return [(m._parameters, attr, p) for m in module.modules() for attr, p in m._parameters.items() if p is not None]


def _materialised(module: nn.Module, device: torch.device) -> tuple[nn.Module, dict[int, torch.Tensor]]:
    """A copy of ``module`` whose parameters are new tensors on ``device`` (ties kept), and, for each of
    the original parameters (by id), its tensor in the copy. A parameter on the ``meta`` device starts as
    NaN (the sentinel :func:`_written` looks for), a real one as a copy of its value."""
    memo: dict[int, Any] = {}
    twin = copy.deepcopy(module, memo)
    real: dict[int, nn.Parameter] = {}
    for store, attr, p in _slots(twin):
        if id(p) not in real:
            if p.device.type == "meta":
                t = torch.full(p.shape, float("nan"), dtype=p.dtype, device=device) if _has_nan(p) else \
                    torch.zeros(p.shape, dtype=p.dtype, device=device)
            else:
                t = p.detach().to(device, copy=True)
            real[id(p)] = nn.Parameter(t, requires_grad=False)
        store[attr] = real[id(p)]
    originals = {id(p): real[id(memo[id(p)])] for _, _, p in _slots(module)}
    return twin, originals


def _has_nan(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def _written(now: torch.Tensor, was: torch.Tensor, rebound: bool) -> bool:
    """Whether a ``reset_parameters`` wrote the parameter that was ``was`` and is ``now``: judged by value
    (``p.data.normal_()`` and ``p.data = ...`` write without bumping ``_version``), against the NaN it
    started as on ``meta`` or its value otherwise (a reset writing the same values changes nothing)."""
    if rebound:
        return True
    if was.device.type == "meta":
        return not _has_nan(now) or not bool(torch.isnan(now).all())
    return now.shape != was.shape or not torch.equal(now.detach(), was.detach().to(now.device))


def init_parts(module: nn.Module, key: _random.Key, layout: Any, *, device: Any = None) -> dict[str, torch.Tensor]:
    """This rank's part of every parameter of ``module``, initialised as :meth:`fnnet.Model.init` under
    ``key`` would initialise the whole module (see the module docstring), one module at a time.

    Args:
        module: the model, typically built on the ``meta`` device (a module with real tensors works
            too: a parameter no ``reset_parameters`` writes keeps its value, cut to the part).
        key: an :class:`fnnet.random.Key`.
        layout: the :class:`fnnet.shard.Layout` of the ZeRO-3 step (``step.init_parts`` passes it).
        device: where the parts live (default: the CPU).

    Returns:
        ``{key path: 1-D part}`` in the layout's order: ``state.params`` of a ZeRO-3 state.

    Raises:
        ValueError: a parameter that no module's ``reset_parameters`` writes and that has no value
            (on the ``meta`` device), named, with what to do.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"init_parts: module must be a torch.nn.Module (built on the meta device), got "
                        f"{type(module).__name__}")
    if not isinstance(key, _random.Key):
        raise TypeError(f"init_parts expects an fnnet.random.Key, got {type(key).__name__}")
    dev = torch.device("cpu" if device is None else device)
    paths = [p for p, _ in _tree.leaves_with_path(layout.whole)]
    index = {p: i for i, p in enumerate(paths)}
    canonical: dict[int, int] = {}  # id(parameter) -> its leaf index (a tied parameter: its first name's)
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) not in canonical and name in index:
            canonical[id(p)] = index[name]
    missing = sorted(set(paths) - {paths[i] for i in canonical.values()})
    if missing:
        raise ValueError(f"init_parts: the step's parameters {missing[:5]} are not parameters of the "
                         f"{type(module).__name__} given: pass the module the step's model was made from")
    parts = [torch.empty(lp.hi - lp.lo, dtype=w.dtype, device=dev)
             for lp, w in zip(layout.parts, _tree.leaves(layout.whole))]
    written: set[int] = set()
    with _random.rng_scope(key, [dev]), torch.no_grad():
        for m in module.modules():  # Model.init's order
            reset = getattr(m, "reset_parameters", None)
            if not callable(reset):
                continue
            twin, real = _materialised(m, dev)
            slots = {id(p): (store, attr) for store, attr, p in _slots(twin)}
            twin.reset_parameters()
            for _, _, p in _slots(m):
                i = canonical[id(p)]
                store, attr = slots[id(real[id(p)])]
                now = store[attr]  # reset may replace the parameter instead of writing into it
                if not _written(now, p, rebound=now is not real[id(p)]):
                    continue  # not written by this reset
                if p.device.type == "meta" and _has_nan(now) and bool(torch.isnan(now).any()):
                    raise ValueError(
                        f"init_parts: {type(m).__name__}.reset_parameters wrote only part of {paths[i]!r} (some "
                        "elements are still unset): it reads the parameter's earlier values, which a module on the "
                        "meta device does not have; write the whole parameter in reset_parameters, or build the "
                        "model with real tensors")
                lp = layout.parts[i]
                parts[i].copy_(now.detach().reshape(-1)[lp.lo:lp.hi])
                written.add(i)
            del twin, real
    by_index = {i: p for p in module.parameters() for i in [canonical[id(p)]]}
    unset = [paths[i] for i in range(len(paths)) if i not in written and by_index[i].device.type == "meta"]
    if unset:
        raise ValueError(f"init_parts: {len(unset)} parameter(s) on the meta device that no module's "
                         f"reset_parameters writes: {unset[:8]}{' ...' if len(unset) > 8 else ''} (an nn.Parameter "
                         "drawn in __init__, a layer whose initialiser is private such as nn.MultiheadAttention's "
                         "_reset_parameters): initialise them in a reset_parameters of their module, or build the "
                         "model with real tensors (Model.init keeps such parameters' current values)")
    for i, lp in enumerate(layout.parts):
        if i not in written:  # a real value no reset_parameters overwrites: kept, as Model.init keeps it
            parts[i].copy_(by_index[i].detach().reshape(-1)[lp.lo:lp.hi])
    return _tree.unflatten(layout.spec, parts)
