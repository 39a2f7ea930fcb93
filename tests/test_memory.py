"""Activation memory: the meter against hand-counted bytes, and the drop local learning gives."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import localize
from localize.runtime.memory import SavedActivationMeter
from localize.zoo import ResNet2d


def test_meter_counts_saved_storages_once_and_skips_parameters():
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(8, 64)
    with SavedActivationMeter(lin.parameters()) as meter:
        h = lin(x)  # saves x (8x64 floats)
        y = h.relu()  # saves its output (8x32 floats)
        (y * y).sum().backward()  # mul saves y twice: one storage
    assert meter.total_bytes == 8 * 64 * 4 + 8 * 32 * 4
    assert meter.current_bytes == 0  # everything was released by backward


def _resnet():
    torch.manual_seed(0)
    return ResNet2d(3, 10, widths=(16, 32, 64, 128), blocks_per_stage=(2, 2, 2, 2))


def test_local_learning_at_k4_keeps_at_most_045_of_backprop_activations():
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    model = _resnet()
    with SavedActivationMeter(model.parameters()) as backprop:
        F.cross_entropy(model(x), y).backward()
    model = _resnet()
    lm = localize.transform(model, blocks=4, example_inputs=(x[:2],), balance="memory")
    with SavedActivationMeter(list(model.parameters()) + list(lm.aux.parameters())) as local:
        lm.train_step(x, y)
    ratio = local.peak_bytes / backprop.peak_bytes
    assert ratio <= 0.45, ratio
    one = localize.transform(_resnet(), blocks=1, example_inputs=(x[:2],))
    with SavedActivationMeter(one.model.parameters()) as k1:
        one.train_step(x, y)
    assert k1.peak_bytes == backprop.peak_bytes  # K=1 keeps exactly what backprop keeps
