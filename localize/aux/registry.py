"""The registry of aux-head strategies: :class:`AuxSpec`, :func:`register_aux`, :func:`build_aux`."""


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
