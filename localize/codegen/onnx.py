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
from localize.runtime.model import LocalModel

__all__ = ["ONNX_TOLERANCE", "OnnxResult", "BlockWithHead", "export_onnx"]


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


def export_onnx(lm: LocalModel, index: int, args: tuple, path: Path) -> OnnxResult:
    """Export block ``index`` with its head (eval mode, dynamic batch where possible) and check it."""
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
        with _quiet():
            # forward(*args): one dynamic_shapes entry, for `args`
            program = torch.onnx.export(wrapper, args, dynamo=True, verbose=False, dynamic_shapes=(dynamic,))
            program.save(str(path))
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
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


def _batched(a: Any) -> bool:
    return isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] > 1


@contextmanager
def _quiet() -> Iterator[None]:
    """The exporter logs and warns at length (e.g. about torchvision); keep the CLI's output clean."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
