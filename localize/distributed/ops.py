"""The runtime ops a stage's slice of the step graph calls besides the step's own.

:func:`localize.distributed.stages.split_step` inserts them where values cross ranks: ``recv`` at
the start of every stage but the first, ``send`` after the block's forward, and with replicas
``agree_loss`` between the loss and ``backward`` (for a chunked block, ``agree_value`` before
``chunk_backward`` and ``average_gradients`` after it). Each calls the rank's pipeline runtime,
``state.comm`` (a :class:`localize.distributed.pipeline.Pipeline`), which owns the links and process
groups. Replicas average their gradients inside ``backward`` itself: the block and its head are
wrapped in ``DistributedDataParallel``, whose bucketed all-reduce overlaps the backward pass; a
chunked block, which backpropagates once per chunk, averages them after its last chunk.
"""

from __future__ import annotations

from typing import Any

from localize.runtime.ops import StepState

__all__ = ["EndOfStream", "agree_loss", "agree_value", "average_gradients", "recv", "send"]


class EndOfStream(Exception):  # noqa: N818 - a signal, not an error
    """The previous stage sent its last microbatch: the stage's loop ends."""

    def __init__(self, epoch: int) -> None:
        super().__init__(epoch)
        self.epoch = epoch


def recv(state: StepState) -> tuple:
    """The values the previous stage sent for this microbatch (the target first)."""
    return tuple(state.comm.receive())


def send(state: StepState, values: list[Any]) -> None:
    """Hand this microbatch's values to the next stage (asynchronous, at most ``depth`` in flight)."""
    state.comm.send_on(values)


def agree_loss(state: StepState, block: int, loss: Any) -> Any:
    """The replicas' mean loss, with this replica's gradient; non-finite on every replica when it is
    on one, so that all of them skip ``backward`` together (DDP's all-reduce needs every replica)."""
    return state.comm.agree_loss(loss)


def agree_value(state: StepState, block: int, value: float) -> float:
    """:func:`agree_loss` for a chunked block's loss value (a number: it has no graph; the gradient is
    made chunk by chunk afterwards)."""
    return state.comm.agree_value(value)


def average_gradients(state: StepState, block: int, value: float, accumulate: int = 1) -> float:
    """Average the block's gradients over its replicas, in one all-reduce, when this call updates
    (between the calls of an accumulation cycle they add up locally, as under DDP's ``no_sync``)."""
    state.comm.average_gradients(block, value, accumulate)
    return value
