"""Auxiliary-head strategies: each block but the last gets a head that maps its output to the
shape of the model's output, so one loss serves all blocks.

A strategy is a function ``build(spec: AuxSpec) -> nn.Module`` registered under a name with
:func:`register_aux`. Built in: ``"dgl"`` and ``"linear"`` (:mod:`localize.aux.heads`) and the
published methods, generated from the transformed graph: ``"auglocal"`` (copies of later layers,
:mod:`~localize.aux.auglocal`), ``"man"`` (EMA + trainable copy of the next block's first layer,
:mod:`~localize.aux.man`), ``"readout"`` (the next layers and the output head, following the live
model, :mod:`~localize.aux.readout`), ``"infopro"`` (input reconstruction + classifier,
:mod:`~localize.aux.infopro`), ``"featrecon"`` (block-input reconstruction + output head,
:mod:`~localize.aux.featrecon`) and ``"drtp"`` (fixed random target projection,
:mod:`~localize.aux.drtp`). Each module documents its paper, options and defaults.

A head may define ``local_loss(feature, target, ctx)`` (it then computes its own loss from the
:class:`~localize.runtime.model.LossContext`) and ``after_update()`` (called after its block's optimizer
step).

Example:
    >>> import torch
    >>> from localize.aux import AuxSpec, build_aux
    >>> spec = AuxSpec(block=0, blocks=2, feature_shape=(4, 8, 6, 6), feature_layout="channels_first",
    ...                output_shape=(4, 10), output_layout="flat")
    >>> build_aux("linear", spec)(torch.randn(3, 8, 6, 6)).shape
    torch.Size([3, 10])
"""

# the registry first; importing the strategies registers them (each documents its paper)
from localize.aux import auglocal as _auglocal  # noqa: E402,F401
from localize.aux import drtp as _drtp  # noqa: E402,F401
from localize.aux import featrecon as _featrecon  # noqa: E402,F401
from localize.aux import heads as _heads  # noqa: E402,F401
from localize.aux import infopro as _infopro  # noqa: E402,F401
from localize.aux import man as _man  # noqa: E402,F401
from localize.aux import readout as _readout  # noqa: E402,F401
from localize.aux.registry import AuxBuilder, AuxSpec, Layout, available, build_aux, check_name, register_aux

__all__ = ["AuxSpec", "Layout", "register_aux", "build_aux", "available", "check_name", "AuxBuilder"]
