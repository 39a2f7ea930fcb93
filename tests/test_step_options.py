"""Options of the training step, each a node of the step graph: gradient clipping.

The reference is torch's own ``clip_grad_norm_`` applied to the gradients an unclipped run computes
from the same weights and batch.
"""

from __future__ import annotations

import math

import pytest
import torch

import localize
from localize.errors import ConfigError
from localize.runtime.ops import StepState, run_step


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)
    )


class _Recording(torch.optim.SGD):
    """SGD with lr 0 that keeps the gradients it was handed at each step (the step then frees them)."""

    def __init__(self, params):
        super().__init__(params, lr=0.0)
        self.seen: list[torch.Tensor] = []

    def step(self, closure=None):
        self.seen = [p.grad.clone() for g in self.param_groups for p in g["params"]]
        return super().step(closure)


def _block_grads(lm) -> list[list[torch.Tensor]]:
    return [b.optimizer.seen for b in lm.blocks]


def test_each_block_clips_its_own_gradient_norm_like_clip_grad_norm():
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    plain = localize.transform(_mlp(), blocks=2, example_inputs=(x,), optimizer=_Recording)
    clipped = localize.transform(_mlp(), blocks=2, example_inputs=(x,), optimizer=_Recording, clip_grad_norm=0.05)
    plain.train_step(x, y)
    clipped.train_step(x, y)
    for want, got in zip(_block_grads(plain), _block_grads(clipped)):
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in want]
        for p, g in zip(params, want):
            p.grad = g.clone()
        before = torch.nn.utils.clip_grad_norm_(params, 0.05)
        assert float(before) > 0.05  # the unclipped norm was over the limit: clipping mattered
        for p, g in zip(params, got):
            torch.testing.assert_close(g, p.grad, rtol=1e-6, atol=1e-8)
        total = math.sqrt(sum(float(g.pow(2).sum()) for g in got))
        assert total <= 0.05 * (1 + 1e-5)
    assert "clip_gradients(state, 0, checked_0, 0.05)" in clipped.step_program.code


def test_clip_grad_norm_is_checked():
    with pytest.raises(ConfigError, match=r"clip_grad_norm must be a number > 0"):
        localize.transform(_mlp(), blocks=2, example_inputs=(torch.randn(2, 6),), clip_grad_norm=0)


def test_clipping_is_the_same_in_process_and_in_program(tmp_path):
    from program_helpers import write_program

    x = torch.randn(8, 6)
    lm = localize.transform(_mlp(), blocks=3, example_inputs=(x,), optimizer="sgd", clip_grad_norm=0.1)
    program = write_program(lm, (x,), tmp_path / "out", "sgd")
    step = program.build().train()
    state = StepState(lm.loss_fn, program.make_optimizers(step))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 6, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(3)]
    got = [run_step(step, state, [x], y) for x, y in batches]
    assert got == [lm.train_step(x, y) for x, y in batches]


def test_the_step_graph_is_kept_with_the_other_stages_and_printed_under_localize_debug(monkeypatch, capsys):
    monkeypatch.setenv("LOCALIZE_DEBUG", "1")
    lm = localize.transform(_mlp(), blocks=2, example_inputs=(torch.randn(2, 6),))
    assert lm.plan.graphs["build_step_graph"] == lm.step_program.code
    assert "# ---- after build_step_graph ----" in capsys.readouterr().out
