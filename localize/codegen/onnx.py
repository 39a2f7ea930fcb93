"""``block_<i>.onnx``: each block with its aux head through ``torch.onnx``, checked by onnx's checker and against onnxruntime."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from localize.extras import MissingExtra, require
from localize.logs import loggers_at
from localize.runtime.model import LocalModel

__all__ = ["ONNX_TOLERANCE", "OnnxResult", "BlockWithHead", "export_onnx", "other_batch_inputs"]


ONNX_TOLERANCE = 1e-4  # max |onnxruntime - torch| accepted for a block's outputs


@dataclass
class OnnxResult:
    """How a block's ONNX export went: ``ok``, ``mismatch`` (beyond tolerance), ``failed`` or ``skipped``."""

    file: str | None
    status: str
    max_abs_diff: float | None
    error: str | None
    seconds: float


class BlockWithHead(nn.Module):
    """A block and its aux head as one module: returns the block's outputs, then the head's."""

    def __init__(self, block: nn.Module, head: nn.Module | None, slot: int | None) -> None:
        super().__init__()
        self.block, self.head, self.slot = block, head, slot

    def forward(self, *args: Any) -> tuple:
        outs = tuple(self.block(*args))
        if self.head is None:
            return outs
        return (*outs, self.head(outs[self.slot]))


def export_onnx(
    lm: LocalModel, index: int, args: tuple, path: Path, other_batch: tuple | None = None
) -> OnnxResult:
    """Export block ``index`` with its head (eval mode, dynamic batch where possible) and check it.

    The ONNX graph is run in onnxruntime on ``args`` and, when given, on ``other_batch`` (the
    block's inputs at another batch size): a block is ``ok`` only if both match torch. Inputs and
    outputs are named after the graph values they carry (``x``, ``cut_1__1``, ``aux_head``).
    """
    start = time.perf_counter()
    try:
        onnx = require("onnx", "export", "block_<i>.onnx")
        onnxruntime = require("onnxruntime", "export", "block_<i>.onnx")
    except MissingExtra as e:
        return OnnxResult(None, "skipped", None, str(e), 0.0)
    block = lm.blocks[index]
    slot = block.plan.outputs.index(block.plan.primary) if block.aux is not None else None
    wrapper = BlockWithHead(block.module, block.aux, slot)
    was_training = lm.training
    lm.eval()
    wrapper.eval()
    try:
        with torch.no_grad():  # sizes (SymInt outputs of exported graphs) come back as 0-d tensors
            want = [o if isinstance(o, torch.Tensor) else torch.tensor(o) for o in wrapper(*args)]
        dynamic = tuple({0: torch.export.Dim.AUTO} if _batched(a) else None for a in args)
        inputs = [n for n, a in zip(block.plan.inputs, args) if isinstance(a, torch.Tensor)]
        outputs = list(block.plan.outputs) + (["aux_head"] if block.aux is not None else [])
        with _quiet():
            # forward(*args): one dynamic_shapes entry, for `args`
            program = torch.onnx.export(
                wrapper,
                args,
                dynamo=True,
                verbose=False,
                dynamic_shapes=(dynamic,),
            )
            program.save(str(path))
        model = onnx.load(str(path))
        _name_io(model, inputs, outputs)
        onnx.save(model, str(path))
        onnx.checker.check_model(model, full_check=True)
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 4  # its failures come back as exceptions: no log lines on the terminal
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        diff = _compare(session, args, want)
        if other_batch is not None:
            with torch.no_grad():
                want_other = [o if isinstance(o, torch.Tensor) else torch.tensor(o) for o in wrapper(*other_batch)]
            batch = next(a.shape[0] for a in other_batch if _batched(a))
            try:
                diff = max(diff, _compare(session, other_batch, want_other))
            except Exception as e:  # noqa: BLE001 - say which batch size broke it
                raise type(e)(f"at batch size {batch}: {e}") from e
    except Exception as e:  # noqa: BLE001 - a block that does not export is reported, not fatal
        with contextlib.suppress(OSError):
            path.unlink()
        message = " ".join(str(e).split())[:300]
        return OnnxResult(None, "failed", None, f"{type(e).__name__}: {message}", time.perf_counter() - start)
    finally:
        lm.train(was_training)
    status = "ok" if diff <= ONNX_TOLERANCE and math.isfinite(diff) else "mismatch"
    error = None if status == "ok" else f"max |onnxruntime - torch| = {diff:.3g} > {ONNX_TOLERANCE:g}"
    return OnnxResult(path.name, status, diff, error, time.perf_counter() - start)


def _name_io(model: Any, inputs: list[str], outputs: list[str]) -> None:
    """Name the ONNX graph's inputs and outputs after the graph values they carry (the exporter
    says ``args_0``), where the counts match and the name is free in the graph."""
    graph = model.graph
    used = {v for n in graph.node for v in (*n.input, *n.output)} | {i.name for i in graph.initializer}
    renames: dict[str, str] = {}
    for values, names in ((graph.input, inputs), (graph.output, outputs)):
        if len(values) != len(names):
            continue
        for value, name in zip(values, names):
            if value.name != name and name not in used and name not in renames.values():
                renames[value.name] = name
    for node in graph.node:
        node.input[:] = [renames.get(v, v) for v in node.input]
        node.output[:] = [renames.get(v, v) for v in node.output]
    for value in (*graph.input, *graph.output, *graph.value_info):
        value.name = renames.get(value.name, value.name)


def _compare(session: Any, args: tuple, want: list[torch.Tensor]) -> float:
    """Run the ONNX session on the block's tensor arguments; the largest difference from ``want``."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(tensors):
        raise ValueError(f"the ONNX graph takes {len(names)} inputs, the block {len(tensors)} tensors")
    got = session.run(None, {n: t.detach().cpu().numpy() for n, t in zip(names, tensors)})
    if len(got) != len(want):
        raise ValueError(f"the ONNX graph returns {len(got)} outputs, the block {len(want)}")
    diff = 0.0
    for g, w in zip(got, want):
        if tuple(g.shape) != tuple(w.shape):
            raise ValueError(f"output shape {tuple(g.shape)} differs from torch's {tuple(w.shape)}")
        if w.numel():
            diff = max(diff, float((torch.from_numpy(g).double() - w.double()).abs().max()))
    return diff


def other_batch_inputs(flat: list[Any]) -> list[Any] | None:
    """The model inputs at another batch size (one more sample, repeated from the batch), or None
    when no input is batched."""
    if not any(_batched(a) for a in flat):
        return None
    return [torch.cat([a, a[:1]]) if _batched(a) else a for a in flat]


def _batched(a: Any) -> bool:
    return isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] > 1


@contextmanager
def _quiet() -> Iterator[None]:
    """The exporter logs and warns at length (e.g. about torchvision); keep the CLI's output clean."""
    with (
        loggers_at(logging.ERROR, "torch.onnx", "torch.export", "torch._export", "onnxscript"),
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        yield
