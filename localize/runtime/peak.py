"""``localize.memory``: the peak memory of one training step, measured the way torch measures it.

Everything alive at once counts: parameters, buffers, gradients, optimizer state, activations,
temporaries and inputs. On CPU the allocations are followed by torch's own tracker,
``torch.distributed._tools.mem_tracker.MemTracker`` (its dispatch mode sees every tensor storage
allocated and freed; parameters, buffers, gradients and optimizer state are categorised through
``track_external``). On CUDA the figure is ``torch.cuda.max_memory_allocated`` over the step.

MemTracker's per-module statistics refuse a module called twice before its backward, which a
chunked block (``chunk_size=``) or an aux head built from the model's own layers does; they are
switched off (:class:`FlatMemTracker`): the totals and categories do not depend on them.

Example:
    >>> import torch, localize
    >>> net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    >>> lm = localize.transform(net, blocks=2, example_inputs=(torch.randn(8, 64),), optimizer="sgd")
    >>> report = localize.memory(lm, torch.randn(32, 64), torch.randint(0, 10, (32,)))
    >>> report.params == sum(p.numel() * 4 for p in lm.parameters())
    True
    >>> report.total > report.params + report.grads
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker, _UpdateType

from localize.errors import ConfigError

__all__ = ["FlatMemTracker", "MemoryReport", "estimate_peaks", "memory"]


class _NoModules:
    """Stands in for MemTracker's module tracker: no per-module hooks, always at the top level."""

    parents: frozenset = frozenset({"Global"})
    is_bw = False

    def register_user_hooks(self, *hooks: Any) -> None:
        pass

    def clear_user_hooks(self) -> None:
        pass

    def get_known_fqn(self, module: nn.Module) -> str:
        return "Global"

    def __enter__(self) -> _NoModules:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


class FlatMemTracker(MemTracker):
    """torch's ``MemTracker`` without its per-module statistics (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._mod_tracker = _NoModules()
        self._clock, self._peak_clock = 0, 0
        self._born: dict[int, int] = {}

    def _update_peak_stats(self, peak_state: Any) -> None:
        self._clock += 1
        before = dict(self._peak_mem)
        super()._update_peak_stats(peak_state)
        if self._peak_mem != before:
            self._peak_clock = self._clock

    def _update_snap(self, u_type: Any, winfo: Any, old_mem_consumed: int | None = None,
                     old_reftype: Any = None) -> None:
        """As MemTracker's; a storage relabelled after the peak it was alive at (a gradient is
        allocated as a temporary, then named by its hook) is relabelled in the peak's snapshot too."""
        super()._update_snap(u_type, winfo, old_mem_consumed, old_reftype)
        if u_type == _UpdateType.ADD:
            self._born[id(winfo)] = self._clock
        elif u_type == _UpdateType.DEL:
            self._born.pop(id(winfo), None)
        elif u_type == _UpdateType.REF and self._born.get(id(winfo), self._clock) < self._peak_clock:
            peak = self._peak_mem_snap.get(winfo.device)
            if peak is not None:
                peak[old_reftype] -= winfo.mem_consumed
                peak[winfo.reftype] += winfo.mem_consumed

    def track_external(self, *external: Any) -> None:
        """As MemTracker's, but a module's parameters get their gradient hooks here: MemTracker
        installs them from its module hooks, which this tracker has not, and a gradient created in
        the step (none is alive before it once updates free them) would count as an activation."""
        super().track_external(*external)
        for obj in external:
            if isinstance(obj, nn.Module):
                self._track_module_params_and_buffers(obj, install_grad_hooks=True)


@dataclass(frozen=True)
class MemoryReport:
    """Bytes at the peak of one training step. ``activations`` is everything else alive then:
    activations saved for backward, temporaries, inputs and outputs."""

    device: str
    total: int
    params: int
    buffers: int
    grads: int
    optimizer: int
    activations: int

    def __str__(self) -> str:
        parts = ("params", "buffers", "grads", "optimizer", "activations")
        detail = ", ".join(f"{p} {getattr(self, p) / 2**20:.2f}" for p in parts)
        return f"peak {self.total / 2**20:.2f} MiB on {self.device} ({detail} MiB)"


