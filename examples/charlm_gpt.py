"""A character-level GPT trained on real text: the Python standard library's own source files.

Run it with::

    localize examples/charlm_gpt.py --blocks 4 --train

Inputs are (B, 64) character ids, targets the same windows shifted by one character; the model
returns (B, 64, vocab) logits, so this file supplies ``loss_fn`` (cross-entropy per position).
The corpus is the first 1M characters of the stdlib sources; 5000 training windows keep one
epoch to seconds on a laptop CPU.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from localize.data import Split, char_dataset, char_vocab, stdlib_text
from localize.zoo import GPT

BLOCK_SIZE = 64
NUM_TRAIN = 5_000
NUM_TEST = 500


@cache
def _text() -> str:
    return stdlib_text(max_chars=1_000_000)


def model() -> nn.Module:
    """A 4-layer causal transformer (dim 64, 4 heads) over the corpus' character vocabulary."""
    return GPT(vocab_size=len(char_vocab(_text())), block_size=BLOCK_SIZE, dim=64, depth=4, heads=4)


def example_inputs() -> tuple[torch.Tensor, ...]:
    """A batch of 8 windows of 64 character ids: int64 (8, 64)."""
    vocab_size = len(char_vocab(_text()))
    return (torch.randint(0, vocab_size, (8, BLOCK_SIZE)),)


def dataset() -> Split:
    """``((x_train, y_train), (x_test, y_test))``: int64 (N, 64) inputs and next-character targets."""
    _, train, test = char_dataset(
        _text(), block_size=BLOCK_SIZE, num_train=NUM_TRAIN, num_test=NUM_TEST, seed=0
    )
    return train, test


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every position: logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())
