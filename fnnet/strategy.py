"""Strategies: how a training step is laid out over devices or ranks, as objects.

A *strategy* decides three things and nothing else: where the state lives (one device, a copy
per device, a part of the optimizer state per rank), how the gradients of a batch are reduced
(a weighted mean over shards, an all-reduce over a process group, a reduce-scatter within a
shard group and an all-reduce across replicas), and how the state is gathered whole for a
checkpoint and cut again. The step itself, the key split, the loss scale, accumulation and the
update, is the one skeleton of :func:`fnnet.step.build_train_step`; a strategy plugs its
gradient source (and, when it shards, its update) into it. Lightning's ``strategy="ddp"`` and
torch's ``fully_shard(mesh=...)`` are the models::

    step = fnnet.make_train_step(loss_fn, opt)                                       # SingleDevice()
    step = fnnet.make_train_step(loss_fn, opt, strategy=fnnet.parallel.Replicate(["cuda:0", "cuda:1"]))
    step = fnnet.make_train_step(loss_fn, opt, strategy=fnnet.distributed.DDP())      # or "ddp"
    step = fnnet.make_train_step(loss_fn, opt, strategy=fnnet.distributed.ZeRO(2))    # or "zero2"
    step = fnnet.make_train_step(loss_fn, opt, strategy=fnnet.distributed.HSDP(mesh)) # a 2-D DeviceMesh

Where each lives: :class:`Strategy` and :class:`SingleDevice` here; :class:`fnnet.parallel.Replicate`
in :mod:`fnnet.parallel`; :class:`fnnet.distributed.DDP`, :class:`~fnnet.distributed.ZeRO` and
:class:`~fnnet.distributed.HSDP` in :mod:`fnnet.distributed`. :func:`fnnet.train.make_train_step`
resolves the string shorthands and the old flags.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

from .step import TrainStep, build_train_step, check_accumulate, local_gradients, step_parts, traced_grad_fn

__all__ = ["StepOptions", "Strategy", "SingleDevice"]


class StepOptions(NamedTuple):
    """The options every training step takes, whatever its strategy (see :func:`fnnet.make_train_step`).

    ``precision`` is one value handed down to the gradient function (a string of
    ``fnnet.PRECISIONS`` today).
    """

    jit: bool = False
    donate: bool = False
    precision: Any = "32"
    compile_options: Mapping[str, Any] | None = None
    skip_nonfinite: bool = False
    accumulate: int = 1

    def checked(self) -> "StepOptions":
        """These options with ``accumulate`` checked (a positive int)."""
        return self._replace(accumulate=check_accumulate(self.accumulate))


class Strategy:
    """How a training step is laid out over devices or ranks (the base class of every strategy).

    A strategy is a small description (devices, a process group, a mesh); :meth:`build` makes
    the :class:`fnnet.step.TrainStep` for one loss and optimizer, with whatever it caches
    between steps (bucket buffers, the sharding layout) held by that step, so one strategy
    object may build several steps.

    Subclasses implement :meth:`build`; ``name`` is the shorthand the strategy answers to
    (``"ddp"``) and ``devices`` the devices its eval and predict steps run on (``None``: the
    state's).
    """

    name: str = "strategy"
    devices: Any = None

    def build(self, loss_fn: Callable, optimizer: Any, options: StepOptions) -> TrainStep:
        """The training step of ``loss_fn`` and ``optimizer`` under this strategy."""
        raise NotImplementedError(f"{type(self).__name__}.build")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SingleDevice(Strategy):
    """One device, the state's: the gradient of the whole batch and one update (the default).

    With ``jit=True`` the whole step (gradients and update) is one compiled graph; with
    accumulation, the gradient function is compiled on its own and the window's last
    micro-batch updates.
    """

    name = "single"

    def build(self, loss_fn: Callable, optimizer: Any, options: StepOptions) -> TrainStep:
        o = options.checked()
        parts = step_parts(loss_fn, precision=o.precision, skip_nonfinite=o.skip_nonfinite, jit=o.jit,
                           compile_options=o.compile_options)
        compiled = traced_grad_fn(parts, o.compile_options) if o.jit and o.accumulate > 1 else None
        reduce, accumulate_fn = local_gradients(parts, compiled)
        return build_train_step(reduce, optimizer, parts, donate=o.donate, jit=o.jit,
                                compile_options=o.compile_options, compile_whole=True, accumulate=o.accumulate,
                                accumulate_fn=accumulate_fn, strategy=self, precision=o.precision)
