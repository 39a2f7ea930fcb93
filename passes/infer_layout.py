"""Read a tensor's layout from the graph: channels-first, channels-last or flat.

Walking back from a value (or forward from a model input), the first op that fixes a layout
decides: conv, batch-norm and pooling are channels-first; linear, layer-norm, embedding and matmul
are channels-last. Without such an op the rank decides.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.fx as fx

from localize.passes.annotate_tensors import value_info
from localize.passes.assign_blocks import DetachedCall

__all__ = ["infer_layout", "input_layout"]

_FIRST = ("conv", "batch_norm", "batchnorm", "pool", "instance_norm", "group_norm", "upsample", "interpolate")


_LAST = ("linear", "layer_norm", "layernorm", "embedding", "matmul", "addmm", "bmm", "scaled_dot_product", "rms_norm", "rmsnorm")


def _op_name(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        module = module.wrapped if isinstance(module, DetachedCall) else module
        return type(module).__name__.lower()
    if node.op == "call_method":
        return str(node.target).lower()
    return getattr(node.target, "__name__", str(node.target)).lower()


def infer_layout(gm: fx.GraphModule, node: fx.Node) -> str:
    """"channels_first", "channels_last" or "flat" for a tensor-valued node, read backwards from
    the ops that made it."""
    return _first_layout(gm, node, [node], lambda n: [a for a in n.all_input_nodes if a.op != "get_attr"])


def input_layout(gm: fx.GraphModule, node: fx.Node) -> str:
    """Layout of a model input, read from the first op after it that fixes one (a conv reads
    channels-first, a linear channels-last); by rank when none does."""
    return _first_layout(gm, node, list(node.users), lambda n: list(n.users))


def _first_layout(
    gm: fx.GraphModule, node: fx.Node, start: list[fx.Node], neighbours: Callable[[fx.Node], list[fx.Node]]
) -> str:
    """Breadth-first from ``start`` (at most 65 ops): the first op that fixes a layout decides."""
    info = value_info(node)
    ndim = len(info.shape) if info is not None and info.is_tensor else 0
    if ndim <= 2:
        return "flat"
    seen, frontier = set(), start
    while frontier and len(seen) <= 64:
        n = frontier.pop(0)
        if n in seen or n.op not in ("call_module", "call_function", "call_method"):
            continue
        seen.add(n)
        name = _op_name(gm, n)
        if any(k in name for k in _FIRST):
            return "channels_first"
        if any(k in name for k in _LAST):
            return "channels_last"
        frontier.extend(neighbours(n))
    return "channels_first" if ndim >= 4 else "channels_last"
