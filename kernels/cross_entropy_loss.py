"""Softmax cross-entropy with the gradient computed in the forward pass: kernel, launcher, autograd.

One program per row walks the vocabulary in chunks twice: an online softmax (running max and
rescaled sum) gives the log-sum-exp and the loss, then a second sweep writes
``(softmax - onehot) / n_valid``. Backward only scales that buffer: the logits are read twice in
total, and the gradient is the only (rows, vocab) tensor created (no softmax or log-softmax).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from localize.errors import LocalizeError
from localize.kernels._backend import device_guard, jit, tl
from localize.kernels._verify import max_diff, register_check, verified_path
from localize.kernels.reference import cross_entropy_reference

__all__ = ["CrossEntropyFunction", "cross_entropy"]


@jit
def _cross_entropy_kernel(
    logits_ptr,
    logits_row_stride,
    target_ptr,
    loss_ptr,
    grad_ptr,
    grad_row_stride,
    n_valid_ptr,
    n_cols,
    ignore_index,
    HAS_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + row * logits_row_stride
    target = tl.load(target_ptr + row)
    valid = target != ignore_index
    m = float("-inf")
    d = 0.0
    x_target = 0.0
    for start in tl.range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        x_target += tl.sum(tl.where(cols == target, x, 0.0), axis=0)
        m = m_new
    lse = m + tl.log(d)
    # An out-of-range target cannot raise inside a kernel: it yields NaN instead of reading out of bounds.
    in_range = (target >= 0) & (target < n_cols)
    loss = tl.where(valid, tl.where(in_range, lse - x_target, float("nan")), 0.0)
    tl.store(loss_ptr + row, loss)
    if HAS_GRAD:
        n_valid = tl.maximum(tl.load(n_valid_ptr), 1).to(tl.float32)
        scale = tl.where(valid, 1.0 / n_valid, 0.0)
        g_row = grad_ptr + row * grad_row_stride
        for start in tl.range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            x = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            g = (tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)) * scale
            tl.store(g_row + cols, g.to(g_row.dtype.element_ty), mask=mask)


def _block_size(path: str, n_cols: int) -> tuple[int, int]:
    """(block, num_warps): whole row when small, chunks of at most 4096 (GPU) / 8192 (interpreter)."""
    block = max(16, _next_power_of_2(n_cols))
    if path == "triton":
        block = min(block, 4096)
        return block, 4 if block <= 1024 else 8
    return min(block, 8192), 4


def _next_power_of_2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def _launch_cross_entropy(path, logits, target, ignore_index, need_grad):
    n_rows, n_cols = logits.shape
    keep = target != ignore_index
    n_valid = keep.sum()
    row_loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if need_grad else row_loss
    block, num_warps = _block_size(path, n_cols)
    if n_rows > 0:
        with device_guard(logits.device):
            _cross_entropy_kernel[(n_rows,)](
                logits,
                logits.stride(0),
                target,
                row_loss,
                grad,
                grad.stride(0) if need_grad else 0,
                n_valid,
                n_cols,
                ignore_index,
                HAS_GRAD=need_grad,
                BLOCK=block,
                num_warps=num_warps,
            )
    # Same convention as F.cross_entropy: the mean over kept rows (NaN when every row is ignored).
    loss = (row_loss.sum() / n_valid).to(logits.dtype)
    return loss, (grad if need_grad else None)


class CrossEntropyFunction(torch.autograd.Function):
    """Autograd wrapper: forward returns the mean loss and keeps d(loss)/d(logits) for backward."""

    @staticmethod
    def forward(ctx, logits, target, ignore_index, path):
        loss, grad = _launch_cross_entropy(path, logits, target, ignore_index, ctx.needs_input_grad[0])
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        # The buffer is ours and used once: scale it in place rather than allocating another.
        return grad.mul_(grad_output.to(grad.dtype)), None, None, None


def _check(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> None:
    op = "cross_entropy"
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise LocalizeError(f"{op}: logits and target must be tensors")
    if logits.dim() != 2:
        raise LocalizeError(
            f"{op}: logits must be 2-D (rows, vocab), got shape {tuple(logits.shape)}; "
            "flatten leading dims with logits.reshape(-1, logits.shape[-1]) and target.reshape(-1)"
        )
    if not logits.is_floating_point():
        raise LocalizeError(f"{op}: logits must be floating point, got {logits.dtype}")
    if target.dim() != 1 or target.shape[0] != logits.shape[0]:
        raise LocalizeError(
            f"{op}: target must be 1-D with one class index per row of logits ({logits.shape[0]}), "
            f"got shape {tuple(target.shape)}"
        )
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise LocalizeError(f"{op}: target must hold integer class indices, got dtype {target.dtype}")
    if target.device != logits.device:
        raise LocalizeError(
            f"{op}: target is on {target.device} but logits on {logits.device}; move one of them"
        )
    if logits.device.type != "cuda" and target.numel() > 0:
        # Free on the host; on CUDA it would cost a synchronisation, so there bad targets give NaN.
        bad = (target != ignore_index) & ((target < 0) | (target >= logits.shape[1]))
        if bool(bad.any()):
            first = int(target[bad][0])
            raise LocalizeError(
                f"{op}: target {first} is out of range for {logits.shape[1]} classes; targets must lie in "
                f"[0, {logits.shape[1] - 1}] or equal ignore_index ({ignore_index})"
            )


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean softmax cross-entropy over rows whose target is not ``ignore_index``.

    Matches ``torch.nn.functional.cross_entropy(logits, target, ignore_index=ignore_index)`` in value
    and gradient (NaN when every row is ignored, like torch). ``logits`` is ``(rows, vocab)`` in
    float32/float16/bfloat16 (math in fp32, loss in the logits' dtype); ``target`` is ``(rows,)``.
    On the Triton paths the gradient is computed during forward and kept until backward (one
    logits-sized buffer). Out-of-range targets raise :class:`~localize.errors.LocalizeError` except
    for CUDA tensors, where checking would synchronise: there they give a NaN loss.

    Example::

        >>> import torch
        >>> from localize.kernels import cross_entropy
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]], requires_grad=True)
        >>> loss = cross_entropy(logits, torch.tensor([0, -100]))
        >>> round(loss.item(), 4)
        0.1269
    """
    _check(logits, target, ignore_index)
    path = verified_path("cross_entropy", logits.device, logits.dtype)
    if path == "torch":
        return F.cross_entropy(logits, target.long(), ignore_index=ignore_index)
    if logits.stride(1) != 1:
        logits = logits.contiguous()  # rows may be strided; each row must be contiguous
    return CrossEntropyFunction.apply(logits, target.long().contiguous(), int(ignore_index), path)


def _check_cross_entropy(path: str, device: torch.device, dtype: torch.dtype) -> float:
    """Loss and gradient on 5 rows of 37 classes (one ignored), against :func:`cross_entropy_reference`."""
    logits = torch.randn(5, 37, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    target = torch.tensor([3, -100, 36, 0, 17], device=device)
    loss, grad = _launch_cross_entropy(path, logits, target, -100, True)
    ref = logits.detach().clone().requires_grad_(True)
    want = cross_entropy_reference(ref, target)
    want.backward()
    return max_diff([loss.reshape(1), grad], [want.detach().reshape(1), ref.grad])


register_check("cross_entropy", _check_cross_entropy)
