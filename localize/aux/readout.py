"""``aux="readout"``: read a block out through the model's own next layers and output head.

Block ``i``'s auxiliary network is the rest of the model, truncated and following it: copies of
the ``depth`` units (repeated layers) after the block, then a copy of the model's output head
(pooling + classifier, or final norm + LM head), all starting as exact copies of the live layers.
Their weights are **buffers**, not parameters: no optimizer holds them and the block's loss trains
the block alone. After each of the block's updates (``after_update``) they move towards the live
layers, ``theta <- m * theta + (1 - m) * theta_live`` (:func:`localize.kernels.ema_update`); with the
default ``momentum=0`` they *are* the live weights of the previous step.

The block's local loss is then the model's own loss with the layers after the ``depth`` following
units skipped: for a residual network (a transformer's residual stream above all) that is the
end-to-end objective minus the later layers' corrections, so its gradient points close to
backprop's (``localize.diagnose`` measures the cosine). It combines the momentum copies of MAN
(Su et al., ECCV 2024; MAN++ extends them to ViTs) with AugLocal's later layers and output head
(Ma et al., ICLR 2024), and reads the residual stream the way the "logit lens" does (nostalgebraist,
2020). ``depth=-1`` follows every later unit: then the local gradient is backprop's through the
previous step's weights, at the cost of running the rest of the model once more per block.

Where the block's output is not shaped like the next unit's input, a trainable adapter (1x1 conv +
batch-norm, or a linear map) sits in between; a unit that cannot run on the hidden state alone (it
needs a mask) ends the copied stack there.

Options:
    ``depth`` (int >= -1, default 1; -1: every later unit), ``momentum`` (m, float in [0, 1),
    default 0.0).

Example:
    >>> import torch, localize
    >>> from localize.zoo import GPT
    >>> net = GPT(vocab_size=30, block_size=16, dim=32, depth=4)
    >>> lm = localize.transform(net, blocks=4, example_inputs=(torch.zeros(2, 16, dtype=torch.long),),
    ...                         aux="readout")
    >>> lm.aux["0"].paths, lm.aux["2"].paths
    (['layers.1', 'norm', 'lm_head'], ['layers.3', 'norm', 'lm_head'])
    >>> sum(p.numel() for p in lm.aux.parameters())  # nothing to train: the heads follow the model
    0
"""

from __future__ import annotations

import torch
from torch import nn

from localize.aux.common import Option, adapter, is_float, is_int, layer_copy, read_options, require_plan
from localize.aux.man import parameters_to_buffers
from localize.aux.registry import AuxSpec, register_aux
from localize.errors import ConfigError
from localize.kernels import ema_update
from localize.passes.find_units import find_units, last_unit_until
from localize.passes.output_head import output_head

__all__ = ["ReadoutHead", "readout_head"]

OPTIONS = {
    "depth": Option(1, is_int(-1), "an int >= -1 (-1: every later unit)"),
    "momentum": Option(0.0, is_float(0.0, 1.0, open_hi=True), "a float in [0, 1)"),
}


class ReadoutHead(nn.Module):
    """``layers(x)``: adapters, copies of later units and of the output head; ``after_update``
    moves the copies towards the live layers they follow."""

    def __init__(
        self, layers: nn.Sequential, follows: list[tuple[str, int, str]], live: list[nn.Module], paths: list[str],
        momentum: float,
    ) -> None:
        super().__init__()
        self.layers = layers
        self.follows = follows  # (buffer path in layers, index of the live module, parameter path in it)
        for i, module in enumerate(live):
            self.__dict__[f"_live_{i}"] = module  # read, never registered: trained by its own block
        self.paths = paths  # the followed modules' paths in the user's model
        self.momentum = momentum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    @torch.no_grad()
    def after_update(self) -> None:
        mine = [self.layers.get_buffer(b) for b, _, _ in self.follows]
        live = [getattr(self, f"_live_{i}").get_parameter(p) for _, i, p in self.follows]
        ema_update(mine, live, decay=self.momentum)


def _follow(copy: nn.Module, live: nn.Module, prefix: str, index: int) -> list[tuple[str, int, str]]:
    """Turn ``copy``'s parameters into buffers that follow ``live``'s parameters of the same path."""
    names = parameters_to_buffers(copy)
    out = []
    for name in names:
        inner = name.removeprefix("layer.")  # FirstTensor wraps a unit as .layer
        try:
            live.get_parameter(inner)
        except AttributeError:
            continue  # not a parameter of the live module (e.g. a constant): stays as copied
        out.append((f"{prefix}.{name}", index, inner))
    return out


@register_aux("readout")
def readout_head(spec: AuxSpec) -> nn.Module:
    opts = read_options("readout", spec.options, OPTIONS)
    plan = require_plan(spec, "readout")
    units = find_units(plan)
    head = output_head(plan, units, reinit=False)
    if head is None:
        raise ConfigError(
            "aux='readout' reads blocks out through the model's output head, but the part after the model's "
            "last layer reads more than that layer's output; use aux='auglocal' or 'dgl'"
        )
    last = last_unit_until(units, spec.block)
    later = units[last + 1 :]
    picked = later if opts["depth"] == -1 else later[: opts["depth"]]
    modules: list[nn.Module] = []
    follows: list[tuple[str, int, str]] = []
    live: list[nn.Module] = []
    paths: list[str] = []
    shape, layout = spec.feature_shape, spec.feature_layout
    for unit in picked:
        layer = layer_copy(plan, unit, reinit=False)
        link = adapter(shape, layout, unit.input_shape, unit.input_layout) if layer is not None else None
        if layer is None or link is None:
            break  # the unit needs more than the hidden state, or cannot read it: stop copying here
        if not isinstance(link, nn.Identity):
            modules.append(link)
        target = plan.model.get_submodule(unit.path)
        follows += _follow(layer, target, str(len(modules)), len(live))
        modules.append(layer)
        live.append(target)
        paths.append(unit.path)
        shape, layout = unit.output_shape, unit.output_layout
    link = adapter(shape, layout, head.input_shape, head.input_layout)
    if link is None:
        raise ConfigError(
            f"aux='readout' cannot feed block {spec.block}'s activation {tuple(shape)} into the model's output "
            f"head (it reads {tuple(head.input_shape)}); use aux='auglocal' or 'dgl'"
        )
    if not isinstance(link, nn.Identity):
        modules.append(link)
    position = str(len(modules))
    names = parameters_to_buffers(head.module)
    owners: dict[str, int] = {}
    for name in names:
        owner, _, param = name.rpartition(".")
        try:
            target = plan.model.get_submodule(owner) if owner else None
            target.get_parameter(param) if target is not None else None
        except AttributeError:
            continue
        if target is None:
            continue
        if owner not in owners:
            owners[owner] = len(live)
            live.append(target)
            paths.append(owner)
        follows.append((f"{position}.{name}", owners[owner], param))
    modules.append(head.module)
    return ReadoutHead(nn.Sequential(*modules), follows, live, paths, opts["momentum"])
