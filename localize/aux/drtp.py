"""``aux="drtp"``: direct random target projection; no trainable auxiliary parameters.

After Frenkel et al., *Learning without Feedback: Fixed Random Learning Signals Allow for
Feedforward Training of Deep Neural Networks* (DRTP, 2021), in the local-loss form of tpSGD
(Lomnitz et al., *Learning with Local Gradients at the Edge*, 2022). A fixed random matrix ``P``
(classes x channels, entries N(0, scale^2), drawn from ``seed + block``, kept as a buffer) maps
the one-hot target into the block's output space. The block's output is pooled as the model
output requires (global mean over positions for a per-example output; kept per token for a
per-token output such as an LM's), and the local loss is the mean squared distance to the
projected target ``onehot(y) @ P`` (``y @ P`` for class-probability targets). The head has no
trainable parameters, so the block is trained by its own weights alone.

Its ``forward`` returns class scores ``pooled @ P.T`` (each class's target direction), a rough
read-out for inspection. DRTP needs class targets: a per-example or per-token output.

Options:
    ``scale`` (float > 0, default 1.0), ``seed`` (int >= 0, default 0).

Example:
    >>> import torch, localize
    >>> from localize.zoo import ResNet1d
    >>> net = ResNet1d(1, 10, widths=(8, 16), blocks_per_stage=(2, 2))
    >>> lm = localize.transform(net, blocks=2, example_inputs=(torch.randn(2, 1, 40),), aux="drtp")
    >>> head = lm.aux["0"]
    >>> tuple(head.projection.shape), len(list(head.parameters()))
    ((10, 8), 0)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from localize.aux.common import Option, is_float, is_int, read_options
from localize.aux.registry import AuxSpec, register_aux
from localize.errors import ConfigError, TargetError

__all__ = ["drtp_head", "DRTPHead"]

OPTIONS = {
    "scale": Option(1.0, is_float(0.0, open_lo=True), "a float > 0"),
    "seed": Option(0, is_int(0), "an int >= 0"),
}


class DRTPHead(nn.Module):
    """Pooled block output vs. a fixed random projection of the target (MSE)."""

    def __init__(self, pool_dims: tuple[int, ...], projection: torch.Tensor) -> None:
        super().__init__()
        self.pool_dims = pool_dims  # positions averaged away; channels end up last
        self.register_buffer("projection", projection)  # (classes, channels); fixed, never trained

    def pooled(self, feature: torch.Tensor) -> torch.Tensor:
        return feature.mean(self.pool_dims) if self.pool_dims else feature

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.pooled(feature) @ self.projection.T

    def projected_target(self, target: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        classes = self.projection.shape[0]
        if target.is_floating_point():
            if target.shape != (*like.shape[:-1], classes):
                raise TargetError(
                    f"aux='drtp' needs class probabilities of shape {(*like.shape[:-1], classes)}, "
                    f"got {tuple(target.shape)}"
                )
            return target.to(self.projection.dtype) @ self.projection
        if target.shape != like.shape[:-1]:
            raise TargetError(
                f"aux='drtp' needs class indices of shape {tuple(like.shape[:-1])}, got {tuple(target.shape)}"
            )
        return F.embedding(target.long(), self.projection)  # == onehot(target) @ projection

    def local_loss(self, feature: torch.Tensor, target: torch.Tensor, ctx) -> torch.Tensor:
        h = self.pooled(feature)
        return F.mse_loss(h, self.projected_target(target, h).to(h.dtype))


@register_aux("drtp")
def drtp_head(spec: AuxSpec) -> nn.Module:
    opts = read_options("drtp", spec.options, OPTIONS)
    f, o = spec.feature_shape, spec.output_shape
    per_token = len(o) >= 3 and spec.output_layout == "channels_last"
    if len(o) == 2:  # one prediction per example: pool every position
        if len(f) == 2:
            dims: tuple[int, ...] = ()
        elif spec.feature_layout == "channels_first":
            dims = tuple(range(2, len(f)))
        else:
            dims = tuple(range(1, len(f) - 1))
    elif per_token and spec.feature_layout == "channels_last" and f[1:-1] == o[1:-1]:
        dims = ()  # one prediction per token: keep the tokens
    else:
        raise ConfigError(
            f"aux='drtp' projects class targets onto the block output, so the model output must be per example "
            f"(B, classes) or per token (B, T, classes) with the block's tokens; got output {tuple(o)} and "
            f"activation {tuple(f)}; use aux='dgl'"
        )
    channels = f[1] if spec.feature_layout == "channels_first" and len(f) > 2 else f[-1]
    generator = torch.Generator().manual_seed(opts["seed"] + spec.block)
    projection = torch.randn(o[-1], channels, generator=generator) * opts["scale"]
    return DRTPHead(dims, projection)
