"""``aux="readout"``: read a block out through the model's own next layers and output head.

Block ``i``'s auxiliary network is the rest of the model, truncated: copies of the ``depth`` units
(repeated layers) after the block, then a copy of the model's output head (pooling + classifier, or
final norm + LM head), all starting as **exact copies of the live layers** (not re-initialised). The
block's local loss is then the model's own loss with the layers beyond ``depth`` skipped; for a
residual network (a transformer's residual stream above all) that is the end-to-end objective minus
the later layers' corrections, so at the start its gradient is close to backprop's
(``localize.diagnose`` measures the cosine: 0.95-1.0 on a 4-layer GPT at K=4, against about 0 for
dgl, auglocal and man).

By default (``follow=False``) the copies are trainable parameters of the head, trained by the
block's loss from their live starting point. With ``follow=True`` their weights are **buffers** that
follow the live layers after each of the block's updates, ``theta <- m * theta + (1 - m) *
theta_live`` (:func:`localize.kernels.ema_update`; ``momentum=0``: the previous step's live weights),
and the block's loss trains the block alone; such a head reads layers of later blocks, so it cannot
run in a pipeline.

It takes AugLocal's later layers and output head (Ma et al., ICLR 2024) but keeps their trained
weights, as MAN's momentum copies do (Su et al., ECCV 2024; MAN++ extends them to ViTs), and reads
the residual stream the way the "logit lens" does (nostalgebraist, 2020). ``depth=-1`` copies every
later unit. On the character LM at K=4 the default (depth 2, trainable copies) came within 0.3
points of backprop where the published strategies trail by 1.6 (docs/strategies.md); a deeper model
needs more copies: on an 8-layer GPT ``depth=4`` came within 0.2 (K=4) and 0.4 (K=8) points, where
depth 2 trails by 0.9 and 1.35.

Where the block's output is not shaped like the next unit's input, a trainable adapter (1x1 conv +
batch-norm, or a linear map) sits in between; a unit that cannot run on the hidden state alone (it
needs a mask) ends the copied stack; a model whose output head reads more than its last unit's
output gets a DGL head after the copies.

Options:
    ``depth`` (int >= -1, default 2; -1: every later unit), ``follow`` (bool, default False),
    ``momentum`` (m, float in [0, 1), default 0.0; with ``follow=True``).

Example:
    >>> import torch, localize
    >>> from localize.zoo import GPT
    >>> net = GPT(vocab_size=30, block_size=16, dim=32, depth=4)
    >>> lm = localize.transform(net, blocks=4, example_inputs=(torch.zeros(2, 16, dtype=torch.long),),
    ...                         aux="readout")
    >>> lm.aux["0"].paths, lm.aux["2"].paths
    (['layers.1', 'layers.2', 'norm', 'lm_head'], ['layers.3', 'norm', 'lm_head'])
    >>> copy = lm.aux["0"].layers[0].layer  # trainable, starting from the live layer's weights
    >>> torch.equal(copy.attn.qkv.weight, net.layers[1].attn.qkv.weight), copy.attn.qkv.weight.requires_grad
    (True, True)
"""

from __future__ import annotations

import torch
from torch import nn

from localize.aux.common import Option, adapter, is_float, is_int, layer_copy, read_options, require_plan
from localize.aux.heads import dgl_head
from localize.aux.man import parameters_to_buffers
from localize.aux.registry import AuxSpec, register_aux
from localize.errors import ConfigError
from localize.kernels import ema_update
from localize.passes.find_units import find_units, last_unit_until
from localize.passes.output_head import output_head

__all__ = ["ReadoutHead", "readout_head"]

OPTIONS = {
    "depth": Option(2, is_int(-1), "an int >= -1 (-1: every later unit)"),
    "momentum": Option(0.0, is_float(0.0, 1.0, open_hi=True), "a float in [0, 1)"),
    "follow": Option(False, lambda v: isinstance(v, bool), "True or False"),
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
        if opts["follow"]:
            target = plan.model.get_submodule(unit.path)
            follows += _follow(layer, target, str(len(modules)), len(live))
            live.append(target)
        modules.append(layer)
        paths.append(unit.path)
        shape, layout = unit.output_shape, unit.output_layout
    if head is None:  # the part after the last unit reads more than its output: a DGL head instead
        tail = AuxSpec(spec.block, spec.blocks, shape, layout, spec.output_shape, spec.output_layout)
        modules.append(dgl_head(tail))
        return ReadoutHead(nn.Sequential(*modules), follows, live, paths, opts["momentum"])
    link = adapter(shape, layout, head.input_shape, head.input_layout)
    if link is None:
        raise ConfigError(
            f"aux='readout' cannot feed block {spec.block}'s activation {tuple(shape)} into the model's output "
            f"head (it reads {tuple(head.input_shape)}); use aux='auglocal' or 'dgl'"
        )
    if not isinstance(link, nn.Identity):
        modules.append(link)
    position = str(len(modules))
    names = [n for n, _ in head.module.named_parameters()]
    if opts["follow"]:
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
            paths.append(owner)
            if opts["follow"]:
                live.append(target)
        if opts["follow"]:
            follows.append((f"{position}.{name}", owners[owner], param))
    modules.append(head.module)
    return ReadoutHead(nn.Sequential(*modules), follows, live, paths, opts["momentum"])
