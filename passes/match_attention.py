"""Recognise attention written out by hand, so chunks can carry it like ``scaled_dot_product_attention``.

Many models (nanoGPT, older research code) write causal attention as ops::

    att = (q @ k.transpose(-2, -1)) * scale
    att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))   # or + an additive mask
    att = F.softmax(att, dim=-1)
    att = self.attn_dropout(att)
    y = att @ v

Its scores hold two sequence dims (T x T), which no chunk can carry. :func:`match_attention` starts
at a ``q @ kT`` whose result has two sequence dims and follows its single-user chain through scalings,
a mask built from positions only (``masked_fill`` or an additive mask), softmax over the last dim,
dropout and dtype casts, to the ``@ v`` that ends it. The region is accepted only if, on the example
(eval mode), it equals ``scaled_dot_product_attention(q, k, v, is_causal=True, scale=s)``: the proof,
whatever the mask's code. :mod:`localize.passes.chunk_sequence` then replaces the final matmul by the
chunk's causal attention over the carried keys and values; the rest of the region is dead code there.

Example:
    >>> import torch, localize
    >>> class Att(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.qkv = torch.nn.Linear(8, 24)
    ...         self.register_buffer("bias", torch.ones(16, 16).tril())
    ...     def forward(self, x):
    ...         q, k, v = self.qkv(x).split(8, dim=-1)
    ...         att = (q @ k.transpose(-2, -1)) / 8 ** 0.5
    ...         att = att.masked_fill(self.bias[: x.size(1), : x.size(1)] == 0, float("-inf"))
    ...         return att.softmax(-1) @ v
    >>> from localize.compiler.tracer import trace
    >>> from localize.passes.find_sequence_ops import find_sequence_ops
    >>> x = torch.randn(2, 10, 8)
    >>> traced = trace(Att(), (x,), seq_dim=1)  # fx cannot slice by x.size(1): torch.export, T dynamic
    >>> facts = find_sequence_ops(traced.gm, [x])
    >>> sorted((f.rule, round(f.info[3], 4)) for f in facts.values() if f.rule == "attention_matmul")
    [('attention_matmul', 0.3536)]
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = ["AttentionMatch", "match_attention"]

AttentionMatch = tuple[list[fx.Node], fx.Node, tuple[str, str, str, float, Any]]  # region, end, info

_MATMUL = {operator.matmul, torch.matmul, torch.bmm, torch.ops.aten.matmul.default, torch.ops.aten.bmm.default}
_SOFTMAX = {F.softmax, torch.softmax, torch.ops.aten._softmax.default, torch.ops.aten.softmax.int}
_DROPOUT = {F.dropout, torch.dropout, torch.ops.aten.dropout.default}


def _matmul(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _MATMUL) or (
        node.op == "call_method" and node.target in ("matmul", "bmm", "__matmul__")
    )


def _name(node: fx.Node) -> str:
    """What a node calls, by name: ``"div"`` for ``x / 2``, ``x.div(2)`` and ``aten.div.Tensor``."""
    if node.op == "call_method":
        return str(node.target)
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target.overloadpacket.__name__
    names = {operator.mul: "mul", operator.truediv: "truediv", operator.add: "add"}
    return names.get(node.target, getattr(node.target, "__name__", ""))


def _reads_values(node: fx.Node) -> bool:
    """Whether ``node`` depends on an input's values (not only on its sizes): a padding mask does,
    a causal mask built from ``x.size(1)`` does not. (The mask comes after the scores in graph order,
    before its facts exist, so this walks the graph itself.)"""
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            return True
        if _name(n) in ("size", "sym_size") or (n.op == "call_function" and n.target is getattr):
            continue  # reads the shape, device or dtype only
        stack.extend(n.all_input_nodes)
    return False


def _scalar(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    return None


def match_attention(gm: fx.GraphModule, scores: fx.Node, env: dict, facts: dict) -> AttentionMatch | None:
    """The hand-written causal attention starting at ``scores`` (``q @ kT``), or None."""
    if not _matmul(scores) or len(scores.args) < 2:
        return None
    q, kt = scores.args[0], scores.args[1]
    if not all(isinstance(a, fx.Node) for a in (q, kt)):
        return None
    if facts[q.name].dims != (-2,) or facts[kt.name].dims != (-1,):
        return None
    region, node, scale, dropout = [scores], scores, 1.0, None
    while True:
        users = list(node.users)
        if len(users) != 1:
            return None
        u = users[0]
        other = [a for a in (*u.args, *u.kwargs.values()) if a is not node]
        name = _name(u)
        if _matmul(u) and u.args[0] is node and isinstance(u.args[1], fx.Node):
            v = u.args[1]
            if facts[v.name].dims != (-2,):
                return None
            break
        if name in ("mul", "truediv", "div", "__mul__", "__truediv__"):
            factors = [_scalar(env[a]) if isinstance(a, fx.Node) else _scalar(a) for a in other]
            if len(factors) != 1 or factors[0] is None or factors[0] == 0:
                return None
            scale = scale * factors[0] if "mul" in name else scale / factors[0]
        elif name in ("masked_fill", "masked_fill_"):
            mask = u.args[1] if len(u.args) > 1 else u.kwargs.get("mask")
            if not isinstance(mask, fx.Node) or _reads_values(mask):
                return None
        elif name in ("add", "__add__"):
            if not all(isinstance(a, fx.Node) and not _reads_values(a) for a in other):
                return None
        elif u.target in _SOFTMAX or name in ("softmax", "_softmax"):
            dim = u.kwargs.get("dim", u.args[1] if len(u.args) > 1 else None)
            if dim not in (-1, env[node].dim() - 1):
                return None
        elif u.op == "call_module" and isinstance(gm.get_submodule(u.target), nn.Dropout):
            dropout = ("module", u.target)
        elif u.target in _DROPOUT:
            p = u.kwargs.get("p", u.args[1] if len(u.args) > 1 else 0.5)
            training = u.kwargs.get("training", u.args[2] if len(u.args) > 2 else True)
            dropout = ("function", p, training)
        elif name in ("to", "float", "type_as", "_to_copy"):
            pass
        else:
            return None
        region.append(u)
        node = u
    end = list(node.users)[0]
    if not _equals_causal_sdpa(env, q, kt, v, end, scale):
        return None
    return region, end, (q.name, kt.name, v.name, scale, dropout)


def _equals_causal_sdpa(env: dict, q: fx.Node, kt: fx.Node, v: fx.Node, end: fx.Node, scale: float) -> bool:
    query, key, value, out = env[q], env[kt].transpose(-2, -1), env[v], env[end]
    if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in (query, key, value, out)):
        return False
    want = F.scaled_dot_product_attention(query.float(), key.float(), value.float(), is_causal=True, scale=scale)
    err = float((want - out.float()).abs().max()) if want.shape == out.shape else math.inf
    return err <= 1e-4 * (1.0 + float(want.abs().max()))
