"""Test accuracy of plain backprop and every aux strategy, trained side by side in one run.

Every method trains the same model from the same seed, on the same batches in the same order,
for the same epochs, with the same optimizer (AdamW, cosine learning rate, one optimizer per
block); only the auxiliary heads differ. Backprop is ``blocks=1`` (exactly end-to-end training).

* MNIST-1D (Greydanus 2020; generated offline, 4000 train / 1000 test), a ResNet-32-style 1D
  ResNet (15 residual units), K = 4, 8, 16: test accuracy (%).
* Character-level LM on real text (this Python's standard-library sources), a 4-layer GPT,
  K = 2, 4: next-character test accuracy (%) and test loss (nats / char).
* ``--tasks vit``: a 4-layer ViT on scikit-learn's 8x8 digits (1438 train / 359 test), K = 2, 4.

``--ks char=2,4,8`` changes a task's K values, ``--strategies`` runs a subset (a strategy may carry
options in brackets: ``readout[depth=1;follow=True]``), and ``--seeds N`` repeats every run over N
seeds (model init and data order), reporting mean ± std.

It writes ``accuracy.md`` (the tables), ``accuracy.json`` and ``accuracy.png`` to ``--out``.

    python benchmarks/accuracy.py --jobs 2     # the full run quoted in the README: 12 + 2 epochs,
                                               # 32 CPU-minutes (16.5 min on 2 idle cores)
    python benchmarks/accuracy.py --quick      # smaller and shorter: a smoke test (~1-2 minutes)
    python benchmarks/accuracy.py --mnist-epochs 3 --char-train 4000 --char-dim 32 --char-block 32 \
        --char-epochs 2 --jobs 2               # a budget run (~9 CPU-minutes)
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import localize
from localize.compiler.model_file import parse_aux_option
from localize.data import char_dataset, digits, mnist1d, stdlib_text
from localize.zoo import GPT, ResNet1d, ViT

STRATEGIES = ["dgl", "linear", "auglocal", "man", "readout", "infopro", "featrecon", "drtp"]


@dataclass
class Config:
    task: str
    method: str  # "backprop" or a strategy name
    blocks: int
    epochs: int
    batch: int
    lr: float
    seed: int
    quick: bool
    char_dim: int = 64
    char_depth: int = 4
    block_lr: tuple[float, ...] = ()  # per-block multipliers of lr for local runs (K > 1)


@dataclass
class Result:
    task: str
    method: str
    blocks: int
    accuracy: float  # test accuracy, %
    loss: float  # test loss of the model output (nats)
    seconds: float


# ----------------------------------------------------------------------------------------------- tasks


def mnist1d_model(quick: bool) -> torch.nn.Module:
    if quick:
        return ResNet1d(1, 10, widths=(8, 16, 32), blocks_per_stage=(3, 3, 3))
    return ResNet1d(1, 10, widths=(16, 32, 64), blocks_per_stage=(5, 5, 5))


def char_model(vocab: int, block_size: int, dim: int, depth: int = 4) -> torch.nn.Module:
    return GPT(vocab, block_size=block_size, dim=dim, depth=depth, heads=4)


def load(task: str, quick: bool, num_train: int | None = None, block: int | None = None):
    if task == "vit":
        (x, y), (xt, yt) = digits(test_fraction=0.2, seed=0)
        return x, y, xt, yt, None
    if task == "mnist1d":
        (x, y), (xt, yt) = mnist1d(num_train=num_train or (1000 if quick else 4000))
        mean, std = x.mean(), x.std()
        return (x - mean) / std, y, (xt - mean) / std, yt, None
    text = stdlib_text(max_chars=300_000 if quick else 2_000_000)
    block = block or (32 if quick else 64)
    vocab, (x, y), (xt, yt) = char_dataset(
        text,
        block_size=block,
        num_train=num_train or (1000 if quick else 6000),
        num_test=200 if quick else 1000,
    )
    return x, y, xt, yt, len(vocab)


# ----------------------------------------------------------------------------------------------- one run


def run(cfg: Config, data) -> Result:
    torch.set_num_threads(1)  # runs go in parallel processes, one core each
    x, y, xt, yt, vocab = data
    torch.manual_seed(cfg.seed)
    if cfg.task == "mnist1d":
        model = mnist1d_model(cfg.quick)
    elif cfg.task == "vit":
        model = ViT(image_size=8, patch_size=2, in_channels=1, num_classes=10, dim=64, depth=4, heads=4)
    else:
        model = char_model(vocab, x.shape[1], cfg.char_dim, cfg.char_depth)
    aux, options = ("dgl", {}) if cfg.method == "backprop" else parse_method(cfg.method)
    lm = localize.transform(
        model,
        blocks=cfg.blocks,
        example_inputs=(x[:2],),
        aux=aux,
        aux_options=options,
        balance="flops",  # the published tables were measured with FLOP-balanced cuts
        optimizer=lambda p: torch.optim.AdamW(p, lr=cfg.lr, weight_decay=1e-4),
    )
    order = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = math.ceil(len(x) / cfg.batch)
    total = cfg.epochs * steps_per_epoch
    step = 0
    start = time.perf_counter()
    lm.train()
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(x), generator=order)
        for i in range(steps_per_epoch):
            lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / total))  # cosine schedule, every block alike
            for block in lm.blocks:
                scale = cfg.block_lr[block.index] if cfg.block_lr and cfg.blocks > 1 else 1.0
                for group in block.optimizer.param_groups if block.optimizer is not None else ():
                    group["lr"] = lr * scale
            idx = perm[i * cfg.batch : (i + 1) * cfg.batch]
            lm.train_step(x[idx], y[idx])
            step += 1
    seconds = time.perf_counter() - start
    lm.eval()
    correct, loss, count = 0.0, 0.0, 0
    with torch.no_grad():
        for i in range(0, len(xt), 500):
            out = lm(xt[i : i + 500])
            target = yt[i : i + 500]
            loss += float(
                F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1), reduction="sum")
            )
            correct += float((out.argmax(-1) == target).sum())
            count += target.numel()
    return Result(cfg.task, cfg.method, cfg.blocks, 100 * correct / count, loss / count, seconds)


def parse_method(method: str) -> tuple[str, dict]:
    """``"readout[depth=1;follow=True]"`` -> ``("readout", {"depth": 1, "follow": True})``."""
    name, _, rest = method.partition("[")
    return name, dict(parse_aux_option(part) for part in filter(None, rest.rstrip("]").split(";")))


def split_methods(text: str) -> list[str]:
    """Comma-separated methods; commas inside brackets do not split."""
    return re.findall(r"[^,\[\]]+(?:\[[^\]]*\])?", text)


def methods_of(results: list[Result]) -> list[str]:
    """The strategies that ran, in the order they were asked for."""
    return list(dict.fromkeys(r.method for r in results if r.method != "backprop"))


def mnist1d_units(quick: bool) -> int:
    return 9 if quick else 15


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _run(args: tuple[Config, object]) -> Result:
    return run(*args)


# ----------------------------------------------------------------------------------------------- report


def _mean_std(values: list[float], fmt) -> str:
    if len(values) == 1:
        return fmt(values[0])
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{fmt(mean)} ± {fmt(std)}"


def table(results: list[Result], task: str, ks: list[int], metric: str) -> str:
    fmt = (lambda v: f"{v:.2f}") if metric == "accuracy" else (lambda v: f"{v:.3f}")
    by: dict[tuple[str, int], list[float]] = {}
    for r in results:
        if r.task == task:
            by.setdefault((r.method, r.blocks), []).append(getattr(r, metric))
    head = "| method | " + " | ".join(f"K={k}" for k in ks) + " |"
    lines = [head, "|" + "---|" * (len(ks) + 1)]
    lines.append(f"| backprop (K=1) | {_mean_std(by['backprop', 1], fmt)} " + "| " * (len(ks) - 1) + "|")
    for method in methods_of(results):
        if not any((method, k) in by for k in ks):
            continue
        cells = [_mean_std(by[method, k], fmt) if (method, k) in by else "-" for k in ks]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[Result], tasks: dict[str, list[int]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    axes = axes[0]
    for ax, (task, ks) in zip(axes, tasks.items()):
        runs: dict[tuple[str, int], list[float]] = {}
        for r in results:
            if r.task == task:
                runs.setdefault((r.method, r.blocks), []).append(r.accuracy)
        by = {key: sum(v) / len(v) for key, v in runs.items()}
        base = by[("backprop", 1)]
        methods = methods_of(results)
        width = 0.8 / len(methods)
        for j, method in enumerate(methods):
            xs = [i + (j - len(methods) / 2 + 0.5) * width for i in range(len(ks))]
            ax.bar(xs, [by.get((method, k), 0) for k in ks], width, label=method)
        ax.axhline(base, color="black", linestyle="--", label="backprop")
        ax.set_xticks(range(len(ks)), [f"K={k}" for k in ks])
        ax.set_ylabel("test accuracy (%)")
        low = min(v for v in by.values())
        ax.set_ylim(max(0, low - 5), max(by.values()) + 2)
        ax.set_title(
            {"mnist1d": "MNIST-1D, 1D ResNet-32", "char": "char LM (stdlib text), GPT",
             "vit": "digits 8x8, 4-layer ViT"}[task]
        )
    axes[-1].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small data, models and epochs (smoke test)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for accuracy.md/.json/.png")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel runs (one core each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mnist-epochs", type=int, default=None)
    parser.add_argument("--char-epochs", type=int, default=None)
    parser.add_argument("--tasks", default="mnist1d,char")
    parser.add_argument("--mnist-train", type=int, default=None, help="MNIST-1D training examples (4000)")
    parser.add_argument("--char-train", type=int, default=None, help="char LM training windows (6000)")
    parser.add_argument("--char-dim", type=int, default=None, help="GPT width (64; 32 with --quick)")
    parser.add_argument("--char-depth", type=int, default=4, help="GPT layers (4; 8 makes K=8 cut between layers)")
    parser.add_argument("--char-block", type=int, default=None, help="context length (64; 32 with --quick)")
    parser.add_argument("--vit-epochs", type=int, default=None)
    parser.add_argument("--char-lr", type=float, default=2e-3, help="peak AdamW learning rate of the char LM (2e-3)")
    parser.add_argument(
        "--block-lr", default="", help="per-block multipliers of the learning rate for local runs, e.g. 2,1,1,1"
    )
    parser.add_argument("--ks", default="", help="K values per task, e.g. char=2,4,8;vit=2,4")
    parser.add_argument("--seeds", type=int, default=1, help="runs per configuration (seeds seed, seed+1, ...)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="the strategies to run")
    args = parser.parse_args()
    quick = args.quick
    tasks = {"mnist1d": [4, 8] if quick else [4, 8, 16], "char": [2, 4], "vit": [2, 4]}
    for part in filter(None, args.ks.split(";")):
        task, _, ks = part.partition("=")
        tasks[task] = [int(k) for k in ks.split(",")]
    tasks = {t: ks for t, ks in tasks.items() if t in args.tasks.split(",")}
    strategies = [m.strip() for m in split_methods(args.strategies) if m.strip()]
    epochs = {
        "mnist1d": args.mnist_epochs or (3 if quick else 12),
        "char": args.char_epochs or (1 if quick else 2),
        "vit": args.vit_epochs or (3 if quick else 10),
    }
    batch = {"mnist1d": 64, "char": 32, "vit": 64}
    lr = {"mnist1d": 3e-3, "char": args.char_lr, "vit": 2e-3}
    block_lr = tuple(float(v) for v in args.block_lr.split(",")) if args.block_lr else ()
    if block_lr and len(block_lr) < max(k for ks in tasks.values() for k in ks):
        parser.error(f"--block-lr gives {len(block_lr)} multipliers; give one per block of the largest K")

    jobs = []
    data_sizes: dict[str, torch.Tensor] = {}
    sizes = {"mnist1d": (args.mnist_train, None), "char": (args.char_train, args.char_block), "vit": (None, None)}
    char_dim = args.char_dim or (32 if quick else 64)
    for task, ks in tasks.items():
        data = load(task, quick, *sizes[task])
        data_sizes[task] = data[0]
        common = dict(
            task=task,
            epochs=epochs[task],
            batch=batch[task],
            lr=lr[task],
            quick=quick,
            char_dim=char_dim,
            char_depth=args.char_depth,
            block_lr=block_lr,
        )
        for seed in range(args.seed, args.seed + args.seeds):
            jobs.append((Config(method="backprop", blocks=1, seed=seed, **common), data))
            jobs += [(Config(method=m, blocks=k, seed=seed, **common), data) for k in ks for m in strategies]
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = []
        for res in pool.map(_run, jobs):
            results.append(res)
            print(
                f"{res.task:8s} {res.method:10s} K={res.blocks:<3d} acc {res.accuracy:6.2f}%  "
                f"loss {res.loss:.3f}  {res.seconds:6.1f}s",
                flush=True,
            )
    wall = time.perf_counter() - start

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/accuracy.py " + " ".join(sys.argv[1:])
    cpu = sum(r.seconds for r in results)
    parts = [
        f"Command: `{command.strip()}` ({wall / 60:.1f} min wall, {cpu / 60:.1f} min of training summed over "
        f"runs, {args.jobs} processes of one thread, torch {torch.__version__}, "
        f"seeds {args.seed}..{args.seed + args.seeds - 1}).\n"
    ]
    if "mnist1d" in tasks:
        n = len(data_sizes["mnist1d"])
        parts += [
            f"MNIST-1D ({n} train / 1000 test), 1D ResNet ({mnist1d_units(quick)} residual units), "
            f"{epochs['mnist1d']} epochs: test accuracy (%)\n",
            table(results, "mnist1d", tasks["mnist1d"], "accuracy"),
            "",
        ]
    if "char" in tasks:
        n, t = data_sizes["char"].shape
        parts += [
            f"Character-level LM on stdlib text ({n} train windows of {t} chars), {args.char_depth}-layer GPT (width {char_dim}), "
            f"{epochs['char']} epochs: next-char test accuracy (%)\n",
            table(results, "char", tasks["char"], "accuracy"),
            "",
            "Same runs: test loss (nats / char)\n",
            table(results, "char", tasks["char"], "loss"),
            "",
        ]
    if "vit" in tasks:
        parts += [
            f"ViT on the 8x8 digits ({len(data_sizes['vit'])} train / 359 test), 4 layers (width 64), "
            f"{epochs['vit']} epochs: test accuracy (%)\n",
            table(results, "vit", tasks["vit"], "accuracy"),
            "",
        ]
    report = "\n".join(parts)
    _write_atomic(out / "accuracy.md", report.encode())
    _write_atomic(out / "accuracy.json", json.dumps([asdict(r) for r in results], indent=1).encode())
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        plot(results, tasks, Path(tmp) / "accuracy.png")
        os.replace(Path(tmp) / "accuracy.png", out / "accuracy.png")
    print(report)
    print(f"wrote {out / 'accuracy.md'}, {out / 'accuracy.json'}, {out / 'accuracy.png'}")


if __name__ == "__main__":
    main()
