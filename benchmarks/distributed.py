"""Throughput of K = 2 blocks on 2 processes (localize.distributed, gloo) against the in-process
schedule and torch's DDP backprop.

Same model, same seed, same batches in every run. The in-process schedule (``LocalModel.train_step``)
runs with 1 thread, the baseline of one worker, and with 2 threads, the whole 2-core machine; each
pipeline process gets 1 thread, so the pipeline uses exactly the cores the 2-thread run does. The
DDP baseline trains the original model with plain backprop on 2 processes x 1 thread, each on half
of every batch (``DistributedDataParallel``, gloo, AdamW, the same loss). Runs
are interleaved and repeated (``--repeats``) and medians reported, because the machine may be shared.
Each distributed run also checks that its parameters equal the in-process ones.

    python benchmarks/distributed.py                      # GPT-style model, the README figure
    python benchmarks/distributed.py --model mlp --steps 40

Throughput counts every microbatch from the common start to the last rank's end, so pipeline fill
and drain are included. On a shared machine wall-clock figures also measure how much of the cores
each run got; the CPU-time bound (one worker's CPU seconds over the busiest rank's, communication
threads included) does not, and says what the pipeline would reach on idle cores.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import localize
import localize.distributed
from localize.zoo import GPT, MLP, ResNet1d

MODELS = {
    # name: (build, batch -> (inputs, target))
    "gpt": (
        lambda: GPT(vocab_size=256, block_size=64, dim=128, depth=4, heads=4),
        lambda g, b: (
            (torch.randint(0, 256, (b, 64), generator=g),),
            torch.randint(0, 256, (b, 64), generator=g),
        ),
    ),
    "mlp": (
        lambda: MLP(in_features=512, hidden=1024, depth=8, num_classes=10),
        lambda g, b: ((torch.randn(b, 512, generator=g),), torch.randint(0, 10, (b,), generator=g)),
    ),
    "resnet1d": (
        lambda: ResNet1d(1, 10, widths=(32, 64, 128), blocks_per_stage=(2, 2, 2)),
        lambda g, b: ((torch.randn(b, 1, 256, generator=g),), torch.randint(0, 10, (b,), generator=g)),
    ),
}


def build(args) -> localize.LocalModel:
    torch.manual_seed(args.seed)
    make, batch = MODELS[args.model]
    example, _ = batch(torch.Generator().manual_seed(0), 4)
    return localize.transform(make(), blocks=args.blocks, example_inputs=example, optimizer="adamw", lr=1e-3)


def batches(args) -> list:
    g = torch.Generator().manual_seed(args.seed + 1)
    return [MODELS[args.model][1](g, args.batch_size) for _ in range(args.warmup + args.steps)]


def in_process(args, threads: int) -> tuple[float, dict, float]:
    """(samples/s, final state, CPU seconds of the measured steps)."""
    torch.set_num_threads(threads)
    lm = build(args)
    data = batches(args)
    for x, y in data[: args.warmup]:
        lm.train_step(x, y)
    start, cpu = time.perf_counter(), time.process_time()
    for x, y in data[args.warmup :]:
        lm.train_step(x, y)
    seconds = time.perf_counter() - start
    return args.steps * args.batch_size / seconds, lm.state_dict(), time.process_time() - cpu


def worker(args) -> None:
    """One pipeline rank (started by ``distributed``): warm up, then the measured run."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    lm = build(args)
    data = batches(args)
    dist.init_process_group("gloo")  # torchrun-style environment set by the parent
    localize.distributed.train(lm, data[: args.warmup] if dist.get_rank() == 0 else None, gather=False)
    result = localize.distributed.train(lm, data[args.warmup :] if dist.get_rank() == 0 else None)
    if dist.get_rank() == 0:  # cpu_seconds: each rank's loop, all its threads (gloo's included)
        torch.save(
            {"throughput": result.throughput, "state": lm.state_dict(), "cpu": max(result.cpu_seconds)},
            args.out,
        )
    dist.destroy_process_group()


