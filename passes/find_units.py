"""The model's repeated units: residual blocks, transformer layers, as the flat graph runs them.

*Units* are the children of ``nn.Sequential`` / ``nn.ModuleList`` / ``nn.ModuleDict`` containers,
outermost first, whose module type occurs at least twice (so ``layer1.0`` ... ``layer3.1``,
``layers.3``, ``transformer.h.2``; a lone ``classifier`` Sequential's parts are not units). They are
ordered by first use in the graph. Aux strategies that copy later layers (AugLocal, MAN) read them.

>>> import torch, localize
>>> from localize.zoo import ResNet1d
>>> from localize.passes.find_units import find_units
>>> lm = localize.transform(ResNet1d(1, 10, widths=(8, 16), blocks_per_stage=(2, 1)), blocks=2,
...                         example_inputs=(torch.randn(2, 1, 40),))
>>> [(u.path, u.output_shape[1:]) for u in find_units(lm.plan)]
[('layer1.0', (8, 40)), ('layer1.1', (8, 40)), ('layer2.0', (16, 20))]
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.fx as fx
from torch import nn

from localize.compiler.tracer import lmeta
from localize.passes.annotate_tensors import value_info
from localize.passes.infer_layout import infer_layout

if TYPE_CHECKING:
    from localize.compiler.plan import Plan

__all__ = ["Unit", "find_units", "last_unit_until", "first_unit_of", "is_float_value"]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass(frozen=True)
class Unit:
    """One repeated layer of the model, as the flat graph runs it."""

    index: int
    path: str  # module path in the user's model
    nodes: frozenset[str]  # flat-graph compute nodes it owns
    input: str | None  # the activation it reads (None when it reads no float tensor)
    output: str  # the activation it hands on
    input_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...]
    input_layout: str | None
    output_layout: str
    blocks: tuple[int, ...]  # blocks its nodes lie in (one: cuts never split a unit)


def _unit_paths(model: nn.Module) -> list[str]:
    children = []
    for path, module in model.named_modules():
        if isinstance(module, _CONTAINERS):
            children += [f"{path}.{name}" if path else name for name, _ in module.named_children()]
    candidates = set(children)
    outer = [p for p in children if not any(p.startswith(q + ".") for q in candidates)]
    types = Counter(type(model.get_submodule(p)) for p in outer)
    return [p for p in outer if types[type(model.get_submodule(p))] >= 2]


def find_units(plan: Plan) -> list[Unit]:
    """The model's repeated units, ordered by first use in the flat graph (cached on the plan)."""
    cached = plan.__dict__.get("_localize_units")
    if cached is not None:
        return cached
    paths = _unit_paths(plan.model)
    owner: dict[fx.Node, str] = {}
    first: dict[str, int] = {}
    compute = [n for n in plan.gm.graph.nodes if n.op in ("call_module", "call_function", "call_method")]
    order = {n: i for i, n in enumerate(plan.gm.graph.nodes)}
    by_prefix = sorted(paths, key=len, reverse=True)
    for node in compute:
        module = lmeta(node).get("module") or ""
        path = next((p for p in by_prefix if module == p or module.startswith(p + ".")), None)
        if path is not None:
            owner[node] = path
            first.setdefault(path, order[node])
    units = []
    for path in sorted(first, key=first.__getitem__):
        nodes = [n for n, p in owner.items() if p == path]
        names = {n.name for n in nodes}
        outside = [
            a for n in nodes for a in n.all_input_nodes if a.name not in names and a.op not in ("get_attr",)
        ]
        inp = _main_activation(outside)
        handed = [n for n in nodes if any(u.name not in names for u in n.users) and is_float_value(n)]
        out = max(handed or nodes, key=order.__getitem__)
        out_info = value_info(out)
        if out_info is None or not out_info.is_tensor:
            continue
        blocks = tuple(sorted({lmeta(n).get("block", 0) for n in nodes}))
        units.append(
            Unit(
                index=len(units),
                path=path,
                nodes=frozenset(names),
                input=inp.name if inp is not None else None,
                output=out.name,
                input_shape=value_info(inp).shape if inp is not None else None,
                output_shape=out_info.shape,
                input_layout=infer_layout(plan.gm, inp) if inp is not None else None,
                output_layout=infer_layout(plan.gm, out),
                blocks=blocks,
            )
        )
    plan.__dict__["_localize_units"] = units
    return units


def is_float_value(node: fx.Node) -> bool:
    """Whether the node holds a floating-point tensor (on the example inputs)."""
    info = value_info(node)
    return info is not None and info.is_tensor and info.floating


def _main_activation(nodes: list[fx.Node]) -> fx.Node | None:
    floats = [n for n in dict.fromkeys(nodes) if is_float_value(n)]
    if not floats:
        return None
    return max(floats, key=lambda n: (value_info(n).requires_grad, value_info(n).nbytes))


def last_unit_until(units: list[Unit], block: int) -> int:
    """Index of the last unit that lies entirely in blocks ``<= block`` (-1 when none does)."""
    done = [u.index for u in units if max(u.blocks) <= block]
    return max(done) if done else -1


def first_unit_of(units: list[Unit], block: int) -> Unit | None:
    """The first unit whose nodes lie in ``block``."""
    return next((u for u in units if block in u.blocks), None)
