"""Measure the activation memory autograd keeps: saved tensors, deduplicated by storage.

:class:`SavedActivationMeter` hooks ``torch.autograd.graph.saved_tensors_hooks``. Every tensor
autograd saves for backward is counted once per storage while it is alive; parameters (and any
tensor listed in ``exclude``) are not activations and are skipped. ``peak_bytes`` is the largest
amount alive at once, ``total_bytes`` everything saved during the context.

Example:
    >>> import torch
    >>> from localize.runtime.memory import SavedActivationMeter
    >>> lin = torch.nn.Linear(64, 64)
    >>> with SavedActivationMeter(lin.parameters()) as meter:
    ...     lin(torch.randn(8, 64)).relu().sum().backward()
    >>> meter.peak_bytes > 0
    True
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch

__all__ = ["SavedActivationMeter"]


class SavedActivationMeter:
    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._excluded = {_key(t) for t in exclude}
        self._live: dict[tuple[int, int], list[int]] = {}  # storage key -> [bytes, refcount]
        self.current_bytes = 0
        self.peak_bytes = 0
        self.total_bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    def __enter__(self) -> SavedActivationMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _key(t)
        if key in self._excluded or isinstance(t, torch.nn.Parameter):
            return t
        entry = self._live.get(key)
        if entry is None:
            nbytes = t.untyped_storage().nbytes()
            entry = self._live[key] = [nbytes, 0]
            self.current_bytes += nbytes
            self.total_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        entry[1] += 1
        # Saved-tensor holders wrap the tensor; track its lifetime through a tiny proxy object.
        holder = _Holder(t)
        weakref.finalize(holder, self._release, key)
        return holder  # type: ignore[return-value]

    def _release(self, key: tuple[int, int]) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current_bytes -= entry[0]
            del self._live[key]


class _Holder:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def _unpack(holder: object) -> torch.Tensor:
    return holder.tensor if isinstance(holder, _Holder) else holder  # type: ignore[return-value]


def _key(t: torch.Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return (storage.data_ptr(), t.device.index or 0)
