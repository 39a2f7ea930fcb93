"""The built-in heads: ``"dgl"`` (a small conv/MLP head, after Belilovsky et al., *Decoupled
Greedy Learning of CNNs*, ICML 2020) and ``"linear"`` (pool, then one linear map).

Both read the layouts in :class:`AuxSpec`: a channels-first feature (B, C, *spatial) is pooled over
its spatial dims, a channels-last sequence (B, T, C) is pooled over T when the output has no token
dim and kept per token when it has one, and dense channels-first outputs keep their spatial dims.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from localize.aux.registry import AuxSpec, register_aux
from localize.errors import ConfigError

__all__ = ["Pool", "dgl_head", "linear_head", "output_adapter"]


class Pool(nn.Module):
    """Adaptive average pooling of a channels-first tensor's spatial dims to ``size`` per dim."""

    def __init__(self, dims: int, size: int) -> None:
        super().__init__()
        self.dims, self.size = dims, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dims == 0:
            return x
        fn = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[self.dims - 1]
        return fn(x, self.size)


class MeanOver(nn.Module):
    """Mean over the given dims (global pooling that works for any size)."""

    def __init__(self, dims: tuple[int, ...]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(self.dims) if self.dims else x


class Reshape(nn.Module):
    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)


class Upsample(nn.Module):
    """Resize a channels-first map to a fixed spatial size (dense outputs)."""

    def __init__(self, size: tuple[int, ...]) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) == self.size:
            return x
        return F.interpolate(x, size=self.size, mode="nearest")


_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _kind(spec: AuxSpec) -> str:
    f, o = spec.feature_shape, spec.output_shape
    fl, ol = spec.feature_layout, spec.output_layout
    if len(o) == 2:
        return "vector"
    if ol == "channels_last" and fl == "channels_last" and f[1:-1] == o[1:-1]:
        return "tokens"
    if ol == "channels_first" and fl == "channels_first" and len(f) == len(o) and 2 < len(f) <= 5:
        return "dense"
    return "generic"


def output_adapter(spec: AuxSpec, width: int) -> tuple[nn.Module, int]:
    """(module, channels) that turns the feature into a tensor laid out like the output's kind."""
    kind = _kind(spec)
    f = spec.feature_shape
    if kind == "vector":
        if spec.feature_layout == "channels_first" and len(f) > 2:
            return MeanOver(tuple(range(2, len(f)))), f[1]
        if spec.feature_layout == "channels_last" and len(f) > 2:
            return MeanOver(tuple(range(1, len(f) - 1))), f[-1]
        if len(f) == 2:
            return nn.Identity(), f[1]
        return nn.Flatten(1), math.prod(f[1:])
    if kind in ("tokens", "dense"):
        return nn.Identity(), f[1] if kind == "dense" else f[-1]
    # generic: bounded pooling, flatten; the head then maps to prod(output) and reshapes
    if spec.feature_layout == "channels_first" and 2 < len(f) <= 5:
        nd = len(f) - 2
        return nn.Sequential(Pool(nd, 2), nn.Flatten(1)), f[1] * 2**nd
    return nn.Flatten(1), math.prod(f[1:])


def _out_channels(spec: AuxSpec) -> int:
    kind = _kind(spec)
    o = spec.output_shape
    if kind == "vector" or kind == "tokens":
        return o[-1]
    if kind == "dense":
        return o[1]
    return math.prod(o[1:])


def _finish(spec: AuxSpec) -> nn.Module:
    kind = _kind(spec)
    if kind == "dense":
        return Upsample(tuple(spec.output_shape[2:]))
    if kind == "generic":
        return Reshape(tuple(spec.output_shape[1:]))
    return nn.Identity()


def _option(spec: AuxSpec, name: str, default: int, valid: set[str]) -> int:
    unknown = set(spec.options) - valid
    if unknown:
        raise ConfigError(f"the dgl head has no option(s) {sorted(unknown)}; valid options are {sorted(valid)}")
    value = spec.options.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"aux option {name}={value!r} must be a positive int")
    return value


@register_aux("dgl")
def dgl_head(spec: AuxSpec) -> nn.Module:
    """DGL-style head: (pool to <=4 per spatial dim, 1x1 conv, BN, ReLU) for conv features, then
    global pooling as the output requires and a two-layer MLP. Options: ``width`` (conv/MLP width,
    default 128), ``pool`` (spatial size kept before the conv, default 4)."""
    valid = {"width", "pool"}
    width = _option(spec, "width", 128, valid)
    pool = _option(spec, "pool", 4, valid)
    f = spec.feature_shape
    layers: list[nn.Module] = []
    kind = _kind(spec)
    if spec.feature_layout == "channels_first" and 2 < len(f) <= 5 and kind in ("vector", "generic"):
        nd = len(f) - 2
        c = min(width, max(f[1], 16))
        layers += [Pool(nd, pool), _CONV[nd](f[1], c, 1, bias=False), _BN[nd](c), nn.ReLU()]
        spec = _with_feature(spec, (f[0], c, *([pool] * nd)))
    elif spec.feature_layout == "channels_last" and len(f) >= 3:
        layers.append(nn.LayerNorm(f[-1]))
    adapter, channels = output_adapter(spec, width)
    layers.append(adapter)
    out = _out_channels(spec)
    if kind == "dense":
        nd = len(f) - 2
        layers += [_CONV[nd](channels, width, 1), nn.ReLU(), _CONV[nd](width, out, 1)]
    else:
        layers += [nn.Linear(channels, width), nn.GELU(), nn.Linear(width, out)]
    layers.append(_finish(spec))
    return nn.Sequential(*layers)


@register_aux("linear")
def linear_head(spec: AuxSpec) -> nn.Module:
    """Pool as the output requires, then a single linear map (1x1 conv for dense outputs)."""
    if spec.options:
        raise ConfigError(f"aux='linear' takes no options, got {sorted(spec.options)}")
    adapter, channels = output_adapter(spec, 0)
    out = _out_channels(spec)
    if _kind(spec) == "dense":
        proj: nn.Module = _CONV[len(spec.feature_shape) - 2](channels, out, 1)
    else:
        proj = nn.Linear(channels, out)
    return nn.Sequential(adapter, proj, _finish(spec))


def _with_feature(spec: AuxSpec, shape: tuple[int, ...]) -> AuxSpec:
    return replace(spec, feature_shape=shape)
