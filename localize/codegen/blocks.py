r'''Every block and aux head of a LocalModel as code, and the ``block_<i>.py`` files.

Aux heads that fx traces are written as classes with their layers renamed after their type
(``conv2d_1``, ``linear_5``) so the code reads like a model; other heads are rebuilt from their class.

Example:
    >>> import torch, localize
    >>> from collections import OrderedDict
    >>> from localize.codegen.blocks import block_source
    >>> net = torch.nn.Sequential(OrderedDict(fc1=torch.nn.Linear(4, 8), act=torch.nn.ReLU(),
    ...                                       fc2=torch.nn.Linear(8, 3)))
    >>> lm = localize.transform(net, blocks=2, example_inputs=(torch.randn(2, 4),))
    >>> print(block_source(lm, 1).split("\n\n\n")[1].rstrip())
    class Block1(nn.Module):
        """Block 1: act -> fc2 (1 node, 27 parameters)."""
    <BLANKLINE>
        def __init__(self):
            super().__init__()
            self.fc2 = nn.Linear(in_features=8, out_features=3, bias=True)
    <BLANKLINE>
        def forward(self, act):
            fc2 = self.fc2(act);  act = None
            return (fc2,)
'''

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx
from torch import nn

from localize.codegen.modules import (
    CodegenError,
    ModuleCode,
    module_code,
    module_expr,
    named_tensors,
    weights_of,
)
from localize.compiler.tracer import lmeta
from localize.runtime.model import LocalModel
from localize.version import __version__

__all__ = ["Generated", "block_source", "generate", "readable_head"]


def readable_head(head: nn.Module) -> fx.GraphModule:
    """The head traced by fx, with layers named after their type and the input called ``feature``."""
    try:
        gm = fx.symbolic_trace(head)
    except Exception as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else ""
        raise CodegenError(
            f"aux head {type(head).__name__} cannot be traced by torch.fx ({type(e).__name__}: {first})"
        ) from None
    used: set[str] = {n.name for n in gm.graph.nodes}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            node.name = node.target = "feature" if "feature" not in used else node.name
        elif node.op == "call_module":
            module = gm.get_submodule(node.target)
            base = re.sub(r"\W", "_", type(module).__name__.lower())
            new = f"{base}_{node.target.replace('.', '_')}"
            while new in used or hasattr(gm, new):
                new += "_"
            used.add(new)
            gm.add_submodule(new, module)
            node.target = new
            node.name = new
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm


def _head_hooks(head: nn.Module) -> list[str]:
    return [h for h in ("local_loss", "after_update") if callable(getattr(head, h, None))]


@dataclass
class Generated:
    """Every block's and head's code, or why it could not be written (``None`` head: last block)."""

    blocks: list[ModuleCode | None]
    block_errors: list[str | None]
    heads: list[ModuleCode | None]
    head_errors: list[str | None]
    chunks: list[ModuleCode | None] = field(default_factory=list)  # chunk programs (chunk_size=)
    # heads' chunk programs (heads that attend across positions), None per block without one
    head_chunks: list[ModuleCode | None] = field(default_factory=list)
    head_chunk_errors: list[str | None] = field(default_factory=list)

    def weights(self, lm: LocalModel) -> dict[str, Any]:
        """The ``weights.pt`` payload: tensors per block and per head, by dotted path (``load_tensors``)."""
        return {
            "format": 2,
            "blocks": [
                c.weights if c is not None else weights_of(b.module) for c, b in zip(self.blocks, lm.blocks)
            ],
            "heads": [c.weights if c is not None else None for c in self.heads],
            # what a head's chunk program holds besides its head's tensors (it shares those)
            "head_chunks": [
                None if c is None else _own_tensors(c, h.module if h is not None else None)
                for c, h in zip(self.head_chunks, self.heads)
            ],
        }

    def first_error(self) -> str | None:
        errors = self.block_errors + self.head_errors + self.chunk_errors + self.head_chunk_errors
        return next((e for e in errors if e is not None), None)

    @property
    def chunk_errors(self) -> list[str | None]:
        return [None if c is not None else "a chunk program could not be written" for c in self.chunks]


