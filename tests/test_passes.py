"""Passes against independent references: brute force for the partition, structure for cuts."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import localize
from localize.passes.balance_blocks import balance_blocks
from localize.passes.cost import node_cost
from localize.passes.find_cut_points import compute_nodes
from localize.runtime.schedule import parse_schedule, sequential_schedule


def _chain(widths: list[int]) -> nn.Module:
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


@settings(max_examples=25, deadline=None)
@given(
    widths=st.lists(st.integers(1, 24), min_size=4, max_size=8),
    blocks=st.integers(2, 4),
    metric=st.sampled_from(["flops", "params", "memory"]),
)
def test_balance_is_optimal_against_brute_force(widths, blocks, metric):
    model = _chain(widths)
    lm = localize.transform(model, blocks=1, example_inputs=(torch.randn(3, widths[0]),), balance=metric)
    gm, legal = lm.plan.gm, lm.plan.legal_cuts
    if blocks - 1 > len(legal):
        return
    nodes = compute_nodes(gm)
    weights = [node_cost(n).get(metric) for n in nodes]
    owns = [bool(list(n.graph.owning_module.get_submodule(n.target).parameters())) if n.op == "call_module" else False for n in nodes]

    def worst(positions):
        bounds = [0, *[p + 1 for p in positions], len(nodes)]
        costs = []
        for a, b in zip(bounds, bounds[1:]):
            if not any(owns[a:b]):
                return None
            entry = 0
            if metric == "memory" and a > 0:
                cut = next(c for c in legal if c.position + 1 == a)
                entry = sum(next(n for n in gm.graph.nodes if n.name == x).meta["localize"]["value"].nbytes for x in cut.activations)
            costs.append(sum(weights[a:b]) + entry)
        return max(costs)

    options = [w for combo in itertools.combinations([c.position for c in legal], blocks - 1) if (w := worst(combo)) is not None]
    if not options:  # no partition gives every block a parameter
        with pytest.raises(localize.LocalizeError, match="trainable parameter"):
            balance_blocks(gm, legal, blocks, metric)
        return
    chosen = balance_blocks(gm, legal, blocks, metric)
    assert worst(chosen) == min(options)


class MaskedStack(nn.Module):
    """Layers that all read a mask computed from the input: the mask must not block cuts."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))

    def forward(self, x):
        mask = (x > 0).float()
        for layer in self.layers:
            x = layer(x) * mask + x
        return x


def test_values_without_gradient_cross_freely():
    lm = localize.transform(MaskedStack(), blocks=4, example_inputs=(torch.randn(2, 8),), loss_fn=lambda p, t: (p - t).pow(2).mean())
    assert len(lm.blocks) == 4
    cut_sources = {n.meta["localize"]["source"] for n in lm.program.graph.nodes if n.meta.get("localize", {}).get("cut")}
    assert "gt" not in cut_sources and "float_1" not in cut_sources


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return x + self.b(self.a(x).relu())


class Flat(nn.Module):
    """Residual units written inline (no container): the frontier rule alone keeps them whole."""

    def __init__(self):
        super().__init__()
        self.a1, self.b1, self.a2, self.b2 = (nn.Linear(8, 8) for _ in range(4))

    def forward(self, x):
        x = x + self.b1(self.a1(x).relu())
        return x + self.b2(self.a2(x).relu())


def test_no_cut_inside_a_skip_connection():
    lm = localize.transform(Flat(), blocks=2, example_inputs=(torch.randn(2, 8),), loss_fn=lambda p, t: (p - t).pow(2).mean())
    for cut in lm.plan.legal_cuts:
        assert len(cut.activations) == 1
    names = [c.after for c in lm.plan.legal_cuts]
    assert "add" in names and "a1" not in names and "relu" not in names and "b1" not in names


def test_schedule_prints_and_parses_back():
    s = sequential_schedule(3)
    assert str(s).startswith("B0:F B0:L B0:U B1:F")
    assert parse_schedule(str(s)) == s
    with pytest.raises(localize.LocalizeError, match="expected B<block>"):
        parse_schedule("B0:X")
