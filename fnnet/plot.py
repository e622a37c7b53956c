"""Training curves and sample grids with matplotlib (optional: ``pip install fnnet[plot]``).

Both functions return a ``matplotlib.figure.Figure`` and never call ``plt.show()``: a notebook
displays the returned figure, a script calls ``plt.show()`` or ``fig.savefig(path)``. Figures
are made through ``pyplot`` so that ``plt.show()`` works; matplotlib picks its backend as
usual (``Agg`` on a machine without a display, or whatever ``MPLBACKEND`` /
``matplotlib.use`` chose), and fnnet never changes it. In a loop, ``plt.close(fig)`` frees them.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

__all__ = ["plot_history", "plot_samples"]


def _pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("fnnet's plots need matplotlib: pip install fnnet[plot]") from exc
    return plt


def _floats(values: Any) -> list[float]:
    out = []
    for v in values:
        if v is None:
            out.append(math.nan)
        else:
            out.append(float(v.item() if hasattr(v, "item") else v))
    return out


def _keys(history: Any) -> list[str]:
    keys = getattr(history, "keys", None)
    if not callable(keys):
        raise TypeError(
            "plot_history expects a mapping of per-epoch lists (a dict, fnnet's History, a pandas "
            f"DataFrame), got {type(history).__name__}"
        )
    return [str(k) for k in keys()]


def plot_history(history: Mapping[str, Any], metric: str = "loss", *, ax: Any = None) -> Any:
    """Plot the training and validation curves of ``metric`` per epoch: the chapter's ``plot_metric``.

    Args:
        history: a mapping from names to per-epoch sequences: what ``Trainer.fit`` returns, a
            plain dict (``{"loss": [...], "val_loss": [...]}``) or a pandas DataFrame (the
            chapter's ``dfhistory``). The train curve is ``history[metric]`` and the validation
            curve ``history["val_" + metric]``; either may be missing, not both. The x axis is
            ``history["epoch"]`` when it has one entry per point, else ``1, 2, ...``. ``None``
            or NaN entries are gaps.
        metric: the metric's train-side name (``"loss"``, ``"accuracy"``).
        ax: a matplotlib ``Axes`` to draw into; by default a new figure.

    Returns:
        The ``Figure``, holding the train line (blue, dashed, label ``train_<metric>``) and the
        validation line (red, label ``val_<metric>``), in that order.

    Raises:
        KeyError: neither ``metric`` nor ``val_<metric>`` is in ``history``; the message lists
            the metrics that are.
        ImportError: matplotlib is not installed.
    """
    keys = _keys(history)
    if metric.startswith("val_") and f"val_{metric}" not in keys:
        metric = metric[len("val_"):]  # plot_history(h, "val_loss") means the loss curves
    train_key, val_key = metric, f"val_{metric}"
    if train_key not in keys and val_key not in keys:
        available = sorted({k[len("val_"):] if k.startswith("val_") else k for k in keys} - {"epoch"})
        raise KeyError(
            f"plot_history: no {train_key!r} or {val_key!r} in the history; "
            f"metrics available: {available} (keys: {keys})"
        )
    plt = _pyplot()
    if ax is None:
        fig, ax = plt.subplots()
    else:
        fig = ax.figure
    epochs = _floats(history["epoch"]) if "epoch" in keys else None
    for key, style in ((train_key, "bo--"), (val_key, "ro-")):
        if key not in keys:
            continue
        ys = _floats(history[key])
        xs = epochs if epochs is not None and len(epochs) == len(ys) else list(range(1, len(ys) + 1))
        ax.plot(xs, ys, style, label=("train_" if key == train_key else "") + key)
    ax.set_title(f"Training and validation {metric}")
    ax.set_xlabel("Epochs")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs only
    ax.set_ylabel(metric)
    ax.legend()
    return fig


def _to_numpy(x: Any) -> Any:
    import numpy as np

    if hasattr(x, "detach"):  # a torch tensor, on any device
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _images(X: Any) -> Any:
    """``(N, H, W)``, ``(N, C, H, W)`` or ``(N, H, W, C)`` with C in 1/3/4 -> ``(N, H, W[, C])``."""
    X = _to_numpy(X)
    if X.ndim == 3:
        return X
    if X.ndim == 4 and X.shape[1] in (1, 3, 4):
        X = X.transpose(0, 2, 3, 1)
    if X.ndim == 4 and X.shape[-1] in (1, 3, 4):
        return X[..., 0] if X.shape[-1] == 1 else X
    raise ValueError(
        "plot_samples: X must hold images of shape (N, H, W), (N, C, H, W) or (N, H, W, C) with "
        f"C = 1, 3 or 4; got shape {tuple(X.shape)}"
    )


def _label(v: Any) -> str:
    v = v.item() if hasattr(v, "item") else v
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return f"{v:d}" if isinstance(v, int) else f"{v:.3g}" if isinstance(v, float) else str(v)


def plot_samples(
    X: Any, y: Any, *, n: int = 9, predictions: Any = None, cmap: str | None = "gray"
) -> Any:
    """Show the first ``n`` images in a square grid, titled with their labels: the chapter's 3x3 view.

    Args:
        X: images as a tensor or array of shape ``(N, H, W)``, ``(N, 1, H, W)``, ``(N, 3, H, W)``
            or channels-last ``(N, H, W, 3)``.
        y: one label per image (class indices, tensor/array/list); titles read ``label = 7``.
        n: how many images (the grid is ``ceil(sqrt(n))`` wide: 9 gives 3x3); at most ``N``.
        predictions: optional predicted classes ``(N,)`` or class scores ``(N, C)`` (argmax is
            taken); titles then read ``label = 7, pred = 1``, in red where they differ.
        cmap: colormap for single-channel images (the chapter's plot used matplotlib's
            default, ``"viridis"``).

    Returns:
        The ``Figure``; its axes hold the images in order, ticks hidden, unused cells turned off.
    """
    images = _images(X)
    labels = list(_to_numpy(y).reshape(-1)) if not isinstance(y, (list, tuple)) else list(y)
    if len(labels) != len(images):
        raise ValueError(f"plot_samples: {len(images)} images but {len(labels)} labels")
    preds = None
    if predictions is not None:
        preds = _to_numpy(predictions)
        if preds.ndim == 2:
            preds = preds.argmax(axis=1)
        preds = list(preds.reshape(-1))
        if len(preds) != len(images):
            raise ValueError(f"plot_samples: {len(images)} images but {len(preds)} predictions")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"plot_samples: n must be a positive int, got {n!r}")
    if len(images) == 0:
        raise ValueError("plot_samples: X holds no images")
    n = min(n, len(images))
    side = max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / side)

    plt = _pyplot()
    fig, axes = plt.subplots(rows, side, figsize=(8, 8 * rows / side), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.axis("off")
            continue
        ax.imshow(images[i], cmap=cmap if images[i].ndim == 2 else None)
        title = f"label = {_label(labels[i])}"
        if preds is not None:
            title += f", pred = {_label(preds[i])}"
        if preds is not None and _label(preds[i]) != _label(labels[i]):
            ax.set_title(title, color="red")
        else:
            ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    return fig
