"""``LocalModel``: the transformed model, an ``nn.Module`` that trains with local learning."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from localize.compiler.plan import BlockPlan, Plan
from localize.compiler.tracer import lmeta
from localize.errors import ConfigError, InputError, LocalizeError, TargetError
from localize.passes.cost import params_of
from localize.passes.find_cut_points import compute_nodes
from localize.runtime import checkpoint
from localize.runtime.loss import LossFn
from localize.runtime.schedule import ActionKind, Schedule, sequential_schedule

__all__ = ["Block", "LocalModel", "LossContext", "NonFiniteLossError"]

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


class NonFiniteLossError(LocalizeError):
    """A local loss became NaN or infinite (``on_nan="raise"``)."""


@dataclass
class LossContext:
    """What a head with its own ``local_loss`` may read besides its feature and the target."""

    block: int
    inputs: list[Any]  # the model's inputs of this step, in placeholder order
    block_inputs: tuple  # the block's own (detached) inputs
    loss_fn: LossFn  # the transform's loss (e.g. to score a classifier branch)


@dataclass
class Block:
    """One gradient-isolated block: its graph, its head, its parameters and optimizer."""

    index: int
    module: fx.GraphModule  # computes the block (a submodule of the program)
    aux: nn.Module | None  # auxiliary head; None for the last block (it uses the model output)
    plan: BlockPlan
    params: list[nn.Parameter]  # model parameters this block owns and updates
    optimizer: torch.optim.Optimizer | None = None

    @property
    def trainable(self) -> list[nn.Parameter]:
        aux = list(self.aux.parameters()) if self.aux is not None else []
        return [p for p in self.params + aux if p.requires_grad]


class LocalModel(nn.Module):
    """A model split into K gradient-isolated blocks, each trained by its own local loss.

    **Parameters are shared with the original model, not copied**: ``train_step`` updates the
    model you passed to :func:`localize.transform` in place, and ``state_dict()`` holds the
    model's entries under ``model.`` plus the auxiliary heads under ``aux.<block>.``.
    ``lm(*inputs)`` computes exactly what ``model(*inputs)`` computes.

    Example:
        >>> import torch, localize
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32),
        ...                           torch.nn.ReLU(), torch.nn.Linear(32, 3))
        >>> lm = localize.transform(net, blocks=2, example_inputs=(torch.randn(4, 8),))
        >>> len(lm.blocks), lm.blocks[0].aux is not None, lm.blocks[1].aux is None
        (2, True, True)
        >>> losses = lm.train_step(torch.randn(5, 8), torch.randint(0, 3, (5,)))
        >>> len(losses)
        2
    """

    def __init__(
        self,
        model: nn.Module,
        plan: Plan,
        heads: list[nn.Module | None],
        *,
        optimizer: OptimizerFactory,
        loss_fn: LossFn,
        on_nan: str = "raise",
        flags: list[nn.Module] | None = None,
        complete: Callable[[LocalModel, list[Any]], None] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.aux = nn.ModuleDict()
        self.plan = plan
        self.loss_fn = loss_fn
        self.on_nan = on_nan
        self.schedule: Schedule = sequential_schedule(plan.num_blocks)
        self.step_count = 0
        self._optimizer_factory = optimizer
        self._complete = complete
        # unregistered: they reference the model's own modules and tensors
        self.__dict__["_program"] = plan.program
        self.__dict__["_flags"] = list(flags or [])
        owned = _owned_params(plan)
        self.blocks: list[Block] = []
        for bp in plan.blocks:
            sub = getattr(plan.program, f"submod_{bp.index}")
            self.blocks.append(Block(bp.index, sub, None, bp, owned.get(bp.index, [])))
        self._set_heads(heads)
        self._ties = _attribute_ties(self.blocks, model)
        self._prepare_runtime()

    # ------------------------------------------------------------------ structure

    def _set_heads(self, heads: list[nn.Module | None]) -> None:
        for block, head in zip(self.blocks, heads):
            block.aux = head
            if head is not None:
                self.aux[str(block.index)] = head

    @property
    def program(self) -> fx.GraphModule:
        """The top-level GraphModule: block calls, gradient cuts (``detach``) and outputs."""
        return self._program

    @property
    def ready(self) -> bool:
        """False until shapes are known (example inputs given, or the first call has run)."""
        return self.plan.annotated

    def _prepare_runtime(self) -> None:
        nodes = list(self._program.graph.nodes)
        self._nodes = nodes
        index = {n: i for i, n in enumerate(nodes)}
        self._block_node = {lmeta(n)["block"]: i for i, n in enumerate(nodes) if n.op == "call_module"}
        last_use: dict[fx.Node, int] = {}
        for i, n in enumerate(nodes):
            for a in n.all_input_nodes:
                last_use[a] = i
        self._frees: list[list[fx.Node]] = [[] for _ in nodes]
        for n, i in last_use.items():
            self._frees[i].append(n)
        out = nodes[-1]
        leaf = out.args[0][self.plan.output_index]
        if not isinstance(leaf, fx.Node):
            raise ConfigError("the selected output is a constant, not computed by the model; choose another output=")
        producer = leaf.args[0] if leaf.op == "call_function" and leaf.target is operator.getitem else None
        last = self.plan.num_blocks - 1
        if producer is None or lmeta(producer).get("block") != last:
            raise ConfigError(
                "the selected output is not computed by the last block, so the last block would have no loss; "
                "choose the model's final output with output="
            )
        self._output_slot = leaf.args[1]
        self._primary_slot: dict[int, int] = {}
        for block in self.blocks[:-1]:
            if block.plan.primary is not None:
                self._primary_slot[block.index] = block.plan.outputs.index(block.plan.primary)
        del index

    def _ensure_ready(self, flat: list[Any]) -> None:
        if not self.plan.annotated:
            if self._complete is None:
                raise LocalizeError("this LocalModel has no shapes and no way to infer them")
            self._complete(self, flat)

    def _ensure_optimizers(self) -> None:
        for block in self.blocks:
            if block.optimizer is None and block.trainable:
                block.optimizer = _make_optimizer(self._optimizer_factory, block)

    def save(self, path: str, *, data: dict[str, Any] | None = None) -> None:
        """Checkpoint model, heads, optimizer and RNG states, the step and ``data`` (e.g. the
        epoch and batch reached) atomically to ``path``; restore with ``localize.load(path, into=lm)``."""
        checkpoint.save(self, path, data=data)

    # ------------------------------------------------------------------ nn.Module behaviour

    def train(self, mode: bool = True) -> LocalModel:
        super().train(mode)
        self._program.train(mode)
        for flag in self._flags:
            flag.train(mode)
        return self

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        super()._apply(fn, recurse)
        for block in self.blocks:
            block.module._apply(fn, recurse)
        self._retie()
        return self

    def _retie(self) -> None:
        """Point block graphs back at the model's tensors (``.to()`` replaces buffers)."""
        for sub, target, path in self._ties:
            owner, _, name = target.rpartition(".")
            holder = sub.get_submodule(owner) if owner else sub
            value = _get_path(self.model, path)
            if isinstance(value, nn.Parameter) and name in holder._parameters:
                holder._parameters[name] = value
            elif name in holder._buffers:
                holder._buffers[name] = value
            else:
                setattr(holder, name, value)

    # ------------------------------------------------------------------ running

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        flat = self.plan.traced.bind(args, kwargs)
        self._check_devices(flat)
        self._ensure_ready(flat)
        with _explain_failure(self, flat, "the model"):
            outs = self._program(*flat)
        return self.plan.traced.unflatten(list(outs))

    def _check_devices(self, flat: list[Any]) -> None:
        param = next(self.model.parameters(), None)
        if param is None:
            return
        for i, value in enumerate(flat):
            # 0-dim CPU tensors mix with any device in torch, so only batched inputs must match
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.device != param.device:
                raise InputError(
                    f"input {self.plan.traced.input_names[i]!r} is on {value.device} but the model is on "
                    f"{param.device}; move the inputs (or the model, with lm.to(...)) to one device"
                )

    def _flat_inputs(self, inputs: Any) -> list[Any]:
        if isinstance(inputs, dict):
            return self.plan.traced.bind((), inputs)
        if isinstance(inputs, torch.Tensor):
            return self.plan.traced.bind((inputs,), {})
        if isinstance(inputs, (tuple, list)):
            return self.plan.traced.bind(tuple(inputs), {})
        raise ConfigError(
            f"inputs must be a tensor, a tuple of tensors or a dict of keyword tensors, got {type(inputs).__name__}"
        )

    def train_step(self, inputs: Any, target: torch.Tensor, schedule: Schedule | None = None) -> list[float]:
        """One local-learning step over all blocks; returns the K local losses.

        Each block runs forward from detached inputs, computes its loss (its aux head, or the
        model's output for the last block), backpropagates inside itself, steps its optimizer and
        frees its graph before the next block runs. ``inputs`` is a tensor, a tuple of tensors or
        a dict of keyword tensors.
        """
        flat = self._flat_inputs(inputs)
        self._check_devices(flat)
        self._ensure_ready(flat)
        self._ensure_optimizers()
        losses: list[float] = [math.nan] * len(self.blocks)
        runner = _Run(self, flat)
        for action in schedule or self.schedule:
            block = self.blocks[action.block]
            if action.kind is ActionKind.FORWARD:
                runner.forward(block)
            elif action.kind is ActionKind.LOSS:
                losses[block.index] = runner.loss(block, target)
            else:
                runner.update(block)
        self.step_count += 1
        return losses

    def local_loss(
        self, block: int, outputs: tuple, target: torch.Tensor, context: LossContext | None = None
    ) -> torch.Tensor:
        """Block ``block``'s loss on its forward outputs (aux head, or the model output if last).

        A head that defines ``local_loss(feature, target, context)`` computes its own loss (e.g.
        reconstruction plus classification); any other head's output goes to ``loss_fn``.
        """
        b = self.blocks[block]
        if b.aux is None:
            if block != len(self.blocks) - 1:
                raise LocalizeError(f"block {block} has no activation to train an aux head on")
            pred = outputs[self._output_slot]
        elif hasattr(b.aux, "local_loss"):
            feature = outputs[self._primary_slot[block]]
            ctx = context or LossContext(block, [], (), self.loss_fn)
            return b.aux.local_loss(feature, target, ctx)
        else:
            pred = b.aux(outputs[self._primary_slot[block]])
        try:
            return self.loss_fn(pred, target)
        except LocalizeError:
            raise
        except Exception as e:  # noqa: BLE001 - a user loss failing on shapes is a target problem
            raise TargetError(
                f"loss_fn failed on prediction {tuple(pred.shape)} and target {tuple(target.shape)} "
                f"(block {block}): {e}"
            ) from e


