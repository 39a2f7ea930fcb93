"""The driver: trace → passes → LocalModel. Reads top to bottom; one line per pass."""

from __future__ import annotations

import copy
import os
import time
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from localize import aux as aux_registry
from localize.compiler.outputs import Selector, select_output
from localize.compiler.plan import BlockPlan, Plan
from localize.compiler.tracer import lmeta, trace
from localize.errors import ConfigError, LocalizeError, PlanError, VerificationError
from localize.passes.annotate_tensors import annotate_tensors, value_info
from localize.passes.assign_blocks import assign_blocks
from localize.passes.balance_blocks import METRICS, balance_blocks
from localize.passes.bind_training_mode import bind_training_mode
from localize.passes.chunk_sequence import check_chunk_programs, chunk_block, chunk_head
from localize.passes.cost import Cost, annotate_costs, node_cost
from localize.passes.find_cut_points import compute_nodes, find_cut_points
from localize.passes.find_sequence_ops import find_sequence_ops
from localize.passes.find_units import find_units
from localize.passes.infer_layout import infer_layout
from localize.passes.insert_aux_heads import insert_aux_heads
from localize.passes.insert_gradient_cuts import insert_gradient_cuts, source_of
from localize.passes.recompute_units import choose_runs, recompute_units, split_at
from localize.passes.resolve_named_cuts import resolve_named_cuts
from localize.passes.verify_isolation import verify_isolation
from localize.runtime.chunks import Chunking
from localize.runtime.loss import LossFn, cross_entropy_last_dim
from localize.runtime.model import LocalModel, OptimizerFactory, SchedulerFactory
from localize.runtime.ops import AUTOCAST_DTYPES

__all__ = ["DEFAULT_BALANCE", "transform"]

# One process: memory is why people train locally, and the blocks run one after another, so the
# largest block's activations set the peak. The distributed launcher balances FLOPs instead.
DEFAULT_BALANCE = "memory"


