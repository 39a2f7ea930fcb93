r'''Code generation: each block and aux head as readable Python, and a standalone ``program.py``.

A block is an ``fx.GraphModule``; its code is ``gm.code``. What fx does not write out is how to
*build* the module: this file emits an ``__init__`` that constructs every leaf module from its
constructor (checked: ``repr`` evaluates back to an equal module), registers every parameter and
buffer empty, and leaves the values to ``weights.pt``. Aux heads are traced with ``torch.fx`` and
their layers renamed after their type (``conv2d_1``, ``linear_5``) so the code reads like a model.

``program.py`` puts the blocks, the heads, localize's default loss, the two optimizers (on
``localize.kernels``) and the schedule as straight-line code into one file: ``python program.py
--steps N`` trains exactly like ``LocalModel.train_step`` for the same seed and data order.

Example:
    >>> import torch, localize
    >>> from collections import OrderedDict
    >>> from localize.codegen.modules import block_source
    >>> net = torch.nn.Sequential(OrderedDict(fc1=torch.nn.Linear(4, 8), act=torch.nn.ReLU(),
    ...                                       fc2=torch.nn.Linear(8, 3)))
    >>> lm = localize.transform(net, blocks=2, example_inputs=(torch.randn(2, 4),))
    >>> print(block_source(lm, 1).split("\n\n\n")[1].rstrip())
    class Block1(nn.Module):
        """Block 1: fc1 -> fc2 (2 nodes, 27 parameters)."""
    <BLANKLINE>
        def __init__(self):
            super().__init__()
            self.act = nn.ReLU()
            self.fc2 = nn.Linear(in_features=8, out_features=3, bias=True)
    <BLANKLINE>
        def forward(self, fc1):
            act = self.act(fc1);  fc1 = None
            fc2 = self.fc2(act);  act = None
            return (fc2,)
'''

from __future__ import annotations

import builtins
import importlib
import inspect
import math
import re
import textwrap
import types
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

import localize
from localize.compiler.tracer import lmeta
from localize.errors import LocalizeError
from localize.passes.bind_training_mode import TrainingFlag
from localize.runtime.model import LocalModel

__all__ = [
    "CodegenError",
    "Generated",
    "ModuleCode",
    "block_source",
    "generate",
    "module_code",
    "readable_head",
    "weights_of",
]

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
# Classes outside torch.nn that may appear as leaf modules; their source is copied into the file.
_INLINE = {TrainingFlag}


class CodegenError(LocalizeError):
    """A block or head cannot be written as standalone code (an unusual module or head)."""


@dataclass
class ModuleCode:
    """A generated ``nn.Module`` class: its source, what it imports, and its weights."""

    name: str
    source: str
    imports: set[str] = field(default_factory=set)  # import lines the source needs
    inline: dict[str, str] = field(default_factory=dict)  # class name -> copied class source
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # for load_tensors, by dotted path
    refs: list[tuple[str, nn.Module]] = field(default_factory=list)  # attribute path -> module it must point at
    call: str = ""  # the expression that builds it: "Block0()"
    module: nn.Module | None = None  # what was written (a head's readable version), for ties


# ------------------------------------------------------------------------------------------ one module


def module_code(gm: fx.GraphModule, name: str, doc: str) -> ModuleCode:
    """``class <name>(nn.Module)`` that builds ``gm``'s modules and tensors and runs ``gm.code``."""
    code = ModuleCode(name, "")
    init: list[str] = []
    _emit_children(gm, "self", init, code, path="")
    consts = _attribute_tensors(gm)
    for path, tensor in _direct_tensors(gm, consts):
        owner, _, attr = path.rpartition(".")
        target = "self" + "".join(_attr(p) for p in owner.split(".")) if owner else "self"
        empty = f"torch.empty({list(tensor.shape)}, dtype={tensor.dtype})"
        if isinstance(tensor, nn.Parameter):
            grad = "" if tensor.requires_grad else ", requires_grad=False"
            init.append(f"{target}.register_parameter({attr!r}, nn.Parameter({empty}{grad}))")
        else:
            init.append(f"{target}.register_buffer({attr!r}, {empty})")
    for path, tensor in gm.named_parameters(remove_duplicate=False):
        if not tensor.requires_grad and _owned_by_leaf(gm, path):
            init.append(f"self.get_parameter({path!r}).requires_grad_(False)")
    code.weights = weights_of(gm)
    code.module = gm
    python = gm.graph.python_code("self")
    forward = python.src.strip("\n").rstrip()
    code.imports |= _imports_for(python.globals, forward)
    body = "\n".join("        " + line for line in init) or "        pass"
    code.source = (
        f"class {name}(nn.Module):\n"
        f'    """{doc}"""\n\n'
        f"    def __init__(self):\n"
        f"        super().__init__()\n"
        f"{body}\n\n"
        f"{textwrap.indent(forward, '    ')}\n"
    )
    return code


