"""The chapter's models, as plain ``nn.Module`` s (turn them into pure functions with ``fnnet.functional``)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CnnModel", "LinearRegression", "linreg_data"]


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
