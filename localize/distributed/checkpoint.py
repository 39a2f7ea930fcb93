"""Distributed checkpoints on ``torch.distributed.checkpoint``: every stage writes its own shard.

A checkpoint of a pipeline at microbatch ``N`` is one DCP checkpoint, a folder ``step-<N>`` that
every rank writes in parallel (``dcp.save`` is collective: the coordinator writes ``.metadata``
only after every rank has written its files, so a folder without ``.metadata`` never counts).
Its entries are flat keys, one shard per stage, written once per stage (DCP deduplicates the
replicas, which hold the same values):

* ``lm/<key>``: the LocalModel state-dict entries the stage trains (``model.*`` parameters and
  buffers it owns, ``aux.<s>.*`` its head), so the checkpoint reassembles into one state dict;
* ``optim/<s>/...``, ``sched/<s>``, ``scaler/<s>``, ``grads/<s>/<i>``: the block's optimizer,
  scheduler and ``GradScaler`` states and, mid accumulation cycle, its gradients;
* ``loop/<s>``: the step count and accumulation position; ``position``: the next batch
  (epoch, batch) stage 0 reads; ``rng/<rank>``: each rank's RNG states;
* ``meta``: the plan's fingerprint and the layout, checked before anything is loaded.

Plain data (the optimizer's hyper-parameters, RNG states, positions) is stored as the bytes of
``torch.save`` in a uint8 tensor, so DCP holds tensors only. Reading never runs code from the files:
``.metadata`` is unpickled with an allow-list of the classes DCP stores there, and plain data with
``torch.load(weights_only=True)``.

Example:
    >>> import torch, tempfile
    >>> from localize.distributed.checkpoint import load_checkpoint, save_state
    >>> folder = tempfile.mkdtemp()
    >>> _ = save_state({"lm/model.0.bias": torch.ones(8), "meta": {"step": 0}}, folder, step=0)
    >>> load_checkpoint(folder)["model.0.bias"].sum().item()
    8.0
"""

from __future__ import annotations

import io
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

from localize.distributed.wire import one_line
from localize.runtime.checkpoint import CheckpointError, _differences, _rng_state, _set_rng_state, fingerprint

if TYPE_CHECKING:
    import torch.distributed as dist

    from localize.runtime.model import LocalModel

__all__ = ["find_latest", "load_checkpoint", "load_state", "read_keys", "save_state", "stage_state", "restore_stage"]

FORMAT = 1
_PLAIN = "~plain"  # the key suffix of plain data stored as torch.save bytes (see _encode)
_STEP = re.compile(r"step-(\d+)$")


# ----------------------------------------------------------------------------------------------- files


