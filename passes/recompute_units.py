"""``recompute=True``: each unit of a block runs under ``torch.utils.checkpoint``.

A block normally keeps every activation of its forward until its local backward. With
``recompute=True`` the block is split (``torch.fx.passes.split_module``) into runs of nodes: each
unit of the model (a residual block, a transformer layer: :mod:`localize.passes.find_units`) is one
run, and the nodes between units are runs of their own. The unit runs are wrapped in
:class:`Recompute`, which calls them through ``torch.utils.checkpoint.checkpoint(...,
use_reentrant=False)``: the forward keeps only each unit's inputs, and the unit is recomputed during
the block's backward (with the RNG state it first ran with, so dropout draws the same masks). A
block then holds its unit boundaries plus one unit's activations at a time, and the gradient is the
same as without recomputation. The block's last unit is not recomputed: its backward follows its
forward at once (only the aux head runs between), so recomputing it would save nothing.

Batch-norm running statistics are updated twice for a recomputed unit in training mode (as with any
``torch.utils.checkpoint``); the trained weights are unaffected.

Example:
    >>> import torch, localize
    >>> from localize.zoo import GPT
    >>> lm = localize.transform(GPT(vocab_size=20, block_size=16, dim=16, depth=4, heads=2), blocks=2,
    ...                         example_inputs=(torch.randint(0, 20, (2, 8)),), recompute=True)
    >>> [type(m).__name__ for m in lm.recompute_programs[0].children()]
    ['GraphModule', 'Recompute', 'GraphModule']
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx
from torch import nn
from torch.fx.passes.split_module import split_module
from torch.utils.checkpoint import checkpoint

__all__ = ["Recompute", "recompute_units"]


class Recompute(nn.Module):
    """Runs ``inner`` under ``torch.utils.checkpoint`` (non-reentrant, RNG state preserved)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any) -> Any:
        return checkpoint(self.inner, *args, use_reentrant=False)


def recompute_units(block: fx.GraphModule, units: list[frozenset[str]], root: nn.Module) -> fx.GraphModule:
    """``block`` with each run of nodes of one unit (node names in ``units``) recomputed in backward."""
    owner = {name: i for i, names in enumerate(units) for name in names}
    segment: dict[fx.Node, int] = {}
    current, last = 0, None
    for node in block.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        key = owner.get(node.name)
        if key != last:  # a new unit, or the nodes between two units
            current += 1
            last = key
        segment[node] = current
    for node in block.graph.nodes:  # tensors the graph reads go with their first reader
        if node.op == "get_attr":
            segment[node] = min((segment[u] for u in node.users if u in segment), default=1)
    recomputed = {segment[n] for n in segment if n.op != "get_attr" and owner.get(n.name) is not None}
    # the block's last unit is backpropagated as soon as its loss exists: recomputing it would
    # rebuild exactly the activations its forward just freed, for one more forward and no saving
    recomputed.discard(max(recomputed, default=0))
    runs = split_module(block, root, lambda n: segment[n], keep_original_order=True)
    for node in runs.graph.nodes:
        if node.op == "call_module" and int(node.target.rpartition("_")[2]) in recomputed:
            runs.add_submodule(node.target, Recompute(runs.get_submodule(node.target)))
    runs.recompile()
    return runs
