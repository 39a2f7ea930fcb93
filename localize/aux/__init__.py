"""Auxiliary-head strategies: each block but the last gets a head that maps its output to the
shape of the model's output, so one loss serves all blocks.

A strategy is a function ``build(spec: AuxSpec) -> nn.Module`` registered under a name with
:func:`register_aux`. Built in: ``"dgl"`` and ``"linear"`` (:mod:`localize.aux.heads`) and the
published methods, generated from the transformed graph: ``"auglocal"`` (copies of later layers,
:mod:`~localize.aux.auglocal`), ``"man"`` (EMA + trainable copy of the next block's first layer,
:mod:`~localize.aux.man`), ``"infopro"`` (input reconstruction + classifier,
:mod:`~localize.aux.infopro`), ``"featrecon"`` (block-input reconstruction + output head,
:mod:`~localize.aux.featrecon`) and ``"drtp"`` (fixed random target projection,
:mod:`~localize.aux.drtp`). Each module documents its paper, options and defaults.

A head may define ``local_loss(feature, target, ctx)`` (it then computes its own loss from the
:class:`~localize.model.LossContext`) and ``after_update()`` (called after its block's optimizer
step).

Example:
    >>> import torch
    >>> from localize.aux import AuxSpec, build_aux
    >>> spec = AuxSpec(block=0, blocks=2, feature_shape=(4, 8, 6, 6), feature_layout="channels_first",
    ...                output_shape=(4, 10), output_layout="flat")
    >>> build_aux("linear", spec)(torch.randn(3, 8, 6, 6)).shape
    torch.Size([3, 10])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from localize.errors import ConfigError

__all__ = ["AuxSpec", "Layout", "register_aux", "build_aux", "available", "AuxBuilder"]

Layout = str  # "channels_first" (B, C, *spatial), "channels_last" (B, *tokens, C) or "flat" (B, C)


@dataclass
class AuxSpec:
    """What a strategy knows when it builds block ``block``'s head."""

    block: int
    blocks: int
    feature_shape: tuple[int, ...]  # the block's output activation, on the example inputs
    feature_layout: Layout
    output_shape: tuple[int, ...]  # the model output the loss reads, on the example inputs
    output_layout: Layout
    options: dict[str, Any] = field(default_factory=dict)
    context: Any = None  # the transform's Plan, for strategies that read the graph (may be None)


AuxBuilder = Callable[[AuxSpec], torch.nn.Module]
_REGISTRY: dict[str, AuxBuilder] = {}


def register_aux(name: str) -> Callable[[AuxBuilder], AuxBuilder]:
    """Register an aux-head strategy under ``name`` (used as ``transform(..., aux=name)``)."""

    def deco(fn: AuxBuilder) -> AuxBuilder:
        _REGISTRY[name] = fn
        return fn

    return deco


def available() -> list[str]:
    return sorted(_REGISTRY)


def check_name(name: str) -> None:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ConfigError(f"unknown aux strategy {name!r}; choose one of {available()}")


def build_aux(name: str, spec: AuxSpec) -> torch.nn.Module:
    check_name(name)
    return _REGISTRY[name](spec)


# registers the built-in strategies; the published ones are documented in their modules
from localize.aux import auglocal as _auglocal  # noqa: E402,F401
from localize.aux import drtp as _drtp  # noqa: E402,F401
from localize.aux import featrecon as _featrecon  # noqa: E402,F401
from localize.aux import heads as _heads  # noqa: E402,F401
from localize.aux import infopro as _infopro  # noqa: E402,F401
from localize.aux import man as _man  # noqa: E402,F401