class _Run:
    """State of one train step: program values computed so far, freed after their last use."""

    def __init__(self, lm: LocalModel, flat: list[Any]) -> None:
        self.lm = lm
        self.env: dict[fx.Node, Any] = {}
        self.next = 0
        self.flat = flat
        self.inputs = iter(flat)
        self.block_inputs: dict[int, tuple] = {}
        self.outputs: dict[int, tuple] = {}
        self.losses: dict[int, torch.Tensor] = {}

    def _advance(self, stop: int) -> None:
        lm, env = self.lm, self.env
        while self.next <= stop:
            i, node = self.next, lm._nodes[self.next]
            if node.op == "placeholder":
                env[node] = next(self.inputs)
            elif node.op == "call_module":
                raise LocalizeError(f"schedule runs block {lmeta(node)['block']} before its inputs exist")
            elif node.op == "output":
                pass
            else:
                args = fx.node.map_arg(node.args, env.__getitem__)
                if node.op == "call_method":
                    env[node] = getattr(args[0], node.target)(*args[1:])
                else:
                    env[node] = node.target(*args)
            for dead in lm._frees[i]:
                env.pop(dead, None)
            self.next += 1

    def forward(self, block: Block) -> None:
        pos = self.lm._block_node[block.index]
        self._advance(pos - 1)
        node = self.lm._nodes[pos]
        args = fx.node.map_arg(node.args, self.env.__getitem__)
        self.block_inputs[block.index] = tuple(args)
        with torch.enable_grad(), _explain_failure(self.lm, self.flat, f"block {block.index}"):
            outs = block.module(*args)
        self.outputs[block.index] = outs
        self.env[node] = outs
        for dead in self.lm._frees[pos]:
            self.env.pop(dead, None)
        self.next = pos + 1

    def loss(self, block: Block, target: torch.Tensor) -> float:
        lm = self.lm
        with torch.enable_grad():
            ctx = LossContext(block.index, self.flat, self.block_inputs.get(block.index, ()), lm.loss_fn)
            loss = lm.local_loss(block.index, self.outputs[block.index], target, ctx)
            value = float(loss.detach())
            if not math.isfinite(value):
                if lm.on_nan == "raise":
                    raise NonFiniteLossError(
                        f"block {block.index} loss is {value} at step {lm.step_count}; lower the learning rate, "
                        f"check the inputs, or pass on_nan='skip' to skip such updates"
                    )
                self.losses[block.index] = None  # type: ignore[assignment]
                return value
            if block.optimizer is not None:
                block.optimizer.zero_grad(set_to_none=True)
            if loss.requires_grad:
                loss.backward()
        self.losses[block.index] = loss
        return value

    def update(self, block: Block) -> None:
        if self.losses.get(block.index) is not None and block.optimizer is not None:
            block.optimizer.step()
            if block.aux is not None and hasattr(block.aux, "after_update"):
                block.aux.after_update()  # e.g. an EMA copy following the next block's layer
        outs = self.outputs.pop(block.index, None)
        if outs is not None:
            node = self.lm._nodes[self.lm._block_node[block.index]]
            detached = tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in outs)
            if node in self.env:
                self.env[node] = detached  # frees the block's autograd graph
        self.losses.pop(block.index, None)
        self.block_inputs.pop(block.index, None)


