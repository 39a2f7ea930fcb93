"""Blocks on separate processes: local learning as a pipeline over torch.distributed.

Local learning has no backward locking: block ``s`` trains on microbatch ``t`` while block ``s+1``
trains on ``t-1``, and only forward messages travel. With ``world_size = K × R`` each of the K
blocks (and its aux head) runs on R ranks:

* stage 0 reads the data (replica ``r`` takes the ``r``-th shard of every batch); every stage
  receives the activations and the target from the previous stage, runs its block, sends its
  output on at once, then computes its local loss, backpropagates inside the block and steps its
  own optimizer. No gradient crosses a rank. Values a later block needs (a mask made by block 0
  and read by block 3, model inputs an aux loss reconstructs) are forwarded by the stages between.
* the R replicas of a stage average their gradients (one all-reduce per dtype, like DDP) and
  broadcast their buffers from replica 0 before each forward, like DDP's ``broadcast_buffers``.

Every stage sees the microbatches in order and updates after each, so the parameters after
training equal those of ``LocalModel.train_step`` run over the same batches in one process
(block ``s+1`` always consumes block ``s``'s output computed before block ``s``'s update).

Launch one process per rank with torchrun (``backend`` gloo on CPU, nccl on GPUs), build the
same LocalModel on every rank (same seed) and call :func:`train`::

    torchrun --nproc-per-node 2 -m localize MODEL.py --blocks 2 --train --distributed   # the CLI (run_cli)
    torchrun --nproc-per-node 2 -m localize.distributed MODEL.py --blocks 2 --batch-size 64 --checkpoint ckpt

    # or from Python, in the script torchrun runs:
    torch.manual_seed(0)
    lm = localize.transform(build_model(), blocks=2, example_inputs=(x,))
    result = localize.distributed.train(lm, (x_train, y_train), batch_size=64, checkpoint="ckpt")
    # on rank 0, lm now holds every block's trained parameters

A rank that dies or hangs makes the others stop within the process-group ``timeout`` with a
:class:`~localize.distributed.wire.PeerError` naming both ranks; one that never joins, after
``startup_timeout``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from localize.distributed.ops import EndOfStream
from localize.distributed.stages import Layout, StageProgram, split_step
from localize.distributed.wire import Link, Op, PeerError, one_line
from localize.errors import ConfigError, LocalizeError, PlanError, TraceError, VerificationError
from localize.runtime import ops
from localize.runtime.model import LocalModel, _make_optimizer

__all__ = [
    "DistributedResult",
    "Layout",
    "PeerError",
    "StageProgram",
    "is_main_process",
    "iter_batches",
    "load_checkpoint",
    "load_local_model",
    "main",
    "main_from_cli",
    "model_state_dict",
    "run_cli",
    "split_step",
    "train",
]

# Errors that every rank meets identically (bad launch, bad model, bad arguments): rank 0 reports them.
_SAME_ON_EVERY_RANK = (ConfigError, PlanError, TraceError, VerificationError)
# Joining the process group only: ranks finish building the model (and loading data) at different
# speeds, so the rendezvous waits longer than a training message does, but not forever.
_STARTUP_TIMEOUT = 120.0


@dataclass
class DistributedResult:
    """What :func:`train` returns on each rank (``losses``/``seconds``/``samples`` are global on rank 0)."""

    rank: int
    stage: int
    replica: int
    layout: Layout
    steps: int  # microbatches trained
    samples: int  # rank 0: samples trained by all replicas; other ranks: this rank's shard samples
    seconds: float  # rank 0: from the common start to the last rank's end; others: this rank's loop
    losses: list[list[float]] = field(default_factory=list)  # [step][block]; all blocks on rank 0
    checkpoint: Path | None = None  # rank 0: the assembled state dict (``model.pt``)
    # CPU seconds of the training loop (all threads, communication included): rank 0 holds every
    # rank's, indexed by rank; other ranks their own. Unlike ``seconds`` not inflated by waiting.
    cpu_seconds: list[float] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        """Samples per second (meaningful on rank 0)."""
        return self.samples / self.seconds if self.seconds > 0 else math.nan


# ----------------------------------------------------------------------------------------------- public API


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
    startup_timeout: float = _STARTUP_TIMEOUT,
    backend: str | None = None,
    device: str | torch.device | None = None,
    depth: int = 2,
    gather: bool = True,
    log: Callable[[str], None] | None = None,
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
        checkpoint: a directory: every stage saves ``block<s>.pt`` (its entries, optimizer and
            step) atomically, and rank 0 writes ``model.pt``, a state dict that loads into
            ``LocalModel`` (``lm.load_state_dict``) and, through :func:`model_state_dict`, into the
            original model.
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
    created = _init_process_group(len(lm.blocks), backend, startup_timeout)
    groups: list[dist.ProcessGroup] = []
    try:
        run = Pipeline(lm, timedelta(seconds=timeout), device, depth, groups)
        return run.train(data, epochs, batch_size, shuffle, seed, checkpoint, gather, log)
    finally:
        for g in groups:
            _quietly(dist.destroy_process_group, g)
        if created:
            _quietly(dist.destroy_process_group)


def iter_batches(
    data: Any, batch_size: int | None = None, *, shuffle: bool = False, seed: int = 0, epoch: int = 0
) -> Iterator[tuple[Any, Any]]:
    """The ``(inputs, target)`` batches of one epoch, in the order :func:`train` feeds them.

    Use it to run the same batches in one process (``for x, y in iter_batches(...):
    lm.train_step(x, y)``), which gives the parameters distributed training gives.

    >>> import torch
    >>> x, y = torch.arange(10.0).reshape(5, 2), torch.arange(5)
    >>> [b[1].tolist() for b in iter_batches((x, y), 2)]
    [[0, 1], [2, 3], [4]]
    """
    if callable(data) and not isinstance(data, (torch.Tensor, tuple, list)):
        yield from data(epoch)
        return
    if (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[1], torch.Tensor)
        and _is_inputs(data[0])
    ):
        inputs, targets = data
        n = len(targets)
        if batch_size is None:
            raise ConfigError("batch_size= is needed to cut (inputs, targets) tensors into batches")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
        for t in _tensors(inputs):
            if len(t) != n:
                raise ConfigError(
                    f"inputs hold {len(t)} samples but targets hold {n}; give one target per sample"
                )
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)) if shuffle else None
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size] if order is not None else slice(start, start + batch_size)
            yield _index(inputs, idx), targets[idx]
        return
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes, torch.Tensor)):
        yield from data
        return
    raise ConfigError(
        f"data is a {type(data).__name__}; give an (inputs, targets) pair of tensors, an iterable of "
        f"(inputs, target) batches such as a DataLoader, or a callable epoch -> batches"
    )


def model_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """The original model's state dict inside a LocalModel state dict (the ``model.`` entries)."""
    return {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The assembled state dict of a checkpoint directory (``model.pt``) or file."""
    p = Path(path)
    if p.is_dir():
        p = p / "model.pt"
    if not p.exists():
        raise ConfigError(f"{p}: no assembled checkpoint; rank 0 writes model.pt when train() ends")
    return torch.load(p, map_location="cpu", weights_only=True)


def is_main_process() -> bool:
    """True on rank 0 (or without any launcher): the process that writes files and prints summaries."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def main_from_cli(
    lm: LocalModel,
    train_data: Any,
    *,
    epochs: int = 1,
    batch_size: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
    checkpoint: str | os.PathLike | None = None,
    timeout: float = 30.0,
    startup_timeout: float = _STARTUP_TIMEOUT,
    log: Callable[[str], None] | None = print,
) -> int:
    """:func:`train` on this rank, its errors turned into an exit code (``python -m localize.distributed``).

    Errors become one line on stderr: errors every rank meets alike (a bad launch, a bad model)
    are printed by rank 0 only (exit code 2); a rank's own failure (a lost peer, a NaN loss) by that
    rank (exit code 1).
    """
    try:
        train(
            lm,
            train_data,
            epochs=epochs,
            batch_size=batch_size,
            shuffle=shuffle,
            seed=seed,
            checkpoint=checkpoint,
            timeout=timeout,
            startup_timeout=startup_timeout,
            log=log if is_main_process() or _is_last_stage(lm) else None,
        )
    except LocalizeError as e:
        return report_error(e)
    return 0


