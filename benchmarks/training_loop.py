"""What each training-loop option costs per ``train_step`` call, side by side in one run.

One model, batch and optimizer (the README's MNIST-1D ResNet at K=4, AdamW, batch 64); the variants
are timed round-robin so that machine drift hits all alike, each the median of ``--steps`` calls after
``--warmup`` untimed ones:

* the plain step; ``clip_grad_norm=1``; ``accumulate=4`` (a call that only adds gradients, and the
  fourth, which updates, averaged over the cycle); a cosine ``scheduler``; ``autocast="bf16"``.

    python benchmarks/training_loop.py --threads 1
"""

from __future__ import annotations

import argparse

import torch
from _timing import print_ratios, round_robin

import localize
from localize.runtime.schedulers import LRSchedule
from localize.zoo import ResNet1d

VARIANTS = {
    "plain": {},
    "clip_grad_norm=1": {"clip_grad_norm": 1.0},
    "accumulate=4": {"accumulate": 4},
    "cosine schedule": {"scheduler": LRSchedule("cosine", total=10_000)},
    "autocast=bf16": {"autocast": "bf16"},
}


def build(options: dict, x: torch.Tensor) -> localize.LocalModel:
    torch.manual_seed(0)
    net = ResNet1d(in_channels=1, num_classes=10)  # examples/mnist1d_resnet.py
    return localize.transform(net, blocks=4, example_inputs=(x,), **options)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 40, generator=g), torch.randint(0, 10, (64,), generator=g)
    models = {name: build(options, x) for name, options in VARIANTS.items()}
    medians = round_robin(models, (x, y), args.steps, args.warmup)
    title = f"train_step per call, K=4, batch 64, {torch.get_num_threads()} thread(s)"
    print_ratios(title, medians, "plain", "option")


if __name__ == "__main__":
    main()
