"""Multi-tensor math over flattened pytrees, grouped by device and dtype.

Every transformation in :mod:`fnnet.optim` works on the flat leaf lists of its trees and
hands whole lists to ``torch._foreach_*`` ops (one C++ call per op instead of one Python
call per leaf). Those ops want every list on one device with one dtype, so :func:`grouped`
splits the leaves by ``(device, dtype of every column)`` and reassembles the results in
leaf order. Inside a group the math runs in the promoted dtype of its columns (bf16 grads
with fp32 state run in fp32); a state column is stored back in its own dtype, and updates
keep the promoted dtype: nothing is silently downcast.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .. import tree as _tree

Tensors = list[torch.Tensor]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def scalar_for(value: torch.Tensor | float, device: torch.device, dtype: torch.dtype) -> torch.Tensor | float:
    """A 0-dim scalar tensor ready to multiply a list of ``dtype`` tensors on ``device``.

    Scalars use the op-math dtype of the list (float32 for float32/bf16/fp16, float64 for
    float64), as torch's own kernels do with Python-float scalars.
    """
    if not isinstance(value, torch.Tensor):  # a Python number is already a scalar for every dtype
        return value
    target = torch.float32 if dtype in _LOW_PRECISION else dtype
    return value.to(device=device, dtype=target)


# Up to this many leaves a Python loop over ``(device, dtype)`` beats torch's C++ grouping
# helper, whose call costs more than the loop for the few tensors of a small model.
_PY_GROUPING_MAX = 8


def _column_keys(col: Tensors) -> Any:
    """The distinct ``(device, dtype)`` pairs of a list of tensors."""
    if len(col) > _PY_GROUPING_MAX and not torch.compiler.is_compiling():
        try:  # torch.optim's C++ helper: 3x faster than reading .device in Python on long lists
            return torch._C._group_tensors_by_device_and_dtype([col], False).keys()
        except (AttributeError, RuntimeError):
            pass
    return {(t.device, t.dtype) for t in col}


def _uniform(col: Tensors) -> bool:
    """Whether every tensor of ``col`` has the first one's device and dtype."""
    if len(col) > _PY_GROUPING_MAX:
        return len(_column_keys(col)) == 1
    dtype, device = col[0].dtype, col[0].device
    for t in col:  # a plain loop: all() over a generator costs more than the check on a few leaves
        if t.dtype != dtype or t.device != device:
            return False
    return True


def _groups(columns: Sequence[Tensors]) -> list[list[int]] | None:
    """Leaf indices grouped by ``(device, dtype)`` across columns; ``None`` when there is one group."""
    for col in columns:
        if not _uniform(col):
            break
    else:
        return None
    by_key: dict[tuple[Any, ...], list[int]] = {}
    for i, row in enumerate(zip(*columns)):
        by_key.setdefault(tuple((t.device, t.dtype) for t in row), []).append(i)
    return list(by_key.values())


def index_groups(columns: Sequence[Tensors]) -> list[list[int]]:
    """Leaf indices grouped by ``(device, dtype)`` across columns (one group in the common case)."""
    if not columns[0]:
        return []
    groups = _groups(columns)
    return [list(range(len(columns[0])))] if groups is None else groups


def _promoted(cols: Sequence[Tensors]) -> torch.dtype:
    dtype = cols[0][0].dtype
    for col in cols[1:]:
        dtype = torch.promote_types(dtype, col[0].dtype)
    return dtype


# On CPU a foreach op is a loop over its tensors, so a sequence of ops over all leaves
# streams every tensor through memory once per op. Running the whole sequence on chunks of
# about this many bytes per column instead keeps each chunk in cache from op to op. (On GPUs
# one foreach op is one fused kernel over the whole list, so lists are never chunked there.)
# 256 KiB per column keeps a chunk's 3-4 columns in a core's L2; measured on 6.6 M Adam
# parameters (benches/test_bench_optim.py), 256-512 KiB chunks beat 1 MiB by 3-5 %.
CPU_CHUNK_BYTES = 1 << 18


def _chunks(col: Tensors, budget: int) -> list[slice]:
    """Contiguous slices of ``col`` holding about ``budget`` bytes each."""
    out, start, size = [], 0, 0
    for i, t in enumerate(col):
        size += t.numel() * t.element_size()
        if size >= budget:
            out.append(slice(start, i + 1))
            start, size = i + 1, 0
    if start < len(col):
        out.append(slice(start, len(col)))
    return out


