"""The published aux strategies: ``auglocal``, ``man``, ``infopro``, ``featrecon``, ``drtp``.

Each trains every model family (2D and 1D ResNets, a ViT, a GPT, a Hugging Face GPT-2) at K = 2,
4 and 8 with finite, falling losses on a fixed batch, and each one's defining property is checked
against its formula: AugLocal's sampled layers and depths, MAN's EMA, InfoPro's and FeatRecon's
reconstruction targets, DRTP's fixed projection. Option errors name the valid options and values.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import localize
from localize.aux.auglocal import depth_schedule, sample_layers
from localize.compiler.tracer import lmeta
from localize.errors import LocalizeError
from localize.passes.find_units import find_units, last_unit_until
from localize.runtime.model import LossContext
from localize.zoo import GPT, ResNet1d, ResNet2d, ViT
from tests.models import BlockOutputs, Case

STRATEGIES = ["auglocal", "man", "readout", "infopro", "featrecon", "drtp"]
STEPS = 6  # steps after the first on one fixed batch


def _hf_gpt2(layers: int = 8) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_layer=layers,
        n_embd=16,
        n_head=2,
        vocab_size=29,
        n_positions=8,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg)


def _ints(high: int, *shape: int) -> torch.Tensor:
    return torch.randint(0, high, shape)


# Every model has 8 repeated units, so K = 8 is legal; widths are tiny to keep the matrix fast. The
# Hugging Face model is exported (torch.export), which costs ~0.4 s per layer: it has K layers.
MODELS: dict[str, Case] = {
    c.name: c
    for c in [
        Case(
            "resnet2d",
            lambda: ResNet2d(3, 10, widths=(4, 8, 8, 16), blocks_per_stage=(2, 2, 2, 2)),
            lambda b: (torch.randn(b, 3, 8, 8),),
            lambda b: _ints(10, b),
        ),
        Case(
            "resnet1d",
            lambda: ResNet1d(1, 10, widths=(4, 8, 16), blocks_per_stage=(3, 3, 2)),
            lambda b: (torch.randn(b, 1, 24),),
            lambda b: _ints(10, b),
        ),
        Case(
            "vit",
            lambda: ViT(image_size=4, patch_size=2, in_channels=1, num_classes=10, dim=16, depth=8, heads=2),
            lambda b: (torch.randn(b, 1, 4, 4),),
            lambda b: _ints(10, b),
        ),
        Case(
            "gpt",
            lambda: GPT(vocab_size=23, block_size=8, dim=16, depth=8, heads=2),
            lambda b: (_ints(23, b, 8),),
            lambda b: _ints(23, b, 8),
        ),
        Case("hf_gpt2", _hf_gpt2, lambda b: (_ints(29, b, 8),), lambda b: _ints(29, b, 8)),
    ]
}


def _transform(name: str, blocks: int, aux: str, lr: float = 3e-3, **options):
    case = MODELS[name]
    torch.manual_seed(0)
    model = _hf_gpt2(blocks) if name == "hf_gpt2" else case.build()
    lm = localize.transform(
        model,
        blocks=blocks,
        example_inputs=case.inputs(2),
        aux=aux,
        aux_options=options or None,
        optimizer=lambda p: torch.optim.AdamW(p, lr=lr),
    )
    return model, lm


def _batch(name: str, size: int = 6):
    torch.manual_seed(1)
    case = MODELS[name]
    return case.inputs(size), case.target(size)


# ----------------------------------------------------------------------------------------------- matrix


@pytest.mark.parametrize("blocks", [2, 4, 8])
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("aux", STRATEGIES)
def test_trains_every_model_family(aux, name, blocks):
    model, lm = _transform(name, blocks, aux)
    assert len(lm.blocks) == blocks and all(b.aux is not None for b in lm.blocks[:-1])
    inputs, target = _batch(name)
    first = lm.train_step(inputs, target)
    for _ in range(STEPS):
        last = lm.train_step(inputs, target)
    assert all(math.isfinite(v) for v in first + last), (first, last)
    assert all(b < a for a, b in zip(first, last)), (first, last)


# ----------------------------------------------------------------------------------------------- auglocal


@pytest.mark.parametrize(
    "depth,taper,blocks",
    [(2, 0.5, 2), (2, 0.5, 4), (3, 0.5, 8), (5, 0.5, 16), (4, 1.0, 6), (3, 0.0, 5), (1, 0.5, 9)],
)
def test_auglocal_depths_follow_the_pyramid_formula(depth, taper, blocks):
    expected = []
    for i in range(blocks - 1):
        x = i * taper / (blocks - 2) if blocks > 2 else 0.0
        expected.append(max(1, round(depth * (1 - x) + x)))
    assert depth_schedule(depth, taper, blocks) == expected
    assert expected[0] == depth


@pytest.mark.parametrize(
    "layers,last,depth",
    [(16, -1, 3), (16, 3, 3), (16, 12, 3), (16, 13, 3), (15, 0, 5), (8, 6, 2), (8, 2, 1), (55, 10, 4)],
)
def test_auglocal_samples_layers_uniformly(layers, last, depth):
    later = layers - last - 1
    if depth >= later:
        expected = list(range(last + 1, layers))
    else:
        expected = [round(last + later / depth * j) for j in range(1, depth + 1)]
    got = sample_layers(layers, last, depth)
    assert got == expected
    assert got[-1] == layers - 1 and all(a < b for a, b in zip([last, *got], got))  # increasing, after l


UNIT_PATHS = {
    "resnet1d": [f"layer{s}.{i}" for s, n in ((1, 3), (2, 3), (3, 2)) for i in range(n)],
    "gpt": [f"layers.{i}" for i in range(8)],
    "hf_gpt2": [f"transformer.h.{i}" for i in range(4)],  # 4 layers at K = 4
}


@pytest.mark.parametrize("name", list(UNIT_PATHS))
def test_auglocal_heads_copy_the_sampled_layers_without_sharing_storage(name):
    model, lm = _transform(name, 4, "auglocal", depth=3, taper=0.5)
    units = find_units(lm.plan)
    assert [u.path for u in units] == UNIT_PATHS[name]
    depths = depth_schedule(3, 0.5, 4)
    model_storage = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    for block in lm.blocks[:-1]:
        # the block ends at the last unit whose nodes all lie in blocks <= i
        owned = [u.index for u in units if all(lmeta(n)["block"] <= block.index for n in _nodes(lm, u))]
        assert last_unit_until(units, block.index) == max(owned, default=-1)
        picked = sample_layers(len(units), max(owned, default=-1), depths[block.index])
        head = block.aux
        assert head.layers == picked and head.paths == [units[i].path for i in picked]
        copies = [m.layer for m in head if hasattr(m, "layer")]
        assert [type(c) for c in copies] == [type(model.get_submodule(units[i].path)) for i in picked]
        head_storage = {t.untyped_storage().data_ptr() for t in [*head.parameters(), *head.buffers()]}
        assert not head_storage & model_storage
        for clone, i in zip(copies, picked):  # re-initialised: not the model's values either
            original = model.get_submodule(units[i].path)
            assert any(not torch.equal(a, b) for a, b in zip(clone.parameters(), original.parameters()))


def _nodes(lm, unit):
    return [n for n in lm.plan.gm.graph.nodes if n.name in unit.nodes]


def test_auglocal_ends_with_a_copy_of_the_output_head():
    model, lm = _transform("vit", 2, "auglocal", depth=1)
    tail = lm.blocks[0].aux[-1]  # norm -> cls token -> head, as in ViT.forward
    x = torch.randn(3, 17, 16)
    tail.norm.load_state_dict(model.norm.state_dict())
    tail.head.load_state_dict(model.head.state_dict())
    torch.testing.assert_close(tail(x), model.head(model.norm(x)[:, 0]))


# ----------------------------------------------------------------------------------------------- man


@pytest.mark.parametrize("name", ["resnet1d", "hf_gpt2"])
def test_man_ema_has_no_gradient_and_follows_the_formula(name):
    model, lm = _transform(name, 4, "man", momentum=0.9)
    head = lm.blocks[0].aux
    live = model.get_submodule(head.follows)
    units = find_units(lm.plan)
    unit = next(u for u in units if u.path == head.follows)  # the first layer of block 1
    assert all(lmeta(n)["block"] == 1 for n in _nodes(lm, unit))
    assert all(lmeta(n)["block"] == 0 for u in units[: unit.index] for n in _nodes(lm, u))
    # the EMA copy holds buffers only, one per weight of the live layer, no gradient
    assert list(head.ema.parameters()) == []
    live_params = dict(live.named_parameters())
    ema = head.ema_tensors()
    assert sorted(ema) == sorted(live_params)
    assert all(not t.requires_grad for t in ema.values())
    for k, t in ema.items():  # starts as an exact copy of the live layer, in its own storage
        assert torch.equal(t, live_params[k]) and t.data_ptr() != live_params[k].data_ptr()
    inputs, target = _batch(name)
    lm.train_step(inputs, target)  # moves every block at least once
    before_ema = {k: v.clone() for k, v in head.ema_tensors().items()}
    before_live = {k: v.detach().clone() for k, v in live.named_parameters()}
    lm.train_step(inputs, target)  # block 0 updates (then its EMA) before block 1 updates its layer
    after = head.ema_tensors()
    assert any(not torch.equal(after[k], before_ema[k]) for k in after)
    for k, t in after.items():
        torch.testing.assert_close(t, 0.9 * before_ema[k] + 0.1 * before_live[k], atol=1e-6, rtol=1e-5)
    opt_params = {id(p) for g in lm.blocks[0].optimizer.param_groups for p in g["params"]}
    assert not opt_params & {id(t) for t in after.values()}
    assert {id(p) for p in head.bias.parameters()} <= opt_params  # the learnable bias trains
    assert all(p.requires_grad for p in head.bias.parameters())


def test_man_ema_copies_are_checkpointed(tmp_path):
    model, lm = _transform("resnet1d", 4, "man")
    inputs, target = _batch("resnet1d")
    for _ in range(2):
        lm.train_step(inputs, target)
    head = lm.blocks[1].aux
    keys = {f"aux.1.ema.layer.{k}" for k in head.ema_names}
    assert keys <= set(lm.state_dict())
    saved = {k: v.clone() for k, v in head.ema_tensors().items()}
    lm.save(str(tmp_path / "ckpt.pt"))
    _, fresh = _transform("resnet1d", 4, "man")
    assert any(not torch.equal(fresh.blocks[1].aux.ema_tensors()[k], v) for k, v in saved.items())
    localize.load(str(tmp_path / "ckpt.pt"), into=fresh)
    for k, v in fresh.blocks[1].aux.ema_tensors().items():
        assert torch.equal(v, saved[k])


# ----------------------------------------------------------------------------------------------- readout


@pytest.mark.parametrize("name", ["resnet1d", "hf_gpt2"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_readout_copies_follow_the_live_layers_by_the_formula(name, momentum):
    model, lm = _transform(name, 4, "readout", follow=True, momentum=momentum)
    head = lm.blocks[0].aux
    # buffers only (adapters aside): the block's loss trains the block
    buffers = {b: head.layers.get_buffer(b) for b, _, _ in head.follows}
    live = {b: getattr(head, f"_live_{i}").get_parameter(p) for b, i, p in head.follows}
    assert buffers and all(not t.requires_grad for t in buffers.values())
    for b, t in buffers.items():  # exact copies of the live layers at the start, own storage
        assert torch.equal(t, live[b]) and t.data_ptr() != live[b].data_ptr()
    assert head.paths[-1] in {n for n, _ in model.named_modules()}
    inputs, target = _batch(name)
    lm.train_step(inputs, target)
    before = {b: t.clone() for b, t in buffers.items()}
    before_live = {b: t.detach().clone() for b, t in live.items()}
    lm.train_step(inputs, target)  # block 0 updates and follows before the later blocks move
    for b, t in buffers.items():
        torch.testing.assert_close(t, momentum * before[b] + (1 - momentum) * before_live[b], atol=1e-6, rtol=1e-5)
    opt_params = {id(p) for g in lm.blocks[0].optimizer.param_groups for p in g["params"]}
    assert not opt_params & {id(t) for t in buffers.values()}


def test_readout_gradients_point_where_backprop_points():
    """At the start the copies are the live layers: copying every later unit (depth=-1) gives
    backprop's own gradient (cosine 1); the default two units come close; a DGL head does not."""
    from localize.zoo import GPT

    torch.manual_seed(0)
    x = torch.randint(0, 30, (32, 16))
    y = torch.roll(x, -1, 1)
    cosines = {}
    for key, aux, options in (("dgl", "dgl", {}), ("default", "readout", {}), ("all", "readout", {"depth": -1})):
        torch.manual_seed(0)
        lm = localize.transform(GPT(30, block_size=16, dim=32, depth=4), blocks=4, example_inputs=(x[:2],),
                                aux=aux, aux_options=options)
        cosines[key] = [b.cosine for b in localize.diagnose(lm, x, y).blocks]
    assert all(c == pytest.approx(1.0, abs=1e-5) for c in cosines["all"])
    assert min(cosines["default"]) > 0.8 > max(cosines["dgl"][:-1])


