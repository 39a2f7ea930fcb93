"""``localize MODEL.py --blocks K``: compile a model file into local-learning artifacts, or train it.

Without ``--train`` it compiles: prints a table of the blocks and writes ``plan.json``,
``schedule.txt``, ``block_<i>.py``, ``block_<i>.onnx``, ``graph.svg`` (or ``graph.dot``),
``program.py`` and ``weights.pt`` into ``--out`` (default ``localize_out/<file stem>/``). With
``--train`` it also trains (``metrics.json``, ``curves.png``); ``--compare-bp`` trains the
untransformed model with backprop too and prints both side by side.

Bad input (a missing or broken model file, ``--blocks 0``, an unwritable ``--out``, ...) prints
one line ``localize: error: ...`` and exits with code 2; nothing is left in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

import localize
from localize.cli.quiet import torch_output_to
from localize.compiler.model_file import (
    ModelFile,
    aux_options,
    load_model_file,
    localize_file,
    split_spec,
    training_options,
)
from localize.data import random_dataset
from localize.errors import ConfigError, LocalizeError
from localize.extras import MissingExtra
from localize.passes.balance_blocks import METRICS
from localize.runtime.model import LocalModel

__all__ = ["main", "build_parser"]

PROG = "localize"


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


def _positive(kind: type, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; {what}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text} is out of range; {what}")
        return value

    return parse


def _natural(text: str) -> int:
    """An integer >= 0 (``--warmup``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; use a number of updates >= 0") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is out of range; use a number of updates >= 0")
    return value


