"""fnnet: a functional, JAX-style training library on PyTorch.

Models are pure functions over parameter dicts (``fnnet.functional``), optimizers are
explicit state transforms (``fnnet.optim``), device placement is one function
(``fnnet.place``), and training is ``state, metrics = train_step(state, batch)``.

The public names below are imported on first use (PEP 562), so ``import fnnet`` is cheap and
the ``fnnet`` command answers ``--help`` without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.4.0"

# public name -> the module that defines it
_EXPORTS = {
    "checkpoint": ("load", "load_state_dict", "save", "to_state_dict"),
    "checkpoint.sharded": ("load_sharded", "save_sharded"),
    "data": ("ArrayLoader", "load_digits", "load_mnist", "split_batch"),
    "device": ("default_device", "device_count", "device_info", "devices", "empty_cache", "memory_stats",
               "parse_devices", "place", "resolve_device", "synchronize", "tree_device"),
    "_functional": ("Model", "functional", "grad", "jit", "value_and_grad", "vmap"),
    "_remat": ("remat",),
    "memory": ("MemoryReport", "memory_report"),
    "plot": ("plot_history", "plot_samples"),
    "precision": ("Precision",),
    "random": ("seed_everything",),
    "sampling": ("generate",),
    "state": ("DynamicScale", "TrainState", "all_finite", "grads_finite"),
    "_summary": ("SummaryRow", "SummaryTable", "summary"),
    "train": ("GradResult", "make_eval_step", "make_grad_fn", "make_predict_step", "make_train_step",
              "supervised_loss"),
    "trainer": ("History", "Trainer"),
}
# ``fnnet.functional``, ``fnnet.summary`` and ``fnnet.remat`` are functions; their modules are ``_functional``,
# ``_summary``, ``_remat``.
_MODULES = ("batch", "callbacks", "checkpoint", "comm", "compiler", "data", "datasets", "device", "distributed", "interop",
            "layout", "loss", "memory", "metrics", "models", "optim", "parallel", "plot", "precision", "random", "sampling",
            "state", "step", "strategy",
            "train", "trainer", "tree")
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted([*_WHERE, *_MODULES])


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    elif name in _MODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'fnnet' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from . import (batch, callbacks, checkpoint, comm, compiler, data, datasets, device, distributed, interop,
                   layout, loss, memory, metrics, models, optim, parallel, plot, precision, random, sampling, state, step,
                   strategy, train, trainer, tree)
    from ._functional import Model, functional, grad, jit, value_and_grad, vmap
    from ._remat import remat
    from ._summary import SummaryRow, SummaryTable, summary
    from .checkpoint import load, load_state_dict, save, to_state_dict
    from .checkpoint.sharded import load_sharded, save_sharded
    from .data import ArrayLoader, load_digits, load_mnist, split_batch
    from .device import (default_device, device_count, device_info, devices, empty_cache, memory_stats,
                         parse_devices, place, resolve_device, synchronize, tree_device)
    from .memory import MemoryReport, memory_report
    from .plot import plot_history, plot_samples
    from .precision import Precision
    from .random import seed_everything
    from .sampling import generate
    from .state import DynamicScale, TrainState, all_finite, grads_finite
    from .train import (GradResult, make_eval_step, make_grad_fn, make_predict_step, make_train_step,
                        supervised_loss)
    from .trainer import History, Trainer
