"""Precision policies: which dtype the parameters are kept in, computed in, reduced in and returned in.

``fnnet.Precision(param_dtype, compute_dtype, reduce_dtype, output_dtype)`` has the fields of
jmp's ``Policy`` and FSDP2's ``MixedPrecisionPolicy``; the strings the steps and the ``Trainer``
take (``"32"``, ``"bf16-mixed"``, ``"16-mixed"``, ...) are named policies
(:data:`POLICIES`). A step resolves its ``precision=`` once (:meth:`Precision.resolve`).

* ``param_dtype``: the dtype the parameters live in. ``torch.bfloat16`` (or ``float16``) halves
  their memory, and the batch's floating-point tensors are cast to it before the forward
  (:meth:`Precision.cast_inputs`); the optimizer keeps float32 *master weights* in its state
  (:func:`fnnet.optim.master_weights`), applies each update to them and casts them back, so
  small updates are not lost; ZeRO-2 (``shard_optimizer=True``) shards the master weights with
  the rest of the optimizer state.
* ``compute_dtype``: the forward (and so backward) runs under ``torch.autocast`` to this dtype;
  ``None`` switches autocast off. ``float16`` brings the dynamic loss scale
  (``state.loss_scale``).
* ``reduce_dtype``: the dtype gradients are summed in across ranks (``distributed=True``); by
  default float32 when the params are 16-bit, else the gradients' own dtype. gloo's 16-bit
  collectives are unreliable: a 16-bit ``reduce_dtype`` on gloo is refused.
* ``output_dtype``: the dtype a predict step returns floating-point outputs in (float32:
  outputs computed in 16 bits come back as float32).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch

from . import tree as _tree
from .optim import GradientTransformation, MasterWeightsState, master_weights

__all__ = ["Precision", "POLICIES"]

_LOW = (torch.bfloat16, torch.float16)


def _name(dtype: torch.dtype | None) -> str:
    return "None" if dtype is None else str(dtype).removeprefix("torch.")


@dataclasses.dataclass(frozen=True)
class Precision:
    """A mixed-precision policy (jmp's ``Policy``, FSDP2's ``MixedPrecisionPolicy``); see the module docstring.

    Attributes:
        param_dtype: dtype the parameters are stored in (``None``: as given). A 16-bit dtype
            keeps float32 master weights in the optimizer state.
        compute_dtype: autocast dtype of the forward and backward passes (``None``: no autocast).
        reduce_dtype: dtype of the cross-rank gradient reduction (``None``: float32 under 16-bit
            params, else the gradients' dtype).
        output_dtype: dtype of a predict step's floating-point outputs computed in lower precision.
        name: the named policy this is (``"bf16-mixed"``), for messages; not compared.
    """

    param_dtype: torch.dtype | None = None
    compute_dtype: torch.dtype | None = None
    reduce_dtype: torch.dtype | None = None
    output_dtype: torch.dtype = torch.float32
    name: str | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self) -> None:
        for field in ("param_dtype", "compute_dtype", "reduce_dtype", "output_dtype"):
            value = getattr(self, field)
            if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
                raise TypeError(f"Precision.{field} must be a floating-point torch.dtype or None, got {value!r}")
        if self.reduce_dtype is None and self.param_dtype in _LOW:
            object.__setattr__(self, "reduce_dtype", torch.float32)

    @classmethod
    def resolve(cls, value: "Precision | str") -> "Precision":
        """``value`` itself, or the named policy it names (:data:`POLICIES`); a ``ValueError`` otherwise."""
        if isinstance(value, Precision):
            return value
        if isinstance(value, str) and value in POLICIES:
            return POLICIES[value]
        raise ValueError(f"precision must be one of {sorted(POLICIES)} or an fnnet.Precision(param_dtype=..., "
                         f"compute_dtype=..., reduce_dtype=..., output_dtype=...), got {value!r}")

    @property
    def loss_scaled(self) -> bool:
        """Whether the step keeps a dynamic loss scale (float16 compute or params)."""
        return torch.float16 in (self.compute_dtype, self.param_dtype)

    @property
    def keeps_master(self) -> bool:
        """Whether the optimizer keeps float32 master weights (16-bit params)."""
        return self.param_dtype in _LOW

    def __str__(self) -> str:
        return self.name or (f"Precision(param={_name(self.param_dtype)}, compute={_name(self.compute_dtype)}, "
                             f"reduce={_name(self.reduce_dtype)}, output={_name(self.output_dtype)})")

    # -- what a step does with it -------------------------------------------------------------
    def autocast(self, params: Any) -> contextlib.AbstractContextManager:
        """The context the forward runs in: ``torch.autocast`` to ``compute_dtype`` on the params'
        device type; with no ``compute_dtype`` a caller's active autocast is switched off."""
        if self.compute_dtype is None:
            active = [d for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
            if not active:
                return contextlib.nullcontext()
            if len(active) == 1:
                return torch.autocast(active[0], enabled=False)
            return _both_autocasts_off()
        leaves = [x for x in _tree.leaves(params) if isinstance(x, torch.Tensor)]
        return torch.autocast(leaves[0].device.type if leaves else "cpu", dtype=self.compute_dtype)

    def cast_params(self, params: Any) -> Any:
        """``params`` with every floating-point leaf in ``param_dtype`` (new tensors; as given without one)."""
        if self.param_dtype is None:
            return params
        return _tree.map(lambda x: x.to(self.param_dtype) if isinstance(x, torch.Tensor) and x.is_floating_point()
                         else x, params)

    def cast_inputs(self, batch: Any) -> Any:
        """The batch a step of this policy computes on: under 16-bit params, its floating-point
        tensors cast to ``param_dtype`` (FSDP2's ``cast_forward_inputs``: a float32 input meeting a
        bfloat16 ``LayerNorm`` weight is an error on the CPU), targets included; else as given."""
        if not self.keeps_master:
            return batch
        return _tree.map(lambda x: x.to(self.param_dtype) if isinstance(x, torch.Tensor) and x.is_floating_point()
                         else x, batch)

    def optimizer(self, optimizer: GradientTransformation) -> GradientTransformation:
        """``optimizer`` on float32 master weights when the params are 16-bit, else as is."""
        return master_weights(optimizer) if self.keeps_master else optimizer

    def prepare(self, state: Any) -> Any:
        """A state ready for a step of this policy: under 16-bit params, a state whose optimizer
        state is not yet on master weights (``TrainState.create(params, opt)`` with full-precision
        params, or a checkpoint) gets them: its params, in float32, become the master weights, its
        optimizer state the inner state, and its params are cast to ``param_dtype``. Otherwise the
        state as is. The caller's state is not changed."""
        opt_state = getattr(state, "opt_state", None)
        if not self.keeps_master or opt_state is None or isinstance(opt_state, MasterWeightsState):
            return state
        master = _tree.map(lambda x: x.to(torch.float32, copy=True) if isinstance(x, torch.Tensor)
                           and x.is_floating_point() else x, state.params)
        return state.replace(params=self.cast_params(state.params), opt_state=MasterWeightsState(master, state.opt_state))

    def check_backend(self, backend: str) -> None:
        """Refuse a 16-bit ``reduce_dtype`` on gloo (its bfloat16/float16 collectives are unreliable)."""
        if backend == "gloo" and self.reduce_dtype in _LOW:
            raise ValueError(f"precision {self}: reduce_dtype={_name(self.reduce_dtype)} on the gloo backend; gloo's "
                             "16-bit collectives are unreliable: use reduce_dtype=torch.float32 (or NCCL)")


@contextlib.contextmanager
def _both_autocasts_off():
    with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
        yield


POLICIES: dict[str, Precision] = {
    "32": Precision(name="32"),
    "32-true": Precision(name="32-true"),
    "bf16": Precision(compute_dtype=torch.bfloat16, name="bf16"),
    "bf16-mixed": Precision(compute_dtype=torch.bfloat16, name="bf16-mixed"),
    "16-mixed": Precision(compute_dtype=torch.float16, name="16-mixed"),
    "16": Precision(compute_dtype=torch.float16, name="16"),
}
"""The named policies: the strings ``precision=`` has always taken (autocast only, params as given)."""
