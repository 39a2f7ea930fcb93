"""Split the graph into one GraphModule per block and cut gradients at every boundary.

``torch.fx.passes.split_module`` builds the *program*: a top-level GraphModule that calls
``submod_0 … submod_{K-1}``. Every activation that one block hands to another goes through a
``detach`` node (``meta["localize"]["cut"] = True``) in the program, so no autograd path crosses
a boundary; values that need no gradient (masks, sizes) are passed as they are.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.fx.passes.split_module import split_module

from localize.compiler.tracer import lmeta
from localize.passes.find_cut_points import needs_grad

__all__ = ["insert_gradient_cuts", "source_of"]


def insert_gradient_cuts(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[str, str]]:
    """Return the program GraphModule and a map from block attribute names to model paths."""
    qualname_map: dict[str, str] = {}
    by_name = {n.name: n for n in gm.graph.nodes}
    program = split_module(
        gm,
        None,
        lambda n: lmeta(n)["block"],
        qualname_map=qualname_map,
        keep_original_order=True,
        keep_original_node_name=True,
        tuple_return=True,
    )
    graph = program.graph
    for node in graph.nodes:
        if node.op == "call_module":
            lmeta(node)["block"] = int(node.target.rsplit("_", 1)[1])
    _internalize_attributes(gm, program, qualname_map)
    cuts: dict[tuple[fx.Node, int], fx.Node] = {}
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        block = lmeta(node)["block"]
        for arg in node.all_input_nodes:
            src = source_of(program, arg)
            if src is None or src[0] == block:
                continue
            original = by_name.get(src[1])
            if original is None or not needs_grad(gm, original):
                continue
            key = (arg, block)
            if key not in cuts:
                with graph.inserting_before(node):
                    cut = graph.call_method("detach", (arg,))
                cut.name = f"cut_{block}_{src[1]}"
                lmeta(cut).update(cut=True, block=block, source=src[1])
                cuts[key] = cut
            node.replace_input_with(arg, cuts[key])
    graph.lint()
    program.recompile()
    return program, qualname_map


def _internalize_attributes(gm: fx.GraphModule, program: fx.GraphModule, qualname_map: dict[str, str]) -> None:
    """split_module passes parameters read by ``get_attr`` in as block inputs; make each block own
    them instead (a ``get_attr`` inside the block), so a block is a self-contained module."""
    graph = program.graph
    buffers = {id(b) for b in gm.buffers()}
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        sub: fx.GraphModule = getattr(program, node.target)
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        keep_args = []
        for arg, ph in zip(node.args, placeholders):
            if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
                keep_args.append(arg)
                continue
            value = program
            for part in arg.target.split("."):
                value = getattr(value, part)
            name = arg.target.replace(".", "_")
            if isinstance(value, torch.nn.Parameter):
                sub.register_parameter(name, value)
            elif id(value) in buffers:
                sub.register_buffer(name, value)
            else:
                setattr(sub, name, value)
            qualname_map[f"{node.target}.{name}"] = arg.target
            body = next(n for n in sub.graph.nodes if n.op != "placeholder")
            with sub.graph.inserting_before(body):
                read = sub.graph.get_attr(name)
            read.meta = ph.meta.copy()
            ph.replace_all_uses_with(read)
            sub.graph.erase_node(ph)
        node.args = tuple(keep_args)
        sub.recompile()
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)


def source_of(program: fx.GraphModule, node: fx.Node) -> tuple[int, str] | None:
    """(block, original node name) of a program value ``getitem(submod_i, k)``; None for inputs."""
    if node.op == "call_method" and node.target == "detach":
        node = node.args[0]
    if node.op == "call_function" and node.target is operator.getitem and node.args[0].op == "call_module":
        sub = node.args[0]
        block = int(sub.target.rsplit("_", 1)[1])
        out = next(n for n in reversed(getattr(program, sub.target).graph.nodes) if n.op == "output")
        return block, out.args[0][node.args[1]].name
    return None
