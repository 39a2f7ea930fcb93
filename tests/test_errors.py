"""Every bad input to transform()/train_step() gives a LocalizeError that says what to do."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import localize
from localize.errors import ConfigError, PlanError, TargetError, TraceError
from tests.models import CASES


def _mlp():
    return CASES["mlp"].build(), (torch.randn(4, 16),)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:  # branches on a tensor value
            h = h * 2
        return self.b(h)


class ShapeReader(nn.Module):
    """fx cannot trace it (it reads a size as a Python int); export can."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = self.a(x).relu()
        return self.b(h.reshape(int(x.shape[0]), 8))


@pytest.mark.parametrize("blocks", [0, -1, 2.0, "4", True])
def test_blocks_must_be_a_positive_int(blocks):
    model, x = _mlp()
    with pytest.raises(ConfigError, match="blocks must be an int >= 1"):
        localize.transform(model, blocks=blocks, example_inputs=x)


def test_too_many_blocks_says_how_many_are_possible():
    model, x = _mlp()
    with pytest.raises(PlanError, match=r"at most 5 blocks are possible"):
        localize.transform(model, blocks=9, example_inputs=x)


def test_export_only_model_needs_example_inputs():
    with pytest.raises(TraceError, match=r"needs example inputs: pass example_inputs"):
        localize.transform(ShapeReader(), blocks=2)
    lm = localize.transform(ShapeReader(), blocks=2, example_inputs=(torch.randn(3, 4),))
    assert lm.plan.traced.method == "export"


def test_unknown_example_kwarg():
    model, x = _mlp()
    with pytest.raises(ConfigError, match=r"example_kwargs names 'mask'.*use one of those names"):
        localize.transform(model, blocks=2, example_inputs=x, example_kwargs={"mask": torch.ones(4)})


def test_data_dependent_control_flow_is_explained():
    with pytest.raises(TraceError) as info:
        localize.transform(DataDependent(), blocks=2, example_inputs=(torch.randn(3, 4),))
    msg = str(info.value)
    assert "data-dependent control flow" in msg
    assert "if h.sum() > 0" in msg  # the user's own source line
    assert "torch.fx said" in msg and "torch.export said" in msg
    assert "torch.cond" in msg


def test_no_trainable_parameters():
    model, x = _mlp()
    model.requires_grad_(False)
    with pytest.raises(PlanError, match="no trainable parameters"):
        localize.transform(model, blocks=2, example_inputs=x)


def test_unknown_aux_names_the_valid_ones():
    model, x = _mlp()
    with pytest.raises(ConfigError, match=r"unknown aux strategy 'nope'; choose one of \[.*'dgl'.*'linear'"):
        localize.transform(model, blocks=2, example_inputs=x, aux="nope")


def test_unknown_aux_option():
    model, x = _mlp()
    with pytest.raises(ConfigError, match=r"valid options are \['pool', 'width'\]"):
        localize.transform(model, blocks=2, example_inputs=x, aux_options={"widht": 3})


class TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x).relu()
        return {"features": h, "scores": self.b(h)}


def test_output_selector_that_matches_nothing():
    with pytest.raises(ConfigError, match=r"output='logits' matches no output tensor; the model returns \['features', 'scores'\]"):
        localize.transform(TwoOutputs(), blocks=1, example_inputs=(torch.randn(2, 4),), output="logits")
    with pytest.raises(ConfigError, match="pass output= naming the one"):
        localize.transform(TwoOutputs(), blocks=1, example_inputs=(torch.randn(2, 4),))
    lm = localize.transform(TwoOutputs(), blocks=1, example_inputs=(torch.randn(2, 4),), output="scores")
    assert len(lm.train_step(torch.randn(5, 4), torch.randint(0, 3, (5,)))) == 1


def test_target_shape_that_does_not_fit():
    model, x = _mlp()
    lm = localize.transform(model, blocks=2, example_inputs=x)
    with pytest.raises(TargetError, match=r"class indices of shape \(6,\)"):
        lm.train_step(torch.randn(6, 16), torch.randint(0, 5, (6, 2)))


def test_cut_name_that_is_not_a_module():
    model, x = _mlp()
    with pytest.raises(PlanError, match=r"cuts= names 'layer9', which is not a module of MLP"):
        localize.transform(model, example_inputs=x, cuts=["layer9"])


def test_bad_balance_and_optimizer():
    model, x = _mlp()
    with pytest.raises(ConfigError, match=r"choose one of \['flops', 'params', 'memory', 'peak'\]"):
        localize.transform(model, blocks=2, example_inputs=x, balance="time")
    with pytest.raises(ConfigError, match="optimizer must be"):
        localize.transform(model, blocks=2, example_inputs=x, optimizer=3)


def test_every_error_is_a_localize_error():
    for cls in (ConfigError, PlanError, TargetError, TraceError):
        assert issubclass(cls, localize.LocalizeError)
