"""Property tests: random DAG-shaped models keep every partition invariant.

Hypothesis draws models with random widths, depths, skip connections and branches (adds of
earlier values, concatenations); each is transformed at a random K and checked against the
untransformed model (inference), the graph (every node in exactly one block, blocks contiguous
in topological order, K blocks when legal) and autograd (isolation).
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import localize
from localize.compiler.tracer import lmeta
from localize.errors import PlanError
from localize.passes.find_cut_points import compute_nodes
from tests.models import BlockOutputs


class RandomDag(nn.Module):
    """Node i applies Linear+activation to node src[i]; ``extra[i]`` optionally adds or concatenates
    an earlier node (a skip connection or a branch join)."""

    def __init__(self, width: int, spec: list[tuple[int, int, str]], classes: int) -> None:
        super().__init__()
        self.spec = spec
        self.stem = nn.Linear(6, width)
        self.layers = nn.ModuleList()
        for _, _, join in spec:
            self.layers.append(nn.Linear(width * (2 if join == "cat" else 1), width))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        values = [self.stem(x).relu()]
        for layer, (src, extra, join) in zip(self.layers, self.spec):
            h = values[src]
            if join == "add":
                h = h + values[extra]
            elif join == "cat":
                h = torch.cat([h, values[extra]], dim=-1)
            values.append(torch.tanh(layer(h)))
        return self.head(values[-1])


@st.composite
def dags(draw):
    depth = draw(st.integers(1, 8))
    spec = []
    for i in range(1, depth + 1):
        src = draw(st.integers(max(0, i - 2), i - 1))
        extra = draw(st.integers(0, i - 1))
        join = draw(st.sampled_from(["none", "none", "add", "cat"]))
        spec.append((src, extra, join))
    width = draw(st.integers(1, 6))
    return width, spec


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dag=dags(), blocks=st.integers(1, 5), batch=st.integers(2, 5), seed=st.integers(0, 2**16))
def test_random_dags_keep_partition_invariants(dag, blocks, batch, seed):
    width, spec = dag
    torch.manual_seed(seed)
    model = RandomDag(width, spec, classes=3)
    try:
        lm = localize.transform(model, blocks=blocks, example_inputs=(torch.randn(2, 6),), aux="linear")
    except PlanError as e:
        assert "legal cut points" in str(e) or "trainable parameter" in str(e)
        assert blocks > 1
        return
    assert len(lm.blocks) == blocks
    # every compute node in exactly one block, block ids non-decreasing in graph order
    ids = [lmeta(n)["block"] for n in compute_nodes(lm.plan.gm) if not lmeta(n).get("tied")]
    assert ids == sorted(ids) and set(ids) == set(range(blocks))
    names = [name for b in lm.blocks for name in b.plan.nodes]
    assert len(names) == len(set(names)) == len(compute_nodes(lm.plan.gm))
    x = torch.randn(batch, 6)
    with torch.no_grad():
        torch.testing.assert_close(lm(x), model(x), atol=1e-6, rtol=0)
    if blocks > 1:  # isolation: block 0's aux loss reaches only block 0
        run = BlockOutputs(lm.program)
        with torch.enable_grad():
            run.run(x)
        y = torch.randint(0, 3, (batch,))
        lm.local_loss(0, run.outputs[0], y).backward()
        owned = {id(p) for p in lm.blocks[0].trainable}
        for p in list(model.parameters()) + list(lm.aux.parameters()):
            if id(p) not in owned:
                assert p.grad is None or not p.grad.any()
