"""Learning-rate schedules by name, built from torch's own schedulers.

``transform(scheduler=factory)`` takes any ``optimizer -> LRScheduler`` factory and makes one
scheduler per block, stepped after each of that block's updates. :class:`LRSchedule` is the factory
the command line (``--schedule cosine|step|none --warmup W``) and ``program.py`` use; it is plain data,
so ``program.py`` writes it back as it was given:

* ``"cosine"``: after the warmup, ``CosineAnnealingLR`` down to 0 at update ``total``;
* ``"step"``: after the warmup, ``MultiStepLR`` multiplying the rate by 0.1 at 50% and 75% of
  ``total``;
* ``"none"``: the warmup alone, then the constant rate.

The warmup is ``LinearLR`` from ``lr / warmup`` up to ``lr`` over the first ``warmup`` updates, joined
to the rest with ``SequentialLR``. ``total`` counts updates (optimizer steps), not ``train_step`` calls:
with ``accumulate=N`` it is the number of calls divided by N.

Example:
    >>> import torch
    >>> from localize.runtime.schedulers import LRSchedule
    >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    >>> sched = LRSchedule("cosine", total=4)(opt)
    >>> for _ in range(2):
    ...     opt.step(); sched.step()
    >>> round(sched.get_last_lr()[0], 6)  # halfway down the cosine
    0.5
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.optim import lr_scheduler

from localize.errors import ConfigError

__all__ = ["KINDS", "LRSchedule", "lr_schedule"]

KINDS = ("cosine", "step", "none")


@dataclass(frozen=True)
class LRSchedule:
    """A scheduler factory by name: ``LRSchedule(kind, total, warmup)(optimizer)``."""

    kind: str
    total: int
    warmup: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"schedule {self.kind!r} is not known; choose one of {', '.join(KINDS)}")
        for name in ("total", "warmup"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"the schedule's {name} must be an int >= 0, got {value!r}")
        if self.kind != "none" and self.total <= self.warmup:
            raise ConfigError(
                f"a {self.kind} schedule over {self.total} updates leaves nothing after a warmup of "
                f"{self.warmup}; train longer or shorten the warmup"
            )

    def __call__(self, optimizer: torch.optim.Optimizer) -> lr_scheduler.LRScheduler:
        rest = self.total - self.warmup
        main: lr_scheduler.LRScheduler | None
        if self.kind == "cosine":
            main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=rest)
        elif self.kind == "step":
            main = lr_scheduler.MultiStepLR(
                optimizer, milestones=[self.total // 2 - self.warmup, 3 * self.total // 4 - self.warmup], gamma=0.1
            )
        else:
            main = None
        if self.warmup == 0:
            return main if main is not None else lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
        warm = lr_scheduler.LinearLR(optimizer, start_factor=1.0 / self.warmup, total_iters=self.warmup)
        if main is None:
            return warm
        return lr_scheduler.SequentialLR(optimizer, [warm, main], milestones=[self.warmup])


def lr_schedule(kind: str, total: int, warmup: int = 0) -> LRSchedule | None:
    """The factory for ``transform(scheduler=...)``; None for ``"none"`` without a warmup."""
    if kind == "none" and warmup == 0:
        return None
    return LRSchedule(kind, total, warmup)
