"""What the published strategies share to build heads: option checking, copies of the model's
layers, shape adapters and reconstruction decoders. The graph analyses they read (units, the
output head, model inputs, layouts) are passes: :mod:`localize.passes.find_units`,
:mod:`~localize.passes.output_head`, :mod:`~localize.passes.model_input`,
:mod:`~localize.passes.infer_layout`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from localize.aux.registry import AuxSpec
from localize.errors import ConfigError
from localize.passes.find_units import Unit
from localize.passes.output_head import fresh_copy

if TYPE_CHECKING:
    from localize.compiler.plan import Plan

__all__ = [
    "ReconstructionHead",
    "Option",
    "read_options",
    "require_plan",
    "FirstTensor",
    "layer_copy",
    "stand_in_layer",
    "adapter",
    "Decoder",
    "reconstruction_decoder",
    "interpolate",
]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


# ----------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Option:
    """One option of a strategy: its default, a check of a value, and the valid range in words."""

    default: Any
    check: Callable[[Any], bool]
    valid: str


def read_options(strategy: str, options: dict[str, Any], schema: dict[str, Option]) -> dict[str, Any]:
    """``options`` completed with defaults; a ConfigError names unknown options or bad values."""
    unknown = sorted(set(options) - set(schema))
    if unknown:
        raise ConfigError(f"aux={strategy!r} has no option(s) {unknown}; valid options are {sorted(schema)}")
    values = {}
    for name, opt in schema.items():
        value = options.get(name, opt.default)
        try:
            ok = bool(opt.check(value))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(
                f"aux={strategy!r} option {name}={value!r} is out of range: valid values are {opt.valid} "
                f"(default {opt.default!r})"
            )
        values[name] = value
    return values


def is_int(lo: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo


def is_float(lo: float, hi: float = math.inf, *, open_lo: bool = False, open_hi: bool = False):
    def check(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        above = v > lo if open_lo else v >= lo
        below = v < hi if open_hi else v <= hi
        return above and below

    return check


def is_pair(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, (tuple, list)) and len(v) == 2 and all(check(x) for x in v)


def require_plan(spec: AuxSpec, strategy: str) -> Plan:
    """The transform's Plan, which strategies that copy the model's layers read."""
    plan = spec.context
    if plan is None or not hasattr(plan, "gm") or not hasattr(plan, "model"):
        raise ConfigError(
            f"aux={strategy!r} reads the model's graph and layers: build it through localize.transform(...), "
            f"not build_aux() alone (spec.context must be the transform's Plan)"
        )
    return plan


# ----------------------------------------------------------------------------------------------- units
















# ----------------------------------------------------------------------------------------------- copies






def first_tensor(value: Any) -> torch.Tensor:
    """A layer's main output: the tensor itself, or the first tensor of a tuple / dict / ModelOutput."""
    if isinstance(value, (torch.Tensor, torch.fx.Proxy)):
        return value  # a Proxy: traced for chunk_size=, where the layer returned one value
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else ()
    for item in items:
        if isinstance(item, (torch.Tensor, torch.fx.Proxy)):
            return item
    raise TypeError(f"layer returned {type(value).__name__} with no tensor in it")


class FirstTensor(nn.Module):
    """Calls ``layer`` on the hidden state alone and keeps its first tensor output (Hugging Face
    layers return tuples; with no mask they attend causally or fully, as the layer was built)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return first_tensor(self.layer(x))


def _runs_alone(
    layer: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...], dtype, device
) -> bool:
    """Whether ``layer(x)`` works on the hidden state alone and gives the recorded output shape."""
    was = layer.training
    layer.eval()
    try:
        with torch.no_grad():
            out = layer(torch.zeros((2, *in_shape[1:]), dtype=dtype, device=device))
        return tuple(out.shape[1:]) == tuple(out_shape[1:])
    except Exception:  # noqa: BLE001 - any failure means: needs more than the hidden state
        return False
    finally:
        layer.train(was)


def layer_copy(plan: Plan, unit: Unit, *, reinit: bool = True) -> nn.Module | None:
    """A copy of ``unit``'s module callable on its input alone (None if it needs more inputs)."""
    if unit.input_shape is None:
        return None
    layer = FirstTensor(fresh_copy(plan.model.get_submodule(unit.path), plan.model, reinit))
    dtype, device = _dtype_device(plan)
    if not _runs_alone(layer, unit.input_shape, unit.output_shape, dtype, device):
        return None
    return layer


