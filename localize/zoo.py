"""Small model families written in plain PyTorch, used by the tests, examples and benchmarks.

Every model here traces with ``torch.fx.symbolic_trace``: forward passes read shapes only
through ops fx records (``flatten``, ``unflatten``, ``size``), never branch on tensor values,
and give each layer its own module so that module paths (``layer2.0.conv1``, ``layers.3``)
name cut points unambiguously.

>>> import torch
>>> from localize.zoo import SmallCNN
>>> SmallCNN()(torch.zeros(2, 1, 8, 8)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from localize.errors import ConfigError

__all__ = [
    "MLP",
    "SmallCNN",
    "BasicBlock1d",
    "BasicBlock2d",
    "Bottleneck2d",
    "ResNet1d",
    "ResNet2d",
    "Attention",
    "FeedForward",
    "EncoderLayer",
    "DecoderLayer",
    "ViT",
    "GPT",
]


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# --------------------------------------------------------------------------- MLP and CNN


class MLP(nn.Module):
    """A multilayer perceptron: flatten, ``depth`` blocks of (Linear, ReLU), then a Linear ``head``.

    Blocks live in ``layers`` (paths ``layers.0.0`` ... ``layers.{depth-1}.0``).

    >>> import torch
    >>> model = MLP(in_features=40, hidden=32, depth=3, num_classes=10)
    >>> model(torch.zeros(4, 1, 40)).shape
    torch.Size([4, 10])
    >>> [name for name, _ in model.named_children()]
    ['flatten', 'layers', 'head']
    """

    def __init__(self, in_features: int, hidden: int, depth: int, num_classes: int) -> None:
        super().__init__()
        _require(depth >= 0, f"MLP depth must be >= 0, got {depth}")
        widths = [in_features] + [hidden] * depth
        self.flatten = nn.Flatten(1)
        self.layers = nn.Sequential(
            *(nn.Sequential(nn.Linear(a, b), nn.ReLU()) for a, b in zip(widths[:-1], widths[1:]))
        )
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.flatten(x)))


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class SmallCNN(nn.Module):
    """A plain 2D CNN for small images such as the 8x8 sklearn digits.

    ``features`` holds conv-bn-relu blocks (the 2nd and 3rd followed by 2x2 max pooling);
    ``classifier`` pools globally and applies a Linear layer, so any input size >= 4x4 works.

    >>> import torch
    >>> model = SmallCNN(in_channels=1, num_classes=10)
    >>> model(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    >>> len(model.features)
    5
    """

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, widths: tuple[int, int, int] = (32, 64, 128)
    ) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, w1),
            _conv_bn_relu(w1, w2),
            nn.MaxPool2d(2),
            _conv_bn_relu(w2, w3),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(w3, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# --------------------------------------------------------------------------- residual networks


class _BasicBlock(nn.Module):
    """Two 3-wide convolutions with a residual connection; subclasses pick 1D or 2D layers."""

    expansion = 1
    Conv: type[nn.Module]
    Norm: type[nn.Module]

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = self.Conv(in_channels, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = self.Norm(width)
        self.relu1 = nn.ReLU()
        self.conv2 = self.Conv(width, out_channels, 3, padding=1, bias=False)
        self.bn2 = self.Norm(out_channels)
        self.downsample = _downsample(self.Conv, self.Norm, in_channels, out_channels, stride)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.downsample(x))


class _Bottleneck(nn.Module):
    """1-wide reduce, 3-wide conv, 1-wide expand (by 4) with a residual connection."""

    expansion = 4
    Conv: type[nn.Module]
    Norm: type[nn.Module]

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = self.Conv(in_channels, width, 1, bias=False)
        self.bn1 = self.Norm(width)
        self.relu1 = nn.ReLU()
        self.conv2 = self.Conv(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = self.Norm(width)
        self.relu2 = nn.ReLU()
        self.conv3 = self.Conv(width, out_channels, 1, bias=False)
        self.bn3 = self.Norm(out_channels)
        self.downsample = _downsample(self.Conv, self.Norm, in_channels, out_channels, stride)
        self.relu3 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + self.downsample(x))


def _downsample(
    conv: type[nn.Module], norm: type[nn.Module], in_channels: int, out_channels: int, stride: int
) -> nn.Module:
    # nn.Identity keeps the residual add in the graph even when no projection is needed.
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(conv(in_channels, out_channels, 1, stride=stride, bias=False), norm(out_channels))


class BasicBlock2d(_BasicBlock):
    """ResNet basic block with Conv2d / BatchNorm2d; ``downsample`` projects when the shape changes.

    >>> import torch
    >>> BasicBlock2d(16, 32, stride=2)(torch.zeros(1, 16, 8, 8)).shape
    torch.Size([1, 32, 4, 4])
    """

    Conv = nn.Conv2d
    Norm = nn.BatchNorm2d


class Bottleneck2d(_Bottleneck):
    """ResNet bottleneck block with Conv2d / BatchNorm2d; outputs ``4 * width`` channels.

    >>> import torch
    >>> Bottleneck2d(16, 8, stride=2)(torch.zeros(1, 16, 8, 8)).shape
    torch.Size([1, 32, 4, 4])
    """

    Conv = nn.Conv2d
    Norm = nn.BatchNorm2d


class BasicBlock1d(_BasicBlock):
    """ResNet basic block with Conv1d / BatchNorm1d, for (B, C, L) signals.

    >>> import torch
    >>> BasicBlock1d(8, 16, stride=2)(torch.zeros(1, 8, 40)).shape
    torch.Size([1, 16, 20])
    """

    Conv = nn.Conv1d
    Norm = nn.BatchNorm1d


class _ResNet(nn.Module):
    """Stem (conv, bn, relu), stages ``layer1..layerN``, global average pool, flatten, ``fc``."""

    def __init__(
        self,
        block: type[_BasicBlock] | type[_Bottleneck],
        pool: type[nn.Module],
        stem_kernel: int,
        in_channels: int,
        num_classes: int,
        widths: tuple[int, ...],
        blocks_per_stage: tuple[int, ...],
    ) -> None:
        super().__init__()
        _require(
            len(widths) == len(blocks_per_stage) and len(widths) > 0,
            f"widths {widths} and blocks_per_stage {blocks_per_stage} must be non-empty and of equal length",
        )
        _require(
            all(n >= 1 for n in blocks_per_stage), f"every stage needs >= 1 block, got {blocks_per_stage}"
        )
        self.conv1 = block.Conv(in_channels, widths[0], stem_kernel, padding=stem_kernel // 2, bias=False)
        self.bn1 = block.Norm(widths[0])
        self.relu = nn.ReLU()
        channels = widths[0]
        self.stage_names: list[str] = []
        for i, (width, count) in enumerate(zip(widths, blocks_per_stage)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(count):
                blocks.append(block(channels, width, stride if j == 0 else 1))
                channels = width * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.stage_names.append(f"layer{i + 1}")
        self.avgpool = pool(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self.fc(self.flatten(self.avgpool(x)))


class ResNet2d(_ResNet):
    """A ResNet for small images (CIFAR-style 3x3 stem, no max pool); input (B, C, H, W).

    Stages are ``layer1..layer4`` (one per entry of ``widths``); stage ``i > 1`` halves the
    resolution. ``bottleneck=True`` uses :class:`Bottleneck2d` (4x wider outputs).

    >>> import torch
    >>> model = ResNet2d(in_channels=3, num_classes=10)
    >>> model(torch.zeros(2, 3, 16, 16)).shape
    torch.Size([2, 10])
    >>> type(model.layer2[0].conv1).__name__
    'Conv2d'
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        widths: tuple[int, ...] = (16, 32, 64, 128),
        blocks_per_stage: tuple[int, ...] = (2, 2, 2, 2),
        bottleneck: bool = False,
    ) -> None:
        block = Bottleneck2d if bottleneck else BasicBlock2d
        super().__init__(block, nn.AdaptiveAvgPool2d, 3, in_channels, num_classes, widths, blocks_per_stage)


