"""Checkpoints that resume exactly: ``lm.save(path)`` and ``localize.load(path, into=lm)``.

A checkpoint holds the model's and the aux heads' state (EMA copies included: they are buffers
of their heads), every block's optimizer, learning-rate scheduler and ``GradScaler`` state, the
gradients of an unfinished accumulation cycle, the RNG states (torch CPU and CUDA, Python,
NumPy), the step count, the caller's data position and a *fingerprint* of the plan. It is written
atomically: a temporary file in the same folder, flushed and fsync'ed, then renamed over the
target, so an interrupted write leaves the previous checkpoint intact. It holds tensors and plain
data only and is read with ``torch.load(weights_only=True)``: a file that holds anything else (a
pickled object whose loading would run code) is refused with a :class:`CheckpointError`.

Example:
    >>> import torch, tempfile, os, localize
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> lm = localize.transform(net, blocks=2, example_inputs=(torch.randn(3, 4),))
    >>> _ = lm.train_step(torch.randn(3, 4), torch.tensor([0, 1, 0]))
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
    >>> lm.save(path, data={"epoch": 0, "batch": 1})
    >>> localize.load(path, into=lm).data
    {'epoch': 0, 'batch': 1}
"""

from __future__ import annotations

import io
import os
import pickle
import random
import re
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from localize.errors import LocalizeError
from localize.version import __version__

if TYPE_CHECKING:
    from localize.runtime.model import LocalModel

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "atomic_write_bytes",
    "fingerprint",
    "load",
    "loop_state",
    "restore_loop_state",
    "save",
]

FORMAT = 2  # 2: plain data only (1 held NumPy arrays and torch's version object)
_READABLE = (1, 2)


class CheckpointError(LocalizeError):
    """A checkpoint cannot be read, or belongs to another model or plan."""


@dataclass
class Checkpoint:
    """What :func:`load` read: states plus where training stood."""

    fingerprint: dict[str, Any]
    model: dict[str, torch.Tensor]
    aux: dict[str, torch.Tensor]
    optimizers: list[dict[str, Any] | None]
    rng: dict[str, Any]
    step: int
    data: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    schedulers: list[dict[str, Any] | None] = field(default_factory=list)
    scalers: list[dict[str, Any] | None] = field(default_factory=list)
    pending: int = 0  # train_step calls since the last update (accumulate > 1)
    grads: list[list[torch.Tensor | None] | None] = field(default_factory=list)  # their gradients


def fingerprint(lm: LocalModel) -> dict[str, Any]:
    """What must match for a checkpoint to belong to ``lm``: model, plan and head structure."""
    plan = lm.plan
    return {
        "model": type(plan.model).__name__,
        "inputs": list(plan.traced.input_names),
        "blocks": len(lm.blocks),
        "cut_positions": list(plan.cut_positions),
        "block_nodes": [list(b.plan.nodes) for b in lm.blocks],
        "aux": plan.aux,
        "aux_options": {k: repr(v) for k, v in sorted(plan.aux_options.items())},
        "parameters": {k: list(v.shape) for k, v in plan.model.state_dict().items()},
        "heads": {k: list(v.shape) for k, v in lm.aux.state_dict().items()},
    }


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        name, key, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = (name, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        name, key, *rest = state["numpy"]
        key = key.numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
        np.random.set_state((name, key.astype(np.uint32), *rest))


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> None:
    """Write ``payload`` to ``path`` so that readers see the old file or the new one, never half."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save(lm: LocalModel, path: str | os.PathLike, *, data: dict[str, Any] | None = None) -> None:
    """Write a checkpoint of ``lm`` (see the module docstring) atomically to ``path``."""
    if os.path.isdir(path):
        raise CheckpointError(f"cannot write a checkpoint to {os.fspath(path)!r}: it is a folder; pass a file path")
    state = {
        "format": FORMAT,
        "versions": {"localize": __version__, "torch": str(torch.__version__)},
        "fingerprint": fingerprint(lm),
        "model": lm.model.state_dict(),
        "aux": lm.aux.state_dict(),
        "optimizers": [b.optimizer.state_dict() if b.optimizer is not None else None for b in lm.blocks],
        "rng": _rng_state(),
        "data": dict(data or {}),
        "schedulers": [_state_of(b.scheduler) for b in lm.blocks],
        **loop_state(lm),
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)  # serialise fully before touching the target file
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError as e:
        raise CheckpointError(
            f"cannot write a checkpoint to {os.fspath(path)!r} ({e.strerror or e}); pass a writable file path"
        ) from e


def load(path: str | os.PathLike, into: LocalModel | None = None) -> Checkpoint:
    """Read a checkpoint; with ``into``, check it belongs to that LocalModel and restore it."""
    # LocalModel imports this module, so it is recognised by what restore() reads, not by its class
    if into is not None and not all(hasattr(into, a) for a in ("blocks", "plan", "aux", "model")):
        raise CheckpointError(
            f"into= must be a LocalModel, got {type(into).__name__}; for a plain model use "
            f"model.load_state_dict(localize.load(path).model)"
        )
    raw = _read(os.fspath(path))
    if not isinstance(raw, dict) or raw.get("format") not in _READABLE:
        raise CheckpointError(f"{os.fspath(path)!r} is not a localize checkpoint (format {FORMAT})")
    ckpt = Checkpoint(
        fingerprint=raw["fingerprint"],
        model=raw["model"],
        aux=raw["aux"],
        optimizers=raw["optimizers"],
        rng=raw["rng"],
        step=raw["step"],
        data=raw["data"],
        versions=raw.get("versions", {}),
        schedulers=raw.get("schedulers", []),
        scalers=raw.get("scalers", []),
        pending=raw.get("pending", 0),
        grads=raw.get("grads", []),
    )
    if into is not None:
        restore(into, ckpt)
    return ckpt


def _read(path: str) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain data, never code. Format-1 files also
    hold NumPy's RNG state and torch's version string, allowed by name and nothing else."""
    try:
        with torch.serialization.safe_globals(_format1_types()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path!r}; pass the path lm.save() wrote") from None
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))  # torch names the callable it refused
        if found is None:
            raise CheckpointError(f"{path!r} is not a readable localize checkpoint ({type(e).__name__})") from None
        raise CheckpointError(
            f"{path!r} holds more than tensors and plain data (it would call {found.group(1)}); localize reads "
            f"checkpoints with weights_only=True and never runs code from a file: load only checkpoints "
            f"lm.save() wrote"
        ) from None
    except Exception as e:  # noqa: BLE001 - any unreadable file
        raise CheckpointError(f"{path!r} is not a readable localize checkpoint ({e})") from None


