"""Saved-activation memory and step time: plain backprop vs checkpointing vs localize.

Everything is measured side by side in one run, on the same model, batch and optimizer:

* plain backprop (one loss at the output, full backward);
* ``torch.utils.checkpoint`` around each of localize's K=4 blocks (end-to-end gradients,
  activations recomputed in backward);
* localize at K = 1, 2, 4, 8, balanced by FLOPs (the default) and by activation memory.

Memory is the peak of saved-for-backward bytes alive at once (``SavedActivationMeter``:
deduplicated by storage, parameters excluded); time is the median of ``--steps`` timed steps
after ``--warmup`` untimed ones, the methods timed round-robin so that machine drift hits all
alike. (Checkpointing's figure is what it stores between forward and backward; while it
recomputes a block in backward it holds that block's activations again.)

    python benchmarks/memory_speed.py            # ResNet-18-style CNN on 32x32 images, batch 64
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.fx as fx
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch.utils.checkpoint import checkpoint

import localize
from localize.runtime.memory import SavedActivationMeter
from localize.zoo import ResNet2d


def build(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return ResNet2d(3, 10, widths=(16, 32, 64, 128), blocks_per_stage=(2, 2, 2, 2))


def sgd(params):
    return torch.optim.SGD(params, lr=0.01, momentum=0.9)


class _CheckpointedProgram(fx.Interpreter):
    """Runs a localize program end to end, each block under torch.utils.checkpoint, no cuts."""

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        return checkpoint(module, *args, use_reentrant=False)

    def call_method(self, target, args, kwargs):
        if target == "detach":
            return args[0]
        return super().call_method(target, args, kwargs)


def peak_saved_bytes(step, params) -> int:
    with SavedActivationMeter(params) as meter:
        step()
    return meter.peak_bytes


def interleaved_times(steps: dict[str, object], rounds: int, warmup: int) -> dict[str, float]:
    """Median step time per method, timing the methods round-robin so drift hits all alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,))
    steps, params = {}, {}

    model = build()
    opt = sgd(model.parameters())

    def backprop_step(model=model, opt=opt):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    steps["plain backprop"], params["plain backprop"] = backprop_step, list(model.parameters())

    model = build()
    lm4 = localize.transform(model, blocks=4, example_inputs=(x[:2],), optimizer=sgd)
    runner, ck_opt = _CheckpointedProgram(lm4.program), sgd(model.parameters())

    def checkpoint_step():
        ck_opt.zero_grad(set_to_none=True)
        (out,) = runner.run(x)
        F.cross_entropy(out, y).backward()
        ck_opt.step()

    name = "checkpoint per block (K=4)"
    steps[name], params[name] = checkpoint_step, list(model.parameters())

    for balance in ("flops", "memory"):
        for k in (1, 2, 4, 8):
            model = build()
            lm = localize.transform(model, blocks=k, example_inputs=(x[:2],), balance=balance, optimizer=sgd)
            name = f"localize K={k} dgl, balance={balance}"
            steps[name] = lambda lm=lm: lm.train_step(x, y)
            params[name] = list(model.parameters()) + list(lm.aux.parameters())

    memory = {name: peak_saved_bytes(step, params[name]) for name, step in steps.items()}
    times = interleaved_times(steps, args.steps, args.warmup)
    base_mem, base_time = memory["plain backprop"], times["plain backprop"]
    rows = [(name, memory[name], times[name]) for name in steps]

    table = Table(title=f"ResNet2d, batch {args.batch}, {args.size}x{args.size}, {torch.get_num_threads()} threads")
    for col in ("method", "saved activations (MB)", "x backprop", "step (ms)", "x backprop"):
        table.add_column(col, justify="right" if col != "method" else "left")
    for name, mem, t in rows:
        table.add_row(name, f"{mem / 1e6:.1f}", f"{mem / base_mem:.2f}", f"{t * 1e3:.1f}", f"{t / base_time:.2f}")
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
