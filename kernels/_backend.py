"""Which implementation runs: compiled Triton, the Triton interpreter, or plain torch.

Triton is optional. When ``import triton`` fails, ``TRITON_AVAILABLE`` is False, ``tl`` is a stub
that only lets the kernel files be imported, and every op takes the torch path.

Triton fixes compiled-or-interpreted per process: ``@triton.jit`` reads ``TRITON_INTERPRET`` when a
function is decorated, and triton's own ``tl.max``/``tl.sum`` are decorated when triton is first
imported. So the interpreter needs ``TRITON_INTERPRET=1`` before that import, and then compiled
kernels are unavailable in the process (tests set it in ``tests/conftest.py``).
"""

from __future__ import annotations

import contextlib
import os
import types
from collections.abc import Iterator
from contextvars import ContextVar

import torch

from localize.errors import LocalizeError

try:
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    TRITON_AVAILABLE = True
    # How triton itself was imported decides the mode of its standard library (tl.max, tl.sum ...).
    INTERPRETER = isinstance(tl.max, InterpretedFunction)
except Exception:  # any failure (missing wheel, broken driver libs) means "no triton here"
    # Enough of triton.language for the kernel signatures (``BLOCK: tl.constexpr``) to be evaluated.
    tl = types.SimpleNamespace(constexpr="constexpr")
    TRITON_AVAILABLE = False
    INTERPRETER = False

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "INTERPRETER",
    "TRITON_AVAILABLE",
    "backend",
    "device_guard",
    "jit",
    "path_for",
    "tl",
    "use_backend",
]

BACKENDS = ("triton", "triton-interpret", "torch")
ENV_VAR = "LOCALIZE_KERNEL_BACKEND"

_forced: ContextVar[str | None] = ContextVar("localize_kernel_backend", default=None)


def _check_name(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise LocalizeError(
            f"unknown kernel backend {name!r} ({where}); choose one of {', '.join(map(repr, BACKENDS))}"
        )
    if name != "torch" and not TRITON_AVAILABLE:
        raise LocalizeError(
            f"kernel backend {name!r} ({where}) needs the triton package, which cannot be imported here; "
            "install it (`pip install localize-learning[triton]`) or use backend 'torch'"
        )
    if name == "triton-interpret" and not INTERPRETER:
        raise LocalizeError(
            f"kernel backend 'triton-interpret' ({where}) needs TRITON_INTERPRET=1 in the environment "
            "before triton is first imported; set it at process start or use backend 'torch'"
        )
    if name == "triton" and INTERPRETER:
        raise LocalizeError(
            f"kernel backend 'triton' ({where}) is unavailable: TRITON_INTERPRET=1 was set when triton was "
            "imported, so this process only has the interpreter; unset it or use 'triton-interpret'"
        )
    if name == "triton" and not torch.cuda.is_available():
        raise LocalizeError(
            f"kernel backend 'triton' ({where}) needs a CUDA device and none is available; "
            "use 'torch' (or 'triton-interpret' with TRITON_INTERPRET=1 for tests)"
        )
    return name


def backend() -> str:
    """Name of the kernel path that runs: ``"triton"``, ``"triton-interpret"`` or ``"torch"``.

    Chosen, first match wins: a surrounding :func:`use_backend`; the ``LOCALIZE_KERNEL_BACKEND``
    environment variable; ``"triton-interpret"`` when triton imports and ``TRITON_INTERPRET=1``
    (which rules out compiled kernels in the process); ``"triton"`` when triton imports and CUDA
    is available; ``"torch"`` otherwise. Each Triton path serves one device type, compiled: CUDA,
    interpreter: CPU; tensors elsewhere, and float64 tensors, take the torch path under it.

    Example::

        >>> import localize.kernels as K
        >>> with K.use_backend("torch"):
        ...     K.backend()
        'torch'
    """
    forced = _forced.get()
    if forced is not None:
        return forced
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return _check_name(env, f"from ${ENV_VAR}")
    if INTERPRETER:
        return "triton-interpret"
    if TRITON_AVAILABLE and torch.cuda.is_available():
        return "triton"
    return "torch"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Force the kernel path inside a ``with`` block (per thread / task; nests).

    Raises :class:`~localize.errors.LocalizeError` when ``name`` is unknown or cannot run here.

    Example::

        >>> import torch, localize.kernels as K
        >>> p, g = [torch.ones(3)], [torch.ones(3)]
        >>> with K.use_backend("torch"):
        ...     K.sgd_step(p, g, lr=0.5)
        >>> p[0]
        tensor([0.5000, 0.5000, 0.5000])
    """
    token = _forced.set(_check_name(name, "passed to use_backend"))
    try:
        yield name
    finally:
        _forced.reset(token)


# Dtypes the Triton kernels load and store; their math is always fp32. Others (float64) take torch.
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def path_for(device: torch.device, dtype: torch.dtype) -> str:
    """The path one group of tensors (one device, one dtype) takes under the current backend."""
    name = backend()
    if dtype not in _TRITON_DTYPES:
        return "torch"
    if name == "triton" and device.type == "cuda":
        return name
    # The interpreter reads memory through host pointers, so it can only follow CPU addresses.
    if name == "triton-interpret" and device.type == "cpu":
        return name
    return "torch"


@contextlib.contextmanager
def device_guard(device: torch.device) -> Iterator[None]:
    """Make ``device`` current while a compiled kernel launches (multi-GPU processes)."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            yield
    else:
        yield


def jit(fn):
    """``@triton.jit`` in the mode triton's own library was built in (see the module docstring).

    Deciding from ``tl.max`` rather than from the environment at decoration time keeps our kernels
    and the triton functions they call in the same mode. Without triton it returns ``fn`` unchanged.
    """
    if not TRITON_AVAILABLE:
        return fn
    return InterpretedFunction(fn) if INTERPRETER else JITFunction(fn)
