"""The chapter's training jobs as functions: what ``fnnet train digits|mnist|linreg`` runs.

Each is a short, readable script over the public API, meant to be copied: data ->
``ArrayLoader`` on the device -> ``Trainer.fit`` (or a hand-written ``make_train_step`` loop
for the linear regression) -> checkpoint, history and plots in an output folder.

Started by ``torchrun`` (``torchrun --nproc-per-node 2 -m fnnet train digits``), the
classifier jobs join the process group, give each rank its part of the data and let rank 0
alone print and write files.
"""

from __future__ import annotations

import atexit
import csv
import os
import sys
import time
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from . import distributed as _dist
from . import metrics as _metrics
from . import optim
from . import random as _random
from ._functional import functional
from ._summary import summary
from .callbacks import CSVLogger, ModelCheckpoint
from .checkpoint import save
from .data import ArrayLoader, fit_loaders, load_digits, load_mnist
from .device import place, resolve_device, synchronize
from .models import CnnModel, LinearRegression, linreg_data
from .state import TrainState
from .train import make_train_step
from .trainer import Trainer

__all__ = ["train_classifier", "train_digits", "train_mnist", "train_linreg", "write_history_plot"]


def write_history_plot(history: Mapping[str, Any], path: str | os.PathLike, metrics: list[str]) -> bool:
    """One panel per curve (the loss, then each metric), train and validation, whole epochs on x.

    Returns whether the file was written; without matplotlib, says why and how to get it.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"not writing {path}: the plot needs matplotlib (pip install matplotlib, or fnnet[plot])",
              file=sys.stderr)
        return False
    from .plot import plot_history

    names = ["loss"] + [m for m in metrics if m in history or f"val_{m}" in history]
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        plot_history(history, name, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _join_launched_group() -> None:
    """Under torchrun (several ranks in the environment), join the process group once.

    The group is left at exit: a process that exits with gloo's threads still running is
    aborted by the C++ runtime.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _dist.is_initialized():
        _dist.init()
        atexit.register(_dist.shutdown)


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
    validation_split: float = 0.1,
    verbose: int = 1,
    accumulate: int = 1,
    resume: str | None = None,
    every_n_steps: int | None = None,
) -> tuple[Trainer, dict[str, Any]]:
    """Train the chapter's CNN with Adam on ``train``; choose on a validation split; test once.

    The last ``validation_split`` of ``train`` (Keras' ``validation_split``: the tail, before
    shuffling) is held out and evaluated after every epoch; with ``out``, the best epoch by its
    ``val_loss`` is checkpointed and loaded back at the end (without ``out`` the last epoch is
    the result). ``test`` is evaluated once, at the end, with that state: it takes no part in
    any choice, so its numbers are an unbiased estimate.

    Writes into ``out`` (when given): the best checkpoint by ``val_loss``
    (``epoch=...-val_loss=....safetensors``), ``history.csv`` and ``history.png`` (the loss
    and the accuracy per epoch, training and validation). Returns the trainer (holding the
    best state) and ``{"final": {"test_loss", "test_accuracy"}, "history", "best_model_path"}``.
    Under ``torchrun`` every rank trains on its part of each batch (the batch size is per
    rank) and rank 0 prints and writes. ``accumulate=k`` updates once per ``k`` batches
    (``Trainer(accumulate_grad_batches=k)``).

    Raises:
        ValueError: a ``validation_split`` outside (0, 1), or one that leaves no sample to
            train or to validate on.
    """
    if isinstance(validation_split, bool) or not isinstance(validation_split, (int, float)) \
            or not 0 < validation_split < 1:
        raise ValueError(f"validation_split must be a fraction in (0, 1), got {validation_split!r}: the recipe "
                         "picks its best checkpoint on that part of the training data")
    _join_launched_group()
    main = _dist.is_main()
    verbose = verbose if main else 0
    init_key, data_key, dropout_key = _random.split(_random.key(seed), 3)
    model = functional(CnnModel())
    trainer = Trainer(model, F.cross_entropy, optim.adam(lr), metrics={"accuracy": _metrics.accuracy},
                      devices=device, jit=jit, key=dropout_key, precision=precision, params=model.init(init_key),
                      accumulate_grad_batches=accumulate)
    if verbose:
        summary(model, tuple(train[0].shape[1:]))
    shard = _dist.shard()
    train_loader, val_loader = fit_loaders(train, batch_size=batch_size, validation_split=validation_split,
                                           key=data_key, device=trainer.device, shard=shard)
    test_loader = ArrayLoader(test, batch_size, device=trainer.device, shard=shard)
    callbacks: list[Any] = []
    checkpoint = None
    if out is not None:
        os.makedirs(out, exist_ok=True)
        checkpoint = ModelCheckpoint(out, monitor="val_loss", mode="min", save_top_k=1, every_n_steps=every_n_steps)
        callbacks = [checkpoint, CSVLogger(os.path.join(out, "history.csv"), append=resume is not None)]  # rank 0 writes
    elif resume is not None or every_n_steps is not None:
        raise ValueError("resume and every_n_steps need out=: the folder the checkpoints go to and come back from")
    history = trainer.fit(train_loader, val_loader, epochs=epochs, callbacks=callbacks, verbose=verbose, resume=resume)
    if checkpoint is not None and checkpoint.best_model_path:
        _dist.barrier()  # rank 0 wrote it
        trainer.load(checkpoint.best_model_path)
    final = trainer.evaluate(test_loader, prefix="test_")  # once, after every choice was made
    result: dict[str, Any] = {"final": final, "history": history}
    if checkpoint is not None:
        result["best_model_path"] = checkpoint.best_model_path
    if out is not None and main and history.get("epoch"):
        plot = os.path.join(out, "history.png")
        if write_history_plot(history, plot, ["accuracy"]):
            result["plot"] = plot
    if verbose:
        shown = "  ".join(f"{k}={v:.4f}" for k, v in final.items())
        chosen = (f"best checkpoint by val_loss on the {val_loader.num_samples} held-out training samples"
                  if checkpoint is not None and checkpoint.best_model_path else "last epoch")
        print(f"final evaluation on the test set ({chosen}): {shown}")
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
    epochs: int = 500,
    lr: float = 0.1,
    device: Any = "auto",
    out: str | os.PathLike | None = None,
    jit: bool = False,
    seed: int = 0,
    log_every: int = 50,
    verbose: int = 1,
) -> dict[str, Any]:
    """The chapter's linear regression with a hand-written ``make_train_step`` loop.

    ``n`` samples ``x ~ U[-5, 5)^2``, ``y = 2 x0 - 3 x1 + 10 + N(0, 2)``; full-batch Adam, ``lr``
    0.1, for ``epochs`` epochs: one step over the whole data each, as the chapter's loop.
    With ``out``: the final state (``linreg.safetensors``), the loss per epoch
    (``history.csv``) and its plot (``history.png``). Returns the learned ``w``, ``b``, the
    final loss and the time.
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
        print(f"linear regression: n={n}, {epochs} full-batch Adam steps (lr {lr}) on {dev}, jit {'on' if jit else 'off'}")
    synchronize(dev)
    start = time.perf_counter()
    losses = []
    for epoch in range(epochs):
        state, metrics = step(state, (X, Y))
        losses.append(metrics["loss"])  # a device tensor: read once, after the loop
        if verbose and log_every and epoch % log_every == 0:
            print({"epoch": epoch + 1, "loss": round(float(metrics["loss"]), 6)})  # the only syncs
    synchronize(dev)
    elapsed = time.perf_counter() - start
    history = {"epoch": list(range(1, epochs + 1)), "loss": [float(v) for v in torch.stack(losses).cpu()]}
    w = state.params["w"].detach().cpu().flatten().tolist()
    b = float(state.params["b"])
    result = {"w": w, "b": b, "loss": history["loss"][-1], "time_s": elapsed, "device": str(dev), "epochs": epochs,
              "history": history}
    if out is not None:
        os.makedirs(out, exist_ok=True)
        save(os.path.join(out, "linreg.safetensors"), state)
        with open(os.path.join(out, "history.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["epoch", "loss"])
            writer.writerows(zip(history["epoch"], history["loss"]))
        wrote = write_history_plot(history, os.path.join(out, "history.png"), [])
        result["out"] = os.fspath(out)
    if verbose:
        print(f"w = [{w[0]:.4f}, {w[1]:.4f}] (true [2, -3]), b = {b:.4f} (true 10), "
              f"loss = {result['loss']:.4f} (noise variance 4), time {elapsed:.2f}s")
        if out is not None:
            print(f"wrote {out}: linreg.safetensors, history.csv" + (", history.png" if wrote else ""))
    return result
