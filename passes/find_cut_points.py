"""Legal cut points: where a model may be split into gradient-isolated blocks.

The compute nodes (``call_module``/``call_function``/``call_method``) are numbered in graph
order, which is the order they run in. A *cut at position i* splits the model between compute
node ``i`` and ``i + 1``. The values that *cross* it are those produced at or before ``i`` and
used after ``i``.

A cut is legal when

1. between 1 and ``max_frontier`` crossing values need a gradient (activations). Values that need
   none (masks, position ids, sizes, constants) cross freely; parameters are not values of any
   block. A float model input counts as an activation between its first use by a layer and its
   last use (``x + f(x)`` right at the input). A residual unit has two activations alive inside
   it (the skip and the branch), so with the default ``max_frontier=1`` no skip connection is
   ever broken;
2. it does not split a *unit*: a leaf module, or a module held in a container
   (``nn.Sequential``/``nn.ModuleList``/``nn.ModuleDict``) such as a ResNet's residual block or a
   transformer layer. Each call of a module is its own unit, so a ReLU reused everywhere splits
   nothing;
3. some trainable parameter is used after it (a block with nothing to train is useless);
4. every crossing activation is a tensor: a cut never separates a multi-output op (an LSTM's
   ``(output, (h, c))``) from the ``getitem`` s that unpack it, since a tuple cannot be detached
   or read by an aux head; and (when shapes are known) one of them is batch-first, with the
   first input's leading size, for the aux head to read (not an RNN's ``(layers, batch, h)``).

The dataflow graph is a ``networkx.DiGraph`` so the frontier of any cut can be checked by
reachability in the verification pass as well.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import networkx as nx
import torch
import torch.fx as fx

from localize.compiler.trace_export import _clean_export_path
from localize.compiler.traced import lmeta
from localize.passes.annotate_tensors import value_info
from localize.passes.cost import params_of

__all__ = ["CutPoint", "compute_nodes", "dataflow_graph", "find_cut_points", "needs_grad"]

COMPUTE_OPS = ("call_module", "call_function", "call_method")
_CONTAINERS = (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict)
# Ops whose outputs never carry a gradient, for graphs annotated without example inputs.
_NO_GRAD_METHODS = {"size", "dim", "numel", "type", "long", "int", "bool", "argmax", "argmin", "eq", "ne"}


@dataclass(frozen=True)
class CutPoint:
    """A legal place to split: after compute node ``position`` (named ``after``)."""

    position: int
    after: str
    crossing: tuple[str, ...]  # every value produced before and used after the cut
    activations: tuple[str, ...]  # the crossing values that need a gradient


def compute_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op in COMPUTE_OPS]


def dataflow_graph(gm: fx.GraphModule) -> nx.DiGraph:
    """The graph's data dependencies as a networkx DiGraph over node names."""
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        g.add_node(node.name)
        for arg in node.all_input_nodes:
            g.add_edge(arg.name, node.name)
    return g