def weights_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor the generated module loads (``load_tensors``), by dotted path, detached."""
    return {path: t.detach() for path, t in named_tensors(module).items()}


def named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters, buffers (persistent or not) and plain tensor attributes of every submodule."""
    found: dict[str, torch.Tensor] = {}
    for prefix, sub in module.named_modules(remove_duplicate=False):
        dot = prefix + "." if prefix else ""
        for name, value in list(sub._parameters.items()) + list(sub._buffers.items()):
            if value is not None:
                found.setdefault(dot + name, value)
        for name, value in vars(sub).items():
            if isinstance(value, torch.Tensor):
                found.setdefault(dot + name, value)
    return found


def _emit_children(module: nn.Module, expr: str, out: list[str], code: ModuleCode, path: str) -> None:
    for child_name, child in module.named_children():
        child_path = f"{path}.{child_name}" if path else child_name
        if type(child) is nn.Module or isinstance(child, _CONTAINERS):
            out.append(_assign(expr, child_name, f"nn.{type(child).__name__}()"))
            _emit_children(child, expr + _attr(child_name), out, code, child_path)
            continue
        out.append(_assign(expr, child_name, module_expr(child, child_path, code)))


def module_expr(module: nn.Module, path: str, code: ModuleCode, indent: int = 8) -> str:
    """Source that builds a module like ``module`` (tensors empty, filled from weights.pt).

    A ``torch.nn`` module whose ``repr`` rebuilds it is its constructor; a nested GraphModule
    becomes a class of its own; anything else is ``restore("module:Class", ...)`` of its class,
    imported from where it is defined. Module references that are not children (MAN's live layer)
    are recorded in ``code.refs`` and tied by ``build()``.
    """
    cls = type(module)
    if cls in _INLINE:
        code.inline[cls.__name__] = inspect.getsource(cls)
        return repr(module)
    if isinstance(module, fx.GraphModule):
        name = "Graph_" + re.sub(r"\W", "_", f"{code.name}_{path}")
        nested = module_code(module, name, f"{cls.__name__} at {path} of {code.name}, written by fx.")
        code.inline.update(nested.inline)
        code.inline[name] = nested.source
        code.imports |= nested.imports
        code.refs += [(_join(path, p), t) for p, t in nested.refs]
        return f"{name}()"
    one_line = _constructor(module)
    if one_line is not None:
        return one_line
    code.imports.add("from localize.codegen.restore import restore")
    pad = " " * (indent + 4)
    attributes, children = [], []
    for key, value in vars(module).items():
        if key in _MODULE_INTERNALS or isinstance(value, torch.Tensor):
            continue  # tensors come from weights.pt
        if isinstance(value, nn.Module):
            code.refs.append((_join(path, key), value))  # not a child: tied to where it lives
            continue
        attributes.append(f"{key!r}: {_literal(value, _join(path, key), code)}")
    for key, child in module._modules.items():
        value = "None" if child is None else module_expr(child, _join(path, key), code, indent + 4)
        children.append(f"{key!r}: {value}")
    params = {k: None if v is None else (tuple(v.shape), v.dtype, v.requires_grad) for k, v in module._parameters.items()}
    buffers = {
        k: None if v is None else (tuple(v.shape), v.dtype, k not in module._non_persistent_buffers_set)
        for k, v in module._buffers.items()
    }
    code.imports.add("import torch")

    def block(items: list[str]) -> str:
        return "{}" if not items else "{\n" + "".join(f"{pad}    {i},\n" for i in items) + pad + "}"

    qual = f"{cls.__module__}:{cls.__qualname__}"
    if "<" in qual or not _importable(cls.__module__, cls.__qualname__, cls):
        raise CodegenError(
            f"module {path!r} is a {cls.__qualname__} from {cls.__module__}, which generated code cannot import; "
            f"define the class at the top level of a module"
        )
    return (
        f"restore(\n{pad}{qual!r},\n{pad}{block(attributes)},\n{pad}{block(children)},\n"
        f"{pad}{_tensor_specs(params)},\n{pad}{_tensor_specs(buffers)},\n{' ' * indent})"
    )


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


