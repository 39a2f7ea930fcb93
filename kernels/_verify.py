"""Trust a Triton kernel on a (device, dtype) only after it matched the torch reference there.

The compiled kernels are the default on CUDA, and a new GPU, driver or triton release can miscompile
them. So the first time a kernel would run on a path, device and dtype, :func:`verified_path` runs it
once on small odd-sized tensors and compares it with :mod:`localize.kernels.reference`. A mismatch or a
failure to compile makes that (kernel, device, dtype) take the torch path for the rest of the process,
with one ``RuntimeWarning`` that says why; a match costs nothing after the first call.

Example::

    >>> import torch
    >>> from localize.kernels._verify import verified_path
    >>> verified_path("sgd_step", torch.device("cpu"), torch.float64)  # float64 always takes torch
    'torch'
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from localize.kernels._backend import path_for

__all__ = ["forget_checks", "max_diff", "odd_tensors", "register_check", "verified_path"]

# kernel -> check(path, device, dtype) -> largest |kernel - reference| on a small case
_CHECKS: dict[str, Callable[[str, torch.device, torch.dtype], float]] = {}
_VERDICT: dict[tuple[str, str, str, torch.dtype], bool] = {}
_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def register_check(kernel: str, check: Callable[[str, torch.device, torch.dtype], float]) -> None:
    """Register how to test ``kernel`` against its reference (each op file registers its own)."""
    _CHECKS[kernel] = check


def forget_checks() -> None:
    """Check every kernel again on next use (tests; a process that changed triton's cache)."""
    _VERDICT.clear()


def verified_path(kernel: str, device: torch.device, dtype: torch.dtype) -> str:
    """The path ``kernel`` takes for ``device`` and ``dtype``: :func:`path_for`'s choice once that
    kernel has matched its reference there, else ``"torch"``."""
    path = path_for(device, dtype)
    if path == "torch" or kernel not in _CHECKS:
        return path
    key = (kernel, path, str(device), dtype)
    verdict = _VERDICT.get(key)
    if verdict is None:
        _VERDICT[key] = True  # while the check runs, the kernel takes its own path
        try:
            error = _CHECKS[kernel](path, device, dtype)
            verdict = error <= _TOLERANCE.get(dtype, 1e-4)
            why = f"differs from the torch reference by {error:.3g}"
        except Exception as e:  # noqa: BLE001 - a compile or launch failure is a verdict too
            verdict = False
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            why = f"failed ({type(e).__name__}: {first[:200]})"
        _VERDICT[key] = verdict
        if not verdict:
            warnings.warn(
                f"localize.kernels: the {path} {kernel} kernel on {device} {str(dtype).removeprefix('torch.')} "
                f"{why}; that combination uses torch's fused path from now on",
                RuntimeWarning,
                stacklevel=3,
            )
    return path if verdict else "torch"


def odd_tensors(device: torch.device, dtype: torch.dtype, seed: int, kind: str = "normal") -> list[torch.Tensor]:
    """Small tensors of odd sizes (a partial block, several chunks) for a kernel's check."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 5), (1025,), (7,)]
    if kind == "positive":
        return [(torch.rand(s, generator=g) * 0.1).to(device, dtype) for s in shapes]
    return [torch.randn(s, generator=g).to(device, dtype) for s in shapes]


def max_diff(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(float((a.float() - b.float()).abs().max()) for a, b in zip(got, want, strict=True))
