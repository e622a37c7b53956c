"""The chapter's models and a GPT, as plain ``nn.Module`` s (turn them into pure functions with ``fnnet.functional``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CnnModel", "LinearRegression", "linreg_data", "GPT", "Block", "CausalSelfAttention", "MLP"]


class CnnModel(nn.Module):
    """The chapter's MNIST CNN for 1 x 28 x 28 inputs and 10 classes (53,994 parameters).

    Conv2d(1, 32, 3), MaxPool2d(2), Conv2d(32, 64, 5), MaxPool2d(2), Dropout2d(0.1),
    AdaptiveMaxPool2d((1, 1)), Flatten, Linear(64, 32), ReLU, Linear(32, 10); parameter names
    ``layers.0.weight`` ... as in the chapter's torchkeras and Lightning examples.
    """

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([
            nn.Conv2d(in_channels=1, out_channels=32, kernel_size=3),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(in_channels=32, out_channels=64, kernel_size=5),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Dropout2d(p=0.1),
            nn.AdaptiveMaxPool2d((1, 1)),
            nn.Flatten(),
            nn.Linear(64, 32),
            nn.ReLU(),
            nn.Linear(32, 10),
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class LinearRegression(nn.Module):
    """The chapter's linear regression: ``x @ w.t() + b`` with ``w`` of shape (1, 2), ``b`` (1, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.empty(1, 2))
        self.b = nn.Parameter(torch.empty(1, 1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The chapter's initialisation, ``w ~ N(0, 1)``, ``b = 0`` (so ``Model.init(key)`` redraws ``w``)."""
        with torch.no_grad():
            self.w.normal_()
            self.b.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w.t() + self.b


def linreg_data(n: int = 1_000_000, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The chapter's data on CPU: ``x ~ U[-5, 5)^2``, ``y = x @ [2, -3]^T + 10 + N(0, 2)`` (std 2)."""
    g = torch.Generator().manual_seed(seed)
    X = 10 * torch.rand([n, 2], generator=g) - 5.0
    w0 = torch.tensor([[2.0, -3.0]])
    b0 = torch.tensor([[10.0]])
    Y = X @ w0.t() + b0 + torch.normal(0.0, 2.0, size=[n, 1], generator=g)
    return X, Y


# --------------------------------------------------------------------------------------
# A decoder-only transformer (GPT-2's architecture, nanoGPT's layout)
# --------------------------------------------------------------------------------------
class _Linear(nn.Linear):
    """``nn.Linear`` initialised as GPT-2 is: weight ~ N(0, ``std``), bias 0 (its own ``reset_parameters``,
    so ``fnnet.functional(gpt).init(key)`` redraws the GPT-2 initialisation)."""

    def __init__(self, n_in: int, n_out: int, *, bias: bool, std: float = 0.02):
        self.std = std  # read by reset_parameters, which nn.Linear's constructor calls
        super().__init__(n_in, n_out, bias=bias)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class _Embedding(nn.Embedding):
    """``nn.Embedding`` initialised as GPT-2 is: N(0, 0.02)."""

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=0.02)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: one ``c_attn`` projection to q, k, v, then
    ``F.scaled_dot_product_attention(is_causal=True)`` (position ``t`` attends to ``<= t``), then ``c_proj``."""

    def __init__(self, n_embd: int, n_head: int, *, dropout: float, bias: bool, proj_std: float):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"GPT: n_embd={n_embd} must be a multiple of n_head={n_head} (the head size is "
                             "n_embd // n_head)")
        self.n_head, self.dropout = n_head, dropout
        self.c_attn = _Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = _Linear(n_embd, n_embd, bias=bias, std=proj_std)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    """The transformer's feed-forward part: ``c_fc`` to 4x the width, GELU, ``c_proj`` back, dropout."""

    def __init__(self, n_embd: int, *, dropout: float, bias: bool, proj_std: float):
        super().__init__()
        self.c_fc = _Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = nn.GELU()
        self.c_proj = _Linear(4 * n_embd, n_embd, bias=bias, std=proj_std)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """One pre-LayerNorm transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, n_embd: int, n_head: int, *, dropout: float, bias: bool, proj_std: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout=dropout, bias=bias, proj_std=proj_std)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout=dropout, bias=bias, proj_std=proj_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """A decoder-only transformer, GPT-2's architecture as nanoGPT writes it: ``idx (B, T) -> logits (B, T, V)``.

    Token embedding ``wte`` plus learned position embedding ``wpe``, dropout, ``n_layer``
    pre-LayerNorm :class:`Block` s (causal self-attention through
    ``F.scaled_dot_product_attention(is_causal=True)``, a 4x GELU MLP) in an ``nn.ModuleList``
    (``blocks``: a block is the unit to shard or rematerialise), a final LayerNorm ``ln_f``, and
    the output layer **tied to the token embedding**: the logits are ``F.linear(x, wte.weight)``,
    so the tie is one parameter (``wte.weight``) with one gradient, and ``state_dict()`` keys are
    ``fnnet.functional(gpt).params`` keys exactly (nanoGPT's ``lm_head.weight`` is this tensor).

    Initialised as GPT-2: every linear and embedding weight ~ N(0, 0.02), biases 0, the two
    residual projections (``attn.c_proj``, ``mlp.c_proj``) ~ N(0, 0.02 / sqrt(2 * n_layer));
    each layer's ``reset_parameters`` does it, so ``fnnet.functional(gpt).init(key)`` redraws it.
    Dropout (attention, residual, embedding) runs under fnnet's explicit keys
    (``model.apply(params, idx, train=True, key=k)``).

    Args:
        vocab_size: the number of token ids.
        block_size: the longest context (positions); longer inputs are a ``ValueError``.
        n_layer, n_head, n_embd: depth, heads, width (``n_embd % n_head == 0``).
        dropout: the dropout rate everywhere (0.0: none, nanoGPT's choice for small models).
        bias: biases in the linear layers and LayerNorms (GPT-2: True).
    """

    def __init__(self, vocab_size: int, *, block_size: int, n_layer: int, n_head: int, n_embd: int,
                 dropout: float = 0.0, bias: bool = True):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("block_size", block_size), ("n_layer", n_layer),
                            ("n_head", n_head), ("n_embd", n_embd)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPT: {name} must be a positive int, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"GPT: dropout must be in [0, 1), got {dropout!r}")
        self.vocab_size, self.block_size = vocab_size, block_size
        proj_std = 0.02 / math.sqrt(2 * n_layer)
        self.wte = _Embedding(vocab_size, n_embd)
        self.wpe = _Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([Block(n_embd, n_head, dropout=dropout, bias=bias, proj_std=proj_std)
                                     for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[-1]
        if T > self.block_size:
            raise ValueError(f"GPT: a sequence of {T} tokens is longer than block_size={self.block_size}; "
                             "crop it (fnnet.generate crops the context for you)")
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(T, device=idx.device)))
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight)
