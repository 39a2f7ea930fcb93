"""Generate each block's auxiliary head from the graph.

For every block but the last, the head reads the block's *primary activation*: the largest value
that needs a gradient and crosses the block's end cut. Its layout is read from the graph: walking
back from the activation, the first op that fixes a layout decides (conv, batch-norm and pooling
are channels-first; linear, layer-norm, embedding and matmul are channels-last). The head maps it
to the shape of the model output the loss reads, so one loss serves all blocks.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from localize.aux import AuxSpec, build_aux
from localize.compiler.plan import Plan
from localize.compiler.tracer import lmeta
from localize.passes.annotate_tensors import value_info
from localize.passes.cost import params_of
from localize.passes.infer_layout import infer_layout

__all__ = ["insert_aux_heads", "choose_primary"]







def choose_primary(plan: Plan, block: int) -> str | None:
    """Name (in the flat graph) of the activation block ``block`` hands on that its head reads.

    When several activations leave the block (a U-Net's skips, an encoder output beside the
    decoder state) the head reads the one computed from most of the block's trainable parameters,
    so that its loss trains the whole block; ties go to the one computed last, then the largest.
    """
    gm = plan.gm
    by_name = {n.name: n for n in gm.graph.nodes}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    later = {name for b in plan.blocks[block + 1 :] for name in b.cut_inputs}
    best, best_key = None, None
    for name in plan.blocks[block].outputs:
        node = by_name.get(name)
        if node is None or name not in later:
            continue
        info = value_info(node)
        if info is None or not info.is_tensor or not info.floating or not info.requires_grad:
            continue
        key = (_trained_by(gm, node, block), order[node], info.nbytes)
        if best_key is None or key > best_key:
            best, best_key = name, key
    return best


def _trained_by(gm: fx.GraphModule, node: fx.Node, block: int) -> int:
    """How many trainable parameter elements of ``block`` the value ``node`` is computed from."""
    seen: set[fx.Node] = set()
    params: dict[int, int] = {}
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen or lmeta(n).get("block") != block:
            continue
        seen.add(n)
        if n.op in ("call_module", "call_function", "call_method") and not lmeta(n).get("tied"):
            for p in params_of(gm, n):
                if p.requires_grad:
                    params[id(p)] = p.numel()
        stack.extend(n.all_input_nodes)
    return sum(params.values())


def insert_aux_heads(plan: Plan, context: object = None) -> list[nn.Module | None]:
    """Build one head per block (None for the last block, which uses the model's own output)."""
    heads: list[nn.Module | None] = []
    by_name = {n.name: n for n in plan.gm.graph.nodes}
    for block in plan.blocks[:-1]:
        block.primary = choose_primary(plan, block.index)
        if block.primary is None:
            heads.append(None)
            continue
        node = by_name[block.primary]
        info = value_info(node)
        block.feature_shape = info.shape
        block.feature_layout = infer_layout(plan.gm, node)
        lmeta(node)["aux"] = plan.aux
        spec = AuxSpec(
            block=block.index,
            blocks=plan.num_blocks,
            feature_shape=info.shape,
            feature_layout=block.feature_layout,
            output_shape=plan.output_shape,
            output_layout=plan.output_layout,
            options=dict(plan.aux_options),
            context=context,
        )
        head = build_aux(plan.aux, spec)
        heads.append(head.to(_device_of(node, plan)))
    heads.append(None)
    return heads


def _device_of(node: fx.Node, plan: Plan) -> torch.device:
    for p in plan.gm.parameters():
        return p.device
    return torch.device("cpu")