@contextmanager
def _explain_failure(lm: LocalModel, flat: list[Any], where: str):
    """A torch error while running the graph almost always means inputs unlike the traced ones."""
    try:
        yield
    except (LocalizeError, torch.OutOfMemoryError):
        raise  # already explained, or not about the inputs
    except (RuntimeError, TypeError, IndexError, ValueError) as e:
        given = ", ".join(_describe(v) for v in flat)
        raise InputError(
            f"{where} failed on inputs ({given}): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
            f"It was traced with ({_traced_inputs(lm)}); pass inputs of the same kind (only the batch size may "
            f"differ). If the original model accepts these inputs, this is a localize bug: please report it"
        ) from e


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    return type(value).__name__


def _traced_inputs(lm: LocalModel) -> str:
    parts = []
    for node in lm.plan.gm.graph.nodes:
        if node.op != "placeholder":
            continue
        info = lmeta(node).get("value")  # set by annotate_tensors
        if info is not None and info.is_tensor:
            parts.append(f"{node.name}: {info.shape} {str(info.dtype).removeprefix('torch.')}")
        else:
            parts.append(node.name)
    return ", ".join(parts)


def _make_optimizer(factory: Any, block: Block) -> torch.optim.Optimizer:
    try:
        optimizer = factory(block.trainable)
    except LocalizeError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's factory; report it as theirs
        raise ConfigError(f"the optimizer factory failed for block {block.index}: {type(e).__name__}: {e}") from e
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(
            f"the optimizer factory must return a torch.optim.Optimizer, got {type(optimizer).__name__}; "
            f"e.g. optimizer=lambda params: torch.optim.SGD(params, lr=0.05)"
        )
    return optimizer


