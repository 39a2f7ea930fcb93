"""Imported by the ranks' fork server (``ranks._server``): build and split a small pipeline once, so
that each forked rank finds torch.fx, the passes and the step program's code paths warm. No backward
pass runs here: a child forked after one could not run autograd (torch >= 2.14, after FakeTensorMode)."""

from __future__ import annotations

import torch

import localize
from localize.distributed.stages import split_step
from localize.zoo import GPT, MLP

_mlp = localize.transform(MLP(16, 32, 4, 5), blocks=2, example_inputs=(torch.randn(4, 16),))
split_step(_mlp, replicas=2)
_gpt = localize.transform(
    GPT(vocab_size=16, block_size=16, dim=16, depth=2, heads=2), blocks=2,
    example_inputs=(torch.randint(0, 16, (2, 16)),), chunk_size=4,
)
split_step(_gpt)
del _mlp, _gpt
