r'''``program.py``: the generated training step, with the blocks and heads it calls, as one file.

The step's code is fx's code for :attr:`LocalModel.step_program`, the same text ``train_step`` runs:
``TrainStep.forward`` below is that code verbatim. Blocks are written as classes
(:mod:`localize.codegen.modules`), heads as classes or rebuilt from their strategy's class, and the
loss, the runtime ops, the optimizers and the data order are imported from localize, never copied:
``python program.py --steps N`` trains exactly like ``LocalModel.train_step`` for the same seed and
data order. It needs torch, localize and the model file (for ``dataset()``, ``loss_fn`` and any
class of its own that a block holds).

Example:
    >>> import torch, localize
    >>> from localize.codegen.program import OptimizerSpec, program_source
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> lm = localize.transform(net, blocks=2, example_inputs=(torch.randn(2, 4),))
    >>> text = program_source(lm, model_file="net.py", optimizer=OptimizerSpec.build("adamw", None),
    ...                       batch_size=8, seed=0, example_inputs=(torch.randn(2, 4),))
    >>> import textwrap
    >>> textwrap.indent(lm.step_program.code.strip(), "    ") in text  # TrainStep.forward, verbatim
    True
'''

from __future__ import annotations

import pprint
import textwrap
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from localize.codegen.blocks import Generated, _header_imports, generate, shared_paths, step_block
from localize.codegen.modules import _IDENT, CodegenError, _attr, _imports_for, named_tensors
from localize.runtime.model import LocalModel
from localize.runtime.schedulers import LRSchedule
from localize.version import __version__

__all__ = ["OptimizerSpec", "program_source", "step_source"]


@dataclass(frozen=True)
class OptimizerSpec:
    """The optimizer program.py builds (``localize.runtime.optim.build_optimizer``): name and options."""

    name: str
    options: dict[str, Any]

    @staticmethod
    def build(name: str, lr: float | None) -> OptimizerSpec:
        from localize.runtime import optim

        opt = optim.build_optimizer(name, [nn.Parameter(torch.zeros(1))], lr=lr)
        d = opt.defaults
        if name == "sgd":
            keys = ("lr", "momentum", "weight_decay", "nesterov")
        else:
            keys = ("lr", "betas", "eps", "weight_decay")
        return OptimizerSpec(name, {k: d[k] for k in keys})

    def describe(self) -> str:
        return f"{self.name}(" + ", ".join(f"{k}={v!r}" for k, v in self.options.items()) + ")"


def step_source(lm: LocalModel) -> tuple[str, set[str]]:
    """``class TrainStep``: the step's forward exactly as fx writes it, and the imports it needs."""
    step = lm.step_program
    python = step.graph.python_code("self")
    forward = python.src.strip("\n").rstrip()
    imports = _imports_for(python.globals, forward)
    extra = sorted(
        {
            n.target
            for n in step.graph.nodes
            if n.op == "get_attr" and not n.target.startswith(("head_", "block_", "chunk_"))
        }
    )
    if any("." in t for t in extra):
        raise CodegenError(f"the step reads nested attributes {extra}, which program.py cannot register")
    source = (
        "class TrainStep(nn.Module):\n"
        f'    """The training step: {lm.schedule}. fx wrote forward() from the step graph;\n'
        '    LocalModel.train_step runs the same code."""\n\n'
        "    def __init__(self, blocks, heads, tensors, chunks=(), head_chunks=()):\n"
        "        super().__init__()\n"
        "        for i, (block, head) in enumerate(zip(blocks, heads)):\n"
        '            self.add_module(f"block_{i}", block)\n'
        "            if head is not None:\n"
        '                self.add_module(f"head_{i}", head)\n'
        "        for i, chunk in enumerate(chunks):  # chunk_size=: each block on one chunk, its layers shared\n"
        '            self.add_module(f"chunk_{i}", chunk)\n'
        "        for i, chunk in enumerate(head_chunks):  # heads that attend across positions, on one chunk\n"
        "            if chunk is not None:\n"
        '                self.add_module(f"head_chunk_{i}", chunk)\n'
        "        load_tensors(self, tensors)  # tensors the step reads between blocks\n\n"
        f"{textwrap.indent(forward, '    ')}\n"
    )
    return source, imports


