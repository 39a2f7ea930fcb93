"""Schedules as data: a list of small actions that print compactly and parse back.

An action is ``B<i>:<kind>``: ``F`` runs block i forward from its (detached) inputs, ``L``
computes its local loss (aux head, or the model output for the last block) and backpropagates
inside the block, ``U`` applies the block's optimizer update and frees its graph.

Example:
    >>> from localize.runtime.schedule import sequential_schedule, parse_schedule
    >>> s = sequential_schedule(2)
    >>> str(s)
    'B0:F B0:L B0:U B1:F B1:L B1:U'
    >>> parse_schedule(str(s)) == s
    True
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from localize.errors import ConfigError

__all__ = ["ActionKind", "Action", "Schedule", "sequential_schedule", "parse_schedule"]


class ActionKind(str, Enum):
    FORWARD = "F"
    LOSS = "L"
    UPDATE = "U"


@dataclass(frozen=True)
class Action:
    block: int
    kind: ActionKind

    def __str__(self) -> str:
        return f"B{self.block}:{self.kind.value}"


@dataclass(frozen=True)
class Schedule:
    actions: tuple[Action, ...]

    def __str__(self) -> str:
        return " ".join(map(str, self.actions))

    def __iter__(self):
        return iter(self.actions)

    def __len__(self) -> int:
        return len(self.actions)


def sequential_schedule(blocks: int) -> Schedule:
    """Each block in order: forward, local loss and backward, update (then its graph is freed)."""
    return Schedule(tuple(Action(b, k) for b in range(blocks) for k in ActionKind))


_ACTION = re.compile(r"^B(\d+):([FLU])$")


def parse_schedule(text: str) -> Schedule:
    actions = []
    for token in text.split():
        m = _ACTION.match(token)
        if m is None:
            raise ConfigError(f"bad schedule action {token!r}: expected B<block>:<F|L|U>, e.g. B0:F")
        actions.append(Action(int(m.group(1)), ActionKind(m.group(2))))
    return Schedule(tuple(actions))
