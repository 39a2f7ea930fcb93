"""Speed of the transform itself: trace + passes + codegen, no training, on one CPU thread.

Two models of the sizes people train: a ResNet-50-sized CNN (bottleneck blocks 3-4-6-3, widths
64..512, 1000 classes, 224x224 input; torch.fx) and the 12-layer, 768-wide GPT-2 config of Hugging
Face ``transformers`` (124M parameters, 128 tokens; torch.export). Building the model and its
weights is not timed. Each stage is the median of ``--repeat`` fresh transforms:

* the passes as ``localize.transform`` times them (``LocalModel.plan.timings``: trace,
  annotate_tensors, ..., insert_aux_heads);
* ``codegen: fx code``: regenerating the Python code of the program and every block
  (``GraphModule.recompile()``, what ``lm.program.code`` / ``block.module.code`` show);
* ``codegen: classes``: ``localize.codegen.blocks.generate``, every block and aux head written as a
  standalone class (what the CLI's artifacts are made of).

Stages are timed with the CPU clock of the process (``time.process_time``) by default: with one
thread that is the time the transform takes on an idle core, and it stays right on a shared
machine where other jobs stretch wall time. ``--clock wall`` times wall clock instead; the total
line always shows both.

    python benchmarks/transform.py                 # both models, K=4, 3 repeats
    python benchmarks/transform.py --model resnet50 --repeat 5 --clock wall
    python benchmarks/transform.py --table         # the README's zoo table (tests/zoo_models.py)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import statistics
import sys
import time
import warnings
from unittest import mock

import torch

import localize
from localize.zoo import ResNet2d

TARGETS = {"resnet50": 2.0, "gpt2": 5.0}  # seconds, issue #6


def resnet50() -> tuple[torch.nn.Module, tuple]:
    torch.manual_seed(0)
    model = ResNet2d(3, 1000, widths=(64, 128, 256, 512), blocks_per_stage=(3, 4, 6, 3), bottleneck=True)
    return model, (torch.randn(2, 3, 224, 224),)


def gpt2() -> tuple[torch.nn.Module, tuple]:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12))
    return model, (torch.randint(0, 50257, (2, 128)),)


MODELS = {"resnet50": resnet50, "gpt2": gpt2}


def _codegen_classes():
    try:
        from localize.codegen.blocks import generate
    except ImportError:  # pragma: no cover - older checkouts without localize.codegen.modules
        return None
    return generate


class _CpuClock:
    """Stands in for the ``time`` module inside localize.transform, whose ``_stage`` timer reads
    ``time.perf_counter``: the per-pass timings then count this process's CPU time."""

    perf_counter = staticmethod(time.process_time)


def time_once(model: torch.nn.Module, inputs: tuple, blocks: int, clock: str = "cpu") -> dict[str, float]:
    now = time.process_time if clock == "cpu" else time.perf_counter
    wall = time.perf_counter()
    start = now()
    patch = mock.patch.object(importlib.import_module("localize.compiler.transform"), "time", _CpuClock)
    with patch if clock == "cpu" else contextlib.nullcontext():
        lm = localize.transform(model, blocks=blocks, example_inputs=inputs)
    total = now() - start
    stages = dict(lm.plan.timings)
    stages["(transform, other)"] = max(total - sum(stages.values()), 0.0)

    start = now()
    lm.program.recompile()
    for block in lm.blocks:
        block.module.recompile()
    _ = [lm.program.code] + [b.module.code for b in lm.blocks]
    stages["codegen: fx code"] = now() - start

    generate = _codegen_classes()
    if generate is not None:
        start = now()
        generate(lm)
        stages["codegen: classes"] = now() - start
    stages["legal cuts"] = float(len(lm.plan.legal_cuts))
    stages["wall"] = time.perf_counter() - wall
    return stages


def print_table() -> None:
    """The README's zoo table: legal cuts and the K=4 cuts of every entry of tests/zoo_models.py."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.zoo_models import table

    print(table())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=[*MODELS, "all"], default="all")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    parser.add_argument("--table", action="store_true", help="print the zoo table instead")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    if args.table:
        print_table()
        return
    names = list(MODELS) if args.model == "all" else [args.model]
    for name in names:
        model, inputs = MODELS[name]()
        runs = [time_once(model, inputs, args.blocks, args.clock) for _ in range(args.repeat)]
        cuts = int(runs[0]["legal cuts"])
        walls = [r.pop("wall") for r in runs]
        for r in runs:
            r.pop("legal cuts")
        stages = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        total = sum(stages.values())
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(
            f"\n{name}: {params:.1f}M parameters, K={args.blocks}, {cuts} legal cuts, "
            f"median of {args.repeat}, 1 thread, {args.clock} clock"
        )
        for stage, seconds in stages.items():
            print(f"  {stage:28s} {seconds * 1000:8.1f} ms")
        verdict = "ok" if total <= TARGETS[name] else "OVER"
        print(
            f"  {'total':28s} {total * 1000:8.1f} ms   (target {TARGETS[name]:.0f} s: {verdict}; "
            f"wall clock {statistics.median(walls):.2f} s)"
        )


if __name__ == "__main__":
    main()
