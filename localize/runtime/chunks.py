"""Chunk-wise training along the sequence: SeCO (exact) and SpaCO (sparse, unbiased).

A chunked block runs as a *chunk program* (:mod:`localize.passes.chunk_sequence`): the block's graph
on positions ``[s, s + C)``, with the states earlier chunks carry in (attention keys and values,
recurrent hidden states, running sums, left context) and the states it carries out. The step graph
calls these ops for such a block instead of the block and its loss:

* :func:`chunk_forward` runs every chunk without a graph, keeping only the carried states (and the
  RNG state each chunk started from, so dropout replays); with SeCO the last chunk alone keeps its
  graph, since the reverse walk starts with it. Its outputs, joined along the sequence, are the
  block's outputs: the next block reads them as it reads any block's.
* :func:`chunk_loss` computes the loss over the whole sequence from the joined outputs, chunk by
  chunk, without a graph (so replicas can agree on it before any backward). A head that scores
  each position on its own runs on each chunk alone; a head that attends or recurs across positions
  (``aux="readout"``'s copies of later layers) runs as its own chunk program, carrying its own
  states (its layers' keys and values) from chunk to chunk.
* :func:`chunk_backward` walks the chunks in reverse. Chunk ``c`` is recomputed (the last one is
  not: its graph is the forward's) with its carried-in states as leaves that require grad; it
  backpropagates its share of the loss plus the gradients later chunks sent into the states it
  carried out, which leaves the gradients of its carried-in states for chunk ``c - 1``. Each
  chunk's loss is weighted by its share of the counted targets (``ignore_index`` excluded), so the
  sum is the full sequence's mean loss and the gradient is exactly full-sequence backprop's (SeCO,
  ``keep=1``). A head program's states are walked back the same way, inside the same chunk.

With ``keep=p < 1`` (SpaCO) each chunk backpropagates with probability ``p``, independently; a kept
chunk scales everything it backpropagates (its loss and the gradients it was sent) by ``1/p``. By
induction from the last chunk, every gradient a chunk receives is an unbiased estimate of the exact
one, so the expected gradient is exact; its variance grows with ``(1 - p) / p`` per chunk a gradient
path crosses. Only the chunks kept pay for a backward pass.

Only one chunk's activations are alive at a time; the carried states (for attention: the keys and
values of the whole sequence, as in a KV cache) and their gradients are what grows with T.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from localize.runtime.ops import AUTOCAST_DTYPES, StepState, start_backward

__all__ = [
    "ChunkPass",
    "Chunking",
    "ChunkSpec",
    "active_rate",
    "attend",
    "chunk_backward",
    "chunk_forward",
    "chunk_loss",
    "chunk_outputs",
    "cumsum",
    "dropout_rate",
    "extend",
    "keep_mask",
    "last",
    "left_context",
    "offset_narrow",
    "offset_slice",
    "pair",
    "run_chunks",
]


@dataclass(frozen=True)
class ChunkSpec:
    """How a chunk program reads and writes the sequence.

    ``inputs`` / ``outputs``: the sequence dim (negative) of each block input / output, None for a
    value that is not a sequence. ``states``: per carried state, ``"append"`` (attention keys or
    values: a chunk reads every earlier chunk's, joined along dim -2) or ``"carry"`` (it reads the
    previous chunk's only).
    """

    inputs: tuple[int | None, ...]
    outputs: tuple[int | None, ...]
    states: tuple[str, ...]


@dataclass(frozen=True)
class Chunking:
    """``transform(chunk_size=, chunk_keep=)``: the chunk length, the SpaCO keep rate, one chunk
    program per block, and per block the chunk program of its head where the head mixes positions
    (None where it scores each position on its own, or there is no head)."""

    size: int
    keep: float
    programs: list[Any]
    heads: list[Any] = field(default_factory=list)

    def head(self, block: int) -> Any:
        """Block ``block``'s head program, or None."""
        return self.heads[block] if block < len(self.heads) else None


@dataclass
class ChunkPass:
    """What :func:`chunk_forward` leaves for :func:`chunk_backward`."""

    size: int
    length: int
    inputs: tuple
    outputs: tuple
    states: list[list[torch.Tensor | None]]  # [chunk][state]
    rng: list[tuple[torch.Tensor, list[torch.Tensor]]] = field(default_factory=list)
    # With keep_last: the carried states as leaves that require grad ([chunk][state]; the last
    # chunk ran on them), the last chunk's outputs and states with their graph.
    leaves: list[list[torch.Tensor | None]] | None = None
    last: tuple[tuple, tuple] | None = None
    # From chunk_loss: each chunk's share of the loss, the RNG state its head started from, and the
    # states a head program carried out ([chunk][state]; None for a head that needs none).
    weights: list[float] = field(default_factory=list)
    head_rng: list[tuple[torch.Tensor, list[torch.Tensor]]] = field(default_factory=list)
    head_states: list[list[torch.Tensor | None]] | None = None


# ------------------------------------------------------------------------------ ops inside chunk programs


def extend(past: list[torch.Tensor] | None, own: torch.Tensor, dim: int) -> torch.Tensor:
    """Earlier chunks' keys (or values) followed by this chunk's, joined in one copy."""
    return own if not past else torch.cat([*(p.to(own.dtype) for p in past), own], dim=dim)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
           scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """Causal attention of this chunk's queries over all keys so far: query ``i`` of a chunk that
    starts at ``s`` sees keys ``0 .. s + i``, as position ``s + i`` does in the whole sequence."""
    extra = {"enable_gqa": True} if enable_gqa else {}
    n, total = q.size(-2), k.size(-2)
    if total == n:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale, **extra)
    mask = _offset_causal_mask(n, total, q.dtype, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale, **extra)


