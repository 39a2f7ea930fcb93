"""``graph.svg`` (or ``graph.dot`` without Graphviz): the flat graph, nodes coloured by block, cut edges in red."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch.fx as fx

from localize.compiler.tracer import lmeta
from localize.extras import require
from localize.passes.annotate_tensors import value_info
from localize.runtime.model import LocalModel

__all__ = ["write_graph"]


_PALETTE = ["#cfe2ff", "#d1e7dd", "#fff3cd", "#f8d7da", "#e2d9f3", "#d2f4ea", "#ffe5d0", "#e9ecef"]


def write_graph(lm: LocalModel, out: Path) -> str:
    """``graph.svg`` (Graphviz) or ``graph.dot``: nodes coloured by block, cut edges in red.

    Raises :class:`~localize.extras.MissingExtra` without pydot (the ``plot`` extra)."""
    pydot = require("pydot", "plot", "graph.svg")

    gm = lm.plan.gm
    dot = pydot.Dot("localize", graph_type="digraph", rankdir="TB", fontname="Helvetica", fontsize="10")
    dot.set_node_defaults(shape="box", style="rounded,filled", fontname="Helvetica", fontsize="9")
    clusters = {}
    for bp in lm.plan.blocks:
        c = bp.cost
        label = f"block {bp.index}: {_si(c.params)} params, {_si(c.flops)} FLOPs"
        cluster = pydot.Cluster(
            f"block{bp.index}",
            label=_q(label),
            style="filled",
            fillcolor=_q(_light(bp.index)),
            color="#888888",
        )
        clusters[bp.index] = cluster
        dot.add_subgraph(cluster)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            continue
        block = lmeta(node).get("block")
        info = value_info(node)
        shape = f"\\n{tuple(info.shape)}" if info is not None and info.is_tensor else ""
        attrs = {"label": _q(f"{node.name}\\n{_op(gm, node)}{shape}")}
        if node.op in ("placeholder", "output"):
            attrs.update(shape="ellipse", fillcolor="white")
            dot.add_node(pydot.Node(_q(node.name), **attrs))
        else:
            attrs["fillcolor"] = _q(_PALETTE[block % len(_PALETTE)] if block is not None else "white")
            clusters.get(block, dot).add_node(pydot.Node(_q(node.name), **attrs))
    cut_names = {name for bp in lm.plan.blocks for name in bp.cut_inputs}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            continue
        for arg in node.all_input_nodes:
            if arg.op == "get_attr":
                continue
            src_block, dst_block = lmeta(arg).get("block"), lmeta(node).get("block")
            if (
                arg.name in cut_names
                and src_block is not None
                and dst_block is not None
                and src_block != dst_block
            ):
                edge = pydot.Edge(
                    _q(arg.name),
                    _q(node.name),
                    color="red",
                    penwidth="2",
                    style="dashed",
                    label=_q("cut"),
                    fontcolor="red",
                )
            else:
                edge = pydot.Edge(_q(arg.name), _q(node.name))
            dot.add_edge(edge)
    if shutil.which("dot"):
        try:
            dot.write_svg(str(out / "graph.svg"))
            return "graph.svg"
        except Exception:  # noqa: BLE001 - a broken Graphviz install: fall back to the source
            pass
    dot.write_raw(str(out / "graph.dot"))
    return "graph.dot"


def _q(text: str) -> str:
    return '"' + text.replace('"', '\\"') + '"'


def _light(index: int) -> str:
    return "#f8f9fa" if index % 2 == 0 else "#f1f3f5"


def _op(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return node.op


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:g}"
