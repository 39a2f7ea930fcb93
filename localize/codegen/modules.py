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
import operator
import pprint
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
    "OptimizerSpec",
    "block_source",
    "generate",
    "module_code",
    "program_source",
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
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # load_state_dict(assign=True)


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


def weights_of(gm: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor the generated class loads: state_dict, non-persistent buffers, attribute tensors."""
    weights = {k: v.detach() for k, v in gm.state_dict(keep_vars=True).items()}
    for path, tensor in gm.named_buffers(remove_duplicate=False):
        if path not in weights and not _owned_by_leaf(gm, path):
            weights[path] = tensor.detach()
    if isinstance(gm, fx.GraphModule):
        for path, tensor in _attribute_tensors(gm).items():
            weights.setdefault(path, tensor.detach())
    return weights


def _emit_children(module: nn.Module, expr: str, out: list[str], code: ModuleCode, path: str) -> None:
    for child_name, child in module.named_children():
        child_path = f"{path}.{child_name}" if path else child_name
        if type(child) is nn.Module or isinstance(child, _CONTAINERS):
            out.append(_assign(expr, child_name, f"nn.{type(child).__name__}()"))
            _emit_children(child, expr + _attr(child_name), out, code, child_path)
            continue
        out.append(_assign(expr, child_name, _constructor(child, child_path, code)))


def _constructor(module: nn.Module, path: str, code: ModuleCode) -> str:
    """Source that builds an equal (same repr, same tensor shapes) fresh module."""
    cls = type(module)
    text = repr(module)
    if cls in _INLINE:
        code.inline[cls.__name__] = inspect.getsource(cls)
        namespace: dict[str, Any] = {cls.__name__: cls}
        expr = text
    elif getattr(nn, cls.__name__, None) is cls and "\n" not in text:
        namespace = {"nn": nn, "torch": torch, "inf": math.inf, "nan": math.nan}
        expr = "nn." + text
    else:
        raise CodegenError(
            f"module {path!r} ({cls.__module__}.{cls.__qualname__}) has no one-line constructor to write as code"
        )
    try:
        fresh = eval(expr, namespace)  # noqa: S307 - our own repr of a torch.nn module, checked below
    except Exception as e:  # noqa: BLE001
        raise CodegenError(f"module {path!r}: its repr {text!r} does not construct it ({e})") from None
    same = repr(fresh) == text and {k: tuple(v.shape) for k, v in fresh.state_dict().items()} == {
        k: tuple(v.shape) for k, v in module.state_dict().items()
    }
    if not same:
        raise CodegenError(f"module {path!r}: {expr} does not rebuild {text} with the same tensors")
    return expr


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
    """Every block's and head's class, or why it could not be written (``None`` head: last block)."""

    blocks: list[ModuleCode | None]
    block_errors: list[str | None]
    heads: list[ModuleCode | None]
    head_errors: list[str | None]

    def weights(self, lm: LocalModel) -> dict[str, Any]:
        """The ``weights.pt`` payload: tensors per block and per head, for ``load_state_dict(assign=True)``."""
        return {
            "format": 1,
            "blocks": [
                c.weights if c is not None else weights_of(b.module) for c, b in zip(self.blocks, lm.blocks)
            ],
            "heads": [c.weights if c is not None else None for c in self.heads],
        }

    def first_error(self) -> str | None:
        return next((e for e in self.block_errors + self.head_errors if e is not None), None)


def generate(lm: LocalModel) -> Generated:
    """Write every block and aux head of ``lm`` as a class; failures are kept, not raised."""
    gen = Generated([], [], [], [])
    for block in lm.blocks:
        try:
            gen.blocks.append(module_code(block.module, f"Block{block.index}", _block_doc(lm, block.index)))
            gen.block_errors.append(None)
        except CodegenError as e:
            gen.blocks.append(None)
            gen.block_errors.append(f"block {block.index}: {e}")
        head, error = None, None
        if block.aux is not None:
            hooks = _head_hooks(block.aux)
            try:
                if hooks:
                    raise CodegenError(
                        f"aux strategy {lm.plan.aux!r} gives heads their own {' and '.join(hooks)}, "
                        f"which generated code cannot reproduce without localize"
                    )
                head = module_code(readable_head(block.aux), f"Head{block.index}", _head_doc(lm, block.index))
            except CodegenError as e:
                error = f"aux head of block {block.index}: {e}"
        gen.heads.append(head)
        gen.head_errors.append(error)
    return gen


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


@dataclass(frozen=True)
class OptimizerSpec:
    """The optimizer program.py writes out: ``"sgd"`` or ``"adamw"`` and its hyperparameters."""

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
    """``program.py``: trains ``lm`` from the weights in ``gen.weights(lm)`` (saved as weights.pt)."""
    from localize.cli import train as train_module

    parts = gen or generate(lm)
    if parts.first_error() is not None:
        raise CodegenError(parts.first_error())
    codes = [c for c in parts.blocks + parts.heads if c is not None]
    imports, inline = _header_imports(
        codes, ("import torch.nn.functional as F", "from localize.kernels import adamw_step, sgd_step")
    )
    classes = "\n\n".join(c.source for c in codes)
    k = lm.plan.num_blocks
    inputs = [
        (name, tuple(x.shape[1:]), str(x.dtype).replace("torch.", ""), _high(x))
        for name, x in zip(lm.plan.traced.input_names, example_inputs)
    ]
    helpers = "\n\n".join(inspect.getsource(fn).rstrip() + "\n" for fn in train_module.PROGRAM_HELPERS)
    program_fields = dict(
        version=localize.__version__,
        model_name=type(lm.model).__name__,
        model_file=model_file,
        k=k,
        aux=lm.plan.aux,
        optimizer=optimizer.describe(),
        schedule=str(lm.schedule),
        method=lm.plan.traced.method,
    )
    text = _PROGRAM_HEAD.format(**program_fields)
    text += imports + "\n\n"
    text += (
        f"HERE = os.path.dirname(os.path.abspath(__file__))\n"
        f"MODEL_FILE = {model_file!r}  # for its dataset() and loss_fn; --model-file overrides it\n"
        f"BATCH_SIZE = {batch_size}\n"
        f"SEED = {seed}\n"
        f"# inputs for random data when the model file has no dataset(): (name, shape per sample, dtype, high)\n"
        f"INPUTS = {inputs!r}\n"
        f"OUTPUT_SHAPE = {tuple(lm.plan.output_shape or ())!r}  # of the example batch\n\n\n"
    )
    text += _SECTION.format(title="blocks and aux heads (weights in weights.pt)")
    if inline:
        text += inline + "\n\n"
    text += classes + "\n\n"
    text += _build_source(lm, parts)
    text += _SECTION.format(title="loss and optimizers (localize.runtime.optim's math on localize.kernels)")
    text += _LOSS_AND_OPTIMIZERS
    text += _optimizers_source(lm, optimizer)
    text += _SECTION.format(title=f"the schedule: {lm.schedule}")
    text += _step_source(lm)
    text += _SECTION.format(title="data (the same order as `localize MODEL.py --train`)")
    text += helpers + "\n\n"
    text += _PROGRAM_MAIN
    return text


def _high(x: torch.Tensor) -> int | None:
    if x.is_floating_point() or x.is_complex() or x.numel() == 0:
        return None
    return int(x.max()) + 1


def _build_source(lm: LocalModel, parts: Generated) -> str:
    blocks = ", ".join(c.name + "()" for c in parts.blocks)
    heads = ", ".join(c.name + "()" if c is not None else "None" for c in parts.heads)
    ties = _tie_lines(lm)
    lines = [
        "def build():",
        '    """The blocks and heads with the weights they had when localize compiled the model."""',
        f"    blocks = [{blocks}]",
        f"    heads = [{heads}]",
        '    weights = torch.load(os.path.join(HERE, "weights.pt"))',
        '    for module, tensors in zip(blocks + heads, weights["blocks"] + weights["heads"]):',
        "        if module is not None:",
        "            module.load_state_dict(tensors, assign=True)",
    ]
    if ties:
        lines.append(
            "    # tensors the model shares between blocks: one object, trained by the block that owns it"
        )
        lines += ["    " + t for t in ties]
    lines.append("    return blocks, heads")
    return "\n".join(lines) + "\n\n\n"


def _tie_lines(lm: LocalModel) -> list[str]:
    """Assignments that make tensors the blocks share one object again after loading."""
    owner_of = {id(p): b.index for b in lm.blocks for p in b.params}
    places: dict[int, list[tuple[int, str, bool]]] = {}
    for block in lm.blocks:
        module = block.module
        named = list(module.named_parameters(remove_duplicate=False))
        named += list(module.named_buffers(remove_duplicate=False))
        named += list(_attribute_tensors(module).items())
        for path, t in named:
            places.setdefault(id(t), []).append((block.index, path, isinstance(t, nn.Parameter)))
    lines = []
    for key, where in places.items():
        if len(where) < 2:
            continue
        canonical = next((w for w in where if w[0] == owner_of.get(key)), where[0])
        for place in where:
            if place == canonical:
                continue
            b, path, _ = place
            holder, _, attr = path.rpartition(".")
            target = f"blocks[{b}]" + ("".join(_attr(p) for p in holder.split(".")) if holder else "")
            value = _ref(canonical)
            lines.append(
                f"{target}.{attr} = {value}"
                if _IDENT.match(attr)
                else f"setattr({target}, {attr!r}, {value})"
            )
    return lines


def _ref(place: tuple[int, str, bool]) -> str:
    b, path, is_param = place
    if all(_IDENT.match(p) for p in path.split(".")):
        return f"blocks[{b}].{path}"
    return f"blocks[{b}].get_parameter({path!r})" if is_param else f"blocks[{b}].get_buffer({path!r})"


def _optimizers_source(lm: LocalModel, spec: OptimizerSpec) -> str:
    names: list[list[str]] = []
    for block in lm.blocks:
        where = {id(p): n for n, p in block.module.named_parameters(remove_duplicate=False)}
        own = []
        for p in block.params:
            if not p.requires_grad:
                continue
            if id(p) not in where:
                raise CodegenError(f"block {block.index} trains a parameter its graph does not hold")
            own.append(where[id(p)])
        names.append(own)
    cls = "SGD" if spec.name == "sgd" else "AdamW"
    options = ", ".join(f"{k}={v!r}" for k, v in spec.options.items())
    listing = pprint.pformat(names, width=108, compact=True)
    return (
        "# the model parameters each block trains (its aux head's parameters come on top)\n"
        f"TRAINED = {listing}\n\n\n"
        "def make_optimizers(blocks, heads):\n"
        '    """One optimizer per block, over the parameters it owns and its head\'s."""\n'
        "    optimizers = []\n"
        "    for block, head, names in zip(blocks, heads, TRAINED):\n"
        "        params = [block.get_parameter(n) for n in names]\n"
        "        if head is not None:\n"
        "            params += [p for p in head.parameters() if p.requires_grad]\n"
        f"        optimizers.append({cls}(params, {options}))\n"
        "    return optimizers\n\n\n"
    )


