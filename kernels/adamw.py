"""Multi-tensor AdamW step (torch.optim.AdamW semantics, amsgrad off): kernel, launcher, public function."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.optim.adamw import adamw as _torch_adamw

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
from localize.kernels.reference import adamw_step_reference

__all__ = ["adamw_step"]


@jit
def _adamw_block(
    p_ptr, g_ptr, m_ptr, v_ptr, offs, mask, decay, beta1, beta2, eps, step_size, bias_correction2_sqrt
):
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32) * decay
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)
    m = m + (1.0 - beta1) * (g - m)  # torch's exp_avg.lerp_(grad, 1 - beta1)
    v = beta2 * v + (1.0 - beta2) * g * g
    # IEEE sqrt and division (not the fast approximations) so fp32 results track torch's.
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    p = p - step_size * tl.div_rn(m, denom)
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)


@jit
def _adamw_kernel(
    param_ptrs,
    grad_ptrs,
    exp_avg_ptrs,
    exp_avg_sq_ptrs,
    numels,
    chunk_tensor,
    chunk_start,
    decay,
    beta1,
    beta2,
    eps,
    step_size,
    bias_correction2_sqrt,
    DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor + pid)
    start = tl.multiple_of(tl.load(chunk_start + pid), CHUNK)
    n = tl.load(numels + t)
    p_ptr = load_pointer(param_ptrs, t, DTYPE, ALIGNED)
    g_ptr = load_pointer(grad_ptrs, t, DTYPE, ALIGNED)
    m_ptr = load_pointer(exp_avg_ptrs, t, DTYPE, ALIGNED)
    v_ptr = load_pointer(exp_avg_sq_ptrs, t, DTYPE, ALIGNED)
    for i in tl.range(0, tl.minimum(n - start, CHUNK), BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        if start + i + BLOCK <= n:  # full block: no mask, so aligned tensors get vector accesses
            _adamw_block(
                p_ptr,
                g_ptr,
                m_ptr,
                v_ptr,
                offs,
                None,
                decay,
                beta1,
                beta2,
                eps,
                step_size,
                bias_correction2_sqrt,
            )
        else:
            _adamw_block(
                p_ptr,
                g_ptr,
                m_ptr,
                v_ptr,
                offs,
                offs < n,
                decay,
                beta1,
                beta2,
                eps,
                step_size,
                bias_correction2_sqrt,
            )


def _launch_adamw(path, params, grads, exp_avgs, exp_avg_sqs, *, step, lr, betas, eps, weight_decay) -> None:
    cfg = launch_config(path)
    table = launch_table([params, grads, exp_avgs, exp_avg_sqs], cfg.chunk)
    if table.n_chunks == 0:
        return
    beta1, beta2 = betas
    # Bias corrections in double on the host, as torch computes them from the Python step count.
    step_size = lr / (1 - beta1**step)
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    with device_guard(params[0].device):
        _adamw_kernel[(table.n_chunks,)](
            *table.pointers,
            table.numels,
            table.chunk_tensor,
            table.chunk_start,
            1.0 - lr * weight_decay,
            beta1,
            beta2,
            eps,
            step_size,
            bias_correction2_sqrt,
            DTYPE=triton_dtype(params[0].dtype),
            ALIGNED=table.aligned,
            BLOCK=cfg.block,
            CHUNK=cfg.chunk,
            num_warps=cfg.num_warps,
        )


def _torch_adamw_step(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, betas, eps, weight_decay) -> None:
    device = params[0].device
    fused = fused_supported("adamw", device, params[0].dtype)
    # torch's functional API increments each step tensor itself; one buffer, one view per tensor.
    steps = torch.full(
        (len(params),), float(step - 1), dtype=torch.float32, device=device if fused else "cpu"
    )
    _torch_adamw(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        [],
        list(steps.unbind(0)),
        fused=fused,
        foreach=not fused,
        amsgrad=False,
        beta1=betas[0],
        beta2=betas[1],
        lr=lr,
        weight_decay=weight_decay,
        eps=eps,
        maximize=False,
    )


@torch.no_grad()
def adamw_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    *,
    step: int,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
) -> None:
    """One AdamW step over a list of tensors, in place: one launch per (device, dtype) group.

    Same math as ``torch.optim.AdamW`` (amsgrad off): ``p *= 1 - lr * weight_decay``;
    ``m = lerp(m, g, 1 - beta1)``; ``v = beta2 * v + (1 - beta2) * g * g``;
    ``p -= lr / (1 - beta1**step) * m / (sqrt(v) / sqrt(1 - beta2**step) + eps)``.
    ``step`` is the 1-based number of this update (1 on the first call); start ``exp_avgs`` and
    ``exp_avg_sqs`` at zero. Math runs in fp32; results are stored in each tensor's dtype.

    Example::

        >>> import torch
        >>> from localize.kernels import adamw_step
        >>> p, g = [torch.ones(3)], [torch.ones(3)]
        >>> m, v = [torch.zeros(3)], [torch.zeros(3)]
        >>> adamw_step(p, g, m, v, step=1, lr=0.1, weight_decay=0.0)
        >>> p[0]
        tensor([0.9000, 0.9000, 0.9000])
    """
    op = "adamw_step"
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise LocalizeError(f"{op}: step must be an int >= 1 (the number of this update), got {step!r}")
    beta1, beta2 = (float(b) for b in betas)
    if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= beta1 < 1 and 0 <= beta2 < 1):
        raise LocalizeError(
            f"{op}: need lr, eps, weight_decay >= 0 and 0 <= beta < 1, got lr={lr}, eps={eps}, "
            f"weight_decay={weight_decay}, betas={tuple(betas)}"
        )
    lists = check_tensor_lists(
        op,
        {
            "params": as_tensor_list(op, "params", params),
            "grads": as_tensor_list(op, "grads", grads),
            "exp_avgs": as_tensor_list(op, "exp_avgs", exp_avgs),
            "exp_avg_sqs": as_tensor_list(op, "exp_avg_sqs", exp_avg_sqs),
        },
        written=("params", "exp_avgs", "exp_avg_sqs"),
    )
    hyper = dict(
        step=step, lr=float(lr), betas=(beta1, beta2), eps=float(eps), weight_decay=float(weight_decay)
    )
    for (device, dtype), idx in group_by_device_dtype(lists["params"]).items():
        ps, gs, ms, vs = ([lists[k][i] for i in idx] for k in ("params", "grads", "exp_avgs", "exp_avg_sqs"))
        path = verified_path("adamw_step", device, dtype)
        if path == "torch":
            _torch_adamw_step(ps, gs, ms, vs, **hyper)
        else:
            _launch_adamw(path, ps, gs, ms, vs, **hyper)


def _check_adamw(path: str, device: torch.device, dtype: torch.dtype) -> float:
    """One AdamW step (step 3) on odd sizes, against :func:`adamw_step_reference`."""
    p, g, m = (odd_tensors(device, dtype, seed) for seed in (0, 1, 2))
    v = odd_tensors(device, dtype, 3, "positive")
    want = [[x.clone() for x in xs] for xs in (p, m, v)]
    hyper = dict(step=3, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    _launch_adamw(path, p, g, m, v, **hyper)
    adamw_step_reference(want[0], g, want[1], want[2], **hyper)
    return max_diff(p + m + v, want[0] + want[1] + want[2])


register_check("adamw_step", _check_adamw)
