"""ResNet1d on MNIST-1D (4000 train / 1000 test signals of length 40, generated offline).

Run it with::

    localize examples/mnist1d_resnet.py --blocks 4 --train

Needs ``pip install 'localize-learning[data]'`` for the ``mnist1d`` generator.
"""

from __future__ import annotations

import torch
from torch import nn

from localize.data import Split, mnist1d
from localize.zoo import ResNet1d


def model() -> nn.Module:
    """Three stages (32, 64, 128 channels) of two basic blocks each: ``layer1``..``layer3``."""
    return ResNet1d(in_channels=1, num_classes=10)


def example_inputs() -> tuple[torch.Tensor, ...]:
    """A batch of 8 signals shaped like MNIST-1D: (8, 1, 40)."""
    return (torch.randn(8, 1, 40),)


def dataset() -> Split:
    """``((x_train, y_train), (x_test, y_test))``: float32 (N, 1, 40) signals, int64 labels."""
    return mnist1d(num_train=4000, seed=42)
