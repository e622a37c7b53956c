"""Explicit, splittable random keys in the JAX style.

A :class:`Key` is a small immutable value (two 64-bit words), not a tensor and not a global:
``split`` and ``fold_in`` derive new keys by hashing (SplitMix64), so the same key gives the
same numbers on every run, and fnnet never reads or changes torch's global RNG state. To
run torch code under a key, either pass ``generator(key, device)`` to a torch sampling
function, use the samplers here (``normal``, ``uniform``, ``permutation``, ...), or wrap code
that draws from the global RNG (``nn.Dropout``) in :func:`rng_scope`, which seeds from the key
and restores the caller's global state afterwards.

Keys are pytree leaves: they live in ``TrainState.key``, pass through ``place`` untouched
(they never sit on a GPU, so deriving a key never waits on the device) and are saved in
checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Sequence

import torch

__all__ = [
    "Key",
    "key",
    "split",
    "fold_in",
    "seed_of",
    "generator",
    "rng_scope",
    "normal",
    "uniform",
    "randint",
    "permutation",
    "bernoulli",
    "categorical",
    "seed_everything",
]

_MASK = (1 << 64) - 1


def _mix(z: int) -> int:
    """SplitMix64's finaliser: a bijective 64-bit hash with good avalanche."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


@dataclasses.dataclass(frozen=True)
class Key:
    """A random key: two 64-bit words. Make one with :func:`key`; derive with :func:`split`."""

    hi: int
    lo: int

    def __post_init__(self) -> None:
        for name in ("hi", "lo"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= _MASK:
                raise ValueError(f"Key.{name} must be an int in [0, 2**64), got {v!r}")

    def __repr__(self) -> str:
        return f"Key({self.hi:#018x}, {self.lo:#018x})"

    def to_tensor(self) -> torch.Tensor:
        """The key as an int64 tensor of shape (2,) (two's complement), for checkpoints."""
        signed = [v - (1 << 64) if v >= (1 << 63) else v for v in (self.hi, self.lo)]
        return torch.tensor(signed, dtype=torch.int64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "Key":
        """Inverse of :meth:`to_tensor`."""
        if t.shape != (2,) or t.dtype != torch.int64:
            raise ValueError(f"a Key tensor is int64 of shape (2,), got {t.dtype} {tuple(t.shape)}")
        hi, lo = (int(v) & _MASK for v in t.tolist())
        return cls(hi, lo)


class _TracingKey(Key):
    """The key a compiled (``jit=True``) step passes to its loss function.

    Inside ``torch.compile`` randomness must come from torch's RNG ops (dropout,
    ``torch.rand``), which fnnet seeds from the state's key around the compiled call; a key
    value inside the compiled region would be baked in as a constant. Using this key with
    :func:`split`, :func:`fold_in` or a sampler raises instead of silently repeating numbers.
    """

    def __repr__(self) -> str:
        return "TRACING_KEY"


TRACING_KEY = _TracingKey(0, 0)


def key(seed: int) -> Key:
    """A key from an integer seed (``jax.random.key``). Equal seeds give equal keys."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    s = seed & _MASK
    return Key(_mix(s), _mix(s ^ 0x6A09E667F3BCC909))


def _check(k: Key) -> None:
    if not isinstance(k, Key):
        raise TypeError(f"expected an fnnet.random.Key (from fnnet.random.key(seed)), got {type(k).__name__}")
    if isinstance(k, _TracingKey):
        raise ValueError(
            "this key was passed into a compiled (jit=True) step, where fnnet keys cannot be used: "
            "draw random numbers with torch ops (dropout, torch.rand), which fnnet seeds from the "
            "state's key around the compiled call, or use jit=False"
        )


def split(k: Key, num: int = 2) -> tuple[Key, ...]:
    """``num`` new, independent keys derived from ``k`` (``jax.random.split``)."""
    _check(k)
    if not isinstance(num, int) or num < 1:
        raise ValueError(f"split: num must be a positive int, got {num!r}")
    out = []
    for i in range(num):
        c = _mix((i << 1) | 1)
        out.append(Key(_mix(k.hi ^ c), _mix((k.lo + c) & _MASK)))
    return tuple(out)


def fold_in(k: Key, data: int) -> Key:
    """A new key that mixes an integer (an epoch, a step, a rank) into ``k`` (``jax.random.fold_in``)."""
    _check(k)
    if not isinstance(data, int) or isinstance(data, bool):
        raise TypeError(f"fold_in: data must be an int, got {type(data).__name__}")
    d = _mix((data & _MASK) ^ 0x3C6EF372FE94F82B)
    return Key(_mix(k.hi ^ d), _mix(k.lo ^ _mix(d)))


def seed_of(k: Key) -> int:
    """A non-negative 63-bit integer seed derived from ``k`` (for ``torch.Generator.manual_seed``)."""
    _check(k)
    return _mix(k.hi ^ _mix(k.lo)) >> 1


def generator(k: Key, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device``, seeded from ``k``: the bridge from a key to torch's samplers.

    JAX samples from a key directly (``jax.random.normal(key, shape)``); torch samples from a
    ``torch.Generator``. ``generator(k)`` is that generator for the key, so any torch sampling
    function that takes ``generator=`` draws under the key:
    ``torch.randn(3, generator=fnnet.random.generator(k))`` equals ``fnnet.random.normal(k, (3,))``.
    Each call builds a new generator in the same start state, so the same key gives the same
    numbers; torch's global RNG is neither read nor changed. For code that draws from the
    global RNG (dropout layers), use :func:`rng_scope` instead.

    Args:
        k: the key (a :class:`Key`, from :func:`key`, :func:`split` or :func:`fold_in`).
        device: where the generator draws (``"cpu"``, ``"cuda:0"``...); a CUDA sampler needs a CUDA generator.

    Returns:
        A new ``torch.Generator`` on ``device`` whose seed is a function of ``k`` alone.
    """
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(seed_of(k))
    return g


@contextlib.contextmanager
def rng_scope(k: Key | None, devices: Sequence[torch.device | str] = ()) -> Iterator[None]:
    """Run a block that draws from torch's global RNG (dropout) deterministically under ``k``.

    The global RNG of the CPU and of each CUDA device in ``devices`` is saved, seeded from
    ``k``, and restored on exit, so the caller's global state is left exactly as it was.
    ``k=None`` runs the block unchanged.
    """
    if k is None:
        yield
        return
    _check(k)
    cuda = [torch.device(d) for d in devices if torch.device(d).type == "cuda"]
    with torch.random.fork_rng(devices=cuda, enabled=True):
        seed = seed_of(k)
        torch.random.default_generator.manual_seed(seed)
        for d in cuda:
            torch.cuda.default_generators[d.index or 0].manual_seed(seed)
        yield


def _sample_device(device: torch.device | str | None) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def normal(k: Key, shape: Sequence[int], *, dtype: torch.dtype = torch.float32,
           device: torch.device | str | None = None) -> torch.Tensor:
    """Standard normal samples of ``shape`` under ``k``."""
    dev = _sample_device(device)
    return torch.randn(tuple(shape), generator=generator(k, dev), dtype=dtype, device=dev)


def uniform(
    k: Key, shape: Sequence[int], *, low: float = 0.0, high: float = 1.0, dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uniform samples in ``[low, high)`` of ``shape`` under ``k``."""
    dev = _sample_device(device)
    u = torch.rand(tuple(shape), generator=generator(k, dev), dtype=dtype, device=dev)
    return u * (high - low) + low


def randint(k: Key, shape: Sequence[int], low: int, high: int, *,
            device: torch.device | str | None = None) -> torch.Tensor:
    """Integers uniform in ``[low, high)`` (int64) under ``k``."""
    dev = _sample_device(device)
    return torch.randint(low, high, tuple(shape), generator=generator(k, dev), device=dev)


def permutation(k: Key, n: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """A random permutation of ``range(n)`` (int64) under ``k``."""
    dev = _sample_device(device)
    return torch.randperm(n, generator=generator(k, dev), device=dev)


def bernoulli(k: Key, p: float, shape: Sequence[int], *, device: torch.device | str | None = None) -> torch.Tensor:
    """Booleans that are True with probability ``p`` under ``k``."""
    return uniform(k, shape, device=device) < p


def categorical(k: Key, logits: torch.Tensor, axis: int = -1) -> torch.Tensor:
    """Draw category indices from unnormalised log-probabilities under ``k`` (``jax.random.categorical``).

    Samples ``argmax(logits + g)`` along ``axis`` with ``g`` standard Gumbel noise (the Gumbel-max
    trick, as JAX does), drawn from a generator seeded from ``k`` on the logits' device, so
    torch's global RNG is neither read nor changed and the same key gives the same draws.
    ``-inf`` logits are never drawn (top-k masks).

    Args:
        k: the key.
        logits: a floating-point tensor; ``axis`` indexes the categories, every other dimension
            is a batch dimension.
        axis: the categories' dimension (default the last).

    Returns:
        int64 indices of ``logits``' shape without ``axis``.

    Raises:
        ValueError: ``logits`` that are not floating point, or an empty ``axis``.
    """
    _check(k)
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise ValueError(f"categorical: logits must be a floating-point tensor, got "
                         f"{getattr(logits, 'dtype', type(logits).__name__)}")
    if logits.ndim == 0 or logits.shape[axis] == 0:
        raise ValueError(f"categorical: logits of shape {tuple(logits.shape)} have no categories along axis {axis}")
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    u = torch.rand(logits.shape, generator=generator(k, logits.device), dtype=dtype, device=logits.device)
    gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(dtype).tiny)))
    return torch.argmax(logits.to(dtype) + gumbel, dim=axis)


def seed_everything(seed: int) -> int:
    """Seed Python's, NumPy's and torch's global RNGs (Lightning's ``seed_everything``); returns ``seed``.

    fnnet itself never draws from global RNGs (it uses explicit keys); this is for the rest
    of a script: module constructors, torch ``DataLoader(shuffle=True)``, numpy code.
    """
    import random

    import numpy as np

    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return seed
