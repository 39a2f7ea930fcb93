"""The torchrun entry points: ``python -m localize.distributed`` and ``localize MODEL.py --train --distributed``.

Every rank builds the same LocalModel from the model file (seeded), runs :func:`~localize.distributed.train.train` and turns
its errors into one line and an exit code: errors every rank meets alike (a bad launch, a bad model) are printed by
rank 0 (exit code 2); a rank's own failure (a lost peer, a NaN loss) by that rank (exit code 1).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from localize.distributed.stages import Layout
from localize.distributed.train import STARTUP_TIMEOUT, train
from localize.errors import ConfigError, LocalizeError, PlanError, TraceError, VerificationError
from localize.runtime.checkpoint import CheckpointError
from localize.runtime.model import LocalModel

# Errors that every rank meets identically (bad launch, bad model, bad arguments, a --resume checkpoint
# of another plan: every rank reads the same fingerprint): rank 0 reports them.
_SAME_ON_EVERY_RANK = (ConfigError, PlanError, TraceError, VerificationError, CheckpointError)

__all__ = ["is_main_process", "load_local_model", "main", "main_from_cli", "report_error", "run_cli"]


def is_main_process() -> bool:
    """True on rank 0 (or without any launcher): the process that writes files and prints summaries."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def main_from_cli(
    lm: LocalModel,
    train_data: Any,
    *,
    epochs: int = 1,
    batch_size: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
    checkpoint: str | os.PathLike | None = None,
    timeout: float = 30.0,
    startup_timeout: float = STARTUP_TIMEOUT,
    log: Callable[[str], None] | None = print,
    checkpoint_every: int = 0,
    resume: str | os.PathLike | None = None,
) -> int:
    """:func:`train` on this rank, its errors turned into an exit code (``python -m localize.distributed``).

    Errors become one line on stderr: errors every rank meets alike (a bad launch, a bad model)
    are printed by rank 0 only (exit code 2); a rank's own failure (a lost peer, a NaN loss) by that
    rank (exit code 1).
    """
    try:
        train(
            lm,
            train_data,
            epochs=epochs,
            batch_size=batch_size,
            shuffle=shuffle,
            seed=seed,
            checkpoint=checkpoint,
            timeout=timeout,
            startup_timeout=startup_timeout,
            log=log if is_main_process() or _is_last_stage(lm) else None,
            checkpoint_every=checkpoint_every,
            resume=resume,
        )
    except LocalizeError as e:
        return report_error(e)
    return 0


