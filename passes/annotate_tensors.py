"""Run the graph once on example inputs and record what each node produces.

Every node gets ``meta["localize"]["flops"]`` (counted by ``FlopCounterMode``) and
``meta["localize"]["saved_bytes"]`` (what autograd keeps for backward, each storage counted
once and charged to the node that produced it, parameters excluded) and ``meta["localize"]["value"]``: a :class:`ValueInfo` with shape, dtype, bytes and
whether the value needs a gradient (computed from the real autograd flags, in eval mode so that
nothing in the user's model changes: no running-stat updates, no dropout draws).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.flop_counter import FlopCounterMode

from localize.compiler.tracer import lmeta
from localize.logs import loggers_at

__all__ = ["ValueInfo", "annotate_tensors", "value_info"]


@dataclass(frozen=True)
class ValueInfo:
    """What a node produced on the example inputs."""

    is_tensor: bool
    shape: tuple[int, ...] = ()
    dtype: torch.dtype | None = None
    requires_grad: bool = False
    nbytes: int = 0
    floating: bool = False

    @staticmethod
    def of(value: object) -> ValueInfo:
        if isinstance(value, torch.Tensor):
            return ValueInfo(
                True,
                tuple(value.shape),
                value.dtype,
                value.requires_grad,
                value.numel() * value.element_size(),
                value.is_floating_point() or value.is_complex(),
            )
        if isinstance(value, (tuple, list)):
            infos = [ValueInfo.of(v) for v in value]
            return ValueInfo(
                False,
                requires_grad=any(i.requires_grad for i in infos),
                nbytes=sum(i.nbytes for i in infos),
            )
        return ValueInfo(False)


def value_info(node: fx.Node) -> ValueInfo | None:
    return lmeta(node).get("value")


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, fake: FakeTensorMode | None = None) -> None:
        super().__init__(gm)
        self._params = {_storage_key(p) for p in gm.parameters()}
        if fake is not None:  # the run sees each parameter as its (memoised) fake tensor
            self._fakes = [fake.from_tensor(p) for p in gm.parameters()]  # alive: keys stay unique
            self._params |= {_storage_key(f) for f in self._fakes}
        self._producer: dict[int, fx.Node] = {}
        self._seen: set[int] = set()
        self._current: fx.Node | None = None
        # Results stay alive for the whole run: a freed storage's address can be reused, which
        # would make a new tensor look like one already seen (nondeterministic activation bytes).
        self._alive: list[object] = []

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        # Bytes autograd keeps for backward, each storage counted once and charged to the node
        # that produced it: a block keeps what it produces, plus its inputs (charged at the cut).
        ptr = _storage_key(t)
        if ptr not in self._params and ptr not in self._seen:
            self._seen.add(ptr)
            owner = self._producer.get(ptr, self._current)
            if owner is not None:
                meta = lmeta(owner)
                meta["saved_bytes"] = meta.get("saved_bytes", 0) + t.untyped_storage().nbytes()
        return t

    def run_node(self, n: fx.Node):
        lmeta(n)["saved_bytes"] = lmeta(n).get("saved_bytes", 0)
        if n.op in ("placeholder", "get_attr", "output"):
            result = super().run_node(n)
            flops = 0
        else:
            self._current = n
            # FlopCounterMode counts matmul, conv, bmm and attention FLOPs at the aten level.
            with FlopCounterMode(display=False) as counter, torch.autograd.graph.saved_tensors_hooks(
                self._pack, _identity
            ):
                result = super().run_node(n)
            flops = counter.get_total_flops()
        for t in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(t, torch.Tensor) and n.op != "get_attr":
                self._producer.setdefault(_storage_key(t), n)
        self._alive.append(result)
        lmeta(n)["value"] = ValueInfo.of(result)
        lmeta(n)["flops"] = int(flops)
        return result


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _storage_key(t: torch.Tensor) -> int:
    # fake tensors have no data pointer; their storage objects still have identities
    return StorageWeakRef(t.untyped_storage()).cdata


_FAKE_LOG = "torch._subclasses.fake_tensor"  # torch >= 2.15 logs a traceback when a fake op fails


def annotate_tensors(gm: fx.GraphModule, inputs: list[object]) -> fx.GraphModule:
    """Record ``ValueInfo`` for every node by running ``gm`` once (eval mode, grad enabled).

    The run uses fake tensors (shapes and dtypes only, no arithmetic), so annotating a large model
    costs milliseconds; graphs with data-dependent shapes fall back to one real run.
    """
    modes = {m: m.training for m in gm.modules()}
    gm.eval()
    try:
        with torch.enable_grad():
            try:
                fake = FakeTensorMode(allow_non_fake_inputs=True)
                fake_inputs = [fake.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in inputs]
                with fake, loggers_at(logging.CRITICAL, _FAKE_LOG):  # a failure is retried for real, which says what is wrong
                    _Recorder(gm, fake).run(*fake_inputs)
            except Exception:  # noqa: BLE001 - data-dependent shapes: measure for real
                _Recorder(gm).run(*inputs)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return gm
