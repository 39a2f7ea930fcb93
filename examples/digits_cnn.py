"""SmallCNN on the scikit-learn 8x8 handwritten digits (1438 train / 359 test, bundled with sklearn).

Run it with::

    localize examples/digits_cnn.py --blocks 4 --train

Needs ``pip install 'localize-learning[data]'`` for scikit-learn.
"""

from __future__ import annotations

import torch
from torch import nn

from localize.data import Split, digits
from localize.zoo import SmallCNN


def model() -> nn.Module:
    """Three conv-bn-relu blocks in ``features`` and a pooled Linear ``classifier``."""
    return SmallCNN(in_channels=1, num_classes=10)


def example_inputs() -> tuple[torch.Tensor, ...]:
    """A batch of 8 grey 8x8 images in [0, 1]: (8, 1, 8, 8)."""
    return (torch.rand(8, 1, 8, 8),)


def dataset() -> Split:
    """``((x_train, y_train), (x_test, y_test))``: float32 (N, 1, 8, 8) in [0, 1], int64 labels."""
    return digits(test_fraction=0.2, seed=0)
