"""Give every node its block: ``meta["localize"]["block"]``.

Compute nodes take the block of their position; a ``get_attr`` takes the block of its first user.
A parameter read by several blocks (tied input/output embeddings) is *owned by the last block
that uses it*: earlier blocks read it through a ``detach`` node, so only the owner's loss updates
it. (The last use is usually the output head, whose gradient matters most for a language model.)
"""

from __future__ import annotations

import bisect

import torch
import torch.fx as fx

from localize.passes.find_cut_points import compute_nodes
from localize.tracer import lmeta

__all__ = ["assign_blocks"]


def assign_blocks(gm: fx.GraphModule, cut_positions: list[int]) -> fx.GraphModule:
    for i, node in enumerate(compute_nodes(gm)):
        lmeta(node)["block"] = bisect.bisect_left(cut_positions, i)
    for node in list(gm.graph.nodes):
        if node.op != "get_attr":
            continue
        users = sorted(node.users, key=lambda u: lmeta(u).get("block", -1))
        if not users:
            continue
        owner = lmeta(users[-1]).get("block", 0)
        lmeta(node)["block"] = owner
        value = gm
        for part in node.target.split("."):
            value = getattr(value, part)
        if not (isinstance(value, torch.Tensor) and value.requires_grad):
            continue
        others = [u for u in users if lmeta(u).get("block", owner) != owner]
        for block in sorted({lmeta(u)["block"] for u in others}):
            with gm.graph.inserting_before(min((u for u in others if lmeta(u)["block"] == block), key=_order(gm))):
                read = gm.graph.get_attr(node.target)
                det = gm.graph.call_method("detach", (read,))
            for n in (read, det):
                lmeta(n).update(block=block, module=lmeta(node).get("module", ""), tied=node.target)
            for u in others:
                if lmeta(u)["block"] == block:
                    u.replace_input_with(node, det)
    gm.graph.lint()
    gm.recompile()
    return gm


def _order(gm: fx.GraphModule):
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    return index.__getitem__
