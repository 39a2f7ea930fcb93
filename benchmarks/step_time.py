"""Step time of each aux strategy against backprop, side by side in one run.

The character LM of ``benchmarks/accuracy.py`` (4-layer GPT, width 64, context 64, batch 32, AdamW):
backprop (K=1) and every strategy at ``--blocks`` K, each ``train_step`` timed round-robin so that
machine drift hits all alike; the median of ``--steps`` calls after ``--warmup``.

    python benchmarks/step_time.py --threads 1
"""

from __future__ import annotations

import argparse

import torch
from _timing import print_ratios, round_robin

import localize
from localize.zoo import GPT

METHODS = [
    ("backprop", 1, "dgl", {}),
    ("dgl", None, "dgl", {}),
    ("auglocal", None, "auglocal", {}),
    ("man", None, "man", {}),
    ("readout depth=1", None, "readout", {"depth": 1}),
    ("readout depth=2", None, "readout", {"depth": 2}),
]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 100, (32, 64), generator=g)
    y = torch.roll(x, -1, 1)
    models = {}
    for name, k, aux, options in METHODS:
        torch.manual_seed(0)
        net = GPT(100, block_size=64, dim=64, depth=4, heads=4)
        models[name] = localize.transform(
            net, blocks=k or args.blocks, example_inputs=(x[:2],), aux=aux, aux_options=options,
            optimizer=lambda ps: torch.optim.AdamW(ps, lr=2e-3, weight_decay=1e-4),
        )
    medians = round_robin(models, (x, y), args.steps, args.warmup)
    title = f"char-LM GPT, K={args.blocks}, batch 32 x 64, {torch.get_num_threads()} thread(s)"
    print_ratios(title, medians, "backprop", "method")


if __name__ == "__main__":
    main()
