"""Where each program value is computed and which values cross each stage boundary.

A pipeline of K stages runs block ``s`` on stage ``s``. Every top-level program node gets an owner
stage: a block call its block, a ``getitem`` on a block call that block (so only the needed parts
of a block's output tuple travel), a placeholder stage 0 (it reads the data), any other node the
latest stage among its inputs. A value crosses boundary ``s -> s+1`` when a stage ``<= s`` computes
it and a stage ``> s`` reads it, so a value that block 0 makes and block 3 reads is forwarded by
stages 1 and 2. The model output node is not run: each stage only computes its own loss.

Example:
    >>> import torch, localize
    >>> from localize.distributed.stages import Layout, stage_plan
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16),
    ...                           torch.nn.ReLU(), torch.nn.Linear(16, 3))
    >>> lm = localize.transform(net, blocks=2, example_inputs=(torch.randn(4, 8),))
    >>> plan = stage_plan(lm)
    >>> [[n.op for n in nodes] for nodes in plan.compute]  # the input and block 0 on stage 0
    [['placeholder', 'call_module', 'call_function', 'call_method'], ['call_module', 'call_function']]
    >>> [n.op for n in plan.sends[0]]  # only the cut activation travels (with the target)
    ['call_method']

    ``print(plan)`` lists the node names, e.g. ``stage 0: input_1, submod_0, getitem, cut_1__1`` /
    ``0 -> 1: target, cut_1__1`` / ``stage 1: submod_1, getitem_1``.
    >>> Layout.of(world_size=4, stages=2).grid()
    'stage 0: ranks 0, 2 | stage 1: ranks 1, 3'
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch.fx as fx

from localize.compiler.tracer import lmeta
from localize.errors import ConfigError
from localize.passes.build_step_graph import reads_model_inputs

__all__ = ["Layout", "StagePlan", "stage_plan", "reads_model_inputs"]


@dataclass(frozen=True)
class Layout:
    """``world_size = stages × replicas`` ranks; replica ``r``'s pipeline is ranks ``r*K .. r*K+K-1``.

    Keeping a pipeline on consecutive ranks puts it on one node under ``torchrun --nproc-per-node K``
    (activations move over the fast local links) and the replicas of a stage on different nodes
    (only gradients are all-reduced between them).
    """

    stages: int
    replicas: int

    @classmethod
    def of(cls, world_size: int, stages: int) -> Layout:
        if world_size < stages or world_size % stages:
            raise ConfigError(
                f"world size {world_size} is not a multiple of the {stages} blocks: launch K x R processes "
                f"(K = {stages} pipeline stages, R replicas of each), e.g. torchrun --nproc-per-node {stages}"
            )
        return cls(stages, world_size // stages)

    @property
    def world_size(self) -> int:
        return self.stages * self.replicas

    def rank(self, stage: int, replica: int) -> int:
        return replica * self.stages + stage

    def stage_of(self, rank: int) -> int:
        return rank % self.stages

    def replica_of(self, rank: int) -> int:
        return rank // self.stages

    def stage_ranks(self, stage: int) -> list[int]:
        """The replicas of one stage: the ranks that all-reduce its gradients."""
        return [self.rank(stage, r) for r in range(self.replicas)]

    def grid(self) -> str:
        return " | ".join(
            f"stage {s}: ranks {', '.join(map(str, self.stage_ranks(s)))}" for s in range(self.stages)
        )


@dataclass
class StagePlan:
    """Per stage, the program nodes it evaluates (in program order) and the values it sends on."""

    compute: list[list[fx.Node]]  # compute[s]: nodes stage s evaluates, its block call among them
    sends: list[list[fx.Node]]  # sends[s]: values stage s hands to stage s + 1 (K - 1 entries)
    placeholders: list[fx.Node]  # the model inputs, in placeholder order
    reads_inputs: list[bool]  # stage s's loss reads the model inputs (LossContext.inputs)

    @property
    def stages(self) -> int:
        return len(self.compute)

    def __str__(self) -> str:
        lines = []
        for s, nodes in enumerate(self.compute):
            lines.append(f"stage {s}: {', '.join(n.name for n in nodes)}")
            if s < len(self.sends):
                lines.append(f"  {s} -> {s + 1}: {', '.join(['target'] + [n.name for n in self.sends[s]])}")
        return "\n".join(lines)


def stage_plan(lm) -> StagePlan:
    """Assign every program node of ``lm`` (a :class:`~localize.runtime.model.LocalModel`) to a stage."""
    nodes = [n for n in lm.program.graph.nodes if n.op != "output"]
    stages = len(lm.blocks)
    owner: dict[fx.Node, int] = {}
    for node in nodes:
        if node.op == "placeholder":
            owner[node] = 0
        elif node.op == "call_module":
            owner[node] = lmeta(node)["block"]
        elif _is_block_getitem(node):
            owner[node] = owner[node.args[0]]
        else:
            owner[node] = max((owner[a] for a in node.all_input_nodes), default=0)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    reads_inputs = [reads_model_inputs(b.aux) for b in lm.blocks]
    last_reader = {n: max((owner[u] for u in n.users if u.op != "output"), default=owner[n]) for n in nodes}
    for s, reads in enumerate(reads_inputs):
        if reads:
            for p in placeholders:
                last_reader[p] = max(last_reader[p], s)
    compute = [[n for n in nodes if owner[n] == s] for s in range(stages)]
    sends = [[n for n in nodes if owner[n] <= s < last_reader[n]] for s in range(stages - 1)]
    for s, block in enumerate(lm.blocks):
        if not any(n.op == "call_module" for n in compute[s]):
            raise ConfigError(
                f"stage {s} has no block call in the program; this LocalModel cannot be pipelined"
            )
        if block.index != s:
            raise ConfigError(
                f"block {block.index} is listed at position {s}; blocks must be numbered in order"
            )
    return StagePlan(compute, sends, placeholders, reads_inputs)


def _is_block_getitem(node: fx.Node) -> bool:
    return (
        node.op == "call_function"
        and node.target is operator.getitem
        and isinstance(node.args[0], fx.Node)
        and node.args[0].op == "call_module"
    )
