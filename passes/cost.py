"""Cost model: parameters, FLOPs and activation bytes per node.

FLOPs come from ``torch.utils.flop_counter`` (matmul, conv, bmm, attention), recorded by
:func:`annotate_tensors`; every other op is charged one FLOP per output element so that long
chains of cheap ops still weigh something. A parameter is charged to the first node that uses it.
Activation bytes are what autograd saves for the node's backward on the example run (measured
with ``saved_tensors_hooks``, each storage counted once).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from localize.compiler.tracer import lmeta
from localize.passes.annotate_tensors import value_info

__all__ = ["Cost", "annotate_costs", "node_cost", "params_of"]


@dataclass(frozen=True)
class Cost:
    params: int = 0
    flops: int = 0
    activation_bytes: int = 0

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            self.params + other.params,
            self.flops + other.flops,
            self.activation_bytes + other.activation_bytes,
        )

    def get(self, metric: str) -> int:
        return {"params": self.params, "flops": self.flops, "memory": self.activation_bytes}[metric]


def params_of(gm: fx.GraphModule, node: fx.Node) -> list[torch.Tensor]:
    """Parameters a node reads directly (a call_module's own, or get_attr arguments); a module call
    that reads some parameters detached (``meta["localize"]["detached_params"]``) does not count those."""
    out: list[torch.Tensor] = []
    if node.op == "call_module":
        detached = lmeta(node).get("detached_params", ())
        out.extend(p for p in gm.get_submodule(node.target).parameters() if id(p) not in detached)
    for arg in node.all_input_nodes:
        if arg.op == "get_attr":
            value = _fetch_attr(gm, arg.target)
            if isinstance(value, torch.nn.Parameter):
                out.append(value)
    return out


def _fetch_attr(gm: fx.GraphModule, target: str) -> object:
    obj: object = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def node_cost(node: fx.Node) -> Cost:
    return lmeta(node).get("cost", Cost())


def annotate_costs(gm: fx.GraphModule) -> fx.GraphModule:
    """Set ``meta["localize"]["cost"]`` on every compute node."""
    seen: set[int] = set()
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        params = 0
        for p in params_of(gm, node):
            if id(p) not in seen:
                seen.add(id(p))
                params += p.numel()
        info = value_info(node)
        flops = lmeta(node).get("flops", 0)
        act = lmeta(node).get("saved_bytes")
        if info is not None and info.is_tensor:
            flops += _numel(info.shape)
        if act is None:  # no example run: estimate by the output size
            act = info.nbytes if info is not None and info.requires_grad else 0
        lmeta(node)["cost"] = Cost(params, flops, act)
    return gm


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