_MASK: dict[tuple, torch.Tensor] = {}


def _offset_causal_mask(n: int, total: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The additive mask of a chunk's ``n`` queries over ``total`` keys, built once per chunk shape
    (every layer of the chunk shares it, so autograd saves it once, not once per layer): zeros over
    the earlier chunks' keys, then the chunk's own causal triangle (kept from the last call)."""
    key = (n, total, dtype, device)
    if key not in _MASK:
        square = (n, n, dtype, device)
        diag = _MASK.get(square)
        if diag is None:
            diag = torch.full((n, n), float("-inf"), dtype=dtype, device=device).triu_(1)
        _MASK.clear()
        _MASK[square] = diag
        mask = torch.zeros(n, total, dtype=dtype, device=device)
        mask[:, total - n :] = diag
        _MASK[key] = mask
    return _MASK[key]


def dropout_rate(module: nn.Module) -> float:
    """The dropout probability of an ``nn.Dropout`` now (0 in eval mode), for :func:`attend`."""
    return float(module.p) if module.training else 0.0


def active_rate(p: float, training: bool) -> float:
    """``F.dropout(x, p, training)``'s probability as :func:`attend`'s ``dropout_p``."""
    return float(p) if training else 0.0


def cumsum(x: torch.Tensor, dim: int, carry: torch.Tensor | None, **kwargs: Any) -> torch.Tensor:
    """``cumsum`` along the sequence, continued from the previous chunk's last total."""
    out = torch.cumsum(x, dim, **kwargs)
    return out if carry is None else out + carry


def left_context(x: torch.Tensor, pad: tuple[int, ...], dim: int, carry: torch.Tensor | None) -> torch.Tensor:
    """``F.pad(x, pad)`` whose left padding along ``dim`` is the previous chunk's last positions."""
    if carry is None:
        return F.pad(x, pad)
    k = -dim - 1
    rest = list(pad)
    rest[2 * k] = 0
    return torch.cat([carry, F.pad(x, tuple(rest))], dim=dim)


def last(x: torch.Tensor, dim: int, width: int) -> torch.Tensor:
    """The last ``width`` positions along ``dim`` (what the next chunk is carried)."""
    return x.narrow(dim, x.size(dim) - width, width)


def pair(*states: torch.Tensor | None) -> tuple | None:
    """An LSTM's (h, c) from two carried states; None before the first chunk."""
    return None if states[0] is None else tuple(states)


def offset_slice(table: torch.Tensor, index: Any, axis: int, offset: int) -> torch.Tensor:
    """``table[index]`` with the slice at ``axis`` moved to start at ``offset``."""
    parts = list(index) if isinstance(index, tuple) else [index]
    s = parts[axis]
    parts[axis] = slice(offset + (s.start or 0), offset + s.stop, s.step)
    return table[tuple(parts)]


def offset_narrow(table: torch.Tensor, dim: int, length: int, offset: int) -> torch.Tensor:
    """``table.narrow(dim, offset, length)``: the exported ``table[:, :T]`` of a chunk at ``offset``."""
    return table.narrow(dim, offset, length)


# ------------------------------------------------------------------------------------------ the schedule


def _chunk_inputs(spec: ChunkSpec, inputs: tuple, start: int, size: int) -> list:
    return [
        x.narrow(d, start, min(size, x.size(d) - start)) if d is not None and isinstance(x, torch.Tensor) else x
        for x, d in zip(inputs, spec.inputs)
    ]


def _carried(spec: ChunkSpec, states: list[list[Any]], c: int) -> tuple:
    out = []
    for s, kind in enumerate(spec.states):
        if c == 0:
            out.append(None)
        elif kind == "append":
            out.append([states[i][s] for i in range(c)])  # joined with this chunk's by `extend`
        else:
            out.append(states[c - 1][s])
    return tuple(out)


def _rng_state(inputs: tuple) -> tuple[torch.Tensor, list[torch.Tensor]]:
    cuda = sorted({x.device.index or 0 for x in inputs if isinstance(x, torch.Tensor) and x.is_cuda})
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in cuda]


