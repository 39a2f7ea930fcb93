"""``localize.memory``: the total peak of a training step, against bytes counted by hand.

The reference is arithmetic: a bias-free ``Linear(256, 256)`` in float32 holds 256 KiB of weights,
as many of gradients, one momentum buffer (SGD) or two moments plus a step counter (AdamW), and the
step's activations at its peak (backward, once the weight's gradient exists) are the batch and one
output-sized tensor, 64 KiB each for a batch of 64.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import localize
from localize.zoo import GPT

WEIGHT = 256 * 256 * 4
ACTIVATION = 64 * 256 * 4


@pytest.mark.parametrize("optimizer, state", [("sgd", WEIGHT), ("adamw", 2 * WEIGHT + 4)])
def test_categories_equal_hand_counted_bytes(optimizer: str, state: int) -> None:
    torch.manual_seed(0)
    net = nn.Linear(256, 256, bias=False)
    lm = localize.transform(net, blocks=1, example_inputs=(torch.randn(8, 256),), optimizer=optimizer)
    report = localize.memory(lm, torch.randn(64, 256), torch.randint(0, 256, (64,)))
    assert (report.params, report.buffers, report.grads, report.optimizer) == (WEIGHT, 0, WEIGHT, state)
    assert 2 * ACTIVATION <= report.activations < 2 * ACTIVATION + 1024  # input and output, plus scalars
    assert report.total == report.params + report.grads + report.optimizer + report.activations


def test_backprop_reference_is_measured_the_same_way() -> None:
    net = nn.Linear(256, 256, bias=False)
    report = localize.memory(net, torch.randn(64, 256), torch.randint(0, 256, (64,)),
                             optimizer=torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9))
    # zero_grad(set_to_none=True) freed last step's gradient; this step peaks once backward made the new one
    assert (report.params, report.grads, report.optimizer) == (WEIGHT, WEIGHT, WEIGHT)
    assert report.activations >= 2 * ACTIVATION  # input and output at least, loss temporaries too
    assert "peak" in str(report) and "MiB" in str(report)


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(*[nn.Sequential(nn.Linear(128, 128), nn.ReLU()) for _ in range(8)], nn.Linear(128, 10))


def test_local_learning_peaks_below_backprop_where_activations_dominate() -> None:
    x, y = torch.randn(4096, 128), torch.randint(0, 10, (4096,))
    backprop = localize.memory(_mlp(), x, y)
    lm = localize.transform(_mlp(), blocks=4, example_inputs=(x[:8],), aux="linear", balance="memory")
    local = localize.memory(lm, x, y)
    assert local.total < 0.75 * backprop.total, (local, backprop)


def test_chunked_models_are_measured() -> None:
    """Chunks call each layer once per chunk, which torch's per-module statistics refuse; the totals do not."""
    ids = torch.randint(0, 20, (2, 64))
    model = GPT(vocab_size=20, block_size=64, dim=16, depth=2, heads=2)
    whole = localize.memory(copy.deepcopy(model), ids, ids)
    lm = localize.transform(model, blocks=1, example_inputs=(ids,), chunk_size=16)
    chunked = localize.memory(lm, ids, ids)
    assert chunked.params == whole.params and chunked.activations < whole.activations


def test_an_update_frees_the_gradients_it_used() -> None:
    """Released after each block's update; kept while an accumulation cycle or ``update=False`` still needs them."""
    x, y = torch.randn(16, 128), torch.randint(0, 10, (16,))
    lm = localize.transform(_mlp(), blocks=3, example_inputs=(x[:8],), aux="linear", accumulate=2)
    lm.train_step(x, y)  # the first of two accumulated calls: no update yet
    params = [p for b in lm.blocks for g in b.optimizer.param_groups for p in g["params"]]
    assert all(p.grad is not None for p in params)
    lm.train_step(x, y)  # the update: each block's gradients are gone once its optimizer used them
    assert all(p.grad is None for p in params)
    lm.train_step(x, y, update=False)
    assert all(p.grad is not None for p in params)
    assert "release_gradients(state, 2" in lm.step_program.code


def test_one_process_balances_memory_and_the_launcher_balances_time() -> None:
    """The default cuts of a ResNet (whose early stages hold most activations) keep fewer saved
    activations than FLOP-balanced ones; the distributed launcher keeps FLOPs (its stages run at once)."""
    from localize.distributed.launch import load_local_model
    from localize.runtime.memory import SavedActivationMeter
    from localize.zoo import ResNet2d

    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    saved = {}
    for balance in (None, "flops"):
        torch.manual_seed(0)
        lm = localize.transform(ResNet2d(3, 10), blocks=4, example_inputs=(x[:2],), balance=balance)
        with SavedActivationMeter(lm.parameters()) as meter:
            lm.train_step(x, y)
        saved[lm.plan.balance] = meter.peak_bytes
    assert saved["memory"] < 0.75 * saved["flops"], saved
    example = Path(__file__).resolve().parents[1] / "examples" / "mnist1d_resnet.py"
    stage, _ = load_local_model(str(example), 2)
    assert stage.plan.balance == "flops"


def test_the_plan_estimate_is_a_lower_bound_of_the_measured_peak() -> None:
    """plan.json's ``peak_bytes`` (resident state + a block's gradients and saved activations, scaled to
    the training batch) stays under what the tracker measures, and within a small factor of it."""
    from localize.runtime.peak import estimate_peaks

    x, y = torch.randn(4096, 128), torch.randint(0, 10, (4096,))
    measured_bp = localize.memory(_mlp(), x, y).total
    lm = localize.transform(_mlp(), blocks=4, example_inputs=(x[:8],), aux="linear")
    peaks, estimated_bp = estimate_peaks(lm.model, lm.blocks, state_per_param=2, batch_scale=4096 / 8)
    measured = localize.memory(lm, x, y).total
    assert 0.3 * measured_bp < estimated_bp <= measured_bp
    assert 0.3 * measured < max(peaks) <= measured