def report_error(e: LocalizeError) -> int:
    """Print ``e`` as one line on the ranks that should, and return the exit code (2 or 1)."""
    everywhere = isinstance(e, _SAME_ON_EVERY_RANK)
    if not everywhere or is_main_process():
        print(f"localize: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
    return 2 if everywhere else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m localize.distributed MODEL.py --blocks K ...``, one process per rank under torchrun."""
    parser = argparse.ArgumentParser(
        prog="python -m localize.distributed",
        description="Train MODEL.py's model with local learning, one block per process (run under torchrun).",
    )
    parser.add_argument("model", help="MODEL.py[:factory] defining model(), example_inputs() and dataset()")
    parser.add_argument("--blocks", type=int, required=True, help="K: blocks = pipeline stages")
    parser.add_argument("--aux", default="dgl")
    parser.add_argument(
        "--aux-option", action="append", default=None, metavar="KEY=VALUE", help="an option of --aux, repeatable"
    )
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--clip", type=float, default=None, help="clip each block's gradient norm to this")
    parser.add_argument("--accumulate", type=int, default=1, help="update every N-th microbatch")
    parser.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="autocast blocks and heads")
    parser.add_argument("--chunk-size", type=int, default=None, help="train each block C positions at a time (SeCO)")
    parser.add_argument("--chunk-keep", type=float, default=1.0, help="with --chunk-size: SpaCO's keep rate")
    parser.add_argument(
        "--recompute", action="store_true", help="recompute each unit of a block during its backward (less memory)"
    )
    parser.add_argument("--schedule", choices=["cosine", "step", "none"], default="none")
    parser.add_argument("--warmup", type=int, default=0, help="updates of linear learning-rate warmup")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shuffle", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--checkpoint", default=None, help="directory for the final checkpoint/ and the assembled model.pt"
    )
    parser.add_argument(
        "--checkpoint-every", type=int, default=0, metavar="N",
        help="also checkpoint every N microbatches into CHECKPOINT.checkpoint/ (needs --checkpoint)",
    )
    parser.add_argument(
        "--resume", default=None, metavar="PATH|auto",
        help="continue from a distributed checkpoint folder; auto: the latest in CHECKPOINT.checkpoint/ if any",
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for a peer before stopping"
    )
    parser.add_argument(
        "--startup-timeout",
        type=float,
        default=STARTUP_TIMEOUT,
        help="seconds the ranks wait for each other to start",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    _set_threads(args.threads)
    try:
        Layout.of(int(os.environ.get("WORLD_SIZE", "1")), args.blocks)  # before building anything
        lm, train_data = _build_from_file(args)
    except LocalizeError as e:
        return report_error(e)
    return main_from_cli(
        lm,
        train_data,
        epochs=args.epochs,
        batch_size=args.batch_size,
        shuffle=args.shuffle,
        seed=args.seed,
        checkpoint=args.checkpoint,
        timeout=args.timeout,
        startup_timeout=args.startup_timeout,
        log=None if args.quiet else print,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
    )


def run_cli(args: argparse.Namespace) -> int:
    """``localize MODEL.py --blocks K --train --distributed``: this rank's part; returns the exit code.

    :mod:`localize.cli.main` calls it on every rank torchrun starts, with its parsed arguments. Every
    rank builds the model as ``localize --train`` does (seeded, same ``transform`` options); stage 0
    reads ``dataset()``'s training split in the batches ``--train`` uses (the same order for the same
    ``--seed``); each stage trains its block; every stage writes its shard of ``OUT/checkpoint/``
    (``torch.distributed.checkpoint``) and rank 0 the assembled ``model.pt`` and ``metrics.json``.
    ``--checkpoint-every N`` writes ``OUT.checkpoint/step-<N>/`` every N microbatches (removed when
    the run ends); ``--resume PATH`` continues from one, ``--resume auto`` from the latest there if
    any (what a ``torchrun --max-restarts`` relaunch needs). ``--device cuda`` uses nccl (one GPU per
    process, ``cuda:LOCAL_RANK``), the default ``cpu`` gloo. Errors are one line on stderr (exit
    code 2 for a bad launch, printed by rank 0; 1 for a lost peer, printed by the ranks that saw it).
    """
    _set_threads(getattr(args, "threads", None))
    try:
        blocks, cuts, backend = _cli_options(args)
        Layout.of(int(os.environ.get("WORLD_SIZE", "1")), blocks)  # before building anything
        out = _cli_out(args)
        lm, mf = load_local_model(
            args.model,
            blocks,
            aux=args.aux,
            optimizer=args.optimizer,
            lr=args.lr,
            seed=args.seed,
            balance=getattr(args, "balance", None) or "flops",  # stages run at once: the slowest sets the pace
            cuts=cuts,
            max_frontier=getattr(args, "max_frontier", 1),
            training=args,
            aux_options=_aux_options(args),
        )
        if len(lm.blocks) != blocks:
            raise ConfigError(
                f"--cuts makes {len(lm.blocks)} blocks but --blocks is {blocks}; give K - 1 cuts"
            )
        data = _cli_data(args, mf) if int(os.environ.get("RANK", "0")) % blocks == 0 else None
    except LocalizeError as e:
        return report_error(e)
    every = getattr(args, "checkpoint_every", None) or 0
    try:
        result = train(
            lm,
            data,
            epochs=args.epochs,
            checkpoint=out,
            timeout=getattr(args, "timeout", 30.0),
            startup_timeout=getattr(args, "startup_timeout", STARTUP_TIMEOUT),
            backend=backend,
            log=print if is_main_process() or _is_last_stage(lm) else None,
            checkpoint_every=every,
            resume=getattr(args, "resume", None),
        )
    except LocalizeError as e:
        return report_error(e)
    if result.rank == 0:
        metrics = {
            "world_size": result.layout.world_size,
            "stages": result.layout.stages,
            "replicas": result.layout.replicas,
            "steps": result.steps,
            "samples": result.samples,
            "seconds": result.seconds,
            "samples_per_second": result.throughput,
            "losses": [[v if math.isfinite(v) else None for v in step] for step in result.losses],
        }
        _write_text_atomically(json.dumps(metrics, indent=1), out / "metrics.json")
        print(
            f"wrote {out}/: {', '.join(sorted(p.name for p in out.iterdir() if not p.name.startswith('.')))}"
        )
    return 0


def _cli_options(args: argparse.Namespace) -> tuple[int, list[str] | None, str]:
    """(K, cuts, backend) for ``--distributed``, or a ConfigError for flags that do not apply."""
    if not args.train:
        raise ConfigError("--distributed trains one block per process; add --train")
    if getattr(args, "compare_bp", None):
        raise ConfigError(
            "--compare-bp does not apply to --distributed (it trains backprop in one process); drop --compare-bp"
        )
    cuts = [c.strip() for c in args.cuts.split(",") if c.strip()] if getattr(args, "cuts", None) else None
    blocks = args.blocks or (len(cuts) + 1 if cuts else None)
    if blocks is None:
        raise ConfigError(
            "--distributed needs --blocks K (one pipeline stage per process: torchrun --nproc-per-node K)"
        )
    device = getattr(args, "device", "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available on this machine; use --device cpu (gloo)")
    return blocks, cuts, "nccl" if device == "cuda" else "gloo"


def _cli_out(args: argparse.Namespace) -> Path:
    from localize.compiler.model_file import split_spec

    path, _ = split_spec(args.model)
    out = Path(args.out) if args.out else Path("localize_out") / Path(path).stem
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"--out {out}: cannot create it ({e.strerror}); choose a writable directory"
        ) from None
    return out


def _cli_data(args: argparse.Namespace, mf: Any) -> Callable[[int], Iterable]:
    """Epoch -> the batches ``localize --train`` draws (seeded by ``--seed`` and the epoch)."""
    from localize.data import epoch_batches

    if not mf.has_dataset:
        raise ConfigError(f"{args.model} defines no dataset(); add `def dataset(): return (train, test)`")
    train_data = mf.dataset()[0]
    return lambda epoch: epoch_batches(train_data, args.batch_size, epoch, args.seed)


def _write_text_atomically(text: str, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def _set_threads(threads: int | None) -> None:
    if threads is None and "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        threads = max(1, (os.cpu_count() or 1) // local)  # don't oversubscribe the cores
    if threads is not None:
        torch.set_num_threads(threads)


def load_local_model(
    spec: str,
    blocks: int | None,
    *,
    aux: str = "dgl",
    optimizer: str = "adamw",
    lr: float | None = None,
    seed: int = 0,
    balance: str = "flops",
    cuts: list[str] | None = None,
    max_frontier: int = 1,
    training: Any = None,
    **options: Any,
) -> tuple[LocalModel, Any]:
    """The LocalModel the launcher builds on every rank from ``MODEL.py[:factory]``, and the model file.

    Seeded before the model is built, so every rank (and an in-process reference) gets the same one.
    ``training`` is the parsed command line whose ``--clip``/``--accumulate``/``--amp``/``--schedule``
    apply (:func:`localize.compiler.model_file.training_options`); ``options`` are such ``transform``
    options given directly (``clip_grad_norm=``, ``accumulate=``, ``autocast=``, ``scheduler=``).
    """
    from localize.compiler.model_file import (
        load_model_file,
        localize_file,  # the CLI's compile step: same RNG draws
        training_options,
    )

    mf = load_model_file(spec)
    if training is not None:
        options = training_options(training, mf) | options
    lm, _ = localize_file(
        mf,
        blocks=blocks,
        aux=aux,
        balance=balance,
        cuts=cuts,
        max_frontier=max_frontier,
        optimizer=optimizer,
        lr=lr,
        seed=seed,
        **options,
    )
    return lm, mf


def _build_from_file(args: argparse.Namespace) -> tuple[LocalModel, Any]:
    lm, mf = load_local_model(
        args.model,
        args.blocks,
        aux=args.aux,
        optimizer=args.optimizer,
        lr=args.lr,
        seed=args.seed,
        training=args,
        aux_options=_aux_options(args),
    )
    if int(os.environ.get("RANK", "0")) % args.blocks != 0:
        return lm, None  # only stage 0 reads the data
    if not mf.has_dataset:
        raise ConfigError(f"{args.model} defines no dataset(); add `def dataset(): return (train, test)`")
    return lm, mf.dataset()[0]


def _aux_options(args: argparse.Namespace) -> dict[str, Any]:
    from localize.compiler.model_file import aux_options  # lazily, as the compile step is

    return aux_options(args)


def _is_last_stage(lm: LocalModel) -> bool:
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    k = len(lm.blocks)
    return world % k == 0 and rank % k == k - 1 and rank // k == 0
