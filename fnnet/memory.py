"""What one training step holds in memory, by tensor: :func:`memory_report`.

``print(fnnet.memory_report(step, state, batch))`` runs the step once and counts the bytes of
the parameters, the optimizer state, the gradients and the activations the forward pass keeps
for the backward pass. It counts tensors, not the process's resident size, so the numbers are
exact on the CPU and comparable with a GPU allocator's statistics (``torch.cuda.memory_stats``).

How the activations and gradients are counted: every tensor an operation creates during the
step is seen by a ``TorchDispatchMode`` and its storage is held on to, deduplicated by storage
(a view costs nothing; several tensors on one storage count once). When the backward pass
starts (the first operation run by an autograd node), the storages made by the forward pass
that something other than the report still holds are the *activations*: what autograd saved,
what ``torch.utils.checkpoint`` keeps of a remat block (its inputs, a selective policy's saved
outputs), the loss itself and the backward pass's seed (``ones_like(loss)``, made by
``torch.autograd.grad`` before the first node runs). When the backward pass ends, the storages
it made that are still held are the *gradients*. (So the report's own run needs more memory than
the step: every temporary of the forward pass lives until the backward pass starts.) Tensors the step was given (params, buffers, the batch) are never
counted as activations: they exist before the step. Recomputation inside the backward pass
(remat) makes tensors that die within it, so it adds to neither.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import tree as _tree

__all__ = ["MemoryReport", "memory_report", "tree_bytes"]


def _storages(tree: Any) -> dict[tuple[torch.device, int], int]:
    """``{(device, data_ptr): nbytes}`` of the storages under ``tree``'s tensor leaves (each storage once)."""
    out: dict[tuple[torch.device, int], int] = {}
    for x in _tree.leaves(tree):
        if isinstance(x, torch.Tensor) and x.device.type != "meta":
            s = x.untyped_storage()
            out[(x.device, s.data_ptr())] = s.nbytes()
    return out


def tree_bytes(tree: Any) -> int:
    """The bytes of the storages under ``tree``'s tensors, each storage counted once (views and ties too)."""
    return sum(_storages(tree).values())


class _Phases(TorchDispatchMode):
    """Holds every storage an op creates, and takes stock when the backward pass starts and ends."""

    def __init__(self, given: set):
        super().__init__()
        self.given = given  # storages that existed before the step
        self.held: dict[tuple, tuple[Any, str]] = {}  # storage key -> (storage, phase that made it)
        self.phase = "forward"
        self.activations: dict[tuple, int] = {}
        self.gradients: dict[tuple, int] = {}

    def _alive(self, phase: str) -> dict[tuple, int]:
        """The storages ``phase`` made that a tensor still uses (one reference is ours); then let go of them."""
        alive = {k: s.nbytes() for k, (s, p) in self.held.items()
                 if p == phase and torch._C._storage_Use_Count(s._cdata) > 1}
        self.held = {k: v for k, v in self.held.items() if v[1] != phase}
        return alive

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        in_backward = torch._C._current_autograd_node() is not None
        if self.phase == "forward" and in_backward:
            self.activations, self.phase = self._alive("forward"), "backward"
        elif self.phase == "backward" and not in_backward:
            self.gradients, self.phase = self._alive("backward"), "after"
        out = func(*args, **(kwargs or {}))
        if self.phase != "after":
            for t in _tree.leaves(out):
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    s = t.untyped_storage()
                    k = (t.device, s.data_ptr())
                    if k not in self.given and k not in self.held and s.nbytes() > 0:
                        self.held[k] = (s, self.phase)
        return out


class MemoryReport(NamedTuple):
    """Bytes held by one training step (see :func:`memory_report`); ``str()`` is a table.

    Attributes:
        params: the state's parameters.
        grads: the gradients the backward pass leaves (one per trainable parameter on one device;
            the reduced buckets under ``distributed=True``).
        opt_state: the optimizer state (storages shared with the params not counted again).
        activations: what the forward pass keeps alive for the backward pass (saved tensors,
            checkpoint inputs, the loss).
        counts: the number of storages behind each of the four.
    """

    params: int
    grads: int
    opt_state: int
    activations: int
    counts: dict[str, int]

    @property
    def total(self) -> int:
        """Bytes of parameters, gradients, optimizer state and saved activations together."""
        return self.params + self.grads + self.opt_state + self.activations

    def __str__(self) -> str:
        rows = [("parameters", self.params, self.counts["params"]), ("gradients", self.grads, self.counts["grads"]),
                ("optimizer state", self.opt_state, self.counts["opt_state"]),
                ("saved activations", self.activations, self.counts["activations"])]
        lines = [f"{'memory of one step':<20}{'storages':>10}{'bytes':>15}{'':>12}"]
        for name, n, k in rows:
            lines.append(f"{name:<20}{k:>10}{n:>15,}{_human(n):>12}")
        lines.append(f"{'total':<20}{'':>10}{self.total:>15,}{_human(self.total):>12}")
        return "\n".join(lines)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""  # unreachable


def memory_report(step: Callable, state: Any, batch: Any) -> MemoryReport:
    """Run ``step(state, batch)`` once and count the bytes it holds, by tensor.

    Args:
        step: an eager training step (:func:`fnnet.make_train_step` with ``jit=False``; a
            compiled step's tensors live inside the compiled code, out of the report's sight).
            A donating step runs on a copy of ``state``.
        state: a :class:`fnnet.TrainState`; it is not changed.
        batch: one batch, as the step takes it.

    Returns:
        A :class:`MemoryReport`: ``params``, ``grads``, ``opt_state`` and ``activations`` in
        bytes (``print`` it for a table). The activations are what the forward pass leaves alive
        for the backward pass (see the module docstring): the memory
        :func:`fnnet.remat` trades for recomputation.

    Raises:
        ValueError: the step is compiled (``jit=True``), or it never ran a backward pass.
    """
    if getattr(step, "jit", False):
        raise ValueError("memory_report measures an eager step: build it with jit=False (a compiled step's "
                         "tensors are allocated inside the compiled code, where a TorchDispatchMode cannot see them)")
    if getattr(step, "donate", False):
        state = _tree.map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, state)
    params, opt_state = _storages(state.params), _storages(state.opt_state)
    opt_only = {k: v for k, v in opt_state.items() if k not in params}
    given = set(_storages((state, batch)))
    mode = _Phases(given)
    with mode:
        step(copy.copy(state), batch)
    if mode.phase == "forward":
        raise ValueError(f"memory_report: {getattr(step, '__name__', 'the step')} ran no backward pass "
                         "(a training step computes gradients)")
    if mode.phase == "backward":  # the step ended with its backward pass
        mode.gradients = mode._alive("backward")
    counts = {"params": len(params), "grads": len(mode.gradients), "opt_state": len(opt_only),
              "activations": len(mode.activations)}
    return MemoryReport(sum(params.values()), sum(mode.gradients.values()), sum(opt_only.values()),
                        sum(mode.activations.values()), counts)
