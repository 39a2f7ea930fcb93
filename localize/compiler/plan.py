"""The plan: what the passes decided, kept as data for the runtime, the CLI and the artifacts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx
from torch import nn

from localize.compiler.tracer import Traced
from localize.passes.cost import Cost
from localize.passes.find_cut_points import CutPoint

__all__ = ["BlockPlan", "Plan"]


@dataclass
class BlockPlan:
    """One block: the flat graph's compute nodes it runs and the values it exchanges."""

    index: int
    nodes: list[str]
    inputs: list[str]  # program values it reads (model inputs or other blocks' outputs)
    outputs: list[str]  # values it produces for later blocks or the model output
    cost: Cost
    primary: str | None = None  # the activation its aux head reads (None for the last block)
    feature_shape: tuple[int, ...] | None = None
    feature_layout: str | None = None
    cut_inputs: list[str] = field(default_factory=list)  # inputs that arrive through a gradient cut


@dataclass
class Plan:
    model: nn.Module  # the user's model (parameters shared with the blocks)
    traced: Traced
    gm: fx.GraphModule  # the flat, annotated graph
    program: fx.GraphModule  # top level: submod_i calls, gradient cuts, getitems
    qualname_map: dict[str, str]
    legal_cuts: list[CutPoint]
    cut_positions: list[int]
    blocks: list[BlockPlan]
    output_index: int  # which flat output leaf the loss reads
    output_shape: tuple[int, ...] | None
    output_layout: str | None
    balance: str
    max_frontier: int
    aux: str
    aux_options: dict[str, Any]
    annotated: bool  # shapes known (example inputs given or first call seen)
    timings: dict[str, float] = field(default_factory=dict)
    graphs: dict[str, str] = field(default_factory=dict)  # pass name -> graph code after it

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)