# what nn.Module.__init__ sets: restore() makes them anew
_MODULE_INTERNALS = frozenset(vars(nn.Module())) - {"training"}


def _tensor_specs(specs: dict[str, tuple | None]) -> str:
    items = []
    for k, v in specs.items():
        items.append(f"{k!r}: None" if v is None else f"{k!r}: ({v[0]!r}, torch.{str(v[1]).removeprefix('torch.')}, {v[2]})")
    return "{" + ", ".join(items) + "}"


def _literal(value: Any, where: str, code: ModuleCode) -> str:
    """``value`` as Python source, or a CodegenError naming the attribute."""
    if value is None or isinstance(value, (bool, int, str, bytes)):
        return repr(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else f"float({str(value)!r})"
    if isinstance(value, torch.dtype):
        return "torch." + str(value).removeprefix("torch.")
    if isinstance(value, torch.device):
        return f"torch.device({str(value)!r})"
    if isinstance(value, torch.Size):
        return f"torch.Size({list(value)!r})"
    if isinstance(value, (tuple, list, set, frozenset)):
        items = [_literal(v, where, code) for v in value]
        if isinstance(value, tuple):
            return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
        if isinstance(value, list):
            return "[" + ", ".join(items) + "]"
        return f"{type(value).__name__}([{', '.join(items)}])"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_literal(k, where, code)}: {_literal(v, where, code)}" for k, v in value.items()) + "}"
    module, qual = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
    if module and qual and "<" not in qual and _importable(module, qual, value):
        code.imports.add("from localize.codegen.restore import ref")
        return f"ref({module + ':' + qual!r})"
    raise CodegenError(f"attribute {where!r} holds a {type(value).__name__}, which generated code cannot write")


def _constructor(module: nn.Module) -> str | None:
    """``nn.<repr>`` when it rebuilds an equal module (same repr, same tensor shapes), else None."""
    cls = type(module)
    text = repr(module)
    if getattr(nn, cls.__name__, None) is not cls or "\n" in text:
        return None
    namespace = {"nn": nn, "torch": torch, "inf": math.inf, "nan": math.nan}
    try:
        fresh = eval("nn." + text, namespace)  # noqa: S307 - our own repr of a torch.nn module, checked below
    except Exception:  # noqa: BLE001
        return None
    same = repr(fresh) == text and _tensor_layout(fresh) == _tensor_layout(module)
    return "nn." + text if same else None


def _tensor_layout(module: nn.Module) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """Parameter and buffer shapes by name: a constructor must rebuild both kinds (MAN keeps an EMA
    copy's weights as buffers)."""
    params = {k: tuple(v.shape) for k, v in module.named_parameters()}
    return params, {k: tuple(v.shape) for k, v in module.named_buffers()}


