"""A catalogue of every kind of bad input the Python API receives, each with the error it must give.

Each entry is (what is wrong, call, error class, pattern the message must match). A raw torch or
Python exception escaping any of these is a defect: users must read what is wrong and what to do.
The CLI's bad inputs are catalogued in tests/test_cli.py (one line on stderr, exit code 2).
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import localize
from localize.errors import ConfigError, InputError, PlanError, TargetError, TraceError
from localize.runtime.checkpoint import CheckpointError
from tests.models import CASES

X = (torch.randn(4, 16),)
Y = torch.zeros(4, dtype=torch.long)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return CASES["mlp"].build()


def _transform(**kwargs):
    kwargs.setdefault("blocks", 2)
    kwargs.setdefault("example_inputs", X)
    return lambda: localize.transform(kwargs.pop("model", None) or _mlp(), **kwargs)


def _step(inputs, target=Y, **kwargs):
    def run():
        lm = localize.transform(_mlp(), blocks=2, example_inputs=X, **kwargs)
        lm.train_step(inputs, target)

    return run


def _call(*inputs):
    return lambda: localize.transform(_mlp(), blocks=2, example_inputs=X)(*inputs)


class Frozen(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 2).requires_grad_(False)

    def forward(self, x):
        return self.a(x)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        return self.b(h * 2 if h.sum() > 0 else h)


CATALOGUE = [
    # --- transform(): the model
    ("model is not a module", lambda: localize.transform("resnet"), ConfigError, r"model must be a torch.nn.Module, got str"),
    ("model is a function", lambda: localize.transform(lambda x: x), ConfigError, r"got function"),
    ("model has no trainable parameters", _transform(model=Frozen(), blocks=1, example_inputs=(torch.randn(2, 4),)), PlanError, r"no trainable parameters"),
    ("data-dependent branch", _transform(model=Branchy(), example_inputs=(torch.randn(2, 4),)), TraceError, r"data-dependent control flow"),
    # --- transform(): blocks and cuts
    ("blocks = 0", _transform(blocks=0), ConfigError, r"blocks must be an int >= 1"),
    ("blocks is a float", _transform(blocks=2.0), ConfigError, r"blocks must be an int >= 1"),
    ("blocks is a string", _transform(blocks="4"), ConfigError, r"blocks must be an int >= 1"),
    ("more blocks than legal cuts", _transform(blocks=50), PlanError, r"at most \d+ blocks are possible"),
    ("cuts is a string", _transform(blocks=None, cuts="layers.1"), ConfigError, r"cuts must be a list of module names"),
    ("cuts names no module", _transform(blocks=None, cuts=["layer9"]), PlanError, r"'layer9', which is not a module of MLP"),
    ("cuts names a boundary twice", _transform(blocks=None, cuts=["layers.2", "layers.2"]), PlanError, r"name each boundary once"),
    ("cuts disagree with blocks", _transform(blocks=4, cuts=["layers.2"]), PlanError, r"make 2 blocks but blocks=4"),
    ("cut before the first module", _transform(blocks=None, cuts=["flatten"]), PlanError, r"leaves block 0 empty"),
    ("max_frontier = 0", _transform(max_frontier=0), ConfigError, r"max_frontier must be an int >= 1"),
    ("unknown balance", _transform(balance="time"), ConfigError, r"choose one of \['flops', 'params', 'memory', 'peak'\]"),
    # --- transform(): example inputs
    ("example input of the wrong shape", _transform(example_inputs=(torch.randn(4, 7),)), ConfigError, r"MLP itself fails on example_inputs \(RuntimeError: (addmm: )?mat1 and mat2"),
    ("example input that is not a tensor", _transform(example_inputs=("x",)), ConfigError, r"itself fails on example_inputs"),
    ("example_inputs of a bad type", _transform(example_inputs={1, 2}), ConfigError, r"example_inputs must be a tuple of tensors, got set"),
    ("example_kwargs not a dict", _transform(example_kwargs=[1]), ConfigError, r"example_kwargs must be a dict"),
    ("example_kwargs unknown name", _transform(example_kwargs={"mask": torch.ones(4)}), ConfigError, r"example_kwargs names 'mask'"),
    # --- transform(): strategy, optimizer, loss, output, policy
    ("unknown aux", _transform(aux="nope"), ConfigError, r"unknown aux strategy 'nope'; choose one of"),
    ("aux is not a name", _transform(aux=3), ConfigError, r"unknown aux strategy 3"),
    ("aux_options not a dict", _transform(aux_options=["width"]), ConfigError, r"aux_options must be a dict"),
    ("unknown aux option", _transform(aux_options={"widht": 3}), ConfigError, r"valid options are"),
    ("unknown optimizer name", _transform(optimizer="rmsprop"), localize.LocalizeError, r"unknown optimizer 'rmsprop'"),
    ("optimizer of a bad type", _transform(optimizer=3), ConfigError, r"optimizer must be"),
    ("lr with a factory", _transform(optimizer=lambda p: torch.optim.SGD(p, lr=0.1), lr=0.1), ConfigError, r"lr= applies to optimizer='sgd'/'adamw'"),
    ("lr negative", _transform(optimizer="sgd", lr=-1.0), ConfigError, r"lr must be a number > 0, got -1"),
    ("lr is a string", _transform(optimizer="sgd", lr="fast"), ConfigError, r"lr must be a number > 0, got 'fast'"),
    ("loss_fn not callable", _transform(loss_fn="ce"), ConfigError, r"loss_fn must be a callable"),
    ("output selects nothing", _transform(output="scores"), ConfigError, r"output='scores' matches no output tensor"),
    ("unknown on_nan policy", _transform(on_nan="ignore"), ConfigError, r"on_nan='ignore'; choose 'raise' or 'skip'"),
    # --- train_step(): inputs
    ("inputs of a bad type", _step("x"), ConfigError, r"inputs must be a tensor, a tuple of tensors or a dict"),
    ("too many inputs", _step((X[0], X[0])), ConfigError, r"too many positional arguments"),
    ("unknown keyword input", _step({"y": X[0]}), ConfigError, r"missing a required argument: 'x'"),
    ("input of the wrong shape", _step(torch.randn(4, 7)), InputError, r"block 0 failed on inputs \(\(4, 7\) float32\).*traced with \(x: \(4, 16\) float32\)"),
    ("input of the wrong dtype", _step(torch.randn(4, 16).double()), InputError, r"\(4, 16\) float64"),
    ("input on another device", _step(torch.randn(4, 16, device="meta")), InputError, r"input 'x' is on meta but the model is on cpu"),
    # --- train_step(): targets
    ("target is not a tensor", _step(X[0], "cat"), TargetError, r"target must be a tensor, got str"),
    ("target batch size differs", _step(X[0], torch.zeros(5, dtype=torch.long)), TargetError, r"needs class indices of shape \(4,\)"),
    ("target class out of range", _step(X[0], torch.full((4,), 99)), TargetError, r"Target 99 is out of bounds"),
    ("float target of the wrong shape", _step(X[0], torch.randn(4)), TargetError, r"must have the prediction's shape \(4, 5\)"),
    ("target has extra dims", _step(X[0], torch.zeros(4, 2, dtype=torch.long)), TargetError, r"class indices of shape \(4,\)"),
    # --- train_step(): optimizer factories
    ("factory returns no optimizer", _step(X[0], optimizer=lambda p: "sgd"), ConfigError, r"must return a torch.optim.Optimizer, got str"),
    ("factory raises", _step(X[0], optimizer=lambda p: torch.optim.SGD(p, lr=-1.0)), ConfigError, r"optimizer factory failed for block 0: ValueError"),
    # --- calling the model
    ("call with the wrong shape", _call(torch.randn(3, 9)), InputError, r"the model failed on inputs \(\(3, 9\) float32\)"),
    ("call with no inputs", _call(), ConfigError, r"missing a required argument: 'x'"),
]


@pytest.mark.parametrize(("call", "error", "pattern"), [c[1:] for c in CATALOGUE], ids=[c[0] for c in CATALOGUE])
def test_bad_api_input(call, error, pattern):
    with pytest.raises(error, match=pattern) as info:
        call()
    assert isinstance(info.value, localize.LocalizeError)


def test_catalogue_names_are_unique():
    names = [c[0] for c in CATALOGUE]
    assert len(names) == len(set(names))


# --- checkpoints: files that are missing, foreign, damaged or unwritable


@pytest.fixture
def trained(tmp_path):
    lm = localize.transform(_mlp(), blocks=2, example_inputs=X)
    lm.train_step(*X, Y)
    return lm


def test_load_missing_file(tmp_path, trained):
    with pytest.raises(CheckpointError, match=r"no checkpoint at .*; pass the path lm.save\(\) wrote"):
        localize.load(tmp_path / "none.pt", into=trained)


def test_load_damaged_file(tmp_path, trained):
    path = tmp_path / "ckpt.pt"
    trained.save(path)
    path.write_bytes(path.read_bytes()[:100])  # truncated, as by a full disk
    with pytest.raises(CheckpointError, match="is not a readable localize checkpoint"):
        localize.load(path, into=trained)


def test_load_foreign_torch_file(tmp_path, trained):
    path = tmp_path / "weights.pt"
    torch.save(trained.model.state_dict(), path)
    with pytest.raises(CheckpointError, match="is not a localize checkpoint"):
        localize.load(path, into=trained)


def test_load_into_something_else(tmp_path, trained):
    path = tmp_path / "ckpt.pt"
    trained.save(path)
    with pytest.raises(CheckpointError, match="into= must be a LocalModel"):
        localize.load(path, into=trained.model)


def test_save_to_a_folder_or_an_unwritable_place(tmp_path, trained):
    with pytest.raises(CheckpointError, match="it is a folder; pass a file path"):
        trained.save(tmp_path)
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(CheckpointError, match="cannot write a checkpoint to .*pass a writable file path"):
        trained.save(blocked / "ckpt.pt")
    assert sorted(os.listdir(tmp_path)) == ["file"]  # nothing half-written left behind
