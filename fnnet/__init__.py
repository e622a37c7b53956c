"""fnnet: a functional, JAX-style training library on PyTorch.

Models are pure functions over parameter dicts (``fnnet.functional``), optimizers are
explicit state transforms (``fnnet.optim``), device placement is one function
(``fnnet.place``), and training is ``state, metrics = train_step(state, batch)``.
"""

from . import callbacks, compiler, data, metrics, models, optim, random, tree
from .checkpoint import load, load_state_dict, save, to_state_dict
from .data import ArrayLoader, load_digits, load_mnist
from .device import (
    default_device,
    device_count,
    device_info,
    devices,
    empty_cache,
    memory_stats,
    place,
    resolve_device,
    synchronize,
)
from .functional import Model, functional, grad, jit, value_and_grad, vmap
from .plot import plot_history, plot_samples
from .summary import summary
from .train import DynamicScale, TrainState, make_eval_step, make_train_step, supervised_loss
from .trainer import History, Trainer, parse_devices, seed_everything

__version__ = "0.1.0"

from . import recipes  # noqa: E402  (the chapter's jobs, built on everything above)
