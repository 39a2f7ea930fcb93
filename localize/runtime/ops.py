"""The runtime ops of the training step: what the step graph calls besides blocks and heads.

The step graph (:mod:`localize.passes.build_step_graph`) is plain fx: ``call_module`` nodes run the
blocks and heads, ``detach`` nodes cut the gradient, and these functions do the rest. Every back end
runs the code fx writes for that graph, so each op below exists once:

* :func:`local_loss` / :func:`head_loss`: a block's loss (the transform's ``loss_fn`` on a
  prediction, or a head's own ``local_loss``);
* :func:`backward`: zero the block's gradients and backpropagate inside it; returns the loss value;
* :func:`check_loss`: the non-finite policy (``on_nan="raise"`` or ``"skip"``);
* :func:`clip_gradients`: with ``clip_grad_norm=c``, the norm of the block's gradient (its
  parameters and its head's) is clipped to ``c`` before its update;
* :func:`optimizer_step` and :func:`after_update`: the block's update, then its head's hook (e.g.
  MAN's EMA), both skipped for a non-finite loss;
* :func:`scheduler_step`: with ``scheduler=``, the block's learning-rate scheduler after its update;
* :func:`release_gradients`: the block's gradients are freed once its update has used them;
* :func:`autocast_enter` / :func:`autocast_exit`: with ``autocast="bf16"|"fp16"``, a block's forward
  and its loss run under ``torch.autocast`` (backward and the update do not).

With ``accumulate=N`` the ops that touch gradients take ``accumulate=N``: :func:`backward` scales the
loss by 1/N and zeroes the gradients only at the first call of a cycle, and the update ops act only at
its N-th call (:func:`update_due`). A cycle's position is ``state.pending`` (calls since the last
update), which :func:`run_step` advances. With fp16 a block's ``GradScaler`` (``state.scalers``)
scales its loss, unscales before clipping and steps its optimizer.

Each op takes the :class:`StepState` first and returns the loss value it was given, so the data
flow of one block reads ``loss -> backward -> check_loss -> optimizer_step -> after_update``.

Example:
    >>> import torch
    >>> from localize.runtime.ops import StepState, backward, check_loss, optimizer_step
    >>> w = torch.nn.Parameter(torch.ones(2))
    >>> state = StepState(loss_fn=None, optimizers=[torch.optim.SGD([w], lr=0.5)])
    >>> value = optimizer_step(state, 0, check_loss(state, 0, backward(state, 0, (w * w).sum())))
    >>> value, w.data
    (2.0, tensor([0., 0.]))
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from localize.errors import ConfigError, LocalizeError, TargetError
from localize.runtime.loss import LossFn

__all__ = [
    "LossContext",
    "NonFiniteLossError",
    "StepState",
    "AUTOCAST_DTYPES",
    "after_update",
    "autocast_enter",
    "autocast_exit",
    "backward",
    "begin_step",
    "check_loss",
    "clip_gradients",
    "end_step",
    "head_loss",
    "local_loss",
    "make_scalers",
    "make_schedulers",
    "optimizer_step",
    "release_gradients",
    "run_step",
    "scheduler_step",
    "start_backward",
    "update_due",
    "updating",
]

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(LocalizeError):
    """A local loss became NaN or infinite (``on_nan="raise"``)."""


@dataclass
class LossContext:
    """What a head with its own ``local_loss`` may read besides its feature and the target."""

    block: int
    inputs: list[Any]  # the model's inputs of this step, in placeholder order
    block_inputs: tuple  # the block's own (detached) inputs
    loss_fn: LossFn  # the transform's loss (e.g. to score a classifier branch)


@dataclass
class StepState:
    """What the runtime ops read and write: the loss, one optimizer per block, the NaN policy.

    ``step`` counts finished steps (for messages); ``where`` names the process in messages
    (``" (rank 3)"``); ``comm`` is the distributed runtime's link to its peers (None in one process).
    ``schedulers`` and ``scalers`` hold one learning-rate scheduler and one ``GradScaler`` per block
    (None where unused). ``pending`` counts the calls since the last update (gradient accumulation);
    ``update`` forces (True) or holds back (False) the update of this call, e.g. for a trainer that
    decides its own accumulation boundaries; None follows ``accumulate``.
    """

    loss_fn: LossFn | None
    optimizers: list[torch.optim.Optimizer | None]
    on_nan: str = "raise"
    step: int = 0
    where: str = ""
    comm: Any = None
    skipped: list[int] = field(default_factory=list)  # blocks whose update the last step skipped
    schedulers: list[Any] = field(default_factory=list)
    scalers: list[Any] = field(default_factory=list)
    pending: int = 0
    update: bool | None = None
    device_type: str = "cpu"  # where autocast runs: the inputs' device
    boundary: bool = False  # whether this call ended an accumulation cycle


def run_step(
    step: Callable[..., tuple[float, ...]], state: StepState, inputs: list[Any], target: Any
) -> list[float]:
    """Run one generated step (``LocalModel.train_step`` and ``program.py`` both call this)."""
    begin_step(state, inputs)
    with torch.enable_grad():
        values = step(state, *inputs, target)
    end_step(state)
    return list(values)


def begin_step(state: StepState, inputs: list[Any]) -> None:
    """Reset the per-call facts (the distributed runtime calls this and :func:`end_step` itself)."""
    state.skipped, state.boundary = [], False
    state.device_type = next(
        (v.device.type for v in inputs if isinstance(v, torch.Tensor) and v.dim() > 0), state.device_type
    )


def end_step(state: StepState) -> None:
    """Count the call, and where an accumulation cycle ended, start the next one."""
    state.step += 1
    state.pending = 0 if state.boundary else state.pending + 1


def update_due(state: StepState, accumulate: int) -> bool:
    """Whether this call updates: its ``accumulate``-th since the last update (or ``state.update``)."""
    due = state.update if state.update is not None else state.pending + 1 >= accumulate
    state.boundary = state.boundary or due
    return due


def make_schedulers(
    optimizers: list[torch.optim.Optimizer | None], factory: Callable[[Any], Any] | None, first: int = 0
) -> list[Any]:
    """One scheduler per block from ``factory(optimizer)``; None where a block has no optimizer.
    ``first`` is the first optimizer's block index (for messages)."""
    if factory is None:
        return [None] * len(optimizers)
    out = []
    for block, optimizer in enumerate(optimizers, start=first):
        if optimizer is None:
            out.append(None)
            continue
        try:
            scheduler = factory(optimizer)
        except LocalizeError:
            raise
        except Exception as e:  # noqa: BLE001 - the user's factory; report it as theirs
            raise ConfigError(f"the scheduler factory failed for block {block}: {type(e).__name__}: {e}") from e
        if not isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler) or isinstance(
            scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau
        ):
            raise ConfigError(
                "the scheduler factory must return a torch.optim.lr_scheduler.LRScheduler stepped without a "
                f"metric, got {type(scheduler).__name__}; e.g. "
                "scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)"
            )
        out.append(scheduler)
    return out


