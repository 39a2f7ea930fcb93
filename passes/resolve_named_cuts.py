"""User-chosen cuts: ``cuts=["layer2", "layer3"]`` starts a new block at each named module."""

from __future__ import annotations

import torch
import torch.fx as fx

from localize.compiler.tracer import lmeta
from localize.errors import PlanError
from localize.passes.find_cut_points import compute_nodes

__all__ = ["resolve_named_cuts"]


def resolve_named_cuts(gm: fx.GraphModule, root: torch.nn.Module, names: list[str]) -> list[int]:
    """Cut positions (split after that compute node) so that each named module begins a block."""
    known = dict(root.named_modules())
    nodes = compute_nodes(gm)
    positions = []
    for name in names:
        if not isinstance(name, str) or name not in known or name == "":
            sample = [n for n in known if n and "." not in n][:8]
            raise PlanError(
                f"cuts= names {name!r}, which is not a module of {type(root).__name__}; "
                f"name submodules by their path, e.g. {sample}"
            )
        first = next(
            (
                i
                for i, n in enumerate(nodes)
                if (p := lmeta(n).get("module", "")) == name or p.startswith(name + ".")
            ),
            None,
        )
        if first is None:
            raise PlanError(f"cuts= names {name!r}, but that module is never called in forward; name a module that runs")
        if first == 0:
            raise PlanError(f"cuts= names {name!r}, the first module to run: a cut there leaves block 0 empty")
        positions.append(first - 1)
    if len(set(positions)) != len(positions):
        raise PlanError(f"cuts={names} name modules that start at the same place; name each boundary once")
    return sorted(positions)
