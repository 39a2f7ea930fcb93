"""What generated code calls to rebuild a module that has no one-line constructor.

A block may hold a leaf module from outside ``torch.nn`` (torchvision's ``StochasticDepth``, a
class of the user's model file) or one whose ``repr`` is no constructor (``nn.TransformerEncoder``);
an aux head is a class of :mod:`localize.aux` with its own ``local_loss``. Generated code writes
such a module as ``restore("package.module:Class", attributes, children, parameters, buffers)``:
the class is imported from where it is defined, its plain attributes are written as literals, its
children recursively, and its tensors are created empty and filled from ``weights.pt`` by
:func:`load_tensors`. Nothing is unpickled: ``weights.pt`` holds tensors only.

Example:
    >>> import torch
    >>> from localize.codegen.restore import load_tensors, restore
    >>> m = restore("torch.nn.modules.linear:Linear", {"in_features": 2, "out_features": 1},
    ...             {}, {"weight": ((1, 2), torch.float32, True), "bias": None}, {})
    >>> load_tensors(m, {"weight": torch.ones(1, 2)})
    >>> m(torch.ones(3, 2)).tolist()
    [[2.0], [2.0], [2.0]]
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import torch
from torch import nn

from localize.errors import LocalizeError

__all__ = ["ref", "restore", "load_tensors", "tie", "mirror", "share"]

TensorSpec = tuple[tuple[int, ...], torch.dtype, bool]  # shape, dtype, requires_grad (or persistent)


def ref(path: str) -> Any:
    """The object ``"package.module:Qual.Name"`` (a class or function), imported where it lives.

    A module already loaded (e.g. the user's model file, loaded by ``program.py`` first) is taken
    from ``sys.modules``.
    """
    module_name, _, qualname = path.partition(":")
    try:
        obj: Any = sys.modules.get(module_name) or importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise LocalizeError(
            f"generated code needs {qualname} from {module_name}, which cannot be imported ({e}); "
            f"run it where the model file and its packages are importable"
        ) from None
    return obj


def restore(
    cls: str,
    attributes: dict[str, Any],
    children: dict[str, nn.Module | None],
    parameters: dict[str, TensorSpec | None],
    buffers: dict[str, TensorSpec | None],
) -> nn.Module:
    """An instance of ``cls`` with these attributes, children and empty tensors (``__init__`` is not run)."""
    klass = ref(cls)
    module = klass.__new__(klass)
    nn.Module.__init__(module)
    module.__dict__.update(attributes)
    for name, child in children.items():
        module._modules[name] = child
    for name, spec in parameters.items():
        module._parameters[name] = None if spec is None else nn.Parameter(torch.empty(spec[0], dtype=spec[1]), spec[2])
    for name, spec in buffers.items():
        module._buffers[name] = None if spec is None else torch.empty(spec[0], dtype=spec[1])
        if spec is not None and not spec[2]:
            module._non_persistent_buffers_set.add(name)
    return module


def load_tensors(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put each tensor of ``weights.pt`` in place by its dotted path: a parameter keeps its
    ``requires_grad``, a buffer stays a buffer, any other tensor attribute is set."""
    for path, value in tensors.items():
        owner, _, name = path.rpartition(".")
        holder = module.get_submodule(owner) if owner else module
        old = holder._parameters.get(name)
        if name in holder._parameters:
            value = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else True)
        tie(module, path, value)


def tie(module: nn.Module, path: str, value: Any) -> None:
    """Make ``module``'s tensor or module attribute at ``path`` *be* ``value`` (one object shared
    by two blocks, a head that follows a layer of the next block, a head's chunk program that runs
    the head's layers)."""
    owner, _, name = path.rpartition(".")
    holder = module.get_submodule(owner) if owner else module
    if name in holder._parameters:
        holder._parameters[name] = value
    elif name in holder._buffers:
        holder._buffers[name] = value
    elif name in holder._modules:
        holder._modules[name] = value
    else:
        holder.__dict__[name] = value  # not registered: a plain attribute stays one


def mirror(children: dict[str, nn.Module | torch.Tensor]) -> nn.Module:
    """A plain module whose submodules, parameters and buffers at the given dotted paths are these
    very objects: a model layer as a view of the block parts that hold it (a split block keeps a
    traced layer's leaves, or an exported layer's tensors, not the layer object)."""
    root = nn.Module()
    for path, child in children.items():
        holder = root
        *owners, name = path.split(".")
        for owner in owners:
            if owner not in holder._modules:
                holder.add_module(owner, nn.Module())
            holder = holder._modules[owner]
        if isinstance(child, nn.Parameter):
            holder.register_parameter(name, child)
        elif isinstance(child, torch.Tensor):
            holder.register_buffer(name, child)
        else:
            holder.add_module(name, child)
    return root


def share(target: nn.Module, source: nn.Module) -> nn.Module:
    """Make ``target``'s children and direct tensors *be* ``source``'s of the same name: a chunk
    program runs its block's very layers (one set of weights, trained by the block's optimizer)."""
    for name in list(target._modules):
        if name in source._modules:
            target._modules[name] = source._modules[name]
    for table in ("_parameters", "_buffers"):
        mine, theirs = getattr(target, table), getattr(source, table)
        for name in list(mine):
            if name in theirs:
                mine[name] = theirs[name]
    return target
