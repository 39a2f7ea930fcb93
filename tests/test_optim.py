"""localize.runtime.optim SGD / AdamW against torch.optim: trajectories, state_dict interchange, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import localize.kernels as K
import localize.runtime.optim as O
from localize.errors import LocalizeError
from localize.kernels._backend import INTERPRETER

BACKENDS = [
    pytest.param(
        "triton-interpret",
        marks=pytest.mark.skipif(not INTERPRETER, reason="needs triton and TRITON_INTERPRET=1 at import"),
    ),
    "torch",
]

SGD_CONFIGS = [
    dict(lr=0.05),
    dict(lr=0.05, weight_decay=1e-2),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, nesterov=True),
    dict(lr=0.05, momentum=0.9, weight_decay=1e-2, nesterov=True),
]
ADAMW_CONFIGS = [
    dict(),
    dict(lr=1e-2, weight_decay=0.0),
    dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1),
]


class _Net(nn.Module):
    """Mixed shapes: a 3-D weight, matrices, vectors and a one-element scale (tiny, so fast on CPU)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Parameter(torch.randn(6, 3, 5) * 0.3)
        self.fc1 = nn.Linear(15, 17)
        self.fc2 = nn.Linear(17, 1)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        h = torch.tanh(x @ self.proj.flatten(1))
        return self.fc2(torch.tanh(self.fc1(h))) * self.scale


def _data(steps=20):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=g), torch.randn(8, 1, generator=g)) for _ in range(steps)]


def _train(model, opt, data, *, skip=None):
    """Run one step per batch; ``skip(i)`` names params whose grad is dropped at step i."""
    for i, (x, y) in enumerate(data):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        for name, p in model.named_parameters():
            if skip is not None and name in skip(i):
                p.grad = None
        opt.step()


