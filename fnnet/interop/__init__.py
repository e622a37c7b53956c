"""Interop with JAX, flax and optax: arrays, flax linen variables and checkpoints.

``to_jax`` / ``from_jax`` move array trees between torch and JAX through DLPack (zero-copy
where the layout allows); ``to_flax`` / ``from_flax`` convert fnnet params and buffers of a
torch module to and from the variables of its flax linen twin; ``flax_names`` shows which flax
layer each torch layer maps to. Checkpoints need no function of their own: ``fnnet.save``
writes safetensors that ``safetensors.flax.load_file`` reads, ``fnnet.load`` reads what
``safetensors.flax.save_file`` writes, and ``from_flax`` takes either, or the bytes of
``flax.serialization.to_bytes(variables)``.

JAX, flax and optax are the optional extra ``pip install "fnnet[jax]"``: this package imports
without them, and each function raises an ``ImportError`` saying so when called. The
implementation is in :mod:`fnnet.interop.jax` (its docstring has the layout table and the
aliasing rule: never write in place into a tensor that shares memory with a JAX array).
"""

from .jax import flax_names, from_flax, from_jax, to_flax, to_jax

__all__ = ["to_jax", "from_jax", "to_flax", "from_flax", "flax_names"]
