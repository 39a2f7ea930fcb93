"""``aux="featrecon"``: reconstruct the block's input features and classify with the output head.

After Pang et al., *Local Learning on Transformers via Feature Reconstruction*, 2022. Where InfoPro
reconstructs the raw model input, this head reconstructs the block's own input: the previous
block's output, detached (a fixed target: no gradient reaches the previous block). It suits
transformer-style blocks, whose input and output have the same shape:

* a decoder (:func:`localize.aux.common.reconstruction_decoder`): a per-token MLP for
  channels-last features, InfoPro's resize + conv decoder for channels-first maps; scored by MSE.
  The first block's input is the model input itself: for token ids the decoder predicts the
  tokens (cross-entropy), for images and signals it reconstructs them;
* a fresh copy of the model's own output head (final norm + LM head, or pooling + classifier),
  behind a 1x1 conv / linear adapter when the block's width differs from the head's; a DGL head
  when the model's output head cannot be copied.

Loss: ``recon_weight * recon + cls_weight * loss_fn(head(feature), target)``.

Options:
    ``recon_weight`` (float >= 0, default 1.0), ``cls_weight`` (float >= 0, default 1.0),
    ``width`` (decoder hidden width, default 128).

Example:
    >>> import torch, localize
    >>> from localize.zoo import GPT
    >>> net = GPT(vocab_size=20, block_size=8, dim=16, depth=4, heads=2)
    >>> lm = localize.transform(net, blocks=4, example_inputs=(torch.randint(0, 20, (2, 8)),), aux="featrecon")
    >>> [(h.source, h.decoder.kind) for h in lm.aux.values()]
    [('inputs', 'tokens'), ('block_inputs', 'tokens_dense'), ('block_inputs', 'tokens_dense')]
    >>> [h.target_name for h in lm.aux.values()][1:] == [b.plan.primary for b in lm.blocks[:2]]
    True
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from localize.aux.common import (
    Option,
    ReconstructionHead,
    adapter,
    is_float,
    is_int,
    read_options,
    reconstruction_decoder,
    require_plan,
)
from localize.aux.heads import dgl_head
from localize.aux.registry import AuxSpec, register_aux
from localize.errors import LocalizeError
from localize.passes.find_units import find_units
from localize.passes.infer_layout import input_layout
from localize.passes.model_input import model_input
from localize.passes.output_head import output_head

__all__ = ["featrecon_head", "FeatReconHead"]

OPTIONS = {
    "recon_weight": Option(1.0, is_float(0.0), "a float >= 0"),
    "cls_weight": Option(1.0, is_float(0.0), "a float >= 0"),
    "width": Option(128, is_int(1), "an int >= 1"),
}


class FeatReconHead(ReconstructionHead):
    """Output-head prediction in ``forward``; reconstruction + classification in ``local_loss``."""

    def __init__(
        self,
        decoder: nn.Module,
        classifier: nn.Module,
        source: str,
        index: int,
        target_name: str,
        weights: tuple[float, float],
    ) -> None:
        super().__init__(decoder, classifier, weights)
        self.source = source  # "block_inputs" (an activation) or "inputs" (a model input)
        self.index = index
        self.target_name = target_name

    def reconstruction_target(self, ctx) -> torch.Tensor:
        values = ctx.block_inputs if self.source == "block_inputs" else ctx.inputs
        if len(values) <= self.index:
            raise LocalizeError(
                f"aux='featrecon' reconstructs {self.target_name!r}, but the loss context does not hold it; "
                f"compute its loss through LocalModel.train_step (or pass a LossContext)"
            )
        return values[self.index].detach()


def _classifier(spec: AuxSpec, plan) -> nn.Module:
    head = output_head(plan, find_units(plan))
    if head is not None:
        link = adapter(spec.feature_shape, spec.feature_layout, head.input_shape, head.input_layout)
        if link is not None:
            return nn.Sequential(link, head.module)
    return dgl_head(dataclasses.replace(spec, options={}, context=None))


@register_aux("featrecon")
def featrecon_head(spec: AuxSpec) -> nn.Module:
    opts = read_options("featrecon", spec.options, OPTIONS)
    plan = require_plan(spec, "featrecon")
    from localize.passes.annotate_tensors import value_info
    from localize.passes.infer_layout import infer_layout

    by_name = {n.name: n for n in plan.gm.graph.nodes}
    bp = plan.blocks[spec.block]
    previous = plan.blocks[spec.block - 1].primary if spec.block > 0 else None
    activations = [
        name
        for name in bp.inputs
        if name in by_name
        and by_name[name].op != "placeholder"
        and (info := value_info(by_name[name])) is not None
        and info.is_tensor
        and info.floating
    ]
    if previous in bp.inputs:
        name = previous
    elif activations:
        name = max(activations, key=lambda n: value_info(by_name[n]).nbytes)
    else:
        name = None
    if name is not None:
        node, source, index, vocab = by_name[name], "block_inputs", bp.inputs.index(name), None
        layout = infer_layout(plan.gm, node)
    else:  # the first block reads the model input
        index, node, vocab = model_input(plan, None, "featrecon")
        source, layout = "inputs", input_layout(plan.gm, node)
    decoder = reconstruction_decoder(
        spec.feature_shape,
        spec.feature_layout,
        value_info(node).shape,
        layout,
        vocab=vocab,
        width=opts["width"],
    )
    weights = (opts["recon_weight"], opts["cls_weight"])
    return FeatReconHead(decoder, _classifier(spec, plan), source, index, node.name, weights)
