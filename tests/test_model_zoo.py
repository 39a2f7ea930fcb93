"""The zoo of issue #6: every architecture transforms and keeps the contract.

For each entry of ``tests/zoo_models.py`` at K = 2 and 4: the transformed model computes what the
original computes (eval, and train mode with the same random draws), at a batch size other than
the traced one; each block's local loss reaches its own parameters, all of them, and nothing
else; every buffer (BatchNorm running statistics) is updated by exactly one block; one training
step at yet another batch size changes every block. At K = 1 the gradients equal backprop's.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.fx as fx
from torch import nn

import localize
from localize.errors import LocalizeError, TraceError
from localize.runtime.loss import cross_entropy_last_dim
from tests.zoo_models import ENTRIES, boundaries

CASES = [(name, k) for name, e in ENTRIES.items() for k in e.blocks]


def _transform(entry, blocks, batch=4, **kw):
    model = entry.build()
    kw.setdefault("optimizer", lambda p: torch.optim.AdamW(p, lr=3e-3))
    options = {**entry.options, **kw}
    lm = localize.transform(
        model,
        blocks=blocks,
        example_inputs=entry.inputs(batch),
        example_kwargs=entry.kwargs(batch) or None,
        **options,
    )
    return model, lm


@functools.cache
def _transformed(name, blocks):
    """One transform per (entry, K) for the whole module: the tests of graph shapes below only read
    the plan, which training does not change, so they share the contract test's model (exports of
    the transformers are the slow part of this file)."""
    return _transform(ENTRIES[name], blocks)


def _logits(out):
    if isinstance(out, torch.Tensor):
        return out
    return out["logits"] if isinstance(out, dict) else out.logits


def _step_inputs(lm, entry, args, kwargs):
    if not kwargs:
        return args
    return {**dict(zip(lm.plan.traced.input_names, args)), **kwargs}


class _Capture(fx.Interpreter):
    """Runs the program with autograd on, keeping each block's outputs and the buffers it changed."""

    def __init__(self, program, buffers):
        super().__init__(program)
        self.outputs, self.changed, self.buffers = {}, {}, buffers

    def call_module(self, target, args, kwargs):
        before = {name: b.clone() for name, b in self.buffers.items()}
        out = super().call_module(target, args, kwargs)
        block = int(target.rsplit("_", 1)[1])
        self.outputs[block] = out
        self.changed[block] = {n for n, b in self.buffers.items() if not torch.equal(before[n], b)}
        return out


@pytest.mark.parametrize("name,blocks", CASES)
def test_zoo_entry_transforms_and_keeps_the_contract(name, blocks):
    entry = ENTRIES[name]
    model, lm = _transformed(name, blocks)
    assert len(lm.blocks) == blocks
    assert all(b.aux is not None for b in lm.blocks[:-1])

    # inference equals the original, in eval and (same random draws) in train mode, at batch 3
    args, kwargs = entry.inputs(3), entry.kwargs(3)
    for mode in (False, True):
        model.train(mode)
        lm.train(mode)
        with torch.no_grad():
            torch.manual_seed(7)
            got = _logits(lm(*args, **kwargs))
            torch.manual_seed(7)
            want = _logits(model(*args, **kwargs))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"train={mode}")

    # isolation: block i's loss reaches all of block i's parameters and nothing else
    lm.train()
    owner = {id(p): b.index for b in lm.blocks for p in b.trainable}
    all_params = list(model.parameters()) + list(lm.aux.parameters())
    assert all(id(p) in owner for p in model.parameters() if p.requires_grad), "a parameter has no block"
    buffers = {n: b for n, b in model.named_buffers() if b.is_floating_point() or "num_batches" in n}
    run = _Capture(lm.program, buffers)
    flat = lm.plan.traced.bind(entry.inputs(4), entry.kwargs(4))
    target = entry.target(4)
    with torch.enable_grad():
        run.run(*flat)
    for b in lm.blocks:
        for p in all_params:
            p.grad = None
        lm.local_loss(b.index, run.outputs[b.index], target).backward(retain_graph=True)
        reached = {id(p) for p in all_params if p.grad is not None and p.grad.abs().sum() > 0}
        touched = {owner.get(i, -1) for i in reached}
        assert touched <= {b.index}, (b.index, touched)
        untrained = [n for n, p in model.named_parameters() if owner.get(id(p)) == b.index and p.grad is None]
        assert not untrained, (b.index, untrained)

    # every buffer the model updates in train mode is updated by exactly one block
    writers = {}
    for block, names in run.changed.items():
        for n in names:
            writers.setdefault(n, []).append(block)
    assert all(len(w) == 1 for w in writers.values()), writers
    stats = [n for n in buffers if n.endswith("running_mean")]
    assert set(stats) <= set(writers), set(stats) - set(writers)

    # one training step at another batch size changes every block
    before = [[p.detach().clone() for p in b.params] for b in lm.blocks]
    args, kwargs = entry.inputs(5), entry.kwargs(5)
    losses = lm.train_step(_step_inputs(lm, entry, args, kwargs), entry.target(5))
    assert len(losses) == blocks and all(math.isfinite(x) for x in losses), losses
    for b, old in zip(lm.blocks, before):
        assert any(not torch.equal(p, q) for p, q in zip(b.params, old)), f"block {b.index} did not change"


