"""``recompute=True``: each unit of a block runs under ``torch.utils.checkpoint``.

A block normally keeps every activation of its forward until its local backward. With
``recompute=True`` the block is split (``torch.fx.passes.split_module``) into runs of nodes: each
unit of the model (a residual block, a transformer layer: :mod:`localize.passes.find_units`) is one
run, and the nodes between units are runs of their own. The unit runs are wrapped in
:class:`Recompute`, which calls them through ``torch.utils.checkpoint.checkpoint(...,
use_reentrant=False)``: the forward keeps only each unit's inputs, and the unit is recomputed during
the block's backward (with the RNG state it first ran with, so dropout draws the same masks). A
block then holds its unit boundaries plus one unit's activations at a time, and the gradient is the
same as without recomputation. The block's last run is not recomputed: its backward follows its
forward at once (only the aux head runs between), so recomputing it would save nothing.

A block with few units may recompute each of them as shorter runs: :func:`split_at` cuts a unit
where a single activation crosses inside it (a pre-norm transformer layer, between its attention
and its MLP), and :func:`choose_runs` keeps that split when it lowers the block's estimated peak
(more boundaries kept, half a unit rebuilt at a time). A residual unit whose skip spans the whole of
it (a ResNet block) has no such place.

Batch-norm running statistics are updated twice for a recomputed unit in training mode (as with any
``torch.utils.checkpoint``); the trained weights are unaffected.

Example:
    >>> import torch, localize
    >>> from localize.zoo import GPT
    >>> lm = localize.transform(GPT(vocab_size=20, block_size=16, dim=16, depth=4, heads=2), blocks=2,
    ...                         example_inputs=(torch.randint(0, 20, (2, 8)),), recompute=True)
    >>> [type(m).__name__ for m in lm.recompute_programs[0].children()]  # 2 layers: 4 halves, the last kept
    ['GraphModule', 'Recompute', 'Recompute', 'Recompute', 'GraphModule']
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx
from torch import nn
from torch.fx.passes.split_module import split_module
from torch.utils.checkpoint import checkpoint

from localize.passes.annotate_tensors import value_info
from localize.passes.cost import node_cost

__all__ = ["Recompute", "choose_runs", "recompute_units", "split_at"]


class Recompute(nn.Module):
    """Runs ``inner`` under ``torch.utils.checkpoint`` (non-reentrant, RNG state preserved)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any) -> Any:
        return checkpoint(self.inner, *args, use_reentrant=False)


def split_at(units: list[frozenset[str]], after: set[str], order: dict[str, int]) -> list[frozenset[str]]:
    """Each unit cut into runs after the nodes named in ``after`` (the places inside a unit where one
    activation crosses, e.g. a pre-norm transformer layer's stream between its attention and its MLP:
    :func:`localize.passes.find_cut_points.find_cut_points` with ``inside_units=True``).

    Example:
        >>> split_at([frozenset({"ln", "attn", "add", "mlp", "add_1"})], {"add"},
        ...          {"ln": 0, "attn": 1, "add": 2, "mlp": 3, "add_1": 4}) == [
        ...     frozenset({"ln", "attn", "add"}), frozenset({"mlp", "add_1"})]
        True
    """
    out = []
    for names in units:
        ordered = sorted(names, key=order.__getitem__)
        run: list[str] = []
        for name in ordered:
            run.append(name)
            if name in after and name != ordered[-1]:
                out.append(frozenset(run))
                run = []
        if run:
            out.append(frozenset(run))
    return out


def choose_runs(
    coarse: list[frozenset[str]], fine: list[frozenset[str]], nodes: dict[str, fx.Node]
) -> list[frozenset[str]]:
    """Of two ways to cut a block's units into recomputed runs, the one with the smaller estimated
    peak: the boundaries kept until the block's backward (each run's output but the last's) plus the
    largest run's activations (alive while it is backpropagated). Finer runs keep more boundaries and
    rebuild less at a time: worth it with few units per block, not with many.

    Bytes come from the example run (``meta["localize"]["cost"]`` and ``value_info``): only their
    ratios matter, and they scale alike with the batch.
    """
    order = {n: i for i, n in enumerate(nodes)}

    def peak(runs: list[frozenset[str]]) -> int:
        if not runs:
            return 0
        saved = [sum(node_cost(nodes[n]).activation_bytes for n in r) for r in runs]
        outs = [value_info(nodes[max(r, key=order.__getitem__)]) for r in runs[:-1]]
        return sum(info.nbytes for info in outs if info is not None) + max(saved)

    return fine if peak(fine) < peak(coarse) else coarse


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
