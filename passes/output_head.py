"""The model's output head: what it computes after its last unit (pooling + classifier, final
norm + LM head), sliced from the flat graph so that functional ops such as ``x[:, 0]`` come along,
as a GraphModule of fresh copies. Also the copy helpers that strategies use for model layers.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import nn

from localize.passes.annotate_tensors import value_info
from localize.passes.find_units import Unit
from localize.passes.infer_layout import infer_layout

if TYPE_CHECKING:
    from localize.compiler.plan import Plan

__all__ = ["OutputHead", "output_head", "fresh_copy", "reinitialise"]


@torch.no_grad()
def reinitialise(module: nn.Module, model: nn.Module | None = None) -> nn.Module:
    """Draw fresh weights: ``reset_parameters()`` where a module has it, then the model's own
    ``_init_weights`` (the Hugging Face convention) when it defines one."""
    for m in module.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
    init = getattr(model, "_init_weights", None)
    if callable(init):
        module.apply(init)
    return module


def fresh_copy(module: nn.Module, model: nn.Module | None = None, reinit: bool = True) -> nn.Module:
    """A deep copy of ``module`` (same types and configuration, no shared storage), re-initialised."""
    clone = copy.deepcopy(module)
    for p in clone.parameters():
        p.requires_grad_(True)
    return reinitialise(clone, model) if reinit else clone


@dataclass
class OutputHead:
    """A fresh copy of what the model computes after its last unit, and the input it expects."""

    module: nn.Module
    input_shape: tuple[int, ...]
    input_layout: str


class _Unsupported(Exception):
    pass


def output_head(plan: Plan, units: list[Unit], *, reinit: bool = True) -> OutputHead | None:
    """Slice the flat graph from the last unit's output to the model output into a GraphModule of
    fresh module and parameter copies. None when that part reads more than the last unit's
    output (a skip from the model input, a mask computed from the inputs)."""
    if not units or plan.output_shape is None:
        return None
    gm = plan.gm
    by_name = {n.name: n for n in gm.graph.nodes}
    start = by_name[units[-1].output]
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    leaf = out.args[0][plan.output_index]
    unit_nodes = set().union(*(u.nodes for u in units))
    keep: set[fx.Node] = set()
    sizes: dict[fx.Node, int] = {}  # a size read from elsewhere that is one of the feature's: its dim
    stack = [leaf]
    try:
        while stack:
            n = stack.pop()
            if n is start or n in keep or n in sizes:
                continue
            dim = _feature_dim(n, start)
            if dim is not None:
                sizes[n] = dim
                continue
            if n.op == "placeholder" or n.name in unit_nodes:
                raise _Unsupported(n.name)
            keep.add(n)
            stack.extend(n.all_input_nodes)
    except _Unsupported:
        return None
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {start: graph.placeholder("feature")}
    for n, dim in sizes.items():
        env[n] = graph.call_function(torch.ops.aten.sym_size.int, (env[start], dim))
    root: dict[str, Any] = {}
    owners: dict[str, nn.Module] = {}
    for n in sorted(keep, key=order.__getitem__):
        if n.op == "call_module":
            root[n.target] = fresh_copy(gm.get_submodule(n.target), plan.model, reinit)
        elif n.op == "get_attr":
            root[n.target] = _fresh_attr(plan, gm, n.target, owners, reinit)
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(env[leaf])
    module = fx.GraphModule(root, graph, "OutputHead")
    return OutputHead(module, value_info(start).shape, infer_layout(gm, start))


def _feature_dim(node: fx.Node, feature: fx.Node) -> int | None:
    """The dim of ``feature`` whose size ``node`` reads from elsewhere (an exported graph with a
    dynamic batch or sequence reads them from the model input: ``sym_size(input_ids, 1)``), if any."""
    if node.op != "call_function" or node.target is not torch.ops.aten.sym_size.int:
        return None
    size, value = node.meta.get("val"), feature.meta.get("val")
    if not isinstance(size, torch.SymInt) or not isinstance(value, torch.Tensor):
        return None
    return next((d for d, s in enumerate(value.shape) if isinstance(s, torch.SymInt) and str(s) == str(size)), None)


def _fresh_attr(plan: Plan, gm: fx.GraphModule, target: str, owners: dict[str, nn.Module], reinit: bool):
    owner_path, _, name = target.rpartition(".")
    value = gm
    for part in target.split("."):
        value = getattr(value, part)
    try:
        owner = plan.model.get_submodule(owner_path) if owner_path else None
    except AttributeError:
        owner = None
    if owner is not None and isinstance(getattr(owner, name, None), nn.Parameter) and owner_path:
        if owner_path not in owners:
            owners[owner_path] = fresh_copy(owner, plan.model, reinit)
        return getattr(owners[owner_path], name)
    clone = value.detach().clone()
    return nn.Parameter(clone, requires_grad=True) if isinstance(value, nn.Parameter) else clone
