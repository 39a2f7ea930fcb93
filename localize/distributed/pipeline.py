"""Blocks on separate processes: local learning as a pipeline over torch.distributed.

Local learning has no backward locking: block ``s`` trains on microbatch ``t`` while block ``s+1``
trains on ``t-1``, and only forward messages travel. With ``world_size = K × R`` each of the K
blocks (and its aux head) runs on R ranks:

* stage 0 reads the data (replica ``r`` takes the ``r``-th shard of every batch); every stage
  receives the activations and the target from the previous stage, runs its block, sends its
  output on at once, then computes its local loss, backpropagates inside the block and steps its
  own optimizer. No gradient crosses a rank. Values a later block needs (a mask made by block 0
  and read by block 3, model inputs an aux loss reconstructs) are forwarded by the stages between.
* the R replicas of a stage run their block and head under ``DistributedDataParallel`` over a
  per-stage process group: gradients are averaged in buckets while backward runs, buffers come
  from replica 0 before each forward, and between the calls of an accumulation cycle DDP does not
  synchronise (``no_sync``). A chunked block (``--chunk-size``) backpropagates once per chunk,
  which DDP cannot follow: its replicas agree on the loss, then average the gradients after the
  last chunk in one all-reduce.

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

import itertools
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from localize.distributed import replicas as stage_replicas
from localize.distributed.batches import batch_len, iter_batches, shard_of, to_device
from localize.distributed.checkpoint import restore_stage, save_state, stage_state
from localize.distributed.ops import EndOfStream
from localize.distributed.stages import Layout, StageProgram, split_step
from localize.distributed.wire import Link, Op, PeerError, one_line
from localize.errors import ConfigError
from localize.runtime import ops
from localize.runtime.model import LocalModel

__all__ = ["DistributedResult", "Pipeline"]


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


# ----------------------------------------------------------------------------------------------- setup


# ----------------------------------------------------------------------------------------------- runtime


class Pipeline:
    """One rank's part: its stage's block, its links to the neighbours, its replica group."""

    def __init__(
        self,
        lm: LocalModel,
        timeout: timedelta,
        device: Any,
        depth: int,
        groups: list[dist.ProcessGroup],
        resume: str | os.PathLike | None = None,
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
        self.block = lm.blocks[self.stage]
        if self.device.type != "cpu":
            self.block.module.to(self.device)
            if self.block.aux is not None:
                self.block.aux.to(self.device)
        lm._ensure_optimizers([self.block])  # only this rank's block: optimizer, scheduler, scaler
        self.entries = _block_entries(lm, self.stage)  # what this block may change, for checkpoints
        self.state = ops.StepState(lm.loss_fn, [], lm.on_nan, where=f" (rank {self.rank})", comm=self)
        self.resumed: dict[str, Any] | None = None
        if resume is not None:  # before the model check: every rank must resume from the same step
            self.resumed = restore_stage(lm, self.stage, self.entries, self.rank, Path(resume))
            self.resumed["folder"] = Path(resume)
            self.state.pending = self.resumed["pending"]
        self._check_same_model()
        # checkpoints travel on a group of their own, apart from the activations' point-to-point traffic
        self.checkpoint_group = dist.new_group(
            list(range(self.layout.world_size)), timeout=max(timeout, timedelta(seconds=120))
        )
        groups.append(self.checkpoint_group)
        self.ddp = None
        if self.layout.replicas > 1:
            self._replicate()
        self.prev = self._link(self.rank - 1, depth) if self.stage > 0 else None
        self.next = self._link(self.rank + 1, depth) if self.stage < self.layout.stages - 1 else None
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

    def train(
        self, data, epochs, batch_size, shuffle, seed, checkpoint, gather, log, every=0, checkpoints=None
    ) -> DistributedResult:
        lm = self.lm
        lm.train()
        losses: list[float] = []
        self.every, self.checkpoints = every, checkpoints
        step, position = 0, {"epoch": 0, "batch": 0}
        if self.resumed is not None:
            step = self.resumed["done"]
            position = self.resumed["position"] or position
            if log is not None and self.rank == 0:
                log(
                    f"resumed from {self.resumed['folder']} at microbatch {step} (epoch {position['epoch'] + 1}, "
                    f"batch {position['batch']})"
                )
        self._collective("starting with", lambda: dist.barrier(group=self.group))
        start, cpu = time.perf_counter(), time.process_time()
        first = step
        if self.stage == 0:
            for epoch in range(position["epoch"], epochs):
                skip = position["batch"] if epoch == position["epoch"] else 0
                batches = iter_batches(data, batch_size, shuffle=shuffle, seed=seed, epoch=epoch)
                for i, batch in enumerate(itertools.islice(batches, skip, None), start=skip):
                    flat, target = self._shard(batch, step)
                    self.samples += batch_len(target)
                    self.step_no, self.epoch = step, epoch
                    losses.append(self._run([*flat, target]))
                    step += 1
                    self._maybe_checkpoint(step, {"epoch": epoch, "batch": i + 1})
                self._log_epoch(log, epoch, epochs, losses)
            last_epoch = epochs - 1
        else:
            epoch, seen = position["epoch"], 0
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
                self._maybe_checkpoint(step, None)
            self._log_epoch(log, epoch, epochs, losses[seen:])
        if self.next is not None:
            self.next.stop(step, last_epoch)
        elapsed, self.cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
        self.position = {"epoch": epochs, "batch": 0}
        return self._finish(step - first, step, self.samples, elapsed, losses, checkpoint, gather, log)

    def _maybe_checkpoint(self, step: int, position: dict[str, int] | None) -> None:
        if self.every and step % self.every == 0:
            self._save(self.checkpoints, step, position)

    def _save(self, root: Path, step: int, position: dict[str, int] | None) -> Path:
        """Every rank writes its stage's shard of microbatch ``step`` (a collective: each rank calls
        it after its own ``step``-th microbatch; it counts once the last rank has written)."""
        state = stage_state(
            self.lm, self.stage, self.entries, self.rank, self.state.pending, position, self.layout
        )
        state[f"loop/{self.stage}"]["done"] = step
        return self._collective(
            "writing a checkpoint with",
            lambda: save_state(state, root, step, group=self.checkpoint_group),
        )

    def _run(self, args: list[Any]) -> float:
        """This stage's slice of the generated step on one microbatch."""
        state = self.state
        state.step, state.optimizers = self.lm.step_count, [b.optimizer for b in self.lm.blocks]
        state.schedulers = [b.scheduler for b in self.lm.blocks]
        state.scalers = [b.scaler for b in self.lm.blocks]
        ops.begin_step(state, args)
        if self.ddp is not None:
            self._sync_gradients()
        with torch.enable_grad():
            value = self.program.program(state, *args)
        ops.end_step(state)
        self.lm.step_count += 1
        return value

    # -------------------------------------------------------------- what the stage's ops call

    def receive(self) -> list[Any]:
        msg = self.prev.recv(self.step_no)
        if msg.op is Op.STOP:
            raise EndOfStream(msg.epoch)
        self.epoch = msg.epoch
        self.samples += batch_len(msg.values[0])  # the target comes first
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
            n = batch_len(target)
            if n < replicas:
                raise ConfigError(
                    f"batch {step} holds {n} samples, fewer than the {replicas} replicas of each stage; "
                    f"use batches of at least {replicas} samples"
                )
            flat = [shard_of(v, r, replicas) for v in flat]
            target = shard_of(target, r, replicas)
        return [to_device(v, self.device) for v in flat], to_device(target, self.device)

    # -------------------------------------------------------------- replicas

    def agree_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The replicas' mean loss carrying this replica's gradient; NaN on all when on any.

        ``loss - loss.detach() + mean`` has the mean's value and the local loss's gradient, so the
        step reports what one process on the whole batch reports, and DDP's all-reduce (inside
        ``backward``) averages the gradients. A non-finite loss anywhere makes every replica skip
        ``backward`` together, so none waits for a gradient that never comes.
        """
        mean = self.agree_value(loss.detach())
        if not math.isfinite(mean):
            return torch.full_like(loss.detach(), math.nan)
        return loss - loss.detach() + torch.tensor(mean, dtype=loss.dtype, device=loss.device).reshape(loss.shape)

    def agree_value(self, value: float | torch.Tensor) -> float:
        """The replicas' mean of ``value``; NaN on every replica when it is not finite on one."""
        return stage_replicas.mean_over(value, self.layout.replicas, self.stage_group, self.device, self._collective)

    def average_gradients(self, block: int, value: float, accumulate: int) -> None:
        """A chunked block's gradients averaged over the stage's replicas when this call updates
        (:func:`localize.distributed.replicas.average_gradients`)."""
        optimizer = ops.updating(self.state, block, value, accumulate)
        if optimizer is not None:
            stage_replicas.average_gradients(optimizer, self.layout.replicas, self.stage_group, self._collective)

    def _replicate(self) -> None:
        """Run the block and its head under ``DistributedDataParallel`` over the stage's replicas
        (bucketed gradient all-reduce overlapping backward, buffers from replica 0 before every
        forward); a chunked block starts from replica 0's parameters and buffers, as DDP would, and
        averages its gradients after the chunks (:meth:`average_gradients`)."""
        if self.lm.chunking is not None:
            modules = [m for m in (self.block.module, self.block.aux) if m is not None]
            stage_replicas.start_alike(modules, self.layout.rank(self.stage, 0), self.stage_group, self._collective)
            return
        self.ddp = stage_replicas.ddp(self.block.module, self.block.aux, self.block.trainable, self.stage_group, self.device)
        program = self.program.program
        for node in program.graph.nodes:
            if node.op == "call_module" and node.target.startswith("block_"):
                setattr(program, node.target, self.ddp)

    def _sync_gradients(self) -> None:
        """Whether this call's backward all-reduces: only when it updates (DDP's ``no_sync`` between
        the calls of an accumulation cycle, whose gradients add up locally)."""
        state = self.state
        due = state.update if state.update is not None else state.pending + 1 >= self.lm.accumulate
        self.ddp.require_backward_grad_sync = due

    # -------------------------------------------------------------- the end

    def _finish(self, steps, done, samples, elapsed, losses, checkpoint, gather, log) -> DistributedResult:
        lm = self.lm
        folder = Path(checkpoint) if checkpoint is not None else None
        if folder is not None:  # every stage its own shard, in parallel: resumable with --epochs MORE
            self._save(folder / "checkpoint", done, self.position if self.stage == 0 else None)
        state = None
        if self.replica == 0 and gather:
            state = {k: v.detach().cpu().clone() for k, v in self._block_state().items()}
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


# ----------------------------------------------------------------------------------------------- launcher