def _owned_params(plan: Plan) -> dict[int, list[nn.Parameter]]:
    """Each trainable parameter belongs to the block that reads it without a detach."""
    owned: dict[int, list[nn.Parameter]] = {}
    seen: set[int] = set()
    for node in compute_nodes(plan.gm):
        if lmeta(node).get("tied"):
            continue
        block = lmeta(node).get("block", 0)
        for p in params_of(plan.gm, node):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            owned.setdefault(block, []).append(p)
    return owned


def _attribute_ties(blocks: list[Block], model: nn.Module) -> list[tuple[fx.GraphModule, str, str]]:
    """(block graph, attribute, model path) for every model tensor a block reads via get_attr."""
    paths: dict[int, str] = {}
    for name, t in model.named_parameters(remove_duplicate=False):
        paths.setdefault(id(t), name)
    for name, t in model.named_buffers(remove_duplicate=False):
        paths.setdefault(id(t), name)
    ties = []
    for block in blocks:
        for node in block.module.graph.nodes:
            if node.op == "get_attr":
                value = _get_path(block.module, node.target)
                if id(value) in paths:
                    ties.append((block.module, node.target, paths[id(value)]))
    return ties


def _get_path(root: nn.Module, path: str) -> Any:
    return operator.attrgetter(path)(root)  # "layer1.0.conv1.weight"
