"""Build the training step as one fx graph: the program every back end runs.

The split program (:mod:`localize.passes.insert_gradient_cuts`) computes the model: block calls,
``getitem`` and the ``detach`` at every cut. The *step graph* adds, in schedule order, what training
does with it: for each block, ``F`` calls the block on its detached inputs; ``L`` calls its aux head
on the block's primary activation (the last block reads the model output), computes the local loss
and backpropagates inside the block; ``U`` steps the block's optimizer, runs its head's
after-update hook (and, with a scheduler, steps its learning-rate scheduler) and frees the block's
gradients. With ``autocast``,
each block call and each loss sit between ``autocast_enter`` and ``autocast_exit`` nodes; with
``accumulate=N`` the gradient ops carry ``accumulate=N``. Everything but the blocks and heads is a call of :mod:`localize.runtime.ops`, so
fx's own code generator writes the whole step as Python: ``LocalModel.train_step`` runs that code,
``program.py`` holds the same text, and each distributed stage runs its slice of the same graph.

Program nodes between blocks (``getitem``, the cuts) are placed as early as their inputs allow, so a
block's non-detached outputs die as soon as its loss has read them. Every node of the step carries
``meta["localize"]["action"]`` (``"B0:F"``), from which :func:`schedule_of` prints the schedule.

Example:
    >>> import torch, localize
    >>> from localize.passes.build_step_graph import schedule_of
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> lm = localize.transform(net, blocks=2, example_inputs=(torch.randn(2, 4),), aux="linear")
    >>> str(schedule_of(lm.step_program))
    'B0:F B0:L B0:U B1:F B1:L B1:U'
    >>> print(lm.step_program.code.strip().splitlines()[0])
    def forward(self, state, input_1, target):
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch.fx as fx
from torch import nn

from localize.compiler.tracer import lmeta
from localize.errors import ConfigError
from localize.runtime import chunks, ops
from localize.runtime.chunks import Chunking
from localize.runtime.schedule import Action, ActionKind, Schedule, sequential_schedule

__all__ = ["build_step_graph", "reads_model_inputs", "schedule_of"]


def reads_model_inputs(head: nn.Module | None) -> bool:
    """Whether a head's loss may read ``LossContext.inputs`` (then the model inputs reach it).

    Heads with their own ``local_loss`` may (e.g. InfoPro reconstructs the input image); a head
    that does not can say so with ``reads_model_inputs = False``.
    """
    return head is not None and hasattr(head, "local_loss") and getattr(head, "reads_model_inputs", True)


def build_step_graph(
    program: fx.GraphModule,
    heads: Sequence[nn.Module | None],
    loss_slots: Sequence[int],
    schedule: Schedule | None = None,
    clip_grad_norm: float | None = None,
    accumulate: int = 1,
    autocast: str | None = None,
    scheduler: bool = False,
    chunking: Chunking | None = None,
    block_modules: Sequence[nn.Module] | None = None,
) -> fx.GraphModule:
    """The step graph of ``program`` (a GraphModule named ``TrainStep``).

    Args:
        program: the split program: ``submod_<i>`` block calls, cuts and outputs.
        heads: block ``i``'s aux head, or None (the last block, which reads the model output).
        loss_slots: which output of block ``i`` its loss reads (the primary activation for a
            head, the selected model output for the last block).
        schedule: the order of the actions; default each block in turn, ``F L U``.
        clip_grad_norm: when given, each block's update starts by clipping its gradient norm to it.
        accumulate: update every ``accumulate``-th call, on the gradients of the calls since.
        autocast: ``"bf16"`` or ``"fp16"``: blocks, heads and losses run under ``torch.autocast``.
        scheduler: whether each update is followed by a ``scheduler_step`` node.
        chunking: with ``transform(chunk_size=)``: each block's F is ``chunk_forward`` of its chunk
            program (then ``chunk_outputs``) and its L is ``chunk_loss`` then ``chunk_backward`` (SeCO / SpaCO).
        block_modules: what the step calls for each block instead of the program's submodule (the
            ``recompute=True`` version of the same block).

    Its ``forward(state, *inputs, target)`` returns the K loss values; ``state`` is a
    :class:`localize.runtime.ops.StepState`.
    """
    blocks = len(heads)
    schedule = schedule or sequential_schedule(blocks)
    _check_schedule(schedule, blocks)
    nodes = list(program.graph.nodes)
    calls = {lmeta(n)["block"]: n for n in nodes if n.op == "call_module"}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    root: dict[str, Any] = {}
    state = graph.placeholder("state")
    inputs = []
    for n in nodes:
        if n.op == "placeholder":  # no defaults: every input is passed, and the target follows them
            env[n] = graph.placeholder(n.name, type_expr=n.type)
            inputs.append(env[n])
    target = graph.placeholder("target")
    needed = _feeding_blocks(list(calls.values()))  # the model output itself is not computed
    pending = [n for n in nodes if n in needed and n.op not in ("placeholder", "call_module")]
    features: dict[int, fx.Node] = {}
    values: dict[int, fx.Node] = {}
    head_attr: dict[int, fx.Node] = {}
    chunk_prog: dict[int, fx.Node] = {}
    passes: dict[int, fx.Node] = {}
    current: list[str | None] = [None]

    def tag(node: fx.Node, block: int | None) -> fx.Node:
        node.meta["localize"] = {"block": block, "action": current[0]}
        return node

    acc = {"accumulate": int(accumulate)} if accumulate != 1 else {}

    def call(fn: Any, block: int, name: str, *args: Any, **kwargs: Any) -> fx.Node:
        return tag(
            graph.create_node("call_function", fn, (state, block, *args), kwargs, name=f"{name}_{block}"), block
        )

    def enter(b: int, part: str) -> fx.Node | None:
        return call(ops.autocast_enter, b, f"autocast_{part}", autocast) if autocast is not None else None

    def leave(b: int, mode: fx.Node | None) -> None:
        if mode is not None:
            call(ops.autocast_exit, b, f"{mode.name.rpartition('_')[0]}_exit", mode)

    def emit_ready() -> None:
        """Program nodes (getitem, cuts) whose inputs exist, in program order."""
        progress = True
        while progress:
            progress = False
            for n in list(pending):
                if all(a in env for a in n.all_input_nodes):
                    if n.op == "get_attr":
                        root[n.target] = operator.attrgetter(n.target)(program)
                    env[n] = tag(graph.node_copy(n, env.__getitem__), lmeta(n).get("block"))
                    pending.remove(n)
                    progress = True

    def head_node(b: int) -> fx.Node:
        if b not in head_attr:
            head_attr[b] = tag(graph.create_node("get_attr", f"head_{b}", name=f"aux_{b}"), b)
        return head_attr[b]

    emit_ready()
    for action in schedule:
        b, current[0] = action.block, str(action)
        call_node = calls[b]
        head = heads[b]
        if action.kind is ActionKind.FORWARD:
            missing = [a.name for a in call_node.all_input_nodes if a not in env]
            if missing:
                raise ConfigError(
                    f"the schedule runs block {b} before its inputs ({', '.join(missing)}) exist"
                )
            args = fx.node.map_arg(call_node.args, env.__getitem__)
            kwargs = fx.node.map_arg(call_node.kwargs, env.__getitem__)
            mode = enter(b, "forward")
            if chunking is not None:
                root[f"chunk_{b}"] = chunking.programs[b]
                chunk_prog[b] = tag(graph.create_node("get_attr", f"chunk_{b}", name=f"chunk_{b}"), b)
                passes[b] = call(
                    chunks.chunk_forward, b, "chunks", chunk_prog[b], chunking.size, *args,
                    keep_last=chunking.keep >= 1.0,
                )
                env[call_node] = call(chunks.chunk_outputs, b, "block", passes[b])
            else:
                root[f"block_{b}"] = block_modules[b] if block_modules else getattr(program, call_node.target)
                env[call_node] = tag(
                    graph.create_node("call_module", f"block_{b}", args, kwargs, name=f"block_{b}"), b
                )
            leave(b, mode)
            emit_ready()
            if chunking is not None:
                continue
            features[b] = next(
                (
                    env[u]
                    for u in call_node.users
                    if u in env and u.target is operator.getitem and u.args[1] == loss_slots[b]
                ),
                None,
            ) or tag(
                graph.create_node(
                    "call_function",
                    operator.getitem,
                    (env[call_node], loss_slots[b]),
                    name="prediction" if head is None else f"feature_{b}",
                ),
                b,
            )
        elif action.kind is ActionKind.LOSS and chunking is not None:
            own_head = head_node(b) if head is not None else None
            if chunking.head(b) is not None:  # a head that mixes positions: its own chunk program
                root[f"head_chunk_{b}"] = chunking.head(b)
                own_head = tag(graph.create_node("get_attr", f"head_chunk_{b}", name=f"head_chunk_{b}"), b)
            loss = call(
                chunks.chunk_loss, b, "loss", chunk_prog[b], passes[b], own_head, target, loss_slots[b],
                autocast=autocast,
            )
            value = call(
                chunks.chunk_backward, b, "backward", chunk_prog[b], passes[b], own_head, target, loss_slots[b],
                loss, accumulate=int(accumulate), autocast=autocast, keep=float(chunking.keep),
            )
            values[b] = call(ops.check_loss, b, "checked", value)
        elif action.kind is ActionKind.LOSS:
            mode = enter(b, "loss")
            if head is None:
                loss = call(ops.local_loss, b, "loss", features[b], target)
            elif hasattr(head, "local_loss"):
                given = inputs if reads_model_inputs(head) else []
                block_inputs = tuple(env[a] for a in call_node.args if isinstance(a, fx.Node))
                loss = call(ops.head_loss, b, "loss", head_node(b), features[b], target, given, block_inputs)
            else:
                root[f"head_{b}"] = head
                pred = tag(graph.create_node("call_module", f"head_{b}", (features[b],), name=f"head_{b}"), b)
                loss = call(ops.local_loss, b, "loss", pred, target)
            leave(b, mode)
            value = call(ops.backward, b, "backward", loss, **acc)
            values[b] = call(ops.check_loss, b, "checked", value)
        else:
            if clip_grad_norm is not None:
                values[b] = call(ops.clip_gradients, b, "clipped", values[b], float(clip_grad_norm), **acc)
            values[b] = call(ops.optimizer_step, b, "stepped", values[b], **acc)
            if scheduler:
                values[b] = call(ops.scheduler_step, b, "scheduled", values[b], **acc)
            if head is not None and hasattr(head, "after_update"):
                values[b] = call(ops.after_update, b, "updated", head_node(b), values[b], **acc)
            values[b] = call(ops.release_gradients, b, "released", values[b], **acc)
    for b, head in enumerate(heads):
        if head is not None:
            root[f"head_{b}"] = head
    current[0] = None
    graph.output(tuple(values[b] for b in range(blocks)))
    graph.lint()
    return fx.GraphModule(root, graph, class_name="TrainStep")


def _feeding_blocks(calls: list[fx.Node]) -> set[fx.Node]:
    """Program nodes that some block call reads, directly or through getitem and cuts."""
    needed: set[fx.Node] = set()
    stack = [a for c in calls for a in c.all_input_nodes]
    while stack:
        n = stack.pop()
        if n in needed:
            continue
        needed.add(n)
        if n.op != "call_module":
            stack.extend(n.all_input_nodes)
    return needed


def schedule_of(step: fx.GraphModule) -> Schedule:
    """The actions of a step graph, in the order its nodes run them."""
    seen: dict[str, None] = {}
    for node in step.graph.nodes:
        action = node.meta.get("localize", {}).get("action")
        if action is not None:
            seen.setdefault(action, None)
    return Schedule(tuple(Action(int(a[1 : a.index(":")]), ActionKind(a[-1])) for a in seen))


def _check_schedule(schedule: Schedule, blocks: int) -> None:
    order: dict[int, list[ActionKind]] = {}
    for action in schedule:
        if not 0 <= action.block < blocks:
            raise ConfigError(
                f"schedule action {action} names block {action.block}; there are {blocks} blocks"
            )
        order.setdefault(action.block, []).append(action.kind)
    want = [ActionKind.FORWARD, ActionKind.LOSS, ActionKind.UPDATE]
    for b in range(blocks):
        if order.get(b) != want:
            got = " ".join(f"B{b}:{k.value}" for k in order.get(b, [])) or "nothing"
            raise ConfigError(f"the schedule must run block {b} as B{b}:F B{b}:L B{b}:U once each, got {got}")
