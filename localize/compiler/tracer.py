"""Capture a model as a flat ``torch.fx.GraphModule``.

``torch.fx.symbolic_trace`` is tried first (it keeps leaf modules as ``call_module`` nodes, so the
graph reads like the model). Models it cannot capture (Hugging Face transformers, code that reads
tensor shapes) are exported with non-strict ``torch.export`` with a dynamic batch dimension. Either
way the result is normalised to one form:

* one placeholder per tensor input, named after the ``forward`` parameter;
* the output node returns a flat tuple of leaves; ``Traced.out_spec`` rebuilds the structure
  (tuple, dict, ``ModelOutput``) the model returns;
* every node carries ``node.meta["localize"]["module"]``: the path of the module that owns it.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from localize.compiler.layer_stacks import LAYER_STACKS
from localize.compiler.trace_errors import _both_failed, _first_line, _user_line
from localize.compiler.trace_export import _trace_export
from localize.compiler.traced import Traced, lmeta
from localize.errors import ConfigError, TraceError

__all__ = ["ModeDependentError", "Traced", "trace", "lmeta"]







def trace(
    model: torch.nn.Module,
    example_inputs: tuple | None = None,
    example_kwargs: dict[str, Any] | None = None,
    seq_dim: int | None = None,
) -> Traced:
    """Capture ``model`` as a flat GraphModule (fx first, non-strict ``torch.export`` second).

    With ``seq_dim`` (chunking along the sequence), an export keeps that dim of the inputs dynamic
    too, so the graph runs on any sequence length (fx graphs always do).

    Example:
        >>> import torch, localize
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> t = localize.trace(net, (torch.randn(3, 4),))
        >>> t.method, t.input_names
        ('fx', ['input'])
    """
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    sig = inspect.signature(model.forward)
    example_kwargs = dict(example_kwargs or {})
    if example_inputs is not None and not isinstance(example_inputs, tuple):
        if isinstance(example_inputs, list):
            example_inputs = tuple(example_inputs)
        else:
            example_inputs = (example_inputs,)
    _check_kwargs(model, sig, example_kwargs)
    _check_flat(model, sig, example_inputs, example_kwargs)

    fx_error: BaseException | None = None
    try:
        traced = _trace_fx(model, sig, example_inputs, example_kwargs)
    except ModeDependentError:
        raise  # export would freeze eval mode silently
    except Exception as e:  # noqa: BLE001 - any failure sends us to export
        fx_error = e
    else:
        return traced

    if example_inputs is None and not example_kwargs:
        raise TraceError(
            f"torch.fx cannot capture {type(model).__name__} ({_first_line(fx_error)}){_user_line(fx_error)}; "
            "torch.export can be tried, but it needs example inputs: pass example_inputs=(x,) to transform()"
        )
    try:
        return _trace_export(model, sig, example_inputs or (), example_kwargs, fx_error, seq_dim)
    except TraceError:
        raise
    except Exception as export_error:  # noqa: BLE001
        raise _both_failed(model, fx_error, export_error) from None


def _check_flat(model: torch.nn.Module, sig: inspect.Signature, args: tuple | None, kwargs: dict[str, Any]) -> None:
    """A list or dict of tensors as one argument would be baked into the graph as constants."""
    try:
        bound = sig.bind_partial(*(args or ()), **kwargs).arguments
    except TypeError:
        return  # reported with the full signature when the inputs are bound
    values: list[tuple[str, Any]] = []
    for name, value in bound.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:  # *args, **kwargs: each item is its own argument
            values += [(f"{name}[{i}]", v) for i, v in enumerate(value)]
        elif kind is inspect.Parameter.VAR_KEYWORD:
            values += list(value.items())
        else:
            values.append((name, value))
    for name, value in values:
        if isinstance(value, torch.Tensor) or not any(isinstance(v, torch.Tensor) for v in pytree.tree_leaves(value)):
            continue
        raise TraceError(
            f"{type(model).__name__}.forward takes {name!r} as a {type(value).__name__} of tensors; localize "
            f"needs every tensor input as its own argument. What to do: wrap the model, e.g. "
            f"`forward(self, a, b): return model([a, b])`, and transform the wrapper"
        )


def _check_kwargs(model: torch.nn.Module, sig: inspect.Signature, kwargs: dict[str, Any]) -> None:
    takes_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    for name in kwargs:
        if name not in sig.parameters and not takes_var_kw:
            raise ConfigError(
                f"example_kwargs names {name!r}, but {type(model).__name__}.forward takes "
                f"{list(sig.parameters)}; use one of those names"
            )


# ---------------------------------------------------------------------------------------------------------
# torch.fx


class _PathTracer(fx.Tracer):
    """symbolic_trace's tracer, recording source lines for error messages.

    Besides torch.nn's own layers it keeps as leaves (``call_module`` nodes that run the real
    module) the modules in ``leaves`` and every parameter-free module whose ``forward`` reads
    ``self.training`` (stochastic depth, custom dropout): tracing through them would freeze
    whichever branch the mode at trace time takes.
    """

    def __init__(self, leaves: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.record_stack_traces = True
        self.leaves = leaves

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaves:
            return True
        if type(m) in LAYER_STACKS:
            return False  # traced layer by layer (call_module below)
        if module_qualified_name and _is_mode_switch(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


    def call_module(self, m: torch.nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        stack = LAYER_STACKS.get(type(m))
        if stack is not None:  # nn.TransformerEncoder & co: their layers, one leaf each
            forward = lambda *a, **k: stack(m, *a, **k)  # noqa: E731
        return super().call_module(m, forward, args, kwargs)


_READS_TRAINING: dict[type, bool] = {}


def _reads_training(module: torch.nn.Module) -> bool:
    """Whether the module's own ``forward`` source reads ``.training`` (cached per class)."""
    cls = type(module)
    if cls not in _READS_TRAINING:
        try:
            source = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            source = ""
        _READS_TRAINING[cls] = ".training" in source
    return _READS_TRAINING[cls]


