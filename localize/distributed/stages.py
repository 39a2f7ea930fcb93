"""Each stage's slice of the step graph: the program one rank runs, with send/recv where values cross.

A pipeline of K stages runs block ``s`` on stage ``s``. :func:`split_step` splits
:attr:`LocalModel.step_program` as ``split_module`` splits a model: every step node gets an owner
stage (a block's call, its outputs, its head, loss and update ops: that block's stage; the model
inputs and the target: stage 0; a cut or getitem between blocks: the latest stage among its inputs),
and a value crosses boundary ``s -> s+1`` when a stage ``<= s`` computes it and a stage ``> s``
reads it, so a value that block 0 makes and block 3 reads is forwarded by stages 1 and 2. Stage
``s > 0`` starts with a :func:`~localize.distributed.ops.recv` node and every stage but the last
sends on right after its block's forward (:func:`~localize.distributed.ops.send`), before it learns,
so the next stage starts at once. With replicas, a stage's replicas agree on the loss before
``backward`` (:func:`~localize.distributed.ops.agree_loss`); the pipeline runs the block under
``DistributedDataParallel``, which averages the gradients during ``backward`` and shares batch-norm
buffers before the forward. A chunked block backpropagates once per chunk, which DDP's reducer (one
backward per forward) cannot follow: its replicas agree on the value of
:func:`~localize.runtime.chunks.chunk_loss` before ``chunk_backward``
(:func:`~localize.distributed.ops.agree_value`) and average the gradients after it, in one
all-reduce (:func:`~localize.distributed.ops.average_gradients`).

The nodes a stage runs are the step graph's own nodes, in the step's order; fx writes each stage's
code as it writes the step's.

Example:
    >>> import torch, localize
    >>> from localize.distributed.stages import Layout, split_step
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16),
    ...                           torch.nn.ReLU(), torch.nn.Linear(16, 3))
    >>> lm = localize.transform(net, blocks=2, example_inputs=(torch.randn(4, 8),))
    >>> stages = split_step(lm)
    >>> [s.sends for s in stages]  # only the cut activation travels, with the target
    [['target', 'cut_1__1'], []]
    >>> print(stages[1].program.code.strip().splitlines()[1])
        recv = localize_distributed_ops_recv(state)
    >>> Layout.of(world_size=4, stages=2).grid()
    'stage 0: ranks 0, 2 | stage 1: ranks 1, 3'
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch.fx as fx

from localize.distributed import ops as dist_ops
from localize.errors import ConfigError
from localize.runtime import chunks, ops

__all__ = ["Layout", "StageProgram", "split_step"]


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
class StageProgram:
    """One stage's slice of the step: ``program(state, *inputs, target)`` on stage 0,
    ``program(state)`` on the others (they receive); it returns the block's loss value."""

    stage: int
    program: fx.GraphModule
    receives: list[str]  # names of the values it receives (target first), in message order
    sends: list[str]  # names of the values it sends on (target first)

    def __str__(self) -> str:
        recv = f"  <- {', '.join(self.receives)}\n" if self.receives else ""
        send = f"\n  -> {', '.join(self.sends)}" if self.sends else ""
        return f"stage {self.stage}:\n{recv}" + self.program.code.strip() + send


