"""How fnnet compiles: ``torch.compile`` plus one graph pass for memory-bound matmuls on CPU.

Everything compiled in fnnet (``make_train_step(jit=True)``, ``make_eval_step(jit=True)``,
``Trainer(jit=True)``, :func:`fnnet.jit`) goes through :func:`compile`, which is
``torch.compile`` with the arguments the caller gives plus, for the default inductor
backend, :class:`SkinnyMatmulPass`.

Why the pass: inductor hands every matrix product to a BLAS library call, which it cannot
fuse with the element-wise code around it. That is right for products with real arithmetic
work, and wasteful for *skinny* ones, whose cost is reading their one large operand: a
linear layer with 2 inputs over a million rows (``(1e6, 2) @ (2, 1)``) or its weight gradient
(``(1, 1e6) @ (1e6, 2)``). Each such call is one more pass over memory, plus layout copies.
On CUDA inductor already rewrites such products into fusable element-wise code
(its ``decompose_mm_pass``); on CPU its thresholds leave them alone. :class:`SkinnyMatmulPass`
rewrites, on CPU and for float32/float64 with static shapes, products with one large
dimension (at least ``LARGE_DIM``) and two small ones:

* a short contraction and a thin side (``K <= 8``, inductor's unrolling threshold, and
  ``min(M, N) <= 8``) become a broadcast multiply and a sum over ``K``: element-wise code that
  fuses with its producers and consumers;
* a long contraction with a tiny output (``M * N <= 8``) becomes one sum over ``K`` per output
  element; these fuse with the other full reductions over the same rows (a loss, a bias
  gradient).

A full-batch linear-regression step (forward, MSE, gradient, Adam) then compiles to one pass
over the data instead of four. Every other product is left to BLAS. The pass changes the
order of floating-point additions in the products it rewrites (inductor sums with cascade
summation), not what they compute.

Products below ``LARGE_DIM`` in every dimension are left alone (nothing to win there). Opt out
with ``compile_options={"options": {"post_grad_custom_post_pass": None}}``; any pass you set for
that inductor option, per call or globally in ``torch._inductor.config``, replaces fnnet's.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["compile", "SkinnyMatmulPass", "SHORT_CONTRACTION", "TINY_OUTPUT", "LARGE_DIM"]

# Contractions up to this length become element-wise code (inductor unrolls reductions of at
# most 8 elements: config.unroll_reductions_threshold), outputs up to this many elements
# become per-element reductions. Only products with a dimension of at least LARGE_DIM are
# touched: below that a BLAS call costs next to nothing and there is nothing to win.
SHORT_CONTRACTION = 8
TINY_OUTPUT = 8
LARGE_DIM = 4096

_PASS_OPTION = "post_grad_custom_post_pass"
_DTYPES = (torch.float32, torch.float64)

try:  # torch >= 2.6; on older torch fnnet compiles without the pass
    from torch._inductor.custom_graph_pass import CustomGraphPass as _PassBase
    from torch._inductor.custom_graph_pass import get_hash_for_files as _hash_files
except ImportError:  # pragma: no cover - depends on the installed torch
    _PassBase = object  # type: ignore[assignment,misc]
    _hash_files = None


def _static_dims(*shapes: Any) -> list[int] | None:
    dims = [d for shape in shapes for d in shape]
    return dims if all(isinstance(d, int) for d in dims) else None


class SkinnyMatmulPass(_PassBase):  # type: ignore[misc,valid-type]
    """An inductor post-grad pass: memory-bound CPU matmuls become fusable element-wise code.

    Rewrites ``aten.mm(a, b)`` and ``aten.addmm(bias, a, b)`` (``alpha = beta = 1``) with
    ``a: (M, K)``, ``b: (K, N)`` on CPU in float32/float64, one of ``M, K, N`` at least
    ``LARGE_DIM``, when ``K <= SHORT_CONTRACTION`` and ``min(M, N) <= TINY_OUTPUT``
    (broadcast multiply, sum over ``K``) or ``1 <= M * N <= TINY_OUTPUT`` (one sum over ``K``
    per output element). It runs after inductor's
    own post-grad passes (``post_grad_custom_post_pass``). See the module docstring for why.
    """

    def __call__(self, graph: torch.fx.Graph) -> None:
        """Rewrite ``graph`` in place (inductor's custom pass contract): skinny products become element-wise code."""
        aten = torch.ops.aten
        for node in list(graph.nodes):
            if node.op != "call_function":
                continue
            if node.target is aten.mm.default and len(node.args) == 2 and not node.kwargs:
                bias, (a, b) = None, node.args
            elif node.target is aten.addmm.default and len(node.args) == 3 and all(
                node.kwargs.get(k, 1) == 1 for k in ("alpha", "beta")
            ):
                bias, a, b = node.args
            else:
                continue
            rewritten = _rewrite(graph, node, bias, a, b)
            if rewritten is not None:
                node.replace_all_uses_with(rewritten)
                graph.erase_node(node)

    def uuid(self) -> Any:
        """The pass's identity for inductor's cache: a hash of this file and the thresholds."""
        # Inductor caches compiled graphs under this id: it changes with this file and the thresholds.
        if _hash_files is None:
            return None
        return (_hash_files((__file__,)), SHORT_CONTRACTION, TINY_OUTPUT, LARGE_DIM)


def _rewrite(graph: torch.fx.Graph, node: torch.fx.Node, bias: Any, a: Any, b: Any) -> torch.fx.Node | None:
    """The replacement for one matmul node, or ``None`` to leave it to BLAS."""
    aten = torch.ops.aten
    vals = [x.meta.get("val") if isinstance(x, torch.fx.Node) else None for x in (a, b)]
    va, vb = vals
    if not all(isinstance(v, torch.Tensor) for v in vals) or va.ndim != 2 or vb.ndim != 2:
        return None
    if va.device.type != "cpu" or vb.device.type != "cpu" or va.dtype not in _DTYPES or vb.dtype != va.dtype:
        return None
    dims = _static_dims(va.shape, vb.shape)
    if dims is None:
        return None
    m, k, _, n = dims
    if max(m, k, n) < LARGE_DIM:
        return None
    if bias is not None:
        vbias = bias.meta.get("val") if isinstance(bias, torch.fx.Node) else None
        if not isinstance(vbias, torch.Tensor) or vbias.dtype != va.dtype:
            return None

    def call(op: Any, *args: Any) -> torch.fx.Node:
        new = graph.call_function(op, args)
        # Later passes and the lowering read each node's fake value: compute it from the inputs'.
        fake = [x.meta["val"] if isinstance(x, torch.fx.Node) else x for x in args]
        fake = [[y.meta["val"] for y in x] if isinstance(x, list) and x and isinstance(x[0], torch.fx.Node) else x
                for x in fake]
        new.meta["val"] = op(*fake)
        return new

    with graph.inserting_before(node):
        if k <= SHORT_CONTRACTION and min(m, n) <= TINY_OUTPUT:
            product = call(aten.mul.Tensor, call(aten.unsqueeze.default, a, 2), call(aten.unsqueeze.default, b, 0))
            out = call(aten.sum.dim_IntList, product, [1])
        elif 1 <= m * n <= TINY_OUTPUT:
            cells = []
            for i in range(m):
                row = call(aten.select.int, a, 0, i)
                for j in range(n):
                    total = call(aten.sum.default, call(aten.mul.Tensor, row, call(aten.select.int, b, 1, j)))
                    cells.append(call(aten.unsqueeze.default, total, 0))
            out = call(aten.view.default, call(aten.cat.default, cells), [m, n])
        else:
            return None
        if bias is not None:
            out = call(aten.add.Tensor, bias, out)
    return out


_PASS = SkinnyMatmulPass() if _hash_files is not None else None


def _with_pass(options: dict[str, Any] | None, mode: str | None, dynamic: Any) -> dict[str, Any]:
    """Inductor options holding fnnet's pass, with ``mode`` folded in (torch.compile takes one of the two)."""
    from torch._inductor import config as inductor_config

    merged: dict[str, Any] = {}
    if mode is not None:
        from torch._inductor import list_mode_options

        merged.update(list_mode_options(mode, dynamic))
    # A pass installed globally (torch._inductor.config) is the user's: leave it in charge.
    if _PASS is not None and getattr(inductor_config, _PASS_OPTION, None) is None:
        merged[_PASS_OPTION] = _PASS
    merged.update(options or {})
    if merged.get(_PASS_OPTION, 0) is None:
        del merged[_PASS_OPTION]
    return merged


def compile(fn: Callable, **compile_kwargs: Any) -> Callable:  # noqa: A001 - mirrors torch.compile
    """``torch.compile(fn, **compile_kwargs)``, with :class:`SkinnyMatmulPass` for inductor.

    Other backends (``backend="eager"``, ``"aot_eager"``, a callable) get exactly the
    arguments given. With inductor, ``mode`` is turned into the inductor options it stands
    for, so it combines with the pass (``mode="reduce-overhead"`` still means CUDA graphs).
    An ``options`` entry ``post_grad_custom_post_pass`` given by the caller wins (``None``
    turns fnnet's pass off), and so does a pass set globally in ``torch._inductor.config``.
    """
    kwargs = dict(compile_kwargs)
    if kwargs.get("backend", "inductor") != "inductor":
        return torch.compile(fn, **kwargs)
    mode = kwargs.pop("mode", None)
    if mode == "default":
        mode = None
    kwargs["options"] = _with_pass(kwargs.pop("options", None), mode, kwargs.get("dynamic"))
    if not kwargs["options"]:
        del kwargs["options"]
    return torch.compile(fn, **kwargs)
