"""Models the tests share: the chapter's CNN and friends."""

import torch
from torch import nn


def chapter_cnn() -> nn.Module:
    """The chapter's MNIST CNN (section 6-3, torchkeras and Lightning examples)."""
    return nn.Sequential(
        nn.Conv2d(1, 32, kernel_size=3),
        nn.MaxPool2d(2, 2),
        nn.Conv2d(32, 64, kernel_size=5),
        nn.MaxPool2d(2, 2),
        nn.Dropout2d(p=0.1),
        nn.AdaptiveMaxPool2d((1, 1)),
        nn.Flatten(),
        nn.Linear(64, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


def bn_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


class LinearRegression(nn.Module):
    """The chapter's linear regression module."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(1, 2))
        self.b = nn.Parameter(torch.zeros(1, 1))

    def forward(self, x):
        return x @ self.w.t() + self.b
