"""``aux="infopro"``: reconstruct the model input and classify.

After Wang et al., *Revisiting Locally Supervised Learning: an Alternative to End-to-end
Training*, ICLR 2021 (InfoPro). Block ``i``'s head has two branches on the block's output:

* a decoder that reconstructs the model's input (:func:`localize.aux.common.reconstruction_decoder`:
  for images and signals InfoPro's (bi)linear upsampling + conv3x3-BN-ReLU + conv3x3; for token
  ids a linear map to the vocabulary, scored by cross-entropy, i.e. the block predicts its input
  tokens; otherwise pooled MLP). Float inputs are scored by MSE (``recon_loss="mse"``) or, for
  inputs in [0, 1] as in the paper's images, by BCE (``recon_loss="bce"``);
* a DGL classifier head (:func:`localize.aux.heads.dgl_head`) scored by the transform's loss.

The loss is ``lambda1 * recon + lambda2 * cls``, each lambda interpolated linearly from the first
local block (``recon_weights[0]``, ``cls_weights[0]``) to the last one (``[1]``): block ``i`` of
``K`` uses ``w[0] * (1 - r) + w[1] * r`` with ``r = i / (K - 2)`` (``r = 0`` when K = 2), as the
authors' code does. The first-block defaults are the paper's ResNet-32 / CIFAR-10 (K = 16)
command (``--ixx_1 5 --ixy_1 0.5``); that command ends at ``(0, 0)``, which leaves the last local
block without any loss, so localize ends at ``(0, 1)`` instead (pure classification, the paper's
"progressively discard task-irrelevant information"): ``recon_weights=(5.0, 0.0)``,
``cls_weights=(0.5, 1.0)``.

Options:
    ``recon_weights``, ``cls_weights`` (pairs of floats >= 0), ``recon_loss`` (``"mse"`` or
    ``"bce"``), ``input`` (name of the forward argument to reconstruct; default the first float
    input, else the first token ids), ``decoder_width`` (conv / MLP width of the decoder, default
    12 as in the paper), ``width`` and ``pool`` (the classifier's, defaults 128 and 4).

The head's ``forward`` gives the classifier's prediction; its ``local_loss`` reads the model's
inputs from the :class:`~localize.runtime.model.LossContext` that ``train_step`` passes.

Example:
    >>> import torch, localize
    >>> from localize.zoo import ResNet1d
    >>> net = ResNet1d(1, 10, widths=(8, 16), blocks_per_stage=(2, 2))
    >>> lm = localize.transform(net, blocks=2, example_inputs=(torch.randn(2, 1, 40),), aux="infopro")
    >>> head = lm.aux["0"]
    >>> head.input_name, head.decoder.kind, head.weights
    ('x', 'conv', (5.0, 0.5))
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from localize.aux.common import (
    Option,
    ReconstructionHead,
    is_float,
    is_int,
    is_pair,
    read_options,
    reconstruction_decoder,
    require_plan,
)
from localize.aux.heads import dgl_head
from localize.aux.registry import AuxSpec, register_aux
from localize.errors import LocalizeError
from localize.passes.infer_layout import input_layout
from localize.passes.model_input import model_input

__all__ = ["infopro_head", "InfoProHead", "interpolated"]

OPTIONS = {
    "recon_weights": Option((5.0, 0.0), is_pair(is_float(0.0)), "a pair of floats >= 0 (first, last block)"),
    "cls_weights": Option((0.5, 1.0), is_pair(is_float(0.0)), "a pair of floats >= 0 (first, last block)"),
    "recon_loss": Option("mse", lambda v: v in ("mse", "bce"), "'mse' or 'bce'"),
    "input": Option(
        None, lambda v: v is None or isinstance(v, str), "None or the name of a forward argument"
    ),
    "decoder_width": Option(12, is_int(1), "an int >= 1"),
    "width": Option(128, is_int(1), "an int >= 1"),
    "pool": Option(4, is_int(1), "an int >= 1"),
}


def interpolated(pair: tuple[float, float], block: int, blocks: int) -> float:
    """``pair[0]`` at the first local block, ``pair[1]`` at the last (block ``blocks - 2``).

    >>> [interpolated((5.0, 1.0), i, 6) for i in range(5)]
    [5.0, 4.0, 3.0, 2.0, 1.0]
    """
    t = block / (blocks - 2) if blocks > 2 else 0.0
    return pair[0] * (1 - t) + pair[1] * t


class InfoProHead(ReconstructionHead):
    """Classifier prediction in ``forward``; ``recon * lambda1 + cls * lambda2`` in ``local_loss``."""

    def __init__(
        self,
        decoder: nn.Module,
        classifier: nn.Module,
        input_index: int,
        input_name: str,
        weights: tuple[float, float],
    ) -> None:
        super().__init__(decoder, classifier, weights)  # (lambda1 reconstruction, lambda2 classification)
        self.input_index, self.input_name = input_index, input_name

    def reconstruction_target(self, ctx) -> torch.Tensor:
        if len(ctx.inputs) <= self.input_index:
            raise LocalizeError(
                f"aux='infopro' reconstructs model input {self.input_name!r}, but the loss context holds no "
                f"model inputs; compute its loss through LocalModel.train_step (or pass a LossContext)"
            )
        return ctx.inputs[self.input_index]


@register_aux("infopro")
def infopro_head(spec: AuxSpec) -> nn.Module:
    opts = read_options("infopro", spec.options, OPTIONS)
    plan = require_plan(spec, "infopro")
    from localize.passes.annotate_tensors import value_info

    index, node, vocab = model_input(plan, opts["input"], "infopro")
    decoder = reconstruction_decoder(
        spec.feature_shape,
        spec.feature_layout,
        value_info(node).shape,
        input_layout(plan.gm, node),
        vocab=vocab,
        width=opts["decoder_width"],
        loss=opts["recon_loss"],
    )
    classifier = dgl_head(
        dataclasses.replace(spec, options={"width": opts["width"], "pool": opts["pool"]}, context=None)
    )
    weights = (
        interpolated(opts["recon_weights"], spec.block, spec.blocks),
        interpolated(opts["cls_weights"], spec.block, spec.blocks),
    )
    return InfoProHead(decoder, classifier, index, node.target, weights)
