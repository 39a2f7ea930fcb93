"""One module as Python source: a block's ``fx.GraphModule`` as a class, any other module as an expression.

A block is an ``fx.GraphModule``; its code is ``gm.code``. What fx does not write out is how to
*build* the module: :func:`module_code` emits an ``__init__`` that constructs every leaf module from
its constructor (checked: ``repr`` evaluates back to an equal module), or, for a module that has no
such constructor (a class from the model file or torchvision, a strategy's head), rebuilds it from
its class with :func:`localize.codegen.restore.restore`. Tensors are registered empty and filled
from ``weights.pt``.
"""

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

from localize.errors import LocalizeError
from localize.passes.bind_training_mode import TrainingFlag

__all__ = ["CodegenError", "ModuleCode", "module_code", "module_expr", "named_tensors", "weights_of"]

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
    refs: list[tuple[str, nn.Module]] = field(
        default_factory=list
    )  # attribute path -> module it must point at
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
    params = {
        k: None if v is None else (tuple(v.shape), v.dtype, v.requires_grad)
        for k, v in module._parameters.items()
    }
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
        items.append(
            f"{k!r}: None"
            if v is None
            else f"{k!r}: ({v[0]!r}, torch.{str(v[1]).removeprefix('torch.')}, {v[2]})"
        )
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
        return (
            "{"
            + ", ".join(f"{_literal(k, where, code)}: {_literal(v, where, code)}" for k, v in value.items())
            + "}"
        )
    module, qual = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
    if module and qual and "<" not in qual and _importable(module, qual, value):
        code.imports.add("from localize.codegen.restore import ref")
        return f"ref({module + ':' + qual!r})"
    raise CodegenError(
        f"attribute {where!r} holds a {type(value).__name__}, which generated code cannot write"
    )


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
