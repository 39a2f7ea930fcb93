"""``LocalModel``: the transformed model, an ``nn.Module`` that trains with local learning."""

from __future__ import annotations

import operator
import os
import types
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from localize.compiler.plan import BlockPlan, Plan
from localize.compiler.tracer import lmeta
from localize.errors import ConfigError, InputError, LocalizeError
from localize.passes.build_step_graph import build_step_graph, schedule_of
from localize.passes.cost import params_of
from localize.passes.find_cut_points import compute_nodes
from localize.runtime import checkpoint
from localize.runtime.chunks import Chunking
from localize.runtime.loss import LossFn
from localize.runtime.ops import (
    LossContext,
    NonFiniteLossError,
    StepState,
    head_loss,
    local_loss,
    make_scalers,
    make_schedulers,
    run_step,
)
from localize.runtime.schedule import Schedule

__all__ = ["Block", "LocalModel", "LossContext", "NonFiniteLossError"]  # the last two from runtime.ops

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


@dataclass
class Block:
    """One gradient-isolated block: its graph, its head, its parameters and optimizer."""

    index: int
    module: fx.GraphModule  # computes the block (a submodule of the program)
    aux: nn.Module | None  # auxiliary head; None for the last block (it uses the model output)
    plan: BlockPlan
    params: list[nn.Parameter]  # model parameters this block owns and updates
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None  # with transform(scheduler=...)
    scaler: torch.amp.GradScaler | None = None  # with transform(autocast="fp16")

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
        clip_grad_norm: float | None = None,
        accumulate: int = 1,
        autocast: str | None = None,
        scheduler: SchedulerFactory | None = None,
        chunking: Chunking | None = None,
        recompute: list[fx.GraphModule] | None = None,
        flags: list[nn.Module] | None = None,
        complete: Callable[[LocalModel, list[Any]], None] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.aux = nn.ModuleDict()
        self.plan = plan
        self.loss_fn = loss_fn
        self.on_nan = on_nan
        self.clip_grad_norm = clip_grad_norm
        self.accumulate = accumulate
        self.autocast = autocast
        self.chunking = chunking
        self.__dict__["_recompute"] = list(recompute or [])  # unregistered: they hold the blocks' layers
        self.step_count = 0
        self._optimizer_factory = optimizer
        self._scheduler_factory = scheduler
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
        graphs = [b.module for b in self.blocks] + self.chunk_programs + self._recompute + self.head_chunk_programs
        self._ties = _attribute_ties([g for g in graphs if g is not None], self)
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
        """Check the loss has something to read, then build the step graph (heads are known now)."""
        out = list(self._program.graph.nodes)[-1]
        leaf = out.args[0][self.plan.output_index]
        if not isinstance(leaf, fx.Node):
            raise ConfigError(
                "the selected output is a constant, not computed by the model; choose another output="
            )
        producer = leaf.args[0] if leaf.op == "call_function" and leaf.target is operator.getitem else None
        last = self.plan.num_blocks - 1
        if producer is None or lmeta(producer).get("block") != last:
            raise ConfigError(
                "the selected output is not computed by the last block, so the last block would have no loss; "
                "choose the model's final output with output="
            )
        self._loss_slots = [
            b.plan.outputs.index(b.plan.primary)
            if b.plan.primary is not None and b.aux is not None
            else leaf.args[1]
            for b in self.blocks
        ]
        self._steps: dict[str, fx.GraphModule] = {}  # schedule text -> step graph (a dict: not submodules)
        step = self._step_for(None)
        self.plan.graphs["build_step_graph"] = step.code  # every stage inspectable, the step too
        if os.environ.get("LOCALIZE_DEBUG"):
            print(f"# ---- after build_step_graph ----\n{step.code}")
        self.schedule: Schedule = schedule_of(step)
        self._state = StepState(self.loss_fn, [], self.on_nan)

    def _step_for(self, schedule: Schedule | None) -> fx.GraphModule:
        key = str(schedule) if schedule is not None else ""
        if key not in self._steps:
            heads = [b.aux for b in self.blocks]
            self._steps[key] = build_step_graph(
                self._program,
                heads,
                self._loss_slots,
                schedule,
                clip_grad_norm=self.clip_grad_norm,
                accumulate=self.accumulate,
                autocast=self.autocast,
                scheduler=self._scheduler_factory is not None,
                chunking=self.chunking,
                block_modules=self._recompute or None,
            )
        return self._steps[key]

    @property
    def chunk_programs(self) -> list[fx.GraphModule]:
        """With ``chunk_size=``: each block's chunk program (the block on one chunk of the sequence,
        with the states it carries; :mod:`localize.passes.chunk_sequence`), else empty."""
        return list(self.chunking.programs) if self.chunking is not None else []

    @property
    def head_chunk_programs(self) -> list[fx.GraphModule | None]:
        """With ``chunk_size=``: per block, its head's chunk program where the head mixes positions
        (it carries its layers' keys and values from chunk to chunk), else None."""
        return [self.chunking.head(b) for b in range(len(self.blocks))] if self.chunking is not None else []

    @property
    def recompute_programs(self) -> list[fx.GraphModule]:
        """With ``recompute=True``: each block split into runs, its units recomputed in backward
        (:mod:`localize.passes.recompute_units`); what the step calls. Else empty."""
        return list(self._recompute)

    @property
    def step_program(self) -> fx.GraphModule:
        """The training step as a GraphModule: ``print(lm.step_program.code)`` shows what
        ``train_step`` runs (``program.py`` holds the same code)."""
        return self._step_for(None)

    def _ensure_ready(self, flat: list[Any]) -> None:
        if not self.plan.annotated:
            if self._complete is None:
                raise LocalizeError("this LocalModel has no shapes and no way to infer them")
            self._complete(self, flat)

    def _ensure_optimizers(self, blocks: list[Block] | None = None) -> None:
        """Each block's optimizer, then its scheduler and ``GradScaler`` (those asked for)."""
        for block in blocks if blocks is not None else self.blocks:
            if block.optimizer is None and block.trainable:
                block.optimizer = _make_optimizer(self._optimizer_factory, block)
                (block.scheduler,) = make_schedulers([block.optimizer], self._scheduler_factory, block.index)
                (block.scaler,) = make_scalers([block.optimizer], self.autocast)

    def _ready_blocks(self, what: str) -> list[Block]:
        if not self.plan.annotated:
            raise LocalizeError(
                f"lm.{what} are made once shapes are known: pass example_inputs to transform, or run one "
                f"train_step first"
            )
        self._ensure_optimizers()
        return self.blocks

    @property
    def optimizers(self) -> list[torch.optim.Optimizer | None]:
        """One optimizer per block (None for a block with nothing to train), e.g. for a trainer."""
        return [b.optimizer for b in self._ready_blocks("optimizers")]

    @property
    def schedulers(self) -> list[torch.optim.lr_scheduler.LRScheduler | None]:
        """One learning-rate scheduler per block (all None without ``transform(scheduler=...)``)."""
        return [b.scheduler for b in self._ready_blocks("schedulers")]

    @property
    def scalers(self) -> list[torch.amp.GradScaler | None]:
        """One ``GradScaler`` per block with ``autocast="fp16"`` (else all None)."""
        return [b.scaler for b in self._ready_blocks("scalers")]

    @property
    def pending(self) -> int:
        """Calls of ``train_step`` since the last update (``0 <= pending < accumulate``)."""
        return self._state.pending

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
        for head in self.head_chunk_programs:
            if head is not None:
                head.train(mode)  # its layers are the head's; its dropout flags are its own
        return self

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        super()._apply(fn, recurse)
        for block in self.blocks:
            block.module._apply(fn, recurse)
        for other in self.chunk_programs + self.recompute_programs + self.head_chunk_programs:
            if other is not None:
                other._apply(fn, recurse)
        self._retie()
        return self

    def _retie(self) -> None:
        """Point block, chunk and head graphs back at the model's and heads' tensors (``.to()`` replaces
        buffers, and a head following its layers updates its own)."""
        for sub, target, path in self._ties:
            owner, _, name = target.rpartition(".")
            holder = sub.get_submodule(owner) if owner else sub
            value = _get_path(self, path)
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
        with _explain_failure(self, flat):
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

    def train_step(
        self,
        inputs: Any,
        target: torch.Tensor,
        schedule: Schedule | None = None,
        *,
        optimizers: list[Any] | None = None,
        update: bool | None = None,
    ) -> list[float]:
        """One local-learning step over all blocks; returns the K local losses.

        Runs the generated step (:attr:`step_program`): each block runs forward from detached
        inputs, computes its loss (its aux head, or the model's output for the last block),
        backpropagates inside itself, steps its optimizer and frees its graph and its gradients
        (``zero_grad(set_to_none=True)``: read ``.grad`` with ``update=False``) before the next
        block runs. ``inputs`` is a tensor, a tuple of tensors or a dict of keyword tensors.
        With ``accumulate=N`` the blocks update on every N-th call (:attr:`pending` counts the calls
        in between); ``update=True``/``False`` overrides that for this call (for a trainer that decides
        its own accumulation boundaries). ``optimizers`` stands in for :attr:`optimizers` in this call,
        in the same order: e.g. a trainer's wrappers around them, so that the trainer counts the steps.
        """
        flat = self._flat_inputs(inputs)
        self._check_devices(flat)
        self._ensure_ready(flat)
        self._ensure_optimizers()
        step = self._step_for(schedule if schedule is not None and schedule != self.schedule else None)
        state = self._state
        state.loss_fn, state.on_nan, state.step = self.loss_fn, self.on_nan, self.step_count
        state.optimizers = [b.optimizer for b in self.blocks] if optimizers is None else list(optimizers)
        if len(state.optimizers) != len(self.blocks):
            raise ConfigError(f"optimizers= has {len(state.optimizers)} entries; this model has {len(self.blocks)} blocks")
        state.schedulers = [b.scheduler for b in self.blocks]
        state.scalers = [b.scaler for b in self.blocks]
        state.update = update
        with _explain_failure(self, flat, blocks=self.blocks):
            losses = run_step(step, state, flat, target)
        self.step_count += 1
        return losses

    def local_loss(
        self, block: int, outputs: tuple, target: torch.Tensor, context: LossContext | None = None
    ) -> torch.Tensor:
        """Block ``block``'s loss on its forward outputs (aux head, or the model output if last),
        computed by the same runtime ops the step graph calls.

        A head that defines ``local_loss(feature, target, context)`` computes its own loss (e.g.
        reconstruction plus classification); any other head's output goes to ``loss_fn``.
        """
        b = self.blocks[block]
        feature = outputs[self._loss_slots[block]]
        state = StepState(self.loss_fn, [b.optimizer for b in self.blocks], self.on_nan, self.step_count)
        if b.aux is None:
            if block != len(self.blocks) - 1:
                raise LocalizeError(f"block {block} has no activation to train an aux head on")
            return local_loss(state, block, feature, target)
        if hasattr(b.aux, "local_loss"):
            ctx = context or LossContext(block, [], (), self.loss_fn)
            return head_loss(state, block, b.aux, feature, target, ctx.inputs, ctx.block_inputs)
        return local_loss(state, block, b.aux(feature), target)


