"""The default local loss, and the check that a target fits it."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from localize.errors import TargetError

__all__ = ["LossFn", "cross_entropy_last_dim", "check_target"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_target(pred: torch.Tensor, target: torch.Tensor) -> None:
    """Raise TargetError unless ``target`` fits cross-entropy over ``pred``'s last dim."""
    if not isinstance(target, torch.Tensor):
        raise TargetError(f"target must be a tensor, got {type(target).__name__}")
    if target.is_floating_point():
        if target.shape != pred.shape:
            raise TargetError(
                f"a float target (class probabilities) must have the prediction's shape {tuple(pred.shape)}, "
                f"got {tuple(target.shape)}; pass class indices of shape {tuple(pred.shape[:-1])} instead"
            )
        return
    if target.dtype in (torch.bool, torch.complex64, torch.complex128):
        raise TargetError(f"target dtype {target.dtype} is not class indices; use torch.long")
    if target.shape != pred.shape[:-1]:
        raise TargetError(
            f"target of shape {tuple(target.shape)} does not fit logits of shape {tuple(pred.shape)}: "
            f"cross-entropy over the last dim needs class indices of shape {tuple(pred.shape[:-1])}; "
            f"pass loss_fn= for another kind of target"
        )


def cross_entropy_last_dim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the last dim, leading dims flattened: (B, C) with (B,), (B, T, V) with (B, T)."""
    check_target(pred, target)
    if target.is_floating_point():
        return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1, pred.shape[-1]))
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1).long())
