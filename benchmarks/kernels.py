"""Time localize's kernels against torch's for-loop, foreach and fused implementations.

    python benchmarks/kernels.py --device cpu --numel 16000000 --repeats 20

Every implementation runs on the same device in one process and the table shows them side by side:
median time per call, effective bandwidth (the minimum bytes the op must move divided by the time)
and, on CUDA, that bandwidth as a fraction of a measured device-to-device copy (the practical peak
memory bandwidth). Calls are interleaved (one call of each implementation per round) so that load from
other processes on a shared machine hits all of them alike. The optimizer ops update a list of
``--tensors`` parameters of mixed sizes adding up to ``--numel`` elements, like a model's.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch.optim.adamw import adamw as torch_adamw
from torch.optim.sgd import sgd as torch_sgd

import localize.kernels as K
from localize.kernels._launch import fused_supported

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Case:
    op: str
    impl: str
    bytes_moved: int
    fn: Callable[[], object] | None  # None: not available here (see note)
    note: str = ""
    times: list[float] = field(default_factory=list)

    @property
    def seconds(self) -> float | None:
        return statistics.median(self.times) if self.times else None


def mixed_sizes(numel: int, count: int, seed: int = 0) -> list[int]:
    """``count`` log-uniform sizes summing to ``numel`` (big matrices next to small biases)."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.exp(torch.rand(count, generator=g) * math.log(1e4))
    sizes = [max(1, int(w)) for w in (weights / weights.sum() * numel)]
    sizes[0] += numel - sum(sizes)
    return sizes


def sgd_cases(params, device, dtype) -> list[Case]:
    grads = [torch.randn_like(p) for p in params]
    bufs = [torch.randn_like(p) * 0.01 for p in params]
    moved = 5 * sum(p.numel() for p in params) * params[0].element_size()  # read p, g, buf; write p, buf
    hyper = dict(weight_decay=0.0, momentum=0.9, lr=1e-4, dampening=0.0, nesterov=False, maximize=False)
    cases = []
    for impl, flags in [
        ("for-loop", dict(foreach=False)),
        ("foreach", dict(foreach=True)),
        ("fused", dict(fused=True)),
    ]:
        if impl == "fused" and not fused_supported("sgd", device, dtype):
            cases.append(Case("sgd", impl, moved, None, "wrong results here: pytorch/pytorch#191763"))
        else:
            cases.append(
                Case("sgd", impl, moved, lambda f=flags: torch_sgd(params, grads, bufs, **f, **hyper))
            )
    run = lambda: K.sgd_step(params, grads, bufs, lr=1e-4, momentum=0.9)  # noqa: E731
    return cases + [Case("sgd", f"localize ({K.backend()})", moved, run)]


def adamw_cases(params, device, dtype) -> list[Case]:
    grads = [torch.randn_like(p) for p in params]
    exp_avgs = [torch.randn_like(p) * 0.01 for p in params]
    exp_avg_sqs = [torch.rand_like(p) * 0.01 for p in params]
    moved = 7 * sum(p.numel() for p in params) * params[0].element_size()  # read p, g, m, v; write p, m, v
    hyper = dict(amsgrad=False, beta1=0.9, beta2=0.999, lr=1e-4, weight_decay=0.01, eps=1e-8, maximize=False)
    cases = []
    for impl, flags in [
        ("for-loop", dict(foreach=False)),
        ("foreach", dict(foreach=True)),
        ("fused", dict(fused=True)),
    ]:
        steps = [torch.tensor(100.0, device=device if impl == "fused" else "cpu") for _ in params]

        def run(f=flags, s=steps):
            torch_adamw(params, grads, exp_avgs, exp_avg_sqs, [], s, **f, **hyper)

        cases.append(Case("adamw", impl, moved, run))
    run = lambda: K.adamw_step(params, grads, exp_avgs, exp_avg_sqs, step=100, lr=1e-4)  # noqa: E731
    return cases + [Case("adamw", f"localize ({K.backend()})", moved, run)]


def ema_cases(params, device, dtype) -> list[Case]:
    emas = [p.clone() for p in params]
    moved = 3 * sum(p.numel() for p in params) * params[0].element_size()  # read ema, p; write ema

    def loop():
        for e, p in zip(emas, params):
            e.lerp_(p, 0.001)

    return [
        Case("ema", "for-loop", moved, loop),
        Case("ema", "foreach", moved, lambda: torch._foreach_lerp_(emas, params, 0.001)),
        Case("ema", "fused", moved, None, "torch has no fused EMA"),
        Case("ema", f"localize ({K.backend()})", moved, lambda: K.ema_update(emas, params, decay=0.999)),
    ]