def _fraction(text: str) -> float:
    """A number in (0, 1] (``--chunk-keep``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; use a probability in (0, 1]") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is out of range; use a probability in (0, 1]")
    return value


def build_parser() -> argparse.ArgumentParser:
    from localize.aux import available

    p = _Parser(
        prog=PROG,
        description="Cut a PyTorch model into gradient-isolated blocks trained by local losses.",
        epilog="MODEL.py defines model() -> nn.Module and example_inputs() -> tuple; optionally "
        "dataset() -> (train, test) and loss_fn(prediction, target). Example: "
        "localize examples/mnist1d_resnet.py --blocks 4 --train --epochs 3 --threads 1",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL.py[:factory]", help="model file (factory defaults to model)")
    p.add_argument(
        "--blocks", type=_positive(int, "use an integer >= 1 (1 is plain backprop)"), default=None,
        help="number of blocks K (None: 4, or one more than the --cuts)",
    )
    p.add_argument("--aux", default="dgl", choices=available(), help="aux-head strategy")
    p.add_argument(
        "--aux-option", action="append", default=None, metavar="KEY=VALUE",
        help="an option of the --aux strategy, repeatable, e.g. --aux readout --aux-option depth=4 "
        "(each strategy's options: docs/strategies.md)",
    )
    p.add_argument(
        "--balance",
        choices=list(METRICS),
        default=None,
        help="cost the blocks balance (default: memory in one process, flops with --distributed)",
    )
    p.add_argument("--cuts", default=None, help="module names that start blocks, e.g. layer2,layer3")
    p.add_argument(
        "--max-frontier", type=_positive(int, "use an integer >= 1"), default=1, metavar="N",
        help="activations that may cross a cut (raise it when a model has too few legal cuts for --blocks)",
    )
    p.add_argument(
        "--threads", type=_positive(int, "use an integer >= 1"), default=None, metavar="N",
        help="torch intra-op threads (None: torch's choice; 1 is fastest on a busy 2-core machine)",
    )
    p.add_argument("--out", default=None, metavar="DIR", help="output directory (None: localize_out/<file stem>)")
    p.add_argument("--train", action="store_true", help="train with local learning after compiling")
    p.add_argument("--epochs", type=_positive(int, "use an integer >= 1"), default=5, help="training epochs")
    p.add_argument("--batch-size", type=_positive(int, "use an integer >= 1"), default=64, help="training batch size")
    p.add_argument("--lr", type=_positive(float, "use a learning rate > 0"), default=None, help="learning rate (None: the optimizer's default, sgd 0.05, adamw 1e-3)")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="adamw", help="per-block optimizer")
    p.add_argument(
        "--clip", type=_positive(float, "use a gradient norm > 0"), default=None, metavar="C",
        help="clip each block's gradient norm to C before its update (None: no clipping)",
    )
    p.add_argument(
        "--accumulate", type=_positive(int, "use an integer >= 1"), default=1, metavar="N",
        help="update every N-th step, on the gradients of the N batches (1: every step)",
    )
    p.add_argument(
        "--amp", choices=["bf16", "fp16"], default=None,
        help="run blocks and heads under torch.autocast (fp16 adds a GradScaler per block; None: full precision)",
    )
    p.add_argument(
        "--schedule", choices=["cosine", "step", "none"], default="none",
        help="learning-rate schedule over the run's updates, per block (step: x0.1 at 50%% and 75%%)",
    )
    p.add_argument(
        "--warmup", type=_natural, default=0, metavar="W",
        help="updates of linear warmup from lr/W to lr before the schedule",
    )
    p.add_argument(
        "--chunk-size", type=_positive(int, "use an integer >= 1"), default=None, metavar="C",
        help="also train each block chunk by chunk along the sequence, C positions at a time (SeCO: exact "
        "gradient, one chunk's activations alive; causal sequence models only; None: whole sequences)",
    )
    p.add_argument(
        "--chunk-keep", type=_fraction, default=1.0, metavar="P",
        help="with --chunk-size: backpropagate each chunk with probability P, compensated (SpaCO; 1: every chunk)",
    )
    p.add_argument(
        "--recompute", action="store_true",
        help="recompute each unit (residual block, transformer layer) in its block's backward: less memory, "
        "same gradients, one more forward of the block",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="training device")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the data order")
    p.add_argument("--compare-bp", action="store_true", help="with --train: also train with plain backprop")
    p.add_argument(
        "--diagnose", action="store_true",
        help="per block on 256 training samples (after --train): gradient cosine with backprop, local vs final "
        "loss, linear-probe accuracy",
    )
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX export (faster)")
    p.add_argument(
        "--distributed", action="store_true",
        help="with --train: one block per process; launch with torchrun --nproc-per-node K (localize.distributed)",
    )
    p.add_argument(
        "--checkpoint-every", type=_positive(int, "use a number of steps >= 1"), default=None, metavar="N",
        help="with --train: save a checkpoint every N steps to OUT.checkpoint.pt (beside OUT); with --distributed "
        "every stage writes its shard of OUT.checkpoint/step-N/",
    )
    p.add_argument(
        "--resume", default=None, metavar="PATH",
        help="with --train: continue from a checkpoint (same model file, options and seed); with --distributed "
        "a checkpoint folder, or auto: the latest in OUT.checkpoint/ if any (for torchrun --max-restarts)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 bad input, 130 interrupted)."""
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as e:
        return _fail(str(e))
    if args.distributed:  # this rank's part of a pipeline torchrun started: localize.distributed
        from localize.distributed import run_cli

        return run_cli(args)
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 140, soft_wrap=False)
    try:
        return _run(args, console)
    except LocalizeError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the output directory was not written (checkpoints are kept)", file=sys.stderr)
        return 130


def _fail(message: str) -> int:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


# ------------------------------------------------------------------------------------------ the run