def step_block(lm: LocalModel, index: int) -> nn.Module:
    """What the step calls for block ``index``: its recomputing version with ``recompute=True``."""
    return lm.recompute_programs[index] if lm.recompute_programs else lm.blocks[index].module


def generate(lm: LocalModel) -> Generated:
    """Write every block and aux head of ``lm`` as code; failures are kept, not raised.

    A head that fx traces and that has no hooks of its own becomes a readable class (layers named
    after their type); any other head (a strategy's class with ``local_loss`` or ``after_update``,
    a head fx cannot trace) is rebuilt from its class in :mod:`localize.aux` by ``restore``.
    """
    gen = Generated([], [], [], [])
    for block in lm.blocks:
        try:
            code = module_code(step_block(lm, block.index), f"Block{block.index}", _block_doc(lm, block.index))
            code.call = f"{code.name}()"
            gen.blocks.append(code)
            gen.block_errors.append(None)
        except CodegenError as e:
            gen.blocks.append(None)
            gen.block_errors.append(f"block {block.index}: {e}")
        head, error = None, None
        if block.aux is not None:
            try:
                head = _head_code(lm, block.index)
            except CodegenError as e:
                error = f"aux head of block {block.index}: {e}"
        gen.heads.append(head)
        gen.head_errors.append(error)
    for index, program in enumerate(lm.chunk_programs):
        try:
            code = module_code(program, f"Chunk{index}", f"Block {index} on one chunk of the sequence.")
            code.call = f"{code.name}()"
            gen.chunks.append(code)
        except CodegenError:
            gen.chunks.append(None)
    for index, program in enumerate(lm.head_chunk_programs):
        code, error = None, None
        if program is not None:
            try:
                code = module_code(program, f"HeadChunk{index}", f"The aux head of block {index} on one chunk of the sequence.")
                code.call, code.module = f"{code.name}()", program
            except CodegenError as e:
                error = f"the chunk program of block {index}'s aux head: {e}"
        gen.head_chunks.append(code)
        gen.head_chunk_errors.append(error)
    return gen


def _own_tensors(code: ModuleCode, head: nn.Module | None) -> dict[str, Any]:
    shared = {id(t) for t in named_tensors(head).values()} if head is not None else set()
    return {p: code.weights[p] for p, t in named_tensors(code.module).items() if id(t) not in shared and p in code.weights}


def shared_paths(target: nn.Module, source: nn.Module) -> list[tuple[str, str]]:
    """``(path in target, path in source)`` of the modules, then of the remaining tensors, that are one
    object in both: what generated code ties so a head's chunk program runs the head's own layers."""
    modules = {id(m): p for p, m in source.named_modules(remove_duplicate=False) if p}
    tensors = {id(t): p for p, t in named_tensors(source).items()}
    out: list[tuple[str, str]] = []
    covered: list[str] = []

    def inside(path: str) -> bool:
        return any(path.startswith(c + ".") for c in covered)

    for path, module in target.named_modules(remove_duplicate=False):
        if path and not inside(path) and id(module) in modules:
            out.append((path, modules[id(module)]))
            covered.append(path)
    for path, tensor in named_tensors(target).items():
        if not inside(path) and id(tensor) in tensors:
            out.append((path, tensors[id(tensor)]))
    return out


def _head_code(lm: LocalModel, index: int) -> ModuleCode:
    head = lm.blocks[index].aux
    doc = _head_doc(lm, index)
    if not _head_hooks(head):
        try:
            code = module_code(readable_head(head), f"Head{index}", doc)
            code.call = f"{code.name}()"
            return code
        except CodegenError:
            pass  # not traceable by fx: rebuilt from its class below
    cls = type(head)
    code = ModuleCode(f"head_{index}", "")
    expr = module_expr(head, "", code, indent=4)
    code.source = (
        f"def head_{index}():\n"
        f'    """{doc} Its class, {cls.__qualname__}, comes from {cls.__module__}."""\n'
        f"    return {expr}\n"
    )
    code.weights = weights_of(head)
    code.module = head
    code.call = f"head_{index}()"
    return code