class ResNet1d(_ResNet):
    """A 1D ResNet for signals shaped (B, C, L), e.g. MNIST-1D as (B, 1, 40).

    >>> import torch
    >>> model = ResNet1d(in_channels=1, num_classes=10)
    >>> model(torch.zeros(2, 1, 40)).shape
    torch.Size([2, 10])
    >>> [name for name, _ in model.named_children()][:6]
    ['conv1', 'bn1', 'relu', 'layer1', 'layer2', 'layer3']
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: tuple[int, ...] = (32, 64, 128),
        blocks_per_stage: tuple[int, ...] = (2, 2, 2),
    ) -> None:
        super().__init__(
            BasicBlock1d, nn.AdaptiveAvgPool1d, 5, in_channels, num_classes, widths, blocks_per_stage
        )


# --------------------------------------------------------------------------- transformers


class Attention(nn.Module):
    """Multi-head self-attention on (B, N, dim) via ``F.scaled_dot_product_attention``.

    >>> import torch
    >>> Attention(dim=32, heads=4, causal=True)(torch.zeros(2, 5, 32)).shape
    torch.Size([2, 5, 32])
    """

    def __init__(self, dim: int, heads: int, causal: bool = False) -> None:
        super().__init__()
        _require(dim % heads == 0, f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.causal = causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, N, 3*dim) -> (3, B, heads, N, head_dim) without reading B or N, so fx keeps them symbolic.
        qkv = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=self.causal)
        return self.proj(out.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    """Transformer MLP: Linear ``fc1``, GELU, Linear ``fc2``.

    >>> import torch
    >>> FeedForward(dim=16, hidden=32)(torch.zeros(2, 3, 16)).shape
    torch.Size([2, 3, 16])
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    >>> import torch
    >>> EncoderLayer(dim=16, heads=2, mlp_ratio=2)(torch.zeros(2, 3, 16)).shape
    torch.Size([2, 3, 16])
    """

    causal = False

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, causal=self.causal)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp_ratio * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DecoderLayer(EncoderLayer):
    """:class:`EncoderLayer` with causal attention (position t sees positions <= t only).

    >>> import torch
    >>> DecoderLayer(dim=16, heads=2)(torch.zeros(2, 3, 16)).shape
    torch.Size([2, 3, 16])
    """

    causal = True


class ViT(nn.Module):
    """A small Vision Transformer: Conv2d patch embedding, cls token, learned positions.

    ``layers`` holds ``depth`` :class:`EncoderLayer` s; ``norm`` is the final LayerNorm and
    ``head`` classifies the cls token. Input (B, in_channels, image_size, image_size).

    >>> import torch
    >>> model = ViT(image_size=8, patch_size=2, in_channels=1, num_classes=10)
    >>> model(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    >>> model.pos_embed.shape  # 16 patches + cls
    torch.Size([1, 17, 64])
    """

    def __init__(
        self,
        image_size: int = 8,
        patch_size: int = 2,
        in_channels: int = 1,
        num_classes: int = 10,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: int = 2,
    ) -> None:
        super().__init__()
        _require(
            image_size % patch_size == 0,
            f"image_size ({image_size}) must be divisible by patch_size ({patch_size})",
        )
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, dim) * 0.02)
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, num_patches, dim)
        cls = self.cls_token.expand(x.size(0), -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x)[:, 0])


class GPT(nn.Module):
    """A small decoder-only language model: (B, T) token ids -> (B, T, vocab_size) logits.

    Token and position embeddings (``tok_embed``, ``pos_embed``), ``depth`` causal
    :class:`DecoderLayer` s in ``layers``, final LayerNorm ``norm`` and an untied ``lm_head``.
    Any T <= ``block_size`` works, also after tracing.

    >>> import torch
    >>> model = GPT(vocab_size=100, block_size=64)
    >>> model(torch.zeros(2, 64, dtype=torch.long)).shape
    torch.Size([2, 64, 100])
    >>> model(torch.zeros(2, 5, dtype=torch.long)).shape
    torch.Size([2, 5, 100])
    """

    def __init__(
        self, vocab_size: int, block_size: int = 64, dim: int = 64, depth: int = 4, heads: int = 4
    ) -> None:
        super().__init__()
        self.block_size = block_size
        self.tok_embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Embedding(block_size, dim)
        self.layers = nn.ModuleList(DecoderLayer(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.size(1), device=idx.device)
        x = self.tok_embed(idx) + self.pos_embed(positions)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))
