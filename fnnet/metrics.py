"""Streaming metrics that are exact over an epoch: pure ``init / update / compute`` triples.

A :class:`Metric` is three pure functions, in the spirit of optax's ``GradientTransformation``
and ``clu.metrics``::

    state = metric.init(device)                       # small NamedTuple of 0-dim tensors
    state = metric.update(state, outputs, targets)    # per batch: tensor ops only
    value = metric.compute(state)                     # 0-dim tensor, once per epoch

The state holds *sums* (of values, of correct predictions, of sample counts), never a running
mean, so ``compute`` gives the metric over every sample seen, exactly as if it had been
computed on the concatenated epoch: an epoch's accuracy is ``correct / samples``, not a mean
of per-batch accuracies (which overweights a short last batch). ``update`` makes no host
sync (no ``.item()``), so the state stays on the device for the whole epoch, and it is
traceable by ``torch.compile`` (fullgraph). It never mutates its arguments: it returns a new
state. Because states are sums, two states merge by adding them leaf by leaf
(:func:`merge`), which is what a data-parallel step does with an all-reduce ``SUM``.

Provided: :data:`accuracy`, :func:`top_k_accuracy`, :func:`binary_accuracy`,
:func:`mean_of` (any per-batch-mean function as an exact epoch mean), :func:`mean_metric`
(a weighted running mean, used for the loss), :func:`as_metric`, :func:`merge`, and
:func:`from_torchmetrics` (a ``torchmetrics.Metric`` object, exact over the epoch, but
stateful: see there).

Writing your own metric: return a ``Metric`` whose state is a NamedTuple (or tuple/dict) of
tensors that are sums, and whose ``compute`` turns the sums into the value. For example an
exact F1 score for one class, from true/false positive and false negative counts (this is
what ``torchmetrics.classification.BinaryF1Score`` accumulates too)::

    >>> import torch
    >>> from typing import NamedTuple
    >>> from fnnet.metrics import Metric
    >>> class F1State(NamedTuple):
    ...     tp: torch.Tensor
    ...     fp: torch.Tensor
    ...     fn: torch.Tensor
    >>> def f1(positive: int = 1) -> Metric:
    ...     def init(device=None):
    ...         zero = torch.zeros((), dtype=torch.int64, device=device)
    ...         return F1State(zero, zero, zero)
    ...     def update(state, outputs, targets):
    ...         pred, true = outputs.argmax(dim=1) == positive, targets == positive
    ...         return F1State(state.tp + (pred & true).sum(),
    ...                        state.fp + (pred & ~true).sum(),
    ...                        state.fn + (~pred & true).sum())
    ...     def compute(state):
    ...         return 2 * state.tp / (2 * state.tp + state.fp + state.fn)
    ...     return Metric(init, update, compute)
    >>> m = f1()
    >>> state = m.init("cpu")
    >>> state = m.update(state, torch.tensor([[0., 1.], [1., 0.]]), torch.tensor([1, 1]))
    >>> state = m.update(state, torch.tensor([[0., 1.]]), torch.tensor([0]))
    >>> state
    F1State(tp=tensor(1), fp=tensor(1), fn=tensor(1))
    >>> m.compute(state)
    tensor(0.5000)

Precision (``tp / (tp + fp)``) and recall (``tp / (tp + fn)``) come from the same state.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch

from . import tree as _tree
from .batch import batch_size_of

__all__ = [
    "Metric",
    "MeanState",
    "accuracy",
    "binary_accuracy",
    "top_k_accuracy",
    "mean_of",
    "mean_metric",
    "as_metric",
    "from_torchmetrics",
    "is_torchmetrics",
    "merge",
    "batch_size",
]

Tensor = torch.Tensor


class Metric(NamedTuple):
    """A streaming metric: ``init(device) -> state``, ``update(state, outputs, targets) -> state``,
    ``compute(state) -> 0-dim tensor``.

    All three are pure functions (see the module docstring for the protocol and an F1
    example). The equivalents elsewhere: ``clu.metrics.Metric`` (``from_model_output`` /
    ``merge`` / ``compute``) and ``torchmetrics.Metric`` (``update`` / ``compute``, but with the
    state held in attributes of the object rather than passed in and returned).
    """

    init: Callable[..., Any]
    update: Callable[..., Any]
    compute: Callable[[Any], Tensor]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """A ``Metric`` is not called: it is passed as it is (``metrics={"acc": fnnet.metrics.accuracy}``);
        ``top_k_accuracy(k)`` and ``binary_accuracy()`` are the functions that make one. Raises ``TypeError``."""
        raise TypeError("this fnnet.metrics.Metric is a metric already, not a function that makes one: pass it "
                        "without parentheses (metrics={'acc': fnnet.metrics.accuracy}); to compute it on "
                        "tensors: metric.compute(metric.update(metric.init(device), outputs, targets))")


class MeanState(NamedTuple):
    """State of a weighted mean: ``total`` = sum of ``value * weight``, ``count`` = sum of weights."""

    total: Tensor
    count: Tensor


def _float_dtype(device: torch.device) -> torch.dtype:
    # float64 sums of per-sample values stay exact integers up to 2**53 (accuracy counts) and
    # lose nothing measurable over an epoch of losses; MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def merge(state_a: Any, state_b: Any) -> Any:
    """Combine two states of one metric by leaf-wise addition (``clu.metrics.Metric.merge``).

    Valid for every metric whose state holds sums, which is all of this module's and the
    protocol asks the same of users' own: the state over batches ``A + B`` is
    ``merge(state_over_A, state_over_B)``, whatever device or process computed each part.
    """
    return _tree.map(torch.add, state_a, state_b)


# -- weighted means: the one place the averaging math lives ---------------------------------
def _mean_init(device: torch.device | str | None = None) -> MeanState:
    device = torch.device("cpu") if device is None else torch.device(device)
    zero = torch.zeros((), dtype=_float_dtype(device), device=device)
    return MeanState(zero, zero)


def _mean_update(state: MeanState, value: Any, weight: Any = 1) -> MeanState:
    total = state.total
    if isinstance(value, (bool, int, float)) and isinstance(weight, (bool, int, float)):
        return MeanState(total + value * weight, state.count + weight)
    if not isinstance(value, Tensor):  # numpy scalars/arrays, e.g. sklearn's accuracy_score
        value = torch.as_tensor(value)
    value = value.detach().to(dtype=total.dtype, device=total.device)
    if isinstance(weight, (bool, int, float)):
        # a Python weight needs no tensor: nothing crosses to the device
        return MeanState(total + value.sum() * weight, state.count + value.numel() * weight)
    if not isinstance(weight, Tensor):
        weight = torch.as_tensor(weight)
    weight = weight.detach().to(dtype=total.dtype, device=total.device)
    value, weight = torch.broadcast_tensors(value, weight)
    return MeanState(total + (value * weight).sum(), state.count + weight.sum())


def _mean_compute(state: MeanState) -> Tensor:
    return state.total / state.count


def mean_metric() -> Metric:
    """A weighted running mean, ``update(state, value, weight=1)``: ``torchmetrics.MeanMetric``.

    ``value`` is a number or a tensor of any shape, and ``weight`` a number or a tensor that
    broadcasts with it; every element of ``value`` counts with its weight:
    ``total += sum(value * weight)``, ``count += sum(weight)``, ``compute = total / count``.
    So the exact epoch loss from per-batch mean losses is
    ``update(state, batch_mean_loss, batch_size)``, and a vector of per-sample losses can be
    passed as is. ``compute`` of a state that saw nothing is ``nan`` (0 / 0). Also
    ``clu.metrics.Average``.
    """
    return Metric(_mean_init, _mean_update, _mean_compute)


def batch_size(outputs: Any, targets: Any) -> int:
    """The number of samples a batch's ``(outputs, targets)`` hold (the weight of a per-batch mean):
    :func:`fnnet.batch.batch_size_of` of the targets, or of the outputs when there are none."""
    return batch_size_of(targets if targets is not None else outputs)


def mean_of(fn: Callable[[Any, Any], Any]) -> Metric:
    """Turn ``fn(outputs, targets)``, a mean over the batch's samples, into an exact epoch mean.

    If ``fn`` returns a scalar (a 0-dim tensor or a number) it is taken as the mean over the
    batch and weighted by the batch size (the leading dimension of ``targets``, or of
    ``outputs`` when ``targets`` has none); if it returns a tensor with dimensions (per-sample
    values, e.g. a loss with ``reduction="none"``), every element counts once. Either way
    ``compute`` is the mean over all samples of the epoch, which a mean of per-batch means is
    not when batches differ in size. This is how plain functions given as metrics become
    streaming metrics (``clu.metrics.Average.from_fun``).

    ``update`` is as pure and traceable as ``fn`` is: a function that returns a Python float
    (such as the chapter's ``sklearn.metrics.accuracy_score`` one) works, but syncs with the
    host every batch; one written in tensor ops does not.
    """
    if not callable(fn):
        raise TypeError(f"mean_of expects a function fn(outputs, targets), got {type(fn).__name__}")

    def update(state: MeanState, outputs: Any, targets: Any) -> MeanState:
        value = fn(outputs, targets)
        if isinstance(value, Tensor) and value.ndim > 0:
            return _mean_update(state, value, 1)
        return _mean_update(state, value, batch_size(outputs, targets))

    return Metric(_mean_init, update, _mean_compute)


# -- classification ----------------------------------------------------------------------------
def _is_binary(outputs: Tensor) -> bool:
    return outputs.ndim == 1 or (outputs.ndim == 2 and outputs.shape[1] == 1)


def _binary_correct(outputs: Tensor, targets: Tensor, threshold: float) -> Tensor:
    n = outputs.shape[0]
    if targets.numel() != n:
        raise ValueError(
            f"binary accuracy: outputs of shape {tuple(outputs.shape)} need one 0/1 target per "
            f"sample, shape ({n},) or ({n}, 1); got targets of shape {tuple(targets.shape)}"
        )
    pred = outputs.reshape(n) > threshold
    true = targets.reshape(n).to(torch.float32) >= 0.5
    return pred == true


def _shape_error(name: str, outputs: Tensor, targets: Tensor) -> ValueError:
    return ValueError(
        f"{name}: outputs of shape {tuple(outputs.shape)} and targets of shape {tuple(targets.shape)} "
        "do not match any accepted form: class scores (N, C, ...) with class indices (N, ...), "
        "class scores and one-hot/probability targets of one shape (N, C, ...), or binary logits "
        "(N,) / (N, 1) with 0/1 targets"
    )


def _correct(outputs: Tensor, targets: Tensor) -> Tensor:
    """Per-sample (per-position) correctness of top-1 predictions, as a bool tensor."""
    if _is_binary(outputs):
        return _binary_correct(outputs, targets, 0.0)
    if outputs.ndim == targets.ndim + 1:
        pred = outputs.argmax(dim=1)
        if pred.shape != targets.shape:
            raise _shape_error("accuracy", outputs, targets)
        return pred == targets
    if outputs.shape == targets.shape:
        return outputs.argmax(dim=1) == targets.argmax(dim=1)
    raise _shape_error("accuracy", outputs, targets)


accuracy: Metric = mean_of(_correct)
"""Top-1 accuracy, exact over the epoch: correct predictions / samples.

Accepted ``(outputs, targets)``:

* class scores (logits or probabilities) ``(N, C)`` with class indices ``(N,)``: the
  prediction is ``argmax`` over dim 1 (and ``(N, C, d1, ...)`` with ``(N, d1, ...)``,
  ``nn.CrossEntropyLoss``'s layout, counting every position);
* class scores with one-hot or probability targets of the same shape ``(N, C, ...)``: both
  sides are ``argmax``-ed over dim 1;
* binary: ``(N,)`` or ``(N, 1)`` outputs are **logits**, predicted positive when ``> 0``
  (that is ``sigmoid > 0.5``); targets are 0/1 (ints, bools or floats, ``>= 0.5`` is 1). For
  outputs that are already probabilities use :func:`binary_accuracy` with ``threshold=0.5``.

Matches ``torchmetrics.classification.MulticlassAccuracy(average="micro")`` /
``BinaryAccuracy`` on ``sigmoid(outputs)``, and ``clu.metrics.Accuracy``. Ties in ``argmax``
go to the first maximal class.
"""


def binary_accuracy(threshold: float = 0.0) -> Metric:
    """Accuracy of binary predictions ``outputs > threshold`` against 0/1 targets.

    ``outputs`` has shape ``(N,)`` or ``(N, 1)``. The default ``threshold=0.0`` is for logits
    (what :data:`accuracy` does for binary outputs); use ``threshold=0.5`` for probabilities
    (``torchmetrics.classification.BinaryAccuracy(threshold=0.5)``).
    """
    threshold = float(threshold)

    def correct(outputs: Tensor, targets: Tensor) -> Tensor:
        if not _is_binary(outputs):
            raise ValueError(
                f"binary_accuracy expects outputs of shape (N,) or (N, 1), got {tuple(outputs.shape)}; "
                "for class scores use fnnet.metrics.accuracy"
            )
        return _binary_correct(outputs, targets, threshold)

    return mean_of(correct)


def top_k_accuracy(k: int) -> Metric:
    """Fraction of samples whose target class is among the ``k`` highest scores, exact over the epoch.

    ``outputs`` are class scores ``(N, C, ...)`` and ``targets`` class indices ``(N, ...)``, with
    ``1 <= k <= C``; ``top_k_accuracy(1)`` equals :data:`accuracy` for class scores. Matches
    ``torchmetrics.classification.MulticlassAccuracy(top_k=k, average="micro")`` and Keras'
    ``TopKCategoricalAccuracy`` (with class indices). Among tied scores at the k-th place,
    ``torch.topk`` decides which are in.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"top_k_accuracy: k must be a positive int, got {k!r}")

    def correct(outputs: Tensor, targets: Tensor) -> Tensor:
        if outputs.ndim != targets.ndim + 1 or outputs.ndim < 2:
            raise ValueError(
                f"top_k_accuracy({k}): expects class scores (N, C, ...) and class indices (N, ...), "
                f"got outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)}"
            )
        if k > outputs.shape[1]:
            raise ValueError(f"top_k_accuracy({k}): k is larger than the number of classes, {outputs.shape[1]}")
        top = outputs.topk(k, dim=1).indices
        return (top == targets.unsqueeze(1)).any(dim=1)

    return mean_of(correct)


# -- torchmetrics objects ---------------------------------------------------------------------------
def _torchmetrics_classes(obj: Any) -> list[str]:
    """The torchmetrics classes ``obj`` is an instance of, by module name: torchmetrics is never imported."""
    return [f"{c.__module__}.{c.__qualname__}" for c in type(obj).__mro__
            if c.__module__ == "torchmetrics" or c.__module__.startswith("torchmetrics.")]


def is_torchmetrics(obj: Any) -> bool:
    """Whether ``obj`` is a ``torchmetrics.Metric`` object (without importing torchmetrics)."""
    return "torchmetrics.metric.Metric" in _torchmetrics_classes(obj)


def from_torchmetrics(metric: Any) -> Metric:
    """A ``torchmetrics.Metric`` object as an fnnet :class:`Metric`, exact over the epoch.

    ``init(device)`` calls ``metric.reset()`` and moves the object to ``device``;
    ``update(state, outputs, targets)`` calls ``metric.update(outputs, targets)`` (detached)
    and returns the state, a 0-dim int64 count of the batches seen; ``compute(state)`` returns
    ``metric.compute()``. So the epoch value is torchmetrics' own over every sample of the
    epoch (macro-F1 from the epoch's confusion counts), never a mean of per-batch values,
    which is what a torchmetrics object called as a function per batch gives.

    Unlike fnnet's own metrics, this adapter is **stateful**: torchmetrics keeps its sums in
    the object, not in the returned state, so ``compute`` reads whatever the object holds
    since the last ``init``, whichever state it is given, and two states do not
    :func:`merge`. A trainer that runs its epochs one after the other (train, then
    validation, as ``fnnet.Trainer`` does) gets exact values; one object shared by two
    trainers, or by two interleaved epochs, is not safe: give each its own object.

    Raises:
        TypeError: ``metric`` is not a ``torchmetrics.Metric``; when ``compute`` gives more
            than one number (e.g. ``average=None``, one value per class), a ``ValueError``
            says to pick an average.
    """
    if not is_torchmetrics(metric):
        raise TypeError(f"from_torchmetrics expects a torchmetrics.Metric object, got {type(metric).__name__}")
    name = type(metric).__name__

    def init(device: torch.device | str | None = None) -> Tensor:
        metric.reset()
        device = torch.device("cpu") if device is None else torch.device(device)
        metric.to(device)
        return torch.zeros((), dtype=torch.int64, device=device)

    def update(state: Tensor, outputs: Any, targets: Any) -> Tensor:
        detach = lambda x: x.detach() if isinstance(x, Tensor) else x  # noqa: E731
        metric.update(_tree.map(detach, outputs), _tree.map(detach, targets))
        return state + 1

    def compute(state: Tensor) -> Tensor:
        del state  # the values are in the torchmetrics object
        value = metric.compute()
        if not isinstance(value, Tensor) or value.numel() != 1:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{name}.compute() returned {shape}, not one number; an fnnet metric logs one value per "
                             "epoch: choose an average (e.g. average='macro' or 'micro')")
        return value.reshape(())

    return Metric(init, update, compute)


def as_metric(metric: Any) -> Metric:
    """A :class:`Metric` as is; a ``torchmetrics.Metric`` object through :func:`from_torchmetrics`;
    any other callable ``fn(outputs, targets)`` through :func:`mean_of`.

    torchmetrics is recognized by the module names of the object's classes, so it is never
    imported (and need not be installed) for anything else. Raises ``TypeError`` for anything
    else, including torchmetrics objects that are not a single ``Metric`` (a
    ``MetricCollection``: pass its metrics one by one).
    """
    if isinstance(metric, Metric):
        return metric
    classes = _torchmetrics_classes(metric)
    if "torchmetrics.metric.Metric" in classes:
        return from_torchmetrics(metric)
    if classes:
        raise TypeError(f"as_metric: {classes[0]} is a torchmetrics object but not a torchmetrics.Metric; pass each "
                        "metric on its own: metrics={'f1': MulticlassF1Score(...), 'acc': MulticlassAccuracy(...)}")
    if callable(metric):
        return mean_of(metric)
    raise TypeError(
        f"a metric must be an fnnet.metrics.Metric (init, update, compute) or a function "
        f"fn(outputs, targets) -> per-batch mean; got {type(metric).__name__}: {metric!r}"
    )
