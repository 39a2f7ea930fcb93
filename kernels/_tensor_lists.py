"""Checks and launch tables shared by the multi-tensor update kernels (SGD, AdamW, EMA).

One launch covers a whole list of tensors: the host writes a small int64 table holding every
tensor's address and size plus one ``(tensor, start)`` row per chunk of ``chunk`` elements; the
kernel's program ``i`` updates chunk ``i``. The table is cached by its contents, so a training loop
whose tensors keep their addresses pays for it once. ``load_pointer`` is the device side.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from localize.errors import LocalizeError
from localize.kernels._backend import jit, tl

__all__ = [
    "LaunchTable",
    "as_tensor_list",
    "check_tensor_lists",
    "group_by_device_dtype",
    "launch_table",
    "load_pointer",
]

FLOAT_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16, torch.float64})


def as_tensor_list(op: str, name: str, value) -> list[torch.Tensor]:
    """``value`` as a list of tensors, or a LocalizeError naming the argument."""
    if isinstance(value, torch.Tensor):
        raise LocalizeError(f"{op}: {name} must be a list of tensors, got a single tensor; wrap it: [{name}]")
    try:
        items = list(value)
    except TypeError:
        raise LocalizeError(f"{op}: {name} must be a list of tensors, got {type(value).__name__}") from None
    if not all(issubclass(ty, torch.Tensor) for ty in set(map(type, items))):
        i, t = next((i, t) for i, t in enumerate(items) if not isinstance(t, torch.Tensor))
        raise LocalizeError(f"{op}: {name}[{i}] is a {type(t).__name__}, expected a torch.Tensor")
    return items


def _is_dense(t: torch.Tensor) -> bool:
    """True when ``t`` covers its memory exactly once (any dimension order), so it can be walked flat."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _layout(t: torch.Tensor) -> tuple[int, ...]:
    """Strides of the dimensions that matter (size > 1): equal layouts put element k at the same offset."""
    return tuple(s for s, n in zip(t.stride(), t.shape) if n > 1)


def _fmt_shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(map(str, t.shape)) + ("," if t.dim() == 1 else "") + ")"


def check_tensor_lists(
    op: str, lists: dict[str, list[torch.Tensor]], *, written: Sequence[str]
) -> dict[str, list[torch.Tensor]]:
    """Validate parallel tensor lists for an element-wise multi-tensor update.

    The first list is the reference. Every list must have its length; entry ``i`` of every list its
    shape, dtype and device. Lists named in ``written`` are updated in place, so they must be dense
    (contiguous in some dimension order) with the reference's strides. Read-only lists whose layout
    differs are handled: a copy in the reference's layout is returned in their place.
    """
    names = list(lists)
    ref_name, ref = names[0], lists[names[0]]
    for name in names:
        if len(lists[name]) != len(ref):
            raise LocalizeError(
                f"{op}: got {len(ref)} {ref_name} but {len(lists[name])} {name}; pass exactly one entry of "
                f"{name} per entry of {ref_name}, in the same order"
            )
    # Fast path, run every optimizer step: all contiguous, same metadata, a few C calls per tensor.
    # Anything else takes the per-entry path below, which also builds the error messages.
    try:
        shapes, dtypes, devices = [t.shape for t in ref], [t.dtype for t in ref], [t.device for t in ref]
        ref_ok = FLOAT_DTYPES.issuperset(dtypes) and all(t.is_contiguous() for t in ref)
    except RuntimeError:  # e.g. sparse tensors have no is_contiguous
        ref_ok = False
    out = {}
    for name in names:
        items = lists[name]
        try:
            fast = ref_ok and (
                name == ref_name
                or (
                    [t.shape for t in items] == shapes
                    and [t.dtype for t in items] == dtypes
                    and [t.device for t in items] == devices
                    and all(t.is_contiguous() for t in items)
                )
            )
        except RuntimeError:
            fast = False
        out[name] = list(items) if fast else _check_entries(op, name, items, ref_name, ref, name in written)
    return out