def _run(args: argparse.Namespace, console: Console) -> int:
    from localize.codegen import artifacts
    from localize.codegen.program import OptimizerSpec

    path, _ = split_spec(args.model)
    out = Path(args.out) if args.out else Path("localize_out") / Path(path).stem
    artifacts.check_writable(out.absolute())
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available on this machine; use --device cpu")
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cuts = _parse_cuts(args.cuts)
    options_of_aux = aux_options(args)
    for flag, value in (("--compare-bp", args.compare_bp), ("--checkpoint-every", args.checkpoint_every),
                        ("--resume", args.resume), ("--schedule", args.schedule != "none"),
                        ("--warmup", args.warmup)):
        if value and not args.train:
            raise ConfigError(f"{flag} only applies to training; add --train")
    if args.resume is not None and not Path(args.resume).is_file():
        raise ConfigError(f"--resume {args.resume}: no such file; pass a checkpoint written by --checkpoint-every")

    mf = load_model_file(args.model)
    data = mf.dataset() if args.train or args.diagnose else None  # read once: the schedule counts its batches
    checkpoint_path = out.with_name(out.name + ".checkpoint.pt")
    with artifacts.atomic_directory(out) as tmp:
        with torch_output_to(out.with_name(out.name + ".trace.log")):  # torch.export's dumps, on failure
            lm, example = localize_file(
                mf,
                blocks=args.blocks,
                aux=args.aux,
                aux_options=options_of_aux,
                balance=args.balance,
                cuts=cuts,
                max_frontier=args.max_frontier,
                optimizer=args.optimizer,
                lr=args.lr,
                seed=args.seed,
                **training_options(args, mf, data[0] if data is not None else None),
            )
        backprop_model = None
        if args.compare_bp:
            from localize.cli.train import copy_for_backprop

            backprop_model = copy_for_backprop(lm.model)  # same initial weights
        options = {
            "blocks": lm.plan.num_blocks,
            "aux": args.aux,
            "aux_options": dict(lm.plan.aux_options),
            "balance": lm.plan.balance,
            "cuts": cuts,
            "max_frontier": lm.plan.max_frontier,
            "optimizer": {"name": args.optimizer} | OptimizerSpec.build(args.optimizer, args.lr).options,
            "clip_grad_norm": args.clip,
            "accumulate": args.accumulate,
            "autocast": args.amp,
            "schedule": {"kind": args.schedule, "warmup": args.warmup},
            "chunk_size": args.chunk_size,
            "chunk_keep": args.chunk_keep,
            "recompute": args.recompute,
            "batch_size": args.batch_size,
            "seed": args.seed,
        }
        doc = artifacts.write_artifacts(
            tmp,
            lm,
            model=artifacts.ModelInfo(type(lm.model).__name__, path, mf.factory, str(mf.path)),
            example_inputs=example,
            options=options,
            optimizer=OptimizerSpec.build(args.optimizer, args.lr),
            batch_size=args.batch_size,
            seed=args.seed,
            onnx=not args.no_onnx,
        )
        console.print(summary_table(doc))
        for line in lm.plan.traced.warnings:  # train() differs from the traced graph: never silently
            console.print(f"warning: {line}", markup=False)
        for line in problems(doc):
            console.print(f"[yellow]warning:[/yellow] {line}")
        for line in doc["skipped"]:
            console.print(f"skipped: {line}", markup=False)
        if args.train or args.diagnose:
            data = _data(args, lm, mf, data, console)
        if args.train:
            _train(args, lm, mf, data, backprop_model, device, tmp, console, checkpoint_path)
        if args.diagnose:
            _diagnose(lm, data, device, console)
    files = sorted(p.name for p in out.iterdir())
    console.print(f"wrote {out}/: {', '.join(files)}")
    if args.checkpoint_every and checkpoint_path.exists():
        checkpoint_path.unlink()  # the run finished: OUT/checkpoint.pt holds its final state
    return 0


def _parse_cuts(text: str | None) -> list[str] | None:
    if text is None:
        return None
    cuts = [c.strip() for c in text.split(",") if c.strip()]
    if not cuts:
        raise ConfigError("--cuts is empty; name the modules that start blocks, e.g. --cuts layer2,layer3")
    return cuts


def _checkpointing(args, lm: LocalModel, path: Path, console: Console):
    """Save every ``--checkpoint-every`` steps to ``path``; restore from ``--resume``."""
    from localize.cli.train import Checkpointing

    # what must not change between a run and its resumption, besides the model and plan (fingerprint)
    run = {
        "seed": args.seed, "batch_size": args.batch_size, "optimizer": args.optimizer, "lr": args.lr,
        "accumulate": args.accumulate, "amp": args.amp, "schedule": args.schedule, "warmup": args.warmup,
        "chunk_size": args.chunk_size, "chunk_keep": args.chunk_keep, "recompute": args.recompute,
    }

    # a schedule's length is part of its state: resuming with other --epochs would run past its end
    updates = getattr(lm._scheduler_factory, "total", None)

    def save(position: dict[str, Any], to: Path = path) -> None:
        lm.save(str(to), data=position | {"run": run | {"schedule_updates": updates}})

    def restore() -> dict[str, Any]:
        data = localize.load(args.resume, into=lm).data
        if "history" not in data or "epoch" not in data:
            raise ConfigError(
                f"--resume {args.resume}: the checkpoint has no training position (not written by "
                f"--checkpoint-every); resume from a checkpoint the CLI wrote"
            )
        saved = data.get("run", {})
        if saved.get("schedule_updates", updates) != updates:
            raise ConfigError(
                f"--resume {args.resume}: the checkpoint's --schedule runs over {saved['schedule_updates']} updates, "
                f"this run's over {updates} (its --epochs differ); pass the same --epochs, or train on with "
                f"--schedule none"
            )
        for key, value in run.items():
            if key in saved and saved[key] != value:
                flag = "--" + key.replace("_", "-")
                raise ConfigError(
                    f"--resume {args.resume}: the checkpoint was trained with {flag} {saved[key]}, this run has "
                    f"{flag} {value}; pass the same {flag}"
                )
        return data

    if args.checkpoint_every:
        console.print(f"checkpoints every {args.checkpoint_every} steps to {path}")
    checkpointing = Checkpointing(
        every=args.checkpoint_every or 0,
        save=save if args.checkpoint_every else None,
        restore=restore if args.resume else None,
    )
    return checkpointing, save


