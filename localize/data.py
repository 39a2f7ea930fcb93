"""Small real datasets that are built offline, as tensors.

Nothing here downloads: MNIST-1D is generated procedurally by the ``mnist1d`` package, the
digits ship inside scikit-learn, and the text corpus is the Python standard library's own source.
``mnist1d`` and ``scikit-learn`` come with ``pip install 'localize-learning[data]'``.

Every loader returns ``((x_train, y_train), (x_test, y_test))`` (the char dataset also returns
its vocabulary) and is deterministic for a given seed.

>>> from localize.data import char_dataset
>>> vocab, (x, y), _ = char_dataset("hello world, " * 20, block_size=8, num_train=4, num_test=2)
>>> x.shape, x.dtype
(torch.Size([4, 8]), torch.int64)
>>> bool((x[:, 1:] == y[:, :-1]).all())
True
"""

from __future__ import annotations

import math
import os
import random
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from localize.errors import ConfigError, LocalizeError

__all__ = [
    "Split",
    "batch_order",
    "char_dataset",
    "char_vocab",
    "digits",
    "epoch_batches",
    "iterate_batches",
    "mnist1d",
    "num_batches",
    "random_dataset",
    "sequential_batches",
    "stdlib_text",
]

Split = tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``((x_train, y_train), (x_test, y_test))``."""

_DATA_EXTRA = "pip install 'localize-learning[data]'"

# Stdlib folders that hold tests, fixtures or third-party code rather than library source.
_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


def _missing(package: str, error: ImportError) -> LocalizeError:
    return LocalizeError(
        f"the '{package}' package is needed for this dataset ({error}); install it with {_DATA_EXTRA}"
    )


def mnist1d(num_train: int = 4000, seed: int = 42, num_test: int | None = None) -> Split:
    """MNIST-1D (Greydanus, 2020), generated offline: x float32 (N, 1, 40), y int64 in [0, 10).

    ``num_test`` defaults to ``num_train // 4``, so the defaults give the usual 4000 / 1000
    split. Generation never touches the network and leaves the global ``random`` and
    ``numpy`` RNG states as they were.

    >>> (x, y), (x_test, y_test) = mnist1d(num_train=200)
    >>> x.shape, x.dtype, y.dtype, tuple(x_test.shape)
    (torch.Size([200, 1, 40]), torch.float32, torch.int64, (50, 1, 40))
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as error:
        raise _missing("mnist1d", error) from None
    num_test = num_train // 4 if num_test is None else num_test
    if num_train < 1 or num_test < 1:
        raise ConfigError(f"mnist1d needs num_train >= 1 and num_test >= 1, got {num_train} and {num_test}")

    args = get_dataset_args()
    # make_dataset draws samples_per_class = num_samples // 10 per digit: round up, then cut.
    args.num_samples = 10 * math.ceil((num_train + num_test) / 10)
    args.seed = seed
    # make_dataset seeds the global RNGs; put them back so callers' randomness is unaffected.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        raw = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)

    x = torch.from_numpy(np.concatenate([raw["x"], raw["x_test"]])).float().unsqueeze(1)
    y = torch.from_numpy(np.concatenate([raw["y"], raw["y_test"]])).long()
    end = num_train + num_test
    return (x[:num_train], y[:num_train]), (x[num_train:end], y[num_train:end])