def _state_of(thing: Any) -> dict[str, Any] | None:
    return thing.state_dict() if thing is not None else None


def loop_state(lm: LocalModel) -> dict[str, Any]:
    """Where the training loop stands beyond the model, heads and optimizers: the step count, the
    accumulation position, the ``GradScaler`` states and, mid-cycle, the gradients added so far.
    Plain data and tensors; the trainer integrations store it in their own checkpoints."""
    pending = lm.pending
    return {
        "step": lm.step_count,
        "pending": pending,
        "scalers": [_state_of(b.scaler) for b in lm.blocks],
        "grads": [
            [p.grad for g in b.optimizer.param_groups for p in g["params"]]
            if pending and b.optimizer is not None
            else None
            for b in lm.blocks
        ],
    }


def restore_loop_state(lm: LocalModel, state: dict[str, Any]) -> None:
    """The inverse of :func:`loop_state` (optimizers must exist: ``lm.optimizers`` makes them)."""
    lm._ensure_optimizers()
    for block, scaler in zip(lm.blocks, state.get("scalers", [])):
        if scaler is not None and block.scaler is not None:
            block.scaler.load_state_dict(scaler)
    for block, grads in zip(lm.blocks, state.get("grads", [])):
        if grads is not None and block.optimizer is not None:
            params = [p for g in block.optimizer.param_groups for p in g["params"]]
            for p, g in zip(params, grads):
                p.grad = None if g is None else g.to(p.device)
    lm.step_count = state["step"]
    lm._state.pending = state.get("pending", 0)


def _format1_types() -> list[Any]:
    import numpy as np
    from torch.torch_version import TorchVersion

    multiarray = getattr(np, "_core", None) or np.core  # numpy 2 / 1
    return [multiarray.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)), TorchVersion]


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    out = []
    for key in saved.keys() | current.keys():
        a, b = saved.get(key), current.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            missing = sorted(b.keys() - a.keys())[:3]
            extra = sorted(a.keys() - b.keys())[:3]
            changed = sorted(k for k in a.keys() & b.keys() if a[k] != b[k])[:3]
            parts = []
            if changed:
                parts.append("changed " + ", ".join(f"{k} ({a[k]} -> {b[k]})" for k in changed))
            if missing:
                parts.append(f"not in checkpoint {missing}")
            if extra:
                parts.append(f"only in checkpoint {extra}")
            out.append(f"{key}: " + "; ".join(parts))
        elif key == "block_nodes":
            out.append("block_nodes: the blocks hold different graph nodes")
        else:
            out.append(f"{key}: checkpoint has {a!r}, this model has {b!r}")
    return sorted(out)


def restore(lm: LocalModel, ckpt: Checkpoint) -> None:
    """Load ``ckpt`` into ``lm`` after checking that it belongs to the same model and plan."""
    if not lm.ready:
        raise CheckpointError("this LocalModel has no aux heads yet: call it once (or pass example_inputs) first")
    diff = _differences(ckpt.fingerprint, fingerprint(lm))
    if diff:
        raise CheckpointError(
            "checkpoint belongs to another model or plan: " + "; ".join(diff)
            + ". Rebuild the LocalModel with the same model and transform() arguments"
        )
    lm.model.load_state_dict(ckpt.model)
    lm.aux.load_state_dict(ckpt.aux)
    lm._ensure_optimizers()
    for block, state in zip(lm.blocks, ckpt.optimizers):
        if state is not None and block.optimizer is not None:
            block.optimizer.load_state_dict(state)
    for block, state in zip(lm.blocks, ckpt.schedulers):
        if state is not None and block.scheduler is not None:
            block.scheduler.load_state_dict(state)
    restore_loop_state(lm, {"step": ckpt.step, "pending": ckpt.pending, "scalers": ckpt.scalers, "grads": ckpt.grads})
    _set_rng_state(ckpt.rng)