def _replay(rng: tuple[torch.Tensor, list[torch.Tensor]], inputs: tuple):
    cuda = sorted({x.device.index or 0 for x in inputs if isinstance(x, torch.Tensor) and x.is_cuda})
    fork = torch.random.fork_rng(devices=cuda)

    class _Ctx:
        def __enter__(self) -> None:
            fork.__enter__()
            torch.set_rng_state(rng[0])
            for d, s in zip(cuda, rng[1]):
                torch.cuda.set_rng_state(s, d)

        def __exit__(self, *exc: Any) -> None:
            fork.__exit__(*exc)

    return _Ctx()


def run_chunks(
    program: nn.Module, spec: ChunkSpec, size: int, inputs: tuple, keep_rng: bool = False, keep_last: bool = False
) -> ChunkPass:
    """Run ``program`` chunk by chunk without a graph; the outputs joined along the sequence.

    With ``keep_last`` the last chunk runs with a graph, on leaves of the carried states (see
    :class:`ChunkPass`), so that :func:`chunk_backward` need not recompute it.
    """
    dims = [d for x, d in zip(inputs, spec.inputs) if d is not None]
    first = next(x for x, d in zip(inputs, spec.inputs) if d is not None)
    length = first.size(dims[0])
    done = ChunkPass(size, length, tuple(inputs), (), [])
    pieces: list[list[Any]] = []
    starts = list(range(0, length, size))
    for c, start in enumerate(starts):
        if keep_rng:
            done.rng.append(_rng_state(inputs))
        chunk = _chunk_inputs(spec, inputs, start, size)
        if keep_last and c == len(starts) - 1 and torch.is_grad_enabled():
            done.leaves = _leaves(done.states)
            outs, states = program(start, _carried(spec, done.leaves, c), *chunk)
            done.last = (tuple(outs), tuple(states))
            outs, states = _detached(outs), _detached(states)
            done.leaves.append(_leaves([states])[0])
        else:
            with torch.no_grad():
                outs, states = program(start, _carried(spec, done.states, c), *chunk)
        done.states.append(list(states))
        pieces.append(list(outs))
    joined = []
    for i, d in enumerate(spec.outputs):
        column = [p[i] for p in pieces]
        joined.append(torch.cat(column, dim=d) if d is not None else column[-1])
    done.outputs = tuple(joined)
    return done