def transform(
    model: nn.Module,
    blocks: int | None = None,
    example_inputs: tuple | Any = None,
    *,
    example_kwargs: dict[str, Any] | None = None,
    aux: str = "dgl",
    aux_options: dict[str, Any] | None = None,
    optimizer: OptimizerFactory | str = "adamw",
    lr: float | None = None,
    loss_fn: LossFn | None = None,
    output: Selector = None,
    balance: str | None = None,
    cuts: list[str] | None = None,
    max_frontier: int = 1,
    on_nan: str = "raise",
    clip_grad_norm: float | None = None,
    accumulate: int = 1,
    autocast: str | None = None,
    scheduler: SchedulerFactory | None = None,
    chunk_size: int | None = None,
    chunk_keep: float = 1.0,
    seq_dim: int | None = None,
    recompute: bool = False,
) -> LocalModel:
    """Turn ``model`` into a :class:`LocalModel` of ``blocks`` gradient-isolated blocks.

    Args:
        model: any ``nn.Module`` that ``torch.fx.symbolic_trace`` or ``torch.export`` captures.
            Its parameters are shared with the result, not copied.
        blocks: number of blocks K (``1`` is plain backprop); default 4, or ``len(cuts) + 1``.
        example_inputs: positional example tensors (a tuple, or one tensor). Optional for models
            fx can trace: then cuts are balanced by parameter count and heads are built at the
            first call. Their batch size does not fix the training batch size.
        example_kwargs: keyword example inputs.
        aux: auxiliary-head strategy (``localize.aux.available()``), e.g. ``"dgl"``, ``"linear"``.
        aux_options: options of that strategy.
        optimizer: a factory ``params -> torch.optim.Optimizer`` called once per block, or
            ``"sgd"``/``"adamw"`` (``localize.runtime.optim``) with ``lr``.
        loss_fn: ``(prediction, target) -> loss``; default cross-entropy over the last dim.
        output: which output the loss reads for dict/tuple/dataclass outputs (a key, an index, or
            a callable); default ``"logits"`` or the only tensor.
        balance: cost that blocks balance: ``"memory"`` (the default: the activations a block saves
            and receives, so the largest block's training peak is smallest), ``"peak"`` (memory plus
            the gradients a block trains, at the example inputs' batch: give them the training
            batch), ``"flops"`` (time: the distributed runtime's default, where the slowest stage
            sets the pace) or ``"params"``.
        cuts: module names that each start a new block (instead of automatic balancing).
        max_frontier: how many activations may cross a cut (1 keeps skip connections whole).
        on_nan: ``"raise"`` or ``"skip"`` when a local loss is not finite.
        clip_grad_norm: clip each block's gradient norm (its parameters and its head's) to this
            value before the block's update; default no clipping.
        accumulate: N: every ``train_step`` adds each block's local gradient (of the loss / N), and
            the blocks update on every N-th call; default 1 (every call).
        autocast: ``"bf16"`` or ``"fp16"``: blocks, heads and losses run under ``torch.autocast``
            while weights and optimizer state stay in their dtype (fp32); fp16 adds one
            ``torch.amp.GradScaler`` per block. Default None (no autocast).
        scheduler: a factory ``optimizer -> torch.optim.lr_scheduler.LRScheduler``, called once per
            block and stepped after each of the block's updates; e.g.
            ``localize.runtime.schedulers.lr_schedule("cosine", total=1000, warmup=50)``.
        chunk_size: C: also cut the sequence into chunks of C positions; each block trains chunk by
            chunk (SeCO: forward all chunks without a graph, backward them in reverse, the gradient
            exactly the full sequence's), so only one chunk's activations are alive. Needs example
            inputs and a causal model (:mod:`localize.passes.find_sequence_ops`). Default None.
        chunk_keep: p <= 1: with ``chunk_size``, each chunk backpropagates with probability p and
            compensation 1/p (SpaCO: the expected gradient is exact). Default 1.0 (every chunk).
        seq_dim: the inputs' sequence dimension for ``chunk_size``; default 1 (batch first).
        recompute: recompute each unit of a block (a residual block, a transformer layer) during the
            block's backward (``torch.utils.checkpoint``), so a block holds its unit boundaries plus
            one unit's activations; same gradients. Default False.

    Example:
        >>> import torch, localize
        >>> net = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU())
        ...                             for _ in range(4)], torch.nn.Linear(16, 4))
        >>> lm = localize.transform(net, blocks=2, example_inputs=(torch.randn(8, 16),))
        >>> x = torch.randn(3, 16)
        >>> torch.allclose(lm(x), net(x))
        True
        >>> [len(b.plan.nodes) for b in lm.blocks]
        [5, 4]
    """
    if blocks is None:
        blocks = 4 if cuts is None else len(cuts) + 1
    balance = DEFAULT_BALANCE if balance is None else balance
    _check_args(model, blocks, aux, balance, max_frontier, on_nan, cuts)
    if clip_grad_norm is not None and (
        isinstance(clip_grad_norm, bool) or not isinstance(clip_grad_norm, (int, float)) or not clip_grad_norm > 0
    ):
        raise ConfigError(f"clip_grad_norm must be a number > 0 (or None), got {clip_grad_norm!r}")
    _check_training(accumulate, autocast, scheduler)
    _check_chunks(chunk_size, chunk_keep, seq_dim, example_inputs, example_kwargs)
    if not isinstance(recompute, bool):
        raise ConfigError(f"recompute must be True or False, got {recompute!r}")
    if recompute and chunk_size is not None:
        raise ConfigError("recompute=True and chunk_size= both trade time for memory; choose one")
    if recompute and example_inputs is None and not example_kwargs:
        raise ConfigError("recompute=True needs example_inputs: the units it recomputes are found by running the model")
    _check_options(example_kwargs, aux_options, loss_fn, lr)
    opt_factory = _optimizer_factory(optimizer, lr)
    example_inputs = _as_tuple(example_inputs)
    timings: dict[str, float] = {}
    graphs: dict[str, str] = {}

    with _stage("trace", timings):
        seq = (1 if seq_dim is None else seq_dim) if chunk_size is not None else None
        traced = trace(model, example_inputs, example_kwargs, seq)  # fx, else non-strict export
    gm = traced.gm
    annotated = example_inputs is not None or bool(example_kwargs)
    if not any(p.requires_grad for p in model.parameters()):
        raise PlanError(
            f"{type(model).__name__} has no trainable parameters: nothing to train; "
            f"set requires_grad=True on the parameters you want localize to train"
        )
    if annotated:
        with _stage("annotate_tensors", timings), _blame_inputs(model, example_inputs, example_kwargs):
            flat = traced.bind(tuple(example_inputs or ()), dict(example_kwargs or {}))
            annotate_tensors(gm, flat)  # shapes, dtypes, needs-grad, FLOPs from one example run
    with _stage("annotate_costs", timings):
        annotate_costs(gm)  # params / FLOPs / activation bytes per node
    _debug("annotate_costs", gm, graphs)
    with _stage("find_cut_points", timings):
        legal = find_cut_points(gm, model, max_frontier=max_frontier)  # frontier + unit rule
    with _stage("balance_blocks", timings):
        if cuts is not None:
            positions = resolve_named_cuts(gm, model, list(cuts))  # user-chosen module boundaries
            if len(positions) + 1 != blocks:
                raise PlanError(
                    f"cuts={list(cuts)} make {len(positions) + 1} blocks but blocks={blocks}; leave blocks unset"
                )
        else:
            metric = balance if annotated else "params"  # no shapes: no FLOPs or bytes yet
            positions = balance_blocks(gm, legal, blocks, metric)  # exact DP over legal cuts
    with _stage("assign_blocks", timings):
        assign_blocks(gm, positions)  # block id per node; tied parameters read detached
    with _stage("bind_training_mode", timings):
        flags = bind_training_mode(gm)  # mode-dependent arguments follow train()
    _debug("assign_blocks", gm, graphs)
    with _stage("insert_gradient_cuts", timings):
        program, qualname_map = insert_gradient_cuts(gm)  # split into blocks, detach at boundaries
    _debug("insert_gradient_cuts", program, graphs)
    with _stage("verify_isolation", timings):
        verify_isolation(gm, program)  # every node in one block; no autograd path crosses a cut

    plan = Plan(
        model=model,
        traced=traced,
        gm=gm,
        program=program,
        qualname_map=qualname_map,
        legal_cuts=legal,
        cut_positions=positions,
        blocks=_block_plans(gm, program),
        output_index=-1,
        output_shape=None,
        output_layout=None,
        balance=balance,
        max_frontier=max_frontier,
        aux=aux,
        aux_options=dict(aux_options or {}),
        annotated=annotated,
        timings=timings,
        graphs=graphs,
    )
    plan.output_index = _select_output(plan, output)
    heads: list[nn.Module | None] = [None] * len(plan.blocks)
    if annotated:
        with _stage("insert_aux_heads", timings):
            heads = _build_heads(plan)  # one head per block, shaped from the graph
    chunking = None
    if chunk_size is not None:
        with _stage("find_sequence_ops", timings):
            facts = find_sequence_ops(gm, flat, seq_dim)  # sequence dims; causal, carried or refused
        with _stage("chunk_sequence", timings):
            chunking = _chunk_blocks(plan, heads, facts, flat, chunk_size, chunk_keep)
        _debug("chunk_sequence", chunking.programs[0], graphs)
    recomputed = None
    if recompute:
        with _stage("recompute_units", timings):
            recomputed = _recompute_blocks(plan)
    return LocalModel(
        model,
        plan,
        heads,
        optimizer=opt_factory,
        loss_fn=loss_fn or cross_entropy_last_dim,
        on_nan=on_nan,
        clip_grad_norm=clip_grad_norm,
        accumulate=accumulate,
        autocast=autocast,
        scheduler=scheduler,
        chunking=chunking,
        recompute=recomputed,
        flags=flags,
        complete=_complete_lazy_plan,
    )


