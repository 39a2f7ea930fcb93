"""A tiny Vision Transformer on the scikit-learn 8x8 digits: 2x2 patches, 16 tokens + cls, 4 layers.

Run it with::

    localize examples/vit_tiny.py --blocks 4 --train

Needs ``pip install 'localize-learning[data]'`` for scikit-learn.
"""

from __future__ import annotations

import torch
from torch import nn

from localize.data import Split, digits
from localize.zoo import ViT


def model() -> nn.Module:
    """Four pre-norm encoder layers in ``layers`` (dim 64, 4 heads), then ``norm`` and ``head``."""
    return ViT(image_size=8, patch_size=2, in_channels=1, num_classes=10, dim=64, depth=4, heads=4)


def example_inputs() -> tuple[torch.Tensor, ...]:
    """A batch of 8 grey 8x8 images in [0, 1]: (8, 1, 8, 8)."""
    return (torch.rand(8, 1, 8, 8),)


def dataset() -> Split:
    """``((x_train, y_train), (x_test, y_test))``: float32 (N, 1, 8, 8) in [0, 1], int64 labels."""
    return digits(test_fraction=0.2, seed=0)