def _step_source(lm: LocalModel) -> str:
    """``train_step``: the schedule as straight-line code over the program graph."""
    program = lm.program
    nodes = list(program.graph.nodes)
    block_node = {lmeta(n)["block"]: n for n in nodes if n.op == "call_module"}
    out = nodes[-1]
    output_leaf = out.args[0][lm.plan.output_index]
    placeholders = [n.name for n in nodes if n.op == "placeholder"]
    lines = [
        "def train_step(blocks, heads, optimizers, loss_fn, inputs, target, step):",
        f'    """One local-learning step; returns the {lm.plan.num_blocks} block losses."""',
    ]
    if placeholders:
        lines.append(f"    {', '.join(placeholders)}{',' if len(placeholders) == 1 else ''} = inputs")
    lines.append(f"    losses = [math.nan] * {lm.plan.num_blocks}")
    done: set[fx.Node] = {n for n in nodes if n.op == "placeholder"}
    position = {n: i for i, n in enumerate(nodes)}

    def emit_until(stop: fx.Node) -> None:
        for n in nodes[: position[stop]]:
            if n in done or n.op in ("call_module", "output"):
                continue
            lines.append("    " + _node_line(n))
            done.add(n)

    for action in lm.schedule:
        b = action.block
        node = block_node[b]
        kind = action.kind.value
        if kind == "F":
            emit_until(node)
            args = ", ".join(_arg(a) for a in node.args)
            lines.append(f"    # {action}: block {b} forward")
            lines.append(f"    {node.name} = blocks[{b}]({args})")
            done.add(node)
        elif kind == "L":
            block = lm.blocks[b]
            if block.aux is not None:
                slot = block.plan.outputs.index(block.plan.primary)
                lines.append(
                    f"    # {action}: aux head {b} on {block.plan.primary}, backward inside block {b}"
                )
                lines.append(f"    loss = loss_fn(heads[{b}]({node.name}[{slot}]), target)")
            else:
                slot = output_leaf.args[1]
                lines.append(f"    # {action}: the model output's loss, backward inside block {b}")
                lines.append(f"    loss = loss_fn({node.name}[{slot}], target)")
            lines.append(f"    losses[{b}] = backward(loss, optimizers[{b}], {b}, step)")
        else:
            lines.append(f"    # {action}: update block {b}, free its graph")
            lines.append(f"    optimizers[{b}].step()")
            lines.append(f"    {node.name} = detached({node.name})")
    lines.append("    return losses")
    return "\n".join(lines) + "\n\n\n"