# ----------------------------------------------------------------------------------------------- helpers


def _check_args(model, blocks, aux, balance, max_frontier, on_nan, cuts) -> None:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise ConfigError(f"blocks must be an int >= 1 (1 is plain backprop), got {blocks!r}")
    aux_registry.check_name(aux)
    if balance not in METRICS:
        raise ConfigError(f"balance={balance!r} is not a cost; choose one of {list(METRICS)}")
    if isinstance(max_frontier, bool) or not isinstance(max_frontier, int) or max_frontier < 1:
        raise ConfigError(f"max_frontier must be an int >= 1, got {max_frontier!r}")
    if on_nan not in ("raise", "skip"):
        raise ConfigError(f"on_nan={on_nan!r}; choose 'raise' or 'skip'")
    if cuts is not None and (isinstance(cuts, str) or not all(isinstance(c, str) for c in cuts)):
        raise ConfigError(f"cuts must be a list of module names, e.g. ['layer2', 'layer3'], got {cuts!r}")


def _check_training(accumulate, autocast, scheduler) -> None:
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
        raise ConfigError(f"accumulate must be an int >= 1 (1 updates on every step), got {accumulate!r}")
    if autocast is not None and autocast not in AUTOCAST_DTYPES:
        raise ConfigError(f"autocast={autocast!r}; choose 'bf16', 'fp16' or None")
    if scheduler is not None and not callable(scheduler):
        raise ConfigError(
            "scheduler must be a factory optimizer -> LRScheduler, e.g. "
            f"lambda opt: torch.optim.lr_scheduler.StepLR(opt, 100), got {type(scheduler).__name__}"
        )


