"""``aux="man"``: momentum auxiliary network.

After Su et al., *Momentum Auxiliary Network for Supervised Local Learning*, ECCV 2024 (MAN).
Block ``i``'s auxiliary network starts with two copies of the first layer (repeated unit) of
block ``i + 1``, run side by side on the block's output and summed:

* an EMA copy with no gradient: its weights are **buffers** (not parameters), so no optimizer
  holds them, ``lm.state_dict()`` and ``lm.save`` checkpoints include them, and ``.to()`` moves
  them. After each of block ``i``'s optimizer steps (``after_update``) they move towards the live
  layer: ``theta_ema <- m * theta_ema + (1 - m) * theta``
  (:func:`localize.kernels.ema_update`, one fused launch on GPUs);
* a trainable copy, the paper's "learnable bias", trained by block ``i``'s loss.

Both start as exact copies of the layer (as in the authors' code). A DGL head
(:func:`localize.aux.heads.dgl_head`) follows. Batch-norm statistics are each copy's own (the
EMA covers weights only). When block ``i + 1`` holds no unit, or its first unit cannot run on the
hidden state alone, the aux net is the DGL head only.

Options:
    ``momentum`` (m, float in [0, 1), default 0.995 as in the paper), ``width`` and ``pool``
    (the DGL head's, defaults 128 and 4).

Example:
    >>> import torch, localize
    >>> from localize.zoo import ResNet1d
    >>> net = ResNet1d(1, 10, widths=(8, 16), blocks_per_stage=(2, 2))
    >>> lm = localize.transform(net, blocks=2, example_inputs=(torch.randn(2, 1, 40),), aux="man")
    >>> head = lm.aux["0"]
    >>> head.follows, len(list(head.ema.parameters())), sorted(head.ema_tensors())[:2]
    ('layer2.0', 0, ['bn1.bias', 'bn1.weight'])
    >>> "aux.0.ema.layer.conv1.weight" in lm.state_dict()
    True
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from localize.aux.common import (
    FirstTensor,
    Option,
    adapter,
    is_float,
    is_int,
    layer_copy,
    read_options,
    require_plan,
)
from localize.aux.heads import dgl_head
from localize.aux.registry import AuxSpec, register_aux
from localize.kernels import ema_update
from localize.passes.find_units import find_units, first_unit_of

__all__ = ["man_head", "MANHead", "parameters_to_buffers"]

OPTIONS = {
    "momentum": Option(0.995, is_float(0.0, 1.0, open_hi=True), "a float in [0, 1)"),
    "width": Option(128, is_int(1), "an int >= 1"),
    "pool": Option(4, is_int(1), "an int >= 1"),
}


def parameters_to_buffers(module: nn.Module) -> list[str]:
    """Re-register every parameter of ``module`` as a buffer of the same name (detached, no
    gradient); returns their names, each tensor once (tied weights stay tied)."""
    names: list[str] = []
    seen: dict[int, torch.Tensor] = {}
    for prefix, mod in module.named_modules():
        for name, param in list(mod._parameters.items()):
            if param is None:
                continue
            del mod._parameters[name]
            first = id(param) not in seen
            tensor = seen.setdefault(id(param), param.detach().clone())
            mod.register_buffer(name, tensor)
            if first:
                names.append(f"{prefix}.{name}" if prefix else name)
    return names


class MANHead(nn.Module):
    """``head(ema(x) + bias(x))`` after a shape adapter; ``after_update`` moves ``ema`` towards
    the live layer."""

    def __init__(
        self,
        link: nn.Module,
        ema: FirstTensor,
        bias: nn.Module,
        head: nn.Module,
        target: nn.Module,
        path: str,
        momentum: float,
    ) -> None:
        super().__init__()
        self.link, self.ema, self.bias, self.head = link, ema, bias, head
        self.ema_names = parameters_to_buffers(self.ema.layer)  # paths inside the layer
        self.__dict__["_target"] = target  # the live layer: read, never registered (not trained here)
        self.follows = path
        self.momentum = momentum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.link(x)
        return self.head(self.ema(x) + self.bias(x))

    def ema_tensors(self) -> dict[str, torch.Tensor]:
        """The EMA weights by their name in the followed layer (looked up afresh: ``.to()``
        replaces buffers)."""
        return {name: self.ema.layer.get_buffer(name) for name in self.ema_names}

    @torch.no_grad()
    def after_update(self) -> None:
        ema = self.ema_tensors()
        live = [self._target.get_parameter(name) for name in ema]
        ema_update(list(ema.values()), live, decay=self.momentum)


@register_aux("man")
def man_head(spec: AuxSpec) -> nn.Module:
    opts = read_options("man", spec.options, OPTIONS)
    plan = require_plan(spec, "man")
    dgl_options = {"width": opts["width"], "pool": opts["pool"]}
    unit = first_unit_of(find_units(plan), spec.block + 1)
    ema = layer_copy(plan, unit, reinit=False) if unit is not None else None
    link = (
        adapter(spec.feature_shape, spec.feature_layout, unit.input_shape, unit.input_layout) if ema else None
    )
    if ema is None or link is None:
        return dgl_head(dataclasses.replace(spec, options=dgl_options, context=None))
    bias = FirstTensor(copy.deepcopy(ema.layer))  # trainable: layer_copy leaves requires_grad on
    # the DGL head reads the unit's output: sum of the EMA and the trainable copy
    head = dgl_head(
        dataclasses.replace(
            spec,
            feature_shape=unit.output_shape,
            feature_layout=unit.output_layout,
            options=dgl_options,
            context=None,
        )
    )
    target = plan.model.get_submodule(unit.path)
    return MANHead(link, ema, bias, head, target, unit.path, opts["momentum"])
