"""Offline datasets (determinism, shapes, dtypes, ranges, no network) and the example model files."""

from __future__ import annotations

import importlib.util
import random
import socket
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from localize.data import char_dataset, char_vocab, digits, mnist1d, stdlib_text
from localize.errors import LocalizeError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a dataset tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def assert_splits_equal(a, b) -> None:
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# --------------------------------------------------------------------------- mnist1d


def test_mnist1d_shapes_dtypes_and_determinism(no_network) -> None:
    first = mnist1d(num_train=300, seed=3)
    (x, y), (x_test, y_test) = first
    assert x.shape == (300, 1, 40) and x_test.shape == (75, 1, 40)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.shape == (300,) and y_test.shape == (75,)
    assert y.min() >= 0 and y.max() <= 9 and len(torch.unique(y)) == 10
    assert torch.isfinite(x).all()
    assert_splits_equal(first, mnist1d(num_train=300, seed=3))
    assert not torch.equal(x, mnist1d(num_train=300, seed=4)[0][0])


def test_mnist1d_defaults_and_explicit_test_size(no_network) -> None:
    (x, _), (x_test, _) = mnist1d(num_train=33, num_test=7)
    assert x.shape == (33, 1, 40) and x_test.shape == (7, 1, 40)


def test_mnist1d_leaves_global_rng_alone() -> None:
    np.random.seed(123)
    random.seed(123)
    expected_np, expected_py = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    mnist1d(num_train=20)
    assert np.random.rand() == expected_np and random.random() == expected_py


# --------------------------------------------------------------------------- digits


def test_digits_shapes_range_and_determinism() -> None:
    first = digits()
    (x, y), (x_test, y_test) = first
    assert x.shape == (1438, 1, 8, 8) and x_test.shape == (359, 1, 8, 8)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() == 0.0 and x.max() == 1.0 and x_test.max() <= 1.0
    assert set(y.tolist()) == set(range(10))
    assert_splits_equal(first, digits())
    assert not torch.equal(y, digits(seed=1)[0][1])
    assert len(digits(test_fraction=0.5)[1][1]) == round(1797 * 0.5)


def test_digits_train_and_test_are_disjoint() -> None:
    (x, _), (x_test, _) = digits()
    rows = {tuple(r.tolist()) for r in x.flatten(1)}
    overlap = sum(tuple(r.tolist()) in rows for r in x_test.flatten(1))
    assert overlap == 0


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_digits_rejects_bad_test_fraction(fraction: float) -> None:
    with pytest.raises(LocalizeError, match="test_fraction"):
        digits(test_fraction=fraction)


@pytest.mark.parametrize(
    "blocked, call",
    [("mnist1d", lambda: mnist1d(num_train=10)), ("sklearn.datasets", lambda: digits())],
)
def test_missing_optional_package_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, blocked: str, call
) -> None:
    for name in [m for m in sys.modules if m == blocked or m.startswith(blocked + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, blocked, None)  # makes `import blocked` raise ImportError
    with pytest.raises(LocalizeError, match=r"pip install 'localize-learning\[data\]'"):
        call()


# --------------------------------------------------------------------------- text


def test_stdlib_text_is_real_deterministic_text() -> None:
    text = stdlib_text(max_chars=200_000)
    assert len(text) == 200_000
    assert text == stdlib_text(max_chars=200_000)
    assert stdlib_text(max_chars=1_000) == text[:1_000]
    assert "def " in text and "import " in text


def test_char_dataset_targets_are_inputs_shifted_by_one() -> None:
    text = stdlib_text(max_chars=50_000)
    vocab, (x, y), (x_test, y_test) = char_dataset(text, block_size=32, num_train=200, num_test=50, seed=0)
    assert vocab == char_vocab(text) == sorted(set(text))
    assert x.shape == y.shape == (200, 32) and x_test.shape == y_test.shape == (50, 32)
    assert x.dtype == y.dtype == torch.int64
    assert x.min() >= 0 and x.max() < len(vocab)
    split = int(len(text) * 0.9)
    for inputs, targets, region in [(x, y, text[:split]), (x_test, y_test, text[split:])]:
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        for row in range(0, len(inputs), 7):
            window = "".join(vocab[i] for i in inputs[row]) + vocab[targets[row, -1]]
            assert window in region


def test_char_dataset_is_deterministic_per_seed() -> None:
    text = stdlib_text(max_chars=20_000)
    a = char_dataset(text, block_size=16, num_train=64, num_test=8, seed=5)
    b = char_dataset(text, block_size=16, num_train=64, num_test=8, seed=5)
    c = char_dataset(text, block_size=16, num_train=64, num_test=8, seed=6)
    assert a[0] == b[0]
    assert_splits_equal(a[1:], b[1:])
    assert not torch.equal(a[1][0], c[1][0])


def test_char_dataset_rejects_short_text() -> None:
    with pytest.raises(LocalizeError, match="too short"):
        char_dataset("abc" * 10, block_size=64)


# --------------------------------------------------------------------------- examples


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"localize_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["mnist1d_resnet", "digits_cnn", "charlm_gpt", "vit_tiny"])
def test_example_model_runs_on_its_inputs_and_dataset(name: str) -> None:
    example = load_example(name)
    assert f"localize examples/{name}.py --blocks 4 --train" in example.__doc__
    model = example.model()
    inputs = example.example_inputs()
    assert isinstance(inputs, tuple) and inputs[0].shape[0] == 8
    model(*inputs)

    (x, y), (x_test, y_test) = example.dataset()
    for features, labels in [(x, y), (x_test, y_test)]:
        assert features.shape[1:] == inputs[0].shape[1:] and features.dtype == inputs[0].dtype
        assert len(features) == len(labels) > 0 and labels.dtype == torch.int64

    output = model(x[:8])
    loss_fn = getattr(example, "loss_fn", torch.nn.functional.cross_entropy)
    loss = loss_fn(output, y[:8])
    assert loss.ndim == 0 and torch.isfinite(loss)
    if name == "charlm_gpt":
        assert y.max() < output.shape[-1]
