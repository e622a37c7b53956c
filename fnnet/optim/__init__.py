"""Optimizers as explicit state transforms: optax's protocol on torch tensors.

An optimizer is a :class:`GradientTransformation`, a pair of pure functions::

    opt = fnnet.optim.adam(1e-3)
    state = opt.init(params)
    updates, state = opt.update(grads, state, params)
    params = fnnet.optim.apply_updates(params, updates)

Building blocks (``scale_by_adam``, ``trace``, ``clip_by_global_norm``, ...) compose with
:func:`chain`; aliases (``sgd``, ``adam``, ``adamw``, ``rmsprop``, ``adagrad``) are short
chains whose trajectories match ``torch.optim``'s. Schedules are functions ``step -> value``.

Layout: ``base.py`` (the protocol, ``chain``, ``apply_updates``, the learning rate in the
state), ``transforms.py`` (building blocks), ``aliases.py``, ``schedules.py``, ``master.py``
(float32 master weights for low-precision params).
"""

from . import aliases, base, master, schedules, torch_optim, transforms
from .aliases import *  # noqa: F401,F403  (each module's __all__ is its public surface)
from .base import *  # noqa: F401,F403
from .master import *  # noqa: F401,F403
from .schedules import *  # noqa: F401,F403
from .torch_optim import *  # noqa: F401,F403
from .transforms import *  # noqa: F401,F403

# The package exports exactly what its modules export: one list per module, kept there.
__all__ = [*base.__all__, *transforms.__all__, *aliases.__all__, *schedules.__all__, *torch_optim.__all__,
           *master.__all__]