def make_scalers(optimizers: list[torch.optim.Optimizer | None], autocast: str | None) -> list[Any]:
    """One ``torch.amp.GradScaler`` per block for ``autocast="fp16"`` (on its parameters' device)."""
    if autocast != "fp16":
        return [None] * len(optimizers)
    out = []
    for optimizer in optimizers:
        params = [p for g in optimizer.param_groups for p in g["params"]] if optimizer is not None else []
        out.append(torch.amp.GradScaler(params[0].device.type) if params else None)
    return out


def autocast_enter(state: StepState, block: int, dtype: str) -> Any:
    """Enter ``torch.autocast`` in ``dtype`` (``"bf16"``/``"fp16"``) on the inputs' device."""
    mode = torch.autocast(state.device_type, dtype=AUTOCAST_DTYPES[dtype])
    mode.__enter__()
    return mode


def autocast_exit(state: StepState, block: int, mode: Any) -> None:
    """Leave the autocast region :func:`autocast_enter` opened."""
    mode.__exit__(None, None, None)


def local_loss(state: StepState, block: int, pred: Any, target: Any) -> torch.Tensor:
    """``loss_fn(pred, target)``; a loss failing on shapes is reported as a target problem."""
    try:
        return state.loss_fn(pred, target)
    except LocalizeError:
        raise
    except Exception as e:  # noqa: BLE001 - a user loss failing on shapes is a target problem
        shape = tuple(pred.shape) if isinstance(pred, torch.Tensor) else type(pred).__name__
        got = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        raise TargetError(
            f"loss_fn failed on prediction {shape} and target {got} (block {block}): {e}"
        ) from e


