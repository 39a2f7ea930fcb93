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
  MAN's EMA), both skipped for a non-finite loss.

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

from localize.errors import LocalizeError, TargetError
from localize.runtime.loss import LossFn

__all__ = [
    "LossContext",
    "NonFiniteLossError",
    "StepState",
    "after_update",
    "backward",
    "check_loss",
    "clip_gradients",
    "head_loss",
    "local_loss",
    "optimizer_step",
    "run_step",
]


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
    """

    loss_fn: LossFn | None
    optimizers: list[torch.optim.Optimizer | None]
    on_nan: str = "raise"
    step: int = 0
    where: str = ""
    comm: Any = None
    skipped: list[int] = field(default_factory=list)  # blocks whose update the last step skipped


def run_step(
    step: Callable[..., tuple[float, ...]], state: StepState, inputs: list[Any], target: Any
) -> list[float]:
    """Run one generated step (``LocalModel.train_step`` and ``program.py`` both call this)."""
    state.skipped = []
    with torch.enable_grad():
        values = step(state, *inputs, target)
    state.step += 1
    return list(values)


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


def backward(state: StepState, block: int, loss: torch.Tensor) -> float:
    """Backpropagate ``loss`` inside the block (gradients zeroed first); returns its value.

    A non-finite loss is not backpropagated: :func:`check_loss` decides what happens next.
    """
    value = float(loss.detach())
    if math.isfinite(value):
        optimizer = state.optimizers[block]
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
    return value


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


def clip_gradients(state: StepState, block: int, value: float, max_norm: float) -> float:
    """Clip the norm of the gradient the block's optimizer will apply to ``max_norm``
    (``torch.nn.utils.clip_grad_norm_`` over its parameters and its head's); skipped for a non-finite loss."""
    optimizer = state.optimizers[block]
    if optimizer is not None and math.isfinite(value):
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if params:
            torch.nn.utils.clip_grad_norm_(params, max_norm)
    return value


def optimizer_step(state: StepState, block: int, value: float) -> float:
    """Step the block's optimizer, unless its loss was not finite."""
    optimizer = state.optimizers[block]
    if optimizer is not None and math.isfinite(value):
        optimizer.step()
    return value


def after_update(state: StepState, block: int, head: nn.Module, value: float) -> float:
    """The head's ``after_update()`` once its block has stepped (e.g. an EMA following a layer)."""
    if state.optimizers[block] is not None and math.isfinite(value):
        head.after_update()
    return value
