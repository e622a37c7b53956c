"""fnnet: a functional, JAX-style training library on PyTorch.

Models are pure functions over parameter dicts (``fnnet.functional``), optimizers are
explicit state transforms (``fnnet.optim``), device placement is one function
(``fnnet.place``), and training is ``state, metrics = train_step(state, batch)``.
"""

from . import tree, random
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

__version__ = "0.1.0"