def cross_entropy_cases(numel, vocab, device, dtype) -> list[Case]:
    rows = max(1, numel // vocab)
    logits = torch.randn(rows, vocab, device=device, dtype=dtype, requires_grad=True)
    target = torch.randint(0, vocab, (rows,), device=device)
    moved = 2 * rows * vocab * logits.element_size()  # read the logits once, write their gradient

    def step(loss_fn):
        logits.grad = None
        loss_fn(logits, target).backward()

    note = f"{rows} x {vocab}, forward + backward"
    return [
        Case("cross_entropy", "for-loop", moved, None, "n/a"),
        Case("cross_entropy", "torch eager", moved, lambda: step(F.cross_entropy), note),
        Case("cross_entropy", "fused", moved, None, "torch has no fused cross-entropy"),
        Case("cross_entropy", f"localize ({K.backend()})", moved, lambda: step(K.cross_entropy), note),
    ]


def copy_case(device, numel) -> Case:
    """A same-device copy (read + write): the practical bandwidth ceiling the others are compared to."""
    src = torch.empty(max(numel, 1 << 24), dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    return Case("copy", "tensor.copy_", 2 * src.numel() * src.element_size(), lambda: dst.copy_(src))


def run_interleaved(cases: list[Case], device: torch.device, repeats: int, warmup: int = 3) -> None:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    live = [c for c in cases if c.fn is not None]
    for _ in range(warmup):
        for c in live:
            c.fn()
    for _ in range(repeats):
        for c in live:
            sync()
            start = time.perf_counter()
            c.fn()
            sync()
            c.times.append(time.perf_counter() - start)


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device})"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> list[Case]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--numel", type=int, default=16_000_000, help="elements per op (all parameters together)"
    )
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds (the table shows medians)")
    parser.add_argument("--tensors", type=int, default=64, help="parameters the optimizer ops update")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--vocab", type=int, default=32768, help="cross-entropy vocabulary size")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]

    torch.manual_seed(0)
    params = [torch.randn(n, device=device, dtype=dtype) for n in mixed_sizes(args.numel, args.tensors)]
    peak = copy_case(device, args.numel)
    cases = (
        sgd_cases(params, device, dtype)
        + adamw_cases(params, device, dtype)
        + ema_cases(params, device, dtype)
        + cross_entropy_cases(args.numel, args.vocab, device, dtype)
    )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    run_interleaved([peak, *cases], device, args.repeats)
    peak_bw = peak.bytes_moved / peak.seconds

    table = Table(
        title=(
            f"localize kernels on {describe(device)}: {args.numel:,} elements ({args.tensors} tensors), "
            f"{args.dtype}, median of {args.repeats} interleaved rounds"
        )
    )
    for name in ("op", "implementation"):
        table.add_column(name)
    # On CUDA a device-to-device copy is the practical bandwidth ceiling. On a CPU it is not (the copy
    # may run on fewer threads, and a large last-level cache can hold the whole working set), so
    # there the copy figure is only printed for context.
    show_peak = device.type == "cuda"
    for name in ("time (ms)", "GB/s", *(["% of peak BW"] if show_peak else []), "vs for-loop"):
        table.add_column(name, justify="right")
    table.add_column("note")
    baseline: dict[str, float] = {}
    for c in cases:
        if c.seconds is None:
            table.add_row(c.op, c.impl, "-", "-", *(["-"] if show_peak else []), "-", c.note)
        else:
            baseline.setdefault(c.op, c.seconds)
            peak_cell = [f"{100 * c.bytes_moved / c.seconds / peak_bw:.0f}%"] if show_peak else []
            table.add_row(
                c.op,
                c.impl,
                f"{c.seconds * 1e3:.3f}",
                f"{c.bytes_moved / c.seconds / 1e9:.1f}",
                *peak_cell,
                f"{baseline[c.op] / c.seconds:.2f}x",
                c.note,
            )
        if c.impl.startswith("localize"):
            table.add_section()
    console = Console()
    console.print(table)
    console.print(
        f"copy bandwidth (same-device copy, read + write): {peak_bw / 1e9:.1f} GB/s; 1-min load average at "
        f"start: {load:.2f}. GB/s counts the minimum traffic: SGD+momentum 5, AdamW 7, EMA 3 passes over the "
        "parameters; cross-entropy reads the logits once and writes their gradient."
    )
    return cases


if __name__ == "__main__":
    main()
