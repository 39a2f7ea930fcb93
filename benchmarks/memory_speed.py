"""Memory and step time: plain backprop vs checkpointing vs localize, on a ResNet, a 1D ResNet, a ViT and a GPT.

Everything is measured side by side in one run per model, on the same weights, batch and optimizer
(SGD with momentum):

* ``backprop``: one loss at the output, full backward;
* ``checkpoint per unit``: backprop with every unit (residual block, transformer layer) of the
  original model under ``torch.utils.checkpoint``, wrapped by hand as users do (``UNITS``);
* localize at K = 2, 4, 8 (defaults: ``dgl`` heads, memory balance), K = 4 balanced by FLOPs (the
  distributed default), and K = 4 with ``recompute=True`` (each unit recomputed in its block's backward).

Memory: the peak of saved-for-backward bytes alive at once (``SavedActivationMeter``, deduplicated by
storage, parameters excluded) and the *total* peak of a step as torch's ``MemTracker`` counts it
(parameters, gradients, optimizer state, activations, temporaries; ``localize.memory``). Time: the
median of ``--steps`` steps after ``--warmup``, methods timed round-robin so machine drift hits all
alike. ``--largest-batch``: the largest batch whose total peak fits a budget of ``--budget`` times
backprop's peak at the base batch, found by bisection with the tracker (from a linear estimate).

    python benchmarks/memory_speed.py                       # resnet, resnet1d, vit, gpt; table per model
    python benchmarks/memory_speed.py --models resnet --largest-batch
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch.utils.checkpoint import checkpoint

import localize
from localize.runtime.memory import SavedActivationMeter
from localize.zoo import GPT, ResNet1d, ResNet2d, ViT


def sgd(params):
    return torch.optim.SGD(params, lr=0.01, momentum=0.9)


MODELS: dict[str, tuple[Callable[[], torch.nn.Module], Callable[[int], tuple]]] = {
    "resnet": (
        lambda: ResNet2d(3, 10, widths=(16, 32, 64, 128), blocks_per_stage=(2, 2, 2, 2)),
        lambda b: (torch.randn(b, 3, 32, 32), torch.randint(0, 10, (b,))),
    ),
    "resnet1d": (  # the main example's 1D ResNet on MNIST-1D-shaped signals
        lambda: ResNet1d(in_channels=1, num_classes=10),
        lambda b: (torch.randn(b, 1, 40), torch.randint(0, 10, (b,))),
    ),
    "vit": (
        lambda: ViT(image_size=32, patch_size=4, in_channels=3, num_classes=10, dim=128, depth=8, heads=4),
        lambda b: (torch.randn(b, 3, 32, 32), torch.randint(0, 10, (b,))),
    ),
    "gpt": (
        lambda: GPT(vocab_size=96, block_size=256, dim=128, depth=8, heads=4),
        lambda b: (torch.randint(0, 96, (b, 256)), torch.randint(0, 96, (b, 256))),
    ),
}
BATCH = {"resnet": 64, "resnet1d": 512, "vit": 64, "gpt": 8}
UNITS = {  # the containers whose children are the units checkpointing wraps
    "resnet": ("layer1", "layer2", "layer3", "layer4"),
    "resnet1d": ("layer1", "layer2", "layer3"),
    "vit": ("layers",),
    "gpt": ("layers",),
}

METHODS = {  # name -> transform options (None: plain backprop)
    "backprop": None,
    "checkpoint per unit": "checkpoint",
    "localize K=2": {"blocks": 2},
    "localize K=4": {"blocks": 4},
    "localize K=8": {"blocks": 8},
    "localize K=4, balance=flops": {"blocks": 4, "balance": "flops"},
    "localize K=4, recompute": {"blocks": 4, "recompute": True},
}


class Backprop:
    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.optimizer = model, sgd(model.parameters())

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        out = self.model(x)
        F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
        self.optimizer.step()


def checkpointed(model: torch.nn.Module, model_name: str) -> torch.nn.Module:
    """``model`` with each unit's forward under ``torch.utils.checkpoint`` (non-reentrant)."""
    for container in UNITS[model_name]:
        for unit in model.get_submodule(container).children():
            unit.forward = functools.partial(checkpoint, unit.forward, use_reentrant=False)
    return model