def _block_doc(lm: LocalModel, index: int) -> str:
    bp = lm.blocks[index].plan
    n = len(bp.nodes)
    return (
        f"Block {index}: {', '.join(bp.inputs) or '()'} -> {', '.join(bp.outputs)} "
        f"({n} node{'s' if n != 1 else ''}, {bp.cost.params:,} parameters)."
    )


def _head_doc(lm: LocalModel, index: int) -> str:
    bp = lm.blocks[index].plan
    out = lm.plan.output_shape
    shape = f" {tuple(bp.feature_shape)}" if bp.feature_shape else ""
    return f'Aux head of block {index} ("{lm.plan.aux}"): {bp.primary}{shape} -> {tuple(out) if out else "output"}.'


def _header_imports(codes: list[ModuleCode], extra: tuple[str, ...] = ()) -> tuple[str, str]:
    """(import lines then alias lines, copied class sources) for a file holding ``codes``."""
    imports: set[str] = {"import torch", "from torch import nn", *extra}
    inline: dict[str, str] = {}
    for c in codes:
        imports |= c.imports
        inline.update(c.inline)
    plain = [i for i in imports if i.startswith(("import ", "from "))]
    # torch and its submodules first, then localize, as isort would group them
    plain.sort(key=lambda i: ("localize" in i.split()[1], i.startswith("from"), i))
    aliases = sorted(i for i in imports if not i.startswith(("import ", "from ")))
    head = "\n".join(plain) + ("\n\n" + "\n".join(aliases) if aliases else "")
    classes = "\n\n".join(src.rstrip() + "\n" for src in inline.values())
    return head, classes


def block_source(lm: LocalModel, index: int, gen: Generated | None = None) -> str:
    """``block_<index>.py``: the block's module class and its aux head's, importable on their own."""
    gen = gen or generate(lm)
    if gen.blocks[index] is None:
        raise CodegenError(gen.block_errors[index] or f"block {index} was not generated")
    block = lm.blocks[index]
    codes = [gen.blocks[index]]
    head_note = ""
    if gen.heads[index] is not None:
        codes.append(gen.heads[index])
    elif gen.head_errors[index] is not None:
        head_note = (
            f"The aux head ({type(block.aux).__name__}) is not written here: {gen.head_errors[index]}.\n"
        )
    imports, inline = _header_imports(codes)
    bp = block.plan
    crossing = ", ".join(f"{n} {_shape_of(lm, n)}".rstrip() for n in bp.outputs)
    doc = (
        f'"""Block {index} of {lm.plan.num_blocks} of {type(lm.model).__name__}, generated by localize '
        f"{__version__}.\n\n"
        f"Inputs: {', '.join(bp.inputs) or '()'}; outputs: {crossing}.\n"
        f"Cost: {bp.cost.params:,} parameters, {bp.cost.flops:,} FLOPs, {bp.cost.activation_bytes:,} activation bytes.\n"
        + (f"Aux head ({lm.plan.aux!r}) reads {bp.primary}.\n" if block.aux is not None else "")
        + head_note
        + f"\nWeights: ``torch.load('weights.pt', weights_only=True)['blocks'][{index}]`` (and ``['heads'][{index}]``),\n"
        f"loaded with ``localize.codegen.restore.load_tensors(module, tensors)``.\n"
        '"""'
    )
    body = "\n\n".join(c.source for c in codes)
    parts = [doc, "", imports, "", ""]
    if inline:
        parts += [inline, ""]
    parts.append(body)
    return "\n".join(parts).rstrip() + "\n"


def _shape_of(lm: LocalModel, name: str) -> str:
    node = next((n for n in lm.plan.gm.graph.nodes if n.name == name), None)
    info = lmeta(node).get("value") if node is not None else None
    return str(tuple(info.shape)) if info is not None and info.is_tensor else ""
