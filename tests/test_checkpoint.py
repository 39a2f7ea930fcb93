"""Checkpoints resume exactly, refuse other plans, and survive interrupted writes."""

from __future__ import annotations

import os

import pytest
import torch

import localize
from localize.runtime.checkpoint import CheckpointError
from tests.models import CASES


def _make(blocks=2, seed=0, name="resnet1d", optimizer="adamw"):
    case = CASES[name]
    model = case.build()
    torch.manual_seed(seed)
    lm = localize.transform(model, blocks=blocks, example_inputs=case.inputs(4), optimizer=optimizer, lr=0.01)
    return case, lm


def _data(case, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 1, 40, generator=g), torch.randint(0, 10, (6,), generator=g)) for _ in range(steps)]


def _train(lm, batches):
    lm.train()
    for x, y in batches:
        lm.train_step(x, y)


def test_resume_is_bit_identical(tmp_path):
    case, straight = _make()
    batches = _data(case, 6)
    torch.manual_seed(5)
    _train(straight, batches)

    case, first = _make()
    torch.manual_seed(5)
    _train(first, batches[:3])
    first.save(tmp_path / "ckpt.pt", data={"batch": 3})
    torch.manual_seed(123)  # the resumed process starts from another RNG state
    case, resumed = _make()
    ckpt = localize.load(tmp_path / "ckpt.pt", into=resumed)
    assert ckpt.data == {"batch": 3} and resumed.step_count == 3
    _train(resumed, batches[ckpt.data["batch"] :])
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_same_seed_gives_bit_identical_parameters():
    results = []
    for _ in range(2):
        case, lm = _make(blocks=3)
        torch.manual_seed(7)
        _train(lm, _data(case, 4))
        results.append(lm.state_dict())
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key


def test_checkpoint_of_another_plan_is_refused_saying_what_differs(tmp_path):
    _, two = _make(blocks=2)
    two.save(tmp_path / "two.pt")
    _, three = _make(blocks=3)
    with pytest.raises(CheckpointError, match=r"blocks: checkpoint has 2, this model has 3"):
        localize.load(tmp_path / "two.pt", into=three)
    _, other = _make(blocks=2, name="mlp")
    with pytest.raises(CheckpointError, match=r"model: checkpoint has 'ResNet1d', this model has 'MLP'"):
        localize.load(tmp_path / "two.pt", into=other)


def test_interrupted_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    case, lm = _make()
    path = tmp_path / "ckpt.pt"
    lm.save(path, data={"batch": 1})
    before = path.read_bytes()
    _train(lm, _data(case, 1))

    def broken_fsync(fd):
        raise OSError("disk went away")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(CheckpointError, match="disk went away"):
        lm.save(path, data={"batch": 2})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind
    assert localize.load(path).data == {"batch": 1}


def test_missing_or_foreign_file_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        localize.load(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable localize checkpoint"):
        localize.load(tmp_path / "junk.pt")


def test_non_finite_loss_raises_naming_block_and_step_or_skips():
    case, lm = _make(optimizer="sgd")
    x, y = _data(case, 1)[0]
    lm.train_step(x, y)
    bad = x.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(localize.LocalizeError, match=r"block 0 loss is nan at step 1.*on_nan='skip'"):
        lm.train_step(bad, y)
    case = CASES["resnet1d"]
    model = case.build()
    skipper = localize.transform(model, blocks=2, example_inputs=case.inputs(4), on_nan="skip", optimizer="sgd")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = skipper.train_step(bad, y)
    assert all(l != l for l in losses)  # every block saw the NaN and skipped its update  # noqa: E741
    params = dict(model.named_parameters())
    for k, v in before.items():
        if k in params:
            assert torch.equal(params[k], v), k


def test_failure_while_serialising_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    case, lm = _make()
    path = tmp_path / "ckpt.pt"
    lm.save(path, data={"batch": 1})
    before = path.read_bytes()
    _train(lm, _data(case, 1))

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise RuntimeError("serialisation failed")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="serialisation failed"):
        lm.save(path, data={"batch": 2})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    assert localize.load(path).data == {"batch": 1}


class _Payload:
    """A pickle whose loading would run a command: what a crafted checkpoint looks like."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format": 2, "model": {}, "payload": _Payload(str(marker))}, evil)
    lm = localize.transform(
        torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)),
        blocks=2,
        example_inputs=(torch.randn(3, 4),),
    )
    with pytest.raises(CheckpointError, match=r"holds more than tensors and plain data \(it would call .*system\)"):
        localize.load(evil, into=lm)
    assert not marker.exists()


def test_checkpoints_hold_plain_data_and_restore_every_rng(tmp_path):
    import random

    import numpy as np

    lm = localize.transform(
        torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)),
        blocks=2,
        example_inputs=(torch.randn(3, 4),),
    )
    lm.train_step(torch.randn(3, 4), torch.tensor([0, 1, 0]))
    path = tmp_path / "ckpt.pt"
    lm.save(path)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) == []
    want = (torch.rand(2), random.random(), np.random.rand())
    localize.load(path, into=lm)
    got = (torch.rand(2), random.random(), np.random.rand())
    assert torch.equal(got[0], want[0]) and got[1:] == want[1:]