def stand_in_layer(in_shape: tuple[int, ...], out_shape: tuple[int, ...], layout: str) -> nn.Module:
    """A small layer of the unit's shapes, for units that cannot run on their input alone:
    conv-BN-ReLU (channels-first), pre-norm residual MLP (channels-last), linear-ReLU (flat)."""
    if layout == "channels_first" and 3 <= len(out_shape) <= 5:
        nd, c = len(out_shape) - 2, out_shape[1]
        return nn.Sequential(
            adapter(in_shape, layout, out_shape, layout) or nn.Identity(),
            _CONV[nd](c, c, 3, padding=1, bias=False),
            _BN[nd](c),
            nn.ReLU(),
        )
    if layout == "channels_last" and len(out_shape) >= 3:
        c = out_shape[-1]
        return nn.Sequential(
            adapter(in_shape, layout, out_shape, layout) or nn.Identity(), _Residual(_mlp(c, 2 * c, c))
        )
    return nn.Sequential(
        nn.Flatten(1),
        nn.Linear(math.prod(in_shape[1:]), math.prod(out_shape[1:])),
        nn.ReLU(),
        _Reshape(out_shape[1:]),
    )


class _Residual(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _mlp(c_in: int, width: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(c_in), nn.Linear(c_in, width), nn.GELU(), nn.Linear(width, c_out))


class _Reshape(nn.Module):
    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)


def _dtype_device(plan: Plan) -> tuple[torch.dtype, torch.device]:
    for p in plan.model.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    return torch.get_default_dtype(), torch.device("cpu")


# ----------------------------------------------------------------------------------------------- output head










# ----------------------------------------------------------------------------------------------- adapters


class Resize(nn.Module):
    """Average-pool (shrink) or nearest-interpolate (grow) a channels-first map to ``size``."""

    def __init__(self, size: tuple[int, ...]) -> None:
        super().__init__()
        self.size = tuple(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) == self.size:
            return x
        if all(a >= b for a, b in zip(x.shape[2:], self.size)):
            fn = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[len(self.size) - 1]
            return fn(x, self.size)
        return F.interpolate(x, size=self.size, mode="nearest")


def adapter(
    from_shape: tuple[int, ...], from_layout: str | None, to_shape: tuple[int, ...], to_layout: str | None
) -> nn.Module | None:
    """A module mapping activations of ``from_shape`` to ``to_shape`` (batch dims ignored), or None.

    Identity when they agree; channels-first maps are resized (pooling or nearest upsampling)
    and projected by a 1x1 conv + batch-norm; channels-last and flat tensors by a linear map
    over their last dim (their other dims must agree).
    """
    a, b = tuple(from_shape[1:]), tuple(to_shape[1:])
    if a == b:
        return nn.Identity()
    if len(a) != len(b):
        return None
    if from_layout == to_layout == "channels_first" and 2 <= len(a) <= 4:
        nd = len(a) - 1
        return nn.Sequential(Resize(b[1:]), _CONV[nd](a[0], b[0], 1, bias=False), _BN[nd](b[0]))
    if a[:-1] == b[:-1] and (len(a) == 1 or from_layout == to_layout):
        return nn.Linear(a[-1], b[-1])
    return None


