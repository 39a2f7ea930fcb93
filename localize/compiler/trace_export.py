"""The second tracer: non-strict ``torch.export``, for models torch.fx cannot capture."""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.utils import _pytree as pytree

from localize.compiler.export_modes import reads_training, train_mode_values
from localize.compiler.trace_errors import _first_line
from localize.compiler.traced import Traced, lmeta
from localize.errors import TraceError

__all__ = ["_clean_export_path", "_trace_export"]


def _trace_export(model, sig, example_inputs, example_kwargs, fx_error, seq_dim: int | None = None) -> Traced:
    kwargs = dict(example_kwargs)
    notes = [f"torch.fx could not capture the model ({_first_line(fx_error)}); used torch.export"]
    if "use_cache" in sig.parameters and "use_cache" not in kwargs:
        # Hugging Face caches are not pytree-registered outputs; local training never wants them.
        kwargs["use_cache"] = False
    args = tuple(example_inputs)
    # a dynamic batch dimension, so the traced batch size does not fix the training one
    bound_all = sig.bind_partial(*args, **kwargs).arguments
    def dims(v: Any) -> dict[int, Any] | None:
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            return None
        out = {0: torch.export.Dim.AUTO}
        if seq_dim is not None and -v.dim() <= seq_dim < v.dim():  # chunks: any sequence length too
            out[seq_dim % v.dim()] = torch.export.Dim.AUTO
        return out

    dynamic = {name: pytree.tree_map(dims, value) for name, value in bound_all.items()}
    def export(training: bool) -> fx.GraphModule:
        was_training = model.training
        model.train(training)
        try:
            return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic, strict=False).module()
        finally:
            model.train(was_training)

    gm = export(False)  # dropout/batch-norm become mode-switchable ops in a later pass
    # what forward decides from self.training beyond that: attention dropout, other branches
    mode_warnings = train_mode_values(gm, lambda: export(True)) if reads_training(model) else []
    in_spec, out_spec = gm._in_spec, gm._out_spec
    gm.graph.set_codegen(fx.graph.CodeGen())

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    arg_nodes, kwarg_nodes = pytree.tree_unflatten(placeholders, in_spec)
    bound = sig.bind_partial(*args, **kwargs).arguments
    names = list(bound)
    per_name: dict[str, Any] = dict(zip(names, arg_nodes))
    per_name.update(kwarg_nodes)

    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")

    input_names, constants, fixed_batch = [], {}, {}
    for name, node in per_name.items():
        value = bound[name]
        if isinstance(value, torch.Tensor):
            if not isinstance(node, fx.Node):
                raise TraceError(f"input {name!r} is nested; pass flat tensors as inputs")
            node.name = node.target = name
            input_names.append(name)
            val = node.meta.get("val")
            if val is not None and val.dim() and value.dim() and is_concrete_int(val.shape[0]):
                fixed_batch[name] = int(val.shape[0])
        else:
            constants[name] = value
            for leaf in pytree.tree_leaves(node):
                if isinstance(leaf, fx.Node):
                    if leaf.users:
                        leaf.replace_all_uses_with(value)  # type: ignore[arg-type]
                    gm.graph.erase_node(leaf)
    for p in sig.parameters.values():
        if p.name not in bound and p.default is not inspect.Parameter.empty:
            constants[p.name] = p.default
    order = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    input_names.sort(key=order.index)

    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        path = next(reversed(stack.values()))[0] if stack else ""
        if node.op == "get_attr":
            path = node.target.rpartition(".")[0]
        lmeta(node)["module"] = _clean_export_path(path)
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    out.args = (tuple(out.args[0]),)
    gm.graph.eliminate_dead_code()
    # a plain GraphModule: the exported module class refuses train()/eval()
    gm = fx.GraphModule(gm, gm.graph, type(model).__name__)
    traced = Traced(gm, "export", input_names, constants, out_spec, sig, notes, fixed_batch)
    traced.warnings = mode_warnings
    for message in mode_warnings:
        warnings.warn(f"localize: {message}", RuntimeWarning, stacklevel=4)
    return traced


def _clean_export_path(path: str) -> str:
    # export writes paths like "L['self'].layer1[0]" in some versions and "layer1.0" in others.
    path = path.replace("L['self'].", "").replace("L['self']", "")
    out = []
    i = 0
    while i < len(path):
        c = path[i]
        if c == "[":
            j = path.index("]", i)
            out.append("." + path[i + 1 : j].strip("'\""))
            i = j + 1
        else:
            out.append(c)
            i += 1
    return "".join(out).lstrip(".")
