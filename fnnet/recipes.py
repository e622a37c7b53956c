"""The chapter's training jobs, and a character GPT, as functions: what ``fnnet train digits|mnist|linreg|charlm`` runs.

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

__all__ = ["train_classifier", "train_digits", "train_mnist", "train_linreg", "train_charlm", "charlm_optimizer",
           "write_history_plot"]


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


def _decay_mask(params: Mapping[str, torch.Tensor]) -> dict[str, bool]:
    """nanoGPT's parameter groups: weight decay on matrices (linear weights, embeddings), none on biases and norms."""
    return {k: v.ndim >= 2 for k, v in params.items()}


def charlm_optimizer(params: Mapping[str, torch.Tensor], *, lr: float = 1e-3, min_lr: float = 1e-4,
                     warmup: int = 100, decay_steps: int = 2000, beta2: float = 0.99, weight_decay: float = 0.1,
                     grad_clip: float = 1.0) -> optim.GradientTransformation:
    """nanoGPT's optimizer: clip the global norm to ``grad_clip``, then AdamW (betas 0.9, ``beta2``) with
    ``weight_decay`` on the 2-D parameters only, its learning rate warmed up linearly from 0 over ``warmup``
    updates and decayed along a cosine to ``min_lr`` at ``decay_steps`` (``warmup_cosine_decay_schedule``)."""
    schedule = optim.warmup_cosine_decay_schedule(0.0, lr, warmup, decay_steps, min_lr)
    return optim.chain(optim.clip_by_global_norm(grad_clip),
                       optim.adamw(schedule, b1=0.9, b2=beta2, weight_decay=weight_decay, mask=_decay_mask(params)))


def _write_rows(history: Mapping[str, list], path: str, append: bool) -> None:
    names = list(history)
    rows = list(zip(*(history[k] for k in names)))
    exists = append and os.path.exists(path)
    with open(path, "a" if exists else "w", newline="") as f:
        writer = csv.writer(f)
        if not exists:
            writer.writerow(names)
        writer.writerows(rows)


