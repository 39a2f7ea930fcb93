"""Rewrite a block into its *chunk program*: the block on one chunk of the sequence.

Given the facts of :mod:`localize.passes.find_sequence_ops`, each block's graph is copied into a
GraphModule ``forward(offset, carry, *inputs) -> (outputs, states)`` where ``inputs`` are the block's
inputs narrowed to positions ``[offset, offset + C)`` and ``carry`` holds one state per carried op:

* causal ``scaled_dot_product_attention``: its keys and values follow the earlier chunks' (two
  ``"append"`` states) and :func:`localize.runtime.chunks.attend` masks by absolute position;
* ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM``: called with the previous chunk's final hidden state;
* ``cumsum``: adds the previous chunk's last total;
* ``F.pad`` on the left: the padding is the previous chunk's last positions (zeros before the first);
* ``torch.arange(T)`` and ``table[:, :T]``: shifted by ``offset``.

Every other op is copied. :func:`check_chunk_programs` then runs each chunk program over the example
inputs in small chunks and requires the joined outputs to equal the block's: the proof that the
rewrite is exact, whatever the probes could not see. ``program.chunk_spec`` says which inputs,
outputs and states run along the sequence (:class:`localize.runtime.chunks.ChunkSpec`).

Example:
    >>> import torch, localize
    >>> from localize.zoo import GPT
    >>> lm = localize.transform(GPT(vocab_size=20, block_size=16, dim=16, depth=2, heads=2), blocks=2,
    ...                         example_inputs=(torch.randint(0, 20, (2, 8)),), aux="linear", chunk_size=4)
    >>> lm.chunk_programs[0].chunk_spec.states
    ('append', 'append')
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from localize.compiler.tracer import trace
from localize.errors import ConfigError, PlanError, TraceError
from localize.passes.bind_training_mode import bind_training_mode
from localize.passes.find_sequence_ops import SeqFact, find_sequence_ops, moved, perturbed, sdpa_args
from localize.runtime import chunks
from localize.runtime.chunks import ChunkSpec

__all__ = ["check_chunk_programs", "chunk_block", "chunk_head"]


def chunk_block(
    sub: fx.GraphModule, facts: dict[str, SeqFact], block: int, class_name: str | None = None
) -> fx.GraphModule:
    """The chunk program of block ``block`` (its GraphModule ``sub``; a head's graph is rewritten the same way)."""
    graph = fx.Graph()
    offset = graph.placeholder("offset")
    carry = graph.placeholder("carry")
    env: dict[fx.Node, fx.Node] = {}
    kinds: list[str] = []
    own: list[fx.Node] = []
    in_dims: list[int | None] = []
    out_dims: list[int | None] = []
    lengths: list[fx.Node] = []
    by_name = {n.name: n for n in sub.graph.nodes}

    def fact(node: Any) -> SeqFact:
        return facts.get(node.name, SeqFact()) if isinstance(node, fx.Node) else SeqFact()

    def carried(kind: str) -> tuple[int, fx.Node]:
        """A new carried state: its slot, and what earlier chunks carry into this one (``own[slot]``,
        what this chunk carries out, is set once it is computed)."""
        kinds.append(kind)
        own.append(None)
        return len(kinds) - 1, graph.call_function(operator.getitem, (carry, len(kinds) - 1))

    def call(fn: Any, *args: Any, **kwargs: Any) -> fx.Node:
        return graph.call_function(fn, args, kwargs)

    def m(arg: Any) -> Any:
        return fx.node.map_arg(arg, env.__getitem__)

    for node in sub.graph.nodes:
        if node.op != "placeholder" and lengths:  # after the placeholders: T of this chunk, from its input
            seq = next((p for p in env if fact(p).dims and fact(p).rule != "length"), None)
            if seq is None:
                raise PlanError(f"block {block} reads the sequence length but no sequence; move the cut")
            for length in lengths:
                env[length] = graph.call_method("size", (env[seq], fact(seq).dims[0]))
            lengths.clear()
        f = fact(node)
        if node.op == "placeholder":
            if f.rule == "length":
                if f.extra != 0:
                    raise PlanError(
                        f"block {block} reads a size derived from the sequence length ({node.name!r}) from an earlier "
                        "block, but a chunk has its own length; move the cut (cuts=) so it is computed where it is used"
                    )
                lengths.append(node)  # T from an earlier block: this chunk's length instead
            elif f.extra:
                raise PlanError(
                    f"block {block} starts between a left padding and the op that reads it ({node.name!r}); move the cut"
                )
            env[node] = graph.placeholder(node.name, type_expr=node.type)
            in_dims.append(f.dims[0] if len(f.dims) == 1 else None)  # a T x T mask arrives as None
        elif node.op == "output":
            outs = node.args[0] if isinstance(node.args[0], (tuple, list)) else (node.args[0],)
            # a length handed on is recomputed by the block that reads it; a causal mask (T x T, built
            # from positions only) is not handed on at all: chunks attend through their own mask
            masks = [isinstance(o, fx.Node) and len(fact(o).dims) > 1 for o in outs]
            out_dims += [fact(o).dims[0] if fact(o).dims and not mask else None for o, mask in zip(outs, masks)]
            graph.output((tuple(None if mask else m(o) for o, mask in zip(outs, masks)), tuple(own)))
        elif f.rule == "attention":
            a = sdpa_args(node)
            q, k, v = env[a["query"]], env[a["key"]], env[a["value"]]
            slot_k, past_k = carried("append")
            slot_v, past_v = carried("append")
            own[slot_k], own[slot_v] = k, v
            keys = call(chunks.extend, past_k, k, -2)
            values = call(chunks.extend, past_v, v, -2)
            env[node] = call(chunks.attend, q, keys, values, m(a["dropout_p"]), a["scale"], bool(a["enable_gqa"]))
        elif f.rule == "attention_matmul":
            q_name, kt_name, v_name, scale, dropout = f.info
            q, kt, v = (env[by_name[n]] for n in (q_name, kt_name, v_name))
            k = graph.call_method("transpose", (kt, -2, -1))
            slot_k, past_k = carried("append")
            slot_v, past_v = carried("append")
            own[slot_k], own[slot_v] = k, v
            keys = call(chunks.extend, past_k, k, -2)
            values = call(chunks.extend, past_v, v, -2)
            if dropout is None:
                rate: Any = 0.0
            elif dropout[0] == "module":
                rate = call(chunks.dropout_rate, graph.get_attr(dropout[1]))
            else:
                p, training = (fx.node.map_arg(a, lambda x: env[by_name[x.name]]) for a in dropout[1:])  # flat-graph nodes
                rate = call(chunks.active_rate, p, training)
            env[node] = call(chunks.attend, q, keys, values, rate, scale, False)
        elif f.rule == "recurrent":
            x = env[node.args[0]] if node.args else env[next(iter(node.kwargs.values()))]
            if isinstance(sub.get_submodule(node.target), nn.LSTM):
                slot_h, h = carried("carry")
                slot_c, c = carried("carry")
                out = graph.call_module(node.target, (x, call(chunks.pair, h, c)))
                final = call(operator.getitem, out, 1)
                own[slot_h], own[slot_c] = call(operator.getitem, final, 0), call(operator.getitem, final, 1)
            else:
                slot, h = carried("carry")
                out = graph.call_module(node.target, (x, h))
                own[slot] = call(operator.getitem, out, 1)
            env[node] = out
        elif f.rule == "cumsum":
            dim = fact(node.args[0]).dims[0]
            kwargs = {k: m(v) for k, v in node.kwargs.items() if k != "dim"}
            slot, total = carried("carry")
            env[node] = call(chunks.cumsum, env[node.args[0]], dim, total, **kwargs)
            own[slot] = call(chunks.last, env[node], dim, 1)
        elif f.rule == "left_pad":
            dim = fact(node.args[0]).dims[0]
            pad = tuple(node.kwargs.get("pad", node.args[1] if len(node.args) > 1 else ()))
            slot, context = carried("carry")
            env[node] = call(chunks.left_context, env[node.args[0]], pad, dim, context)
            own[slot] = call(chunks.last, env[node], dim, _left(pad, dim))
        elif f.rule == "positions":
            env[node] = call(operator.add, graph.node_copy(node, env.__getitem__), offset)
        elif f.rule == "table_narrow":
            table, dim, _, end = node.args[:4]
            env[node] = call(chunks.offset_narrow, env[table], dim, env[end], offset)
        elif f.rule == "table_slice":
            table, index = node.args
            env[node] = call(chunks.offset_slice, env[table], m(index), _slice_axis(index, facts, node), offset)
        else:
            env[node] = graph.node_copy(node, env.__getitem__)
    _drop_dead(graph)
    graph.lint()
    gm = fx.GraphModule(sub, graph, class_name=class_name or f"Chunk{block}")
    gm.chunk_spec = ChunkSpec(tuple(in_dims), tuple(out_dims), tuple(kinds))
    return gm


def _drop_dead(graph: fx.Graph) -> None:
    """Remove what nothing reads, asserts included: a causal mask the chunk no longer uses (built for
    T x T positions, it would index past a chunk's own)."""
    for node in reversed(list(graph.nodes)):
        if node.op not in ("placeholder", "output") and not node.users:
            graph.erase_node(node)


def _left(pad: tuple, dim: int) -> int:
    k = -dim - 1
    return int(pad[2 * k])


def _slice_axis(index: Any, facts: dict[str, SeqFact], node: fx.Node) -> int:
    parts = index if isinstance(index, tuple) else (index,)
    for axis, part in enumerate(parts):
        if isinstance(part, slice) and isinstance(part.stop, fx.Node) and facts[part.stop.name].rule == "length":
            if part.start not in (None, 0) or part.step not in (None, 1):
                break
            return axis
    raise PlanError(
        f"{node.name} slices a table by the sequence length in a way localize cannot offset; write table[:, :T]"
    )


# ------------------------------------------------------------------------------------------- checks


def check_chunk_programs(
    program: fx.GraphModule, chunk_programs: list[fx.GraphModule], inputs: list[Any], chunk_size: int
) -> list[tuple]:
    """Run each block over the example in chunks and require the block's own outputs (eval mode);
    returns each block's outputs on the example."""
    env = _block_inputs(program, inputs)
    calls = [n for n in program.graph.nodes if n.op == "call_module"]
    length = _length(chunk_programs, calls, env)
    size = _probe_size(chunk_size, length)
    modes = {m: m.training for m in program.modules()}
    program.eval()
    refs = []
    try:
        with torch.no_grad():
            for b, (node, chunked) in enumerate(zip(calls, chunk_programs)):
                args = fx.node.map_arg(node.args, env.__getitem__)
                ref = getattr(program, node.target)(*args)
                refs.append(ref)
                got = chunks.run_chunks(chunked, chunked.chunk_spec, size, tuple(args)).outputs
                for i, (r, g) in enumerate(zip(ref, got)):
                    if isinstance(r, torch.Tensor) and r.is_floating_point():
                        err = float((r - g).abs().max()) if r.shape == g.shape else math.inf
                        if err > 1e-4 * (1.0 + float(r.abs().max())):
                            raise PlanError(
                                f"block {b} run in chunks of {size} differs from the block by {err:.3g} (output {i}); "
                                "some op reads the sequence in a way localize does not carry. Please report it"
                            )
    finally:
        for mod, mode in modes.items():
            mod.training = mode
    return refs


def _block_inputs(program: fx.GraphModule, inputs: list[Any]) -> dict[fx.Node, Any]:
    interp = fx.Interpreter(program, garbage_collect_values=False)
    with torch.no_grad():
        interp.run(*inputs)
    return interp.env


def _length(chunk_programs: list[fx.GraphModule], calls: list[fx.Node], env: dict) -> int:
    for node, chunked in zip(calls, chunk_programs):
        for arg, d in zip(node.args, chunked.chunk_spec.inputs):
            if d is not None:
                return env[arg].size(d)
    raise PlanError("no block reads a sequence input; chunk_size= has nothing to chunk")


# The strategies whose heads run one chunk at a time on token features (B, T, C): dgl and linear
# score each position on its own (a norm and an MLP or a linear map per token); readout (and
# auglocal, man) copy later layers, whose attention or recurrence carries its state from chunk to
# chunk like the block's. infopro, featrecon and drtp score the whole input at once.
_PER_POSITION = (
    "use aux='readout' (its copies of the later layers carry their keys and values from chunk to chunk), "
    "'dgl' or 'linear' (they score each position on its own)"
)
# Features laid out (batch, channels, positions): every strategy's head pools over the positions.
_NONE_PER_POSITION = (
    "no strategy's head scores each position of (batch, channels, positions) features on its own yet; "
    "train with blocks=1 and chunk_size=, or without chunk_size="
)


def _advice(feature: torch.Tensor, dim: int) -> str:
    """What to use instead of a head that cannot score one chunk: per-position heads exist for
    channels-last features (the sequence dim is not the last one), none for channels-first."""
    return _NONE_PER_POSITION if dim % feature.dim() == feature.dim() - 1 else _PER_POSITION


def chunk_head(
    head: nn.Module | None, feature: torch.Tensor, dim: int, block: int, aux: str, chunk_size: int
) -> fx.GraphModule | None:
    """How block ``block``'s head runs on one chunk: None where it scores each position on its own
    (it is called on the chunk as it is), else its own chunk program, rewritten like a block's (its
    copies of later layers carry their keys and values from chunk to chunk) and checked the same
    way. A head that computes its own loss over the whole input, or that reads later positions, is
    refused with a :class:`ConfigError` naming what to use instead."""
    if head is None:
        return None
    if hasattr(head, "local_loss"):
        raise ConfigError(
            f"aux={aux!r}: the head of block {block} computes its own loss over the whole input; with chunk_size= "
            f"{_advice(feature, dim)}"
        )
    param = next(head.parameters(), None)
    if param is not None and feature.is_floating_point():
        feature = feature.to(param.dtype)  # heads are made in the default dtype; the model may be another
    mode = head.training
    head.eval()
    try:
        with torch.no_grad():
            if _scores_each_position(head, feature, dim):
                return None
            try:
                program = _head_program(head, feature, dim, block).eval()  # its dropout flags too
                got = chunks.run_chunks(program, program.chunk_spec, _probe_size(chunk_size, feature.size(dim)),
                                        (feature,)).outputs[0]
                ref = head(feature)
                err = float((ref - got).abs().max()) if ref.shape == got.shape else math.inf
                if err > 1e-4 * (1.0 + float(ref.abs().max())):
                    raise PlanError(f"run in chunks it differs from the whole sequence by {err:.3g}")
            except (PlanError, TraceError) as e:
                raise ConfigError(
                    f"aux={aux!r}: the head of block {block} mixes positions in a way localize cannot carry from "
                    f"chunk to chunk ({str(e).rstrip('.')}); with chunk_size= {_advice(feature, dim)}"
                ) from None
    finally:
        head.train(mode)
    program.train(mode)
    return program


def _probe_size(chunk_size: int, length: int) -> int:
    return max(1, min(chunk_size, math.ceil(length / 3)))  # at least three chunks: every carry is exercised


def _scores_each_position(head: nn.Module, feature: torch.Tensor, dim: int) -> bool:
    """Probed like an op: perturbing the positions before (after) ``t`` moves no score after (before) it."""
    gen = torch.Generator().manual_seed(0)
    length = feature.size(dim)
    t = max(1, length // 2)
    ref = head(feature)
    later = head(perturbed(feature, dim, t, length, gen))
    earlier = head(perturbed(feature, dim, 0, t, gen))
    return not (
        not isinstance(ref, torch.Tensor)
        or ref.dim() < -dim
        or ref.size(dim) != length
        or moved(ref, later, dim, 0, t)
        or moved(ref, earlier, dim, t, length)
    )


def _head_program(head: nn.Module, feature: torch.Tensor, dim: int, block: int) -> fx.GraphModule:
    """The head captured as a graph on ``feature`` (as the model was), its dropout bound to
    ``train()``, rewritten to run one chunk; its layers are the head's own."""
    seq = dim % feature.dim()
    traced = trace(head, (feature,), seq_dim=seq)
    bind_training_mode(traced.gm)
    facts = find_sequence_ops(traced.gm, [feature], seq)
    program = chunk_block(traced.gm, facts, block, class_name=f"HeadChunk{block}")
    if len(program.chunk_spec.outputs) != 1 or program.chunk_spec.outputs[0] is None:
        raise PlanError("its prediction does not run along the sequence")
    return program