def make(name: str, model_name: str, batch: tuple) -> Any:
    torch.manual_seed(0)
    model = MODELS[model_name][0]()
    options = METHODS[name]
    if options is None:
        return Backprop(model)
    if options == "checkpoint":
        return Backprop(checkpointed(model, model_name))
    loss = None if model_name != "gpt" else (lambda p, t: F.cross_entropy(p.reshape(-1, p.shape[-1]), t.reshape(-1)))
    return localize.transform(model, example_inputs=(batch[0][:2],), optimizer=sgd, loss_fn=loss, **options)


def saved_peak(step: Any, batch: tuple) -> int:
    with SavedActivationMeter(step.model.parameters()) as meter:
        step.train_step(*batch)
    return meter.peak_bytes


def total_peak(step: Any, batch: tuple) -> int:
    if isinstance(step, Backprop):
        return localize.memory(step.model, batch[0], batch[1], optimizer=step.optimizer,
                               loss_fn=lambda p, t: F.cross_entropy(p.reshape(-1, p.shape[-1]), t.reshape(-1))).total
    return localize.memory(step, *batch).total


def largest_batch(name: str, model_name: str, budget: int, base: int) -> int:
    """Largest batch whose total peak fits ``budget``: a linear estimate from two sizes, then bisection."""
    data = MODELS[model_name][1]

    def peak(b: int) -> int:
        batch = data(b)
        return total_peak(make(name, model_name, batch), batch)

    p1, p2 = peak(base), peak(2 * base)
    per = max(1.0, (p2 - p1) / base)
    guess = max(1, int(base + (budget - p1) / per))
    lo, hi = max(1, int(guess * 0.85)), int(guess * 1.15) + 1
    while peak(lo) > budget and lo > 1:
        hi, lo = lo, max(1, lo // 2)
    while peak(hi) <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > max(1, lo // 50):  # to 2 %
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if peak(mid) <= budget else (lo, mid)
    return lo


def run_model(model_name: str, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    base = BATCH[model_name] if args.batch is None else args.batch
    batch = MODELS[model_name][1](base)
    steps = {name: make(name, model_name, batch) for name in METHODS}
    saved = {name: saved_peak(step, batch) for name, step in steps.items()}
    total = {name: total_peak(step, batch) for name, step in steps.items()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(args.warmup + args.steps):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step.train_step(*batch)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    largest = {}
    if args.largest_batch:
        budget = int(args.budget * total["backprop"])
        largest = {name: largest_batch(name, model_name, budget, base) for name in METHODS}
    table = Table(title=f"{model_name}, batch {base}, {torch.get_num_threads()} threads")
    cols = ["method", "saved MB", "x bp", "total peak MB", "x bp", "step ms", "x bp"]
    if largest:
        cols += [f"largest batch in {args.budget:g}x bp peak", "x bp"]
    for col in cols:
        table.add_column(col, justify="left" if col == "method" else "right")
    for name in METHODS:
        row = [name, f"{saved[name] / 1e6:.1f}", f"{saved[name] / saved['backprop']:.2f}",
               f"{total[name] / 1e6:.1f}", f"{total[name] / total['backprop']:.2f}",
               f"{ms[name]:.0f}", f"{ms[name] / ms['backprop']:.2f}"]
        if largest:
            row += [str(largest[name]), f"{largest[name] / largest['backprop']:.2f}"]
        table.add_row(*row)
    Console(width=160).print(table)
    return {name: {"total": total[name] / total["backprop"], "time": ms[name] / ms["backprop"]} for name in METHODS}


def plot(results: dict[str, dict[str, dict[str, float]]], path: str) -> None:
    """Total peak against step time, both relative to backprop, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.8), squeeze=False)
    for ax, (model_name, rows) in zip(axes[0], results.items()):
        for i, (name, r) in enumerate(rows.items()):
            ax.scatter(r["time"], r["total"], color=f"C{i}", label=name, s=40)
        ax.axhline(1, color="grey", lw=0.5)
        ax.axvline(1, color="grey", lw=0.5)
        ax.set_title(model_name)
        ax.set_xlabel("step time (x backprop)")
        ax.set_ylim(0, 1.1)
    axes[0][0].set_ylabel("total peak memory (x backprop)")
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet,resnet1d,vit,gpt")
    parser.add_argument("--batch", type=int, default=None, help="base batch (default: resnet/vit 64, resnet1d 512, gpt 8)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--largest-batch", action="store_true", help="also bisect the largest batch in the budget")
    parser.add_argument("--budget", type=float, default=2.0, help="budget: this times backprop's total peak")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--plot", default=None, help="also write total peak vs step time to this PNG")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {name: run_model(name, args) for name in args.models.split(",")}
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