def program_source(
    lm: LocalModel,
    *,
    model_file: str,
    optimizer: OptimizerSpec,
    batch_size: int,
    seed: int,
    example_inputs: tuple[torch.Tensor, ...],
    gen: Generated | None = None,
) -> str:
    """``program.py``: trains ``lm`` from the weights in :func:`program_weights` (saved as weights.pt)."""
    parts = gen or generate(lm)
    if parts.first_error() is not None:
        raise CodegenError(parts.first_error())
    codes = [c for c in parts.blocks + parts.heads + parts.chunks + parts.head_chunks if c is not None]
    step, step_imports = step_source(lm)
    extra = _CHUNK_IMPORTS if parts.chunks else set()
    imports, inline = _header_imports(codes, tuple(sorted(step_imports | _PROGRAM_IMPORTS | extra)))
    inputs = [
        (name, tuple(x.shape[1:]), str(x.dtype).replace("torch.", ""), _high(x))
        for name, x in zip(lm.plan.traced.input_names, example_inputs)
    ]
    text = _PROGRAM_HEAD.format(
        version=__version__,
        model_name=type(lm.model).__name__,
        model_file=model_file,
        k=lm.plan.num_blocks,
        aux=lm.plan.aux,
        optimizer=optimizer.describe(),
        schedule=str(lm.schedule),
        method=lm.plan.traced.method,
    )
    text += imports + "\n\n"
    text += (
        f"HERE = os.path.dirname(os.path.abspath(__file__))\n"
        f"MODEL_FILE = {model_file!r}  # for dataset(), loss_fn and its classes; --model-file overrides it\n"
        f"BATCH_SIZE = {batch_size}\n"
        f"SEED = {seed}\n"
        f"ON_NAN = {lm.on_nan!r}  # a non-finite local loss: 'raise' or 'skip' the block's update\n"
        f"OPTIMIZER = {optimizer.name!r}\n"
        f"OPTIONS = {optimizer.options!r}\n"
        f"SCHEDULE = {_schedule(lm)!r}  # each block's learning-rate schedule (None: constant)\n"
        f"AUTOCAST = {lm.autocast!r}  # 'fp16' adds a GradScaler per block\n"
        f"# inputs for random data when the model file has no dataset(): (name, shape per sample, dtype, high)\n"
        f"INPUTS = {inputs!r}\n"
        f"OUTPUT_SHAPE = {tuple(lm.plan.output_shape or ())!r}  # of the example batch\n\n\n"
    )
    text += _SECTION.format(title="blocks and aux heads (weights in weights.pt)")
    if inline:
        text += inline + "\n\n"
    text += "\n\n".join(c.source.rstrip() + "\n" for c in codes) + "\n\n"
    text += _SECTION.format(title=f"the training step: {lm.schedule}")
    text += step + "\n\n"
    text += _build_source(lm, parts)
    text += _optimizers_source(lm)
    text += _PROGRAM_MAIN
    return text


def _schedule(lm: LocalModel) -> LRSchedule | None:
    factory = lm._scheduler_factory
    if factory is not None and not isinstance(factory, LRSchedule):
        raise CodegenError(
            "program.py rebuilds learning-rate schedules made by localize.runtime.schedulers.LRSchedule "
            f"(--schedule), not a custom factory ({type(factory).__name__}); use LRSchedule, or skip program.py"
        )
    return factory


def program_weights(lm: LocalModel, gen: Generated) -> dict[str, Any]:
    """The ``weights.pt`` payload: block and head tensors, and those the step reads itself."""
    payload = gen.weights(lm)
    step = lm.step_program
    payload["step"] = {
        n.target: getattr(step, n.target).detach()
        for n in step.graph.nodes
        if n.op == "get_attr" and not n.target.startswith(("head_", "block_", "chunk_"))
    }
    return payload


_CHUNK_IMPORTS = {"from localize.codegen.restore import share", "from localize.runtime.chunks import ChunkSpec"}

_PROGRAM_IMPORTS = {
    "import argparse",
    "import os",
    "from localize.codegen.restore import load_tensors, mirror, tie",
    "from localize.compiler.model_file import load_model_file",
    "from localize.data import iterate_batches, random_dataset",
    "from localize.runtime.loss import cross_entropy_last_dim",
    "from localize.runtime.ops import StepState, make_scalers, make_schedulers, run_step",
    "from localize.runtime.schedulers import LRSchedule",
    "from localize.runtime.optim import build_optimizer",
}


def _high(x: torch.Tensor) -> int | None:
    if x.is_floating_point() or x.is_complex() or x.numel() == 0:
        return None
    return int(x.max()) + 1