def step_folder(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def save_state(
    state: dict[str, Any], root: str | os.PathLike, step: int, group: dist.ProcessGroup | None = None, keep: int = 2
) -> Path:
    """Write ``state`` (flat keys) as ``root/step-<step>`` with every rank of ``group`` (or alone
    without one), then, on the coordinator, drop all but the ``keep`` latest complete steps."""
    folder = step_folder(root, step)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k if isinstance(v, torch.Tensor) else k + _PLAIN: _encode(v) for k, v in state.items()}
    planner = DefaultSavePlanner(flatten_state_dict=False)
    try:
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
            warnings.filterwarnings("ignore", message=".*in a single process", category=UserWarning)
            dcp.save(state, storage_writer=FileSystemWriter(folder), planner=planner, process_group=group,
                     no_dist=group is None)
    except CheckpointException as e:  # a BaseException: one rank's failure, reported on every rank
        ranks = sorted(e.failures)
        first = e.failures[ranks[0]]
        cause = first[0] if isinstance(first, tuple) else first
        raise CheckpointError(
            f"writing the checkpoint {folder} failed on rank {', '.join(map(str, ranks))}: "
            f"{type(cause).__name__}: {cause}; pass a writable folder with free space"
        ) from None
    except OSError as e:
        raise CheckpointError(f"cannot write the checkpoint {folder} ({e.strerror or e}); pass a writable folder") from e
    if group is None or _is_coordinator(group):
        for old in _complete_steps(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def _is_coordinator(group: dist.ProcessGroup) -> bool:
    import torch.distributed as dist

    return dist.get_rank(group) == 0


def _complete_steps(root: str | os.PathLike) -> list[Path]:
    """The step folders whose ``.metadata`` exists (every rank wrote them), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name)) and (p / ".metadata").is_file()]
    return [p for _, p in sorted(found)]


def find_latest(root: str | os.PathLike) -> Path | None:
    """The latest complete checkpoint under ``root`` (a folder of ``step-*``), ``root`` itself when it
    is one, or None."""
    root = Path(root)
    if (root / ".metadata").is_file():
        return root
    steps = _complete_steps(root)
    return steps[-1] if steps else None


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's ``.metadata`` is a pickle: only the classes DCP writes there are rebuilt."""

    _MODULES = {"torch.distributed.checkpoint.metadata"}
    _NAMES = {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),
        ("torch", "Size"),
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PurePosixPath"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        allowed = module in self._MODULES or (module, name) in self._NAMES
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            allowed = True
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")
        return super().find_class(module, name)


class _SafeReader(FileSystemReader):
    """``FileSystemReader`` whose metadata is read with the allow-list above."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: no .metadata; not a complete distributed checkpoint") from None
        except Exception as e:  # noqa: BLE001 - anything unreadable or not allowed
            raise CheckpointError(
                f"{path} is not a distributed checkpoint localize can read ({e}); localize never runs code "
                f"from a file: load only checkpoints localize wrote"
            ) from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path} holds a {type(metadata).__name__}, not a checkpoint's metadata")
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeLoadPlanner(DefaultLoadPlanner):
    """Plain-data entries are read with ``weights_only=True`` (DCP's default would run pickles)."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False)

    def load_bytes(self, read_item: Any, value: Any) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"checkpoint entry {read_item.dest_index.fqn!r} holds more than tensors and plain data ({e}); "
                f"localize never runs code from a file"
            ) from None
        # the planner works on a shallow copy of the caller's dict: write the value into both
        self.state_dict[read_item.dest_index.fqn] = loaded
        self.original_state_dict[read_item.dest_index.fqn] = loaded


def read_keys(folder: str | os.PathLike) -> dict[str, Any]:
    """Key -> storage metadata (a tensor's size and dtype, or plain data) of one checkpoint."""
    return dict(_SafeReader(folder).read_metadata().state_dict_metadata)


def _encode(value: Any) -> torch.Tensor:
    """Plain data (numbers, strings, lists, dicts, RNG states) as the bytes of ``torch.save``, in a
    uint8 tensor: DCP then stores only tensors, and reading it back is ``weights_only``."""
    if isinstance(value, torch.Tensor):
        return value
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def _decode(key: str, packed: torch.Tensor) -> Any:
    try:
        return torch.load(io.BytesIO(packed.numpy().tobytes()), weights_only=True)
    except Exception as e:  # noqa: BLE001 - a pickle that would run code, or garbage
        raise CheckpointError(
            f"checkpoint entry {key!r} holds more than tensors and plain data ({one_line(e)}); "
            f"localize never runs code from a file"
        ) from None


def load_state(folder: str | os.PathLike, keys: list[str]) -> dict[str, Any]:
    """The entries ``keys`` of one checkpoint, read by this process alone (no collective)."""
    stored = read_keys(folder)
    meta = {k.removesuffix(_PLAIN): v for k, v in stored.items()}
    missing = [k for k in keys if k not in meta]
    if missing:
        raise CheckpointError(f"{folder}: the checkpoint has no {missing[:3]}; it was written for another model")
    names = {k: k + _PLAIN if k + _PLAIN in stored else k for k in keys}
    template: dict[str, Any] = {}
    for k, name in names.items():
        m = meta[k]
        if isinstance(m, BytesStorageMetadata):
            template[name] = None
        else:
            template[name] = torch.empty(tuple(m.size), dtype=m.properties.dtype)
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*in a single process", category=UserWarning)
        dcp.load(template, storage_reader=_SafeReader(folder), planner=_SafeLoadPlanner(), no_dist=True)
    return {k: _decode(k, template[n]) if n.endswith(_PLAIN) else template[n] for k, n in names.items()}


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The LocalModel state dict of a distributed checkpoint (``lm.load_state_dict`` in one process).

    ``path`` is a checkpoint folder (``step-*``) or the folder holding them (the latest is read).
    """
    folder = find_latest(path)
    if folder is None:
        raise CheckpointError(f"{path}: no complete distributed checkpoint (no step-*/.metadata) in it")
    keys = [k for k in read_keys(folder) if k.startswith("lm/")]
    return {k[len("lm/") :]: v for k, v in load_state(folder, keys).items()}


# ----------------------------------------------------------------------------------------------- one stage


def stage_state(lm: LocalModel, stage: int, entries, rank: int, pending: int, position: dict | None, layout) -> dict:
    """The flat entries one rank writes: its stage's shard, its RNG, stage 0's data position."""
    block = lm.blocks[stage]
    out: dict[str, Any] = {f"lm/{key}": read().detach() for key, read in entries}
    if block.optimizer is not None:
        osd = block.optimizer.state_dict()
        out[f"optim/{stage}/param_groups"] = osd["param_groups"]
        for pid, st in osd["state"].items():
            for name, value in st.items():
                out[f"optim/{stage}/state/{pid}/{name}"] = value
        if pending:
            for i, p in enumerate(p for g in block.optimizer.param_groups for p in g["params"]):
                if p.grad is not None:
                    out[f"grads/{stage}/{i}"] = p.grad.detach()
    if block.scheduler is not None:
        out[f"sched/{stage}"] = block.scheduler.state_dict()
    if block.scaler is not None:
        out[f"scaler/{stage}"] = block.scaler.state_dict()
    out[f"loop/{stage}"] = {"step": lm.step_count, "pending": pending}
    out[f"rng/{rank}"] = _rng_state()
    if position is not None:
        out["position"] = dict(position)
    out["meta"] = {
        "format": FORMAT,
        "fingerprint": fingerprint(lm),
        "stages": layout.stages,
        "replicas": layout.replicas,
    }
    return out


def restore_stage(lm: LocalModel, stage: int, entries, rank: int, folder: Path) -> dict[str, Any]:
    """Load one stage's shard of ``folder`` into ``lm``; returns ``{"pending", "position", "step"}``.

    The checkpoint must come from the same model and plan (its fingerprint) and the same number of
    stages; the replica count may differ (a replica reads its stage's shard; a new rank without an
    RNG state of its own keeps its current one).
    """
    keys = {k.removesuffix(_PLAIN) for k in read_keys(folder)}
    meta = load_state(folder, ["meta"])["meta"]
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{folder} is not a localize distributed checkpoint (format {FORMAT})")
    diff = _differences(meta["fingerprint"], fingerprint(lm))
    if diff:
        raise CheckpointError(
            f"{folder} belongs to another model or plan: " + "; ".join(diff)
            + ". Resume with the same model file and transform options"
        )
    if meta["stages"] != len(lm.blocks):
        raise CheckpointError(f"{folder} was written by {meta['stages']} stages, this run has {len(lm.blocks)}")
    block = lm.blocks[stage]
    wanted = [f"lm/{key}" for key, _ in entries]
    prefixes = (f"optim/{stage}/", f"grads/{stage}/")
    wanted += [k for k in keys if k.startswith(prefixes) or k in (f"sched/{stage}", f"scaler/{stage}")]
    wanted += [f"loop/{stage}"] + [k for k in (f"rng/{rank}", "position") if k in keys]
    got = load_state(folder, wanted)
    with torch.no_grad():
        for key, read in entries:
            read().copy_(got[f"lm/{key}"])
    if block.optimizer is not None:
        state: dict[int, dict[str, Any]] = {}
        for k, v in got.items():
            if k.startswith(f"optim/{stage}/state/"):
                pid, name = k[len(f"optim/{stage}/state/") :].split("/", 1)
                state.setdefault(int(pid), {})[name] = v
        block.optimizer.load_state_dict({"state": state, "param_groups": got[f"optim/{stage}/param_groups"]})
        params = [p for g in block.optimizer.param_groups for p in g["params"]]
        for i, p in enumerate(params):
            g = got.get(f"grads/{stage}/{i}")
            p.grad = None if g is None else g.to(p.device)
    if block.scheduler is not None and f"sched/{stage}" in got:
        block.scheduler.load_state_dict(got[f"sched/{stage}"])
    if block.scaler is not None and f"scaler/{stage}" in got:
        block.scaler.load_state_dict(got[f"scaler/{stage}"])
    loop = got[f"loop/{stage}"]
    lm.step_count = loop["step"]
    if f"rng/{rank}" in got:
        _set_rng_state(got[f"rng/{rank}"])
    return {"pending": loop["pending"], "position": got.get("position"), "done": loop.get("done", 0)}