def _direct_tensors(gm: fx.GraphModule, consts: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """Parameters/buffers held by the graph module or its plain containers (not by leaf modules)."""
    found: list[tuple[str, torch.Tensor]] = []
    seen: set[str] = set()

    def visit(module: nn.Module, prefix: str) -> None:
        for n, p in module._parameters.items():
            if p is not None:
                found.append((prefix + n, p))
                seen.add(prefix + n)
        for n, b in module._buffers.items():
            if b is not None:
                found.append((prefix + n, b))
                seen.add(prefix + n)
        for n, child in module.named_children():
            if type(child) is nn.Module or isinstance(child, _CONTAINERS):
                visit(child, f"{prefix}{n}.")

    visit(gm, "")
    found += [(p, t) for p, t in consts.items() if p not in seen]
    return found


def _attribute_tensors(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Plain tensor attributes read by ``get_attr`` (lifted constants): they become buffers."""
    out: dict[str, torch.Tensor] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        owner, _, attr = node.target.rpartition(".")
        holder = gm.get_submodule(owner) if owner else gm
        if attr in holder._parameters or attr in holder._buffers:
            continue
        value = getattr(holder, attr)
        if not isinstance(value, torch.Tensor):
            raise CodegenError(f"attribute {node.target!r} is a {type(value).__name__}, not a tensor")
        out[node.target] = value
    return out


def _owned_by_leaf(gm: nn.Module, path: str) -> bool:
    owner = path.rpartition(".")[0]
    module = gm.get_submodule(owner) if owner else gm
    return not (module is gm or type(module) is nn.Module or isinstance(module, _CONTAINERS))


def _imports_for(globals_: dict[str, Any], source: str) -> set[str]:
    lines: set[str] = set()
    for name, value in globals_.items():
        if not re.search(rf"\b{re.escape(name)}\b", source):
            continue
        if getattr(builtins, name, None) is value:
            continue
        if name in ("inf", "nan"):
            lines.add(f"from math import {name}")
        elif name == "NoneType":
            lines.add("NoneType = type(None)")
        elif isinstance(value, str):  # an annotation alias, e.g. _torch_Tensor_ -> "torch.Tensor"
            lines.add(f"{name} = {value}")
        elif isinstance(value, types.ModuleType):
            lines.add(
                f"import {value.__name__}" if name == value.__name__ else f"import {value.__name__} as {name}"
            )
        else:
            module, qual = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
            if not module or not qual or "<" in qual or not _importable(module, qual, value):
                raise CodegenError(f"the graph calls {value!r}, which generated code cannot import")
            alias = "" if qual == name else f" as {name}"
            lines.add(f"from {module} import {qual}{alias}")
    return lines


def _importable(module: str, qual: str, value: Any) -> bool:
    try:
        obj: Any = importlib.import_module(module)
        for part in qual.split("."):
            obj = getattr(obj, part)
    except Exception:  # noqa: BLE001
        return False
    return obj is value


def _attr(name: str) -> str:
    return f".{name}" if _IDENT.match(name) else f".get_submodule({name!r})"


def _assign(expr: str, name: str, value: str) -> str:
    if _IDENT.match(name):
        return f"{expr}.{name} = {value}"
    return f"{expr}.add_module({name!r}, {value})"


# ------------------------------------------------------------------------------------------ heads


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


# ------------------------------------------------------------------------------------------ files


@dataclass
class Generated:
    """Every block's and head's code, or why it could not be written (``None`` head: last block)."""

    blocks: list[ModuleCode | None]
    block_errors: list[str | None]
    heads: list[ModuleCode | None]
    head_errors: list[str | None]

    def weights(self, lm: LocalModel) -> dict[str, Any]:
        """The ``weights.pt`` payload: tensors per block and per head, by dotted path (``load_tensors``)."""
        return {
            "format": 2,
            "blocks": [c.weights if c is not None else weights_of(b.module) for c, b in zip(self.blocks, lm.blocks)],
            "heads": [c.weights if c is not None else None for c in self.heads],
        }

    def first_error(self) -> str | None:
        return next((e for e in self.block_errors + self.head_errors if e is not None), None)


def generate(lm: LocalModel) -> Generated:
    """Write every block and aux head of ``lm`` as code; failures are kept, not raised.

    A head that fx traces and that has no hooks of its own becomes a readable class (layers named
    after their type); any other head (a strategy's class with ``local_loss`` or ``after_update``,
    a head fx cannot trace) is rebuilt from its class in :mod:`localize.aux` by ``restore``.
    """
    gen = Generated([], [], [], [])
    for block in lm.blocks:
        try:
            code = module_code(block.module, f"Block{block.index}", _block_doc(lm, block.index))
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
    return gen


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
        f"{localize.__version__}.\n\n"
        f"Inputs: {', '.join(bp.inputs) or '()'}; outputs: {crossing}.\n"
        f"Cost: {bp.cost.params:,} parameters, {bp.cost.flops:,} FLOPs, {bp.cost.activation_bytes:,} activation bytes.\n"
        + (f"Aux head ({lm.plan.aux!r}) reads {bp.primary}.\n" if block.aux is not None else "")
        + head_note
        + f"\nWeights: ``torch.load('weights.pt')['blocks'][{index}]`` (and ``['heads'][{index}]``), loaded with\n"
        f"``load_state_dict(..., assign=True)``.\n"
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


# ------------------------------------------------------------------------------------------ program.py

























