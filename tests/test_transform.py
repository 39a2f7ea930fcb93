"""The spine's acceptance: every model family transforms, computes what it computed, and trains.

References: the untransformed model (inference), plain backprop on a copy (K=1 gradients), and
the autograd graph itself (isolation: a block's aux loss reaches nothing outside the block).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import localize
from tests.models import CASES, BlockOutputs

NAMES = list(CASES)


def _sgd(lr: float):
    return lambda params: torch.optim.SGD(params, lr=lr)


def _call_inputs(lm, case, batch, args=None):
    """train_step inputs: positional tuple, or a dict when the case has keyword inputs."""
    args, kwargs = args if args is not None else case.inputs(batch), case.kwargs(batch)
    if not kwargs:
        return args
    return {**dict(zip(lm.plan.traced.input_names, args)), **kwargs}


def _logits(out):
    return out if isinstance(out, torch.Tensor) else out["logits"] if isinstance(out, dict) else out.logits


def _transform(case, blocks, batch=4, **kw):
    model = case.build()
    kw.setdefault("optimizer", lambda p: torch.optim.AdamW(p, lr=3e-3))
    lm = localize.transform(
        model, blocks=blocks, example_inputs=case.inputs(batch), example_kwargs=case.kwargs(batch) or None, **kw
    )
    return model, lm


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("blocks", [2, 4])
def test_inference_equals_original_and_training_lowers_losses(name, blocks):
    case = CASES[name]
    model, lm = _transform(case, blocks)
    assert len(lm.blocks) == blocks
    assert all(b.aux is not None for b in lm.blocks[:-1]) and lm.blocks[-1].aux is None
    model.eval()
    lm.eval()
    torch.manual_seed(1)
    args, kwargs = case.inputs(3), case.kwargs(3)  # batch 3: traced with 4
    with torch.no_grad():
        torch.testing.assert_close(_logits(lm(*args, **kwargs)), _logits(model(*args, **kwargs)), atol=1e-5, rtol=0)
    lm.train()
    inputs, target = _call_inputs(lm, case, 5), case.target(5)  # another batch size again
    first = lm.train_step(inputs, target)
    for _ in range(30):
        last = lm.train_step(inputs, target)
    assert all(torch.isfinite(torch.tensor(first + last)))
    assert all(b < a for a, b in zip(first, last)), (first, last)


@pytest.mark.parametrize("name", NAMES)
def test_one_block_is_exactly_backprop(name):
    case = CASES[name]
    reference = case.build()
    model, lm = _transform(case, 1, optimizer=_sgd(0.0))
    model.train()
    reference.train()
    inputs, target = case.inputs(5), case.target(5)
    lm.train_step(_call_inputs(lm, case, 5, inputs), target, update=False)  # an update frees the grads
    out = _logits(reference(*inputs, **case.kwargs(5)))
    F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1)).backward()
    got = dict(model.named_parameters())
    for pname, p in reference.named_parameters():
        if p.grad is None:
            assert got[pname].grad is None or not got[pname].grad.any(), pname
            continue
        torch.testing.assert_close(got[pname].grad, p.grad, atol=1e-6, rtol=0, msg=pname)


@pytest.mark.parametrize("name", NAMES)
def test_aux_loss_reaches_only_its_own_block(name):
    case = CASES[name]
    model, lm = _transform(case, 4)
    flat = lm.plan.traced.bind(case.inputs(4), case.kwargs(4))
    target = case.target(4)
    run = BlockOutputs(lm.program)
    with torch.enable_grad():
        run.run(*flat)
    owner = {}
    for b in lm.blocks:
        for p in b.trainable:
            owner[id(p)] = b.index
    all_params = list(model.parameters()) + list(lm.aux.parameters())
    for i in range(3):
        for p in all_params:
            p.grad = None
        lm.local_loss(i, run.outputs[i], target).backward(retain_graph=True)
        touched = {owner.get(id(p), -1) for p in all_params if p.grad is not None and p.grad.any()}
        assert touched == {i}, (i, touched)


def test_resnet_boundaries_lie_between_residual_blocks():
    case = CASES["resnet2d"]
    model, lm = _transform(case, 4)
    from localize.compiler.tracer import lmeta

    for a, b in zip(lm.blocks, lm.blocks[1:]):
        last = lmeta(next(n for n in lm.plan.gm.graph.nodes if n.name == a.plan.nodes[-1]))["module"]
        first = lmeta(next(n for n in lm.plan.gm.graph.nodes if n.name == b.plan.nodes[0]))["module"]
        # module paths look like layer2.0.conv1: the residual unit is the first two components
        unit = lambda path: ".".join(path.split(".")[:2]) if path.startswith("layer") else path  # noqa: E731
        assert unit(last) != unit(first), (last, first)
        assert first.startswith("layer") and first.endswith(".0.conv1"), first


def test_named_cuts_start_blocks_at_modules():
    case = CASES["resnet2d"]
    model, lm = _transform(case, None, cuts=["layer2", "layer4"])
    assert len(lm.blocks) == 3
    from localize.compiler.tracer import lmeta

    firsts = [lmeta(next(n for n in lm.plan.gm.graph.nodes if n.name == b.plan.nodes[0]))["module"] for b in lm.blocks]
    assert firsts == ["conv1", "layer2.0.conv1", "layer4.0.conv1"]


def test_without_example_inputs_heads_are_built_at_first_call():
    case = CASES["resnet2d"]
    model = case.build()
    lm = localize.transform(model, blocks=2, optimizer=_sgd(0.05))
    assert not lm.ready and all(b.aux is None for b in lm.blocks)
    x, y = case.inputs(6), case.target(6)
    losses = lm.train_step(x, y)
    assert lm.ready and lm.blocks[0].aux is not None and len(losses) == 2
    model.eval()
    lm.eval()
    with torch.no_grad():
        torch.testing.assert_close(lm(*x), model(*x), atol=1e-5, rtol=0)


def test_state_dict_shares_model_parameters_and_round_trips():
    case = CASES["mlp"]
    model, lm = _transform(case, 2)
    sd = lm.state_dict()
    assert any(k.startswith("aux.0.") for k in sd)
    model_keys = {f"model.{k}" for k in model.state_dict()}
    assert model_keys <= set(sd)
    lm.train_step(case.inputs(4), case.target(4))
    for k, v in model.state_dict().items():
        assert torch.equal(sd[f"model.{k}"], v)  # shared storage: the step updated both
    clone_model, clone = _transform(case, 2)
    clone.load_state_dict(lm.state_dict())
    x = case.inputs(3)
    torch.testing.assert_close(clone(*x), lm(*x))


def test_train_eval_switch_exported_dropout():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                     vocab_size=30, max_position_embeddings=8, num_labels=2, hidden_dropout_prob=0.5)
    model = BertForSequenceClassification(cfg)
    x = torch.randint(0, 30, (2, 8))
    lm = localize.transform(model, blocks=2, example_inputs=(x,))
    assert lm.plan.traced.method == "export"
    lm.eval()
    torch.testing.assert_close(lm(x).logits, lm(x).logits)
    lm.train()
    assert not torch.equal(lm(x).logits, lm(x).logits)  # dropout is live again


def test_program_has_a_detach_at_every_boundary():
    case = CASES["gpt"]
    _, lm = _transform(case, 4)
    cuts = [n for n in lm.program.graph.nodes if n.op == "call_method" and n.target == "detach"]
    blocks_fed = sorted({n.meta["localize"]["block"] for n in cuts})
    assert blocks_fed == [1, 2, 3]


class _ExportOnlyBN(torch.nn.Module):
    """Branches on x.dim(), so only torch.export captures it; has batch-norm buffers."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        if x.dim() == 3:  # fx cannot branch on a traced value; export sees a constant
            x = x.unsqueeze(0)
        h = self.conv2(self.bn(self.conv(x)).relu()).relu()
        return self.fc(h.mean((2, 3)))