def test_readout_reaching_the_models_end_trains_exactly_like_backprop():
    """K=2, depth 2 on a 4-layer GPT: block 0's head is a copy of the rest of the model, so its
    gradient is backprop's and the copies stay equal to the live layers: bit-identical to K=1."""
    from localize.zoo import GPT

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 30, (16, 16), generator=g)
    y = torch.roll(x, -1, 1)
    trained = {}
    for blocks, aux in ((1, "dgl"), (2, "readout")):
        torch.manual_seed(0)
        net = GPT(30, block_size=16, dim=32, depth=4)
        lm = localize.transform(net, blocks=blocks, example_inputs=(x[:2],), aux=aux)
        for _ in range(4):
            losses = lm.train_step(x, y)
        trained[blocks] = (net.state_dict(), losses)
    assert trained[2][1][0] == trained[2][1][1] == trained[1][1][0]  # block 0's loss is the model's
    for k, v in trained[1][0].items():
        assert torch.equal(trained[2][0][k], v), k


def test_readout_copies_start_from_the_live_layers_and_train_with_their_block():
    model, lm = _transform("hf_gpt2", 4, "readout")
    head = lm.blocks[0].aux
    assert head.follows == [] and head.paths[:2] == ["transformer.h.1", "transformer.h.2"]
    copy = head.layers[0].layer
    live = model.get_submodule("transformer.h.1")
    for (name, p), q in zip(copy.named_parameters(), live.parameters()):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), name
    opt_params = {id(p) for g in lm.optimizers[0].param_groups for p in g["params"]}
    assert {id(p) for p in head.parameters()} <= opt_params
    inputs, target = _batch("hf_gpt2")
    lm.train_step(inputs, target)
    assert any(not torch.equal(p, q) for p, q in zip(copy.parameters(), live.parameters()))


