"""Give every node its block: ``meta["localize"]["block"]``.

Compute nodes take the block of their position; a ``get_attr`` takes the block that owns what it
reads. A parameter read by several blocks (tied input/output embeddings, a layer called twice) is
*owned by the last block that uses it*: earlier blocks read it detached, so only the owner's loss
updates it. (The last use is usually the output head, whose gradient matters most for a language
model.) A ``get_attr`` read becomes a ``detach`` node in the reading block; a module call becomes a
call of :class:`DetachedCall`, which runs the same module with the parameters it does not own
detached (``torch.func.functional_call``).
"""

from __future__ import annotations

import bisect

import torch
import torch.fx as fx
from torch import nn

from localize.compiler.tracer import lmeta
from localize.passes.cost import params_of
from localize.passes.find_cut_points import compute_nodes

__all__ = ["DetachedCall", "assign_blocks", "parameter_owners"]


class DetachedCall(nn.Module):
    """Calls ``wrapped`` with the parameters named in ``detached`` read through ``detach()``."""

    def __init__(self, wrapped: nn.Module, detached: list[str]) -> None:
        super().__init__()
        self.wrapped = wrapped
        self.detached = detached

    def forward(self, *args, **kwargs):
        params = {name: self.wrapped.get_parameter(name).detach() for name in self.detached}
        return torch.func.functional_call(self.wrapped, params, args, kwargs)


def parameter_owners(gm: fx.GraphModule) -> dict[int, int]:
    """id(parameter) -> block of the last compute node that reads it (needs blocks assigned)."""
    owner: dict[int, int] = {}
    for node in compute_nodes(gm):
        for p in params_of(gm, node):
            if p.requires_grad:
                owner[id(p)] = max(owner.get(id(p), -1), lmeta(node)["block"])
    return owner


def assign_blocks(gm: fx.GraphModule, cut_positions: list[int]) -> fx.GraphModule:
    for i, node in enumerate(compute_nodes(gm)):
        lmeta(node)["block"] = bisect.bisect_left(cut_positions, i)
    owner = parameter_owners(gm)
    for node in list(gm.graph.nodes):
        if node.op != "get_attr":
            continue
        users = sorted(node.users, key=lambda u: lmeta(u).get("block", -1))
        if not users:
            continue
        value = _fetch(gm, node.target)
        last = lmeta(users[-1]).get("block", 0)
        block = owner.get(id(value), last) if isinstance(value, torch.Tensor) else last
        lmeta(node)["block"] = block
        if not (isinstance(value, torch.Tensor) and value.requires_grad):
            continue
        others = [u for u in users if lmeta(u).get("block", block) != block]
        for reader in sorted({lmeta(u)["block"] for u in others}):
            with gm.graph.inserting_before(min((u for u in others if lmeta(u)["block"] == reader), key=_order(gm))):
                read = gm.graph.get_attr(node.target)
                det = gm.graph.call_method("detach", (read,))
            for n in (read, det):
                lmeta(n).update(block=reader, module=lmeta(node).get("module", ""), tied=node.target)
            for u in others:
                if lmeta(u)["block"] == reader:
                    u.replace_input_with(node, det)
        if not node.users:
            gm.graph.erase_node(node)
    _detach_shared_module_calls(gm, owner)
    gm.graph.lint()
    gm.recompile()
    return gm


def _detach_shared_module_calls(gm: fx.GraphModule, owner: dict[int, int]) -> None:
    """A module called in a block that does not own all its parameters reads those detached."""
    count = 0
    for node in compute_nodes(gm):
        if node.op != "call_module":
            continue
        block = lmeta(node)["block"]
        module = gm.get_submodule(node.target)
        foreign = [
            (name, p) for name, p in module.named_parameters() if p.requires_grad and owner.get(id(p), block) != block
        ]
        if not foreign:
            continue
        name = f"localize_detached_{count}"
        count += 1
        gm.add_submodule(name, DetachedCall(module, [n for n, _ in foreign]))
        node.target = name
        lmeta(node).update(detached_params=frozenset(id(p) for _, p in foreign), shared_module=True)


def _fetch(gm: fx.GraphModule, target: str) -> object:
    value: object = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _order(gm: fx.GraphModule):
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    return index.__getitem__
