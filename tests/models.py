"""The model families the spine is accepted on: builders of (model, inputs, target) per name.

Every entry builds a fresh, seeded model so tests can train it. ``inputs(batch)`` gives positional
inputs (a tuple); targets fit the default loss (class indices over the output's last dim).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from localize.zoo import GPT, MLP, ResNet1d, ResNet2d, ViT


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int], tuple]
    target: Callable[[int], torch.Tensor]
    kwargs: Callable[[int], dict] = lambda b: {}


def _hf_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_layer=4, n_embd=32, n_head=2, vocab_size=61, n_positions=16,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg)


def _hf_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        num_hidden_layers=4, hidden_size=32, num_attention_heads=2, intermediate_size=64,
        vocab_size=61, max_position_embeddings=16, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(cfg)


def _seeded(fn: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return fn()

    return build


def _ints(high: int, *shape: int) -> torch.Tensor:
    return torch.randint(0, high, shape)


CASES: dict[str, Case] = {
    c.name: c
    for c in [
        Case("mlp", _seeded(lambda: MLP(16, 32, 4, 5)), lambda b: (torch.randn(b, 16),), lambda b: _ints(5, b)),
        Case(
            "resnet2d",
            _seeded(lambda: ResNet2d(3, 10, widths=(8, 16, 32, 64), blocks_per_stage=(1, 1, 1, 1))),
            lambda b: (torch.randn(b, 3, 16, 16),),
            lambda b: _ints(10, b),
        ),
        Case(
            "resnet1d",
            _seeded(lambda: ResNet1d(1, 10, widths=(8, 16, 32), blocks_per_stage=(2, 1, 1))),
            lambda b: (torch.randn(b, 1, 40),),
            lambda b: _ints(10, b),
        ),
        Case(
            "vit",
            _seeded(lambda: ViT(image_size=8, patch_size=2, in_channels=1, num_classes=10, dim=32, depth=4, heads=2)),
            lambda b: (torch.randn(b, 1, 8, 8),),
            lambda b: _ints(10, b),
        ),
        Case(
            "gpt",
            _seeded(lambda: GPT(vocab_size=37, block_size=16, dim=32, depth=4, heads=2)),
            lambda b: (_ints(37, b, 12),),
            lambda b: _ints(37, b, 12),
        ),
        Case("hf_gpt2", _seeded(_hf_gpt2), lambda b: (_ints(61, b, 12),), lambda b: _ints(61, b, 12)),
        Case(
            "hf_bert",
            _seeded(_hf_bert),
            lambda b: (_ints(61, b, 12),),
            lambda b: _ints(3, b),
            lambda b: {"attention_mask": torch.ones(b, 12, dtype=torch.long)},
        ),
    ]
}


class BlockOutputs(fx.Interpreter):
    """Runs a LocalModel's program with autograd on, keeping each block's outputs by block index."""

    def __init__(self, program: fx.GraphModule) -> None:
        super().__init__(program)
        self.outputs: dict[int, object] = {}

    def call_module(self, target, args, kwargs):
        out = super().call_module(target, args, kwargs)
        self.outputs[int(target.rsplit("_", 1)[1])] = out  # split_module names blocks submod_<i>
        return out