def _check_chunks(chunk_size, chunk_keep, seq_dim, example_inputs, example_kwargs) -> None:
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ConfigError(f"chunk_size must be an int >= 1 (positions per chunk) or None, got {chunk_size!r}")
    if isinstance(chunk_keep, bool) or not isinstance(chunk_keep, (int, float)) or not 0 < chunk_keep <= 1:
        raise ConfigError(f"chunk_keep must be a number in (0, 1] (1 is SeCO, less is SpaCO), got {chunk_keep!r}")
    if seq_dim is not None and (isinstance(seq_dim, bool) or not isinstance(seq_dim, int)):
        raise ConfigError(f"seq_dim must be an int (the inputs' sequence dimension) or None, got {seq_dim!r}")
    if example_inputs is None and not example_kwargs:
        raise ConfigError("chunk_size= needs example_inputs: the sequence dims are found by running the model")


def _chunk_blocks(plan: Plan, heads, facts, flat: list[Any], chunk_size: int, chunk_keep: float) -> Chunking:
    """One chunk program per block, checked against the block on the example; per head, None where
    it scores each position on its own, else its own chunk program (checked the same way)."""
    programs = [chunk_block(getattr(plan.program, f"submod_{b.index}"), facts, b.index) for b in plan.blocks]
    refs = check_chunk_programs(plan.program, programs, flat, chunk_size)
    head_programs = []
    for b, head, program, outs in zip(plan.blocks, heads, programs, refs):
        if head is None or b.primary is None:
            head_programs.append(None)
            continue
        slot = b.outputs.index(b.primary)
        dim = program.chunk_spec.outputs[slot]
        if dim is None:
            raise PlanError(f"the activation block {b.index}'s head reads ({b.primary}) has no sequence dim")
        head_programs.append(chunk_head(head, outs[slot], dim, b.index, plan.aux, chunk_size))
    return Chunking(chunk_size, float(chunk_keep), programs, head_programs)


def _check_options(example_kwargs, aux_options, loss_fn, lr) -> None:
    for name, value in (("example_kwargs", example_kwargs), ("aux_options", aux_options)):
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{name} must be a dict of names to values, got {type(value).__name__}")
    if loss_fn is not None and not callable(loss_fn):
        raise ConfigError(f"loss_fn must be a callable (prediction, target) -> loss, got {type(loss_fn).__name__}")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0):
        raise ConfigError(f"lr must be a number > 0, got {lr!r}")


@contextmanager
def _blame_inputs(model: nn.Module, args: tuple | None, kwargs: dict[str, Any] | None):
    """When the example run fails, tell a bad example input (the model itself fails) from a bug in localize."""
    try:
        yield
    except LocalizeError:
        raise
    except Exception as e:
        try:
            with torch.no_grad():
                copy.deepcopy(model)(*(args or ()), **(kwargs or {}))  # a copy: BatchNorm stats stay untouched
        except Exception as own:  # noqa: BLE001 - whatever the model raises is the user's answer
            raise ConfigError(
                f"{type(model).__name__} itself fails on example_inputs ({type(own).__name__}: "
                f"{str(own).splitlines()[0] if str(own) else ''}); pass example inputs the model accepts"
            ) from e
        raise


def _optimizer_factory(optimizer: OptimizerFactory | str, lr: float | None) -> OptimizerFactory:
    if isinstance(optimizer, str):
        from localize.runtime import optim

        optim.build_optimizer(optimizer, [torch.nn.Parameter(torch.zeros(1))], lr=lr)  # validates name/lr
        return lambda params: optim.build_optimizer(optimizer, params, lr=lr)
    if not callable(optimizer):
        raise ConfigError(
            f"optimizer must be 'sgd', 'adamw' or a factory params -> torch.optim.Optimizer, got {optimizer!r}"
        )
    if lr is not None:
        raise ConfigError("lr= applies to optimizer='sgd'/'adamw'; set the learning rate inside your factory")
    return optimizer


