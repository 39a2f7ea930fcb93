"""The replicas of one stage: R ranks that run the same block on different shards of each batch.

An unchunked block runs under ``DistributedDataParallel`` (:func:`ddp`): its bucketed all-reduce
averages the gradients while backward runs. A chunked block backpropagates once per chunk, which
DDP's reducer (one backward per forward) cannot follow: its replicas start alike
(:func:`start_alike`), agree on the loss first (:func:`mean_over`) and average the gradients after
the last chunk (:func:`average_gradients`). ``collective(doing, fn)`` runs one collective and turns a
lost peer into a :class:`~localize.distributed.wire.PeerError` naming ``doing``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["average_gradients", "ddp", "mean_over", "start_alike"]

Collective = Callable[[str, Callable[[], Any]], Any]


class _StageReplica(nn.Module):
    """What DDP wraps: the block (its forward is DDP's) and the head, whose parameters are used
    after the forward but share the block's reducer, so one all-reduce serves both."""

    def __init__(self, block: nn.Module, head: nn.Module | None) -> None:
        super().__init__()
        self.block = block
        self.head = head

    def forward(self, *args: Any) -> Any:
        return self.block(*args)


def ddp(block: nn.Module, head: nn.Module | None, trainable: list[torch.Tensor], group: Any, device: torch.device) -> nn.Module:
    """The block and its head under one DDP reducer; parameters another block trains (tied weights)
    are ignored."""
    from torch.nn.parallel import DistributedDataParallel

    replica = _StageReplica(block, head)
    mine = {id(p) for p in trainable}
    ignored = [name for name, p in replica.named_parameters() if id(p) not in mine]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(replica, ignored)
    return DistributedDataParallel(
        replica, process_group=group, device_ids=[device] if device.type == "cuda" else None
    )


def start_alike(modules: list[nn.Module], source: int, group: Any, collective: Collective) -> None:
    """Every parameter and buffer from rank ``source`` (replica 0), as DDP's constructor does."""
    for t in [t for m in modules for t in (*m.parameters(), *m.buffers())]:
        collective("starting from replica 0 with", lambda t=t: dist.broadcast(t.data, source, group=group))


def mean_over(value: float | torch.Tensor, replicas: int, group: Any, device: torch.device, collective: Collective) -> float:
    """The replicas' mean of ``value``; NaN on every replica when it is not finite on one."""
    total = torch.as_tensor(value, dtype=torch.float64).reshape(1).to(device)
    collective("agreeing on the loss with", lambda: dist.all_reduce(total, group=group))
    mean = float(total) / replicas
    return mean if math.isfinite(mean) else math.nan


def average_gradients(optimizer: torch.optim.Optimizer, replicas: int, group: Any, collective: Collective) -> None:
    """Average the gradients ``optimizer`` will apply over the replicas.

    One all-reduce per dtype of a flat buffer holding every parameter's gradient and whether the
    replica has one: a parameter no replica reached keeps ``grad=None`` (AdamW skips it, as in one
    process), one that some replicas reached gets the mean over all of them.
    """
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in (p for g in optimizer.param_groups for p in g["params"]):
        by_dtype.setdefault(p.dtype, []).append(p)
    for dtype, params in by_dtype.items():
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        has = torch.tensor([p.grad is not None for p in params], dtype=dtype, device=params[0].device)
        flat = torch.cat([g.reshape(-1) for g in grads] + [has])
        collective("averaging gradients with", lambda flat=flat: dist.all_reduce(flat, group=group))
        flat /= replicas
        offset = 0
        for p, reached in zip(params, flat[-len(params):].tolist()):
            if reached > 0:
                p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
