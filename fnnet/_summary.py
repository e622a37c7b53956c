"""A Keras-style summary table of a model: layers, output shapes, parameter counts, sizes.

``fnnet.summary(model, input_shape=(1, 28, 28))`` prints and returns what
``torchkeras.summary`` / ``torchsummary.summary`` print, with parameter totals that are right
for shared modules and tied weights: every parameter tensor is counted once, so the totals
equal ``sum(p.numel() for p in module.parameters())``.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import nn

from . import tree as _tree
from ._functional import Model

__all__ = ["summary", "SummaryTable", "SummaryRow"]

_MB = 1024.0**2  # torchsummary's "MB" is a mebibyte; kept so the numbers compare


class SummaryRow(NamedTuple):
    """One row of the table: one call of a leaf module (or the leftover parameters of a container).

    Attributes:
        name: the module's path in the model (``"layers.0"``; ``""`` for the model itself).
        type: the module's class name (``"Conv2d"``).
        output_shape: the output's shape with the real batch size; a list of shapes for several
            output tensors; ``None`` for a row that lists parameters no leaf module called
            in the forward holds (a container's own ``nn.Parameter``, an unused layer).
        params: parameters counted at this row, i.e. not counted at an earlier row: a module
            called twice counts its parameters at its first call, a weight tied to an earlier
            layer's counts there. ``sum(row.params)`` is the table's total.
        shared: the module holds parameters already counted at an earlier row.
    """

    name: str
    type: str
    output_shape: Any
    params: int
    shared: bool = False


@dataclasses.dataclass(frozen=True, repr=False)
class SummaryTable:
    """What :func:`summary` measured; ``str(table)`` renders the torchkeras-style text table.

    Sizes are in MB of 1024**2 bytes, as torchsummary reports them: ``input_size_mb`` is the
    input batch, ``forward_backward_size_mb`` twice the bytes of every leaf module's outputs
    (activations kept for the backward, and their gradients), ``params_size_mb`` the bytes of the
    parameters (each tensor once), ``total_size_mb`` their sum: an estimate that leaves out
    optimizer state, buffers and the framework's own workspace.
    """

    rows: tuple[SummaryRow, ...]
    total_params: int
    trainable_params: int
    input_shape: tuple
    input_size_mb: float
    forward_backward_size_mb: float
    params_size_mb: float

    @property
    def non_trainable_params(self) -> int:
        """Parameters with ``requires_grad=False`` (``total_params - trainable_params``)."""
        return self.total_params - self.trainable_params

    @property
    def total_size_mb(self) -> float:
        """The estimated total: input, forward/backward activations and parameters, in MB (torchkeras' column)."""
        return self.input_size_mb + self.forward_backward_size_mb + self.params_size_mb

    def __repr__(self) -> str:
        # A notebook cell ending in fnnet.summary(...) shows the table once, not a dataclass dump.
        return str(self)

    def __str__(self) -> str:
        header = ("Layer (type)", "Output Shape", "Param #")
        body = [(_row_label(r), _shape_str(r.output_shape), f"{r.params:,}" + (" *" if r.shared else ""))
                for r in self.rows]
        w0 = max([len(header[0])] + [len(b[0]) for b in body])
        w1 = max([len(header[1])] + [len(b[1]) for b in body])
        w2 = max([len(header[2])] + [len(b[2]) for b in body])
        width = w0 + w1 + w2 + 6

        def line(cells: Sequence[str]) -> str:
            return f"{cells[0]:<{w0}}   {cells[1]:<{w1}}   {cells[2]:>{w2}}"

        out = ["-" * width, line(header), "=" * width]
        out += [line(b) for b in body]
        out += ["=" * width,
                f"Total params: {self.total_params:,}",
                f"Trainable params: {self.trainable_params:,}",
                f"Non-trainable params: {self.non_trainable_params:,}"]
        if any(r.shared for r in self.rows):
            out.append("* shares parameters counted at an earlier row (reused module or tied weight)")
        out += ["-" * width,
                f"Input size (MB): {self.input_size_mb:.6f}",
                f"Forward/backward pass size (MB): {self.forward_backward_size_mb:.6f}",
                f"Params size (MB): {self.params_size_mb:.6f}",
                f"Estimated Total Size (MB): {self.total_size_mb:.6f}",
                "-" * width]
        return "\n".join(out)


def _row_label(row: SummaryRow) -> str:
    return f"{row.name} ({row.type})" if row.name else row.type


def _shape_str(shape: Any) -> str:
    if shape is None:
        return "--"
    if isinstance(shape, list):
        return ", ".join(_shape_str(s) for s in shape)
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _as_shape(x: Any) -> tuple[int, ...] | None:
    if not isinstance(x, (tuple, list, torch.Size)) or any(isinstance(d, bool) for d in x):
        return None
    try:
        return tuple(operator.index(d) for d in x)
    except TypeError:
        return None


def _normalize_shapes(input_shape: Any) -> list[tuple[int, ...]]:
    """``(1, 28, 28)`` -> one input; ``[(3,), (5,)]`` -> several. Validates every dimension."""
    one = _as_shape(input_shape)
    if one is not None:
        shapes = [one]
    elif isinstance(input_shape, (tuple, list)) and input_shape and all(_as_shape(s) is not None for s in input_shape):
        shapes = [_as_shape(s) for s in input_shape]
    else:
        raise ValueError(
            "summary: input_shape must be a tuple of ints without the batch dimension, e.g. (1, 28, 28), "
            f"or a list of such tuples for a model with several inputs; got {input_shape!r}"
        )
    for shape in shapes:
        if any(d < 0 for d in shape):
            raise ValueError(f"summary: input_shape dimensions must be non-negative, got {shape!r}")
    return shapes


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _shape_of(output: Any) -> Any:
    shapes = [tuple(t.shape) for t in _tree.leaves(output) if isinstance(t, torch.Tensor)]
    return shapes[0] if len(shapes) == 1 else shapes


def _unique_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return list(module.named_parameters())  # named_parameters() drops repeats of a tied tensor


def summary(
    model: nn.Module | Model,
    input_shape: Any = (1, 28, 28),
    *,
    batch_size: int = 1,
    dtype: torch.dtype | Sequence[torch.dtype] = torch.float32,
    device: torch.device | str | None = None,
    print_fn: Callable[[str], Any] | None = print,
) -> SummaryTable:
    """Summarize ``model`` the way ``torchkeras.summary`` / ``torchsummary.summary`` do, counted right.

    Runs one forward in eval mode under ``torch.no_grad`` on a zeros input of shape
    ``(batch_size, *input_shape)`` with forward hooks on every leaf module (a module without
    children), and returns a :class:`SummaryTable`: one row per call of a leaf module (a
    module called twice gives two rows) with its output shape and parameter count, the total,
    trainable and non-trainable parameter counts, and the sizes torchsummary estimates. Each
    parameter tensor is counted once, at the first row that uses it, so ``total_params`` equals
    ``sum(p.numel() for p in module.parameters())`` even with reused modules and tied weights
    (which torchsummary and torchkeras count once per use). Buffers (BatchNorm's running
    statistics) are not parameters.

    Args:
        model: an ``nn.Module`` (its train/eval flags are restored and its hooks removed
            afterwards; nothing else is touched) or an :class:`fnnet.Model` (a real module with
            its ``params`` and ``buffers`` is built from it, all parameters trainable).
        input_shape: the shape of one sample, without the batch dimension (the chapter's
            ``(1, 32, 32)``); a list of shapes for a model whose forward takes several inputs.
        batch_size: the batch dimension of the zeros input; output shapes show it.
        dtype: the input's dtype (``torch.long`` for embedding models), or one per input.
        device: where the input is made; ``None`` means the device of the model's parameters
            (CPU for a model without any). It must be where the parameters are.
        print_fn: called with the rendered table (``print`` by default; ``None`` prints nothing,
            ``logging.info`` logs it).

    Raises:
        TypeError: ``model`` is neither an ``nn.Module`` nor an ``fnnet.Model``.
        ValueError: a malformed ``input_shape``, a ``device`` other than the parameters', or a
            forward that fails on the zeros input (the message has the shape tried and the
            error's first line).
    """
    if isinstance(model, Model):
        module = model.to_module()
    elif isinstance(model, nn.Module):
        module = model
    else:
        raise TypeError(f"summary expects an nn.Module or an fnnet.Model, got {type(model).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"summary: batch_size must be a positive int, got {batch_size!r}")
    shapes = _normalize_shapes(input_shape)
    dtypes = list(dtype) if isinstance(dtype, Sequence) else [dtype] * len(shapes)
    if len(dtypes) != len(shapes):
        raise ValueError(f"summary: {len(dtypes)} dtypes given for {len(shapes)} input shapes")

    params = _unique_parameters(module)
    param_devices = {p.device for _, p in params}
    if device is None:
        device = next(iter(param_devices)) if len(param_devices) == 1 else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if len(param_devices) == 1 and device not in param_devices:
        where = str(next(iter(param_devices)))
        raise ValueError(
            f"summary: the model's parameters are on {where} but device={str(device)!r}; "
            f"pass device={where!r} or leave device out"
        )
    inputs = [torch.zeros((batch_size, *s), dtype=dt, device=device) for s, dt in zip(shapes, dtypes)]

    names = {m: name for name, m in module.named_modules()}
    rows: list[SummaryRow] = []
    output_bytes = [0]
    seen: set[int] = set()

    def hook(mod: nn.Module, args: Any, output: Any) -> None:
        own = list(mod.parameters())
        new = [p for p in own if id(p) not in seen]
        seen.update(id(p) for p in new)
        rows.append(SummaryRow(
            name=names.get(mod, ""),
            type=type(mod).__name__,
            output_shape=_shape_of(output),
            params=sum(p.numel() for p in new),
            shared=len(new) < len(own),
        ))
        output_bytes[0] += sum(_nbytes(t) for t in _tree.leaves(output) if isinstance(t, torch.Tensor))

    leaves = [m for m in names if next(m.children(), None) is None]
    modes = {m: m.training for m in names}
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        module.eval()
        with torch.no_grad():
            module(*inputs)
    except Exception as exc:
        tried = ", ".join(str(tuple(x.shape)) for x in inputs)
        gist = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(
            f"summary: {type(module).__name__} failed on a zeros input of shape {tried} "
            f"(input_shape={input_shape!r}, batch_size={batch_size}): {type(exc).__name__}: {gist}"
        ) from exc
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training

    # Parameters no called leaf holds: a container's own nn.Parameter, layers the forward skipped.
    leftovers: dict[str, list[nn.Parameter]] = {}
    for pname, p in params:
        if id(p) not in seen:
            owner = pname.rpartition(".")[0]
            leftovers.setdefault(owner, []).append(p)
            seen.add(id(p))
    for owner, ps in leftovers.items():
        rows.append(SummaryRow(owner, type(module.get_submodule(owner)).__name__, None, sum(p.numel() for p in ps)))

    table = SummaryTable(
        rows=tuple(rows),
        total_params=sum(p.numel() for _, p in params),
        trainable_params=sum(p.numel() for _, p in params if p.requires_grad),
        input_shape=tuple(shapes[0]) if len(shapes) == 1 else tuple(shapes),
        input_size_mb=sum(_nbytes(x) for x in inputs) / _MB,
        forward_backward_size_mb=2 * output_bytes[0] / _MB,
        params_size_mb=sum(_nbytes(p) for _, p in params) / _MB,
    )
    if print_fn is not None:
        print_fn(str(table))
    return table
