"""How training data is cut into the (inputs, target) microbatches a pipeline streams, and moved between devices."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from localize.errors import ConfigError

__all__ = ["iter_batches", "batch_len", "shard_of", "to_device"]


def iter_batches(
    data: Any, batch_size: int | None = None, *, shuffle: bool = False, seed: int = 0, epoch: int = 0
) -> Iterator[tuple[Any, Any]]:
    """The ``(inputs, target)`` batches of one epoch, in the order :func:`train` feeds them.

    Use it to run the same batches in one process (``for x, y in iter_batches(...):
    lm.train_step(x, y)``), which gives the parameters distributed training gives.

    >>> import torch
    >>> x, y = torch.arange(10.0).reshape(5, 2), torch.arange(5)
    >>> [b[1].tolist() for b in iter_batches((x, y), 2)]
    [[0, 1], [2, 3], [4]]
    """
    if callable(data) and not isinstance(data, (torch.Tensor, tuple, list)):
        yield from data(epoch)
        return
    if (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[1], torch.Tensor)
        and _is_inputs(data[0])
    ):
        inputs, targets = data
        n = len(targets)
        if batch_size is None:
            raise ConfigError("batch_size= is needed to cut (inputs, targets) tensors into batches")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
        for t in _tensors(inputs):
            if len(t) != n:
                raise ConfigError(
                    f"inputs hold {len(t)} samples but targets hold {n}; give one target per sample"
                )
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)) if shuffle else None
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size] if order is not None else slice(start, start + batch_size)
            yield _index(inputs, idx), targets[idx]
        return
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes, torch.Tensor)):
        yield from data
        return
    raise ConfigError(
        f"data is a {type(data).__name__}; give an (inputs, targets) pair of tensors, an iterable of "
        f"(inputs, target) batches such as a DataLoader, or a callable epoch -> batches"
    )


def _is_inputs(x: Any) -> bool:
    return isinstance(x, torch.Tensor) or (
        isinstance(x, (tuple, list, dict))
        and len(x) > 0
        and all(isinstance(t, torch.Tensor) for t in _tensors(x))
    )


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return list(x.values())
    return list(x)


def _index(x: Any, idx: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x[idx]
    if isinstance(x, dict):
        return {k: v[idx] for k, v in x.items()}
    return tuple(v[idx] for v in x)


def batch_len(target: Any) -> int:
    return len(target) if isinstance(target, torch.Tensor) and target.dim() > 0 else 1


def shard_of(value: Any, replica: int, replicas: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        return value.tensor_split(replicas)[replica]
    return value


def to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if type(value) in (tuple, list):
        return type(value)(to_device(v, device) for v in value)
    if type(value) is dict:
        return {k: to_device(v, device) for k, v in value.items()}
    return value