# ----------------------------------------------------------------------------------------------- infopro, featrecon


def _spy(decoder, seen: list):
    original = decoder.loss

    def loss(feature, target):
        seen.append(target)
        return original(feature, target)

    decoder.loss = loss


@pytest.mark.parametrize("name", ["resnet2d", "gpt"])
def test_infopro_reconstructs_the_model_input(name):
    _, lm = _transform(name, 4, "infopro")
    seen: list[torch.Tensor] = []
    for block in lm.blocks[:-1]:
        _spy(block.aux.decoder, seen)
    (x,), target = _batch(name)
    lm.train_step((x,), target)
    assert len(seen) == 2 and all(t is x for t in seen)  # the last local block weighs recon by 0: not run
    weights = [b.aux.weights for b in lm.blocks[:-1]]
    # defaults interpolated linearly, first -> last local block: recon 5 -> 0, cls 0.5 -> 1
    assert [w for pair in weights for w in pair] == pytest.approx([5.0, 0.5, 2.5, 0.75, 0.0, 1.0])
    assert lm.blocks[0].aux.decoder.kind == ("conv" if name == "resnet2d" else "tokens")


@pytest.mark.parametrize("name", ["vit", "resnet1d"])
def test_featrecon_reconstructs_the_detached_block_input(name):
    _, lm = _transform(name, 4, "featrecon")
    seen: list[torch.Tensor] = []
    for block in lm.blocks[:-1]:
        _spy(block.aux.decoder, seen)
    (x,), target = _batch(name)
    lm.eval()  # same numbers for the reference run and the step
    run = BlockOutputs(lm.program)
    run.run(x)
    lm.train_step((x,), target)
    assert len(seen) == 3
    assert torch.equal(seen[0], x)  # the first block's input is the model input
    for i in (1, 2):
        previous = run.outputs[i - 1][lm._loss_slots[i - 1]]
        assert not seen[i].requires_grad and seen[i].grad_fn is None
        torch.testing.assert_close(seen[i], previous)
        assert lm.blocks[i].aux.target_name == lm.blocks[i - 1].plan.primary


