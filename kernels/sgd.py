"""Multi-tensor SGD step (torch.optim.SGD semantics, dampening 0): kernel, launcher, public function."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.optim.sgd import sgd as _torch_sgd

from localize.errors import LocalizeError
from localize.kernels._backend import device_guard, jit, tl
from localize.kernels._launch import fused_supported, launch_config, triton_dtype
from localize.kernels._tensor_lists import (
    as_tensor_list,
    check_tensor_lists,
    group_by_device_dtype,
    launch_table,
    load_pointer,
)
from localize.kernels._verify import max_diff, odd_tensors, register_check, verified_path
from localize.kernels.reference import sgd_step_reference

__all__ = ["sgd_step"]


@jit
def _sgd_block(
    p_ptr, g_ptr, b_ptr, offs, mask, lr, momentum, weight_decay, HAS_WEIGHT_DECAY, HAS_MOMENTUM, NESTEROV
):
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    d = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    if HAS_WEIGHT_DECAY:
        d = d + weight_decay * p
    if HAS_MOMENTUM:
        # dampening is 0, so a zero buffer gives buf = d on the first step, as torch's clone(grad).
        buf = momentum * tl.load(b_ptr + offs, mask=mask).to(tl.float32) + d
        tl.store(b_ptr + offs, buf.to(b_ptr.dtype.element_ty), mask=mask)
        if NESTEROV:
            d = d + momentum * buf
        else:
            d = buf
    tl.store(p_ptr + offs, (p - lr * d).to(p_ptr.dtype.element_ty), mask=mask)


@jit
def _sgd_kernel(
    param_ptrs,
    grad_ptrs,
    buf_ptrs,
    numels,
    chunk_tensor,
    chunk_start,
    lr,
    momentum,
    weight_decay,
    DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    HAS_WEIGHT_DECAY: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor + pid)
    start = tl.multiple_of(tl.load(chunk_start + pid), CHUNK)
    n = tl.load(numels + t)
    p_ptr = load_pointer(param_ptrs, t, DTYPE, ALIGNED)
    g_ptr = load_pointer(grad_ptrs, t, DTYPE, ALIGNED)
    b_ptr = load_pointer(buf_ptrs, t, DTYPE, ALIGNED)
    for i in tl.range(0, tl.minimum(n - start, CHUNK), BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        if start + i + BLOCK <= n:  # full block: no mask, so aligned tensors get vector accesses
            _sgd_block(
                p_ptr,
                g_ptr,
                b_ptr,
                offs,
                None,
                lr,
                momentum,
                weight_decay,
                HAS_WEIGHT_DECAY,
                HAS_MOMENTUM,
                NESTEROV,
            )
        else:
            _sgd_block(
                p_ptr,
                g_ptr,
                b_ptr,
                offs,
                offs < n,
                lr,
                momentum,
                weight_decay,
                HAS_WEIGHT_DECAY,
                HAS_MOMENTUM,
                NESTEROV,
            )


def _launch_sgd(path, params, grads, bufs, *, lr, momentum, weight_decay, nesterov) -> None:
    cfg = launch_config(path)
    has_momentum = momentum != 0
    table = launch_table([params, grads, bufs] if has_momentum else [params, grads], cfg.chunk)
    if table.n_chunks == 0:
        return
    buf_ptrs = table.pointers[2] if has_momentum else table.pointers[0]  # unread without momentum
    with device_guard(params[0].device):
        _sgd_kernel[(table.n_chunks,)](
            table.pointers[0],
            table.pointers[1],
            buf_ptrs,
            table.numels,
            table.chunk_tensor,
            table.chunk_start,
            float(lr),
            float(momentum),
            float(weight_decay),
            DTYPE=triton_dtype(params[0].dtype),
            ALIGNED=table.aligned,
            HAS_WEIGHT_DECAY=weight_decay != 0,
            HAS_MOMENTUM=has_momentum,
            NESTEROV=bool(nesterov),
            BLOCK=cfg.block,
            CHUNK=cfg.chunk,
            num_warps=cfg.num_warps,
        )


def _torch_sgd_step(params, grads, bufs, *, lr, momentum, weight_decay, nesterov) -> None:
    if fused_supported("sgd", params[0].device, params[0].dtype):
        _torch_sgd(
            params,
            grads,
            bufs if momentum != 0 else [],
            fused=True,
            weight_decay=weight_decay,
            momentum=momentum,
            lr=lr,
            dampening=0.0,
            nesterov=nesterov,
            maximize=False,
        )
        return
    # torch's foreach SGD adds the nesterov term into the caller's grads in place; grads stay inputs here.
    d = torch._foreach_add(grads, params, alpha=weight_decay) if weight_decay != 0 else grads
    if momentum != 0:
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, d)
        d = torch._foreach_add(d, bufs, alpha=momentum) if nesterov else bufs
    torch._foreach_add_(params, d, alpha=-lr)


@torch.no_grad()
def sgd_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor] | None = None,
    *,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
) -> None:
    """One SGD step over a list of tensors, in place: one launch per (device, dtype) group.

    Same math as ``torch.optim.SGD`` with ``dampening=0``: ``d = grad + weight_decay * p``;
    ``buf = momentum * buf + d``; ``p -= lr * (d + momentum * buf if nesterov else buf)``.
    Pass ``momentum_buffers`` (one per param, updated in place) when ``momentum != 0``; zeros on the
    first step reproduce torch's first-step ``buf = d`` exactly, because dampening is 0.
    Math runs in fp32; results are stored in each tensor's dtype (float32, float16, bfloat16).

    Example::

        >>> import torch
        >>> from localize.kernels import sgd_step
        >>> p, g = [torch.ones(2), torch.ones(3)], [torch.full((2,), 2.0), torch.ones(3)]
        >>> bufs = [torch.zeros(2), torch.zeros(3)]
        >>> sgd_step(p, g, bufs, lr=0.1, momentum=0.9)
        >>> p[0], bufs[0]
        (tensor([0.8000, 0.8000]), tensor([2., 2.]))
    """
    op = "sgd_step"
    if lr < 0 or momentum < 0 or weight_decay < 0:
        raise LocalizeError(
            f"{op}: lr, momentum and weight_decay must be >= 0, got lr={lr}, momentum={momentum}, "
            f"weight_decay={weight_decay}"
        )
    if nesterov and momentum == 0:
        raise LocalizeError(
            f"{op}: nesterov=True needs momentum > 0; set momentum (e.g. 0.9) or nesterov=False"
        )
    lists = {"params": as_tensor_list(op, "params", params), "grads": as_tensor_list(op, "grads", grads)}
    if momentum != 0:
        if momentum_buffers is None:
            raise LocalizeError(
                f"{op}: momentum={momentum} needs momentum_buffers, one per param (zeros on the first step)"
            )
        lists["momentum_buffers"] = as_tensor_list(op, "momentum_buffers", momentum_buffers)
    lists = check_tensor_lists(op, lists, written=("params", "momentum_buffers"))
    hyper = dict(
        lr=float(lr), momentum=float(momentum), weight_decay=float(weight_decay), nesterov=bool(nesterov)
    )
    for (device, dtype), idx in group_by_device_dtype(lists["params"]).items():
        ps = [lists["params"][i] for i in idx]
        gs = [lists["grads"][i] for i in idx]
        bs = [lists["momentum_buffers"][i] for i in idx] if momentum != 0 else []
        path = verified_path("sgd_step", device, dtype)
        if path == "torch":
            _torch_sgd_step(ps, gs, bs, **hyper)
        else:
            _launch_sgd(path, ps, gs, bs, **hyper)


def _check_sgd(path: str, device: torch.device, dtype: torch.dtype) -> float:
    """One Nesterov step with weight decay on odd sizes, against :func:`sgd_step_reference`."""
    p, g, b = (odd_tensors(device, dtype, seed) for seed in (0, 1, 2))
    want_p, want_b = [x.clone() for x in p], [x.clone() for x in b]
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)
    _launch_sgd(path, p, g, b, **hyper)
    sgd_step_reference(want_p, g, want_b, **hyper)
    return max_diff(p + b, want_p + want_b)


register_check("sgd_step", _check_sgd)