def test_to_and_buffers_follow_the_model_on_exported_graphs():
    torch.manual_seed(0)
    model = _ExportOnlyBN()
    lm = localize.transform(model, blocks=2, example_inputs=(torch.randn(2, 3, 6, 6),), optimizer=_sgd(0.1))
    assert lm.plan.traced.method == "export"
    lm.double()
    assert model.bn.running_mean.dtype == torch.float64
    before = model.bn.running_mean.clone()
    lm.train()
    lm.train_step(torch.randn(5, 3, 6, 6, dtype=torch.float64), torch.randint(0, 4, (5,)))
    assert not torch.equal(model.bn.running_mean, before)  # the block updated the model's own buffer
    lm.eval()
    model.eval()
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(lm(x), model(x))


class _IntBatch(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.b(self.a(x).relu().reshape(int(x.shape[0]), 8))


def test_a_batch_size_fixed_by_the_model_code_is_explained():
    lm = localize.transform(_IntBatch(), blocks=2, example_inputs=(torch.randn(3, 4),))
    assert lm.plan.traced.method == "export"
    assert lm.train_step(torch.randn(3, 4), torch.randint(0, 2, (3,)))  # the traced batch size works
    with pytest.raises(localize.LocalizeError, match=r"batch size fixed at 3.*int\(x.shape\[0\]\)"):
        lm.train_step(torch.randn(5, 4), torch.randint(0, 2, (5,)))


@pytest.mark.parametrize("name,torch_cls,kw", [("sgd", torch.optim.SGD, {"momentum": 0.9}), ("adamw", torch.optim.AdamW, {})])
def test_named_optimizers_are_localize_optim_and_match_torch(name, torch_cls, kw):
    from localize.runtime import optim

    case = CASES["resnet1d"]
    a_model, a = _transform(case, 2, optimizer=name, lr=0.01)
    b_model, b = _transform(case, 2, optimizer=lambda p: torch_cls(p, lr=0.01, **kw))
    x, y = case.inputs(6), case.target(6)
    for _ in range(5):
        a.train_step(x, y)
        b.train_step(x, y)
    assert all(isinstance(blk.optimizer, (optim.SGD, optim.AdamW)) for blk in a.blocks)
    for (n, p), q in zip(a_model.named_parameters(), b_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=n)


def _hf_gpt2_with_dropout():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    config._attn_implementation = "sdpa"  # attention dropout is a number passed to the fused op
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def test_exported_attention_dropout_follows_train_and_eval():
    """HF GPT-2 with attn_pdrop 0.1 goes through torch.export (in eval mode); in train() the local
    model must drop attention weights exactly as the original does for the same seed."""
    model = _hf_gpt2_with_dropout()
    x = torch.randint(0, 100, (2, 8))
    lm = localize.transform(model, blocks=2, example_inputs=(x,))
    assert lm.plan.traced.method == "export" and lm.plan.traced.warnings == []
    for mode in (True, False):
        lm.train(mode)
        model.train(mode)
        torch.manual_seed(5)
        got = lm(x).logits
        torch.manual_seed(5)
        want = model(x, use_cache=False).logits
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    lm.train()
    torch.manual_seed(5)
    first = lm(x).logits
    assert not torch.allclose(first, lm(x).logits)  # dropout is on in train(): two calls differ


class _BranchOnTraining(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(6, 8), torch.nn.Linear(8, 3)

    def forward(self, x):
        if x.shape[-1] == 6:  # only torch.export traces this
            x = x * 2
        h = self.a(x)
        if self.training:  # export follows one side of this branch
            h = h + 1.0
        return self.b(h)


def test_an_export_branch_on_training_warns_in_one_line_instead_of_differing_silently():
    with pytest.warns(RuntimeWarning, match=r"localize: in train\(\) the model runs other ops than in eval\(\)"):
        lm = localize.transform(_BranchOnTraining(), blocks=2, example_inputs=(torch.randn(4, 6),))
    assert lm.plan.traced.method == "export" and len(lm.plan.traced.warnings) == 1
    assert "\n" not in lm.plan.traced.warnings[0]


class _EncoderClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(8, 32)
        layer = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.1)
        self.encoder = torch.nn.TransformerEncoder(layer, 4, norm=torch.nn.LayerNorm(32))
        self.head = torch.nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


class _Seq2Seq(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.src, self.tgt = torch.nn.Linear(8, 32), torch.nn.Linear(8, 32)
        self.transformer = torch.nn.Transformer(32, 4, 3, 3, 64, dropout=0.0, batch_first=True)
        self.head = torch.nn.Linear(32, 5)

    def forward(self, src, tgt):
        mask = torch.nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        return self.head(self.transformer(self.src(src), self.tgt(tgt), tgt_mask=mask))


def test_torch_transformer_encoder_is_cut_between_its_layers():
    torch.manual_seed(0)
    model, x = _EncoderClassifier(), torch.randn(3, 6, 8)
    lm = localize.transform(model, blocks=4, example_inputs=(x,))
    params = [b.plan.cost.params for b in lm.blocks]
    assert max(params) < 1.1 * min(params)  # one encoder layer each, not one block holding all four
    model.eval()
    lm.eval()
    with torch.no_grad():  # the encoder's own fast path runs in the original here
        torch.testing.assert_close(lm(x), model(x), atol=1e-5, rtol=1e-5)
    model.train()
    lm.train()
    torch.manual_seed(1)
    got = lm(x)
    torch.manual_seed(1)
    torch.testing.assert_close(got, model(x), atol=1e-6, rtol=0)  # same dropout draws, layer by layer
    named = localize.transform(_EncoderClassifier(), cuts=["encoder.layers.2"], example_inputs=(x,))
    assert [b.plan.nodes[0] for b in named.blocks][1].startswith("encoder_layers_2")


def test_torch_transformer_decoder_and_seq2seq_trace_layer_by_layer():
    torch.manual_seed(0)
    model = _Seq2Seq()
    src, tgt = torch.randn(2, 7, 8), torch.randn(2, 5, 8)
    lm = localize.transform(model, blocks=3, example_inputs=(src, tgt))
    calls = [n.target for n in lm.plan.gm.graph.nodes if n.op == "call_module"]
    assert sum("encoder.layers" in c for c in calls) == 3 and sum("decoder.layers" in c for c in calls) == 3
    model.eval()
    lm.eval()
    with torch.no_grad():
        torch.testing.assert_close(lm(src, tgt), model(src, tgt), atol=1e-5, rtol=1e-5)