def _build_source(lm: LocalModel, parts: Generated) -> str:
    blocks = ", ".join(c.call for c in parts.blocks)
    heads = ", ".join(c.call if c is not None else "None" for c in parts.heads)
    lines = [
        "def build():",
        '    """The step with the blocks and heads as they were when localize compiled the model."""',
        f"    blocks = [{blocks}]",
        f"    heads = [{heads}]",
        '    weights = torch.load(os.path.join(HERE, "weights.pt"), weights_only=True)',
        '    for module, tensors in zip(blocks + heads, weights["blocks"] + weights["heads"]):',
        "        if module is not None:",
        "            load_tensors(module, tensors)",
    ]
    ties = _tie_lines(lm, parts)
    if ties:
        lines.append("    # one object in the model, so one object here: tied weights, a head following a layer")
        lines += ["    " + t for t in ties]
    if parts.chunks:
        lines.append(f"    chunks = [{', '.join(c.call for c in parts.chunks)}]  # run the blocks' own layers")
        for index, program in enumerate(lm.chunk_programs):
            lines.append(f"    share(chunks[{index}], blocks[{index}]).chunk_spec = {program.chunk_spec!r}")
        if any(c is not None for c in parts.head_chunks):
            lines += _head_chunk_lines(parts)
            lines.append('    return TrainStep(blocks, heads, weights["step"], chunks, head_chunks)')
        else:
            lines.append('    return TrainStep(blocks, heads, weights["step"], chunks)')
    else:
        lines.append('    return TrainStep(blocks, heads, weights["step"])')
    return "\n".join(lines) + "\n\n\n"


def _head_chunk_lines(parts: Generated) -> list[str]:
    """Build the heads' chunk programs: their own tensors from weights.pt, the head's layers tied in."""
    calls = ", ".join(c.call if c is not None else "None" for c in parts.head_chunks)
    lines = [f"    head_chunks = [{calls}]  # heads that attend across positions, on one chunk"]
    for index, (code, head) in enumerate(zip(parts.head_chunks, parts.heads)):
        if code is None:
            continue
        lines.append(f'    load_tensors(head_chunks[{index}], weights["head_chunks"][{index}])')
        for path, source in shared_paths(code.module, head.module) if head is not None else ():
            lines.append(f"    tie(head_chunks[{index}], {path!r}, {_get(('heads', index, source))})")
        lines.append(f"    head_chunks[{index}].chunk_spec = {code.module.chunk_spec!r}")
    return lines


def _tie_lines(lm: LocalModel, parts: Generated) -> list[str]:
    """``tie(...)`` calls that make shared tensors one object again after loading, and point
    heads' module references (MAN's live layer) at the module of the block that holds it."""
    owner_of = {id(p): b.index for b in lm.blocks for p in b.params}
    places: dict[int, list[tuple[str, int, str]]] = {}
    for kind, codes in (("blocks", parts.blocks), ("heads", parts.heads)):
        for index, code in enumerate(codes):
            for path, t in named_tensors(code.module).items() if code is not None else ():
                places.setdefault(id(t), []).append((kind, index, path))
    lines = []
    for key, where in places.items():
        if len(where) < 2:
            continue
        canonical = next((w for w in where if w[0] == "blocks" and w[1] == owner_of.get(key)), where[0])
        for place in where:
            if place != canonical:
                lines.append(f"tie({place[0]}[{place[1]}], {place[2]!r}, {_get(canonical)})")
    for head_code, block in zip(parts.heads, lm.blocks):
        for path, module in head_code.refs if head_code is not None else []:
            found = _locate(module, lm)
            if found is None:
                raise CodegenError(
                    f"the aux head of block {block.index} refers to a {type(module).__name__} at {path!r} that no "
                    f"block holds"
                )
            lines.append(f"tie(heads[{block.index}], {path!r}, {found})")
    return lines


def _get(place: tuple[str, int, str]) -> str:
    where, index, path = place
    owner, _, name = path.rpartition(".")
    if all(_IDENT.match(p) for p in path.split(".")):
        return f"{where}[{index}].{path}"
    return f"getattr({where}[{index}]{_submodule(owner)}, {name!r})"


def _submodule(path: str) -> str:
    return "".join(_attr(p) for p in path.split(".")) if path else ""


