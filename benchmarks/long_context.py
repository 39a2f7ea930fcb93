"""Long sequences: backprop, per-layer checkpointing, SeCO and SpaCO side by side, as T grows.

For each model and sequence length T, in one run on the same weights, text and optimizer (AdamW):

* ``backprop``: the whole sequence in one graph;
* ``checkpoint``: ``torch.utils.checkpoint`` around every transformer layer (Hugging Face's own
  activation checkpointing for Llama);
* ``seco``: ``localize.transform(model, blocks=1, chunk_size=C)``, the exact gradient chunk by chunk;
* ``spaco``: the same with ``chunk_keep=0.25``;
* with ``--methods``, also ``readout4``: ``blocks=4, aux="readout"`` on the whole sequence, and
  ``readout4-seco``: the same in chunks (every block and its readout head chunk by chunk).

Memory is one training step measured as torch measures it: the peak of everything alive (parameters,
gradients, optimizer state, activations, temporaries) by ``torch.distributed._tools.mem_tracker.
MemTracker``, and the peak of tensors saved for backward (``SavedActivationMeter``). Time is the median
of ``--steps`` steps taken round-robin. ``fits`` is the longest measured T whose total peak stays under
``--budget-mib``. Models: the GPT character LM of ``examples/charlm_gpt.py`` (dim 64, or ``--width``; 4 layers) on the
Python standard library's text, and a small-config Hugging Face Llama (rotary positions, grouped-query
attention) on the same text.

    python benchmarks/long_context.py                                  # T = 1024 .. 8192, C = 256
    python benchmarks/long_context.py --models gpt --lengths 512,1024 --steps 2 --plot docs/x.png
    python benchmarks/long_context.py --width 256 --lengths 1024,2048,4096   # wider models
    python benchmarks/long_context.py --models gpt --methods backprop,checkpoint,seco,readout4,readout4-seco
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.checkpoint import checkpoint

import localize
from localize.data import char_vocab, stdlib_text
from localize.runtime.memory import SavedActivationMeter
from localize.runtime.peak import FlatMemTracker
from localize.zoo import GPT

METHODS = ("backprop", "checkpoint", "seco", "spaco")
CHOICES = (*METHODS, "readout4", "readout4-seco")


def text_batch(length: int, batch: int, vocab: dict[str, int], text: str, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(text) - length - 2, (batch,), generator=g).tolist()
    rows = [[vocab[c] for c in text[s : s + length + 1]] for s in starts]
    data = torch.tensor(rows)
    return data[:, :-1], data[:, 1:]


def build(name: str, vocab_size: int, max_length: int, width: int = 64) -> nn.Module:
    torch.manual_seed(0)
    if name == "gpt":
        return GPT(vocab_size=vocab_size, block_size=max_length, dim=width, depth=4, heads=4)
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_length,
    )
    return transformers.LlamaForCausalLM(config)


class _Checkpointed(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.layer, x, use_reentrant=False)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


class Backprop:
    """One graph for the whole sequence (optionally checkpointed per layer): the reference step."""

    def __init__(self, model: nn.Module, checkpointed: bool) -> None:
        self.model = model
        if checkpointed and hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        elif checkpointed and hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        elif checkpointed:
            model.layers = nn.ModuleList(_Checkpointed(layer) for layer in model.layers)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def train_step(self, ids: torch.Tensor, target: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        logits = _logits(self.model, ids)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


def make(method: str, model: nn.Module, ids: torch.Tensor, chunk: int) -> Any:
    if method in ("backprop", "checkpoint"):
        return Backprop(model, checkpointed=method == "checkpoint")
    keep = 0.25 if method == "spaco" else 1.0
    blocks, aux = (4, "readout") if method.startswith("readout4") else (1, "dgl")
    return localize.transform(
        model, blocks=blocks, aux=aux, example_inputs=(ids[:, : 2 * chunk],),
        chunk_size=None if method == "readout4" else chunk, chunk_keep=keep, optimizer="adamw", lr=1e-3,
    )


def memory(step: Any, params: list[nn.Parameter], batch: tuple) -> tuple[int, int]:
    """(total peak, saved-activation peak) of one step, optimizer state already allocated."""
    tracker = FlatMemTracker()
    optimizers = [step.optimizer] if hasattr(step, "optimizer") else [o for o in step.optimizers if o is not None]
    tracker.track_external(*[step.model], *optimizers)
    with tracker, SavedActivationMeter(params) as meter:
        step.train_step(*batch)
    peak = tracker.get_tracker_snapshot("peak")
    return int(sum(v["Total"] for v in peak.values())), meter.peak_bytes


def timed(steps: dict[str, Any], batch: tuple, n: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(n):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step.train_step(*batch)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    text = stdlib_text(max_chars=2_000_000)
    vocab = {c: i for i, c in enumerate(char_vocab(text))}
    rows = []
    lengths = [int(t) for t in args.lengths.split(",")]
    for kind in args.models.split(","):
        base = build(kind, len(vocab), max(lengths), args.width)
        name = kind if args.width == 64 else f"{kind}-w{args.width}"
        for length in lengths:
            batch = text_batch(length, args.batch, vocab, text, seed=length)
            steps = {m: make(m, copy.deepcopy(base), batch[0], args.chunk) for m in args.methods}
            for step in steps.values():
                step.train_step(*batch)  # warm: optimizer state exists, kernels chosen
            mem = {}
            for m, step in steps.items():
                params = list(step.model.parameters())
                mem[m] = memory(step, params, batch)
            seconds = timed(steps, batch, args.steps)
            for m in args.methods:
                rows.append({
                    "model": name, "T": length, "method": m, "chunks": -(-length // args.chunk),
                    "total_mib": mem[m][0] / 2**20, "saved_mib": mem[m][1] / 2**20,
                    "ms": 1000 * seconds[m], "vs_backprop": seconds[m] / seconds["backprop"],
                })
            Console().print(f"{name} T={length}: " + ", ".join(
                f"{m} {mem[m][0] / 2**20:.0f} MiB {1000 * seconds[m]:.0f} ms" for m in args.methods))
    return rows


def report(rows: list[dict[str, Any]], budget: float, methods: tuple[str, ...] = METHODS) -> None:
    table = Table(title=f"one training step, {torch.get_num_threads()} thread(s) (total peak by MemTracker)")
    for col in ("model", "T", "method", "total MiB", "saved MiB", "ms", "vs backprop"):
        table.add_column(col, justify="left" if col in ("model", "method") else "right")
    for r in rows:
        table.add_row(r["model"], str(r["T"]), r["method"], f"{r['total_mib']:.1f}", f"{r['saved_mib']:.1f}",
                      f"{r['ms']:.0f}", f"{r['vs_backprop']:.2f}x")
    Console().print(table)
    fits = Table(title=f"longest measured T whose total peak fits {budget:g} MiB")
    fits.add_column("model")
    for m in methods:
        fits.add_column(m, justify="right")
    for model in dict.fromkeys(r["model"] for r in rows):
        best = []
        for m in methods:
            ok = [r["T"] for r in rows if r["model"] == model and r["method"] == m and r["total_mib"] <= budget]
            best.append(str(max(ok)) if ok else "-")
        fits.add_row(model, *best)
    Console().print(fits)


def plot(rows: list[dict[str, Any]], path: str, methods: tuple[str, ...] = METHODS) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(len(models), 2, figsize=(10, 3.6 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        for m in methods:
            pts = [r for r in rows if r["model"] == model and r["method"] == m]
            t = [r["T"] for r in pts]
            axes[i][0].plot(t, [r["total_mib"] for r in pts], marker="o", label=m)
            axes[i][1].plot(t, [r["ms"] for r in pts], marker="o", label=m)
        for ax, what in zip(axes[i], ("total peak (MiB, MemTracker)", "step time (ms)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length T")
            ax.set_title(f"{model}: {what}")
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="gpt,llama", help="comma-separated: gpt, llama")
    parser.add_argument("--lengths", default="1024,2048,4096,8192", help="sequence lengths T")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--width", type=int, default=64, help="model width (hidden size); 64 as in the example")
    parser.add_argument("--chunk", type=int, default=256, help="chunk size C of SeCO and SpaCO")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per method (median)")
    parser.add_argument("--budget-mib", type=float, default=64.0, help="memory budget of the fits table")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, backprop first (the time ratios' reference): {', '.join(CHOICES)}")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--plot", default=None, help="write a plot of memory and time against T here")
    args = parser.parse_args(argv)
    args.methods = tuple(args.methods.split(","))
    if args.methods[0] != "backprop" or not set(args.methods) <= set(CHOICES):
        parser.error(f"--methods: backprop first, then any of {', '.join(CHOICES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args)
    report(rows, args.budget_mib, args.methods)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.plot:
        plot(rows, args.plot, args.methods)


if __name__ == "__main__":
    main()
