"""Balanced partition: choose K-1 of the legal cuts minimising the costliest block.

Exact dynamic programming over the legal cuts (not a greedy sweep). Among partitions with the
same largest block, the one with the smallest sum of squared block costs wins, so blocks come out
as even as the legal cuts allow. Every block must own at least one trainable parameter (a shared
parameter belongs to its last reader, see ``assign_blocks``).

Metrics: ``flops`` (time), ``params``, ``memory`` (the activations a block saves for its backward and
the ones it receives), ``peak`` (``memory`` plus the gradients of the parameters the block trains:
the part of a block's training peak that differs between blocks, since parameters and optimizer
state stay resident whichever block runs).

A cut where several activations cross (``max_frontier > 1``: U-Net skips, an encoder output read by
every decoder layer) costs local learning something: the later block receives those tensors
detached. So a block that starts at such a cut is charged ``FRONTIER_PENALTY`` of an average
block's cost per extra activation, and a wide cut wins only where it balances clearly better.
"""

from __future__ import annotations

import math

import torch.fx as fx

from localize.errors import PlanError
from localize.passes.annotate_tensors import value_info
from localize.passes.cost import node_cost, params_of
from localize.passes.find_cut_points import CutPoint, compute_nodes

__all__ = ["balance_blocks", "FRONTIER_PENALTY", "METRICS"]

METRICS = ("flops", "params", "memory", "peak")
FRONTIER_PENALTY = 0.05  # per activation beyond the first, as a fraction of the average block cost


def balance_blocks(gm: fx.GraphModule, cuts: list[CutPoint], blocks: int, metric: str = "flops") -> list[int]:
    """Positions of the chosen cuts (each cut splits after that compute node), ascending."""
    if blocks == 1:
        return []
    if blocks - 1 > len(cuts):
        raise PlanError(
            f"blocks={blocks} needs {blocks - 1} cuts, but this model has only {len(cuts)} legal cut points, "
            f"so at most {len(cuts) + 1} blocks are possible; ask for fewer blocks, or raise max_frontier "
            f"to allow cuts where several activations cross"
        )
    nodes = compute_nodes(gm)
    weight = [max(node_cost(n).get("memory" if metric == "peak" else metric), 0) for n in nodes]
    last_reader: dict[int, int] = {}
    for i, n in enumerate(nodes):
        for p in params_of(gm, n):
            if p.requires_grad:
                last_reader[id(p)] = i
    owns = [1 if any(last_reader.get(id(p)) == i for p in params_of(gm, n)) else 0 for i, n in enumerate(nodes)]
    if metric == "peak":  # a block's peak also holds the gradients of the parameters it trains
        for i, n in enumerate(nodes):
            weight[i] += sum(p.numel() * p.element_size() for p in params_of(gm, n) if last_reader.get(id(p)) == i)
    prefix, pprefix = [0], [0]
    for w, o in zip(weight, owns):
        prefix.append(prefix[-1] + w)
        pprefix.append(pprefix[-1] + o)
    # boundaries: 0 = start, cuts as "end after position p" -> segment starts at p+1, end = len(nodes)
    starts = [0] + [c.position + 1 for c in cuts]
    end = len(nodes)
    # a block also keeps the activations it receives: charge them to the block that starts there
    entry = {0: 0}
    if metric in ("memory", "peak"):
        by_name = {n.name: n for n in gm.graph.nodes}
        for c in cuts:
            entry[c.position + 1] = sum(
                (value_info(by_name[a]).nbytes if value_info(by_name[a]) else 0) for a in c.activations
            )
    else:
        penalty = FRONTIER_PENALTY * prefix[-1] / blocks
        for c in cuts:
            entry[c.position + 1] = penalty * max(len(c.activations) - 1, 0)

    def seg(a: int, b: int) -> tuple[float, float] | None:
        """Cost of the block covering compute nodes [a, b); None when it trains nothing."""
        if pprefix[b] - pprefix[a] == 0:
            return None
        c = prefix[b] - prefix[a] + entry.get(a, 0)
        return c, c * c

    inf = (math.inf, math.inf)
    m = len(starts)
    # best[k][j]: best (max, sumsq) covering [0, starts[j]) with k blocks; choice for backtracking
    best = [[inf] * m for _ in range(blocks)]
    choice = [[-1] * m for _ in range(blocks)]
    for j in range(1, m):
        s = seg(0, starts[j])
        if s is not None:
            best[1][j] = s
    for k in range(2, blocks):
        for j in range(k, m):
            for i in range(k - 1, j):
                prev = best[k - 1][i]
                if prev[0] == math.inf:
                    continue
                s = seg(starts[i], starts[j])
                if s is None:
                    continue
                cand = (max(prev[0], s[0]), prev[1] + s[1])
                if cand < best[k][j]:
                    best[k][j], choice[k][j] = cand, i
    final, last = inf, -1
    for i in range(blocks - 1, m):
        prev = best[blocks - 1][i] if blocks > 1 else inf
        if prev[0] == math.inf:
            continue
        s = seg(starts[i], end)
        if s is None:
            continue
        cand = (max(prev[0], s[0]), prev[1] + s[1])
        if cand < final:
            final, last = cand, i
    if last < 0:
        raise PlanError(
            f"no partition into {blocks} blocks gives every block a trainable parameter at the {len(cuts)} legal "
            f"cut points; ask for fewer blocks, or raise max_frontier (--max-frontier) to allow cuts where several "
            f"activations cross"
        )
    chosen = [last]
    k, j = blocks - 1, last
    while k > 1:
        j = choice[k][j]
        chosen.append(j)
        k -= 1
    return sorted(starts[j] - 1 for j in chosen)