def _is_mode_switch(module: torch.nn.Module) -> bool:
    if type(module).__module__.startswith("torch."):
        return False
    return _reads_training(module) and next(module.parameters(), None) is None


def _trace_fx(model, sig, example_inputs, example_kwargs) -> Traced:
    params = [
        p
        for p in sig.parameters.values()
        if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    provided: dict[str, Any] = {}
    if example_inputs is not None:
        if len(example_inputs) > len(params):
            raise ConfigError(
                f"{len(example_inputs)} example inputs given, but forward takes {len(params)} positional arguments"
            )
        provided.update({p.name: v for p, v in zip(params, example_inputs)})
    provided.update(example_kwargs)
    placeholders, constants = [], {}
    for p in params:
        if p.name in provided:
            value = provided[p.name]
            if isinstance(value, torch.Tensor):
                placeholders.append(p.name)
            else:
                constants[p.name] = value
        elif example_inputs is None and p.default is inspect.Parameter.empty:
            placeholders.append(p.name)
        elif p.default is not inspect.Parameter.empty:
            constants[p.name] = p.default
        else:
            raise ConfigError(f"forward argument {p.name!r} has no default: pass it in example_inputs")

    gm = _capture_both_modes(model, constants, placeholders)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            lmeta(node)["module"] = node.target
        else:
            stack = node.meta.get("nn_module_stack") or {}
            lmeta(node)["module"] = next(reversed(stack.values()))[0] if stack else ""
    out_spec = _flatten_output(gm)
    gm.recompile()
    return Traced(gm, "fx", placeholders, constants, out_spec, sig)


def _capture(model, constants, placeholders, leaves: frozenset[str]) -> fx.GraphModule:
    tracer = _PathTracer(leaves)
    graph = tracer.trace(model, concrete_args=dict(constants))
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    _drop_constant_placeholders(gm, placeholders)
    return gm


class ModeDependentError(TraceError):
    """forward takes another path in train() than in eval() at a place no leaf module can hold."""


def _capture_both_modes(model, constants, placeholders) -> fx.GraphModule:
    """Trace in train() and in eval() mode, so that no Python branch on ``self.training`` is frozen.

    Where the two graphs differ only in a bool argument (``F.dropout(x, p, self.training)``) the
    argument is recorded in ``meta["localize"]["mode_args"]`` and later bound to the block's
    training flag (``bind_training_mode``). Where they differ in structure (``if self.training:``)
    the module that branches becomes a leaf, so the real module runs and follows ``train()``; a
    branch in the top-level ``forward`` cannot be kept and raises :class:`ModeDependentError`.
    """
    modes = {m: m.training for m in model.modules()}
    leaves: frozenset[str] = frozenset()
    try:
        while True:
            graphs = {}
            for mode in (True, False):
                model.train(mode)
                graphs[mode] = _capture(model, constants, placeholders, leaves)
            flags, differ = _mode_difference(graphs[True], graphs[False])
            if differ is None:
                break
            path = _branching_module(model, differ, leaves)
            if path is None:
                model.train(True)
                _, noise = _mode_difference(graphs[True], _capture(model, constants, placeholders, leaves))
                if noise is not None:  # the trace itself is not repeatable: not a matter of mode
                    flags = []
                    break
                raise _mode_error(model)
            leaves = leaves | {path}
    finally:
        for m, mode in modes.items():
            m.training = mode
    gm = graphs[model.training]
    by_name = {n.name: n for n in gm.graph.nodes}
    for name, key, in_train in flags:
        lmeta(by_name[name]).setdefault("mode_args", []).append((key, not in_train))
    return gm


def _mode_difference(train: fx.GraphModule, evaluate: fx.GraphModule):
    """(bool arguments that follow the mode, first pair of nodes that differ otherwise or None)."""
    flags: list[tuple[str, tuple[str, int | str], bool]] = []
    a, b = list(train.graph.nodes), list(evaluate.graph.nodes)
    for x, y in zip(a, b):
        if (x.op, x.target, x.name, len(x.args), list(x.kwargs)) != (y.op, y.target, y.name, len(y.args), list(y.kwargs)):
            return flags, (x, y)
        pairs = [(("args", i), u, v) for i, (u, v) in enumerate(zip(x.args, y.args))]
        pairs += [(("kwargs", k), x.kwargs[k], y.kwargs[k]) for k in x.kwargs]
        for key, u, v in pairs:
            if _same_arg(u, v):
                continue
            if type(u) is bool and type(v) is bool:
                flags.append((x.name, key, u))
                continue
            return flags, (x, y)
    if len(a) != len(b):
        n = min(len(a), len(b))
        return flags, (a[min(n, len(a) - 1)], b[min(n, len(b) - 1)])
    return flags, None


def _same_arg(u: Any, v: Any) -> bool:
    u, v = fx.node.map_arg(u, lambda n: n.name), fx.node.map_arg(v, lambda n: n.name)
    try:
        same = u == v
    except Exception:  # noqa: BLE001 - values without a usable ==
        return u is v
    return same if isinstance(same, bool) else u is v


def _branching_module(model: torch.nn.Module, differ: tuple[fx.Node, fx.Node], leaves: frozenset[str]) -> str | None:
    """The innermost module around the first difference that can become a leaf (prefer one whose
    forward reads ``.training``); None when the difference is in the top-level forward."""
    paths: list[str] = []
    for node in differ:
        stack = node.meta.get("nn_module_stack") or {}
        paths += [path for path, _ in reversed(list(stack.values())) if path and path not in leaves]
    modules = dict(model.named_modules())
    paths = [p for p in paths if p in modules]
    reading = [p for p in paths if _reads_training(modules[p])]
    return (reading or paths or [None])[0]


def _mode_error(model: torch.nn.Module) -> ModeDependentError:
    return ModeDependentError(
        f"{type(model).__name__}.forward computes a different graph in train() than in eval()"
        f"{_training_line(model)}: a Python branch on self.training at the top level cannot follow "
        f"LocalModel.train()/eval(). What to do: move the mode-dependent part into a submodule (e.g. a "
        f"DropPath module, which localize keeps whole), use nn.Dropout / F.dropout(x, p, self.training), "
        f"or return the same structure in both modes"
    )


def _training_line(module: torch.nn.Module) -> str:
    """' at file.py:12: `if self.training:`' for the first line of forward that reads the mode."""
    try:
        lines, start = inspect.getsourcelines(type(module).forward)
        path = inspect.getsourcefile(type(module).forward)
    except (OSError, TypeError):
        return ""
    for i, line in enumerate(lines):
        if ".training" in line:
            return f" at {path}:{start + i}: `{line.strip()}`"
    return ""


def _drop_constant_placeholders(gm: fx.GraphModule, keep: list[str]) -> None:
    """fx turns concrete args into placeholders guarded by asserts; drop both (the value is fixed)."""
    for node in list(gm.graph.nodes):
        if node.op != "placeholder" or node.target in keep:
            continue
        for user in _all_users(node)[::-1]:
            if user.users:
                continue
            gm.graph.erase_node(user)
        if node.users:
            raise TraceError(f"constant argument {node.target!r} is used as a value in the graph")
        gm.graph.erase_node(node)
    # fx names placeholders after forward's parameters; make sure order matches `keep`.
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    if names != keep:
        raise TraceError(f"unexpected placeholders {names}, expected {keep}")


def _all_users(node: fx.Node) -> list[fx.Node]:
    seen: dict[fx.Node, None] = {}
    stack = list(node.users)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen[n] = None
            stack.extend(n.users)
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(seen, key=order.__getitem__)


def _flatten_output(gm: fx.GraphModule) -> pytree.TreeSpec:
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    leaves, spec = pytree.tree_flatten(out.args[0])
    out.args = (tuple(leaves),)
    return spec


# ---------------------------------------------------------------------------------------------------------
# torch.export






# ---------------------------------------------------------------------------------------------------------
# error reporting









