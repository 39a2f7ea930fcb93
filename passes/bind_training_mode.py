"""Make exported dropout and batch-norm follow ``train()``/``eval()`` again.

``torch.export`` bakes the module mode into each op (``aten.dropout(x, p, False)``). This pass
replaces that constant with the output of a :class:`TrainingFlag` module, one per block, so that
``LocalModel.train()`` switches dropout and batch statistics exactly like the original model.
(Attention dropout inside ``scaled_dot_product_attention`` stays as exported, i.e. off.)
"""

from __future__ import annotations

import torch
import torch.fx as fx

from localize.tracer import lmeta

__all__ = ["TrainingFlag", "bind_training_mode", "MODE_ARGS"]

_aten = torch.ops.aten
# op -> index of its `training` argument
MODE_ARGS = {
    _aten.dropout.default: 2,
    _aten.feature_dropout.default: 2,
    _aten.alpha_dropout.default: 2,
    _aten.feature_alpha_dropout.default: 2,
    _aten.batch_norm.default: 5,
}


class TrainingFlag(torch.nn.Module):
    """Returns whether it is in training mode; its ``training`` follows ``Module.train()``."""

    def forward(self) -> bool:
        return self.training


def bind_training_mode(gm: fx.GraphModule) -> list[TrainingFlag]:
    """Rewrite mode-dependent ops in place; return the flag modules (one per block using them)."""
    flags: dict[int, fx.Node] = {}
    modules: list[TrainingFlag] = []
    for node in list(gm.graph.nodes):
        index = MODE_ARGS.get(node.target) if node.op == "call_function" else None
        if index is None or len(node.args) <= index:
            continue
        block = lmeta(node).get("block", 0)
        if block not in flags:
            name = f"localize_training_{block}"
            module = TrainingFlag()
            module.train(gm.training)
            gm.add_submodule(name, module)
            modules.append(module)
            with gm.graph.inserting_before(node):
                flags[block] = gm.graph.call_module(name)
            lmeta(flags[block]).update(block=block, module="")
        args = list(node.args)
        args[index] = flags[block]
        node.args = tuple(args)
    gm.recompile()
    return modules
