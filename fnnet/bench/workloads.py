"""The chapter's benchmark workloads: what ``fnnet bench`` times (``benches/`` times them too).

Each ``*_case`` builder sets one variant up (data, model, optimizer; for compiled variants
the first, compiling call) and returns a :class:`Case` whose ``run()`` does one unit of work
(one matrix product, a block of training steps, one epoch) and then waits for the device.
Timing ``run()`` with a wall clock therefore measures the work, not the kernel launches: the
chapter's CUDA matmul timing stopped the clock before the GPU had finished.

The "chapter" variants are the chapter's own loops (nn.Module + ``torch.optim.Adam`` + a loss
module, DataLoader for the CNN), written in their fastest honest form: no per-step
``loss.item()``, so no per-step host sync in either the baseline or fnnet.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .. import optim
from .._functional import functional
from ..data import ArrayLoader
from ..device import place
from ..models import CnnModel, LinearRegression, linreg_data
from ..random import key
from ..state import TrainState
from ..train import make_train_step
from ..trainer import Trainer

__all__ = [
    "Case",
    "Unavailable",
    "timed",
    "reset_compiler",
    "LinearRegression",
    "CnnModel",
    "linreg_data",
    "cnn_data",
    "matmul_case",
    "linreg_case",
    "cnn_case",
    "MATMUL_VARIANTS",
    "LINREG_VARIANTS",
    "CNN_VARIANTS",
    "CUDA_ONLY",
    "CPU_ONLY",
    "runs_on",
    "COMPILED",
    "BASELINE",
    "SECOND_BASELINE",
    "variants",
    "build",
]

# Variants per workload, the chapter's way first. Ratios are taken against BASELINE on the
# same device; CUDA_ONLY variants are skipped on CPU, CPU_ONLY ones on CUDA; COMPILED ones go through torch.compile.
MATMUL_VARIANTS = ("fp32", "tf32", "bf16")
LINREG_VARIANTS = ("chapter", "fnnet-eager", "fnnet-eager-donate", "fnnet-jit-donate", "fnnet-jit-cudagraphs")
CNN_VARIANTS = ("chapter-workers0", "chapter-workers4", "fnnet-trainer", "fnnet-trainer-jit",
                "fnnet-trainer-contiguous", "fnnet-trainer-channels-last", "fnnet-trainer-bf16")
# The CNN's baseline is the chapter's loop with num_workers=0, docs/performance.md's headline (the stricter
# one: faster than 4 workers on small machines). The chapter's own num_workers=4 set-up is kept as
# a second baseline, labelled so in the report; its ratio is against the first.
BASELINE = {"matmul": "fp32", "linreg": "chapter", "cnn": "chapter-workers0"}
SECOND_BASELINE = {"cnn": "chapter-workers4"}
CUDA_ONLY = frozenset({"tf32", "bf16", "fnnet-jit-cudagraphs", "fnnet-trainer-channels-last", "fnnet-trainer-bf16"})
# The Trainer's layout option on the device where it is not the default (channels-last is the CPU's).
CPU_ONLY = frozenset({"fnnet-trainer-contiguous"})
COMPILED = frozenset({"fnnet-jit-donate", "fnnet-jit-cudagraphs", "fnnet-trainer-jit"})


class Unavailable(RuntimeError):
    """This variant cannot run here (no CUDA, or a CUDA-only variant on the CPU)."""


@dataclasses.dataclass
class Case:
    """One variant of one workload, set up and ready to time.

    Attributes:
        workload: ``"matmul"``, ``"linreg"`` or ``"cnn"``.
        variant: one of the workload's ``*_VARIANTS``.
        device: where it runs.
        run: one unit of work, synchronised (see :func:`timed`).
        work: how much one ``run()`` does, in ``unit``'s numerator (GFLOP, steps, samples).
        unit: the throughput unit (``"GFLOP/s"``, ``"steps/s"``, ``"samples/s"``).
        size: the problem size, for the report.
        first_call_s: the first call's time (for compiled variants: the compilation), measured
            during setup and never part of the steady-state timings.
    """

    workload: str
    variant: str
    device: torch.device
    run: Callable[[], Any]
    work: float
    unit: str
    size: dict[str, Any]
    first_call_s: float | None = None

    @property
    def baseline(self) -> str:
        return BASELINE[self.workload]

    def throughput(self, seconds: float) -> float:
        return self.work / seconds if seconds > 0 else float("nan")


def timed(fn: Callable[[], Any], device: torch.device | str) -> Callable[[], Any]:
    """``fn`` followed by a wait for ``device``: wrap what you time with it.

    CUDA runs asynchronously: without the wait a timer measures how fast Python queues
    kernels. The synchronisation is *inside* the timed function, so every timing harness
    (pytest-benchmark, ``fnnet bench``) includes the work itself.
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        return fn

    def run() -> Any:
        out = fn()
        torch.cuda.synchronize(dev)
        return out

    return run