def memory(model: nn.Module, inputs: Any, target: torch.Tensor, **step: Any) -> MemoryReport:
    """The peak of one training step of ``model`` on ``inputs`` and ``target``.

    A :class:`localize.LocalModel` takes one ``train_step`` (``step`` are its keyword arguments);
    any other module takes one step of plain backprop (the reference), with ``loss_fn=`` (default
    cross-entropy over the last dim) and ``optimizer=`` (a ``torch.optim.Optimizer`` over its
    parameters; default AdamW, lr 1e-3). The measured step is the steady state: when the optimizers
    have no state yet, one step runs first. Both train the model like any other step.
    """
    from localize.runtime.model import LocalModel

    if isinstance(model, LocalModel):
        optimizers = [o for o in model.optimizers if o is not None] if model.ready else []

        def run() -> None:
            model.train_step(inputs, target, **step)

    else:
        run, optimizers = _backprop_step(model, inputs, target, **step)
    if not optimizers or any(not o.state for o in optimizers):
        run()  # the steady state: shapes, optimizers and their state exist; measure the next step
        if isinstance(model, LocalModel):
            optimizers = [o for o in model.optimizers if o is not None]
    modules = [model]
    device = _device(model)
    if device.type == "cuda":
        return _cuda_peak(run, modules, optimizers, device)
    tracker = FlatMemTracker()
    batch = [t for t in torch.utils._pytree.tree_leaves((inputs, target)) if isinstance(t, torch.Tensor)]
    tracker.track_external(*modules, *optimizers, *batch)  # the batch counts with the activations
    with tracker:
        run()
    snap = tracker.get_tracker_snapshot("peak")[device]
    kinds = {str(k.value) if hasattr(k, "value") else str(k): v for k, v in snap.items()}
    known = {name: kinds.get(key, 0) for name, key in _KINDS.items()}
    return MemoryReport(
        str(device), int(snap["Total"]), *(int(known[n]) for n in ("params", "buffers", "grads", "optimizer")),
        int(snap["Total"] - sum(known.values())),
    )


_KINDS = {"params": "Parameter", "buffers": "Buffer", "grads": "Gradient", "optimizer": "Optstate"}


def _backprop_step(model: nn.Module, inputs: Any, target: torch.Tensor, loss_fn=None, optimizer=None):
    from localize.runtime.loss import cross_entropy_last_dim

    loss_fn = loss_fn or cross_entropy_last_dim
    optimizer = optimizer or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    args = inputs if isinstance(inputs, (tuple, list)) else (inputs,)

    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        out = model(*args)
        out = getattr(out, "logits", out)
        loss_fn(out, target).backward()
        optimizer.step()

    return run, [optimizer]


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    if param is None:
        raise ConfigError("the model has no parameters: there is no training step to measure")
    return param.device


def _bytes(tensors: Any) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def _cuda_peak(run, modules: list[nn.Module], optimizers: list, device: torch.device) -> MemoryReport:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)  # the peak then counts what the step starts with, too
    run()
    torch.cuda.synchronize(device)
    total = torch.cuda.max_memory_allocated(device)
    params = _bytes(p for m in modules for p in m.parameters())
    buffers = _bytes(b for m in modules for b in m.buffers())
    grads = _bytes(p.grad for m in modules for p in m.parameters() if p.grad is not None)
    state = _bytes(v for o in optimizers for s in o.state.values() for v in s.values())
    return MemoryReport(str(device), int(total), params, buffers, grads, state,
                        max(0, int(total) - params - buffers - grads - state))


def estimate_peaks(
    model: nn.Module, blocks: list[Any], state_per_param: int = 2, batch_scale: float = 1.0
) -> tuple[list[int], int]:
    """Estimated peak bytes while each block trains, and of a plain backprop step, from the plan
    (no run): what stays resident (parameters, heads, optimizer state: ``state_per_param`` copies of
    every trained tensor, 2 for AdamW, 1 for SGD with momentum), plus the training block's gradients
    and the activations it saves, traced at the example batch and scaled by ``batch_scale`` (the
    training batch over the example's). Backprop holds every gradient and saved activation at once.
    A lower bound: the batch itself and backward's temporaries (the gradients of activations)
    come on top. ``localize.memory`` measures the real figure; this one ranks blocks before a run.
    """
    def nbytes(params: Any) -> int:
        return sum(p.numel() * p.element_size() for p in params)

    heads = [list(b.aux.parameters()) if b.aux is not None else [] for b in blocks]
    model_bytes = nbytes(model.parameters()) + nbytes(b for b in model.buffers())
    trained = nbytes(p for b in blocks for p in b.params if p.requires_grad)
    head_bytes = nbytes(p for h in heads for p in h)
    resident = model_bytes + head_bytes + state_per_param * (trained + head_bytes)
    saved = [int(b.plan.cost.activation_bytes * batch_scale) for b in blocks]
    per_block = [
        resident + nbytes(p for p in b.params if p.requires_grad) + nbytes(h) + act
        for b, h, act in zip(blocks, heads, saved)
    ]
    backprop = model_bytes + (1 + state_per_param) * trained + sum(saved)
    return per_block, backprop