def report_error(e: LocalizeError) -> int:
    """Print ``e`` as one line on the ranks that should, and return the exit code (2 or 1)."""
    everywhere = isinstance(e, _SAME_ON_EVERY_RANK)
    if not everywhere or is_main_process():
        print(f"localize: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
    return 2 if everywhere else 1


# ----------------------------------------------------------------------------------------------- setup


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
        dist.init_process_group(backend, timeout=timedelta(seconds=startup_timeout))
    except (RuntimeError, ValueError) as e:  # DistStoreError, a refused or timed-out rendezvous
        raise PeerError(
            f"rank {rank} could not join the other {int(world) - 1} ranks at {os.environ['MASTER_ADDR']}:"
            f"{os.environ['MASTER_PORT']} within {startup_timeout:g} s: {one_line(e)} (a rank failed to start "
            f"or died before training; look at its log)"
        ) from None
    return True


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


# ----------------------------------------------------------------------------------------------- runtime


class Pipeline:
    """One rank's part: its stage's block, its links to the neighbours, its replica group."""

    def __init__(
        self, lm: LocalModel, timeout: timedelta, device: Any, depth: int, groups: list[dist.ProcessGroup]
    ) -> None:
        self.lm = lm
        self.timeout = timeout
        self.rank = dist.get_rank()
        self.layout = Layout.of(dist.get_world_size(), len(lm.blocks))
        self.stage = self.layout.stage_of(self.rank)
        self.replica = self.layout.replica_of(self.rank)
        self.program: StageProgram = split_step(lm, self.layout.replicas)[self.stage]
        self.device = _device_for(device)
        # the training traffic uses groups with the short timeout (the default group keeps the long
        # rendezvous one); every rank creates every group, in the same order
        self.group = dist.new_group(list(range(self.layout.world_size)), timeout=timeout)
        groups.append(self.group)
        self.stage_group = None
        if self.layout.replicas > 1:
            for s in range(self.layout.stages):
                g = dist.new_group(self.layout.stage_ranks(s), timeout=timeout)
                groups.append(g)
                if s == self.stage:
                    self.stage_group = g
        self._check_same_model()
        self.block = lm.blocks[self.stage]
        if self.device.type != "cpu":
            self.block.module.to(self.device)
            if self.block.aux is not None:
                self.block.aux.to(self.device)
        if self.block.optimizer is None and self.block.trainable:
            self.block.optimizer = _make_optimizer(
                lm._optimizer_factory, self.block
            )  # only this rank's block
        self.entries = _block_entries(lm, self.stage)  # what this block may change, for checkpoints
        self.prev = self._link(self.rank - 1, depth) if self.stage > 0 else None
        self.next = self._link(self.rank + 1, depth) if self.stage < self.layout.stages - 1 else None
        self.state = ops.StepState(lm.loss_fn, [], lm.on_nan, where=f" (rank {self.rank})", comm=self)
        self.step_no, self.epoch, self.samples = 0, 0, 0  # the microbatch in flight, for messages

    def describe(self, rank: int) -> str:
        return f"rank {rank} (stage {self.layout.stage_of(rank)}, replica {self.layout.replica_of(rank)})"

    def _link(self, peer: int, depth: int) -> Link:
        return Link(peer, self.group, self.device, self.timeout, self.describe, depth)

    def _check_same_model(self) -> None:
        """Every rank must hold the same LocalModel; before any step, the same initial parameters too
        (after a run, each rank has trained only its own block, so only the structure is compared)."""
        lm = self.lm
        checksum = 0.0
        if lm.step_count == 0:
            with torch.no_grad():
                checksum = sum(
                    float(p.double().sum()) + float(p.double().abs().sum()) for p in lm.parameters()
                )
        shapes = tuple(tuple(p.shape) for p in lm.parameters())
        mine = (
            len(lm.blocks),
            tuple(lm.plan.cut_positions),
            lm.plan.aux,
            hash(shapes),
            lm.step_count,
            checksum,
        )
        everyone: list[Any] = [None] * self.layout.world_size
        self._collective(
            "checking the model of", lambda: dist.all_gather_object(everyone, mine, group=self.group)
        )
        first = everyone[0]
        for rank, theirs in enumerate(everyone):
            if theirs[:5] != first[:5] or not math.isclose(theirs[5], first[5], rel_tol=1e-9):
                raise ConfigError(
                    f"rank {rank} holds another LocalModel than rank 0 (blocks {theirs[0]} vs {first[0]}, cuts "
                    f"{theirs[1]} vs {first[1]}, aux {theirs[2]!r} vs {first[2]!r}, steps {theirs[4]} vs {first[4]}, "
                    f"initial parameter checksum {theirs[5]:.6g} vs {first[5]:.6g}); build the model and call "
                    f"transform with the same seed and arguments on every rank (torch.manual_seed before the model)"
                )

    def _collective(self, doing: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except RuntimeError as e:
            raise PeerError(
                f"{self.describe(self.rank)} failed {doing} all ranks: {one_line(e)} (a peer process died, "
                f"or hung past the {int(self.timeout.total_seconds())} s timeout; look at its log)"
            ) from None

    # -------------------------------------------------------------- the loop

    def train(self, data, epochs, batch_size, shuffle, seed, checkpoint, gather, log) -> DistributedResult:
        lm = self.lm
        lm.train()
        losses: list[float] = []
        self._collective("starting with", lambda: dist.barrier(group=self.group))
        start, cpu = time.perf_counter(), time.process_time()
        step = 0
        if self.stage == 0:
            for epoch in range(epochs):
                for batch in iter_batches(data, batch_size, shuffle=shuffle, seed=seed, epoch=epoch):
                    flat, target = self._shard(batch, step)
                    self.samples += _batch_len(target)
                    self.step_no, self.epoch = step, epoch
                    losses.append(self._run([*flat, target]))
                    step += 1
                self._log_epoch(log, epoch, epochs, losses)
            last_epoch = epochs - 1
        else:
            epoch, seen = 0, 0
            while True:
                self.step_no = step
                try:
                    value = self._run([])  # the stage program receives first
                except EndOfStream as end:
                    last_epoch = end.epoch
                    break
                if self.epoch != epoch:
                    self._log_epoch(log, epoch, epochs, losses[seen:])
                    epoch, seen = self.epoch, len(losses)
                losses.append(value)
                step += 1
            self._log_epoch(log, epoch, epochs, losses[seen:])
        if self.next is not None:
            self.next.stop(step, last_epoch)
        elapsed, self.cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
        return self._finish(step, self.samples, elapsed, losses, checkpoint, gather, log)

    def _run(self, args: list[Any]) -> float:
        """This stage's slice of the generated step on one microbatch."""
        state = self.state
        state.step, state.optimizers = self.lm.step_count, [b.optimizer for b in self.lm.blocks]
        with torch.enable_grad():
            value = self.program.program(state, *args)
        self.lm.step_count += 1
        return value

    # -------------------------------------------------------------- what the stage's ops call

    def receive(self) -> list[Any]:
        msg = self.prev.recv(self.step_no)
        if msg.op is Op.STOP:
            raise EndOfStream(msg.epoch)
        self.epoch = msg.epoch
        self.samples += _batch_len(msg.values[0])  # the target comes first
        return msg.values

    def send_on(self, values: list[Any]) -> None:
        self.next.send(self.step_no, self.epoch, values)

    def _shard(self, batch: Any, step: int) -> tuple[list[Any], Any]:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ConfigError(
                f"batch {step} is a {type(batch).__name__}; each batch must be an (inputs, target) pair"
            )
        inputs, target = batch
        flat = self.lm._flat_inputs(inputs)
        r, replicas = self.replica, self.layout.replicas
        if replicas > 1:
            n = _batch_len(target)
            if n < replicas:
                raise ConfigError(
                    f"batch {step} holds {n} samples, fewer than the {replicas} replicas of each stage; "
                    f"use batches of at least {replicas} samples"
                )
            flat = [_split(v, r, replicas) for v in flat]
            target = _split(target, r, replicas)
        return [_to(v, self.device) for v in flat], _to(target, self.device)

    # -------------------------------------------------------------- replicas

    def all_reduce(self, value: float) -> float:
        """Average gradients and the loss over the stage's replicas (like DDP); NaN anywhere skips all."""
        finite = math.isfinite(value)
        params = self.block.trainable
        had_grad = [finite and p.grad is not None for p in params]
        grads = [p.grad if ok else torch.zeros_like(p) for p, ok in zip(params, had_grad)]
        buckets: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in grads:
            buckets.setdefault(g.dtype, []).append(g)
        flats = {dt: torch._utils._flatten_dense_tensors(gs) for dt, gs in buckets.items()}
        loss = torch.tensor([value if finite else math.nan], dtype=torch.float64, device=self.device)
        work = [dist.all_reduce(f, group=self.stage_group, async_op=True) for f in flats.values()]
        work.append(dist.all_reduce(loss, group=self.stage_group, async_op=True))
        self._collective("averaging gradients with", lambda: [w.wait() for w in work])
        replicas = self.layout.replicas
        for dt, flat in flats.items():
            flat.div_(replicas)
            for g, reduced in zip(buckets[dt], torch._utils._unflatten_dense_tensors(flat, buckets[dt])):
                g.copy_(reduced)
        for p, g, ok in zip(params, grads, had_grad):
            p.grad = g if ok else None  # params without a gradient stay skipped, as in one process
        return float(loss) / replicas

    def broadcast_buffers(self) -> None:
        """Replica 0's buffers (batch-norm statistics) before each forward, like DDP."""
        buffers = list(self.block.module.buffers())
        if self.block.aux is not None:
            buffers += list(self.block.aux.buffers())
        if not buffers:
            return
        src = self.layout.stage_ranks(self.stage)[0]
        buckets: dict[torch.dtype, list[torch.Tensor]] = {}
        for b in buffers:
            buckets.setdefault(b.dtype, []).append(b)
        for bs in buckets.values():
            flat = torch._utils._flatten_dense_tensors(bs)
            self._collective(
                "sharing buffers with", lambda f=flat: dist.broadcast(f, src, group=self.stage_group)
            )
            if self.replica != 0:
                for b, v in zip(bs, torch._utils._unflatten_dense_tensors(flat, bs)):
                    b.copy_(v)

    # -------------------------------------------------------------- the end

    def _finish(self, steps, samples, elapsed, losses, checkpoint, gather, log) -> DistributedResult:
        lm = self.lm
        folder = Path(checkpoint) if checkpoint is not None else None
        state = None
        if self.replica == 0 and (folder is not None or gather):
            state = {k: v.detach().cpu().clone() for k, v in self._block_state().items()}
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
                opt = self.block.optimizer.state_dict() if self.block.optimizer is not None else None
                _save_atomically(
                    {"block": self.stage, "step": steps, "state": state, "optimizer": opt},
                    folder / f"block{self.stage}.pt",
                )
        mine = (
            self.stage,
            self.replica,
            losses,
            elapsed,
            samples,
            self.cpu_seconds,
            state if gather else None,
        )
        everyone: list[Any] | None = [None] * self.layout.world_size if self.rank == 0 else None
        self._collective(
            "gathering results from", lambda: dist.gather_object(mine, everyone, dst=0, group=self.group)
        )
        result = DistributedResult(
            self.rank,
            self.stage,
            self.replica,
            self.layout,
            steps,
            samples,
            elapsed,
            [[v if s == self.stage else math.nan for s in range(len(lm.blocks))] for v in losses],
        )
        result.cpu_seconds = [self.cpu_seconds]
        if everyone is None:
            return result
        per_stage = {stage: got for stage, replica, got, *_ in everyone if replica == 0}
        result.losses = [[per_stage[s][i] for s in range(len(lm.blocks))] for i in range(steps)]
        result.seconds = max(e[3] for e in everyone)
        result.cpu_seconds = [e[5] for e in everyone]
        result.samples = sum(e[4] for e in everyone if e[0] == 0)
        if gather:
            full = {k: v.detach().cpu().clone() for k, v in lm.state_dict().items()}
            for _, replica, *_, block_state in everyone:
                if replica == 0 and block_state is not None:
                    full.update(block_state)
            lm.load_state_dict(full)  # rank 0's LocalModel now holds every trained block
            if folder is not None:
                result.checkpoint = _save_atomically(full, folder / "model.pt")
        if log is not None:
            last = ", ".join(f"{v:.4f}" for v in result.losses[-1]) if result.losses else "-"
            log(
                f"trained {steps} microbatches on {self.layout.stages} stages x {self.layout.replicas} replicas in "
                f"{result.seconds:.2f} s ({result.throughput:.1f} samples/s); last losses per block: {last}"
            )
        return result

    def _block_state(self) -> dict[str, torch.Tensor]:
        return {key: read() for key, read in self.entries}

    def _log_epoch(self, log, epoch: int, epochs: int, losses: list[float]) -> None:
        if log is None or self.stage != self.layout.stages - 1 or self.replica != 0 or not losses:
            return
        finite = [v for v in losses if math.isfinite(v)]
        mean = sum(finite) / len(finite) if finite else math.nan
        log(f"epoch {epoch + 1}/{epochs}: loss {mean:.4f} (last block, {len(losses)} microbatches)")


def _block_entries(lm: LocalModel, stage: int) -> list[tuple[str, Callable[[], torch.Tensor]]]:
    """(state-dict key, reader) for every entry block ``stage`` may change: the parameters it owns,
    the model buffers it reads (batch-norm statistics) and its aux head. Readers look the tensor up
    on the block's side, so they stay right after the block moved to another device."""
    block = lm.blocks[stage]
    keys = set(lm.state_dict().keys())
    names: dict[int, str] = {}
    for name, t in lm.model.named_parameters(remove_duplicate=False):
        names.setdefault(id(t), f"model.{name}")
    for name, t in lm.model.named_buffers(remove_duplicate=False):
        names.setdefault(id(t), f"model.{name}")
    entries: list[tuple[str, Callable[[], torch.Tensor]]] = []
    owned = {id(p) for p in block.params}
    for p in block.params:
        if names.get(id(p)) in keys:
            entries.append((names[id(p)], lambda p=p: p))
    for mod in block.module.modules():
        for attr, b in mod._buffers.items():
            key = names.get(id(b)) if b is not None else None
            if key in keys and id(b) not in owned:
                entries.append((key, lambda mod=mod, attr=attr: mod._buffers[attr]))
    if block.aux is not None:
        for name in block.aux.state_dict(keep_vars=True):
            key = f"aux.{stage}.{name}"
            if key in keys:
                owner_path, _, attr = name.rpartition(".")
                holder = block.aux.get_submodule(owner_path) if owner_path else block.aux
                entries.append((key, lambda h=holder, a=attr: getattr(h, a)))
    return entries


def _save_atomically(obj: Any, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    return path


def _device_for(device: Any) -> torch.device:
    if device is not None:
        return torch.device(device)
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _is_last_stage(lm: LocalModel) -> bool:
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    k = len(lm.blocks)
    return world % k == 0 and rank % k == k - 1 and rank // k == 0


def _is_inputs(x: Any) -> bool:
    return isinstance(x, torch.Tensor) or (
        isinstance(x, (tuple, list, dict))
        and len(x) > 0
        and all(isinstance(t, torch.Tensor) for t in _tensors(x))
    )


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return list(x.values())
    return list(x)


def _index(x: Any, idx: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x[idx]
    if isinstance(x, dict):
        return {k: v[idx] for k, v in x.items()}
    return tuple(v[idx] for v in x)


def _batch_len(target: Any) -> int:
    return len(target) if isinstance(target, torch.Tensor) and target.dim() > 0 else 1


def _split(value: Any, replica: int, replicas: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        return value.tensor_split(replicas)[replica]
    return value


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if type(value) in (tuple, list):
        return type(value)(_to(v, device) for v in value)
    if type(value) is dict:
        return {k: _to(v, device) for k, v in value.items()}
    return value


# ----------------------------------------------------------------------------------------------- launcher


def main(argv: list[str] | None = None) -> int:
    """``python -m localize.distributed MODEL.py --blocks K ...``, one process per rank under torchrun."""
    parser = argparse.ArgumentParser(
        prog="python -m localize.distributed",
        description="Train MODEL.py's model with local learning, one block per process (run under torchrun).",
    )
    parser.add_argument("model", help="MODEL.py[:factory] defining model(), example_inputs() and dataset()")
    parser.add_argument("--blocks", type=int, required=True, help="K: blocks = pipeline stages")
    parser.add_argument("--aux", default="dgl")
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shuffle", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--checkpoint", default=None, help="directory for block<s>.pt and the assembled model.pt"
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for a peer before stopping"
    )
    parser.add_argument(
        "--startup-timeout",
        type=float,
        default=_STARTUP_TIMEOUT,
        help="seconds the ranks wait for each other to start",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    _set_threads(args.threads)
    try:
        Layout.of(int(os.environ.get("WORLD_SIZE", "1")), args.blocks)  # before building anything
        lm, train_data = _build_from_file(args)
    except LocalizeError as e:
        return report_error(e)
    return main_from_cli(
        lm,
        train_data,
        epochs=args.epochs,
        batch_size=args.batch_size,
        shuffle=args.shuffle,
        seed=args.seed,
        checkpoint=args.checkpoint,
        timeout=args.timeout,
        startup_timeout=args.startup_timeout,
        log=None if args.quiet else print,
    )


def run_cli(args: argparse.Namespace) -> int:
    """``localize MODEL.py --blocks K --train --distributed``: this rank's part; returns the exit code.

    :mod:`localize.cli.main` calls it on every rank torchrun starts, with its parsed arguments. Every
    rank builds the model as ``localize --train`` does (seeded, same ``transform`` options); stage 0
    reads ``dataset()``'s training split in the batches ``--train`` uses (the same order for the same
    ``--seed``); each stage trains its block; rank 0 writes ``block<s>.pt``, the assembled
    ``model.pt`` and ``metrics.json`` into ``--out``. ``--device cuda`` uses nccl (one GPU per
    process, ``cuda:LOCAL_RANK``), the default ``cpu`` gloo. Errors are one line on stderr (exit
    code 2 for a bad launch, printed by rank 0; 1 for a lost peer, printed by the ranks that saw it).
    """
    _set_threads(None)
    try:
        blocks, cuts, backend = _cli_options(args)
        Layout.of(int(os.environ.get("WORLD_SIZE", "1")), blocks)  # before building anything
        out = _cli_out(args)
        lm, mf = load_local_model(
            args.model,
            blocks,
            aux=args.aux,
            optimizer=args.optimizer,
            lr=args.lr,
            seed=args.seed,
            balance=getattr(args, "balance", "flops"),
            cuts=cuts,
        )
        if len(lm.blocks) != blocks:
            raise ConfigError(
                f"--cuts makes {len(lm.blocks)} blocks but --blocks is {blocks}; give K - 1 cuts"
            )
        data = _cli_data(args, mf) if int(os.environ.get("RANK", "0")) % blocks == 0 else None
    except LocalizeError as e:
        return report_error(e)
    try:
        result = train(
            lm,
            data,
            epochs=args.epochs,
            checkpoint=out,
            timeout=getattr(args, "timeout", 30.0),
            startup_timeout=getattr(args, "startup_timeout", _STARTUP_TIMEOUT),
            backend=backend,
            log=print if is_main_process() or _is_last_stage(lm) else None,
        )
    except LocalizeError as e:
        return report_error(e)
    if result.rank == 0:
        metrics = {
            "world_size": result.layout.world_size,
            "stages": result.layout.stages,
            "replicas": result.layout.replicas,
            "steps": result.steps,
            "samples": result.samples,
            "seconds": result.seconds,
            "samples_per_second": result.throughput,
            "losses": [[v if math.isfinite(v) else None for v in step] for step in result.losses],
        }
        _write_text_atomically(json.dumps(metrics, indent=1), out / "metrics.json")
        print(
            f"wrote {out}/: {', '.join(sorted(p.name for p in out.iterdir() if not p.name.startswith('.')))}"
        )
    return 0


def _cli_options(args: argparse.Namespace) -> tuple[int, list[str] | None, str]:
    """(K, cuts, backend) for ``--distributed``, or a ConfigError for flags that do not apply."""
    if not args.train:
        raise ConfigError("--distributed trains one block per process; add --train")
    for flag, attr in (
        ("--compare-bp", "compare_bp"),
        ("--checkpoint-every", "checkpoint_every"),
        ("--resume", "resume"),
    ):
        if getattr(args, attr, None):
            raise ConfigError(
                f"{flag} does not apply to --distributed (each rank checkpoints into --out at the end)"
                f"; drop {flag}"
            )
    cuts = [c.strip() for c in args.cuts.split(",") if c.strip()] if getattr(args, "cuts", None) else None
    blocks = args.blocks or (len(cuts) + 1 if cuts else None)
    if blocks is None:
        raise ConfigError(
            "--distributed needs --blocks K (one pipeline stage per process: torchrun --nproc-per-node K)"
        )
    device = getattr(args, "device", "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available on this machine; use --device cpu (gloo)")
    return blocks, cuts, "nccl" if device == "cuda" else "gloo"


def _cli_out(args: argparse.Namespace) -> Path:
    from localize.compiler.model_file import split_spec

    path, _ = split_spec(args.model)
    out = Path(args.out) if args.out else Path("localize_out") / Path(path).stem
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"--out {out}: cannot create it ({e.strerror}); choose a writable directory"
        ) from None
    return out


def _cli_data(args: argparse.Namespace, mf: Any) -> Callable[[int], Iterable]:
    """Epoch -> the batches ``localize --train`` draws (seeded by ``--seed`` and the epoch)."""
    from localize.data import epoch_batches

    if not mf.has_dataset:
        raise ConfigError(f"{args.model} defines no dataset(); add `def dataset(): return (train, test)`")
    train_data = mf.dataset()[0]
    return lambda epoch: epoch_batches(train_data, args.batch_size, epoch, args.seed)


def _write_text_atomically(text: str, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def _set_threads(threads: int | None) -> None:
    if threads is None and "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        threads = max(1, (os.cpu_count() or 1) // local)  # don't oversubscribe the cores
    if threads is not None:
        torch.set_num_threads(threads)


def load_local_model(
    spec: str,
    blocks: int | None,
    *,
    aux: str = "dgl",
    optimizer: str = "adamw",
    lr: float | None = None,
    seed: int = 0,
    balance: str = "flops",
    cuts: list[str] | None = None,
) -> tuple[LocalModel, Any]:
    """The LocalModel the launcher builds on every rank from ``MODEL.py[:factory]``, and the model file.

    Seeded before the model is built, so every rank (and an in-process reference) gets the same one.
    """
    from localize.compiler.model_file import (
        load_model_file,
        localize_file,  # the CLI's compile step: same RNG draws
    )

    mf = load_model_file(spec)
    lm, _ = localize_file(
        mf, blocks=blocks, aux=aux, balance=balance, cuts=cuts, optimizer=optimizer, lr=lr, seed=seed
    )
    return lm, mf


def _build_from_file(args: argparse.Namespace) -> tuple[LocalModel, Any]:
    lm, mf = load_local_model(
        args.model, args.blocks, aux=args.aux, optimizer=args.optimizer, lr=args.lr, seed=args.seed
    )
    if int(os.environ.get("RANK", "0")) % args.blocks != 0:
        return lm, None  # only stage 0 reads the data
    if not mf.has_dataset:
        raise ConfigError(f"{args.model} defines no dataset(); add `def dataset(): return (train, test)`")
    return lm, mf.dataset()[0]