@contextmanager
def _explain_failure(
    lm: LocalModel, flat: list[Any], where: str = "the model", blocks: list[Block] | None = None
):
    """A torch error while running the model's graph almost always means inputs unlike the traced
    ones. With ``blocks`` (the training step), only a failure inside a block's code is about the
    inputs; the traceback says which block it was."""
    try:
        yield
    except (LocalizeError, torch.OutOfMemoryError):
        raise  # already explained, or not about the inputs
    except (RuntimeError, TypeError, IndexError, ValueError) as e:
        if blocks is not None:
            failed = _failed_block(e, blocks)
            if failed is None:
                raise
            where = f"block {failed}"
        given = ", ".join(_describe(v) for v in flat)
        raise InputError(
            f"{where} failed on inputs ({given}): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
            f"It was traced with ({_traced_inputs(lm)}); pass inputs of the same kind (only the batch size may "
            f"differ). If the original model accepts these inputs, this is a localize bug: please report it"
        ) from e


def _failed_block(error: BaseException, blocks: list[Block]) -> int | None:
    """The block whose generated forward is on ``error``'s traceback (the innermost), if any."""
    codes = {type(b.module).forward.__code__: b.index for b in blocks}
    found = None
    tb: types.TracebackType | None = error.__traceback__
    while tb is not None:
        found = codes.get(tb.tb_frame.f_code, found)
        tb = tb.tb_next
    return found


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
        raise ConfigError(
            f"the optimizer factory failed for block {block.index}: {type(e).__name__}: {e}"
        ) from e
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


def _attribute_ties(graphs: list[fx.GraphModule], root: nn.Module) -> list[tuple[fx.GraphModule, str, str]]:
    """(graph, attribute, path in ``root``) for every tensor of the model or a head that a graph reads
    via get_attr."""
    paths: dict[int, str] = {}
    for name, t in [*root.named_parameters(remove_duplicate=False), *root.named_buffers(remove_duplicate=False)]:
        paths.setdefault(id(t), name)
    ties = []
    for graph in graphs:
        for node in graph.graph.nodes:
            if node.op == "get_attr":
                value = _get_path(graph, node.target)
                if id(value) in paths:
                    ties.append((graph, node.target, paths[id(value)]))
    return ties


def _get_path(root: nn.Module, path: str) -> Any:
    return operator.attrgetter(path)(root)  # "layer1.0.conv1.weight"
