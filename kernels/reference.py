"""Plain-torch references for every kernel: one tensor at a time, the math in fp32, stored back.

They are the test oracle (the kernels do the same math, so low-precision results agree to rounding)
and the readable statement of what each op computes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "adamw_step_reference",
    "cross_entropy_reference",
    "ema_update_reference",
    "sgd_step_reference",
]


@torch.no_grad()
def sgd_step_reference(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor] | None = None,
    *,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
) -> None:
    """torch.optim.SGD with dampening 0; a zero momentum buffer makes the first step ``buf = d_p``."""
    for i, (p, g) in enumerate(zip(params, grads)):
        p32, d = p.float(), g.float()
        if weight_decay:
            d = d + weight_decay * p32
        if momentum:
            buf = momentum * momentum_buffers[i].float() + d
            momentum_buffers[i].copy_(buf)
            d = d + momentum * buf if nesterov else buf
        p.copy_(p32 - lr * d)


@torch.no_grad()
def adamw_step_reference(
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
    """torch.optim.AdamW (amsgrad off): decoupled decay, then the bias-corrected Adam step."""
    beta1, beta2 = betas
    step_size = lr / (1 - beta1**step)
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        p32, g32 = p.float() * (1 - lr * weight_decay), g.float()
        m32 = m.float() + (1 - beta1) * (g32 - m.float())
        v32 = beta2 * v.float() + (1 - beta2) * g32 * g32
        m.copy_(m32)
        v.copy_(v32)
        p.copy_(p32 - step_size * m32 / (v32.sqrt() / bias_correction2_sqrt + eps))


@torch.no_grad()
def ema_update_reference(
    ema_params: Sequence[torch.Tensor], params: Sequence[torch.Tensor], *, decay: float
) -> None:
    """``ema <- decay * ema + (1 - decay) * param``, in ``torch.lerp``'s two-sided form."""
    w = 1.0 - decay
    for e, p in zip(ema_params, params):
        e32, p32 = e.float(), p.float()
        e.copy_(e32 + w * (p32 - e32) if w < 0.5 else p32 - (p32 - e32) * (1 - w))


def cross_entropy_reference(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Mean softmax cross-entropy over the rows whose target is not ``ignore_index``, in fp32."""
    keep = target != ignore_index
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(1, torch.where(keep, target, 0).unsqueeze(1)).squeeze(1)
    loss = -(picked * keep).sum() / keep.sum()
    return loss.to(logits.dtype)