# ----------------------------------------------------------------------------------------------- drtp


@pytest.mark.parametrize("name", ["resnet2d", "gpt"])
def test_drtp_projection_is_fixed_and_adds_no_trainable_parameters(name):
    model, lm = _transform(name, 4, "drtp")
    heads = [b.aux for b in lm.blocks[:-1]]
    assert all(len(list(h.parameters())) == 0 for h in heads)
    for b in lm.blocks[:-1]:
        assert {id(p) for p in b.trainable} == {id(p) for p in b.params}
    before = [h.projection.clone() for h in heads]
    inputs, target = _batch(name)
    for _ in range(3):
        lm.train_step(inputs, target)
    assert all(torch.equal(a, h.projection) for a, h in zip(before, heads))
    # the loss is the MSE between the pooled output and the projected one-hot target
    feature = torch.randn(6, *lm.blocks[0].plan.feature_shape[1:])
    ctx = LossContext(0, [], (), lm.loss_fn)
    pooled = heads[0].pooled(feature)
    onehot = torch.nn.functional.one_hot(target, heads[0].projection.shape[0]).float()
    torch.testing.assert_close(
        heads[0].local_loss(feature, target, ctx),
        torch.nn.functional.mse_loss(pooled, onehot @ heads[0].projection),
    )


