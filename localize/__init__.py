"""localize: supervised local learning for any PyTorch model.

``localize.transform(model, blocks=K, example_inputs=(x,))`` traces the model, cuts it into K
gradient-isolated blocks at legal, balanced cut points, generates an auxiliary head per block and
returns a :class:`LocalModel` whose ``train_step`` trains every block with its own local loss.

The public names load on first use, so importing a light part of the package (``localize.kernels``,
the runtime ops a generated ``program.py`` calls) does not load the compiler.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from localize import _checkout
from localize.errors import LocalizeError
from localize.version import __version__

_checkout.install()  # a checkout's kernels/ folder never shadows the PyPI package `kernels`

if TYPE_CHECKING:
    from localize.compiler.tracer import Traced, trace
    from localize.compiler.transform import transform
    from localize.runtime.checkpoint import Checkpoint, load
    from localize.runtime.diagnose import Diagnosis, diagnose
    from localize.runtime.model import Block, LocalModel
    from localize.runtime.peak import MemoryReport, memory

_LAZY = {
    "Block": "localize.runtime.model",
    "Checkpoint": "localize.runtime.checkpoint",
    "Diagnosis": "localize.runtime.diagnose",
    "diagnose": "localize.runtime.diagnose",
    "LocalModel": "localize.runtime.model",
    "MemoryReport": "localize.runtime.peak",
    "memory": "localize.runtime.peak",
    "Traced": "localize.compiler.tracer",
    "load": "localize.runtime.checkpoint",
    "trace": "localize.compiler.tracer",
    "transform": "localize.compiler.transform",
}

__all__ = [
    "Block",
    "Checkpoint",
    "Diagnosis",
    "LocalModel",
    "LocalizeError",
    "MemoryReport",
    "Traced",
    "load",
    "trace",
    "transform",
    "__version__",
    "diagnose",
    "memory",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # once: later lookups are plain attribute reads
        return value
    raise AttributeError(f"module 'localize' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
