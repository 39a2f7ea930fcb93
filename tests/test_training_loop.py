"""The training-loop options of the step: accumulation, autocast, learning-rate schedules.

Each is checked against an independent reference: accumulation against one step on the concatenated
batch, bf16 autocast against the dtypes torch's dispatcher sees, schedules against the closed-form
rate of torch's scheduler, and resumption against an uninterrupted run. Every option also gives the
same losses and parameters in process and in ``program.py`` (the 2-rank pipeline is checked in
``test_distributed.py``).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import localize
from localize.errors import ConfigError
from localize.runtime.ops import StepState, make_scalers, make_schedulers, run_step
from localize.runtime.schedulers import LRSchedule, lr_schedule


def _mlp(seed: int = 0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)
    )


def _batches(n: int, size: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 6, generator=g), torch.randint(0, 4, (size,), generator=g)) for _ in range(n)]


def _state(lm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lm.state_dict().items()}


# ----------------------------------------------------------------------------------------- accumulation


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_accumulated_micro_batches_equal_one_step_on_their_concatenation(optimizer):
    batches = _batches(6)
    acc = localize.transform(_mlp(), blocks=3, example_inputs=(batches[0][0],), optimizer=optimizer, accumulate=3)
    ref = localize.transform(_mlp(), blocks=3, example_inputs=(batches[0][0],), optimizer=optimizer)
    before = _state(acc)
    for i, (x, y) in enumerate(batches):
        acc.train_step(x, y)
        if i == 0:  # between updates the parameters stay put
            assert all(torch.equal(before[k], v) for k, v in acc.state_dict().items())
        assert acc.pending == (i + 1) % 3
    for cycle in (batches[:3], batches[3:]):
        ref.train_step(torch.cat([x for x, _ in cycle]), torch.cat([y for _, y in cycle]))
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(acc.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.equal(before[k], v) for k, v in acc.state_dict().items())
    assert "backward(state, 0, loss_0, accumulate = 3)" in acc.step_program.code


def test_accumulate_is_checked():
    for bad in (0, 1.5, True):
        with pytest.raises(ConfigError, match="accumulate must be an int >= 1"):
            localize.transform(_mlp(), blocks=2, example_inputs=(torch.randn(2, 6),), accumulate=bad)


# ----------------------------------------------------------------------------------------- autocast


class _MatmulDtypes(TorchDispatchMode):
    """The input dtypes of every matmul torch dispatches (the reference for what autocast did)."""

    def __init__(self):
        super().__init__()
        self.seen: list[torch.dtype] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.seen.append(args[-1].dtype)
        return func(*args, **(kwargs or {}))


def test_bf16_autocast_runs_the_matmuls_in_bf16_and_keeps_fp32_master_weights():
    (x, y), = _batches(1)
    lm = localize.transform(_mlp(), blocks=2, example_inputs=(x,), aux="linear", autocast="bf16")
    with _MatmulDtypes() as mode:
        lm.train_step(x, y)
    assert mode.seen and set(mode.seen) == {torch.bfloat16}  # forward and backward of blocks and heads
    assert all(p.dtype == torch.float32 for p in lm.parameters())
    for opt in lm.optimizers:
        for state in opt.state.values():
            assert state["exp_avg"].dtype == torch.float32
    with _MatmulDtypes() as mode:
        lm(x)  # inference is the original model, untouched
    assert set(mode.seen) == {torch.float32}
    assert lm.scalers == [None, None]
    assert "autocast_enter(state, 0, 'bf16')" in lm.step_program.code


def test_fp16_autocast_scales_each_block_with_its_own_grad_scaler():
    (x, y), = _batches(1)
    lm = localize.transform(_mlp(), blocks=2, example_inputs=(x,), autocast="fp16", optimizer="sgd")
    before = _state(lm)
    lm.train_step(x, y)
    scalers = lm.scalers
    assert len(scalers) == 2 and all(isinstance(s, torch.amp.GradScaler) for s in scalers)
    assert scalers[0] is not scalers[1]
    assert all(s.get_scale() == 65536.0 for s in scalers)  # the default scale, not yet grown or cut
    # the update used the unscaled gradient: a step of lr * grad, not 65536 times that
    change = max(float((lm.state_dict()[k] - v).abs().max()) for k, v in before.items())
    assert 0 < change < 1.0
    assert all(p.dtype == torch.float32 for p in lm.parameters())


def test_autocast_is_checked():
    with pytest.raises(ConfigError, match="autocast='fp8'"):
        localize.transform(_mlp(), blocks=2, example_inputs=(torch.randn(2, 6),), autocast="fp8")


# ----------------------------------------------------------------------------------------- schedules


def test_schedulers_reach_torchs_learning_rate_after_the_same_updates():
    batches = _batches(14)
    factory = lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)  # noqa: E731
    lm = localize.transform(
        _mlp(), blocks=3, example_inputs=(batches[0][0],), optimizer="sgd", lr=0.1, scheduler=factory, accumulate=2
    )
    for x, y in batches:
        lm.train_step(x, y)
    want = 0.1 * (1 + math.cos(math.pi * 7 / 10)) / 2  # 14 calls / accumulate 2 = 7 updates
    assert len(lm.schedulers) == 3
    for scheduler, optimizer in zip(lm.schedulers, lm.optimizers):
        assert scheduler.optimizer is optimizer
        assert scheduler.last_epoch == 7
        assert optimizer.param_groups[0]["lr"] == pytest.approx(want, rel=1e-12)


def test_the_command_line_schedules_match_their_closed_forms():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = LRSchedule("cosine", total=12, warmup=3)(opt)
    rates = []
    for _ in range(12):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    warm = [1 / 3 + (1 - 1 / 3) * t / 3 for t in range(3)]
    cosine = [(1 + math.cos(math.pi * t / 9)) / 2 for t in range(9)]
    assert rates == pytest.approx(warm + cosine, abs=1e-12)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = LRSchedule("step", total=8)(opt)
    rates = []
    for _ in range(8):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])
    assert lr_schedule("none", 10) is None


def test_a_bad_scheduler_factory_is_reported():
    x = torch.randn(2, 6)
    with pytest.raises(ConfigError, match="scheduler must be a factory"):
        localize.transform(_mlp(), blocks=2, example_inputs=(x,), scheduler="cosine")
    lm = localize.transform(_mlp(), blocks=2, example_inputs=(x,), scheduler=lambda opt: 3)
    with pytest.raises(ConfigError, match="must return a torch.optim.lr_scheduler.LRScheduler"):
        lm.optimizers  # noqa: B018 - made on first use
    with pytest.raises(ConfigError, match="a cosine schedule over 3 updates"):
        LRSchedule("cosine", total=3, warmup=3)


@pytest.mark.parametrize("stop", [5, 6])  # mid-cycle (gradients pending) and at an update
def test_schedulers_scalers_and_pending_gradients_resume_exactly(tmp_path, stop):
    batches = _batches(10)
    options = dict(optimizer="sgd", lr=0.1, accumulate=2, autocast="fp16", scheduler=LRSchedule("cosine", 5, 1))

    def build():
        return localize.transform(_mlp(), blocks=2, example_inputs=(batches[0][0],), **options)

    whole = build()
    for x, y in batches:
        whole.train_step(x, y)
    first = build()
    for x, y in batches[:stop]:
        first.train_step(x, y)
    first.save(str(tmp_path / "c.pt"))
    resumed = build()
    ckpt = localize.load(str(tmp_path / "c.pt"), into=resumed)
    assert ckpt.pending == stop % 2 and len(ckpt.schedulers) == 2 and ckpt.scalers[0]["scale"] == 65536.0
    for x, y in batches[stop:]:
        resumed.train_step(x, y)
    for k, v in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    assert [s.get_last_lr() for s in resumed.schedulers] == [s.get_last_lr() for s in whole.schedulers]


# ----------------------------------------------------------------------------------------- one program


def test_every_option_gives_the_same_run_in_process_and_in_program(tmp_path):
    from program_helpers import write_program

    batches = _batches(5)
    x = batches[0][0]
    lm = localize.transform(
        _mlp(),
        blocks=3,
        example_inputs=(x,),
        optimizer="sgd",
        clip_grad_norm=0.5,
        accumulate=2,
        autocast="bf16",
        scheduler=LRSchedule("cosine", total=3, warmup=1),
    )
    program = write_program(lm, (x,), tmp_path / "out", "sgd")
    assert program.SCHEDULE == LRSchedule("cosine", total=3, warmup=1) and program.AUTOCAST == "bf16"
    step = program.build().train()
    optimizers = program.make_optimizers(step)
    state = StepState(
        lm.loss_fn,
        optimizers,
        schedulers=make_schedulers(optimizers, program.SCHEDULE),
        scalers=make_scalers(optimizers, program.AUTOCAST),
    )
    got = [run_step(step, state, [x], y) for x, y in batches]
    assert got == [lm.train_step(x, y) for x, y in batches]
    trained = dict(step.named_parameters())
    for b in lm.blocks:
        for name, p in b.module.named_parameters():
            assert torch.equal(trained[f"block_{b.index}.{name}"], p), name


def test_lm_optimizers_need_shapes_first():
    lm = localize.transform(_mlp(), blocks=2)  # no example inputs: heads come with the first call
    with pytest.raises(localize.LocalizeError, match="made once shapes are known"):
        lm.optimizers  # noqa: B018
    lm.train_step(torch.randn(4, 6), torch.randint(0, 4, (4,)))
    assert all(isinstance(o, torch.optim.Optimizer) for o in lm.optimizers)


def test_runtime_doctests():
    import doctest

    import localize.runtime.ops
    import localize.runtime.schedulers

    for module in (localize.runtime.ops, localize.runtime.schedulers):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, module.__name__
