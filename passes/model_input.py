"""Which model input a reconstruction strategy (InfoPro) rebuilds, and its vocabulary for token ids."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.fx as fx
from torch import nn

from localize.errors import ConfigError
from localize.passes.annotate_tensors import value_info
from localize.passes.find_units import is_float_value

if TYPE_CHECKING:
    from localize.compiler.plan import Plan

__all__ = ["model_input"]


def model_input(plan: Plan, name: str | None, strategy: str) -> tuple[int, fx.Node, int | None]:
    """(index among the model's inputs, placeholder, vocabulary size for token ids or None).

    ``name=None`` picks the first float input, else the first integer input read by an embedding.
    """
    placeholders = [n for n in plan.gm.graph.nodes if n.op == "placeholder"]
    names = [n.target for n in placeholders]
    if name is not None:
        if name not in names:
            raise ConfigError(
                f"aux={strategy!r} option input={name!r} is not a model input; valid inputs are {names}"
            )
        candidates = [placeholders[names.index(name)]]
    else:
        floats = [n for n in placeholders if is_float_value(n)]
        tokens = [n for n in placeholders if _vocab(plan, n) is not None]
        candidates = floats[:1] or tokens[:1]
    if not candidates:
        raise ConfigError(
            f"aux={strategy!r} reconstructs a model input, but the model has no float input and no token ids "
            f"read by an embedding (inputs {names}); pick one with aux_options={{'input': ...}} or use aux='dgl'"
        )
    node = candidates[0]
    info = value_info(node)
    if info is None or not info.is_tensor:
        raise ConfigError(f"aux={strategy!r}: model input {node.target!r} is not a tensor")
    vocab = None if info.floating else _vocab(plan, node)
    if not info.floating and vocab is None:
        raise ConfigError(
            f"aux={strategy!r}: integer input {node.target!r} is not read by an embedding, so there is nothing "
            f"to reconstruct; choose a float input with aux_options={{'input': ...}}"
        )
    return placeholders.index(node), node, vocab


def _vocab(plan: Plan, node: fx.Node) -> int | None:
    """Rows of the embedding that reads token ids ``node`` (through views), if any."""
    seen, frontier = set(), [node]
    while frontier:
        n = frontier.pop()
        if n in seen or len(seen) > 32:
            continue
        seen.add(n)
        for user in n.users:
            if user.op == "call_module":
                mod = plan.gm.get_submodule(user.target)
                if isinstance(mod, nn.Embedding):
                    return mod.num_embeddings
            name = getattr(user.target, "__name__", str(user.target))
            if "embedding" in name and user.args and isinstance(user.args[0], fx.Node):
                weight = user.args[0]
                while weight.op in ("call_method", "call_function") and "detach" in str(weight.target):
                    weight = weight.args[0]  # a tied weight is read through a detach
                if weight.op == "get_attr":
                    value = plan.gm
                    for part in weight.target.split("."):
                        value = getattr(value, part)
                    return int(value.shape[0])
                info = value_info(weight)
                if info is not None and info.is_tensor and len(info.shape) == 2:
                    return int(info.shape[0])
            if "view" in name or "reshape" in name or name in ("to", "long", "int", "contiguous"):
                frontier.append(user)
    return None