def head_loss(
    state: StepState,
    block: int,
    head: nn.Module,
    feature: Any,
    target: Any,
    inputs: list,
    block_inputs: tuple,
) -> torch.Tensor:
    """A head's own ``local_loss(feature, target, context)`` (reconstruction, DRTP, ...)."""
    return head.local_loss(
        feature, target, LossContext(block, list(inputs), tuple(block_inputs), state.loss_fn)
    )


def backward(state: StepState, block: int, loss: torch.Tensor, accumulate: int = 1) -> float:
    """Backpropagate ``loss`` inside the block; returns its value.

    The gradients are zeroed first at the start of an accumulation cycle; with ``accumulate=N`` the
    loss is scaled by 1/N, so N calls on micro-batches add up to the mean over their union. A
    non-finite loss is not backpropagated: :func:`check_loss` decides what happens next.
    """
    value = float(loss.detach())
    if math.isfinite(value):
        scale = start_backward(state, block, accumulate)
        if loss.requires_grad:
            scale(loss).backward()
    return value


def start_backward(state: StepState, block: int, accumulate: int = 1) -> Callable[[torch.Tensor], torch.Tensor]:
    """Zero the block's gradients at the start of an accumulation cycle; return what a loss is
    multiplied by before backward (1/``accumulate``, then the block's ``GradScaler``)."""
    optimizer = state.optimizers[block]
    if optimizer is not None and state.pending == 0:
        optimizer.zero_grad(set_to_none=True)
    scaler = state.scalers[block] if state.scalers else None

    def scale(loss: torch.Tensor) -> torch.Tensor:
        if accumulate != 1:
            loss = loss / accumulate
        return scaler.scale(loss) if scaler is not None else loss

    return scale


def check_loss(state: StepState, block: int, value: float) -> float:
    """The non-finite policy: raise :class:`NonFiniteLossError`, or let the update be skipped."""
    if not math.isfinite(value):
        if state.on_nan == "raise":
            raise NonFiniteLossError(
                f"block {block} loss is {value} at step {state.step}{state.where}; lower the learning rate, "
                f"check the inputs, or pass on_nan='skip' to skip such updates"
            )
        state.skipped.append(block)
    return value


def updating(state: StepState, block: int, value: float, accumulate: int) -> torch.optim.Optimizer | None:
    """The block's optimizer if this call updates it (due, and the loss finite), else None."""
    due = update_due(state, accumulate)
    optimizer = state.optimizers[block]
    return optimizer if due and optimizer is not None and math.isfinite(value) else None


def clip_gradients(state: StepState, block: int, value: float, max_norm: float, accumulate: int = 1) -> float:
    """Clip the norm of the gradient the block's optimizer will apply to ``max_norm``
    (``torch.nn.utils.clip_grad_norm_`` over its parameters and its head's); skipped for a non-finite
    loss and between updates. With a ``GradScaler`` the gradient is unscaled first."""
    optimizer = updating(state, block, value, accumulate)
    if optimizer is not None:
        scaler = state.scalers[block] if state.scalers else None
        if scaler is not None:
            scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if params:
            torch.nn.utils.clip_grad_norm_(params, max_norm)
    return value


def optimizer_step(state: StepState, block: int, value: float, accumulate: int = 1) -> float:
    """Step the block's optimizer (through its ``GradScaler`` with fp16), unless its loss was not
    finite or the accumulation cycle has not ended."""
    optimizer = updating(state, block, value, accumulate)
    if optimizer is not None:
        scaler = state.scalers[block] if state.scalers else None
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    return value


def scheduler_step(state: StepState, block: int, value: float, accumulate: int = 1) -> float:
    """Step the block's learning-rate scheduler after each of its optimizer's updates."""
    if updating(state, block, value, accumulate) is not None:
        scheduler = state.schedulers[block] if state.schedulers else None
        if scheduler is not None:
            scheduler.step()
    return value


def release_gradients(state: StepState, block: int, value: float, accumulate: int = 1) -> float:
    """Free the block's gradients once its update used them (``zero_grad(set_to_none=True)``), so
    they are not alive while the later blocks run; kept between the calls of an accumulation cycle
    and when the update was skipped (a non-finite loss, ``update=False``)."""
    optimizer = updating(state, block, value, accumulate)
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    return value


def after_update(state: StepState, block: int, head: nn.Module, value: float, accumulate: int = 1) -> float:
    """The head's ``after_update()`` once its block has stepped (e.g. an EMA following a layer)."""
    if updating(state, block, value, accumulate) is not None:
        head.after_update()
    return value