def interpolate(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """InfoPro's bilinear (linear / trilinear for other ranks) resize with aligned corners."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    return F.interpolate(x, size=tuple(size), mode=mode, align_corners=True)


# ----------------------------------------------------------------------------------------------- reconstruction








class Decoder(nn.Module):
    """Maps a feature to a reconstruction of a target and scores it (``loss(feature, target)``)."""

    def __init__(self, body: nn.Module, kind: str, loss: str, size: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.body, self.kind, self.loss_name, self.size = body, kind, loss, tuple(size)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        if self.kind == "conv":
            feature = interpolate(feature, self.size)
        return self.body(feature)

    def loss(self, feature: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        recon = self(feature)
        if self.kind == "tokens":
            return F.cross_entropy(recon.reshape(-1, recon.shape[-1]), target.reshape(-1).long())
        target = target.to(recon.dtype)
        if self.loss_name == "bce":
            return F.binary_cross_entropy_with_logits(recon, target)
        return F.mse_loss(recon, target)


class ReconstructionHead(nn.Module):
    """Shared by InfoPro and FeatRecon: ``forward`` predicts with the classifier; ``local_loss`` is
    ``w_recon * decoder.loss(feature, reconstruction_target(ctx)) + w_cls * loss_fn(prediction, target)``."""

    def __init__(self, decoder: nn.Module, classifier: nn.Module, weights: tuple[float, float]) -> None:
        super().__init__()
        self.decoder, self.classifier = decoder, classifier
        self.weights = weights  # (reconstruction weight, classification weight)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.classifier(feature)

    def reconstruction_target(self, ctx) -> torch.Tensor:
        raise NotImplementedError

    def local_loss(self, feature: torch.Tensor, target: torch.Tensor, ctx) -> torch.Tensor:
        lam_recon, lam_cls = self.weights
        loss = lam_cls * ctx.loss_fn(self.classifier(feature), target)
        if lam_recon:
            loss = loss + lam_recon * self.decoder.loss(feature, self.reconstruction_target(ctx))
        return loss


def reconstruction_decoder(
    feature_shape: tuple[int, ...],
    feature_layout: str,
    target_shape: tuple[int, ...],
    target_layout: str,
    *,
    vocab: int | None,
    width: int,
    loss: str = "mse",
) -> Decoder:
    """The decoder a feature needs to reconstruct a target:

    * token ids (B, T) from a (B, T, C) feature: LayerNorm + linear to the vocabulary, scored by
      cross-entropy (predict the input tokens);
    * a channels-first target from a channels-first feature of the same rank: InfoPro's decoder,
      (bi)linear resize to the target's size, conv3x3-BN-ReLU, conv3x3 to the target's channels;
    * a channels-last target from a channels-last feature with the same token dims: a per-token MLP
      (LayerNorm, linear, GELU, linear);
    * otherwise: global mean pooling over the feature's positions, an MLP to every target value.

    Float targets are scored by MSE, or by BCE on logits (``loss="bce"``, targets in [0, 1]).
    """
    f, t = tuple(feature_shape), tuple(target_shape)
    if vocab is not None:
        if feature_layout == "channels_last" and len(f) == len(t) + 1 and f[1:-1] == t[1:]:
            return Decoder(nn.Sequential(nn.LayerNorm(f[-1]), nn.Linear(f[-1], vocab)), "tokens", "ce")
        pooled, channels = _pool_all(f, feature_layout)
        body = nn.Sequential(
            pooled, _mlp_plain(channels, width, math.prod(t[1:]) * vocab), _Reshape((*t[1:], vocab))
        )
        return Decoder(body, "tokens", "ce")
    if (
        feature_layout == "channels_first"
        and target_layout == "channels_first"
        and len(f) == len(t)
        and 3 <= len(f) <= 5
    ):
        nd = len(f) - 2
        body = nn.Sequential(
            _CONV[nd](f[1], width, 3, padding=1, bias=False),
            _BN[nd](width),
            nn.ReLU(),
            _CONV[nd](width, t[1], 3, padding=1),
        )
        return Decoder(body, "conv", loss, t[2:])
    if (
        feature_layout == "channels_last"
        and target_layout == "channels_last"
        and len(f) == len(t)
        and f[1:-1] == t[1:-1]
    ):
        return Decoder(_mlp(f[-1], width, t[-1]), "tokens_dense", loss)
    pooled, channels = _pool_all(f, feature_layout)
    body = nn.Sequential(pooled, _mlp_plain(channels, width, math.prod(t[1:])), _Reshape(t[1:]))
    return Decoder(body, "generic", loss)


def _mlp_plain(c_in: int, width: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(c_in, width), nn.GELU(), nn.Linear(width, c_out))


class _MeanOver(nn.Module):
    def __init__(self, dims: tuple[int, ...]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(self.dims) if self.dims else x


def _pool_all(shape: tuple[int, ...], layout: str) -> tuple[nn.Module, int]:
    """Global mean over positions: (module, channels left)."""
    if len(shape) <= 2:
        return nn.Flatten(1), math.prod(shape[1:])
    if layout == "channels_first":
        return _MeanOver(tuple(range(2, len(shape)))), shape[1]
    return _MeanOver(tuple(range(1, len(shape) - 1))), shape[-1]
