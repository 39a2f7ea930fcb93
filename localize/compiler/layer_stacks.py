"""torch.nn's layer stacks, traced layer by layer so that cuts can fall between their layers.

``nn.TransformerEncoder``, ``nn.TransformerDecoder`` and ``nn.Transformer`` are torch.nn modules, so
torch.fx would keep each as one leaf: a 6-layer encoder would be one unsplittable block. Their own
``forward`` cannot be traced (it inspects its inputs to pick a fast path), so the tracer runs these
functions instead: the same layers, in the same order, with the same masks, each layer a leaf that
runs the real layer (its own fast path included). They compute what the modules compute, with one
exception: in eval mode without gradients and with a ``src_key_padding_mask``, the encoder's
nested-tensor fast path writes zeros at the padded positions, where these give the layers' values;
every unpadded position is the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["LAYER_STACKS"]


def _encoder(enc: nn.TransformerEncoder, src, mask=None, src_key_padding_mask=None, is_causal=None):
    output = src
    for layer in enc.layers:
        output = layer(output, src_mask=mask, is_causal=bool(is_causal), src_key_padding_mask=src_key_padding_mask)
    return enc.norm(output) if enc.norm is not None else output


def _decoder(
    dec: nn.TransformerDecoder,
    tgt,
    memory,
    tgt_mask=None,
    memory_mask=None,
    tgt_key_padding_mask=None,
    memory_key_padding_mask=None,
    tgt_is_causal=None,
    memory_is_causal=False,
):
    output = tgt
    for layer in dec.layers:
        output = layer(
            output,
            memory,
            tgt_mask=tgt_mask,
            memory_mask=memory_mask,
            tgt_key_padding_mask=tgt_key_padding_mask,
            memory_key_padding_mask=memory_key_padding_mask,
            tgt_is_causal=bool(tgt_is_causal),
            memory_is_causal=memory_is_causal,
        )
    return dec.norm(output) if dec.norm is not None else output


def _transformer(
    model: nn.Transformer,
    src,
    tgt,
    src_mask=None,
    tgt_mask=None,
    memory_mask=None,
    src_key_padding_mask=None,
    tgt_key_padding_mask=None,
    memory_key_padding_mask=None,
    src_is_causal=None,
    tgt_is_causal=None,
    memory_is_causal=False,
):
    memory = model.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal)
    return model.decoder(
        tgt,
        memory,
        tgt_mask=tgt_mask,
        memory_mask=memory_mask,
        tgt_key_padding_mask=tgt_key_padding_mask,
        memory_key_padding_mask=memory_key_padding_mask,
        tgt_is_causal=tgt_is_causal,
        memory_is_causal=memory_is_causal,
    )


LAYER_STACKS: dict[type, Callable[..., Any]] = {
    nn.TransformerEncoder: _encoder,
    nn.TransformerDecoder: _decoder,
    nn.Transformer: _transformer,
}