def needs_grad(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether a node's value needs a gradient (from the example run, or from dataflow)."""
    cached = lmeta(node).get("needs_grad")
    if cached is not None:
        return cached
    info = value_info(node)
    if info is not None:
        result = info.requires_grad
    elif node.op == "placeholder":
        result = False
    elif node.op == "get_attr":
        value = gm
        for part in node.target.split("."):
            value = getattr(value, part)
        result = isinstance(value, torch.Tensor) and value.requires_grad
    elif node.op == "call_method" and node.target in _NO_GRAD_METHODS:
        result = False
    elif node.op == "call_function" and getattr(node.target, "__name__", "") in ("getattr", "size", "eq", "ne", "lt", "gt"):
        result = False
    else:
        result = bool(params_of(gm, node)) or any(needs_grad(gm, a) for a in node.all_input_nodes)
    lmeta(node)["needs_grad"] = result
    return result


def _is_tensor(node: fx.Node) -> bool:
    """Whether a node produces one tensor (from the example run; else: not unpacked by getitem)."""
    info = value_info(node)
    if info is not None:
        return info.is_tensor
    return not node.users or any(u.target is not operator.getitem for u in node.users)


def _batch_size(gm: fx.GraphModule) -> int | None:
    """The leading size of the first tensor input, when the graph was annotated."""
    for node in gm.graph.nodes:
        info = value_info(node) if node.op == "placeholder" else None
        if info is not None and info.is_tensor and info.shape:
            return info.shape[0]
    return None


def _batch_first(node: fx.Node, batch: int | None) -> bool:
    info = value_info(node)
    if batch is None or info is None:
        return True
    return info.is_tensor and info.floating and bool(info.shape) and info.shape[0] == batch


def _unit_intervals(gm: fx.GraphModule, nodes: list[fx.Node], root: torch.nn.Module) -> list[tuple[int, int]]:
    """[first, last] positions of every call of a module that must not be split."""
    spans: dict[str, list[int]] = {}
    for pos, node in enumerate(nodes):
        stack = node.meta.get("nn_module_stack") or {}
        for key, (path, _type) in stack.items():
            if _is_unit(root, _clean_export_path(path)):
                span = spans.setdefault(key, [pos, pos])
                span[1] = pos
    return [(a, b) for a, b in spans.values() if b > a]


def _is_unit(root: torch.nn.Module, path: str) -> bool:
    if not path:
        return False
    try:
        module = root.get_submodule(path)
    except AttributeError:
        return False
    if not any(True for _ in module.children()):
        return True
    parent_path = path.rpartition(".")[0]
    try:
        parent = root.get_submodule(parent_path) if parent_path else root
    except AttributeError:
        return False
    return isinstance(parent, _CONTAINERS)


def find_cut_points(
    gm: fx.GraphModule, root: torch.nn.Module | None = None, *, max_frontier: int = 1, inside_units: bool = False
) -> list[CutPoint]:
    """Every legal cut, in graph order. Sets ``meta["localize"]["position"]`` on compute nodes.

    ``root`` is the user's model (module types decide what a unit is); defaults to ``gm``.
    ``inside_units=True`` drops rule 2: the places where a unit could be split (recomputation
    splits units there, :mod:`localize.passes.recompute_units`; blocks never do).
    """
    root = root if root is not None else gm
    nodes = compute_nodes(gm)
    pos = {n: i for i, n in enumerate(nodes)}
    for n, i in pos.items():
        if not inside_units:  # the plan's numbering, not a later graph's
            lmeta(n)["position"] = i
    count = len(nodes)
    # diff-array sweep: a value defined at p and last used at q crosses cuts p..q-1
    grad_diff = [0] * (count + 1)
    tuple_diff = [0] * (count + 1)
    batch = _batch_size(gm)
    readable_diff = [0] * (count + 1)  # crossing activations an aux head can read
    crossing_at: list[list[fx.Node]] = [[] for _ in range(count)]
    for n in nodes:
        users = [pos[u] for u in n.users if u in pos]
        if not users:
            continue
        last = max(users)
        if last <= pos[n]:
            continue
        if needs_grad(gm, n):
            grad_diff[pos[n]] += 1
            grad_diff[last] -= 1
            if not _is_tensor(n):
                tuple_diff[pos[n]] += 1
                tuple_diff[last] -= 1
            if _batch_first(n, batch):
                readable_diff[pos[n]] += 1
                readable_diff[last] -= 1
        for i in range(pos[n], last):
            crossing_at[i].append(n)
    for ph in gm.graph.nodes:
        if ph.op != "placeholder":
            continue
        # A float model input that a layer reads and that is read again later is a skip
        # connection from the input (x + f(x)): count it like an activation.
        info = value_info(ph)
        users = sorted(pos[u] for u in ph.users if u in pos)
        if not users or (info is not None and not info.floating):
            continue
        first = next((i for i in users if params_of(gm, nodes[i])), None)
        if first is not None and users[-1] > first:
            grad_diff[first] += 1
            grad_diff[users[-1]] -= 1
            for i in range(first, users[-1]):
                crossing_at[i].append(ph)
            if _batch_first(ph, batch):
                readable_diff[first] += 1
                readable_diff[users[-1]] -= 1
    blocked = [False] * count
    for a, b in [] if inside_units else _unit_intervals(gm, nodes, root):
        for i in range(a, b):
            blocked[i] = True
    has_params_after = [False] * (count + 1)
    for i in range(count - 1, -1, -1):
        has_params_after[i] = has_params_after[i + 1] or bool(params_of(gm, nodes[i]))
    has_params_before = False
    cuts = []
    running = tuples = readable = 0
    for i in range(count - 1):
        running += grad_diff[i]
        tuples += tuple_diff[i]
        readable += readable_diff[i]
        has_params_before = has_params_before or bool(params_of(gm, nodes[i]))
        if blocked[i] or tuples or not (1 <= running <= max_frontier):
            continue
        if batch is not None and not readable:
            continue
        if not (has_params_before and has_params_after[i + 1]):
            continue
        crossing = crossing_at[i]
        cuts.append(
            CutPoint(
                i,
                nodes[i].name,
                tuple(c.name for c in crossing),
                tuple(c.name for c in crossing if needs_grad(gm, c) or c.op == "placeholder"),
            )
        )
    return cuts
