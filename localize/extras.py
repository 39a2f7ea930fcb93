"""Optional extras: what each one adds, and the one-line error when it is missing.

The base install (torch, networkx, rich, numpy) compiles, trains and writes code; the extras add
pictures (``plot``: pydot, matplotlib), ONNX files (``export``), offline datasets (``data``), Hugging
Face models and ``transformers.Trainer`` (``hf``), ``lightning.Trainer`` (``lightning``) and compiled
GPU kernels (``triton``). A part of the output that needs a
missing extra is skipped with one line that names the extra, never a traceback.

Example:
    >>> from localize.extras import require
    >>> require("json", "plot", "graph.svg").__name__
    'json'
"""

from __future__ import annotations

import importlib
from types import ModuleType

from localize.errors import LocalizeError

__all__ = ["MissingExtra", "require"]


class MissingExtra(LocalizeError):
    """An optional package is not installed; the message names the extra that brings it."""


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import ``module``, or raise :class:`MissingExtra` saying that ``what`` needs ``extra``."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(
            f"{what} needs {module.split('.')[0]}, which is not installed: pip install 'localize-learning[{extra}]'"
        ) from None
