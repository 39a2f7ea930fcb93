"""Choose the model output that the loss reads (``transform(..., output=...)``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils import _pytree as pytree

from localize.errors import ConfigError

__all__ = ["leaf_paths", "select_output"]

Selector = str | int | Callable[[Any], Any] | None


def leaf_paths(spec: pytree.TreeSpec) -> list[tuple[Any, ...]]:
    """The key path of every leaf of an output structure (dict keys, field names, indices)."""
    if spec.is_leaf():
        return [()]
    children = list(spec.children()) if hasattr(spec, "children") else spec.children_specs
    keys: list[Any] = list(range(len(children)))
    ctx = spec.context
    if isinstance(ctx, (list, tuple)) and len(ctx) == len(children):
        keys = list(ctx)
    elif isinstance(ctx, (list, tuple)) and len(ctx) == 2 and isinstance(ctx[1], (list, tuple)):
        if len(ctx[1]) == len(children):
            keys = list(ctx[1])
    elif hasattr(spec.type, "_fields"):
        keys = list(spec.type._fields)
    out = []
    for key, child in zip(keys, children):
        out.extend((key, *p) for p in leaf_paths(child))
    return out


def select_output(spec: pytree.TreeSpec, is_tensor: list[bool], selector: Selector) -> int:
    """Index of the selected leaf among the flattened outputs."""
    paths = leaf_paths(spec)
    tensors = [i for i, t in enumerate(is_tensor) if t]
    names = [".".join(map(str, p)) or "<output>" for p in paths]
    choices = [names[i] for i in tensors]
    if selector is None:
        for i in tensors:
            if paths[i] and paths[i][-1] == "logits" and len(paths[i]) == 1:
                return i
        if len(tensors) == 1:
            return tensors[0]
        raise ConfigError(
            f"the model returns several tensors {choices} and none is called 'logits'; "
            f"pass output= naming the one the loss should read"
        )
    if callable(selector) and not isinstance(selector, (str, int)):
        marker = selector(pytree.tree_unflatten(list(range(len(paths))), spec))
        if isinstance(marker, int) and marker in tensors:
            return marker
        raise ConfigError(f"output= callable did not pick one of the output tensors {choices}; return one of them")
    for i in tensors:
        p = paths[i]
        if p and (p[0] == selector or (isinstance(selector, str) and names[i] == selector)):
            if isinstance(selector, int) or len(p) == 1 or names[i] == selector:
                return i
    raise ConfigError(f"output={selector!r} matches no output tensor; the model returns {choices}")
