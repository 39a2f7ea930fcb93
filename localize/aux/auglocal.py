"""``aux="auglocal"``: augmented auxiliary networks built from the model's own later layers.

After Ma et al., *Scaling Supervised Local Learning with Augmented Auxiliary Networks*, ICLR 2024
(AugLocal). Block ``i``'s auxiliary network is made of fresh copies (same module types and
configurations, re-initialised, no shared weights) of ``d_i`` layers sampled uniformly from the
layers after block ``i``, followed by a fresh copy of the model's own output head (pooling +
classifier, or final norm + LM head). "Layers" are the model's repeated units
(:func:`localize.aux.common.find_units`).

With ``L`` layers and block ``i`` ending at layer ``l`` (``-1`` when it holds none), the sampled
indices are ``round(l + (L - l - 1) / d * j)`` for ``j = 1..d``, or all later layers when
``d >= L - l - 1``. The depth falls linearly with the block index (the paper's pyramidal depth):
``d_i = max(1, round(D * (1 - i*tau/(K-2)) + i*tau/(K-2)))`` (``d_0 = D`` when K = 2). ``round``
is Python's, as in the authors' code.

Options:
    ``depth`` (D, int >= 1, default 2: the paper's ResNet-32 setting), ``taper`` (tau, float in
    [0, 1], default 0.5; 0 keeps every depth at D).

Where a sampled layer expects another shape than the one before it hands on (a stage with more
channels or a lower resolution), a 1x1 conv + batch-norm (with pooling) or a linear map is put in
between (the paper instead re-sizes the copied layer's first conv). A layer that cannot run on
the hidden state alone (it needs a mask or other inputs) is replaced by a small stand-in of its
shapes (:func:`localize.aux.common.stand_in_layer`), and a model output head that reads more than
the last layer's output by a DGL head.

Example:
    >>> import torch, localize
    >>> from localize.zoo import ResNet1d
    >>> net = ResNet1d(1, 10, widths=(8, 16, 32), blocks_per_stage=(2, 2, 2))
    >>> lm = localize.transform(net, blocks=4, example_inputs=(torch.randn(2, 1, 40),), aux="auglocal")
    >>> [head.layers for head in lm.aux.values()]
    [[3, 5], [4, 5], [5]]
    >>> lm.aux["0"](torch.randn(3, 8, 40)).shape
    torch.Size([3, 10])
"""

from __future__ import annotations

from torch import nn

from localize.aux.common import (
    Option,
    adapter,
    is_float,
    is_int,
    layer_copy,
    read_options,
    require_plan,
    stand_in_layer,
)
from localize.aux.registry import AuxSpec, register_aux
from localize.errors import ConfigError
from localize.passes.find_units import find_units, last_unit_until
from localize.passes.output_head import output_head

__all__ = ["auglocal_head", "depth_schedule", "sample_layers", "AugLocalHead"]

OPTIONS = {
    "depth": Option(2, is_int(1), "an int >= 1"),
    "taper": Option(0.5, is_float(0.0, 1.0), "a float in [0, 1]"),
}


def depth_schedule(depth: int, taper: float, blocks: int) -> list[int]:
    """Aux-net depth of each of the ``blocks - 1`` local blocks (AugLocal's pyramidal depth).

    >>> depth_schedule(4, 0.5, 6)
    [4, 4, 3, 3, 2]
    """
    depths = []
    for i in range(blocks - 1):
        x = i * taper / (blocks - 2) if blocks > 2 else 0.0
        depths.append(max(1, round(depth * (1 - x) + x)))
    return depths


def sample_layers(num_layers: int, last: int, depth: int) -> list[int]:
    """Indices of the layers a block ending at layer ``last`` copies into its aux net.

    >>> sample_layers(16, 3, 3), sample_layers(16, 13, 3)
    ([7, 11, 15], [14, 15])
    """
    later = num_layers - last - 1
    if depth >= later:
        return list(range(last + 1, num_layers))
    return [round(last + later / depth * j) for j in range(1, depth + 1)]


class AugLocalHead(nn.Sequential):
    """The aux net: (adapter, layer copy) per sampled layer, then the output head copy."""

    def __init__(self, modules: list[nn.Module], layers: list[int], paths: list[str]) -> None:
        super().__init__(*modules)
        self.layers = layers  # indices of the copied units
        self.paths = paths  # their module paths in the user's model


@register_aux("auglocal")
def auglocal_head(spec: AuxSpec) -> nn.Module:
    opts = read_options("auglocal", spec.options, OPTIONS)
    plan = require_plan(spec, "auglocal")
    units = find_units(plan)
    if not units:
        raise ConfigError(
            "aux='auglocal' copies the model's repeated layers, but found none (children of nn.Sequential / "
            "nn.ModuleList containers of a repeated type); use aux='dgl' for this model"
        )
    depth = depth_schedule(opts["depth"], opts["taper"], spec.blocks)[spec.block]
    picked = sample_layers(len(units), last_unit_until(units, spec.block), depth)
    modules: list[nn.Module] = []
    shape, layout = spec.feature_shape, spec.feature_layout
    for index in picked:
        unit = units[index]
        in_shape = unit.input_shape or shape
        link = adapter(shape, layout, in_shape, unit.input_layout or layout)
        if link is None:
            raise ConfigError(
                f"aux='auglocal' cannot feed block {spec.block}'s activation {tuple(shape)} into a copy of "
                f"{unit.path!r} (it reads {tuple(in_shape)}); use aux='dgl'"
            )
        layer = layer_copy(plan, unit) or stand_in_layer(in_shape, unit.output_shape, unit.output_layout)
        modules += [m for m in (link, layer) if not isinstance(m, nn.Identity)]
        shape, layout = unit.output_shape, unit.output_layout
    head = output_head(plan, units)
    if head is None:
        from localize.aux.heads import dgl_head

        tail = AuxSpec(spec.block, spec.blocks, shape, layout, spec.output_shape, spec.output_layout)
        modules.append(dgl_head(tail))
    else:
        link = adapter(shape, layout, head.input_shape, head.input_layout)
        if link is None:
            raise ConfigError(
                f"aux='auglocal' cannot feed {tuple(shape)} into a copy of the model's output head "
                f"(it reads {tuple(head.input_shape)}); use aux='dgl'"
            )
        modules += [m for m in (link, head.module) if not isinstance(m, nn.Identity)]
    return AugLocalHead(modules, picked, [units[i].path for i in picked])