def grouped(
    fn: Callable[..., Sequence[Tensors]],
    columns: Sequence[Tensors],
    keep_dtype_of: Sequence[int | None],
    scalars: Sequence[torch.Tensor | float] = (),
    chunked: bool = False,
) -> list[Tensors]:
    """Run ``fn(scalars, *columns)`` once per (device, dtype) group of leaves.

    Args:
        fn: receives a tuple with the ``scalars`` converted for the group (see
            :func:`scalar_for`) and one list per column (all in the group's promoted dtype,
            casting copies where a column had another dtype); returns one list per output.
        columns: equally long leaf lists (updates, state, params...).
        keep_dtype_of: for each output, the index of the column whose dtype it is stored in
            (a state column), or ``None`` to keep the compute dtype (updates).
        scalars: what ``fn`` multiplies by (bias corrections, learning rates): 0-dim tensors,
            or Python floats where the optimizer could read them for free (CPU, eager).
        chunked: ``fn`` is a sequence of several ops: on CPU, run it on cache-sized chunks.

    Returns:
        One list per output, in leaf order.
    """
    n = len(columns[0])
    if n == 0:
        return [[] for _ in keep_dtype_of]
    groups = _groups(columns)
    if groups is None:
        return _run_group(fn, list(columns), keep_dtype_of, scalars, chunked)
    outs: list[list[Any]] = [[None] * n for _ in keep_dtype_of]
    for idx in groups:
        results = _run_group(fn, [[col[i] for i in idx] for col in columns], keep_dtype_of, scalars, chunked)
        for out, res in zip(outs, results):
            for i, t in zip(idx, res):
                out[i] = t
    return outs


def _run_group(
    fn: Callable[..., Sequence[Tensors]],
    cols: list[Tensors],
    keep_dtype_of: Sequence[int | None],
    scalars: Sequence[torch.Tensor | float],
    chunked: bool,
) -> list[Tensors]:
    dtype = _promoted(cols)
    device = cols[0][0].device
    converted = tuple(scalar_for(s, device, dtype) for s in scalars)
    original = [col[0].dtype for col in cols]
    if chunked and device.type == "cpu" and not torch.compiler.is_compiling():
        pieces = _chunks(cols[0], CPU_CHUNK_BYTES)
    else:
        pieces = [slice(None)]
    results: list[Tensors] = []
    for piece in pieces:
        sub = [col[piece] if col[0].dtype == dtype else [t.to(dtype) for t in col[piece]] for col in cols]
        out = fn(converted, *sub)
        if not results:
            results = [list(o) for o in out]
        else:
            for acc, o in zip(results, out):
                acc.extend(o)
    for k, src in enumerate(keep_dtype_of):
        if src is not None and original[src] != dtype:
            results[k] = [t.to(original[src]) for t in results[k]]
    return results


# -- in place when donated, out of place otherwise -----------------------------------------
# Each helper returns the result list: the same tensors when ``inplace``, new ones otherwise.


def mul(xs: Tensors, s: Any, inplace: bool) -> Tensors:
    if inplace:
        torch._foreach_mul_(xs, s)
        return xs
    return list(torch._foreach_mul(xs, s))


def add(xs: Tensors, ys: Any, inplace: bool, alpha: float = 1.0) -> Tensors:
    if inplace:
        torch._foreach_add_(xs, ys, alpha=alpha)
        return xs
    return list(torch._foreach_add(xs, ys, alpha=alpha))


def lerp(xs: Tensors, ys: Tensors, weight: float, inplace: bool) -> Tensors:
    if inplace:
        torch._foreach_lerp_(xs, ys, weight)
        return xs
    return list(torch._foreach_lerp(xs, ys, weight))


def clamp(xs: Tensors, lo: float, hi: float, inplace: bool) -> Tensors:
    if not inplace:
        xs = list(torch._foreach_clamp_max(xs, hi))
    else:
        torch._foreach_clamp_max_(xs, hi)
    torch._foreach_clamp_min_(xs, lo)
    return xs


def leaves_like(tree: Any, spec: _tree.PyTreeSpec, reference: Any, what: str, shapes_of: Tensors | None = None) -> Tensors:
    """The leaves of ``tree``, after checking that its structure is ``spec`` (``reference``'s).

    A mismatch raises ``ValueError`` naming the first differing key path, e.g. grads that
    lack a parameter the optimizer state was initialised with. With ``shapes_of`` (the
    reference's leaves) the shapes must match too.
    """
    leaves, got = _tree.flatten(tree)
    if torch.compiler.is_compiling():
        # Inside torch.compile, dynamo's guards fix the input structures, and some torch
        # versions (2.11) cannot trace a treespec comparison: only count the leaves.
        if len(leaves) != spec.num_leaves:
            raise ValueError(f"{what} differ in structure: {len(leaves)} leaves instead of {spec.num_leaves}")
        return leaves
    if got != spec:
        _tree.assert_same_structure(reference, tree, what=what)
        raise ValueError(f"{what} differ in structure: expected {spec}, got {got}")
    if shapes_of is not None:
        for i, (a, b) in enumerate(zip(leaves, shapes_of)):
            if a.shape != b.shape:
                path = _tree.paths(reference)[i]
                raise ValueError(f"{what} differ in shape at '{path}': {tuple(a.shape)} instead of {tuple(b.shape)}")
    return leaves


def copy(xs: Tensors) -> Tensors:
    """New tensors equal to ``xs`` bit for bit (``x * 1.0`` is exact, NaN and -0.0 included)."""
    return list(torch._foreach_mul(xs, 1.0))


def zeros_like(xs: Tensors, inplace: bool) -> Tensors:
    if inplace:
        torch._foreach_zero_(xs)
        return xs
    return [torch.zeros_like(x) for x in xs]