def _check_entries(
    op: str, name: str, items: list[torch.Tensor], ref_name: str, ref: list[torch.Tensor], written: bool
) -> list[torch.Tensor]:
    items = list(items)
    for i, p in enumerate(ref):
        if p.dtype not in FLOAT_DTYPES:
            raise LocalizeError(
                f"{op}: {ref_name}[{i}] has dtype {p.dtype}; supported dtypes are float32, float16, "
                "bfloat16 (and float64 on the torch path)"
            )
        if p.layout != torch.strided:
            raise LocalizeError(
                f"{op}: {ref_name}[{i}] has layout {p.layout}; only dense tensors are supported"
            )
    for i, (t, p) in enumerate(zip(items, ref)):
        where = f"{op}: {name}[{i}]"
        if t.layout != torch.strided:
            raise LocalizeError(
                f"{where} has layout {t.layout}; only dense tensors are supported (sparse gradients "
                "need torch.optim.SparseAdam or a dense embedding)"
            )
        if t.shape != p.shape:
            raise LocalizeError(
                f"{where} has shape {_fmt_shape(t)} but {ref_name}[{i}] has shape {_fmt_shape(p)}; "
                "entry i of every list must describe the same parameter"
            )
        if t.dtype != p.dtype:
            raise LocalizeError(
                f"{where} has dtype {t.dtype} but {ref_name}[{i}] has dtype {p.dtype}; cast it with .to({p.dtype})"
            )
        if t.device != p.device:
            raise LocalizeError(
                f"{where} is on {t.device} but {ref_name}[{i}] is on {p.device}; move it with .to('{p.device}')"
            )
        same_layout = _layout(t) == _layout(p)
        if written:
            if not _is_dense(t):
                raise LocalizeError(
                    f"{where} is a non-contiguous view (shape {_fmt_shape(t)}, stride {t.stride()}) and is "
                    "updated in place; give it its own contiguous storage (e.g. `p.data = p.data.contiguous()`)"
                )
            if not same_layout:
                raise LocalizeError(
                    f"{where} has stride {t.stride()} but {ref_name}[{i}] has stride {p.stride()}; tensors "
                    "updated in place together must share one memory layout (allocate state with "
                    "torch.zeros_like(param))"
                )
        elif not same_layout or not _is_dense(t):
            # Read-only input: a copy in the reference's layout costs one pass and keeps one launch.
            items[i] = torch.empty_like(p).copy_(t)
    return items


def group_by_device_dtype(
    tensors: Sequence[torch.Tensor],
) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype), in first-seen order; one launch per group."""
    keys = [(t.device, t.dtype) for t in tensors]
    if len(set(keys)) <= 1:  # the common case: one launch for everything
        return {keys[0]: list(range(len(keys)))} if keys else {}
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return groups


@dataclass(frozen=True)
class LaunchTable:
    """Device-side int64 tables of one multi-tensor launch (views into one buffer)."""

    pointers: tuple[torch.Tensor, ...]  # one per tensor list: data_ptr of each tensor
    numels: torch.Tensor  # elements of each tensor
    chunk_tensor: torch.Tensor  # per program: which tensor
    chunk_start: torch.Tensor  # per program: first element of its chunk
    n_chunks: int
    aligned: bool  # every address is a multiple of 16 bytes


_CACHE: OrderedDict[tuple, LaunchTable] = OrderedDict()
_CACHE_SIZE = 32


def launch_table(lists: Sequence[Sequence[torch.Tensor]], chunk: int) -> LaunchTable:
    """The table for updating ``lists`` (parallel lists, same numels) in chunks of ``chunk`` elements."""
    first = lists[0]
    device = first[0].device
    numels = [t.numel() for t in first]
    ptrs = tuple(tuple(t.data_ptr() for t in items) for items in lists)
    key = (device, chunk, ptrs, tuple(numels))
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit
    n = len(first)
    numel_t = torch.tensor(numels, dtype=torch.int64)
    per_tensor = (numel_t + chunk - 1) // chunk
    chunk_tensor = torch.repeat_interleave(torch.arange(n, dtype=torch.int64), per_tensor)
    first_chunk = torch.cumsum(per_tensor, 0) - per_tensor
    chunk_start = (torch.arange(len(chunk_tensor), dtype=torch.int64) - first_chunk[chunk_tensor]) * chunk
    host = torch.cat(
        [
            torch.tensor([p for row in ptrs for p in row], dtype=torch.int64),
            numel_t,
            chunk_tensor,
            chunk_start,
        ]
    )
    buf = host.to(device)  # one host-to-device copy per new table
    k, c = len(lists), len(chunk_tensor)
    table = LaunchTable(
        pointers=tuple(buf[j * n : (j + 1) * n] for j in range(k)),
        numels=buf[k * n : (k + 1) * n],
        chunk_tensor=buf[(k + 1) * n : (k + 1) * n + c],
        chunk_start=buf[(k + 1) * n + c :],
        n_chunks=c,
        aligned=all(p % 16 == 0 for row in ptrs for p in row),
    )
    _CACHE[key] = table
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return table


@jit
def load_pointer(table, t, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Entry ``t`` of a pointer table as a ``DTYPE`` pointer.

    ``ALIGNED`` (checked on the host) tells the compiler the address is 16-byte aligned, which lets
    unmasked blocks use 128-bit loads and stores.
    """
    ptr = tl.load(table + t).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr
