"""Training for the CLI: the epoch loop, evaluation, metrics and curves.

The data order is defined once, in :mod:`localize.data` (:func:`~localize.data.batch_order`,
:func:`~localize.data.epoch_batches`, :func:`~localize.data.iterate_batches`); ``program.py`` imports
the same functions, which is what makes its losses equal to ``LocalModel.train_step`` for the same
seed.

Example:
    >>> import torch
    >>> from localize.data import batch_order
    >>> [b.tolist() for b in batch_order(5, 2, epoch=0, seed=0)]
    [[4, 0], [1, 3]]
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from localize.compiler.traced import output_leaf
from localize.data import epoch_batches, num_batches, sequential_batches
from localize.errors import ConfigError, TargetError
from localize.extras import require
from localize.runtime.memory import SavedActivationMeter
from localize.runtime.model import LocalModel

__all__ = [
    "Checkpointing",
    "History",
    "evaluate",
    "plot_curves",
    "train_backprop",
    "train_local",
]

_MEASURED_STEPS = 3  # steps run under the saved-activation meter (every step has the same peak)


# ----------------------------------------------------------------------------- training


@dataclass
class Epoch:
    epoch: int
    train_losses: list[float]  # mean loss per block (one entry for backprop)
    test_loss: float
    test_accuracy: float | None
    samples_per_s: float
    seconds: float


@dataclass
class History:
    """What one training run measured."""

    name: str
    epochs: list[Epoch] = field(default_factory=list)
    step_losses: list[list[float]] = field(default_factory=list)  # per step, per block
    peak_saved_bytes: int = 0  # largest saved-activation memory alive at once (first steps)
    step_ms: float = 0.0  # mean wall time of a training step (warm-up steps excluded)

    @property
    def final(self) -> Epoch | None:
        return self.epochs[-1] if self.epochs else None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["step_losses"] = [[_finite(v) for v in s] for s in self.step_losses]
        return d

    @staticmethod
    def from_json(d: dict[str, Any]) -> History:
        """The inverse of :meth:`to_json` (``None`` losses come back as NaN)."""
        return History(
            d["name"],
            [Epoch(**e) for e in d["epochs"]],
            [[math.nan if v is None else v for v in s] for s in d["step_losses"]],
            d["peak_saved_bytes"],
            d["step_ms"],
        )


@dataclass
class Checkpointing:
    """Where local training stands, saved every ``every`` steps by ``save(position)``.

    ``restore()`` (for ``--resume``) loads a checkpoint into the model, optimizers and RNG and
    returns the position it was saved at; it is called right before the first step, so nothing
    between loading and training draws from the RNG.
    """

    every: int = 0
    save: Callable[[dict[str, Any]], None] | None = None
    restore: Callable[[], dict[str, Any]] | None = None


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def train_local(
    lm: LocalModel,
    train: Any,
    test: Any,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    device: torch.device,
    console: Console,
    checkpointing: Checkpointing | None = None,
) -> History:
    """Train ``lm`` with local learning (``lm.train_step``), evaluating after every epoch.

    With ``checkpointing`` it saves where it stands every ``checkpointing.every`` steps and/or
    starts from ``checkpointing.restore()``'s position instead of from the seed.
    """
    index = lm.plan.output_index

    def forward(*inputs: torch.Tensor) -> torch.Tensor:
        return output_leaf(lm(*inputs), index)

    exclude = list(lm.parameters())
    return _fit(
        f"local ({lm.plan.num_blocks} blocks)",
        lm,
        lm.train_step,
        forward,
        lm.loss_fn,
        train,
        test,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        device=device,
        console=console,
        exclude=exclude,
        labels=[f"B{b.index}" for b in lm.blocks],
        checkpointing=checkpointing,
    )


def train_backprop(
    model: nn.Module,
    lm: LocalModel,
    train: Any,
    test: Any,
    *,
    optimizer: str,
    lr: float | None,
    epochs: int,
    batch_size: int,
    seed: int,
    device: torch.device,
    console: Console,
) -> History:
    """Train ``model`` (a copy of the untransformed model) with plain backprop, same loss and data,
    and the same training-loop options as ``lm`` (accumulation, clipping, autocast, schedule), run by
    the step graph's own runtime ops on one optimizer over the whole model."""
    from localize.runtime import ops
    from localize.runtime.optim import build_optimizer

    traced, index, loss_fn = lm.plan.traced, lm.plan.output_index, lm.loss_fn
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(optimizer, params, lr=lr)
    state = ops.StepState(
        loss_fn,
        [opt],
        schedulers=ops.make_schedulers([opt], lm._scheduler_factory),
        scalers=ops.make_scalers([opt], lm.autocast),
    )
    acc = lm.accumulate

    def call(inputs: tuple) -> Any:
        return traced.call_model(model, inputs)

    def step(inputs: tuple, target: torch.Tensor) -> list[float]:
        ops.begin_step(state, list(inputs))
        mode = ops.autocast_enter(state, 0, lm.autocast) if lm.autocast else None
        loss = ops.local_loss(state, 0, output_leaf(call(inputs), index), target)
        if mode is not None:
            ops.autocast_exit(state, 0, mode)
        value = ops.check_loss(state, 0, ops.backward(state, 0, loss, acc))
        if lm.clip_grad_norm is not None:
            ops.clip_gradients(state, 0, value, lm.clip_grad_norm, acc)
        ops.scheduler_step(state, 0, ops.optimizer_step(state, 0, value, acc), acc)
        ops.end_step(state)
        return [value]

    def forward(*inputs: torch.Tensor) -> torch.Tensor:
        return output_leaf(call(inputs), index)

    return _fit(
        "backprop",
        model,
        step,
        forward,
        loss_fn,
        train,
        test,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        device=device,
        console=console,
        exclude=params,
        labels=["loss"],
    )


def _fit(
    name: str,
    module: nn.Module,
    step: Callable[..., list[float]],
    forward: Callable[..., torch.Tensor],
    loss_fn: Callable,
    train: Any,
    test: Any,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    device: torch.device,
    console: Console,
    exclude: list[torch.Tensor],
    labels: list[str],
    checkpointing: Checkpointing | None = None,
) -> History:
    history = History(name)
    times: list[float] = []
    ckpt = checkpointing or Checkpointing()
    # where training starts: epoch, batches already done in it, and that epoch's running sums
    start: dict[str, Any] = {"epoch": 0, "batch": 0, "sums": [0.0] * len(labels), "steps": 0, "samples": 0}
    if ckpt.restore is not None:
        start = ckpt.restore()  # model, heads, optimizers and RNG restored; no reseeding
        history = History.from_json(start["history"])
        console.print(f"resuming at epoch {start['epoch'] + 1}, step {len(history.step_losses)}")
    else:
        torch.manual_seed(seed)  # program.py starts from the same RNG state
    total = num_batches(train, batch_size)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TextColumn("{task.fields[losses]}"),
        TextColumn("{task.fields[speed]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        for epoch in range(start["epoch"], epochs):
            task = progress.add_task(f"{name} epoch {epoch + 1}/{epochs}", total=total, losses="", speed="")
            module.train()
            sums = [0.0] * len(labels)
            steps, samples, begun = 0, 0, time.perf_counter()
            batches = epoch_batches(train, batch_size, epoch, seed)
            if epoch == start["epoch"] and start["batch"]:
                # the same batches in the same order: skip the ones the checkpoint had trained on
                batches = itertools.islice(batches, start["batch"], None)
                sums, steps, samples = list(start["sums"]), start["steps"], start["samples"]
                progress.update(task, completed=steps)
            for inputs, target in batches:
                inputs = tuple(x.to(device) for x in inputs)
                target = target.to(device)
                t0 = time.perf_counter()
                if len(history.step_losses) < _MEASURED_STEPS:
                    with SavedActivationMeter(exclude) as meter:
                        losses = step(inputs, target)
                    history.peak_saved_bytes = max(history.peak_saved_bytes, meter.peak_bytes)
                else:
                    losses = step(inputs, target)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    times.append(time.perf_counter() - t0)
                history.step_losses.append(list(losses))
                sums = [s + v for s, v in zip(sums, losses)]
                steps += 1
                samples += len(target)
                rate = samples / max(time.perf_counter() - begun, 1e-9)
                progress.update(
                    task, advance=1, losses=" ".join(f"{v:.3f}" for v in losses), speed=f"{rate:,.0f} samples/s"
                )
                if ckpt.save is not None and ckpt.every and len(history.step_losses) % ckpt.every == 0:
                    position = {"epoch": epoch, "batch": steps, "sums": sums, "steps": steps, "samples": samples}
                    ckpt.save(position | {"history": history.to_json()})
            if steps == 0:
                raise ConfigError("the training data gave no batches; give dataset() some training samples")
            seconds = time.perf_counter() - begun
            progress.remove_task(task)
            test_loss, accuracy = evaluate(forward, module, test, max(batch_size, 256), loss_fn, device)
            record = Epoch(epoch + 1, [s / steps for s in sums], test_loss, accuracy, samples / seconds, seconds)
            history.epochs.append(record)
            console.print(_epoch_line(name, record, epochs, labels))
    if times:
        history.step_ms = 1000 * sum(times) / len(times)
    elif ckpt.restore is None:
        history.step_ms = math.nan
    return history


def _epoch_line(name: str, e: Epoch, epochs: int, labels: list[str]) -> str:
    losses = " ".join(f"{v:.3f}" for v in e.train_losses)
    what = "block losses" if len(labels) > 1 else "loss"
    acc = f"test acc {100 * e.test_accuracy:5.1f}%  " if e.test_accuracy is not None else ""
    return (
        f"{name} epoch {e.epoch}/{epochs}  {what} {losses}  {acc}test loss {e.test_loss:.3f}  "
        f"{e.samples_per_s:,.0f} samples/s  {e.seconds:.1f}s"
    )


@torch.no_grad()
def evaluate(
    forward: Callable[..., torch.Tensor],
    module: nn.Module,
    data: Any,
    batch_size: int,
    loss_fn: Callable,
    device: torch.device,
) -> tuple[float, float | None]:
    """(mean test loss, accuracy or None): accuracy when targets are class indices of the output."""
    was_training = module.training
    module.eval()
    loss_sum, count, correct, counted = 0.0, 0, 0, 0
    try:
        for inputs, target in sequential_batches(data, batch_size):
            inputs = tuple(x.to(device) for x in inputs)
            target = target.to(device)
            pred = forward(*inputs)
            try:
                loss = float(loss_fn(pred, target))
            except Exception as e:  # noqa: BLE001
                raise TargetError(f"loss_fn failed on test predictions {tuple(pred.shape)}: {e}") from e
            loss_sum += loss * len(target)
            count += len(target)
            if not target.is_floating_point() and tuple(pred.shape[:-1]) == tuple(target.shape):
                correct += int((pred.argmax(-1) == target).sum())
                counted += target.numel()
    finally:
        module.train(was_training)
    if count == 0:
        raise ConfigError("the test data gave no batches; give dataset() some test samples")
    return loss_sum / count, (correct / counted if counted else None)


def copy_for_backprop(model: nn.Module) -> nn.Module:
    """An independent copy with the same initial weights (the LocalModel trains ``model`` in place)."""
    return copy.deepcopy(model)


# ----------------------------------------------------------------------------- metrics and curves


def plot_curves(histories: list[History], path: Path) -> None:
    """Training losses per step and the test metric per epoch, one line per block / run.

    Raises :class:`~localize.extras.MissingExtra` without matplotlib (the ``plot`` extra)."""
    matplotlib = require("matplotlib", "plot", "curves.png")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_test) = plt.subplots(1, 2, figsize=(11, 4))
    for h in histories:
        if not h.step_losses:
            continue
        k = len(h.step_losses[0])
        for b in range(k):
            ys = [s[b] for s in h.step_losses]
            label = f"{h.name}: block {b}" if k > 1 else h.name
            ax_loss.plot(range(1, len(ys) + 1), _smooth(ys), label=label, linewidth=1.2 if k > 1 else 1.8)
    ax_loss.set(xlabel="step", ylabel="training loss (moving average)", title="training losses")
    ax_loss.legend(fontsize=8)
    use_acc = all(e.test_accuracy is not None for h in histories for e in h.epochs)
    for h in histories:
        xs = [e.epoch for e in h.epochs]
        ys = [100 * e.test_accuracy if use_acc else e.test_loss for e in h.epochs]
        ax_test.plot(xs, ys, marker="o", label=h.name)
    ax_test.set(
        xlabel="epoch",
        ylabel="test accuracy (%)" if use_acc else "test loss",
        title="test accuracy" if use_acc else "test loss",
    )
    ax_test.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_test.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _smooth(ys: list[float], window: int = 20) -> list[float]:
    out, acc = [], []
    for y in ys:
        acc.append(y)
        if len(acc) > window:
            acc.pop(0)
        finite = [v for v in acc if math.isfinite(v)]
        out.append(sum(finite) / len(finite) if finite else math.nan)
    return out