@pytest.mark.parametrize("name", list(ENTRIES))
def test_zoo_entry_one_block_is_exactly_backprop(name):
    entry = ENTRIES[name]
    reference = entry.build()
    model, lm = _transform(entry, 1, optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    reference.train()
    lm.train()
    args, kwargs, target = entry.inputs(5), entry.kwargs(5), entry.target(5)
    torch.manual_seed(3)
    # update=False: a due update frees the gradients it used (memory-first), so read them before
    lm.train_step(_step_inputs(lm, entry, args, kwargs), target, update=False)
    torch.manual_seed(3)
    cross_entropy_last_dim(_logits(reference(*args, **kwargs)), target).backward()
    got = dict(model.named_parameters())
    for pname, p in reference.named_parameters():
        if p.grad is None:
            assert got[pname].grad is None or not got[pname].grad.any(), pname
            continue
        torch.testing.assert_close(got[pname].grad, p.grad, atol=1e-5, rtol=1e-4, msg=pname)


# ------------------------------------------------------------------------------------------ graph shapes


def test_skips_cross_cuts_detached_and_the_plan_lists_them():
    """U-Net: with max_frontier > 1 the encoder skips cross cuts; each is detached and listed."""
    _, lm = _transformed("unet", 4)
    wide = [c for c in lm.plan.legal_cuts if len(c.activations) > 1]
    assert wide, "no cut with several activations"
    crossing = [b.plan.cut_inputs for b in lm.blocks[1:]]
    assert any(len(c) > 1 for c in crossing), crossing
    cuts = {
        n.meta["localize"]["source"] for n in lm.program.graph.nodes if n.meta.get("localize", {}).get("cut")
    }
    assert set().union(*map(set, crossing)) <= cuts
    # each head reads the main path (the value computed last), not a skip: its loss trains the whole block
    order = {n.name: i for i, n in enumerate(lm.plan.gm.graph.nodes)}
    for b, nxt in zip(lm.blocks, lm.blocks[1:]):
        mine = [c for c in nxt.plan.cut_inputs if c in b.plan.outputs]
        assert b.plan.primary == max(mine, key=order.__getitem__), (b.plan.primary, mine)


def test_unet_at_default_frontier_keeps_skips_inside_blocks():
    _, lm = _transform(ENTRIES["unet"], 2, max_frontier=1)
    assert all(len(c.activations) == 1 for c in lm.plan.legal_cuts)
    assert all(len(b.plan.cut_inputs) <= 1 for b in lm.blocks)


def test_wide_frontier_penalty_trades_balance_for_narrow_cuts(monkeypatch):
    from localize.passes import balance_blocks as bb

    _, lm = _transformed("unet", 2)
    gm, legal = lm.plan.gm, lm.plan.legal_cuts
    width = {c.position: len(c.activations) for c in legal}
    assert width[bb.balance_blocks(gm, legal, 2)[0]] > 1  # the middle of a U-Net is worth a wide cut
    monkeypatch.setattr(bb, "FRONTIER_PENALTY", 10.0)  # ... unless wide cuts are made very costly
    assert width[bb.balance_blocks(gm, legal, 2)[0]] == 1


def test_encoder_output_crosses_every_decoder_cut():
    _, lm = _transformed("hf_t5", 4)
    assert any(len(b.plan.cut_inputs) > 1 for b in lm.blocks[1:])


def test_tied_embedding_is_owned_by_the_last_block_and_read_detached_before():
    for name in ("tied_lm", "hf_gpt2"):
        model, lm = _transformed(name, 4)
        weight = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
        weight = weight if weight is not None else model.body.tok_embed.weight
        owners = [b.index for b in lm.blocks if any(p is weight for p in b.params)]
        assert owners == [3], (name, owners)


class SharedTwice(nn.Module):
    """One Linear applied at the start and at the end (a weight-shared module in two blocks)."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(8, 8)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.tanh(self.shared(x))
        for layer in self.layers:
            x = layer(x)
        return self.head(self.shared(x))


def test_module_called_in_two_blocks_trains_in_its_last_block_only():
    model = SharedTwice()
    x, y = torch.randn(4, 8), torch.randint(0, 3, (4,))
    lm = localize.transform(model, blocks=3, example_inputs=(x,))
    owners = [b.index for b in lm.blocks if any(p is model.shared.weight for p in b.params)]
    assert owners == [2]
    model.eval()
    torch.testing.assert_close(lm(x), model(x))
    run = _Capture(lm.program, {})
    with torch.enable_grad():
        run.run(x)
    model.zero_grad()
    lm.local_loss(0, run.outputs[0], y).backward()
    assert model.shared.weight.grad is None and model.layers[0][0].weight.grad is not None
    lm.train_step(torch.randn(5, 8), torch.randint(0, 3, (5,)))


def test_export_keeps_the_batch_dimension_dynamic():
    for name in ("hf_gpt2", "hf_t5", "gnn"):
        _, lm = _transformed(name, 2)
        assert lm.plan.traced.method == "export" and not lm.plan.traced.fixed_batch, name


def test_boundaries_name_modules():
    _, lm = _transformed("resnet_basic", 4)
    names = boundaries(lm)
    assert len(names) == 3 and all(" | " in n for n in names), names
    modules = dict(lm.model.named_modules())
    assert all(side in modules for n in names for side in n.split(" | ")), names  # each side names a module


# ------------------------------------------------------------------------------------------ capture errors


class RootBranchOnMode(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.aux, self.b = nn.Linear(4, 4), nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        if self.training:  # an auxiliary output only while training (GoogLeNet style)
            return self.b(h), self.aux(h)
        return self.b(h)


class ToNumpy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        import numpy as np

        return self.a(torch.from_numpy(np.tanh(x.detach().numpy())))


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        out = self.fc(x)
        if self.training:
            out = out * (torch.rand_like(out[:, :1]) > 0.5)
        return x + out


def test_root_branch_on_training_mode_is_named_with_a_workaround():
    with pytest.raises(TraceError) as info:
        localize.transform(RootBranchOnMode(), blocks=2, example_inputs=(torch.randn(3, 4),))
    msg = str(info.value)
    assert "different graph in train() than in eval()" in msg and "if self.training" in msg
    assert "What to do" in msg


def test_untraceable_library_call_is_a_localize_error():
    with pytest.raises(LocalizeError) as info:
        localize.transform(ToNumpy(), blocks=1, example_inputs=(torch.randn(3, 4),))
    msg = str(info.value)
    assert "cannot capture ToNumpy: a NumPy call on a tensor" in msg and "np.tanh(x.detach().numpy())" in msg
    assert (
        "torch.fx said" in msg and "torch.export said" in msg and "What to do: use the torch function" in msg
    )


def test_module_with_parameters_that_branches_on_mode_becomes_a_leaf():
    model = nn.Sequential(Branchy(), Branchy(), Branchy(), nn.Linear(4, 2))
    lm = localize.transform(model, blocks=3, example_inputs=(torch.randn(3, 4),))
    assert {n.target for n in lm.plan.gm.graph.nodes if n.op == "call_module"} >= {"0", "1", "2"}
    x = torch.randn(6, 4)
    for mode in (True, False):
        lm.train(mode)
        torch.manual_seed(0)
        got = lm(x)
        torch.manual_seed(0)
        torch.testing.assert_close(got, model(x))


class ListInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, xs):
        return self.b(self.a(xs[0]) + xs[1])


def test_list_of_tensors_as_one_input_names_the_argument_and_the_wrapper():
    with pytest.raises(TraceError, match=r"takes 'xs' as a list of tensors.*What to do: wrap the model"):
        localize.transform(ListInput(), blocks=2, example_inputs=([torch.randn(3, 4), torch.randn(3, 4)],))


class Wrapped(nn.Module):
    """The workaround the message gives: every tensor its own argument."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, a, b):
        return self.model([a, b])


def test_the_wrapper_the_list_input_error_suggests_works():
    model = ListInput()
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    lm = localize.transform(Wrapped(model), blocks=2, example_inputs=(a, b))
    a, b = torch.randn(5, 4), torch.randn(5, 4)
    torch.testing.assert_close(lm(a, b), model([a, b]))