def ddp_worker(args) -> None:
    """One rank of torch's DDP backprop baseline: the original model, half of every batch per rank."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    lm = build(args)  # the same model and initial weights; its loss_fn scores the full model's output
    data = batches(args)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = DistributedDataParallel(lm.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(x, y) -> None:
        shard = [v.tensor_split(world)[rank] for v in x]
        loss = lm.loss_fn(model(*shard), y.tensor_split(world)[rank])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for x, y in data[: args.warmup]:
        step(x, y)
    dist.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    for x, y in data[args.warmup :]:
        step(x, y)
    dist.barrier()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    if rank == 0:
        torch.save({"throughput": args.steps * args.batch_size / seconds, "state": {}, "cpu": cpu}, args.out)
    dist.destroy_process_group()


def distributed(args, mode: str = "--worker") -> tuple[float, dict, float]:
    """(samples/s, final state, CPU seconds of the busiest rank) of the pipeline (``--worker``) or of
    torch's DDP backprop (``--ddp-worker``) on ``--blocks`` processes."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.pt"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = dict(
            os.environ,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            WORLD_SIZE=str(args.blocks),
            OMP_NUM_THREADS="1",
        )
        cmd = [
            sys.executable,
            __file__,
            mode,
            "--out",
            str(out),
            "--model",
            args.model,
            "--blocks",
            str(args.blocks),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--batch-size",
            str(args.batch_size),
            "--seed",
            str(args.seed),
        ]
        procs = [
            subprocess.Popen(cmd, env=dict(env, RANK=str(r), LOCAL_RANK=str(r))) for r in range(args.blocks)
        ]
        codes = [p.wait() for p in procs]
        if any(codes):
            raise SystemExit(f"a pipeline rank failed with exit codes {codes}")
        got = torch.load(out, weights_only=True)
    return got["throughput"], got["state"], got["cpu"]


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - v.double()).abs().max()) for k, v in b.items() if v.is_floating_point())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="gpt")
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if args.ddp_worker:
        ddp_worker(args)
        return
    print(
        f"model {args.model}, K = {args.blocks}, batch {args.batch_size}, {args.steps} measured steps "
        f"(+{args.warmup} warm-up), {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}"
    )
    runs: dict[str, list[float]] = {
        "in-process, 1 thread": [],
        "in-process, 2 threads": [],
        f"DDP backprop, {args.blocks} processes x 1 thread": [],
        f"distributed, {args.blocks} processes x 1 thread": [],
    }
    diffs, cpu_ratios = [], []
    for _ in range(args.repeats):
        one, ref, cpu_one = in_process(args, 1)
        dist_tp, state, cpu_busiest = distributed(args)
        ddp_tp, _, _ = distributed(args, "--ddp-worker")
        two, _, _ = in_process(args, 2)
        diffs.append(max_diff(state, ref))
        cpu_ratios.append(cpu_one / cpu_busiest)
        for name, value in zip(runs, (one, two, ddp_tp, dist_tp)):
            runs[name].append(value)
        print("  " + ", ".join(f"{name}: {v[-1]:.1f}" for name, v in runs.items()) + " samples/s", flush=True)
    med = {name: statistics.median(v) for name, v in runs.items()}
    dist_name = list(runs)[-1]
    print(f"\n{'run':<36}{'samples/s (median)':>20}")
    for name, v in med.items():
        print(f"{name:<36}{v:>20.1f}")
    speedup_1 = med[dist_name] / med["in-process, 1 thread"]
    speedup_2 = med[dist_name] / med["in-process, 2 threads"]
    speedup_ddp = med[dist_name] / med[list(runs)[2]]
    print(
        f"\nspeed-up of the pipeline: {speedup_1:.2f}x over one worker (1 thread), "
        f"{speedup_2:.2f}x over the 2-thread in-process run, {speedup_ddp:.2f}x over DDP backprop"
    )
    # CPU seconds are not inflated by waiting for a core, so this ratio holds up better than the
    # wall-clock figures on a shared machine: what the pipeline would reach on idle cores.
    cpu_ratio = statistics.median(cpu_ratios)
    print(f"CPU-time speed-up bound: in-process (1 thread) CPU s / busiest rank's CPU s = {cpu_ratio:.2f}x")
    print(f"largest parameter difference distributed vs in-process: {max(diffs):.2e}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "median": med,
                    "runs": runs,
                    "speedup_vs_1_thread": speedup_1,
                    "speedup_vs_2_threads": speedup_2,
                    "speedup_vs_ddp_backprop": speedup_ddp,
                    "cpu_speedup_bound": cpu_ratio,
                    "max_diff": max(diffs),
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