def _assert_same_params(a, b, atol=1e-6):
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=atol, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", SGD_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_sgd_trajectory_matches_torch(backend, config):
    ours, ref = _Net(), _Net()
    ref.load_state_dict(ours.state_dict())
    data = _data()
    with K.use_backend(backend):
        _train(ours, O.SGD(ours.parameters(), **config), data)
    _train(ref, torch.optim.SGD(ref.parameters(), **config), data)
    _assert_same_params(ours, ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "config", ADAMW_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "defaults"
)
def test_adamw_trajectory_matches_torch(backend, config):
    ours, ref = _Net(), _Net()
    ref.load_state_dict(ours.state_dict())
    data = _data()
    with K.use_backend(backend):
        _train(ours, O.AdamW(ours.parameters(), **config), data)
    _train(ref, torch.optim.AdamW(ref.parameters(), **config), data)
    _assert_same_params(ours, ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_params_without_grads_keep_their_own_step_count(backend, name):
    def skip(i):  # fc2 misses every third step, proj the first five: step counts diverge
        return ({"fc2.weight", "fc2.bias"} if i % 3 == 0 else set()) | ({"proj"} if i < 5 else set())

    ours, ref = _Net(), _Net()
    ref.load_state_dict(ours.state_dict())
    data = _data(12)
    make = {
        "sgd": (O.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
        "adamw": (O.AdamW, torch.optim.AdamW, {}),
    }
    ours_cls, ref_cls, config = make[name]
    with K.use_backend(backend):
        _train(ours, ours_cls(ours.parameters(), **config), data, skip=skip)
    _train(ref, ref_cls(ref.parameters(), **config), data, skip=skip)
    _assert_same_params(ours, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_groups_with_their_own_settings(backend):
    ours, ref = _Net(), _Net()
    ref.load_state_dict(ours.state_dict())

    def groups(m):
        return [
            {"params": [m.proj], "lr": 0.01, "weight_decay": 0.0},
            {"params": [*m.fc1.parameters(), *m.fc2.parameters(), m.scale]},
        ]

    data = _data(10)
    with K.use_backend(backend):
        _train(ours, O.AdamW(groups(ours), lr=3e-3, weight_decay=0.05), data)
    _train(ref, torch.optim.AdamW(groups(ref), lr=3e-3, weight_decay=0.05), data)
    _assert_same_params(ours, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_in_one_group(backend):
    params = [nn.Parameter(torch.randn(40)), nn.Parameter(torch.randn(7, 3).bfloat16())]
    ref = [nn.Parameter(p.detach().clone()) for p in params]
    opt_ours, opt_ref = O.SGD(params, lr=0.1, momentum=0.9), torch.optim.SGD(ref, lr=0.1, momentum=0.9)
    for _ in range(3):
        for p, r in zip(params, ref):
            p.grad = torch.ones_like(p)
            r.grad = torch.ones_like(r)
        with K.use_backend(backend):
            opt_ours.step()
        opt_ref.step()
    for p, r in zip(params, ref):
        assert p.dtype == r.dtype
        torch.testing.assert_close(p, r, atol=1e-2, rtol=1e-2)


def test_closure_loss_is_returned():
    w = nn.Parameter(torch.ones(3))
    opt = O.SGD([w], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 3.0
    torch.testing.assert_close(w.detach(), torch.full((3,), 0.8))


# --- state_dict interchange with torch ----------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "ours_cls, torch_cls, config, keys",
    [
        (O.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True), {"momentum_buffer"}),
        (O.AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05), {"step", "exp_avg", "exp_avg_sq"}),
    ],
    ids=["sgd", "adamw"],
)
def test_state_dict_round_trip_with_torch(backend, ours_cls, torch_cls, config, keys):
    data = _data(9)
    base = _Net()
    # ours for 3 steps -> torch for 3 -> ours for 3, against torch for all 9
    model = copy.deepcopy(base)
    ours = ours_cls(model.parameters(), **config)
    with K.use_backend(backend):
        _train(model, ours, data[:3])
    sd = ours.state_dict()
    assert all(set(s) == keys for s in sd["state"].values())
    theirs = torch_cls(model.parameters(), **config)
    theirs.load_state_dict(sd)
    _train(model, theirs, data[3:6])
    ours_again = ours_cls(model.parameters(), **config)
    ours_again.load_state_dict(theirs.state_dict())
    with K.use_backend(backend):
        _train(model, ours_again, data[6:])

    ref = copy.deepcopy(base)
    ref_opt = torch_cls(ref.parameters(), **config)
    _train(ref, ref_opt, data)
    _assert_same_params(model, ref)
    ref_sd, our_sd = ref_opt.state_dict(), ours_again.state_dict()
    assert ref_sd["param_groups"][0].keys() == our_sd["param_groups"][0].keys()
    for i, state in ref_sd["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(our_sd["state"][i][key], value, atol=1e-6, rtol=1e-5)


def test_adamw_loads_a_fused_torch_state_with_device_steps():
    model = _Net()
    theirs = torch.optim.AdamW(model.parameters(), fused=True)
    _train(model, theirs, _data(2))
    ours = O.AdamW(model.parameters())
    ours.load_state_dict(theirs.state_dict())
    step = next(iter(ours.state.values()))["step"]
    assert step.device.type == "cpu" and step.item() == 2
    _train(model, ours, _data(1))


def test_loading_unsupported_torch_settings_is_rejected():
    model = _Net()
    sd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.5).state_dict()
    with pytest.raises(
        LocalizeError, match=r"localize.runtime.optim.SGD does not support dampening=0.5 .* torch.optim.SGD"
    ):
        O.SGD(model.parameters(), lr=0.1, momentum=0.9).load_state_dict(sd)
    sd = torch.optim.AdamW(model.parameters(), amsgrad=True).state_dict()
    with pytest.raises(LocalizeError, match=r"localize.runtime.optim.AdamW does not support amsgrad=True"):
        O.AdamW(model.parameters()).load_state_dict(sd)


# --- construction and errors --------------------------------------------------------------------


def test_build_optimizer_defaults_and_overrides():
    params = list(_Net().parameters())
    sgd = O.build_optimizer("sgd", params)
    assert isinstance(sgd, O.SGD) and sgd.defaults["lr"] == 0.05 and sgd.defaults["momentum"] == 0.9
    adamw = O.build_optimizer("AdamW", params, lr=3e-4, weight_decay=0.0)
    assert (
        isinstance(adamw, O.AdamW) and adamw.defaults["lr"] == 3e-4 and adamw.defaults["weight_decay"] == 0.0
    )
    assert O.build_optimizer("sgd", params, momentum=0.0).defaults["momentum"] == 0.0


def test_build_optimizer_errors():
    params = list(_Net().parameters())
    with pytest.raises(LocalizeError, match=r"unknown optimizer 'adam'; valid names: 'sgd', 'adamw'"):
        O.build_optimizer("adam", params)
    with pytest.raises(
        LocalizeError, match=r"unknown option\(s\) amsgrad; valid options: lr, betas, eps, weight_decay"
    ):
        O.build_optimizer("adamw", params, amsgrad=True)


def test_constructor_errors():
    params = list(_Net().parameters())
    with pytest.raises(LocalizeError, match="SGD: nesterov=True needs momentum > 0"):
        O.SGD(params, nesterov=True)
    with pytest.raises(LocalizeError, match=r"SGD: lr, momentum and weight_decay must be >= 0, got lr=-1"):
        O.SGD(params, lr=-1)
    with pytest.raises(
        LocalizeError, match=r"AdamW: betas must be two numbers in \[0, 1\), got \(0.9, 1.0\)"
    ):
        O.AdamW(params, betas=(0.9, 1.0))


def test_sparse_gradients_are_rejected():
    emb = nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(LocalizeError, match="sparse gradient .* use a dense embedding"):
        O.AdamW(emb.parameters()).step()


def test_optimizers_are_torch_optimizers():
    params = list(_Net().parameters())
    for opt in (O.SGD(params), O.AdamW(params)):
        assert isinstance(opt, torch.optim.Optimizer)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        opt.step()
        sched.step()
        assert opt.param_groups[0]["lr"] == opt.defaults["lr"] * 0.5
