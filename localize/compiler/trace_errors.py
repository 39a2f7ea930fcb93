"""Why a model could not be traced, in one line that points at the user's code, not torch's or localize's."""

from __future__ import annotations

import os
import traceback

import torch

from localize.errors import TraceError

__all__ = ["_both_failed", "_first_line", "_user_line"]


_TORCH_DIR = os.path.dirname(torch.__file__)


_LOCALIZE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the package


def _first_line(e: BaseException | None) -> str:
    if e is None:
        return ""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _user_line(e: BaseException | None) -> str:
    """' at file.py:12: `code`' for the innermost frame that belongs to the user, if any."""
    if e is None or e.__traceback__ is None:
        return ""
    user = None
    for frame in traceback.extract_tb(e.__traceback__):
        f = os.path.abspath(frame.filename)
        if f.startswith(_TORCH_DIR) or f.startswith(_LOCALIZE_DIR) or f.startswith("<"):
            continue
        if os.sep + "contextlib.py" in f or f.startswith(os.path.dirname(os.__file__) + os.sep + "importlib"):
            continue
        user = frame
    if user is None:
        return ""
    return f" at {user.filename}:{user.lineno}: `{(user.line or '').strip()}`"


_DATA_HINT = (
    "if forward branches on tensor values, rewrite the branch with torch.cond or torch.where, "
    "or make it depend on shapes/flags only; you can also move the dynamic part outside the model"
)


# (words in the tracers' messages, the construct they mean, what to do), first match wins
_CONSTRUCTS = (
    (
        ("numpy", "__array"),
        "a NumPy call on a tensor",
        "use the torch function instead (torch.tanh for np.tanh, ...), or do the NumPy part outside the model",
    ),
    (("data-dependent", "control flow", "guard"), "data-dependent control flow", _DATA_HINT),
)


def _both_failed(model, fx_error, export_error) -> TraceError:
    text = f"{_first_line(fx_error)} {_first_line(export_error)}".lower()
    what, hint = "an unsupported construct", _DATA_HINT
    for words, construct, todo in _CONSTRUCTS:
        if any(w in text for w in words):
            what, hint = construct, todo
            break
    return TraceError(
        f"cannot capture {type(model).__name__}: {what}{_user_line(export_error) or _user_line(fx_error)}. "
        f"torch.fx said: {_first_line(fx_error)}. torch.export said: {_first_line(export_error)}. "
        f"What to do: {hint}."
    )