# ----------------------------------------------------------------------------------------------- isolation, errors


@pytest.mark.parametrize("aux", STRATEGIES)
def test_each_local_loss_reaches_only_its_own_block(aux):
    model, lm = _transform("resnet1d", 4, aux)
    (x,), target = _batch("resnet1d")
    run = BlockOutputs(lm.program)
    with torch.enable_grad():
        run.run(x)
    owner = {id(p): b.index for b in lm.blocks for p in b.trainable}
    params = list(model.parameters()) + list(lm.aux.parameters())
    for i in range(3):
        for p in params:
            p.grad = None
        inputs = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in run.outputs.get(i - 1, (x,)))
        ctx = LossContext(i, [x], inputs, lm.loss_fn)
        lm.local_loss(i, run.outputs[i], target, ctx).backward(retain_graph=True)
        touched = {owner.get(id(p), -1) for p in params if p.grad is not None and p.grad.any()}
        assert touched == {i}, (aux, i, touched)


@pytest.mark.parametrize("aux", STRATEGIES)
def test_inference_is_the_models_own(aux):
    torch.manual_seed(0)
    model = MODELS["resnet1d"].build()
    reference = copy.deepcopy(model).eval()
    lm = localize.transform(model, blocks=4, example_inputs=MODELS["resnet1d"].inputs(2), aux=aux)
    (x,), target = _batch("resnet1d")
    torch.testing.assert_close(lm.eval()(x), reference(x))  # the heads add nothing to forward
    lm.train()
    lm.train_step((x,), target)
    lm.eval()
    torch.testing.assert_close(lm(x), model.eval()(x))  # trained in place, still the model's forward
    assert not torch.allclose(lm(x), reference(x))


@pytest.mark.parametrize(
    "aux,options,words",
    [
        ("auglocal", {"dpeth": 2}, ["'dpeth'", "depth", "taper"]),
        ("auglocal", {"depth": 0}, ["depth=0", "int >= 1"]),
        ("auglocal", {"taper": 1.5}, ["taper=1.5", "[0, 1]"]),
        ("man", {"momentum": 1.0}, ["momentum=1.0", "[0, 1)"]),
        ("man", {"ema": 0.9}, ["'ema'", "momentum", "width", "pool"]),
        ("readout", {"depth": -2}, ["depth=-2", "int >= -1"]),
        ("readout", {"momentum": 1.0}, ["momentum=1.0", "[0, 1)"]),
        ("infopro", {"recon_loss": "l1"}, ["recon_loss='l1'", "'mse' or 'bce'"]),
        ("infopro", {"recon_weights": (1.0, -1.0)}, ["recon_weights", "floats >= 0"]),
        ("infopro", {"input": "pixels"}, ["'pixels'", "['x']"]),
        ("featrecon", {"cls_weight": -1}, ["cls_weight=-1", "float >= 0"]),
        ("featrecon", {"lambda": 1}, ["'lambda'", "recon_weight", "cls_weight", "width"]),
        ("drtp", {"scale": 0}, ["scale=0", "float > 0"]),
        ("drtp", {"width": 8}, ["'width'", "scale", "seed"]),
    ],
)
def test_bad_options_name_the_valid_ones(aux, options, words):
    with pytest.raises(LocalizeError) as err:
        _transform("resnet1d", 2, aux, **options)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_drtp_refuses_outputs_without_classes():
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, 2, 1),
    )
    with pytest.raises(LocalizeError, match="drtp.*per example"):
        localize.transform(net, blocks=2, example_inputs=(torch.randn(2, 1, 6, 6),), aux="drtp")