def _node_line(n: fx.Node) -> str:
    if n.op == "call_function" and n.target is operator.getitem:
        return f"{n.name} = {_arg(n.args[0])}[{_arg(n.args[1])}]"
    if n.op == "call_method":
        rest = ", ".join([_arg(a) for a in n.args[1:]] + [f"{k}={_arg(v)}" for k, v in n.kwargs.items()])
        comment = "  # gradient cut" if lmeta(n).get("cut") else ""
        return f"{n.name} = {_arg(n.args[0])}.{n.target}({rest}){comment}"
    if n.op == "call_function":
        qual = fx.node._get_qualified_name(n.target)
        if not qual.startswith("torch."):
            raise CodegenError(f"the program calls {qual} between blocks, which program.py cannot write")
        args = ", ".join([_arg(a) for a in n.args] + [f"{k}={_arg(v)}" for k, v in n.kwargs.items()])
        return f"{n.name} = {qual}({args})"
    raise CodegenError(f"program node {n.name} ({n.op}) cannot be written as code")


def _arg(a: Any) -> str:
    if isinstance(a, fx.Node):
        return a.name
    if isinstance(a, tuple):
        return "(" + ", ".join(_arg(x) for x in a) + ("," if len(a) == 1 else "") + ")"
    if isinstance(a, list):
        return "[" + ", ".join(_arg(x) for x in a) + "]"
    if isinstance(a, (torch.dtype, torch.device)):
        return (
            "torch." + str(a).replace("torch.", "")
            if isinstance(a, torch.dtype)
            else f"torch.device({str(a)!r})"
        )
    return repr(a)


