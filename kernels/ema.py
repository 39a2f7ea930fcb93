"""Multi-tensor exponential moving average of parameters: kernel, launcher, public function."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from localize.errors import LocalizeError
from localize.kernels._backend import device_guard, jit, tl
from localize.kernels._launch import launch_config, triton_dtype
from localize.kernels._tensor_lists import (
    as_tensor_list,
    check_tensor_lists,
    group_by_device_dtype,
    launch_table,
    load_pointer,
)
from localize.kernels._verify import max_diff, odd_tensors, register_check, verified_path
from localize.kernels.reference import ema_update_reference

__all__ = ["ema_update"]


@jit
def _ema_block(e_ptr, p_ptr, offs, mask, weight):
    e = tl.load(e_ptr + offs, mask=mask).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    # torch.lerp's two-sided form: exact at weight 0 and 1, and what the torch path computes.
    if weight < 0.5:
        e = e + weight * (p - e)
    else:
        e = p - (p - e) * (1.0 - weight)
    tl.store(e_ptr + offs, e.to(e_ptr.dtype.element_ty), mask=mask)


@jit
def _ema_kernel(
    ema_ptrs,
    param_ptrs,
    numels,
    chunk_tensor,
    chunk_start,
    weight,
    DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor + pid)
    start = tl.multiple_of(tl.load(chunk_start + pid), CHUNK)
    n = tl.load(numels + t)
    e_ptr = load_pointer(ema_ptrs, t, DTYPE, ALIGNED)
    p_ptr = load_pointer(param_ptrs, t, DTYPE, ALIGNED)
    for i in tl.range(0, tl.minimum(n - start, CHUNK), BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        if start + i + BLOCK <= n:  # full block: no mask, so aligned tensors get vector accesses
            _ema_block(e_ptr, p_ptr, offs, None, weight)
        else:
            _ema_block(e_ptr, p_ptr, offs, offs < n, weight)


def _launch_ema(path, ema_params, params, *, decay) -> None:
    cfg = launch_config(path)
    table = launch_table([ema_params, params], cfg.chunk)
    if table.n_chunks == 0:
        return
    with device_guard(params[0].device):
        _ema_kernel[(table.n_chunks,)](
            *table.pointers,
            table.numels,
            table.chunk_tensor,
            table.chunk_start,
            1.0 - decay,
            DTYPE=triton_dtype(params[0].dtype),
            ALIGNED=table.aligned,
            BLOCK=cfg.block,
            CHUNK=cfg.chunk,
            num_warps=cfg.num_warps,
        )


@torch.no_grad()
def ema_update(ema_params: Sequence[torch.Tensor], params: Sequence[torch.Tensor], *, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * param`` for every pair, in place, one launch per group.

    Computed as ``torch.lerp(ema, param, 1 - decay)`` in fp32, stored in the tensors' dtype.
    ``decay`` must lie in [0, 1].

    Example::

        >>> import torch
        >>> from localize.kernels import ema_update
        >>> ema, p = [torch.zeros(2)], [torch.ones(2)]
        >>> ema_update(ema, p, decay=0.9)
        >>> ema[0]
        tensor([0.1000, 0.1000])
    """
    op = "ema_update"
    if not 0.0 <= decay <= 1.0:
        raise LocalizeError(f"{op}: decay must lie in [0, 1] (typically 0.99 to 0.9999), got {decay}")
    lists = check_tensor_lists(
        op,
        {
            "ema_params": as_tensor_list(op, "ema_params", ema_params),
            "params": as_tensor_list(op, "params", params),
        },
        written=("ema_params",),
    )
    for (device, dtype), idx in group_by_device_dtype(lists["ema_params"]).items():
        es = [lists["ema_params"][i] for i in idx]
        ps = [lists["params"][i] for i in idx]
        path = verified_path("ema_update", device, dtype)
        if path == "torch":
            torch._foreach_lerp_(es, ps, 1.0 - decay)
        else:
            _launch_ema(path, es, ps, decay=float(decay))


def _check_ema(path: str, device: torch.device, dtype: torch.dtype) -> float:
    """One EMA update on odd sizes, against :func:`ema_update_reference`."""
    e, p = (odd_tensors(device, dtype, seed) for seed in (0, 1))
    want = [x.clone() for x in e]
    _launch_ema(path, e, p, decay=0.9)
    ema_update_reference(want, p, decay=0.9)
    return max_diff(e, want)


register_check("ema_update", _check_ema)