def _leaves(states: list[list[Any]]) -> list[list[Any]]:
    """Carried states as leaves: floating ones require grad (their gradients go to the chunk before)."""
    return [
        [s.detach().requires_grad_(s.is_floating_point()) if isinstance(s, torch.Tensor) else s for s in row]
        for row in states
    ]


def _detached(values: Any) -> list[Any]:
    return [v.detach() if isinstance(v, torch.Tensor) else v for v in values]


def chunk_forward(
    state: StepState, block: int, program: nn.Module, size: int, *inputs: Any, keep_last: bool = True
) -> ChunkPass:
    """F of a chunked block: all chunks of ``size`` positions, the last one with its graph when
    ``keep_last`` (SeCO; under SpaCO the last chunk may not be kept, and its graph is the largest:
    it attends to every key)."""
    return run_chunks(program, program.chunk_spec, size, inputs, keep_rng=True, keep_last=keep_last)


def chunk_outputs(state: StepState, block: int, done: ChunkPass) -> tuple:
    """The block's outputs over the whole sequence (what later blocks read)."""
    return done.outputs


def _count(target: torch.Tensor, ignore_index: int) -> int:
    """How many targets the loss averages over: positions whose class is not ``ignore_index``."""
    if target.is_floating_point():
        return target.numel() // max(1, target.size(-1))
    return int((target != ignore_index).sum())


def keep_mask(n: int, keep: float) -> list[bool]:
    """SpaCO's draw: which of ``n`` chunks backpropagate, each with probability ``keep``, independently
    (from torch's global generator, so ``torch.manual_seed`` makes it repeatable)."""
    return (torch.rand(n) < keep).tolist()


def _chunk_views(done: ChunkPass, spec: ChunkSpec, target: torch.Tensor, slot: int):
    """The chunks' starts, and per chunk its slice of the target."""
    out_dim = spec.outputs[slot]
    feature_full = done.outputs[slot]
    tdim = (feature_full.dim() + out_dim) if out_dim < 0 else out_dim  # leading dims are shared

    def target_of(start: int, size: int) -> torch.Tensor:
        return target.narrow(tdim, start, size) if target.dim() > tdim else target

    return list(range(0, done.length, done.size)), target_of


def _predict(head: nn.Module | None, start: int, c: int, states: list[list[Any]] | None, feature: torch.Tensor):
    """Chunk ``c``'s prediction and the states its head carries out: a head that scores each position
    on its own runs on the chunk alone; a head program (``chunk_spec``: a head that attends or
    recurs across positions, rewritten like a block) also reads what earlier chunks carried."""
    if head is None:
        return feature, ()
    if states is None:
        return head(feature), ()
    outs, own = head(start, _carried(head.chunk_spec, states, c), feature)
    return outs[0], tuple(own)


def _amp(state: StepState, autocast: str | None) -> Any:
    return torch.autocast(state.device_type, dtype=AUTOCAST_DTYPES[autocast]) if autocast else nullcontext()


