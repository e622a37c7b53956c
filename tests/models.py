"""Models the tests share: the chapter's CNN and friends."""

from torch import nn

from fnnet.models import CnnModel


def chapter_cnn() -> nn.Module:
    """The chapter's MNIST CNN (section 6-3, torchkeras and Lightning examples)."""
    return CnnModel()


def bn_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
