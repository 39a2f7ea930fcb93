"""Launch settings shared by the kernels: block sizes per path, dtype mapping, torch fused support."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from localize.kernels._backend import tl

__all__ = ["LaunchConfig", "fused_supported", "launch_config", "triton_dtype"]


@dataclass(frozen=True)
class LaunchConfig:
    block: int  # elements per loop iteration (one vector of the program)
    chunk: int  # elements per program; a multiple of block
    num_warps: int


# Compiled: 64K-element chunks keep the launch table small for billion-parameter models (not yet
# tuned on a GPU). Interpreted (tests, CPU): small chunks, so the tested sizes cross chunk boundaries.
_CONFIGS = {
    "triton": LaunchConfig(block=1024, chunk=65536, num_warps=4),
    "triton-interpret": LaunchConfig(block=1024, chunk=4096, num_warps=4),
}


def launch_config(path: str) -> LaunchConfig:
    return _CONFIGS[path]


def triton_dtype(dtype: torch.dtype):
    """The triton.language dtype kernels load and store for a torch dtype."""
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


@cache
def _fused_devices() -> frozenset[str]:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return frozenset(_get_fused_kernels_supported_devices())
    except Exception:  # private torch helper: if it moves, assume the devices torch 2.4+ supports
        return frozenset({"cpu", "cuda"})


def fused_supported(op: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether to use torch's fused optimizer kernel (``fused=True``) for ``op``; else foreach."""
    if op == "sgd" and device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        # torch 2.12/2.13 fused CPU SGD skips the vectorised part of fp16/bf16 updates
        # (pytorch/pytorch#191763, fixed after 2.13 by #192545).
        return False
    return device.type in _fused_devices()