def chunk_loss(
    state: StepState,
    block: int,
    program: nn.Module,
    done: ChunkPass,
    head: nn.Module | None,
    target: torch.Tensor,
    slot: int,
    autocast: str | None = None,
) -> float:
    """The loss of a chunked block over the whole sequence, without a graph: every chunk's loss
    weighted by its share of the counted targets (``ignore_index`` excluded), summed. The weights,
    the RNG state each chunk's head started from and the states a head program carries stay in
    ``done`` for :func:`chunk_backward`; the value is known before any backward pass, so replicas
    can agree on it first (a non-finite one backpropagates nothing anywhere)."""
    spec: ChunkSpec = program.chunk_spec
    ignore = getattr(state.loss_fn, "ignore_index", -100)
    starts, target_of = _chunk_views(done, spec, target, slot)
    feature_full, out_dim = done.outputs[slot], spec.outputs[slot]
    total = _count(target, ignore)
    weights, values = [], []
    done.head_rng = []
    done.head_states = [] if hasattr(head, "chunk_spec") else None
    with torch.no_grad():
        for c, start in enumerate(starts):
            size = min(done.size, done.length - start)
            t = target_of(start, size)
            w = _count(t, ignore) / total if total > 0 else 0.0
            weights.append(w)
            done.head_rng.append(_rng_state(done.inputs))  # the head's dropout replays in chunk_backward
            with _amp(state, autocast):
                pred, own = _predict(head, start, c, done.head_states, feature_full.narrow(out_dim, start, size))
                loss = state.loss_fn(pred, t)
            if done.head_states is not None:
                done.head_states.append(list(own))
            values.append(float(loss) * w if w > 0 else 0.0)
    done.weights = weights
    return math.fsum(values)


def chunk_backward(
    state: StepState,
    block: int,
    program: nn.Module,
    done: ChunkPass,
    head: nn.Module | None,
    target: torch.Tensor,
    slot: int,
    value: float,
    accumulate: int = 1,
    autocast: str | None = None,
    keep: float = 1.0,
) -> float:
    """L of a chunked block: its loss (``value``, from :func:`chunk_loss`) backpropagated chunk by
    chunk in reverse (SeCO), or through a random subset of chunks with compensation (SpaCO,
    ``keep < 1``). A head program's carried states are walked back like the block's.

    Returns ``value``; a non-finite one is not backpropagated, as in :func:`localize.runtime.ops.backward`.
    """
    spec: ChunkSpec = program.chunk_spec
    starts, target_of = _chunk_views(done, spec, target, slot)
    n = len(starts)
    weights = done.weights
    last, done.last = done.last, None  # the last chunk's graph: used (or dropped) below
    if not math.isfinite(value):
        return value
    scale = start_backward(state, block, accumulate)
    kept = [True] * n if keep >= 1.0 else keep_mask(n, keep)
    comp = 1.0 if keep >= 1.0 else 1.0 / keep
    leaves = done.leaves if done.leaves is not None else _leaves(done.states)
    head_leaves = _leaves(done.head_states) if done.head_states is not None else None
    for c in reversed(range(n)):
        mine = leaves[c] + (head_leaves[c] if head_leaves is not None else [])
        grads_in = [leaf.grad if isinstance(leaf, torch.Tensor) else None for leaf in mine]
        for leaf in mine:
            if isinstance(leaf, torch.Tensor):
                leaf.grad = None  # this chunk's carried-out gradients are consumed now
        if not kept[c] or (weights[c] == 0.0 and all(g is None for g in grads_in)):
            last = None
            continue
        start = starts[c]
        size = min(done.size, done.length - start)
        if last is not None and c == n - 1:
            (outs, states), last = last, None
        else:
            with _replay(done.rng[c], done.inputs) if done.rng else nullcontext(), _amp(state, autocast):
                outs, states = program(start, _carried(spec, leaves, c), *_chunk_inputs(spec, done.inputs, start, size))
        with _replay(done.head_rng[c], done.inputs), _amp(state, autocast):
            pred, head_own = _predict(head, start, c, head_leaves, outs[slot])
            loss = state.loss_fn(pred, target_of(start, size))
        roots, grads = [], []
        if weights[c] > 0.0 and loss.requires_grad:
            roots.append(scale(loss * (weights[c] * comp)))
            grads.append(None)
        for own, g in zip(tuple(states) + head_own, grads_in):
            if g is not None and own is not None and own.requires_grad:
                roots.append(own)
                grads.append(g * comp if comp != 1.0 else g)
        if roots:
            torch.autograd.backward(roots, grads)
    return value
