"""The chapter's training jobs as functions: what ``fnnet train digits|mnist|linreg`` runs.

Each is a short, readable script over the public API, meant to be copied: data ->
``ArrayLoader`` on the device -> ``Trainer.fit`` (or a hand-written ``make_train_step`` loop
for the linear regression) -> checkpoint, history and plots in an output folder.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
import torch.nn.functional as F

from . import metrics as _metrics
from . import optim
from . import random as _random
from .callbacks import CSVLogger, ModelCheckpoint
from .data import ArrayLoader, load_digits, load_mnist
from .device import place, resolve_device, synchronize
from ._functional import functional
from .models import CnnModel, LinearRegression, linreg_data
from ._summary import summary
from .train import TrainState, make_train_step
from .trainer import Trainer

__all__ = ["train_classifier", "train_digits", "train_mnist", "train_linreg"]


def train_classifier(
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    epochs: int = 10,
    device: Any = "auto",
    out: str | os.PathLike | None = None,
    batch_size: int = 128,
    lr: float = 0.01,
    jit: bool = False,
    precision: str = "32",
    seed: int = 0,
    verbose: int = 1,
) -> tuple[Trainer, dict[str, Any]]:
    """Train the chapter's CNN with Adam on ``(X, y)`` pairs; validate on ``test`` each epoch.

    Writes into ``out`` (when given): the best checkpoint by ``val_loss``
    (``epoch=...-val_loss=....safetensors``), ``history.csv`` and, when matplotlib is there,
    ``history.png``. Returns the trainer (holding the best state) and the final evaluation.
    """
    init_key, data_key, dropout_key = _random.split(_random.key(seed), 3)
    model = functional(CnnModel())
    trainer = Trainer(
        model,
        F.cross_entropy,
        optim.adam(lr),
        metrics={"accuracy": _metrics.accuracy},
        devices=device,
        jit=jit,
        key=dropout_key,
        precision=precision,
        params=model.init(init_key),
    )
    size = tuple(train[0].shape[1:])
    if verbose:
        summary(model, size)
    train_loader = ArrayLoader(train, batch_size, shuffle=True, key=data_key, device=trainer.device)
    test_loader = ArrayLoader(test, batch_size, device=trainer.device)
    callbacks = []
    checkpoint = None
    if out is not None:
        os.makedirs(out, exist_ok=True)
        checkpoint = ModelCheckpoint(out, monitor="val_loss", mode="min", save_top_k=1)
        callbacks = [checkpoint, CSVLogger(os.path.join(out, "history.csv"))]
    history = trainer.fit(train_loader, test_loader, epochs=epochs, callbacks=callbacks, verbose=verbose)
    if checkpoint is not None and checkpoint.best_model_path:
        trainer.load(checkpoint.best_model_path)
    final = trainer.evaluate(test_loader)
    result: dict[str, Any] = {"final": final, "history": history}
    if checkpoint is not None:
        result["best_model_path"] = checkpoint.best_model_path
    if out is not None and history.get("epoch"):
        try:
            from .plot import plot_history

            fig = plot_history(history, "loss")
            fig.savefig(os.path.join(out, "history.png"), dpi=100)
            result["plot"] = os.path.join(out, "history.png")
        except ImportError:
            pass  # matplotlib is optional
    if verbose:
        shown = "  ".join(f"{k}={v:.4f}" for k, v in final.items())
        print(f"final evaluation (best checkpoint): {shown}")
        if out is not None:
            print(f"wrote {out}: best checkpoint {os.path.basename(result.get('best_model_path') or '-')}, history.csv"
                  + (", history.png" if "plot" in result else ""))
    return trainer, result


def train_digits(*, size: int = 28, **kwargs: Any) -> tuple[Trainer, dict[str, Any]]:
    """:func:`train_classifier` on the embedded digits (``fnnet.data.load_digits(size)``)."""
    train, test = load_digits(size)
    return train_classifier(train, test, **kwargs)


def train_mnist(data_dir: str | os.PathLike, **kwargs: Any) -> tuple[Trainer, dict[str, Any]]:
    """:func:`train_classifier` on MNIST IDX files in ``data_dir`` (``fnnet.data.load_mnist``)."""
    train = load_mnist(data_dir, train=True)
    test = load_mnist(data_dir, train=False)
    return train_classifier(train, test, **kwargs)


def train_linreg(
    *,
    n: int = 1_000_000,
    steps: int = 500,
    lr: float = 0.1,
    device: Any = "auto",
    jit: bool = False,
    seed: int = 0,
    log_every: int = 50,
    verbose: int = 1,
) -> dict[str, Any]:
    """The chapter's linear regression with a hand-written ``make_train_step`` loop.

    ``n`` samples ``x ~ U[-5, 5)^2``, ``y = 2 x0 - 3 x1 + 10 + N(0, 2)``; full-batch Adam, ``lr``
    0.1, ``steps`` steps. Returns the learned ``w``, ``b``, the final loss and the time.
    """
    dev = resolve_device(device)
    X, Y = place(linreg_data(n, seed=seed), dev)

    model = functional(LinearRegression())

    def loss_fn(params: dict, batch: tuple) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(model.apply(params, x), y)

    optimizer = optim.adam(lr)
    state = TrainState.create(place(model.init(_random.key(seed)), dev), optimizer)
    step = make_train_step(loss_fn, optimizer, jit=jit, donate=True)
    if verbose:
        print(f"linear regression: n={n}, {steps} full-batch Adam steps (lr {lr}) on {dev}, jit {'on' if jit else 'off'}")
    synchronize(dev)
    start = time.perf_counter()
    metrics: dict = {}
    for i in range(steps):
        state, metrics = step(state, (X, Y))
        if verbose and log_every and i % log_every == 0:
            print({"step": i, "loss": round(float(metrics["loss"]), 6)})  # the only syncs
    synchronize(dev)
    elapsed = time.perf_counter() - start
    w = state.params["w"].detach().cpu().flatten().tolist()
    b = float(state.params["b"])
    result = {"w": w, "b": b, "loss": float(metrics["loss"]), "time_s": elapsed, "device": str(dev), "steps": steps}
    if verbose:
        print(f"w = [{w[0]:.4f}, {w[1]:.4f}] (true [2, -3]), b = {b:.4f} (true 10), "
              f"loss = {result['loss']:.4f} (noise variance 4), time {elapsed:.2f}s")
    return result
