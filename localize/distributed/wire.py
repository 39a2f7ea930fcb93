"""Messages between neighbouring pipeline stages, on torch.distributed point-to-point calls.

One microbatch from stage ``s`` to stage ``s+1`` is a small int64 header ``[op, step, epoch]``
(``isend``), then, only when the structure changed (first message, a smaller last batch, another
constant), the structure itself (``send_object_list``), then every tensor leaf (``isend``). The
structure is a nested description of the values: tensors as (shape, dtype), containers as
containers, anything else (sizes, ints, strings) as the value itself, which therefore travels in
the structure. ``STOP`` ends the stream. Sends are asynchronous: a stage keeps at most ``depth``
microbatches in flight before it waits, which bounds memory when a stage runs ahead.

Every failure of a call (a peer that died, a peer that hung past the process-group timeout)
becomes a :class:`PeerError` that says which rank lost which and when.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from enum import IntEnum
from typing import Any

import torch
import torch.distributed as dist

from localize.errors import LocalizeError

__all__ = ["Op", "Message", "Link", "PeerError", "flatten_values", "unflatten_values", "one_line"]


class PeerError(LocalizeError):
    """A peer rank died, hung past the timeout, or closed its connection."""


class Op(IntEnum):
    DATA = 0  # tensors follow, same structure as the previous message
    META = 1  # a new structure follows, then the tensors
    STOP = 2  # no more microbatches


@dataclass
class Message:
    op: Op
    step: int
    epoch: int
    values: list[Any] | None = None


# ----------------------------------------------------------------------------------------------- structure


def flatten_values(value: Any, tensors: list[torch.Tensor]) -> Any:
    """The structure of ``value``; its tensors are appended to ``tensors`` in order."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return ("T", tuple(value.shape), value.dtype)
    if type(value) in (tuple, list):
        return (type(value).__name__, [flatten_values(v, tensors) for v in value])
    if type(value) is dict:
        return ("dict", [(k, flatten_values(v, tensors)) for k, v in value.items()])
    return ("C", value)  # a constant: rides in the structure (ints, torch.Size, None, strings)


def unflatten_values(spec: Any, tensors: Iterator[torch.Tensor]) -> Any:
    kind, body = spec[0], spec[1]
    if kind == "T":
        return next(tensors)
    if kind == "tuple":
        return tuple(unflatten_values(s, tensors) for s in body)
    if kind == "list":
        return [unflatten_values(s, tensors) for s in body]
    if kind == "dict":
        return {k: unflatten_values(s, tensors) for k, s in body}
    return body


def _leaves(spec: Any) -> Iterator[tuple[tuple[int, ...], torch.dtype]]:
    kind, body = spec[0], spec[1]
    if kind == "T":
        yield spec[1], spec[2]
    elif kind in ("tuple", "list"):
        for s in body:
            yield from _leaves(s)
    elif kind == "dict":
        for _, s in body:
            yield from _leaves(s)


_SOURCE_TAG = re.compile(r"\[[^\]\s]*\.(?:cc|cpp|h|hpp):\d+\]\s*")  # "[.../pair.cc:537] "


def one_line(e: BaseException, limit: int = 240) -> str:
    """The error's text on one line, without C++ source locations and backend boilerplate."""
    text = _SOURCE_TAG.sub("", " ".join(str(e).split()))
    text = text.split(". This is typically caused by")[0].strip() or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------- link


class Link:
    """A one-way channel to (``send``) or from (``recv``) one neighbouring rank."""

    def __init__(
        self,
        peer: int,
        group: dist.ProcessGroup,
        device: torch.device,
        timeout: timedelta,
        describe: Callable[[int], str],
        depth: int = 2,
    ) -> None:
        self.peer = peer
        self.group = group
        self.device = device
        self.timeout = timeout
        self.describe = describe  # rank -> "rank 1 (stage 1, replica 0)"
        self.depth = depth
        # gloo: wait with the timeout; nccl: its watchdog enforces the group's timeout, and a plain
        # wait() only orders the streams instead of blocking the CPU
        self._wait_args = (timeout,) if device.type == "cpu" else ()
        self._spec: Any = None
        self._in_flight: deque[tuple[int, list[dist.Work], list[torch.Tensor]]] = deque()

    # -------------------------------------------------------------- errors

    @contextmanager
    def _guard(self, doing: str, step: int):
        try:
            yield
        except LocalizeError:
            raise
        except RuntimeError as e:  # DistBackendError, gloo/nccl errors, timeouts
            me = self.describe(dist.get_rank())
            seconds = int(self.timeout.total_seconds())
            raise PeerError(
                f"{me} lost {self.describe(self.peer)} while {doing} microbatch {step}: {one_line(e)} "
                f"(a peer process died, or hung past the {seconds} s timeout; look at its log)"
            ) from None

    # -------------------------------------------------------------- sending

    def send(self, step: int, epoch: int, values: list[Any]) -> None:
        tensors: list[torch.Tensor] = []
        spec = flatten_values(values, tensors)
        # keep references until the send completes; contiguous so the bytes are the tensor's own
        tensors = [t.detach().contiguous() for t in tensors]
        op = Op.DATA if spec == self._spec else Op.META
        self._throttle(self.depth - 1)
        with self._guard("sending", step):
            header = torch.tensor([int(op), step, epoch], dtype=torch.int64, device=self.device)
            works = [dist.isend(header, self.peer, group=self.group)]
            if op is Op.META:
                dist.send_object_list([spec], self.peer, group=self.group, device=self.device)
                self._spec = spec
            works += [dist.isend(t, self.peer, group=self.group) for t in tensors if t.numel()]
        self._in_flight.append((step, works, [header, *tensors]))

    def stop(self, step: int, epoch: int) -> None:
        with self._guard("ending the stream after", step):
            header = torch.tensor([int(Op.STOP), step, epoch], dtype=torch.int64, device=self.device)
            self._in_flight.append((step, [dist.isend(header, self.peer, group=self.group)], [header]))
        self.flush()

    def flush(self) -> None:
        self._throttle(0)

    def _throttle(self, keep: int) -> None:
        while len(self._in_flight) > keep:
            step, works, _ = self._in_flight.popleft()
            with self._guard("sending", step):
                for w in works:
                    w.wait(*self._wait_args)

    # -------------------------------------------------------------- receiving

    def recv(self, step: int) -> Message:
        """The next message; ``step`` is the microbatch this stage expects (for error messages)."""
        with self._guard("waiting for", step):
            header = torch.empty(3, dtype=torch.int64, device=self.device)
            dist.irecv(header, self.peer, group=self.group).wait(*self._wait_args)
            op, got, epoch = (int(v) for v in header.tolist())
            if op == Op.STOP:
                return Message(Op.STOP, got, epoch)
            if op == Op.META:
                box: list[Any] = [None]
                dist.recv_object_list(box, self.peer, group=self.group, device=self.device)
                self._spec = box[0]
            if self._spec is None:
                raise PeerError(f"{self.describe(self.peer)} sent data before its structure (op {op})")
            buffers = [
                torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in _leaves(self._spec)
            ]
            works = [dist.irecv(b, self.peer, group=self.group) for b in buffers if b.numel()]
            for w in works:
                w.wait(*self._wait_args)
        return Message(Op(op), got, epoch, unflatten_values(self._spec, iter(buffers)))
