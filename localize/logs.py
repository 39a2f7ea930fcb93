"""Loggers turned down for a while: torch's own chatter around a step localize handles itself."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["loggers_at"]


@contextmanager
def loggers_at(level: int, *names: str) -> Iterator[None]:
    """Set the named loggers to ``level`` inside the block, then back to what they were.

    Example:
        >>> import logging
        >>> with loggers_at(logging.CRITICAL, "torch._subclasses.fake_tensor"):
        ...     logging.getLogger("torch._subclasses.fake_tensor").level
        50
    """
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, old in zip(loggers, levels):
            lg.setLevel(old)
