"""What the tracer returns (:class:`Traced`) and where localize keeps its facts on a node (:func:`lmeta`)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from localize.errors import ConfigError

__all__ = ["Traced", "lmeta"]


def lmeta(node: fx.Node) -> dict[str, Any]:
    """The ``node.meta["localize"]`` dict where every pass keeps its facts about a node."""
    return node.meta.setdefault("localize", {})


@dataclass
class Traced:
    """A captured model: a flat GraphModule plus what is needed to call it like the model."""

    gm: fx.GraphModule
    method: str  # "fx" or "export"
    input_names: list[str]  # forward parameters that are graph placeholders, in placeholder order
    constants: dict[str, Any]  # forward parameters bound to a fixed value while tracing
    out_spec: pytree.TreeSpec  # structure of the model's output; leaves are the output node's args
    signature: inspect.Signature
    notes: list[str] = field(default_factory=list)
    fixed_batch: dict[str, int] = field(default_factory=dict)  # inputs whose batch dim export fixed
    warnings: list[str] = field(default_factory=list)  # ways train() differs from the traced graph

    def bind(self, args: tuple, kwargs: dict) -> list[Any]:
        """Map a call ``model(*args, **kwargs)`` onto the graph's placeholders."""
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as e:
            raise ConfigError(
                f"inputs do not match forward{self.signature}: {e}; pass them as the model expects"
            ) from None
        values = []
        for name in self.input_names:
            if name not in bound.arguments:
                default = self.signature.parameters[name].default
                if default is inspect.Parameter.empty:
                    raise ConfigError(f"missing input {name!r}: forward{self.signature} needs it")
                values.append(default)
            else:
                values.append(bound.arguments[name])
            fixed = self.fixed_batch.get(name)
            value = values[-1]
            if (
                fixed is not None
                and isinstance(value, torch.Tensor)
                and value.dim()
                and value.shape[0] != fixed
            ):
                raise ConfigError(
                    f"input {name!r} has batch size {value.shape[0]}, but the exported graph has its batch size "
                    f"fixed at {fixed}: the model's code turns a size into a Python number (e.g. int(x.shape[0]) "
                    f"or a shape-dependent branch). Train with batch size {fixed}, or keep sizes symbolic "
                    f"(x.shape[0] without int(), reshape(-1, ...))"
                )
        for name in bound.arguments:
            if name not in self.input_names and name not in self.constants:
                raise ConfigError(
                    f"input {name!r} was not given when the model was traced, so the graph has no slot "
                    f"for it; pass it in example_inputs/example_kwargs to transform()"
                )
        return values

    def unflatten(self, leaves: list[Any]) -> Any:
        return pytree.tree_unflatten(list(leaves), self.out_spec)

    def call_model(self, model: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        """``model(*args, **kwargs)`` as traced: parameters bound to a constant while tracing get it
        again (the untransformed model, e.g. for backprop beside the blocks)."""
        kwargs = dict(kwargs or {})
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        return model(*args, **kwargs, **{k: v for k, v in self.constants.items() if k not in bound})


def output_leaf(out: Any, index: int) -> Any:
    """Leaf ``index`` of a model output (tensor, tuple, dict, ModelOutput): what the loss reads."""
    return pytree.tree_leaves(out)[index]
