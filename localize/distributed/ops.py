"""The runtime ops a stage's slice of the step graph calls besides the step's own.

:func:`localize.distributed.stages.split_step` inserts them where values cross ranks: ``recv`` at
the start of every stage but the first, ``send`` after the block's forward, and with replicas
``broadcast_buffers`` before the forward and ``all_reduce_gradients`` between ``backward`` and
``check_loss``. Each calls the rank's pipeline runtime, ``state.comm`` (a
:class:`localize.distributed.pipeline.Pipeline`), which owns the links and process groups.
"""

from __future__ import annotations

from typing import Any

from localize.runtime.ops import StepState

__all__ = ["EndOfStream", "all_reduce_gradients", "broadcast_buffers", "recv", "send"]


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


def broadcast_buffers(state: StepState, block: int) -> None:
    """Replica 0's buffers (batch-norm statistics) before the forward, like DDP."""
    state.comm.broadcast_buffers()


def all_reduce_gradients(state: StepState, block: int, value: float) -> float:
    """Average gradients and the loss over the stage's replicas; a NaN anywhere reaches every replica."""
    return state.comm.all_reduce(value)
