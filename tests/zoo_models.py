"""The model zoo of issue #6: the architectures people use, small enough for CI.

Each :class:`Entry` builds a fresh, seeded model and its inputs at any batch size. Own
implementations of the CNN families are written the way their papers (and torchvision) write them,
not the way localize would like them: Python-level ``if self.training`` (stochastic depth),
functional dropout bound to ``self.training``, concatenations, long skips. The transformers come
from Hugging Face ``transformers`` configs (no downloads). ``options`` are the extra
``localize.transform`` arguments an entry needs (``max_frontier`` for graphs whose skips cross
every cut), ``blocks`` the block counts it is accepted at.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from localize.zoo import GPT, ResNet2d, ViT

__all__ = ["Entry", "ENTRIES", "boundaries"]


@dataclass
class Entry:
    name: str
    family: str  # "cnn", "transformer" or "other": the README table groups by it
    build: Callable[[], nn.Module]
    inputs: Callable[[int], tuple]
    target: Callable[[int], torch.Tensor]
    kwargs: Callable[[int], dict] = lambda b: {}
    options: dict[str, Any] = field(default_factory=dict)
    blocks: tuple[int, ...] = (2, 4)
    note: str = ""


def _ints(high: int, *shape: int) -> torch.Tensor:
    return torch.randint(0, high, shape)


def _seeded(fn: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return fn()

    build.__name__ = getattr(fn, "__name__", "build")
    return build


def _bn_relu_conv(cin: int, cout: int, k: int = 3, stride: int = 1) -> list[nn.Module]:
    return [nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)]


# ------------------------------------------------------------------------------------------ CNNs


class PreActBlock(nn.Module):
    """He et al. 2016b: BN-ReLU before each conv; the projection reads the pre-activated input."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class PreActResNet(nn.Module):
    def __init__(self, widths=(8, 16, 32), per_stage=(2, 1, 1), num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        layers, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, per_stage)):
            for j in range(n):
                layers.append(PreActBlock(cin, w, 2 if i > 0 and j == 0 else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        x = F.relu(self.bn(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1 (bottleneck) then BN-ReLU-Conv3x3 producing ``growth`` new channels."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.bottleneck = nn.Sequential(*_bn_relu_conv(cin, 2 * growth, 1))
        self.conv = nn.Sequential(*_bn_relu_conv(2 * growth, growth, 3))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.conv(self.bottleneck(torch.cat(features, 1)))


class DenseBlock(nn.ModuleDict):
    """torchvision's layout: each layer reads the concatenation of every earlier output."""

    def __init__(self, layers: int, cin: int, growth: int) -> None:
        super().__init__()
        for i in range(layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(cin + i * growth, growth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class DenseNet(nn.Module):
    def __init__(self, growth: int = 4, layers=(3, 3, 3), num_classes: int = 10) -> None:
        super().__init__()
        c = 2 * growth
        feats: list[tuple[str, nn.Module]] = [("conv0", nn.Conv2d(3, c, 3, 1, 1, bias=False))]
        for i, n in enumerate(layers):
            feats.append((f"denseblock{i + 1}", DenseBlock(n, c, growth)))
            c += n * growth
            if i < len(layers) - 1:
                trans = nn.Sequential(*_bn_relu_conv(c, c // 2, 1), nn.AvgPool2d(2))
                feats.append((f"transition{i + 1}", trans))
                c //= 2
        feats += [("norm5", nn.BatchNorm2d(c)), ("relu5", nn.ReLU())]
        self.features = nn.Sequential(OrderedDict(feats))
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class SqueezeExcite(nn.Module):
    def __init__(
        self, channels: int, reduced: int, gate: Callable = F.hardsigmoid, act: type = nn.ReLU
    ) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.act = act()
        self.fc2 = nn.Conv2d(reduced, channels, 1)
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


class InvertedResidual(nn.Module):
    """MobileNetV2 block (expand 1x1, depthwise 3x3, project 1x1), with MobileNetV3's optional
    squeeze-excitation and hard-swish; residual when the shape is kept."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, se: bool, act: type) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), act()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            act(),
        ]
        if se:
            layers.append(SqueezeExcite(hidden, max(8, hidden // 4)))
        layers += [nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.block = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_res else out


class MobileNet(nn.Module):
    """MobileNetV2 (``v3=False``: ReLU6, no SE) or V3-style (hard-swish, SE in later blocks)."""

    # (expand, out, repeats, stride, se)
    SETTINGS = ((1, 8, 1, 1, False), (4, 12, 2, 2, False), (4, 16, 2, 2, True), (6, 24, 1, 1, True))

    def __init__(self, v3: bool = True, num_classes: int = 10) -> None:
        super().__init__()
        act = nn.Hardswish if v3 else nn.ReLU6
        layers: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), act())
        ]
        cin = 8
        for t, c, n, s, se in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t, se and v3, act))
                cin = c
        layers.append(nn.Sequential(nn.Conv2d(cin, 48, 1, bias=False), nn.BatchNorm2d(48), act()))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(48, 32), act(), nn.Dropout(0.2), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


class StochasticDepth(nn.Module):
    """Drops the whole residual branch per sample in training (Huang et al. 2016), written like
    torchvision's: Python control flow on ``self.training`` and shapes read as ints."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        size = [x.shape[0]] + [1] * (x.ndim - 1)
        noise = torch.empty(size, dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * noise.div_(keep)


class MBConv(nn.Module):
    """EfficientNet block: expand, depthwise, SE (SiLU/sigmoid), project, stochastic depth."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, drop: float) -> None:
        super().__init__()
        hidden = cin * expand
        self.expand = nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.SiLU())
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.SiLU(),
        )
        self.se = SqueezeExcite(hidden, max(4, cin // 4), gate=torch.sigmoid, act=nn.SiLU)
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.use_res = stride == 1 and cin == cout
        self.stochastic_depth = StochasticDepth(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.se(self.depthwise(self.expand(x))))
        if self.use_res:
            out = self.stochastic_depth(out) + x
        return out


class EfficientNet(nn.Module):
    # (expand, out, repeats, stride)
    SETTINGS = ((1, 8, 1, 1), (4, 12, 2, 2), (4, 16, 2, 2), (4, 24, 1, 1))

    def __init__(self, num_classes: int = 10, drop_path: float = 0.2) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.SiLU())
        ]
        total = sum(s[2] for s in self.SETTINGS)
        cin, k = 8, 0
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(MBConv(cin, c, s if i == 0 else 1, t, drop_path * k / total))
                cin, k = c, k + 1
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Conv2d(cin, 48, 1, bias=False), nn.BatchNorm2d(48), nn.SiLU())
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(48, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.features(x))
        return self.fc(self.dropout(x.mean((2, 3))))


class BasicConv(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int, **kw: Any) -> None:
        super().__init__(nn.Conv2d(cin, cout, k, bias=False, **kw), nn.BatchNorm2d(cout), nn.ReLU())


class InceptionBlock(nn.Module):
    """GoogLeNet's module: 1x1, 1x1→3x3, 1x1→5x5 (as two 3x3) and pool→1x1 branches, concatenated."""

    def __init__(self, cin: int, c1: int, c3: int, c5: int, cp: int) -> None:
        super().__init__()
        self.branch1 = BasicConv(cin, c1, 1)
        self.branch3 = nn.Sequential(BasicConv(cin, c3, 1), BasicConv(c3, c3, 3, padding=1))
        self.branch5 = nn.Sequential(
            BasicConv(cin, c5, 1), BasicConv(c5, c5, 3, padding=1), BasicConv(c5, c5, 3, padding=1)
        )
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, 1, 1), BasicConv(cin, cp, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch3(x), self.branch5(x), self.branch_pool(x)], 1)


class Inception(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = BasicConv(3, 16, 3, padding=1)
        self.inception3a = InceptionBlock(16, 8, 8, 4, 4)
        self.inception3b = InceptionBlock(24, 8, 12, 6, 6)
        self.maxpool = nn.MaxPool2d(2)
        self.inception4a = InceptionBlock(32, 12, 12, 4, 4)
        self.inception4b = InceptionBlock(32, 12, 12, 6, 6)
        self.fc = nn.Linear(36, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inception3b(self.inception3a(self.stem(x)))
        x = self.inception4b(self.inception4a(self.maxpool(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class VGG(nn.Module):
    CFG = (8, "M", 16, "M", 32, 32, "M", 32, 32)

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in self.CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Sequential(
            nn.Linear(cin * 4, 32),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(32, 32),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(32, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
        )


class UNet(nn.Module):
    """Ronneberger et al. 2015: encoder outputs skip to the decoder stage of the same resolution;
    per-pixel class logits, channels last so the default loss reads them."""

    def __init__(self, cin: int = 3, classes: int = 4, w: int = 8) -> None:
        super().__init__()
        self.enc1, self.enc2, self.enc3 = DoubleConv(cin, w), DoubleConv(w, 2 * w), DoubleConv(2 * w, 4 * w)
        self.bottleneck = DoubleConv(4 * w, 8 * w)
        self.up3 = nn.ConvTranspose2d(8 * w, 4 * w, 2, 2)
        self.dec3 = DoubleConv(8 * w, 4 * w)
        self.up2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, 2)
        self.dec2 = DoubleConv(4 * w, 2 * w)
        self.up1 = nn.ConvTranspose2d(2 * w, w, 2, 2)
        self.dec1 = DoubleConv(2 * w, w)
        self.out = nn.Conv2d(w, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1 = self.enc1(x)
        s2 = self.enc2(F.max_pool2d(s1, 2))
        s3 = self.enc3(F.max_pool2d(s2, 2))
        x = self.bottleneck(F.max_pool2d(s3, 2))
        x = self.dec3(torch.cat([self.up3(x), s3], 1))
        x = self.dec2(torch.cat([self.up2(x), s2], 1))
        x = self.dec1(torch.cat([self.up1(x), s1], 1))
        return self.out(x).permute(0, 2, 3, 1)


# ------------------------------------------------------------------------------------------ others


class RNNClassifier(nn.Module):
    """Embedding, a 2-layer LSTM, a GRU, classify from the GRU's last hidden state."""

    def __init__(self, vocab: int = 50, dim: int = 16, classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, dim, num_layers=2, batch_first=True)
        self.gru = nn.GRU(dim, dim, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(tokens))
        _, h = self.gru(out)
        return self.fc(self.norm(h[-1]))


class GraphConv(nn.Module):
    """Mean-aggregating message passing: messages ``lin(x)[src]`` summed into ``dst`` with
    ``index_add``, degrees counted with ``scatter_add``, plus a root term."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.message = nn.Linear(cin, cout)
        self.root = nn.Linear(cin, cout)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        src, dst = edge_index[0], edge_index[1]
        msg = self.message(x)[src]
        agg = torch.zeros(x.shape[0], msg.shape[1], dtype=x.dtype, device=x.device).index_add(0, dst, msg)
        ones = torch.ones_like(dst, dtype=x.dtype)
        deg = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device).scatter_add(0, dst, ones)
        return F.relu(agg / deg.clamp(min=1).unsqueeze(1) + self.root(x))


class GNN(nn.Module):
    """Node classification: (num_nodes, features) and (2, edges) -> (num_nodes, classes)."""

    def __init__(self, cin: int = 8, hidden: int = 16, classes: int = 3, depth: int = 4) -> None:
        super().__init__()
        self.layers = nn.ModuleList(GraphConv(cin if i == 0 else hidden, hidden) for i in range(depth))
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, edge_index)
        return self.fc(x)


def _graph(nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    edges = torch.randint(0, nodes, (2, 3 * nodes))
    return torch.randn(nodes, 8), edges


class KeywordDict(nn.Module):
    """Keyword-only inputs, an optional mask, functional dropout bound to ``self.training`` and a
    dict output: the calling conventions of many research codebases."""

    def __init__(self, dim: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(12, dim)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU()) for _ in range(4)
        )
        self.head = nn.Linear(dim, classes)

    def forward(
        self, *, features: torch.Tensor, mask: torch.Tensor | None = None, scale: float = 1.0
    ) -> dict:
        h = self.inp(features) * scale
        h = F.dropout(h, 0.1, training=self.training)
        for block in self.blocks:
            h = h + block(h)
        if mask is not None:
            h = h * mask.unsqueeze(-1)
        pooled = h.sum(1) / mask.sum(1, keepdim=True).clamp(min=1) if mask is not None else h.mean(1)
        return {"logits": self.head(pooled), "hidden": h}


class TiedLM(nn.Module):
    """A GPT whose output projection reuses the token embedding (tied weights), traced by fx:
    the embedding's parameter is read by the first and the last block."""

    def __init__(self, vocab: int = 37, dim: int = 32, depth: int = 4) -> None:
        super().__init__()
        self.body = GPT(vocab_size=vocab, block_size=16, dim=dim, depth=depth, heads=2)
        nn.init.normal_(self.body.tok_embed.weight, std=0.02)
        self.body.lm_head.weight = self.body.tok_embed.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.body(idx)


# ------------------------------------------------------------------------------------------ transformers


def _hf_vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=10,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return ViTForImageClassification(cfg)


def _hf_swin() -> nn.Module:
    from transformers import SwinConfig, SwinForImageClassification

    cfg = SwinConfig(
        image_size=16,
        patch_size=2,
        num_channels=3,
        embed_dim=16,
        depths=[2, 2],
        num_heads=[2, 4],
        window_size=4,
        mlp_ratio=2.0,
        num_labels=10,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0,
    )
    return SwinForImageClassification(cfg)


def _hf_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_layer=4,
        n_embd=32,
        n_head=2,
        vocab_size=61,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg)


def _hf_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        num_hidden_layers=4,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=61,
        max_position_embeddings=16,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(cfg)


def _hf_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(cfg)


def _hf_mistral() -> nn.Module:
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        sliding_window=8,
    )
    return MistralForCausalLM(cfg)


def _hf_t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=61,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
    )
    return T5ForConditionalGeneration(cfg)


# ------------------------------------------------------------------------------------------ the zoo


def _images(size: int, channels: int = 3) -> Callable[[int], tuple]:
    return lambda b: (torch.randn(b, channels, size, size),)


def _classes(n: int) -> Callable[[int], torch.Tensor]:
    return lambda b: _ints(n, b)


ENTRIES: dict[str, Entry] = {
    e.name: e
    for e in [
        # CNNs
        Entry(
            "resnet_basic",
            "cnn",
            _seeded(lambda: ResNet2d(3, 10, widths=(8, 16, 16, 32), blocks_per_stage=(2, 1, 1, 1))),
            _images(16),
            _classes(10),
        ),
        Entry(
            "resnet_bottleneck",
            "cnn",
            _seeded(
                lambda: ResNet2d(3, 10, widths=(4, 8, 8, 16), blocks_per_stage=(2, 1, 1, 1), bottleneck=True)
            ),
            _images(16),
            _classes(10),
        ),
        Entry("preact_resnet", "cnn", _seeded(PreActResNet), _images(16), _classes(10)),
        Entry("densenet", "cnn", _seeded(DenseNet), _images(16), _classes(10)),
        Entry("mobilenet_v2", "cnn", _seeded(lambda: MobileNet(v3=False)), _images(16), _classes(10)),
        Entry("mobilenet_v3", "cnn", _seeded(lambda: MobileNet(v3=True)), _images(16), _classes(10)),
        Entry("efficientnet", "cnn", _seeded(EfficientNet), _images(16), _classes(10)),
        Entry("inception", "cnn", _seeded(Inception), _images(16), _classes(10)),
        Entry("vgg", "cnn", _seeded(VGG), _images(16), _classes(10)),
        Entry(
            "unet",
            "cnn",
            _seeded(UNet),
            _images(16),
            lambda b: _ints(4, b, 16, 16),
            options={"max_frontier": 4},
            note="skips cross the cuts: max_frontier=4",
        ),
        # transformers
        Entry(
            "vit",
            "transformer",
            _seeded(
                lambda: ViT(
                    image_size=8, patch_size=2, in_channels=3, num_classes=10, dim=32, depth=4, heads=2
                )
            ),
            _images(8),
            _classes(10),
        ),
        Entry("hf_vit", "transformer", _seeded(_hf_vit), _images(8), _classes(10)),
        Entry("hf_swin", "transformer", _seeded(_hf_swin), _images(16), _classes(10)),
        Entry(
            "hf_gpt2",
            "transformer",
            _seeded(_hf_gpt2),
            lambda b: (_ints(61, b, 12),),
            lambda b: _ints(61, b, 12),
        ),
        Entry(
            "hf_bert",
            "transformer",
            _seeded(_hf_bert),
            lambda b: (_ints(61, b, 12),),
            _classes(3),
            kwargs=lambda b: {"attention_mask": torch.ones(b, 12, dtype=torch.long)},
        ),
        Entry(
            "hf_llama",
            "transformer",
            _seeded(_hf_llama),
            lambda b: (_ints(61, b, 12),),
            lambda b: _ints(61, b, 12),
        ),
        Entry(
            "hf_mistral",
            "transformer",
            _seeded(_hf_mistral),
            lambda b: (_ints(61, b, 12),),
            lambda b: _ints(61, b, 12),
        ),
        Entry(
            "hf_t5",
            "transformer",
            _seeded(_hf_t5),
            lambda b: (_ints(61, b, 10),),
            lambda b: _ints(61, b, 7),
            kwargs=lambda b: {"decoder_input_ids": _ints(61, b, 7)},
            options={"max_frontier": 2},
            note="the encoder output crosses every decoder cut: max_frontier=2",
        ),
        Entry(
            "tied_lm",
            "transformer",
            _seeded(TiedLM),
            lambda b: (_ints(37, b, 12),),
            lambda b: _ints(37, b, 12),
        ),
        # others
        Entry("rnn", "other", _seeded(RNNClassifier), lambda b: (_ints(50, b, 9),), _classes(5)),
        Entry("gnn", "other", _seeded(GNN), _graph, _classes(3)),
        Entry(
            "keyword_dict",
            "other",
            _seeded(KeywordDict),
            lambda b: (),
            _classes(4),
            kwargs=lambda b: {"features": torch.randn(b, 6, 12), "mask": (torch.rand(b, 6) > 0.2).long()},
        ),
    ]
}


# ------------------------------------------------------------------------------------------ reporting


def boundaries(lm) -> list[str]:
    """Each chosen cut as ``last module before | first module after``, shortened to the level where
    the two module paths part (``layer1 | layer2``, ``transformer.h.1 | transformer.h.2``)."""
    from localize.compiler.tracer import lmeta
    from localize.passes.find_cut_points import compute_nodes

    # positions number the compute nodes find_cut_points saw (later passes add flag/detach nodes)
    nodes = [n for n in compute_nodes(lm.plan.gm) if "position" in lmeta(n)]
    out = []
    for p in lm.plan.cut_positions:
        before = _module_of(nodes, p, -1, lmeta).split(".")
        after = _module_of(nodes, p + 1, 1, lmeta).split(".")
        common = 0
        while common < min(len(before), len(after)) and before[common] == after[common]:
            common += 1
        out.append(
            f"{'.'.join(before[: common + 1]) or '(forward)'} | {'.'.join(after[: common + 1]) or '(forward)'}"
        )
    return out


def _module_of(nodes, i: int, step: int, lmeta) -> str:
    """Module path of compute node ``i``, or of the nearest one in direction ``step`` that has one."""
    j = i
    while 0 <= j < len(nodes):
        path = lmeta(nodes[j]).get("module", "")
        if path:
            return path
        j += step
    return ""


def table(blocks: int = 4) -> str:
    """The README's architecture table (``python -m tests.zoo_models``)."""
    import localize

    rows = [
        "| architecture | family | capture | legal cuts (distinct frontiers) "
        "| K=4 cuts (last module before \\| first after) |",
        "|---|---|---|---|---|",
    ]
    for e in ENTRIES.values():
        model = e.build()
        lm = localize.transform(
            model, blocks=blocks, example_inputs=e.inputs(4), example_kwargs=e.kwargs(4) or None, **e.options
        )
        cuts = "; ".join(f"`{b}`" for b in boundaries(lm)).replace("|", "\\|")
        name = e.name + (f" ({e.note})" if e.note else "")
        legal = lm.plan.legal_cuts
        frontiers = len({c.activations for c in legal})  # cuts among no-grad ops (masks) share one
        rows.append(
            f"| {name} | {e.family} | {lm.plan.traced.method} | {len(legal)} ({frontiers}) | {cuts} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
