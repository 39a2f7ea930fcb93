"""Prove the partition is sound before anything trains.

Checks, on the program graph:

* every compute node of the flat graph belongs to exactly one block, and blocks are contiguous
  in graph order (block ids never decrease);
* no autograd path crosses a boundary: every value a block reads from another block is either a
  ``detach`` cut node or needs no gradient, and every parameter a block reads that another block
  owns is read through ``detach`` (or a module call that detaches it);
* every trainable parameter is read with its gradient by one block only (its owner).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from localize.compiler.tracer import lmeta
from localize.errors import VerificationError
from localize.passes.cost import params_of
from localize.passes.find_cut_points import COMPUTE_OPS, needs_grad
from localize.passes.insert_gradient_cuts import source_of

__all__ = ["verify_isolation"]


def verify_isolation(gm: fx.GraphModule, program: fx.GraphModule) -> None:
    last = -1
    for node in gm.graph.nodes:
        if node.op not in COMPUTE_OPS:
            continue
        block = lmeta(node).get("block")
        if block is None:
            raise VerificationError(f"node {node.name} has no block")
        if block < last and not lmeta(node).get("tied"):
            raise VerificationError(f"node {node.name} is in block {block} after block {last}: blocks not contiguous")
        last = max(last, block)
    _check_owners(gm)
    by_name = {n.name: n for n in gm.graph.nodes}
    for node in program.graph.nodes:
        if node.op != "call_module":
            continue
        block = lmeta(node)["block"]
        for arg in node.all_input_nodes:
            src = source_of(program, arg)
            if src is None or src[0] == block:
                continue
            is_cut = arg.op == "call_method" and arg.target == "detach"
            original = by_name.get(src[1])
            if not is_cut and original is not None and needs_grad(gm, original):
                raise VerificationError(
                    f"block {block} reads {src[1]} from block {src[0]} without a gradient cut"
                )
        _check_params(getattr(program, node.target), block)


def _check_params(sub: fx.GraphModule, block: int) -> None:
    for node in sub.graph.nodes:
        if node.op != "get_attr":
            continue
        owner = lmeta(node).get("block", block)
        tied = lmeta(node).get("tied")
        if owner == block and not tied:
            continue
        value = sub
        for part in node.target.split("."):
            value = getattr(value, part)
        if not (isinstance(value, torch.Tensor) and value.requires_grad):
            continue
        if not all(u.op == "call_method" and u.target == "detach" for u in node.users):
            raise VerificationError(
                f"block {block} reads parameter {node.target} owned by block {owner} without detach"
            )


def _check_owners(gm: fx.GraphModule) -> None:
    readers: dict[int, set[int]] = {}
    names = {id(p): name for name, p in gm.named_parameters(remove_duplicate=False)}
    for node in gm.graph.nodes:
        if node.op not in COMPUTE_OPS or lmeta(node).get("tied"):
            continue
        for p in params_of(gm, node):
            if p.requires_grad:
                readers.setdefault(id(p), set()).add(lmeta(node)["block"])
    for key, blocks in readers.items():
        if len(blocks) > 1:
            raise VerificationError(f"parameter {names.get(key, '?')} is trained by blocks {sorted(blocks)}, not one")
