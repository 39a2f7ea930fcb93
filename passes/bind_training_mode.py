"""Make exported dropout and batch-norm follow ``train()``/``eval()`` again.

``torch.export`` bakes the module mode into each op (``aten.dropout(x, p, False)``), and
``torch.fx`` bakes ``self.training`` wherever forward passes it as an argument
(``F.dropout(x, p, self.training)``; the tracer marks those in ``meta["localize"]["mode_args"]``).
This pass replaces such constants with the output of a :class:`TrainingFlag` module, one per
block, so that ``LocalModel.train()`` switches dropout and batch statistics exactly like the
original model. Attention dropout passed to ``scaled_dot_product_attention`` as a number, which the
export tracer marks in ``meta["localize"]["mode_values"]`` with its train-mode value
(:mod:`localize.compiler.export_modes`), becomes ``flag * p``: ``p`` in train mode, 0 in eval.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from localize.compiler.traced import lmeta

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
    flags: dict[tuple[int, bool], fx.Node] = {}
    modules: list[TrainingFlag] = []

    def flag(node: fx.Node, inverted: bool) -> fx.Node:
        block = lmeta(node).get("block", 0)
        if (block, False) not in flags:
            name = f"localize_training_{block}"
            module = TrainingFlag()
            module.train(gm.training)
            gm.add_submodule(name, module)
            modules.append(module)
            with gm.graph.inserting_before(node):
                flags[block, False] = gm.graph.call_module(name)
            lmeta(flags[block, False]).update(block=block, module="")
        if inverted and (block, True) not in flags:  # forward passed `not self.training`
            with gm.graph.inserting_after(flags[block, False]):
                flags[block, True] = gm.graph.call_function(operator.not_, (flags[block, False],))
            lmeta(flags[block, True]).update(block=block, module="")
        return flags[block, inverted]

    for node in list(gm.graph.nodes):
        index = MODE_ARGS.get(node.target) if node.op == "call_function" else None
        if index is not None and len(node.args) > index:
            node.update_arg(index, flag(node, False))
        for key, value in lmeta(node).get("mode_values", {}).items():
            with gm.graph.inserting_before(node):
                scaled = gm.graph.call_function(operator.mul, (flag(node, False), value))
            lmeta(scaled).update(block=lmeta(node).get("block", 0), module="")
            if key == "dropout_p" and len(node.args) > 4:
                node.update_arg(4, scaled)
            else:
                node.update_kwarg(key, scaled)
        for (where, key), inverted in lmeta(node).get("mode_args", ()):
            if where == "args":
                node.update_arg(key, flag(node, inverted))
            else:
                node.update_kwarg(key, flag(node, inverted))
    gm.recompile()
    return modules