def _locate(target: nn.Module, lm: LocalModel) -> str | None:
    """An expression for ``target`` in ``build()``: the block or head module that *is* it, or a
    :func:`~localize.codegen.restore.mirror` of the block modules holding its parts (a split block
    keeps a traced layer's leaves under flat names, not the layer object)."""
    for kind, roots in (("blocks", [b.module for b in lm.blocks]), ("heads", [b.aux for b in lm.blocks])):
        for index, root in enumerate(roots):
            for path, module in root.named_modules(remove_duplicate=False) if root is not None else ():
                if module is target:
                    return f"{kind}[{index}]{_submodule(path)}"
    parts = {}
    if not any(True for _ in target.parameters(recurse=False)) and not any(True for _ in target.buffers(recurse=False)):
        for name, child in target.named_children():
            found = _locate(child, lm)
            if found is None and (any(True for _ in child.parameters()) or any(True for _ in child.buffers())):
                break
            if found is not None:  # else a stateless part (an activation) the reference never reads
                parts[name] = found
        else:
            if parts:
                return "mirror({" + ", ".join(f"{k!r}: {v}" for k, v in parts.items()) + "})"
    # an exported block holds the layer's tensors under flat names: mirror them one by one
    places = {id(t): (i, p) for b in lm.blocks for p, t in named_tensors(b.module).items() for i in [b.index]}
    tensors = dict(target.named_parameters()) | dict(target.named_buffers())
    if not tensors or any(id(t) not in places for t in tensors.values()):
        return None
    return "mirror({" + ", ".join(f"{k!r}: {_get(('blocks', *places[id(t)]))}" for k, t in tensors.items()) + "})"


def _optimizers_source(lm: LocalModel) -> str:
    names: list[list[str]] = []
    for block in lm.blocks:
        where = {id(p): n for n, p in step_block(lm, block.index).named_parameters(remove_duplicate=False)}
        own = []
        for p in block.params:
            if not p.requires_grad:
                continue
            if id(p) not in where:
                raise CodegenError(f"block {block.index} trains a parameter its graph does not hold")
            own.append(where[id(p)])
        names.append(own)
    listing = pprint.pformat(names, width=108, compact=True)
    return (
        "# the model parameters each block trains (its aux head's parameters come on top)\n"
        f"TRAINED = {listing}\n\n\n"
        "def make_optimizers(step):\n"
        '    """One optimizer per block, over the parameters it owns and its head\'s (as LocalModel builds them)."""\n'
        "    optimizers = []\n"
        "    for i, names in enumerate(TRAINED):\n"
        '        params = [step.get_submodule(f"block_{i}").get_parameter(n) for n in names]\n'
        '        if hasattr(step, f"head_{i}"):\n'
        '            params += [p for p in step.get_submodule(f"head_{i}").parameters() if p.requires_grad]\n'
        "        optimizers.append(build_optimizer(OPTIMIZER, params, **OPTIONS) if params else None)\n"
        "    return optimizers\n\n\n"
    )


_SECTION = "# " + "-" * 60 + " {title}\n\n\n"

_PROGRAM_HEAD = '''#!/usr/bin/env python
"""Standalone local-learning program, generated by localize {version} from {model_file}.

{model_name} ({method} trace) cut into {k} gradient-isolated blocks. Each block trains with its own
loss: blocks 0..{k}-2 through an aux head ("{aux}"), the last block through the model's output.
Optimizer per block: {optimizer}. Schedule: {schedule}

TrainStep.forward is the code fx generated for the step graph, the code LocalModel.train_step runs.
It needs torch, localize (the runtime ops, loss, optimizers and data order it imports) and the model
file (for its dataset(), loss_fn and classes); the blocks and heads are built below, their weights
are in weights.pt.

    python program.py --steps 100

prints every block's loss at every step, the same numbers as LocalModel.train_step for the same
seed and data order.
"""

from __future__ import annotations

'''

_PROGRAM_MAIN = """def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="training steps (default 100)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model-file", default=MODEL_FILE)
    args = parser.parse_args(argv)

    model_file = load_model_file(args.model_file)  # first: blocks may hold classes it defines
    step = build().to(args.device).train()
    optimizers = make_optimizers(step)
    state = StepState(
        model_file.loss_fn or cross_entropy_last_dim,
        optimizers,
        on_nan=ON_NAN,
        schedulers=make_schedulers(optimizers, SCHEDULE),
        scalers=make_scalers(optimizers, AUTOCAST),
    )
    if model_file.has_dataset:
        train, _ = model_file.dataset()
    else:
        train, _ = random_dataset(INPUTS, OUTPUT_SHAPE, seed=args.seed)

    torch.manual_seed(args.seed)  # the state `localize --train` starts training from
    batches = iterate_batches(train, args.batch_size, args.seed)
    for i in range(1, args.steps + 1):
        inputs, target = next(batches)
        inputs = [x.to(args.device) for x in inputs]
        losses = run_step(step, state, inputs, target.to(args.device))
        print(f"step {i}: " + " ".join(repr(loss) for loss in losses), flush=True)


if __name__ == "__main__":
    main()
"""