def split_step(lm, replicas: int = 1) -> list[StageProgram]:
    """Split the step graph of ``lm`` (a :class:`~localize.runtime.model.LocalModel`) per stage."""
    step = lm.step_program
    stages = len(lm.blocks)
    nodes = [n for n in step.graph.nodes if n.op != "output"]
    state, *inputs, target = [n for n in nodes if n.op == "placeholder"]
    owner: dict[fx.Node, int] = {}
    for node in nodes:
        block = node.meta.get("localize", {}).get("block")
        if node.op == "placeholder":
            owner[node] = 0
        elif (
            node.op == "call_function"
            and node.target is operator.getitem
            and node.args[0].op == "call_module"
        ):
            owner[node] = owner[node.args[0]]  # only the needed parts of a block's outputs travel
        elif block is not None and node.op in ("call_module", "get_attr") or node.target in _BLOCK_OPS:
            owner[node] = block
        else:
            owner[node] = max((owner[a] for a in node.all_input_nodes if a is not state), default=0)
    for s, b in enumerate(lm.blocks):
        calls = [n for n in nodes if n.op in ("call_module", "get_attr") and n.target.startswith(("block_", "chunk_"))]
        if b.index != s or not any(owner[n] == s for n in calls):
            raise ConfigError(
                f"stage {s} has no block {s} call in the step; this LocalModel cannot be pipelined"
            )
    last_reader = {n: max((owner[u] for u in n.users if u.op != "output"), default=owner[n]) for n in nodes}
    last_reader[target] = stages - 1  # every stage's loss reads it
    crossing = [
        [n for n in nodes if n is not state and owner[n] <= s < last_reader[n]] for s in range(stages - 1)
    ]
    for values in crossing:  # the target first: the receiver counts samples by it
        values.sort(key=lambda n: n is not target)
    return [_stage_program(step, nodes, owner, crossing, s, stages, replicas) for s in range(stages)]


_BLOCK_OPS = {
    chunks.chunk_forward,
    chunks.chunk_outputs,
    chunks.chunk_loss,
    chunks.chunk_backward,
    ops.local_loss,
    ops.head_loss,
    ops.backward,
    ops.check_loss,
    ops.clip_gradients,
    ops.optimizer_step,
    ops.scheduler_step,
    ops.after_update,
    ops.release_gradients,
    ops.autocast_enter,
    ops.autocast_exit,
}


# backward ops whose loss the replicas agree on first: (the loss's position in the args, the agreeing op)
_AGREE = {
    ops.backward: (2, dist_ops.agree_loss),  # a tensor with its graph: DDP averages during backward
    chunks.chunk_backward: (7, dist_ops.agree_value),  # chunk_loss's number: averaged after, by hand
}


def _stage_program(step, nodes, owner, crossing, s: int, stages: int, replicas: int) -> StageProgram:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    root = {}
    state = nodes[0]
    env[state] = graph.placeholder("state")
    receives = crossing[s - 1] if s > 0 else []
    if s == 0:
        for n in nodes[1:]:
            if n.op == "placeholder":
                env[n] = graph.placeholder(n.name, type_expr=n.type)
    else:
        got = graph.call_function(dist_ops.recv, (env[state],))
        for i, n in enumerate(receives):
            env[n] = graph.create_node("call_function", operator.getitem, (got, i), name=n.name)
    sends = crossing[s] if s < stages - 1 else []
    sent = not sends
    value = None
    for n in nodes:
        if n.op == "placeholder" or owner[n] != s:
            continue
        action = n.meta.get("localize", {}).get("action") or ""
        if not sent and action.endswith((":L", ":U")):
            graph.call_function(dist_ops.send, (env[state], [env[v] for v in sends]))
            sent = True
        if n.op in ("call_module", "get_attr"):
            root[n.target] = getattr(step, n.target)
        lookup = env.__getitem__
        agree = _AGREE.get(n.target) if replicas > 1 and n.op == "call_function" else None
        if agree is not None:  # the replicas agree on the loss before backward
            index, agree_fn = agree
            loss = n.args[index]
            agreed = graph.create_node("call_function", agree_fn, (env[state], s, env[loss]), name=f"agreed_{s}")
            lookup = lambda m, loss=loss, agreed=agreed: agreed if m is loss else env[m]  # noqa: E731
        env[n] = graph.node_copy(n, lookup)
        if n.target is chunks.chunk_backward and replicas > 1:
            env[n] = graph.create_node(
                "call_function", dist_ops.average_gradients, (env[state], s, env[n]),
                {"accumulate": n.kwargs.get("accumulate", 1)}, name=f"averaged_{s}",
            )
        if n.op == "call_function" and n.target in _BLOCK_OPS:
            value = env[n]
    if not sent:
        graph.call_function(dist_ops.send, (env[state], [env[v] for v in sends]))
    graph.output(value)
    graph.lint()
    return StageProgram(
        s,
        fx.GraphModule(root, graph, class_name=f"Stage{s}"),
        [n.name for n in receives],
        [n.name for n in sends],
    )
