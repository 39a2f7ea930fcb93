"""``localize.diagnose``: per-block gradient cosine with backprop, local vs final loss, linear probe.

References: at K=1 the local gradient *is* the backprop gradient (cosine 1), and so is the last
block's at any K (its loss is the model's); the final loss equals the model's own loss computed
directly; the probe beats chance on a learnable task and sits near it on random labels; nothing
the caller owns changes (parameters, gradients, batch-norm statistics, random state).
"""

from __future__ import annotations

import pytest
import torch

import localize
from localize.zoo import GPT


def _mlp(seed: int = 0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 64), torch.nn.BatchNorm1d(64), torch.nn.ReLU(), torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3),
    )


def _data(n: int = 400):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def test_cosine_is_one_at_k1_and_for_the_last_block():
    x, y = _data()
    one = localize.diagnose(localize.transform(_mlp(), blocks=1, example_inputs=(x[:2],)), x, y)
    assert one.blocks[0].cosine == pytest.approx(1.0, abs=1e-6)
    assert one.blocks[0].local_loss == pytest.approx(one.final_loss, rel=1e-6)
    three = localize.diagnose(localize.transform(_mlp(), blocks=3, example_inputs=(x[:2],)), x, y)
    assert three.blocks[-1].cosine == pytest.approx(1.0, abs=1e-6)
    assert all(-1 <= b.cosine < 0.999 for b in three.blocks[:-1])  # aux losses differ from backprop's
    model = _mlp()
    torch.manual_seed(0)  # diagnose seeds dropout with 0
    assert three.final_loss == pytest.approx(float(torch.nn.functional.cross_entropy(model(x), y).detach()), rel=1e-6)


def test_the_probe_beats_chance_on_a_learnable_task_and_not_on_noise():
    x, y = _data()
    lm = localize.transform(_mlp(), blocks=3, example_inputs=(x[:2],))
    report = localize.diagnose(lm, x, y)
    # the hidden blocks' 64 random ReLU features separate the classes; the untrained logits (3) do not
    assert all(b.probe_accuracy > report.chance + 0.2 for b in report.blocks[:-1]), str(report)
    noise = torch.randint(0, 3, y.shape, generator=torch.Generator().manual_seed(5))
    report = localize.diagnose(lm, x, noise)
    assert all(b.probe_accuracy < report.chance + 0.15 for b in report.blocks), str(report)
    assert "grad cosine" in str(report) and "probe chance" in str(report)


def test_nothing_the_caller_owns_changes():
    x, y = _data()
    lm = localize.transform(_mlp(), blocks=3, example_inputs=(x[:2],))
    lm.train()
    lm.train_step(x[:32], y[:32])  # optimizers, gradients and statistics exist
    state = {k: v.clone() for k, v in lm.state_dict().items()}
    grads = {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}
    rng = torch.get_rng_state()
    localize.diagnose(lm, x, y)
    assert all(torch.equal(v, lm.state_dict()[k]) for k, v in state.items())
    assert all(torch.equal(g, dict(lm.named_parameters())[n].grad) for n, g in grads.items())
    assert torch.equal(rng, torch.get_rng_state())


def test_per_position_targets_of_a_language_model():
    torch.manual_seed(0)
    net = GPT(vocab_size=20, block_size=16, dim=32, depth=4)
    x = torch.randint(0, 20, (64, 16))
    y = x.clone()  # predict the current token: learnable by a linear probe of any block
    lm = localize.transform(net, blocks=4, example_inputs=(x[:2],))
    report = localize.diagnose(lm, x, y)
    assert len(report.blocks) == 4 and report.blocks[-1].cosine == pytest.approx(1.0, abs=1e-5)
    assert report.blocks[0].probe_accuracy > 0.9 > report.chance


def test_the_cli_prints_the_diagnosis(tmp_path, capsys):
    from test_cli import TINY

    from localize.cli.main import main

    path = tmp_path / "tiny.py"
    path.write_text(TINY)
    code = main([str(path), "--blocks", "2", "--out", str(tmp_path / "o"), "--no-onnx", "--diagnose"])
    out = capsys.readouterr().out
    assert code == 0
    assert "grad cosine" in out and "final loss (end to end)" in out
