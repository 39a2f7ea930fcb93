"""Every zoo model: output shape, fx-traceability, and traced output equal to the original."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

from localize.errors import LocalizeError
from localize.zoo import GPT, MLP, ResNet1d, ResNet2d, SmallCNN, ViT

# name -> (model factory, input factory, expected output shape)
CASES = {
    "mlp": (
        lambda: MLP(in_features=40, hidden=32, depth=3, num_classes=10),
        lambda: torch.randn(4, 1, 40),
        (4, 10),
    ),
    "mlp_depth0": (
        lambda: MLP(in_features=7, hidden=32, depth=0, num_classes=3),
        lambda: torch.randn(5, 7),
        (5, 3),
    ),
    "small_cnn": (lambda: SmallCNN(), lambda: torch.rand(4, 1, 8, 8), (4, 10)),
    "small_cnn_odd": (
        lambda: SmallCNN(in_channels=3, num_classes=7),
        lambda: torch.rand(3, 3, 11, 13),
        (3, 7),
    ),
    "resnet2d": (lambda: ResNet2d(), lambda: torch.randn(2, 3, 16, 16), (2, 10)),
    "resnet2d_bottleneck": (
        lambda: ResNet2d(widths=(8, 16), blocks_per_stage=(1, 2), bottleneck=True, num_classes=5),
        lambda: torch.randn(2, 3, 9, 7),
        (2, 5),
    ),
    "resnet1d": (lambda: ResNet1d(), lambda: torch.randn(4, 1, 40), (4, 10)),
    "resnet1d_odd": (
        lambda: ResNet1d(in_channels=2, num_classes=3, widths=(8, 12), blocks_per_stage=(1, 3)),
        lambda: torch.randn(3, 2, 47),
        (3, 3),
    ),
    "vit": (lambda: ViT(), lambda: torch.rand(4, 1, 8, 8), (4, 10)),
    "vit_odd": (
        lambda: ViT(image_size=12, patch_size=3, in_channels=3, num_classes=7, dim=24, depth=2, heads=3),
        lambda: torch.rand(3, 3, 12, 12),
        (3, 7),
    ),
    "gpt": (lambda: GPT(vocab_size=50), lambda: torch.randint(0, 50, (4, 64)), (4, 64, 50)),
    "gpt_short": (
        lambda: GPT(vocab_size=31, block_size=16, dim=24, depth=3, heads=2),
        lambda: torch.randint(0, 31, (3, 7)),
        (3, 7, 31),
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_forward_shape_and_trace_matches(name: str) -> None:
    make_model, make_input, shape = CASES[name]
    model, x = make_model(), make_input()
    expected = model(x)
    assert expected.shape == shape
    traced = fx.symbolic_trace(model)
    traced.graph.lint()
    torch.testing.assert_close(traced(x), expected)


@pytest.mark.parametrize("name", ["gpt", "vit", "resnet2d"])
def test_trace_matches_in_eval_mode_and_backward_runs(name: str) -> None:
    make_model, make_input, _ = CASES[name]
    model, x = make_model(), make_input()
    traced = fx.symbolic_trace(model)
    model.eval()
    traced.eval()
    torch.testing.assert_close(traced(x), model(x))
    model.train()
    model(x).float().sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_traced_gpt_keeps_sequence_length_symbolic() -> None:
    model = GPT(vocab_size=20, block_size=32, dim=16, depth=2, heads=2)
    traced = fx.symbolic_trace(model)
    for length in (1, 5, 32):
        idx = torch.randint(0, 20, (2, length))
        torch.testing.assert_close(traced(idx), model(idx))


def test_gpt_is_causal() -> None:
    model = GPT(vocab_size=20, block_size=16, dim=16, depth=2, heads=2)
    idx = torch.randint(0, 20, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 20
    torch.testing.assert_close(model(changed)[:, :10], model(idx)[:, :10])
    assert not torch.allclose(model(changed)[:, 10:], model(idx)[:, 10:])


def test_module_paths_name_stages_and_layers() -> None:
    resnet = dict(ResNet2d().named_modules())
    assert {"layer1", "layer4", "layer2.0.conv1", "layer2.0.downsample.0", "fc"} <= resnet.keys()
    assert "layer1.0.downsample.0" not in resnet  # same shape: no projection
    bottleneck = dict(ResNet2d(bottleneck=True).named_modules())
    assert {"layer1.0.conv3", "layer1.0.downsample.0"} <= bottleneck.keys()
    assert {"layer1", "layer3", "layer3.1.conv2", "fc"} <= dict(ResNet1d().named_modules()).keys()
    assert {"layers.3.attn.qkv", "layers.0.mlp.fc1", "norm", "head", "patch_embed"} <= dict(
        ViT().named_modules()
    ).keys()
    assert {"layers.3.attn.proj", "tok_embed", "pos_embed", "norm", "lm_head"} <= dict(
        GPT(vocab_size=10).named_modules()
    ).keys()
    assert {"features.0.0", "features.2", "classifier"} <= dict(SmallCNN().named_modules()).keys()


def test_gpt_lm_head_is_untied() -> None:
    model = GPT(vocab_size=10)
    assert model.lm_head.weight.data_ptr() != model.tok_embed.weight.data_ptr()


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: ViT(image_size=8, patch_size=3), "divisible by patch_size"),
        (lambda: ViT(dim=30, heads=4), "divisible by heads"),
        (lambda: GPT(vocab_size=10, dim=30, heads=4), "divisible by heads"),
        (lambda: ResNet2d(widths=(8, 16), blocks_per_stage=(1,)), "equal length"),
        (lambda: ResNet1d(widths=(8,), blocks_per_stage=(0,)), ">= 1 block"),
        (lambda: MLP(4, 8, -1, 2), "depth must be >= 0"),
    ],
)
def test_bad_arguments_raise_localize_error(build, message: str) -> None:
    with pytest.raises(LocalizeError, match=message):
        build()
