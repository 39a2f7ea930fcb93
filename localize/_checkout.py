"""Running from a source checkout: its top-level ``kernels/`` folder must not stand in for the PyPI
package ``kernels``.

This project keeps ``passes/`` and ``kernels/`` as top-level folders of the checkout and installs them
as ``localize.passes`` and ``localize.kernels``. When the checkout's root is on ``sys.path`` (``python
-m pytest``, ``python -m localize``, ``torchrun -m localize`` started there), a plain ``import
kernels`` would find that folder; transformers >= 5.25 imports the PyPI package of that name (Hugging
Face's kernel hub). :func:`install` adds a finder that looks ``kernels`` up everywhere but the
checkout's root first; when no such package is installed, the import goes on as before.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from pathlib import Path
from typing import Any

__all__ = ["install"]

ROOT = Path(__file__).resolve().parents[1]


class _ElsewhereFirst(importlib.abc.MetaPathFinder):
    """Finds the top-level ``kernels`` on ``sys.path`` without the checkout's root, if it is there."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != "kernels" or path is not None:
            return None
        elsewhere = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
        return importlib.machinery.PathFinder.find_spec(name, elsewhere)


def install() -> None:
    """Add the finder once, when localize runs from a checkout whose root holds ``kernels/``."""
    if (ROOT / "kernels" / "__init__.py").is_file() and not any(isinstance(f, _ElsewhereFirst) for f in sys.meta_path):
        sys.meta_path.insert(0, _ElsewhereFirst())