def _data(args, lm: LocalModel, mf: ModelFile, data, console: Console):
    """The model file's ``dataset()``, else random data shaped like its example inputs."""
    if data is not None:
        return data
    inputs = [
        (n, tuple(x.shape[1:]), str(x.dtype).replace("torch.", ""), None if x.is_floating_point() else int(x.max()) + 1)
        for n, x in zip(lm.plan.traced.input_names, mf.example_inputs())
    ]
    console.print(f"{mf.path.name} has no dataset(): using random data shaped like example_inputs()")
    return random_dataset(inputs, tuple(lm.plan.output_shape), seed=args.seed)


def _diagnose(lm: LocalModel, data, device, console: Console) -> None:
    """``--diagnose``: :func:`localize.diagnose` on the first 256 training samples."""
    from localize.data import sequential_batches

    inputs, target = next(sequential_batches(data[0], 256))
    lm.to(device)
    report = localize.diagnose(lm, tuple(x.to(device) for x in inputs), target.to(device))
    console.print(f"diagnosis on {len(target)} training samples (gradient cosine: local vs backprop)")
    console.print(str(report), markup=False)


def _train(
    args, lm: LocalModel, mf: ModelFile, data, backprop_model, device, out: Path, console: Console,
    checkpoint_path: Path,
) -> None:
    from localize.cli import train as training

    train, test = data
    lm.to(device)
    lm.train()
    common = dict(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, device=device, console=console)
    checkpointing, save = _checkpointing(args, lm, checkpoint_path, console)
    histories = [training.train_local(lm, train, test, checkpointing=checkpointing, **common)]
    # the trained state, resumable: `--resume OUT/checkpoint.pt --epochs MORE` trains on from here
    done = {"epoch": args.epochs, "batch": 0, "sums": [], "steps": 0, "samples": 0}
    save(done | {"history": histories[0].to_json()}, out / "checkpoint.pt")
    if backprop_model is not None:
        backprop_model.to(device)
        histories.append(
            training.train_backprop(backprop_model, lm, train, test, optimizer=args.optimizer, lr=args.lr, **common)
        )
        console.print(comparison_table(histories[0], histories[1]))
    metrics = {
        "device": str(device),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "optimizer": args.optimizer,
        "lr": args.lr,
        "local": histories[0].to_json(),
        "backprop": histories[1].to_json() if len(histories) > 1 else None,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    try:
        training.plot_curves(histories, out / "curves.png")
    except MissingExtra as e:
        console.print(f"skipped: {e}", markup=False)


# ------------------------------------------------------------------------------------------ tables


def summary_table(doc: dict[str, Any]) -> Table:
    """The blocks of a plan.json document as a rich table (the CLI's summary)."""
    model = doc["model"]
    inputs = ", ".join(f"{i['name']} {tuple(i['shape'])}" for i in model["inputs"])
    chunk = doc["options"].get("chunk_size")
    keep = doc["options"].get("chunk_keep", 1.0)
    chunks = f"   chunks of {chunk} ({'SeCO' if keep >= 1 else f'SpaCO keep {keep:g}'})" if chunk else ""
    chunks += "   units recomputed in backward" if doc["options"].get("recompute") else ""
    table = Table(
        title=f"{model['name']}: {doc['num_blocks']} blocks ({model['trace']} trace, inputs {inputs})",
        caption=f"schedule: {doc['schedule']}{chunks}   threads: {torch.get_num_threads()}",
        title_justify="left",
        caption_justify="left",
    )
    for name, justify in (
        ("block", "right"),
        ("nodes", "right"),
        ("params", "right"),
        ("FLOPs", "right"),
        ("act. bytes", "right"),
        ("est. peak", "right"),
        ("crosses its cut", "left"),
        ("aux head", "left"),
        ("ONNX", "left"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for b in doc["blocks"]:
        crossing = "\n".join(
            f"{c['name']} {tuple(c['shape']) if c['shape'] is not None else ''}".rstrip() for c in b["crossing"]
        ) or "(model output)"
        aux = f"{b['aux']['strategy']}, {_si(b['aux']['params'])} params" if b["aux"] else "model output"
        aux += " (chunked)" if b["aux"] and b["aux"].get("chunked") else ""
        table.add_row(
            str(b["index"]),
            str(len(b["nodes"])),
            _si(b["params"]),
            _si(b["flops"]),
            _bytes(b["activation_bytes"]),
            _bytes(b["peak_bytes"]) if "peak_bytes" in b else "",
            crossing,
            aux,
            _onnx_cell(b.get("onnx")),
        )
    total = sum(b["params"] for b in doc["blocks"])
    table.add_section()
    table.add_row(
        "all",
        str(sum(len(b["nodes"]) for b in doc["blocks"])),
        _si(total),
        _si(sum(b["flops"] for b in doc["blocks"])),
        _bytes(sum(b["activation_bytes"] for b in doc["blocks"])),
        f"backprop {_bytes(doc['backprop_peak_bytes'])}" if "backprop_peak_bytes" in doc else "",
        "",
        _si(sum(b["aux"]["params"] for b in doc["blocks"] if b["aux"])) + " params",
        "",
    )
    return table


def problems(doc: dict[str, Any]) -> list[str]:
    """One line per artifact that could not be made (also recorded in plan.json)."""
    lines = []
    for b in doc["blocks"]:
        onnx = b.get("onnx")
        if onnx and onnx["status"] in ("failed", "mismatch"):
            lines.append(f"block_{b['index']}.onnx: {onnx['status']}: {onnx['error']}")
        code = b.get("code")
        if code and code["status"] == "failed":  # "partial" (no head code) shows up under program.py
            lines.append(f"block_{b['index']}.py not written: {code['error']}")
    program = doc.get("program")
    if program and program["status"] != "ok":
        lines.append(f"program.py not written: {program['error']}")
    return lines


def comparison_table(local, backprop) -> Table:
    """Local learning and backprop side by side: accuracy, peak saved activations, step time."""
    table = Table(
        title="local learning vs backprop",
        caption="same initial weights, seed, data order and epochs",
        title_justify="left",
        caption_justify="left",
    )
    table.add_column("")
    table.add_column(local.name, justify="right")
    table.add_column(backprop.name, justify="right")
    a, b = local.final, backprop.final
    if a.test_accuracy is not None and b.test_accuracy is not None:
        table.add_row("test accuracy", f"{100 * a.test_accuracy:.1f}%", f"{100 * b.test_accuracy:.1f}%")
    table.add_row("test loss", f"{a.test_loss:.4f}", f"{b.test_loss:.4f}")
    table.add_row("peak saved activations", _bytes(local.peak_saved_bytes), _bytes(backprop.peak_saved_bytes))
    table.add_row("step time", f"{local.step_ms:.1f} ms", f"{backprop.step_ms:.1f} ms")
    table.add_row("samples/s (last epoch)", f"{a.samples_per_s:,.0f}", f"{b.samples_per_s:,.0f}")
    return table


def _onnx_cell(onnx: dict[str, Any] | None) -> str:
    if onnx is None:
        return ""
    if onnx["status"] == "ok":
        return f"ok ({onnx['max_abs_diff']:.1e})"
    if onnx["status"] == "mismatch":
        return f"[red]mismatch ({onnx['max_abs_diff']:.1e})[/red]"
    if onnx["status"] == "skipped":
        return "skipped"
    return "[red]FAILED[/red] (see below)"


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:g}"


def _bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:g} B"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