def _as_tuple(example_inputs: Any) -> tuple | None:
    if example_inputs is None or isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    raise ConfigError(f"example_inputs must be a tuple of tensors, got {type(example_inputs).__name__}")


@contextmanager
def _stage(name: str, timings: dict[str, float]):
    start = time.perf_counter()
    try:
        yield
    except LocalizeError:
        raise
    except Exception as e:  # a bug in a pass: say which pass, keep the cause
        raise VerificationError(f"pass {name} failed after {list(timings)}: {type(e).__name__}: {e}") from e
    finally:
        timings[name] = time.perf_counter() - start


def _debug(name: str, gm: fx.GraphModule, graphs: dict[str, str]) -> None:
    graphs[name] = gm.code
    if os.environ.get("LOCALIZE_DEBUG"):
        print(f"# ---- after {name} ----\n{gm.code}")


def _block_plans(gm: fx.GraphModule, program: fx.GraphModule) -> list[BlockPlan]:
    nodes_of: dict[int, list[fx.Node]] = {}
    for node in compute_nodes(gm):
        nodes_of.setdefault(lmeta(node)["block"], []).append(node)
    plans = []
    for node in program.graph.nodes:
        if node.op != "call_module":
            continue
        b = lmeta(node)["block"]
        sub: fx.GraphModule = getattr(program, node.target)
        inputs = [n.name for n in sub.graph.nodes if n.op == "placeholder"]
        out = next(n for n in reversed(sub.graph.nodes) if n.op == "output")
        outputs = [a.name for a in out.args[0]]
        cut_inputs = []
        for arg in node.all_input_nodes:
            if lmeta(arg).get("cut"):
                cut_inputs.append(lmeta(arg)["source"])
            elif (src := source_of(program, arg)) is not None:
                cut_inputs.append(src[1])
        cost = sum((node_cost(n) for n in nodes_of.get(b, [])), Cost())
        plans.append(BlockPlan(b, [n.name for n in nodes_of.get(b, [])], inputs, outputs, cost, cut_inputs=cut_inputs))
    return plans


def _select_output(plan: Plan, selector: Selector) -> int:
    out = next(n for n in reversed(plan.gm.graph.nodes) if n.op == "output")
    leaves = out.args[0]
    is_tensor = []
    for leaf in leaves:
        info = value_info(leaf) if isinstance(leaf, fx.Node) else None
        is_tensor.append(isinstance(leaf, fx.Node) and (info is None or info.is_tensor))
    return select_output(plan.traced.out_spec, is_tensor, selector)


def _build_heads(plan: Plan) -> list[nn.Module | None]:
    out = next(n for n in reversed(plan.gm.graph.nodes) if n.op == "output")
    leaf = out.args[0][plan.output_index]
    plan.output_shape = value_info(leaf).shape
    plan.output_layout = infer_layout(plan.gm, leaf)
    plan.annotated = True
    return insert_aux_heads(plan, context=plan)


def _complete_lazy_plan(lm: LocalModel, flat: list[Any]) -> None:
    """First call of a model transformed without example inputs: record shapes, build heads."""
    plan = lm.plan
    annotate_tensors(plan.gm, flat)
    annotate_costs(plan.gm)
    for bp, fresh in zip(plan.blocks, _block_plans(plan.gm, plan.program)):
        bp.cost = fresh.cost
    heads = _build_heads(plan)
    lm._set_heads(heads)
    lm._prepare_runtime()


def _recompute_blocks(plan: Plan) -> list[fx.GraphModule]:
    """Each block with its units recomputed in backward; a block whose units hold few others may cut
    them where one activation crosses inside (a transformer layer between attention and MLP), when
    that lowers its estimated peak (:func:`~localize.passes.recompute_units.choose_runs`)."""
    inside = {c.after for c in find_cut_points(plan.gm, plan.model, inside_units=True)}
    nodes = {n.name: n for n in plan.gm.graph.nodes}
    order = {name: i for i, name in enumerate(nodes)}
    units = [u.nodes for u in find_units(plan)]
    out = []
    for b in plan.blocks:
        block = getattr(plan.program, f"submod_{b.index}")
        names = {n.name for n in block.graph.nodes}
        own = sorted((u for u in units if u & names), key=lambda u: min(order[n] for n in u))
        own_nodes = {n: nodes[n] for n in sorted(set().union(*own), key=order.__getitem__)} if own else {}
        runs = choose_runs(own, split_at(own, inside, order), own_nodes)
        out.append(recompute_units(block, runs, block))
    return out
