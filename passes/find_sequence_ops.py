"""Prove that a model can be trained chunk by chunk along its sequence, and say how each op carries it.

Chunk-wise training (SeCO / SpaCO, :mod:`localize.runtime.chunks`) runs a block on positions
``[s, s + C)`` at a time. That computes what the whole sequence computes only if no op reads a later
position, and if every op that reads earlier positions gets them from a *carried state*. This pass
decides both from the graph and two example runs:

1. **Which dims are the sequence.** The graph runs on the example inputs at length T and at T - 1
   (inputs narrowed along ``seq_dim``, default 1); a dim of a value whose size moves with T runs along
   the sequence. Values whose *content* moves with T without such a dim are lengths (``x.size(1)``).
2. **What each op does along it.** Ops localize knows how to carry are recognised by what they are:
   causal ``scaled_dot_product_attention`` (keys and values carried), ``nn.RNN``/``nn.LSTM``/``nn.GRU``
   (hidden state), ``cumsum`` (running total), ``F.pad`` on the left (last positions), ``torch.arange``
   of a length and ``table[:, :T]`` slices (offset by the chunk's start). Every other op that reads a
   sequence is *probed* on its real example inputs: perturb the positions at and after ``t`` and the
   outputs before ``t`` must not move (else it reads later positions: bidirectional attention, a
   centred convolution); perturb the positions before ``t`` and the outputs from ``t`` on must not
   move (else it mixes earlier positions in a way localize cannot carry).

Every call node gets ``meta["localize"]["seq"]``, a :class:`SeqFact`: the sequence dims of its value
(negative, so broadcasting lines them up) and its rule. A model that cannot be chunked raises a
:class:`PlanError` naming the op and why.

Example:
    >>> import torch
    >>> from localize.compiler.tracer import trace
    >>> from localize.passes.find_sequence_ops import find_sequence_ops
    >>> from localize.zoo import GPT
    >>> t = trace(GPT(vocab_size=20, block_size=16, dim=16, depth=1, heads=2))
    >>> facts = find_sequence_ops(t.gm, [torch.randint(0, 20, (2, 8))])
    >>> facts["arange"].rule, facts["scaled_dot_product_attention"].rule, facts["lm_head"].dims
    ('positions', 'attention', (-2,))
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from localize.compiler.tracer import lmeta
from localize.errors import ConfigError, PlanError
from localize.passes.match_attention import match_attention

__all__ = ["SDPA", "SeqFact", "arange_args", "call_node", "find_sequence_ops", "moved", "pad_widths", "perturbed", "sdpa_args"]

SDPA = (
    F.scaled_dot_product_attention,
    torch._C._nn.scaled_dot_product_attention,
    torch.ops.aten.scaled_dot_product_attention.default,
)
_PAD = (F.pad, torch._C._nn.pad)


@dataclass(frozen=True)
class SeqFact:
    """How one value runs along the sequence.

    ``dims``: its dims that run along the sequence (negative). ``rule``: ``"static"`` (no sequence),
    ``"length"`` (a size), ``"position"`` (position-wise or a valid window), or the carried kind:
    ``"attention"``, ``"recurrent"``, ``"cumsum"``, ``"left_pad"``, ``"positions"``, ``"table_slice"``;
    hand-written attention (:mod:`localize.passes.match_attention`) is ``"attention_region"`` up to
    its last matmul, ``"attention_matmul"``.
    ``extra``: positions beyond T (a left pad's width); for a length, its value minus T (-1: not an int).
    """

    dims: tuple[int, ...] = ()
    rule: str = "static"
    extra: int = 0
    content: bool = False  # depends on the inputs' values, not only on positions and lengths
    info: tuple = ()  # hand-written attention's end: (q, kT, v) node names, scale, dropout


def find_sequence_ops(gm: fx.GraphModule, inputs: list[Any], seq_dim: int | None = None) -> dict[str, SeqFact]:
    """Annotate every node of ``gm`` with its :class:`SeqFact` and return them by node name."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    dims, length = _input_dims(placeholders, inputs, seq_dim)
    short = [_shorten(v, dims.get(n)) for n, v in zip(placeholders, inputs)]
    modes = {m: m.training for m in gm.modules()}
    gm.eval()  # no dropout draws, no running-stat updates: the probes compare deterministic runs
    try:
        with torch.no_grad():
            long_env = _run(gm, inputs)
            try:
                short_env = _run(gm, short)
            except Exception as e:  # noqa: BLE001 - a graph with the length baked in fails on any other
                raise PlanError(
                    f"the captured graph fixes the sequence length at {length} ({type(e).__name__} on {length - 1} "
                    "positions; torch.export specialises it): chunk_size= needs a graph that runs on any length, "
                    "as torch.fx captures for models that do not branch on shapes"
                ) from None
            facts: dict[str, SeqFact] = {}
            live = _live(gm)
            region: dict[str, SeqFact] = {}  # hand-written attention found ahead of its nodes
            for node in gm.graph.nodes:
                if node.name in region:
                    facts[node.name] = region.pop(node.name)
                elif node.op not in ("placeholder", "output") and node not in live:
                    facts[node.name] = SeqFact()  # unused (e.g. `out, _ = rnn(x)`): nothing to prove
                elif node.op == "placeholder":
                    d = dims.get(node)
                    facts[node.name] = SeqFact((d,) if d is not None else (), "position" if d is not None else "static",
                                               content=True)
                elif node.op == "get_attr":
                    facts[node.name] = SeqFact()
                elif node.op != "output":
                    facts[node.name] = _classify(gm, node, long_env, short_env, facts, length, region)
                if node.name in facts:
                    lmeta(node)["seq"] = facts[node.name]
    finally:
        for m, mode in modes.items():
            m.training = mode
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    if not any(isinstance(a, fx.Node) and facts[a.name].dims for a in pytree.tree_leaves(out.args[0])):
        raise PlanError(
            "no output of the model runs along the sequence of its inputs, so there is nothing to train chunk by "
            "chunk; chunk_size= is for models that map (B, T, ...) to a prediction per position"
        )
    return facts


# ------------------------------------------------------------------------------------------- dims


def _input_dims(placeholders: list[fx.Node], inputs: list[Any], seq_dim: int | None) -> tuple[dict, int]:
    dims: dict[fx.Node, int] = {}
    length = None
    for node, value in zip(placeholders, inputs):
        if not isinstance(value, torch.Tensor) or value.dim() < (2 if seq_dim is None else 1):
            continue
        d = 1 if seq_dim is None else seq_dim
        if not -value.dim() <= d < value.dim():
            if seq_dim is not None and length is None:
                raise ConfigError(f"seq_dim={seq_dim} is out of range for input {node.name!r} of shape {tuple(value.shape)}")
            continue
        size = value.size(d)
        if length is None:
            length = size
        elif size != length:
            continue  # another kind of input (e.g. a (B, D) condition), not a sequence
        dims[node] = d - value.dim() if d >= 0 else d
    if length is None:
        raise PlanError(
            "no model input has a sequence dimension (a tensor input of at least 2 dims); chunk_size= needs "
            "(B, T, ...) inputs, or pass seq_dim= to name the dimension"
        )
    if length < 2:
        first = next(iter(dims))
        raise ConfigError(
            f"input {first.name!r} has {length} position along its sequence dim {seq_dim if seq_dim is not None else 1}; "
            "pass example inputs with at least 2 positions, or seq_dim= naming the dimension that is the sequence"
        )
    return dims, length


def _live(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes the outputs depend on."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    live: set[fx.Node] = set()
    stack = list(out.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in live:
            live.add(n)
            stack.extend(n.all_input_nodes)
    return live


def _shorten(value: Any, dim: int | None) -> Any:
    return value if dim is None else value.narrow(dim, 0, value.size(dim) - 1)


def _run(gm: fx.GraphModule, inputs: list[Any]) -> dict[fx.Node, Any]:
    interp = fx.Interpreter(gm, garbage_collect_values=False)
    interp.run(*inputs)
    return interp.env


def _seq_dims(long: Any, short: Any) -> tuple[int, ...] | None:
    """The dims of a tensor that move with T (by exactly 1); None when a dim moved by more (a merged
    batch*sequence dim), which the final chunk check covers instead of a probe."""
    if not (isinstance(long, torch.Tensor) and isinstance(short, torch.Tensor)) or long.dim() != short.dim():
        return ()
    out = []
    for d in range(long.dim()):
        step = long.size(d) - short.size(d)
        if step == 1:
            out.append(d - long.dim())
        elif step != 0:
            return None
    return tuple(out)


def _differs(long: Any, short: Any) -> bool:
    if isinstance(long, torch.Tensor) and isinstance(short, torch.Tensor):
        return long.shape != short.shape or not torch.equal(long, short)
    a, b = pytree.tree_leaves(long), pytree.tree_leaves(short)
    if len(a) != len(b):
        return True
    return any(_differs(x, y) if isinstance(x, torch.Tensor) else x != y for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------- rules


def _what(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(gm.get_submodule(node.target)).__name__})"
    name = getattr(node.target, "__name__", str(node.target))
    where = lmeta(node).get("module")
    return f"{name} ({node.name}{', in ' + where if where else ''})"


def _classify(gm, node, long_env, short_env, facts, length, region) -> SeqFact:
    long, short = long_env[node], short_env[node]
    inputs = node.all_input_nodes
    seq_in = [a for a in inputs if facts[a.name].dims or _holds_sequence(long_env[a], short_env[a])]
    len_in = [a for a in inputs if facts[a.name].rule == "length"]
    content = any(facts[a.name].content for a in inputs)
    dims = _seq_dims(long, short)
    what = _what(gm, node)
    if dims is None:
        return SeqFact((), "position", content=content)  # merged dims: the chunked-block check verifies these
    if not isinstance(long, torch.Tensor):
        if any(isinstance(x, torch.Tensor) for x in pytree.tree_leaves(long)):
            if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.RNNBase):
                return SeqFact((), _known_rule(gm, node, long_env, facts, what) or "position", content=content)
            return SeqFact((), "position", content=content)  # a tuple of tensors: its getitems are judged
        if seq_in or len_in:
            if _differs(long, short):  # a size: in a chunk, the chunk's (ints equal to T can be recomputed)
                return SeqFact((), "length", long - length if isinstance(long, int) else -1)
            return SeqFact((), "static")
        return SeqFact()
    if not content:
        # built from positions and lengths only (position ids, rotary tables, causal masks): offset the
        # position sources, leave the rest to the chunked-block check
        rule = _position_rule(node, facts, what)
        if rule is not None:
            return SeqFact(dims, rule)
        if len(dims) == 1 and not any(facts[a.name].dims for a in inputs) and not _constant_along(long, dims[0]):
            raise PlanError(
                f"{what} builds values that depend on the position without reading the input; localize offsets "
                "torch.arange(T) and table[:, :T] slices only"
            )
        if not dims and len_in and _differs(long, short):
            raise PlanError(f"{what} computes a tensor from the sequence length; a chunk would see its own length")
        return SeqFact(dims, "position" if dims else "static")
    rule = _known_rule(gm, node, long_env, facts, what)
    if rule is not None:
        return SeqFact(dims, rule, _extra(long, dims, length), content=True)
    if len(dims) > 1:
        found = match_attention(gm, node, long_env, facts)
        if found is not None:  # causal attention written out: carried like scaled_dot_product_attention
            nodes, end, info = found
            for n in nodes[1:]:
                region[n.name] = SeqFact(_seq_dims(long_env[n], short_env[n]) or (), "attention_region", content=True)
            region[end.name] = SeqFact((-2,), "attention_matmul", content=True, info=info)
            return SeqFact(dims, "attention_region", content=True)
        kind = (
            "a mask read from the inputs, e.g. padding" if long.dtype == torch.bool else "attention scores written out"
        )
        raise PlanError(
            f"{what} makes a value with {len(dims)} sequence dims {tuple(long.shape)} ({kind}): chunks cannot carry "
            "it; write attention with F.scaled_dot_product_attention(q, k, v, is_causal=True), without a padding mask"
        )
    if not dims:
        if _differs(long, short):
            raise PlanError(
                f"{what} reduces over the sequence (its result has no sequence dim but depends on every position): "
                "a chunk sees only its own positions; chunk_size= needs a prediction per position"
            )
        return SeqFact(content=True)
    if not all(isinstance(long_env[a], torch.Tensor) and facts[a.name].dims for a in seq_in):
        return SeqFact(dims, "position", content=True)  # getitem of a tuple: judged by what it selects
    _probe(gm, node, long_env, facts, what, dims[0])
    return SeqFact(dims, "position", _extra(long, dims, length), content=True)


def _holds_sequence(long: Any, short: Any) -> bool:
    return not isinstance(long, torch.Tensor) and any(
        isinstance(x, torch.Tensor) and _seq_dims(x, y) for x, y in zip(pytree.tree_leaves(long), pytree.tree_leaves(short))
    )


def _extra(value: Any, dims: tuple[int, ...], length: int) -> int:
    return value.size(dims[0]) - length if isinstance(value, torch.Tensor) and dims else 0


def _constant_along(value: torch.Tensor, dim: int) -> bool:
    return bool(torch.equal(value, value.narrow(dim, 0, 1).expand_as(value)))


def _known_rule(gm, node, env, facts, what) -> str | None:
    """The carried kind of an op localize rewrites by what it is, or None (probe it)."""
    target = node.target
    if node.op == "call_function" and target in SDPA:
        args = sdpa_args(node)
        mask = args["attn_mask"]
        if mask is not None:
            if facts[mask.name].content or not _is_causal_mask(env[mask]):
                raise PlanError(
                    f"{what} is attention with an attn_mask that is not the causal mask (padding, or a mask read from "
                    "the inputs); chunks carry causal attention: pass is_causal=True, or no padding mask"
                )
        elif not args["is_causal"]:
            raise PlanError(
                f"{what} is bidirectional attention (is_causal=False): every position reads later positions, "
                "so the sequence cannot be cut into chunks"
            )
        for name in ("query", "key", "value"):
            if facts[args[name].name].dims != (-2,):
                raise PlanError(f"{what}: the sequence must be the {name}'s dim -2 (B, heads, T, E)")
        return "attention"
    if _batch_statistics(gm, node) and any(facts[a.name].dims for a in node.all_input_nodes):
        # eval() (which the probes run in) reads running statistics: position-wise; train() does not
        raise PlanError(
            f"{what} is batch norm: in train() it normalises with statistics over every position of the "
            "sequence, which a chunk cannot see; use LayerNorm (or RMSNorm) over the features instead"
        )
    if node.op == "call_module" and isinstance(gm.get_submodule(target), nn.RNNBase):
        module = gm.get_submodule(target)
        if module.bidirectional:
            raise PlanError(f"{what} is bidirectional: it reads later positions, so the sequence cannot be chunked")
        if len(node.args) + len(node.kwargs) > 1:
            raise PlanError(f"{what} is given an initial state; chunks carry their own, so leave it out")
        return "recurrent"
    if _is(node, "cumsum") and node.args and facts[node.args[0].name].dims:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        x = env[node.args[0]]
        if dim is not None and (dim - x.dim() if dim >= 0 else dim) == facts[node.args[0].name].dims[0]:
            return "cumsum"
        return None
    if node.op == "call_function" and target in _PAD and facts[node.args[0].name].dims:
        left, right = pad_widths(node, env[node.args[0]].dim(), facts[node.args[0].name].dims[0])
        mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
        value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
        if right:
            raise PlanError(f"{what} pads the sequence on the right, so positions read later ones; pad on the left")
        if not left:
            return None
        if mode != "constant" or value not in (None, 0, 0.0):
            raise PlanError(f"{what} pads the sequence with mode={mode!r}, value={value!r}; chunks carry zero padding only")
        return "left_pad"
    return None


_BATCH_NORM = (
    F.batch_norm,
    torch.batch_norm,
    torch.ops.aten.batch_norm.default,
    torch.ops.aten.native_batch_norm.default,
    torch.ops.aten._native_batch_norm_legit.default,
    torch.ops.aten._native_batch_norm_legit_functional.default,
)


def _batch_statistics(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Batch norm that computes its statistics from the batch in train(): an ``nn.BatchNorm*`` module,
    or the function with a ``training`` argument that is not the constant False."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.modules.batchnorm._BatchNorm)
    if node.op != "call_function" or node.target not in _BATCH_NORM:
        return False
    training = node.kwargs.get("training", node.args[5] if len(node.args) > 5 else False)  # 6th in every form
    return training is not False


def _position_rule(node: fx.Node, facts: dict[str, SeqFact], what: str) -> str | None:
    """``torch.arange(T)`` and ``table[:, :T]``: position sources a chunk offsets by its start."""
    lengths = any(facts[a.name].rule == "length" for a in node.all_input_nodes)
    if _is(node, "arange") and lengths:
        start, _, step = arange_args(node)
        if start != 0 or step != 1:
            raise PlanError(f"{what}: localize offsets torch.arange(T) (from 0, step 1) only")
        return "positions"
    if node.op == "call_function" and node.target is operator.getitem and lengths:
        if not facts[node.args[0].name].dims:
            return "table_slice"
    if node.op == "call_function" and node.target is torch.ops.aten.slice.Tensor and lengths:
        start = node.args[2] if len(node.args) > 2 else 0
        if not facts[node.args[0].name].dims and start in (0, None) and facts[node.args[3].name].extra == 0:
            return "table_narrow"  # the exported form of table[:, :T]
    return None


def _is_causal_mask(mask: torch.Tensor) -> bool:
    """Whether ``mask`` (bool, or additive float) lets position i see exactly positions 0..i."""
    if mask.dim() < 2 or mask.size(-1) != mask.size(-2):
        return False
    n = mask.size(-1)
    allowed = torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
    if mask.dtype == torch.bool:
        return bool((mask == allowed).all())
    return bool(((mask == 0) == allowed).all()) and bool((mask[..., ~allowed] < -1e4).all())


def _is(node: fx.Node, name: str) -> bool:
    """``node`` calls ``torch.<name>``, ``Tensor.<name>`` or ``aten.<name>``."""
    if node.op == "call_method":
        return node.target == name
    if node.op != "call_function":
        return False
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target.overloadpacket.__name__ == name
    return node.target is getattr(torch, name, None)


def sdpa_args(node: fx.Node) -> dict[str, Any]:
    """The arguments of a ``scaled_dot_product_attention`` node by name, defaults filled in."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    defaults = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
    out = dict(defaults)
    out.update(dict(zip(names, node.args)))
    out.update(node.kwargs)
    return out


def pad_widths(node: fx.Node, ndim: int, dim: int) -> tuple[int, int]:
    """(left, right) padding an ``F.pad`` node adds along ``dim`` (negative) of an ``ndim`` input."""
    pad = node.kwargs.get("pad", node.args[1] if len(node.args) > 1 else ())
    k = -dim - 1  # pairs run from the last dim backwards
    return (pad[2 * k], pad[2 * k + 1]) if 2 * k + 1 < len(pad) else (0, 0)


def arange_args(node: fx.Node) -> tuple[Any, Any, Any]:
    """(start, end, step) of a ``torch.arange`` node."""
    args = list(node.args)
    if len(args) == 1:
        return node.kwargs.get("start", 0), args[0], node.kwargs.get("step", 1)
    start, end = args[0], args[1]
    step = args[2] if len(args) > 2 else node.kwargs.get("step", 1)
    return start, end, step


# ------------------------------------------------------------------------------------------- probes


def call_node(gm: fx.GraphModule, node: fx.Node) -> Callable[..., Any]:
    """The callable a call node runs, taking its (mapped) args and kwargs."""
    if node.op == "call_module":
        return gm.get_submodule(node.target)
    if node.op == "call_method":
        return lambda self, *a, **k: getattr(self, node.target)(*a, **k)
    return node.target


def perturbed(x: torch.Tensor, dim: int, lo: int, hi: int, gen: torch.Generator) -> torch.Tensor:
    """``x`` with positions ``[lo, hi)`` along ``dim`` replaced by other values of its kind."""
    hi = min(hi, x.size(dim))
    if lo >= hi:
        return x
    out = x.clone()
    part = out.narrow(dim, lo, hi - lo)
    if x.is_floating_point() or x.is_complex():
        noise = torch.randn(part.shape, generator=gen, dtype=torch.float32).to(x.dtype)
        part.add_(noise * (1.0 + float(x.abs().max())))
    elif x.dtype == torch.bool:
        part.logical_not_()
    else:
        low, high = int(x.min()), int(x.max())
        if high > low:
            part.copy_(torch.randint(low, high + 1, part.shape, generator=gen, dtype=x.dtype))
    return out


def moved(ref: Any, new: Any, dim: int, lo: int, hi: int) -> bool:
    """Whether positions ``[lo, hi)`` along ``dim`` differ between two outputs (tensors or tuples)."""
    for a, b in zip(pytree.tree_leaves(ref), pytree.tree_leaves(new)):
        if not isinstance(a, torch.Tensor) or a.dim() == 0 or a.dim() < -dim:
            continue
        top = min(hi, a.size(dim))
        if lo >= top:
            continue
        x, y = a.narrow(dim, lo, top - lo), b.narrow(dim, lo, top - lo)
        if x.is_floating_point():
            if (x - y).abs().max() > 1e-4 * (1.0 + float(x.abs().max())):
                return True
        elif not torch.equal(x, y):
            return True
    return False


def _probe(gm, node, env, facts, what, dim: int) -> None:
    """Perturb the node's sequence inputs after / before a position and watch its output."""
    fn = call_node(gm, node)
    ref = fn(*fx.node.map_arg(node.args, env.__getitem__), **fx.node.map_arg(node.kwargs, env.__getitem__))
    out_len = ref.size(dim)
    lengths = {a: env[a].size(facts[a.name].dims[0]) for a in node.all_input_nodes if facts[a.name].dims}
    if any(n < out_len for n in lengths.values()):
        raise PlanError(
            f"{what} makes the sequence longer than its input (a convolution padded on both sides?): it reads later "
            "positions; pad on the left instead, e.g. F.pad(x, (k - 1, 0)) before an unpadded convolution"
        )
    t = max(1, out_len // 2)
    gen = torch.Generator().manual_seed(0)

    def run(lo: Callable[[int], int], hi: Callable[[int], int]) -> Any:
        def swap(a: fx.Node) -> Any:
            if a in lengths:
                return perturbed(env[a], facts[a.name].dims[0], lo(lengths[a]), hi(lengths[a]), gen)
            return env[a]

        return fn(*fx.node.map_arg(node.args, swap), **fx.node.map_arg(node.kwargs, swap))

    future = run(lambda n: t + n - out_len, lambda n: n)
    if moved(ref, future, dim, 0, t):
        raise PlanError(
            f"{what} reads later positions (its output at a position changes when later positions change): "
            "a chunk cannot see the chunks after it, so this model cannot be trained chunk by chunk"
        )
    past = run(lambda n: 0, lambda n: t)
    if moved(ref, past, dim, t, out_len):
        raise PlanError(
            f"{what} mixes earlier positions into later ones, and localize does not know how to carry its state "
            "between chunks (it carries causal scaled_dot_product_attention, nn.RNN/LSTM/GRU, cumsum and left "
            "padding)"
        )