def train_charlm(
    *,
    text: str | os.PathLike | None = None,
    steps: int = 2000,
    out: str | os.PathLike | None = None,
    eval_interval: int = 250,
    eval_iters: int = 20,
    block_size: int = 64,
    batch_size: int = 12,
    n_layer: int = 4,
    n_head: int = 4,
    n_embd: int = 128,
    dropout: float = 0.0,
    lr: float = 1e-3,
    device: Any = "auto",
    jit: bool = False,
    precision: str = "32",
    seed: int = 0,
    accumulate: int = 1,
    resume: str | None = None,
    every_n_steps: int | None = None,
    max_chars: int = 2_000_000,
    sample_tokens: int = 500,
    verbose: int = 1,
) -> tuple[Trainer, dict[str, Any]]:
    """A character-level GPT, trained for ``steps`` optimizer updates: what ``fnnet train charlm`` runs.

    nanoGPT's ``shakespeare_char`` on a CPU, by default: a 4-layer, 4-head, 128-wide
    :class:`fnnet.models.GPT` (0.8 M parameters) with a context of 64 characters, batches of 12
    windows, AdamW (lr 1e-3 warmed up over 100 updates (``steps // 10`` when fewer than 1,000), cosine to 1e-4 at ``steps``, beta2 0.99,
    weight decay 0.1 on matrices only), the gradient clipped to norm 1, dropout 0, for 2,000 updates.
    The text is :func:`fnnet.datasets.load_text` (``text``, or the Python standard library's
    sources, 2 MB, no download): 90% trains, the last 10% is held out. Every ``eval_interval``
    updates the loss on ``eval_iters`` batches of held-out windows (the same windows each time) is
    printed with the training loss and the tokens per second. At the end, ``sample_tokens``
    characters are generated (temperature 0.8, top-k 200, as nanoGPT's ``sample.py``).

    ``batch_size`` is the global batch (``WindowLoader(global_batch=True)``): under ``torchrun``
    each rank takes its part, and a checkpoint resumes on any number of ranks. ``accumulate=k``
    updates once per ``k`` batches.

    Writes into ``out`` (when given): the checkpoint at the end (``ModelCheckpoint``: the state,
    the position in the data, resumable), ``step.safetensors`` every ``every_n_steps`` updates,
    ``history.csv`` and ``history.png`` (training and held-out loss per check) and ``sample.txt``.
    Returns the trainer and ``{"history", "val_loss", "sample", "vocab", "seconds"}``.
    """
    from .data import WindowLoader
    from .datasets import load_text
    from .loss import cross_entropy
    from .models import GPT
    from .sampling import generate

    _join_launched_group()
    main = _dist.is_main()
    verbose = verbose if main else 0
    if (resume is not None or every_n_steps is not None) and out is None:
        raise ValueError("resume and every_n_steps need out=: the folder the checkpoints go to and come back from")
    train_ids, val_ids, vocab = load_text(text, max_chars=max_chars)
    init_key, data_key, val_key, dropout_key, sample_key = _random.split(_random.key(seed), 5)
    net = GPT(len(vocab), block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd, dropout=dropout)
    params = functional(net).init(init_key)
    trainer = Trainer(net, cross_entropy, charlm_optimizer(params, lr=lr, min_lr=lr / 10, warmup=min(100, steps // 10),
                                                        decay_steps=steps),
                      devices=device, jit=jit, key=dropout_key, precision=precision, params=params,
                      accumulate_grad_batches=accumulate)
    shard = _dist.shard()
    train_loader = WindowLoader(train_ids, block_size, batch_size, key=data_key, device=trainer.device, shard=shard,
                                global_batch=True)
    held_out = next(iter(WindowLoader(val_ids, block_size, eval_iters * batch_size, key=val_key,
                                      windows_per_epoch=eval_iters * batch_size)))  # the same windows at every check
    val_loader = ArrayLoader(held_out, batch_size, device=trainer.device, shard=shard, global_batch=True)
    if verbose:
        n = sum(p.numel() for p in params.values())
        print(f"charlm: {len(train_ids):,} training and {len(val_ids):,} held-out characters, a vocabulary of "
              f"{len(vocab)}; GPT of {n / 1e6:.2f} M parameters; {steps} updates of {batch_size} x {block_size} tokens")
    callbacks: list[Any] = []
    if out is not None:
        os.makedirs(out, exist_ok=True)
        callbacks = [ModelCheckpoint(out, monitor="val_loss", mode="min", save_top_k=1, every_n_steps=every_n_steps)]
    start = time.perf_counter()
    history = trainer.fit(train_loader, val_loader, max_steps=steps, val_check_interval=eval_interval,
                          callbacks=callbacks, verbose=verbose, resume=resume)
    seconds = time.perf_counter() - start
    prompt = vocab.encode("\n").reshape(1, 1).to(trainer.device)
    sample = vocab.decode(generate(trainer.model, trainer.state.params, prompt, sample_tokens, key=sample_key,
                                   temperature=0.8, top_k=min(200, len(vocab)))[0, 1:])
    val_loss = history["val_loss"][-1] if history.get("val_loss") else float("nan")
    result = {"history": history, "val_loss": val_loss, "sample": sample, "vocab": vocab, "seconds": seconds}
    if out is not None and main:
        _write_rows(history, os.path.join(out, "history.csv"), append=resume is not None)
        with open(os.path.join(out, "sample.txt"), "w", encoding="utf-8") as f:
            f.write(sample)
        if history.get("step"):
            write_history_plot({**history, "epoch": history["step"]}, os.path.join(out, "history.png"), [])
    if verbose:
        print(f"held-out loss {val_loss:.4f} after {trainer.state.step} updates, {seconds:.1f} s; a sample:\n{sample}")
    return trainer, result
