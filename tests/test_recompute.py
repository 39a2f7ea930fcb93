"""``recompute=True``: units recomputed in each block's backward give the same training, with fewer
saved activations. References: plain backprop (K=1) and the same K without recomputation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import localize
from localize.errors import ConfigError
from localize.runtime.memory import SavedActivationMeter
from localize.zoo import GPT, ResNet1d


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1)


def _gpt(depth: int = 4):
    torch.manual_seed(0)
    return GPT(vocab_size=11, block_size=32, dim=16, depth=depth, heads=2).double()


def _resnet():
    torch.manual_seed(0)
    return ResNet1d(1, 5, widths=(8, 16), blocks_per_stage=(2, 2)).double()


CASES = {
    "gpt": (_gpt, lambda: (torch.randint(0, 11, (3, 12)), torch.randint(0, 11, (3, 12)))),
    "resnet": (_resnet, lambda: (torch.randn(6, 1, 40, dtype=torch.float64), torch.randint(0, 5, (6,)))),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_k1_recompute_equals_backprop(name: str) -> None:
    make, data = CASES[name]
    model = make()
    ref = copy.deepcopy(model)
    x, y = data()
    lm = localize.transform(model, blocks=1, example_inputs=(x,), optimizer=_sgd, recompute=True)
    assert any(type(m).__name__ == "Recompute" for m in lm.recompute_programs[0].children())
    lm.train_step(x, y)
    out = ref(x)
    F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
    torch.optim.SGD(ref.parameters(), lr=0.1).step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_recompute_trains_like_the_same_blocks_without_it(name: str) -> None:
    """K=2 with heads: same losses and parameters as without recomputation (so isolation holds too)."""
    make, data = CASES[name]
    a, b = make(), make()
    x, y = data()
    torch.manual_seed(1)
    plain = localize.transform(a, blocks=2, example_inputs=(x,), optimizer=_sgd).double()
    torch.manual_seed(1)
    again = localize.transform(b, blocks=2, example_inputs=(x,), optimizer=_sgd, recompute=True).double()
    again.aux.load_state_dict(plain.aux.state_dict())
    for _ in range(2):
        assert again.train_step(x, y) == pytest.approx(plain.train_step(x, y), rel=1e-12)
    for p, q in zip(again.parameters(), plain.parameters()):
        assert torch.allclose(p, q, atol=1e-12, rtol=0)


def test_recompute_keeps_fewer_activations() -> None:
    """Two blocks of 4 layers: every run of each block but its last keeps only its input."""
    x, y = torch.randint(0, 11, (8, 32)), torch.randint(0, 11, (8, 32))
    peaks = []
    for recompute in (False, True):
        lm = localize.transform(_gpt(8).float(), blocks=2, example_inputs=(x,), recompute=recompute)
        if recompute:
            kinds = [type(m).__name__ for m in lm.recompute_programs[0].children()]
            assert kinds[0] == kinds[-1] == "GraphModule" and set(kinds[1:-1]) == {"Recompute"}, kinds
            assert len(kinds) - 2 in (3, 7), kinds  # whole layers, or each cut between attention and MLP
        with SavedActivationMeter(lm.parameters()) as meter:
            lm.train_step(x, y)
        peaks.append(meter.peak_bytes)
    assert peaks[1] < 0.6 * peaks[0], peaks


def test_few_units_per_block_are_recomputed_in_halves(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two layers per block: each pre-norm layer is recomputed as two runs (attention, then MLP; one
    activation crosses between them), which keeps fewer activations than whole layers do (the
    reference: the same blocks with the runs forced to whole layers). Training is unchanged."""
    from localize.compiler import transform

    x, y = torch.randint(0, 11, (8, 32)), torch.randint(0, 11, (8, 32))
    peaks, params = [], []
    for whole in (True, False):
        if whole:
            monkeypatch.setattr(transform, "choose_runs", lambda coarse, fine, nodes: coarse)
        else:
            monkeypatch.undo()
        lm = localize.transform(_gpt(4).float(), blocks=2, example_inputs=(x,), optimizer=_sgd, recompute=True)
        kinds = [type(m).__name__ for m in lm.recompute_programs[0].children()]
        want = ["Recompute"] if whole else ["Recompute"] * 3  # the block's last run is not recomputed
        assert kinds == ["GraphModule", *want, "GraphModule"], kinds
        with SavedActivationMeter(lm.parameters()) as meter:
            lm.train_step(x, y)
        peaks.append(meter.peak_bytes)
        params.append([p.detach().clone() for p in lm.parameters()])
    assert peaks[1] < 0.92 * peaks[0], peaks  # 0.88 (deterministic bytes)
    for p, q in zip(*params):
        assert torch.allclose(p, q, atol=1e-6, rtol=0)


def test_recompute_options_are_checked() -> None:
    x = torch.randint(0, 11, (2, 8))
    with pytest.raises(ConfigError, match="recompute must be True or False"):
        localize.transform(_gpt(), blocks=2, example_inputs=(x,), recompute="yes")
    with pytest.raises(ConfigError, match="choose one"):
        localize.transform(_gpt(), blocks=2, example_inputs=(x,), recompute=True, chunk_size=4)
    with pytest.raises(ConfigError, match="needs example_inputs"):
        localize.transform(_gpt(), blocks=2, recompute=True)


def test_recompute_doctests() -> None:
    import doctest

    from localize.passes import recompute_units

    result = doctest.testmod(recompute_units)
    assert result.failed == 0 and result.attempted > 0
