""":func:`train`: one block per pipeline stage, called on every rank with the same LocalModel."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from localize.distributed.checkpoint import find_latest
from localize.distributed.checkpoint import load_checkpoint as load_distributed
from localize.distributed.pipeline import DistributedResult, Pipeline
from localize.distributed.stages import Layout
from localize.distributed.wire import PeerError, one_line
from localize.errors import ConfigError
from localize.runtime.model import LocalModel

# Joining the process group only: ranks finish building the model (and loading data) at different
# speeds, so the rendezvous waits longer than a training message does, but not forever.
STARTUP_TIMEOUT = 120.0

__all__ = ["train", "model_state_dict", "load_checkpoint"]


def train(
    lm: LocalModel,
    data: Any,
    *,
    epochs: int = 1,
    batch_size: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
    checkpoint: str | os.PathLike | None = None,
    timeout: float = 30.0,
    startup_timeout: float = STARTUP_TIMEOUT,
    backend: str | None = None,
    device: str | torch.device | None = None,
    depth: int = 2,
    gather: bool = True,
    log: Callable[[str], None] | None = None,
    checkpoint_every: int = 0,
    resume: str | os.PathLike | None = None,
) -> DistributedResult:
    """Train ``lm`` with one block per pipeline stage; call it on every rank with the same ``lm``.

    Args:
        lm: the LocalModel, built identically on every rank (same model, seed and ``transform``
            arguments, with ``example_inputs``); each rank trains only its block and head.
        data: read on stage 0 only (other ranks may pass None): an ``(inputs, targets)`` pair of
            tensors (``inputs`` a tensor, tuple or dict of tensors) cut by ``batch_size``, an
            iterable of ``(inputs, target)`` batches (e.g. a DataLoader, read once per epoch), or a
            callable ``epoch -> iterable of batches``. See :func:`iter_batches`.
        epochs, batch_size, shuffle, seed: how tensor data is batched (``shuffle`` permutes with
            ``seed + epoch``).
        checkpoint: a directory: when training ends every stage writes its shard of
            ``checkpoint/`` (a ``torch.distributed.checkpoint``: parameters, head, optimizer,
            scheduler, RNG, step, data position; resumable), and rank 0 writes ``model.pt``, a
            state dict that loads into ``LocalModel`` (``lm.load_state_dict``) and, through
            :func:`model_state_dict`, into the original model.
        checkpoint_every: with ``checkpoint``, also every N microbatches into
            ``<checkpoint>.checkpoint/step-<N>/`` (the two latest complete ones are kept; removed
            once the run has ended and written ``checkpoint/``).
        resume: a checkpoint folder (``step-<N>``, or a folder holding them: the latest complete
            one) to continue from; ``"auto"``: the latest under ``<checkpoint>.checkpoint/`` if
            there is one, else a fresh start. The run continues at the saved microbatch, and with
            the same data, seed and batches ends where an uninterrupted run ends.
        timeout: seconds any rank waits for a peer before it stops with a :class:`PeerError`.
        startup_timeout: seconds the ranks wait for each other to join the process group (a rank
            that dies before then stops the others after this long).
        backend: ``"gloo"`` or ``"nccl"``; default nccl when CUDA is available, else gloo. Used only
            when the process group is not initialized yet (torchrun's environment is read).
        device: where this rank's block runs; default ``cuda:LOCAL_RANK`` with nccl, else CPU.
        depth: microbatches a stage may have in flight to the next before it waits.
        gather: send every block's parameters to rank 0 at the end (its ``lm`` is then fully
            trained); needed for ``model.pt``.
        log: called with progress lines (the last stage's per-epoch loss, rank 0's summary).

    Returns:
        a :class:`DistributedResult`; on rank 0 ``losses[step]`` holds every block's loss.
    """
    if not isinstance(lm, LocalModel):
        raise ConfigError(f"lm must be a LocalModel (from localize.transform), got {type(lm).__name__}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs must be an int >= 1, got {epochs!r}")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ConfigError(f"depth must be an int >= 1, got {depth!r}")
    for name, value in (("timeout", timeout), ("startup_timeout", startup_timeout)):
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and value > 0):
            raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")
    if not lm.ready:
        raise ConfigError(
            "this LocalModel has no shapes yet; transform the model with example_inputs= before "
            "distributed training (every rank must build the same heads up front)"
        )
    _check_heads_are_local(lm)
    every, periodic, resume_from = _checkpoint_options(checkpoint, checkpoint_every, resume)
    created = _init_process_group(len(lm.blocks), backend, startup_timeout)
    if resume is not None and resume_from is None and log is not None and dist.get_rank() == 0:
        log(f"no complete checkpoint in {periodic}: starting from the beginning")
    groups: list[dist.ProcessGroup] = []
    try:
        run = Pipeline(lm, timedelta(seconds=timeout), device, depth, groups, resume=resume_from)
        result = run.train(
            data, epochs, batch_size, shuffle, seed, checkpoint, gather, log, every=every, checkpoints=periodic
        )
        if every and result.rank == 0:  # every rank wrote the final checkpoint/: the periodic ones are done
            shutil.rmtree(periodic, ignore_errors=True)
        return result
    finally:
        for g in groups:
            _quietly(dist.destroy_process_group, g)
        if created:
            _quietly(dist.destroy_process_group)


def periodic_folder(checkpoint: str | os.PathLike) -> Path:
    """Where ``checkpoint_every`` writes: ``<checkpoint>.checkpoint/`` beside the output folder."""
    p = Path(checkpoint)
    return p.with_name(p.name + ".checkpoint")


def _checkpoint_options(checkpoint, every, resume) -> tuple[int, Path | None, Path | None]:
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ConfigError(f"checkpoint_every must be an int >= 0 (microbatches), got {every!r}")
    if every and checkpoint is None:
        raise ConfigError("checkpoint_every needs checkpoint=DIR: the checkpoints go to DIR.checkpoint/")
    periodic = periodic_folder(checkpoint) if checkpoint is not None else None
    if resume is None:
        return every, periodic, None
    if str(resume) == "auto":
        if periodic is None:
            raise ConfigError("resume='auto' needs checkpoint=DIR: it looks for DIR.checkpoint/")
        return every, periodic, find_latest(periodic)
    found = find_latest(resume)
    if found is None:
        raise ConfigError(
            f"--resume {resume}: no complete distributed checkpoint there (a step-*/ folder with .metadata); "
            f"pass OUT.checkpoint or OUT/checkpoint, or --resume auto"
        )
    return every, periodic, found


def model_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """The original model's state dict inside a LocalModel state dict (the ``model.`` entries)."""
    return {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The LocalModel state dict of a distributed run, in one process (``lm.load_state_dict``).

    ``path``: the run's folder (its ``model.pt``, or else its ``checkpoint/``), a
    ``torch.distributed.checkpoint`` folder (``OUT.checkpoint``, ``OUT/checkpoint`` or one
    ``step-<N>`` in them: every stage's shard is read), or a ``model.pt`` file.
    """
    p = Path(path)
    if p.is_dir() and (p / "model.pt").is_file():
        p = p / "model.pt"
    elif p.is_dir():
        return load_distributed(p / "checkpoint" if find_latest(p) is None else p)
    if not p.exists():
        raise ConfigError(f"{p}: no checkpoint; rank 0 writes model.pt and every stage checkpoint/ when train() ends")
    return torch.load(p, map_location="cpu", weights_only=True)


def _init_process_group(stages: int, backend: str | None, startup_timeout: float) -> bool:
    """Join the process group torchrun describes; True when this call created it."""
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed; install a build with it")
    if dist.is_initialized():
        Layout.of(dist.get_world_size(), stages)
        return False
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ConfigError(
            f"no process group and no launcher environment ({', '.join(missing)} unset); run under "
            f"torchrun --nproc-per-node {stages} ... or call torch.distributed.init_process_group first"
        )
    Layout.of(int(os.environ["WORLD_SIZE"]), stages)  # fail before the rendezvous
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ConfigError(f"backend={backend!r}; choose 'gloo' (CPU) or 'nccl' (GPU)")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    rank, world = os.environ["RANK"], os.environ["WORLD_SIZE"]
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=startup_timeout), **_fresh_store(startup_timeout))
    except (RuntimeError, ValueError) as e:  # DistStoreError, a refused or timed-out rendezvous
        raise PeerError(
            f"rank {rank} could not join the other {int(world) - 1} ranks at {os.environ['MASTER_ADDR']}:"
            f"{os.environ['MASTER_PORT']} within {startup_timeout:g} s: {one_line(e)} (a rank failed to start "
            f"or died before training; look at its log)"
        ) from None
    return True


def _fresh_store(startup_timeout: float) -> dict[str, Any]:
    """Under torchrun, a store whose keys belong to this launch attempt only.

    torchrun keeps its store across ``--max-restarts`` attempts, so the addresses the killed
    attempt published (gloo's, for every process group) are still there; a relaunched rank that
    reads one connects to a dead process and hangs. Prefixing every key with the attempt
    (``TORCHELASTIC_RESTART_COUNT``) makes each attempt rendezvous afresh.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return {}
    store, rank, world = next(dist.rendezvous("env://", timeout=timedelta(seconds=startup_timeout)))
    return {"store": dist.PrefixStore(f"localize/attempt_{attempt}", store), "rank": rank, "world_size": world}


def _check_heads_are_local(lm: LocalModel) -> None:
    """A head must not read parameters another stage trains: those live on another rank."""
    for block in lm.blocks:
        if block.aux is None:
            continue
        own = {id(p) for p in block.params} | {id(p) for p in block.aux.parameters()}
        for path, mod in block.aux.named_modules():
            for name, value in vars(mod).items():
                if not isinstance(value, nn.Module):
                    continue
                if any(id(p) not in own for p in value.parameters()):
                    where = f"{path}.{name}" if path else name
                    raise ConfigError(
                        f"block {block.index}'s aux head reads parameters that another block trains "
                        f"({type(block.aux).__name__}.{where}, e.g. aux='man' follows the next block's layer); "
                        f"in a pipeline they live on another rank: choose another aux strategy or train in one process"
                    )


def _quietly(fn: Callable, *args: Any) -> None:
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - cleanup after a failure must not hide the failure
        pass