def _first_call(run: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def _check_device(variant: str, device: torch.device | str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise Unavailable("CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if not runs_on(variant, dev):
        raise Unavailable(f"{variant} is a {'CUDA' if variant in CUDA_ONLY else 'CPU'}-only variant")
    return dev


def runs_on(variant: str, device: torch.device | str) -> bool:
    """Whether ``variant`` exists on ``device``'s kind (``CUDA_ONLY`` and ``CPU_ONLY`` ones do not everywhere)."""
    kind = torch.device(device).type
    return not ((variant in CUDA_ONLY and kind != "cuda") or (variant in CPU_ONLY and kind != "cpu"))


def reset_compiler() -> None:
    """Empty torch.compile's caches. Harnesses call it before building a group of cases, so a
    compiled variant's first call is its whole compilation and no earlier case's guards count
    towards dynamo's recompile limit. (Not inside the builders: it would throw away the
    compiled code of cases built earlier and still to be timed.)"""
    torch._dynamo.reset()


def _seeded(seed: int, build: Callable[[], Any]) -> Any:
    # The chapter's modules initialise from torch's global RNG; keep the caller's RNG intact.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


# -- 1. matrix multiplication ---------------------------------------------------------------
_MATMUL_PRECISION = {"fp32": ("highest", torch.float32), "tf32": ("high", torch.float32), "bf16": ("highest", torch.bfloat16)}


def matmul_case(variant: str, device: torch.device | str, *, m: int = 10_000, k: int = 200, seed: int = 0) -> Case:
    """The chapter's ``torch.matmul`` of ``(m x k) @ (k x m)`` (10000 x 200 by default).

    ``fp32`` keeps float32 maths (TF32 off), ``tf32`` lets CUDA use TF32 tensor cores
    (``set_float32_matmul_precision("high")``), ``bf16`` multiplies bfloat16 inputs.
    """
    dev = _check_device(variant, device)
    precision, dtype = _MATMUL_PRECISION[variant]
    g = torch.Generator().manual_seed(seed)
    a = torch.rand((m, k), generator=g).to(dev, dtype)
    b = torch.rand((k, m), generator=g).to(dev, dtype)

    def product() -> torch.Tensor:
        saved = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(precision)
        try:
            return torch.matmul(a, b)
        finally:
            torch.set_float32_matmul_precision(saved)

    run = timed(product, dev)
    first = _first_call(run)
    return Case("matmul", variant, dev, run, 2.0 * m * m * k / 1e9, "GFLOP/s",
                {"m": m, "k": k, "dtype": str(dtype).removeprefix("torch.")}, first)


# -- 2. linear regression -------------------------------------------------------------------
def linreg_case(variant: str, device: torch.device | str, *, n: int = 1_000_000, steps: int = 20,
                lr: float = 0.1, seed: int = 0) -> Case:
    """Full-batch Adam (lr 0.1) on the chapter's linear regression; one run = ``steps`` steps.

    Variants: ``chapter`` (nn.Module + torch.optim.Adam + nn.MSELoss, the chapter's loop),
    ``fnnet-eager`` / ``fnnet-eager-donate`` (``make_train_step``, donate off/on),
    ``fnnet-jit-donate`` (``jit=True, donate=True``) and, on CUDA, ``fnnet-jit-cudagraphs``
    (the same with ``compile_options={"mode": "reduce-overhead"}``: CUDA graphs).
    """
    dev = _check_device(variant, device)
    X, Y = (t.to(dev) for t in linreg_data(n, seed=seed))
    size = {"n": n, "steps": steps}

    if variant == "chapter":
        linear = _seeded(seed, LinearRegression).to(dev)
        optimizer = torch.optim.Adam(linear.parameters(), lr=lr)
        loss_func = nn.MSELoss()

        def train(k: int) -> torch.Tensor:
            for _ in range(k):
                optimizer.zero_grad()
                loss = loss_func(linear(X), Y)
                loss.backward()
                optimizer.step()
            return loss

    else:
        model = functional(_seeded(seed, LinearRegression))

        def loss_fn(params, batch):
            x, y = batch
            return F.mse_loss(model.apply(params, x), y)

        optimizer = optim.adam(lr)
        options = {"mode": "reduce-overhead"} if variant == "fnnet-jit-cudagraphs" else None
        step = make_train_step(
            loss_fn, optimizer, jit=variant in COMPILED, donate=variant != "fnnet-eager", compile_options=options
        )
        holder = [TrainState.create(place(model.params, dev), optimizer)]
        batch = (X, Y)

        def train(k: int) -> torch.Tensor:
            state = holder[0]
            for _ in range(k):
                state, metrics = step(state, batch)
            holder[0] = state
            return metrics["loss"]

    # One step first: for compiled variants this call is the compilation, reported apart.
    first = _first_call(timed(lambda: train(1), dev))
    return Case("linreg", variant, dev, timed(lambda: train(steps), dev), float(steps), "steps/s", size, first)


# -- 3. the chapter's CNN -------------------------------------------------------------------
def cnn_data(n: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` MNIST-shaped random samples on CPU: float32 images in [0, 1), int64 labels 0..9."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, 1, 28, 28), generator=g), torch.randint(0, 10, (n,), generator=g)


@contextlib.contextmanager
def _chapter_workers() -> Iterator[None]:
    # On a 2-core CPU torch warns that 4 workers are too many: that is the chapter's set-up.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="This DataLoader will create")
        yield


def cnn_case(variant: str, device: torch.device | str, *, samples: int = 12_800, batch_size: int = 128,
             lr: float = 0.02, seed: int = 0) -> Case:
    """One training epoch of the chapter's CNN over ``samples`` random MNIST-shaped samples.

    Variants: ``chapter-workers0`` (the baseline: the chapter's loop, ``DataLoader(TensorDataset,
    shuffle=True, num_workers=0)``, batches moved with ``.to(device)``, nn.Module +
    torch.optim.Adam + nn.CrossEntropyLoss), ``chapter-workers4`` (a second baseline: the same
    loop with the chapter's ``num_workers=4``), ``fnnet-trainer`` (``fnnet.Trainer.fit`` over an ``ArrayLoader`` whose data lives on the
    device) and ``fnnet-trainer-jit`` (the same with ``jit=True``); and the eager Trainer's
    options, measured as options: on CPU ``fnnet-trainer-contiguous``
    (``memory_format="contiguous"``, NCHW as the chapter; channels-last is the CPU default),
    on CUDA ``fnnet-trainer-channels-last`` (``memory_format="channels_last"``) and
    ``fnnet-trainer-bf16`` (``precision="bf16"``).
    Adam lr 0.02 as in the chapter; one run = one epoch.
    """
    dev = _check_device(variant, device)
    X, Y = cnn_data(samples, seed=seed)
    size = {"samples": samples, "batch_size": batch_size}

    if variant.startswith("chapter"):
        from torch.utils.data import DataLoader, TensorDataset

        net = _seeded(seed, CnnModel).to(dev)
        optimizer = torch.optim.Adam(net.parameters(), lr=lr)
        loss_func = nn.CrossEntropyLoss()
        workers = 4 if variant == "chapter-workers4" else 0
        size["num_workers"] = workers
        with _chapter_workers():
            dl = DataLoader(TensorDataset(X, Y), batch_size=batch_size, shuffle=True, num_workers=workers)

        def epoch() -> torch.Tensor:
            net.train()
            with _chapter_workers():
                batches = iter(dl)
            for x, y in batches:
                x, y = x.to(dev), y.to(dev)
                optimizer.zero_grad()
                loss = loss_func(net(x), y)
                loss.backward()
                optimizer.step()
            return loss

    else:
        options = {"fnnet-trainer-contiguous": {"memory_format": "contiguous"},
                   "fnnet-trainer-channels-last": {"memory_format": "channels_last"},
                   "fnnet-trainer-bf16": {"precision": "bf16"}}.get(variant, {})
        trainer = Trainer(_seeded(seed, CnnModel), F.cross_entropy, optim.adam(lr), devices=dev,
                          jit=variant in COMPILED, key=key(seed), **options)
        loader = ArrayLoader((X, Y), batch_size, shuffle=True, key=key(seed + 1), device=dev)

        def epoch() -> Any:
            return trainer.fit(loader, epochs=1, verbose=0)

    run = timed(epoch, dev)
    # The first epoch holds the compilation for jit; it is reported apart from steady state.
    first = _first_call(run)
    return Case("cnn", variant, dev, run, float(samples), "samples/s", size, first)


# -- the catalogue ----------------------------------------------------------------------------
def variants(workload: str) -> tuple[str, ...]:
    """The variants of ``workload``, the chapter's way first."""
    return {"matmul": MATMUL_VARIANTS, "linreg": LINREG_VARIANTS, "cnn": CNN_VARIANTS}[workload]


def build(workload: str, variant: str, device: torch.device | str, *, scale: float = 1.0, steps: int = 20) -> Case:
    """The :class:`Case` for ``workload``/``variant`` at ``scale`` times the chapter's size.

    Sizes at ``scale=1``: matmul 10000 x 200 @ 200 x 10000; linear regression n = 1,000,000
    (``steps`` Adam steps per run); CNN one epoch of 12,800 samples on CPU, 60,000 on CUDA.
    """
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    dev = torch.device(device)
    if workload == "matmul":
        return matmul_case(variant, dev, m=max(64, round(10_000 * scale)))
    if workload == "linreg":
        return linreg_case(variant, dev, n=max(1_000, round(1_000_000 * scale)), steps=steps)
    if workload == "cnn":
        full = 60_000 if dev.type == "cuda" else 12_800
        return cnn_case(variant, dev, samples=max(256, round(full * scale)))
    raise ValueError(f"unknown workload {workload!r}; choose from matmul, linreg, cnn")