def digits(test_fraction: float = 0.2, seed: int = 0) -> Split:
    """The sklearn 8x8 handwritten digits (1797 images, bundled): x float32 (N, 1, 8, 8) in [0, 1].

    The split is a seeded random permutation; the test set holds ``round(1797 * test_fraction)``
    images.

    >>> (x, y), (x_test, y_test) = digits()
    >>> tuple(x.shape), tuple(x_test.shape), y.dtype
    ((1438, 1, 8, 8), (359, 1, 8, 8), torch.int64)
    >>> float(x.min()), float(x.max())
    (0.0, 1.0)
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise _missing("scikit-learn", error) from None
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")

    bunch = load_digits()
    x = torch.from_numpy(bunch.images).float().div(16.0).unsqueeze(1)  # pixel values are 0..16
    y = torch.from_numpy(bunch.target).long()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    num_test = round(len(y) * test_fraction)
    test, train = order[:num_test], order[num_test:]
    return (x[train], y[train]), (x[test], y[test])


def stdlib_text(max_chars: int = 1_000_000) -> str:
    """Up to ``max_chars`` characters of real text: this Python's standard-library ``*.py`` sources.

    Files are read in a fixed order (directories walked top-down, names sorted; test suites and
    site-packages skipped; files that are not UTF-8 skipped), so the text is the same on every call
    with the same Python installation.

    >>> text = stdlib_text(max_chars=1000)
    >>> len(text)
    1000
    """
    if max_chars < 1:
        raise ConfigError(f"max_chars must be >= 1, got {max_chars}")
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIPPED_DIRS)
        for name in sorted(f for f in filenames if f.endswith(".py")):
            try:
                source = (Path(dirpath) / name).read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            parts.append(source)
            total += len(source)
            if total >= max_chars:
                return "".join(parts)[:max_chars]
    if not parts:
        raise LocalizeError(f"found no readable *.py files under the standard library at {root}")
    return "".join(parts)


def char_vocab(text: str) -> list[str]:
    """The sorted distinct characters of ``text``; token id ``i`` is ``vocab[i]``.

    >>> char_vocab("abracadabra")
    ['a', 'b', 'c', 'd', 'r']
    """
    return sorted(set(text))


def char_dataset(
    text: str, block_size: int = 64, num_train: int = 10_000, num_test: int = 1_000, seed: int = 0
) -> tuple[list[str], tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Next-character prediction windows: ``(vocab, (x_train, y_train), (x_test, y_test))``.

    x and y are int64 (num, block_size) and ``y[:, t]`` is the character after ``x[:, t]``.
    Train windows start at seeded random offsets in the first 90% of the text, test windows in
    the last 10%, so the two never share characters. The vocabulary covers the whole text.

    >>> vocab, (x, y), (x_test, y_test) = char_dataset("abcdefghij" * 50, block_size=4, num_train=3, num_test=2)
    >>> "".join(vocab[i] for i in x[0]), "".join(vocab[i] for i in y[0])
    ('ghij', 'hija')
    >>> tuple(x_test.shape)
    (2, 4)
    """
    if block_size < 1 or num_train < 1 or num_test < 1:
        raise ConfigError(
            f"char_dataset needs block_size, num_train and num_test >= 1, got {block_size}, {num_train}, {num_test}"
        )
    split = int(len(text) * 0.9)
    if len(text) - split < block_size + 1:
        raise ConfigError(
            f"text of {len(text)} characters is too short for block_size {block_size}: its last 10% "
            f"(the test part) needs at least {block_size + 1} characters"
        )
    vocab = char_vocab(text)
    index = {ch: i for i, ch in enumerate(vocab)}
    ids = torch.tensor([index[ch] for ch in text], dtype=torch.long)

    generator = torch.Generator().manual_seed(seed)
    window = torch.arange(block_size + 1)

    def windows(start: int, stop: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Windows of block_size + 1 characters lying entirely inside ids[start:stop].
        offsets = torch.randint(start, stop - block_size, (count,), generator=generator)
        chunks = ids[offsets[:, None] + window]
        return chunks[:, :-1].contiguous(), chunks[:, 1:].contiguous()

    return vocab, windows(0, split, num_train), windows(split, len(text), num_test)


# ----------------------------------------------------------------------------- the order batches are drawn in
# (the CLI, the distributed launcher and program.py all draw them here)


RANDOM_TRAIN = 512  # samples in the random training split of a model file without dataset()


def random_dataset(inputs, output_shape, num_train=RANDOM_TRAIN, num_test=128, seed=0):
    """Random data shaped like the example inputs, for model files without ``dataset()``.

    ``inputs`` lists ``(name, shape per sample, dtype name, high)``: floats are standard normal,
    integers uniform in ``[0, high)``. Targets are class indices over the output's last dim.
    Returns ``((xs, y), (xs_test, y_test))`` with ``xs`` a tuple of tensors.
    """
    generator = torch.Generator().manual_seed(seed)

    def split(n):
        xs = []
        for _name, shape, dtype, high in inputs:
            if high is None:
                x = torch.randn((n, *shape), generator=generator)
            else:
                x = torch.randint(0, max(int(high), 1), (n, *shape), generator=generator)
            xs.append(x.to(getattr(torch, dtype)))
        y = torch.randint(0, output_shape[-1], (n, *output_shape[1:-1]), generator=generator)
        return tuple(xs), y

    return split(num_train), split(num_test)


def batch_order(num_samples, batch_size, epoch, seed):
    """One epoch's mini-batches of sample indices: a permutation seeded by ``(seed, epoch)``.

    The last, smaller batch is dropped (batch-norm cannot train on one sample) unless it is the
    only one.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    batches = list(torch.randperm(num_samples, generator=generator).split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def epoch_batches(data, batch_size, epoch, seed):
    """``(inputs, target)`` batches of one epoch, ``inputs`` a tuple of tensors.

    Tensor data ``(x, y)`` (``x`` may be a tuple of tensors) is drawn in :func:`batch_order`;
    anything else (a ``DataLoader``) is iterated as it is.
    """
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], torch.Tensor):
        x, y = data
        xs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
        for index in batch_order(len(y), batch_size, epoch, seed):
            yield tuple(t[index] for t in xs), y[index]
    else:
        for x, y in data:
            yield (tuple(x) if isinstance(x, (tuple, list)) else (x,)), y


def iterate_batches(data, batch_size, seed):
    """:func:`epoch_batches` of epochs 0, 1, 2, ... without end."""
    epoch = 0
    while True:
        empty = True
        for batch in epoch_batches(data, batch_size, epoch, seed):
            empty = False
            yield batch
        if empty:
            raise ValueError("the training data has no batches")
        epoch += 1


def sequential_batches(data: Any, batch_size: int) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
    """Evaluation batches in order, the last one kept."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], torch.Tensor):
        x, y = data
        xs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
        for start in range(0, len(y), batch_size):
            yield tuple(t[start : start + batch_size] for t in xs), y[start : start + batch_size]
    else:
        yield from epoch_batches(data, batch_size, 0, 0)


def num_batches(data: Any, batch_size: int) -> int | None:
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], torch.Tensor):
        n = len(data[1])
        return max(1, n // batch_size)
    try:
        return len(data)
    except TypeError:
        return None