_SECTION = "# " + "-" * 60 + " {title}\n\n\n"

_PROGRAM_HEAD = '''#!/usr/bin/env python
"""Standalone local-learning program, generated by localize {version} from {model_file}.

{model_name} ({method} trace) cut into {k} gradient-isolated blocks. Each block trains with its own
loss: blocks 0..{k}-2 through an aux head ("{aux}"), the last block through the model's output.
Optimizer per block: {optimizer}. Schedule: {schedule}

It needs torch, localize.kernels (the fused optimizer updates) and the model file (for its
dataset() and loss_fn); the blocks and heads are defined below, their weights are in weights.pt.

    python program.py --steps 100

prints every block's loss at every step, the same numbers as LocalModel.train_step for the same
seed and data order.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys

'''

_LOSS_AND_OPTIMIZERS = '''def cross_entropy_last_dim(pred, target):
    """localize's default loss: cross-entropy over the last dim, leading dims flattened."""
    if target.is_floating_point():
        return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1, pred.shape[-1]))
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1).long())


def backward(loss, optimizer, block, step):
    """Backpropagate a block's loss inside the block; returns its value."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(f"block {block} loss is {value} at step {step}; lower the learning rate")
    optimizer.zero_grad()
    if loss.requires_grad:
        loss.backward()
    return value


def detached(values):
    """A block's outputs without their autograd graph (which is freed)."""
    return tuple(v.detach() if isinstance(v, torch.Tensor) else v for v in values)


class SGD:
    """SGD with momentum (torch.optim.SGD math, dampening 0) on localize.kernels.sgd_step."""

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0, nesterov=False):
        self.params, self.lr, self.momentum = list(params), lr, momentum
        self.weight_decay, self.nesterov = weight_decay, nesterov
        self.buffers = {}

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self):
        params = [p for p in self.params if p.grad is not None]
        if not params:
            return
        buffers = []
        if self.momentum != 0:
            buffers = [self.buffers.setdefault(p, torch.zeros_like(p)) for p in params]
        sgd_step(params, [p.grad for p in params], buffers, lr=self.lr, momentum=self.momentum,
                 weight_decay=self.weight_decay, nesterov=self.nesterov)


class AdamW:
    """Adam with decoupled weight decay (torch.optim.AdamW math) on localize.kernels.adamw_step."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        self.params, self.lr, self.betas = list(params), lr, betas
        self.eps, self.weight_decay = eps, weight_decay
        self.state = {}  # param -> [step, exp_avg, exp_avg_sq]

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self):
        by_step = {}  # parameters that skipped steps (no gradient) keep their own count
        for p in self.params:
            if p.grad is None:
                continue
            state = self.state.setdefault(p, [0, torch.zeros_like(p), torch.zeros_like(p)])
            state[0] += 1
            by_step.setdefault(state[0], []).append(p)
        for step, params in by_step.items():
            adamw_step(params, [p.grad for p in params], [self.state[p][1] for p in params],
                       [self.state[p][2] for p in params], step=step, lr=self.lr, betas=self.betas,
                       eps=self.eps, weight_decay=self.weight_decay)


'''

_PROGRAM_MAIN = """def load_model_file(path):
    spec = importlib.util.spec_from_file_location("localize_model_file", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="training steps (default 100)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model-file", default=MODEL_FILE)
    args = parser.parse_args(argv)

    model_file = load_model_file(args.model_file)
    loss_fn = getattr(model_file, "loss_fn", None) or cross_entropy_last_dim
    blocks, heads = build()
    for module in blocks + heads:
        if module is not None:
            module.to(args.device).train()
    optimizers = make_optimizers(blocks, heads)
    if hasattr(model_file, "dataset"):
        train, _ = model_file.dataset()
    else:
        train, _ = random_dataset(INPUTS, OUTPUT_SHAPE, seed=args.seed)

    torch.manual_seed(args.seed)  # the state `localize --train` starts training from
    batches = iterate_batches(train, args.batch_size, args.seed)
    for step in range(1, args.steps + 1):
        inputs, target = next(batches)
        inputs = tuple(x.to(args.device) for x in inputs)
        losses = train_step(blocks, heads, optimizers, loss_fn, inputs, target.to(args.device), step)
        print(f"step {step}: " + " ".join(repr(loss) for loss in losses), flush=True)


if __name__ == "__main__":
    main()
"""
